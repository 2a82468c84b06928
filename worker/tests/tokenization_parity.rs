//! Tokenization and collation against train.py run with transformers: the fixture
//! tests/fixtures/parity/ holds a LLaMA-style tokenizer without a pad token, alpaca.json, and
//! tokenization.json with per-record source/target texts, source_len, input_ids and labels at
//! model_max_length 48, the vocab sizes before/after the `[PAD]` addition, the special ids, and the
//! collated batch of records 0..3.

use std::path::PathBuf;

use herd_model::Tokenizer;
use herd_worker::data::{
    collate, encode_alpaca, load_records, source_text, target_text, Example, IGNORE_INDEX,
};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}

fn ids<T: serde::de::DeserializeOwned>(v: &Value) -> Vec<T> {
    serde_json::from_value(v.clone()).unwrap()
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("tokenization.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer_with_specials() -> (Tokenizer, usize, usize) {
    let mut tok = Tokenizer::from_dir(&fixture().join("tokenizer")).unwrap();
    let before = tok.len();
    tok.add_missing_special_tokens();
    let after = tok.len();
    (tok, before, after)
}

#[test]
fn vocab_sizes_and_special_ids() {
    let exp = expected();
    let (tok, before, after) = tokenizer_with_specials();
    assert_eq!(before as u64, exp["vocab_size_before"].as_u64().unwrap());
    assert_eq!(after as u64, exp["vocab_size_after"].as_u64().unwrap());
    assert_eq!(tok.pad_token(), Some("[PAD]"));
    assert_eq!(tok.pad_id().map(u64::from), exp["pad_token_id"].as_u64());
    assert_eq!(tok.bos_id().map(u64::from), exp["bos_token_id"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), exp["eos_token_id"].as_u64());
    assert_eq!(tok.unk_id().map(u64::from), exp["unk_token_id"].as_u64());
    // HF writes model_max_length 1e30 for "unset".
    assert_eq!(tok.model_max_length(), None);
}

#[test]
fn every_record_matches_train_py() {
    let exp = expected();
    let max_len = exp["model_max_length"].as_u64().unwrap() as usize;
    let (tok, _, _) = tokenizer_with_specials();
    let loaded = load_records(&fixture().join("alpaca.json"), false).unwrap();
    let recs = exp["records"].as_array().unwrap();
    assert_eq!(loaded.records.len(), recs.len());
    let mut truncated = 0;
    for (i, (rec, e)) in loaded.records.iter().zip(recs).enumerate() {
        assert_eq!(
            source_text(rec),
            e["source"].as_str().unwrap(),
            "source of record {i}"
        );
        assert_eq!(
            target_text(rec, tok.eos_token().unwrap()),
            e["target"].as_str().unwrap(),
            "target of record {i}"
        );
        let ex = encode_alpaca(&tok, rec, max_len).unwrap();
        assert_eq!(
            ex.input_ids,
            ids::<u32>(&e["input_ids"]),
            "input_ids of record {i}"
        );
        assert_eq!(ex.labels, ids::<i64>(&e["labels"]), "labels of record {i}");
        let masked = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
        assert_eq!(
            masked as u64,
            e["source_len"].as_u64().unwrap().min(ex.len() as u64),
            "source_len of record {i}"
        );
        if ex.len() == max_len {
            truncated += 1;
        }
    }
    // The fixture exercises truncation (inside the target and inside the prompt).
    assert!(truncated >= 2, "{truncated}");
}

#[test]
fn collated_batch_matches_train_py() {
    let exp = expected();
    let max_len = exp["model_max_length"].as_u64().unwrap() as usize;
    let (tok, _, _) = tokenizer_with_specials();
    let loaded = load_records(&fixture().join("alpaca.json"), false).unwrap();
    let b = &exp["batch"];
    let idx: Vec<usize> = ids(&b["record_indices"]);
    let examples: Vec<Example> = idx
        .iter()
        .map(|&i| encode_alpaca(&tok, &loaded.records[i], max_len).unwrap())
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, tok.pad_id().unwrap());
    let rows: Vec<Vec<u32>> = ids(&b["input_ids"]);
    assert_eq!(batch.batch, rows.len());
    assert_eq!(batch.seq_len, rows[0].len());
    assert_eq!(batch.input_ids, rows.concat());
    let labels: Vec<Vec<i64>> = ids(&b["labels"]);
    assert_eq!(batch.labels, labels.concat());
    let mask: Vec<Vec<Value>> = ids(&b["attention_mask"]);
    let mask: Vec<u8> = mask
        .concat()
        .iter()
        .map(|v| match v {
            Value::Bool(b) => u8::from(*b),
            Value::Number(n) => n.as_u64().unwrap() as u8,
            other => panic!("attention_mask value {other}"),
        })
        .collect();
    assert_eq!(batch.attention_mask, mask);
}

#[test]
fn saved_tokenizer_reloads_identically() {
    let (tok, _, after) = tokenizer_with_specials();
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    let re = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(re.len(), after);
    assert_eq!(re.pad_id(), tok.pad_id());
    let loaded = load_records(&fixture().join("alpaca.json"), false).unwrap();
    for rec in &loaded.records {
        assert_eq!(
            encode_alpaca(&re, rec, 48).unwrap(),
            encode_alpaca(&tok, rec, 48).unwrap()
        );
    }
}
