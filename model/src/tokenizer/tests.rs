use super::*;

const WORDS: &[&str] = &[
    "Below",
    "is",
    "an",
    "instruction",
    "###",
    "Response:",
    "cat",
    "sun",
];

#[test]
fn demo_layout() {
    let t = Tokenizer::demo(WORDS).unwrap();
    assert_eq!(t.unk_id(), Some(0));
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    assert_eq!(t.pad_id(), None);
    assert_eq!(t.token_to_id("<0x00>"), Some(3));
    assert_eq!(t.token_to_id("<0xFF>"), Some(258));
    assert_eq!(t.eos_token(), Some("</s>"));
    assert!(t.token_to_id("\u{2581}cat").is_some());
    assert!(t.token_to_id("cat").is_some());
}

#[test]
fn demo_words_stay_whole_and_bos_is_added() {
    let t = Tokenizer::demo(WORDS).unwrap();
    let ids = t.encode("cat sun").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(toks, vec!["<s>", "\u{2581}cat", "\u{2581}sun"]);
    // Digits are single characters.
    let ids = t.encode("12 + 7").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(
        toks,
        vec!["<s>", "\u{2581}", "1", "2", "\u{2581}", "+", "\u{2581}", "7"]
    );
    // A word after a newline and right after ':' is still one token.
    let ids = t.encode("### Response:cat\ncat").unwrap();
    let toks: Vec<String> = ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect();
    assert_eq!(
        toks,
        vec![
            "<s>",
            "\u{2581}###",
            "\u{2581}Response:",
            "cat",
            "\n",
            "cat"
        ]
    );
}

