//! The demo tokenizer: LLaMA-like, built in code with no download and no training.

use super::*;

impl Tokenizer {
    /// A small LLaMA-like tokenizer built in code (no download, no training): a Unigram model
    /// with byte fallback and a hand-made vocabulary —
    /// `<unk>`=0, `<s>`=1, `</s>`=2, `<0x00>`..`<0xFF>`, `▁`, single characters (printable ASCII,
    /// `\n`, `\t` and every character of `words`), then for each word (in order, deduplicated)
    /// `▁word` and `word` with a higher score so that a known word stays one token. Words with
    /// digits or whitespace are skipped: digits are always single tokens, as in LLaMA.
    /// The pipeline is LLaMA-2's tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"),
    /// decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(1 leading space), post-processor
    /// `<s> $A`; so `decode(encode(x), true) == x` for any text without special tokens.
    /// There is no pad token (train.py's `[PAD]` path applies).
    pub fn demo(words: &[&str]) -> Result<Self> {
        const SPACE: char = '\u{2581}';
        let mut vocab: Vec<(String, f64)> = vec![
            ("<unk>".into(), 0.0),
            ("<s>".into(), 0.0),
            ("</s>".into(), 0.0),
        ];
        for b in 0..=255u8 {
            // Very low score: a literal "<0x41>" in the text is spelled with characters.
            vocab.push((format!("<0x{b:02X}>"), -1000.0));
        }
        let mut seen: std::collections::HashSet<String> =
            vocab.iter().map(|(t, _)| t.clone()).collect();
        let mut push = |vocab: &mut Vec<(String, f64)>, t: String, score: f64| {
            if seen.insert(t.clone()) {
                vocab.push((t, score));
            }
        };
        push(&mut vocab, SPACE.to_string(), -2.0);
        let mut chars: std::collections::BTreeSet<char> = (0x21u8..=0x7e).map(char::from).collect();
        chars.insert('\n');
        chars.insert('\t');
        for w in words {
            chars.extend(w.chars().filter(|c| !c.is_whitespace() && *c != SPACE));
        }
        for c in chars {
            push(&mut vocab, c.to_string(), -5.0);
        }
        for w in words {
            if w.is_empty()
                || w.chars()
                    .any(|c| c.is_ascii_digit() || c.is_whitespace() || c == SPACE)
            {
                continue;
            }
            push(&mut vocab, format!("{SPACE}{w}"), -1.0);
            if w.chars().count() > 1 {
                push(&mut vocab, w.to_string(), -1.5);
            }
        }
        let vocab_json: Vec<Value> = vocab.iter().map(|(t, s)| json!([t, s])).collect();
        let added = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPACE.to_string()},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE.to_string()}
            ]},
            "pre_tokenizer": null,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE.to_string()}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab_json, "byte_fallback": true}
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec)
            .map_err(|e| TokenizerError::Invalid(format!("building the demo tokenizer: {e}")))?;
        let mut config = Map::new();
        config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        config.insert("clean_up_tokenization_spaces".into(), json!(false));
        config.insert("add_bos_token".into(), json!(true));
        config.insert("add_eos_token".into(), json!(false));
        Ok(Tokenizer {
            inner,
            bos: Some("<s>".into()),
            eos: Some("</s>".into()),
            pad: None,
            unk: Some("<unk>".into()),
            model_max_length: None,
            config,
            vocab_file: None,
        })
    }
}
