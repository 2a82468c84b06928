//! Tokenization with the prompt masked out, exactly as train.py's `preprocess`: the source and
//! source+target texts are tokenized separately (bos added by the tokenizer, each truncated to
//! `max_len` tokens), and labels = input_ids with the first len(source ids) positions set to -100.

use herd_model::Tokenizer;

use super::records::AlpacaRecord;
use super::template::{source_text, target_text};
use super::{DataError, Result};

/// The label value that the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Labels that count in the loss (!= -100), including position 0 (never the case in practice).
    pub fn target_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What encoding learned beyond the example itself (for statistics and previews).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeInfo {
    /// Token count of source+target before truncation.
    pub full_len: usize,
    /// Token count of the source before truncation.
    pub source_len: usize,
    /// How many leading labels were masked (train.py's `source_len`, capped at the example length).
    pub masked: usize,
}

impl EncodeInfo {
    pub fn truncated(&self, max_len: usize) -> bool {
        self.full_len > max_len
    }
}

/// HF `tokenizer(text, max_length=max_len, truncation=True)`, plus the untruncated length.
fn encode_capped(tok: &Tokenizer, text: &str, max_len: usize) -> Result<(Vec<u32>, usize)> {
    let ids = tok.encode(text)?;
    let n = ids.len();
    if n <= max_len {
        Ok((ids, n))
    } else {
        Ok((tok.encode_truncated(text, max_len)?, n))
    }
}

/// train.py's `preprocess` for one record.
pub fn encode_alpaca(tok: &Tokenizer, rec: &AlpacaRecord, max_len: usize) -> Result<Example> {
    Ok(encode_alpaca_with_info(tok, rec, max_len)?.0)
}

/// [`encode_alpaca`] plus the untruncated lengths.
pub fn encode_alpaca_with_info(
    tok: &Tokenizer,
    rec: &AlpacaRecord,
    max_len: usize,
) -> Result<(Example, EncodeInfo)> {
    if max_len == 0 {
        return Err(DataError::ZeroMaxLen);
    }
    let eos = tok.eos_token().ok_or(DataError::NoEosToken)?;
    let source = source_text(rec);
    let full = format!("{source}{}", target_text(rec, eos));
    let (source_ids, source_full_len) = encode_capped(tok, &source, max_len)?;
    let (input_ids, full_len) = encode_capped(tok, &full, max_len)?;
    // train.py: input_ids_lens = tokenized.input_ids.ne(pad_token_id).sum()
    let pad = tok.pad_id();
    let source_len = source_ids.iter().filter(|&&i| Some(i) != pad).count();
    let masked = source_len.min(input_ids.len());
    let mut labels: Vec<i64> = input_ids.iter().map(|&i| i as i64).collect();
    for l in &mut labels[..masked] {
        *l = IGNORE_INDEX;
    }
    Ok((
        Example { input_ids, labels },
        EncodeInfo {
            full_len,
            source_len: source_full_len,
            masked,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::template::PROMPT_NO_INPUT;

    fn demo_tok() -> Tokenizer {
        let mut words: Vec<&str> = PROMPT_NO_INPUT.split_whitespace().collect();
        words.extend(["cat", "sun", "Say", "hi."]);
        let mut t = Tokenizer::demo(&words).unwrap();
        t.add_missing_special_tokens();
        t
    }

    #[test]
    fn masking_rule_hand_checked() {
        let t = demo_tok();
        let rec = AlpacaRecord::new("Say hi.", None, "cat sun");
        let (ex, info) = encode_alpaca_with_info(&t, &rec, 512).unwrap();
        let src = t.encode(&source_text(&rec)).unwrap();
        // Source: <s> + prompt pieces; the full text continues with "cat", "▁sun", "</s>".
        let tail: Vec<String> = ex.input_ids[src.len()..]
            .iter()
            .map(|&i| t.id_to_token(i).unwrap())
            .collect();
        assert_eq!(tail, vec!["cat", "\u{2581}sun", "</s>"]);
        assert_eq!(ex.input_ids[..src.len()], src[..]);
        assert_eq!(ex.input_ids[0], 1);
        assert_eq!(info.masked, src.len());
        assert!(ex.labels[..src.len()].iter().all(|&l| l == IGNORE_INDEX));
        let kept: Vec<i64> = ex.input_ids[src.len()..]
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(ex.labels[src.len()..], kept[..]);
        assert_eq!(ex.target_tokens(), 3);
        assert_eq!(info.full_len, ex.len());
    }

    #[test]
    fn truncation_applies_to_both_texts() {
        let t = demo_tok();
        let rec = AlpacaRecord::new("Say hi.", None, "cat sun cat sun");
        let full = encode_alpaca(&t, &rec, 4096).unwrap();
        let src_len = full
            .labels
            .iter()
            .take_while(|&&l| l == IGNORE_INDEX)
            .count();
        // Cut inside the target: the prefix is kept, the masked part unchanged.
        let n = src_len + 2;
        let (ex, info) = encode_alpaca_with_info(&t, &rec, n).unwrap();
        assert_eq!(ex.input_ids, full.input_ids[..n].to_vec());
        assert_eq!(ex.labels, full.labels[..n].to_vec());
        assert!(info.truncated(n));
        // Cut inside the source: everything is masked.
        let (ex, info) = encode_alpaca_with_info(&t, &rec, src_len - 3).unwrap();
        assert_eq!(ex.len(), src_len - 3);
        assert!(ex.labels.iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(info.masked, src_len - 3);
    }

    #[test]
    fn chinese_record() {
        let t = demo_tok();
        let rec = AlpacaRecord::new("把这句话翻译成英文。", Some("我爱你"), "I love you 🦙");
        let ex = encode_alpaca(&t, &rec, 512).unwrap();
        let m = ex.labels.iter().take_while(|&&l| l == IGNORE_INDEX).count();
        assert_eq!(
            t.decode(&ex.input_ids[m..], false).unwrap(),
            "I love you 🦙</s>"
        );
        assert_eq!(
            t.decode(&ex.input_ids[..m], true).unwrap(),
            source_text(&rec)
        );
    }

    #[test]
    fn needs_eos() {
        let t = demo_tok();
        assert!(matches!(
            encode_alpaca(&t, &AlpacaRecord::new("a", None, "b"), 0),
            Err(DataError::ZeroMaxLen)
        ));
    }
}
