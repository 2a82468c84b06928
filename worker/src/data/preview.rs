//! `herd data preview JOB.yaml`: show examples exactly as the model sees them — the decoded token
//! ids, special tokens included — with the masked part (the prompt, label -100) visibly marked,
//! followed by the length statistics.

use std::fmt::Write;

use herd_model::Tokenizer;

use super::encode::{encode_alpaca_with_info, Example, IGNORE_INDEX};
use super::mixture::{encode_record_with_info, Mixture, Record};
use super::records::Loaded;
use super::stats::{dataset_stats, dataset_stats_records};
use super::Result;

pub const MASK_OPEN: &str = "«";
pub const MASK_CLOSE: &str = "»";
const DIM: &str = "\x1b[2m";
const GREEN: &str = "\x1b[32m";
const RESET: &str = "\x1b[0m";

#[derive(Debug, Clone)]
pub struct PreviewOptions {
    /// How many examples (from the start of the data) to render.
    pub examples: usize,
    pub max_len: usize,
    /// ANSI colors (masked part dim, trained part green) instead of «» around the masked part.
    pub color: bool,
    /// Also list the tokens one by one (`id:token`).
    pub show_tokens: bool,
}

impl Default for PreviewOptions {
    fn default() -> Self {
        PreviewOptions {
            examples: 3,
            max_len: 512,
            color: false,
            show_tokens: false,
        }
    }
}

/// Runs of consecutive positions with the same masked-ness: (masked, start, end).
fn runs(labels: &[i64]) -> Vec<(bool, usize, usize)> {
    let mut out: Vec<(bool, usize, usize)> = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        let m = l == IGNORE_INDEX;
        match out.last_mut() {
            Some((lm, _, end)) if *lm == m => *end = i + 1,
            _ => out.push((m, i, i + 1)),
        }
    }
    out
}

/// Decode `ids[start..end]` in the context of `ids[..start]` so that spaces at the boundary
/// survive (decoders strip a leading space of a whole decode).
fn decode_span(tok: &Tokenizer, ids: &[u32], start: usize, end: usize) -> Result<String> {
    let before = tok.decode(&ids[..start], false)?;
    let upto = tok.decode(&ids[..end], false)?;
    Ok(match upto.strip_prefix(&before) {
        Some(rest) => rest.to_string(),
        None => tok.decode(&ids[start..end], false)?,
    })
}

/// The example's text as the model sees it; the masked (label -100) spans marked.
pub fn render_example(
    tok: &Tokenizer,
    ex: &Example,
    color: bool,
    show_tokens: bool,
) -> Result<String> {
    let mut s = String::new();
    for (masked, a, b) in runs(&ex.labels) {
        let text = decode_span(tok, &ex.input_ids, a, b)?;
        match (masked, color) {
            (true, false) => write!(s, "{MASK_OPEN}{text}{MASK_CLOSE}").unwrap(),
            (true, true) => write!(s, "{DIM}{text}{RESET}").unwrap(),
            (false, false) => s.push_str(&text),
            (false, true) => write!(s, "{GREEN}{text}{RESET}").unwrap(),
        }
    }
    if show_tokens {
        s.push_str("\ntokens:");
        let mut prev_masked = false;
        for (i, &id) in ex.input_ids.iter().enumerate() {
            let masked = ex.labels.get(i) == Some(&IGNORE_INDEX);
            let t = tok.id_to_token(id).unwrap_or_else(|| "?".into());
            let t = t.escape_debug();
            s.push(' ');
            if masked && !prev_masked && !color {
                s.push_str(MASK_OPEN);
            }
            if color {
                let c = if masked { DIM } else { GREEN };
                write!(s, "{c}{id}:{t}{RESET}").unwrap();
            } else {
                write!(s, "{id}:{t}").unwrap();
            }
            let next_masked = ex.labels.get(i + 1) == Some(&IGNORE_INDEX);
            if masked && !next_masked && !color {
                s.push_str(MASK_CLOSE);
            }
            prev_masked = masked;
        }
    }
    Ok(s)
}