#[test]
fn demo_round_trip() {
    let t = Tokenizer::demo(WORDS).unwrap();
    for text in [
        "cat sun",
        "Below is an instruction.\n\n### Response:42",
        "  leading and trailing spaces  ",
        "中文测试：你好，世界",
        "emoji 🦙🐑 and ünïcödé",
        "tabs\tand\nnewlines\n",
        "literal <0x41> stays text",
        "",
    ] {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.first(), Some(&1), "bos first for {text:?}");
        assert_eq!(
            t.decode(&ids, true).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    // No unk: everything unknown goes through byte fallback.
    let ids = t.encode("中文🦙").unwrap();
    assert!(!ids.contains(&0));
}

#[test]
fn special_tokens_in_text_are_matched() {
    let t = Tokenizer::demo(WORDS).unwrap();
    let ids = t.encode("cat</s>").unwrap();
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(ids.len(), 3);
}

#[test]
fn truncation_counts_bos() {
    let t = Tokenizer::demo(WORDS).unwrap();
    let full = t.encode("cat sun cat sun cat").unwrap();
    assert_eq!(full.len(), 6);
    for n in 1..8 {
        let tr = t.encode_truncated("cat sun cat sun cat", n).unwrap();
        assert_eq!(tr, full[..n.min(full.len()).max(1)].to_vec(), "n={n}");
    }
}

#[test]
fn add_missing_specials_adds_pad_only() {
    let mut t = Tokenizer::demo(WORDS).unwrap();
    let n = t.len();
    assert_eq!(t.add_missing_special_tokens(), 1);
    assert_eq!(t.len(), n + 1);
    assert_eq!(t.pad_token(), Some("[PAD]"));
    assert_eq!(t.pad_id(), Some(n as u32));
    assert_eq!(t.add_missing_special_tokens(), 0);
    // "[PAD]" in text is matched as one token.
    let ids = t.encode("cat[PAD]").unwrap();
    assert_eq!(ids.last(), Some(&(n as u32)));
}

#[test]
fn save_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tokenizer::demo(WORDS).unwrap();
    t.set_model_max_length(Some(128));
    t.add_missing_special_tokens();
    t.save(dir.path()).unwrap();
    let u = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(u.len(), t.len());
    assert_eq!(u.pad_id(), t.pad_id());
    assert_eq!(u.bos_id(), Some(1));
    assert_eq!(u.eos_id(), Some(2));
    assert_eq!(u.unk_id(), Some(0));
    assert_eq!(u.model_max_length(), Some(128));
    for text in ["cat sun", "中文 🦙", "### Response:cat</s>"] {
        assert_eq!(u.encode(text).unwrap(), t.encode(text).unwrap());
    }
    let cfg: Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["pad_token"], "[PAD]");
    assert_eq!(
        cfg["added_tokens_decoder"][t.pad_id().unwrap().to_string()]["special"],
        true
    );
    let map: Value = serde_json::from_str(
        &fs::read_to_string(dir.path().join("special_tokens_map.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(map["eos_token"]["content"], "</s>");
    // No temporary files left behind.
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn the_sentencepiece_model_beside_the_tokenizer_is_saved_with_it() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    Tokenizer::demo(WORDS).unwrap().save(src.path()).unwrap();
    let sp = b"\x0a\x0bnot parsed, only copied";
    fs::write(src.path().join(VOCAB_FILE), sp).unwrap();
    let t = Tokenizer::from_dir(src.path()).unwrap();
    t.save(dst.path()).unwrap();
    assert_eq!(fs::read(dst.path().join(VOCAB_FILE)).unwrap(), sp);
    // Read at load: the save still writes it once the source is gone.
    let moved = tempfile::tempdir().unwrap();
    fs::rename(src.path().join(VOCAB_FILE), moved.path().join(VOCAB_FILE)).unwrap();
    let later = tempfile::tempdir().unwrap();
    t.save(later.path()).unwrap();
    assert_eq!(fs::read(later.path().join(VOCAB_FILE)).unwrap(), sp);
    fs::rename(moved.path().join(VOCAB_FILE), src.path().join(VOCAB_FILE)).unwrap();
    // Saved again where it was loaded from, it stays as it is.
    t.save(src.path()).unwrap();
    assert_eq!(fs::read(src.path().join(VOCAB_FILE)).unwrap(), sp);
    // A tokenizer loaded without one writes none.
    fs::remove_file(dst.path().join(VOCAB_FILE)).unwrap();
    let bare = tempfile::tempdir().unwrap();
    Tokenizer::from_dir(dst.path())
        .unwrap()
        .save(bare.path())
        .unwrap();
    assert!(!bare.path().join(VOCAB_FILE).exists());
}

#[test]
fn special_values_as_dicts_and_llama_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tokenizer::demo(WORDS).unwrap();
    t.save(dir.path()).unwrap();
    // Legacy layout: no added_tokens_decoder, dict-valued special_tokens_map, Llama class.
    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "LlamaTokenizer", "model_max_length": 1000000000000000019884624838656}"#,
    )
    .unwrap();
    fs::write(
        dir.path().join("special_tokens_map.json"),
        r#"{"eos_token": {"content": "</s>", "lstrip": false}, "unk_token": "<unk>"}"#,
    )
    .unwrap();
    let u = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(u.eos_id(), Some(2));
    assert_eq!(u.bos_id(), Some(1)); // LlamaTokenizer default
    assert_eq!(u.pad_id(), None);
    assert_eq!(u.model_max_length(), None);
    assert_eq!(u.encode("cat").unwrap(), t.encode("cat").unwrap());
    // add_eos_token rebuilds the post-processor as LlamaTokenizerFast does.
    fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"tokenizer_class": "LlamaTokenizerFast", "add_eos_token": true, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": null, "added_tokens_decoder": {}}"#,
    )
    .unwrap();
    let u = Tokenizer::from_dir(dir.path()).unwrap();
    let ids = u.encode("cat").unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(u.encode_truncated("cat sun cat", 3).unwrap().len(), 3);
    assert_eq!(u.encode_truncated("cat sun cat", 3).unwrap()[2], 2);
}

#[test]
fn missing_file_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