/// The preview text: the first `opts.examples` examples rendered, then the statistics of all.
pub fn preview(tok: &Tokenizer, loaded: &Loaded, opts: &PreviewOptions) -> Result<String> {
    let mut s = String::new();
    let n = loaded.records.len();
    writeln!(
        s,
        "{n} records loaded{}; max_len {}; {} marks the prompt (label -100, not trained)",
        if loaded.skipped > 0 {
            format!(", {} skipped", loaded.skipped)
        } else {
            String::new()
        },
        opts.max_len,
        if opts.color { "dim text" } else { "«…»" }
    )
    .unwrap();
    for r in &loaded.skip_reasons {
        writeln!(s, "  skipped: {r}").unwrap();
    }
    for (i, rec) in loaded.records.iter().take(opts.examples).enumerate() {
        let (ex, info) = encode_alpaca_with_info(tok, rec, opts.max_len)?;
        let trained = ex
            .labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        writeln!(
            s,
            "\n── example {} of {n}: {} tokens, {} masked, {} trained{} ──",
            i + 1,
            ex.len(),
            info.masked,
            trained,
            if info.truncated(opts.max_len) {
                format!(", truncated from {}", info.full_len)
            } else {
                String::new()
            }
        )
        .unwrap();
        writeln!(
            s,
            "{}",
            render_example(tok, &ex, opts.color, opts.show_tokens)?
        )
        .unwrap();
    }
    let st = dataset_stats(tok, &loaded.records, opts.max_len)?;
    writeln!(s, "\n── statistics ──\n{st}").unwrap();
    Ok(s)
}

/// The preview of a `data_path` mixture: one line per file (format, weight, records, skipped,
/// examples taken), the first `opts.examples` examples of each file, then the statistics of the
/// whole training set.
pub fn preview_mixture(tok: &Tokenizer, mix: &Mixture, opts: &PreviewOptions) -> Result<String> {
    let mut s = String::new();
    writeln!(
        s,
        "{} examples from {} file(s); max_len {}; {} marks what is not trained (label -100)",
        mix.records.len(),
        mix.files.len(),
        opts.max_len,
        if opts.color { "dim text" } else { "«…»" }
    )
    .unwrap();
    for f in &mix.files {
        writeln!(
            s,
            "  {}: {}, weight {}, {} records{}, {} examples",
            f.path.display(),
            f.format.as_str(),
            f.weight,
            f.records,
            if f.skipped > 0 {
                format!(" ({} skipped)", f.skipped)
            } else {
                String::new()
            },
            f.taken
        )
        .unwrap();
    }
    for r in &mix.skip_reasons {
        writeln!(s, "  skipped: {r}").unwrap();
    }
    for (fi, f) in mix.files.iter().enumerate() {
        let range = mix.file_range(fi);
        for (k, rec) in mix.records[range.clone()]
            .iter()
            .take(opts.examples)
            .enumerate()
        {
            let (ex, info) = encode_record_with_info(tok, rec, opts.max_len)?;
            let trained = ex
                .labels
                .iter()
                .skip(1)
                .filter(|&&l| l != IGNORE_INDEX)
                .count();
            let kind = match rec {
                Record::Alpaca(_) => "alpaca",
                Record::Chat(_) => "conversation",
            };
            writeln!(
                s,
                "\n── {} example {} of {} ({kind}): {} tokens, {} masked, {} trained{} ──",
                f.path.display(),
                k + 1,
                range.len(),
                ex.len(),
                info.masked,
                trained,
                if info.truncated(opts.max_len) {
                    format!(", truncated from {}", info.full_len)
                } else {
                    String::new()
                }
            )
            .unwrap();
            writeln!(
                s,
                "{}",
                render_example(tok, &ex, opts.color, opts.show_tokens)?
            )
            .unwrap();
        }
    }
    let st = dataset_stats_records(tok, &mix.records, opts.max_len)?;
    writeln!(s, "\n── statistics ──\n{st}").unwrap();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{encode_alpaca, AlpacaRecord, PROMPT_INPUT};

    fn tok() -> Tokenizer {
        let mut words: Vec<&str> = PROMPT_INPUT.split_whitespace().collect();
        words.extend(["cat", "sun", "tree"]);
        let mut t = Tokenizer::demo(&words).unwrap();
        t.add_missing_special_tokens();
        t
    }

    #[test]
    fn marks_the_prompt() {
        let t = tok();
        let rec = AlpacaRecord::new("Reverse the words.", Some("cat sun"), "sun cat");
        let ex = encode_alpaca(&t, &rec, 512).unwrap();
        let s = render_example(&t, &ex, false, false).unwrap();
        assert!(s.starts_with("«<s> Below is an instruction"), "{s}");
        assert!(s.ends_with("### Response:»sun cat</s>"), "{s}");
        let c = render_example(&t, &ex, true, true).unwrap();
        assert!(c.contains("\x1b[2m<s> Below"), "{c}");
        assert!(c.contains("tokens: \x1b[2m1:<s>"), "{c}");
        let p = render_example(&t, &ex, false, true).unwrap();
        assert!(p.contains("tokens: «1:<s> "), "{p}");
        assert!(p.contains("» "), "{p}");
    }

    #[test]
    fn mixture_preview_counts_files() {
        use crate::data::mixture::MixtureFile;
        use crate::data::Conversation;
        use herd_proto::DataFormat;
        let mut words: Vec<&str> = PROMPT_INPUT.split_whitespace().collect();
        words.extend(["USER:", "ASSISTANT:", "cat", "sun"]);
        let mut t = Tokenizer::demo(&words).unwrap();
        t.add_missing_special_tokens();
        let mix = Mixture {
            records: vec![
                Record::Alpaca(AlpacaRecord::new("Say the word.", None, "cat")),
                Record::Chat(Conversation::from_pairs(&[("cat", "sun"), ("sun", "cat")])),
            ],
            files: vec![
                MixtureFile {
                    path: "a.json".into(),
                    format: DataFormat::Alpaca,
                    weight: 1.0,
                    records: 1,
                    skipped: 0,
                    taken: 1,
                },
                MixtureFile {
                    path: "c.jsonl".into(),
                    format: DataFormat::Sharegpt,
                    weight: 0.5,
                    records: 2,
                    skipped: 1,
                    taken: 1,
                },
            ],
            skipped: 1,
            skip_reasons: vec![],
        };
        let s = preview_mixture(&t, &mix, &PreviewOptions::default()).unwrap();
        assert!(s.contains("2 examples from 2 file(s)"), "{s}");
        assert!(
            s.contains("c.jsonl: sharegpt, weight 0.5, 2 records (1 skipped), 1 examples"),
            "{s}"
        );
        assert!(s.contains("(conversation)"), "{s}");
        assert!(s.contains("ASSISTANT:» sun</s>«"), "{s}");
        assert!(s.contains("examples:        2"), "{s}");
    }

    #[test]
    fn preview_has_examples_and_stats() {
        let t = tok();
        let loaded = Loaded {
            records: vec![
                AlpacaRecord::new("Say the word.", None, "cat"),
                AlpacaRecord::new("把这句话翻译成英文。", Some("太阳"), "sun 🌞"),
            ],
            skipped: 1,
            skip_reasons: vec!["x.json: record 3: bad".into()],
        };
        let s = preview(
            &t,
            &loaded,
            &PreviewOptions {
                examples: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(s.contains("2 records loaded, 1 skipped"), "{s}");
        assert!(s.contains("── example 2 of 2"), "{s}");
        assert!(s.contains("太阳"), "{s}");
        assert!(s.contains("»sun 🌞</s>"), "{s}");
        assert!(s.contains("examples:        2"), "{s}");
    }
}
