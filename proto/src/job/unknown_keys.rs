//! A job file with keys herd does not take, explained all at once: an HF user's
//! TrainingArguments often carry `report_to`, `tf32`, `optim`, `num_epochs` … and serde would
//! refuse only the first, with the list of all sixty keys. Each unknown top-level key gets its
//! line and what to do instead (the notes `from-command` gives for the same flags, the job key
//! another script's name stands for, or the nearest job key for a typo).

use serde_yaml::Value;

use super::from_command::{job_keys, ADAMW, ALIASES, NOT_NEEDED};

/// `None` when every top-level key is a job key (the refusal is about something else).
pub(super) fn explain(text: &str) -> Option<String> {
    let Ok(Value::Mapping(map)) = serde_yaml::from_str::<Value>(text) else {
        return None;
    };
    let known = job_keys();
    let lines: Vec<String> = map
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| !known.iter().any(|j| j == k))
        .map(|k| match line_of(text, k) {
            Some(n) => format!("  line {n}: `{k}`: {}", advice(k, &known)),
            None => format!("  `{k}`: {}", advice(k, &known)),
        })
        .collect();
    if lines.is_empty() {
        return None;
    }
    let n = lines.len();
    Some(format!(
        "{n} key{} herd does not take (remove or rename {}; the job keys are listed in the \
         README, and `herd from-command -- torchrun … train.py …` converts a command):\n{}",
        if n == 1 { "" } else { "s" },
        if n == 1 { "it" } else { "them" },
        lines.join("\n")
    ))
}

fn advice(key: &str, known: &[String]) -> String {
    if let Some((_, why)) = NOT_NEEDED.iter().find(|(k, _)| *k == key) {
        return format!("not needed, {why}");
    }
    if let Some((_, to)) = ALIASES.iter().find(|(k, _)| *k == key) {
        return format!("herd calls it `{to}`");
    }
    match key {
        "optim" => {
            return format!(
                "herd always trains with a fused AdamW (what {} mean); remove it",
                ADAMW.join(", ")
            )
        }
        "fsdp" => {
            return "herd shards with `zero_stage: 1` or `2` (or a `deepspeed` config)".into()
        }
        "model_type" => return "the model's config.json gives it".into(),
        _ => {}
    }
    match nearest(key, known) {
        Some(k) => format!("unknown field, did you mean `{k}`?"),
        None => "unknown field".into(),
    }
}

/// The 1-based line where `key` starts a top-level entry (`key:` at column 0, maybe quoted).
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
                .iter()
                .any(|k| {
                    l.strip_prefix(k.as_str())
                        .is_some_and(|r| r.trim_start().starts_with(':'))
                })
        })
        .map(|i| i + 1)
}

/// The job key closest to a typo: within a third of its length in edits (at least 1, at most 3).
fn nearest<'a>(key: &str, known: &'a [String]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).clamp(1, 3);
    known
        .iter()
        .map(|k| (edits(key, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

/// Levenshtein distance over chars.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance() {
        assert_eq!(edits("learning_rat", "learning_rate"), 1);
        assert_eq!(edits("", "abc"), 3);
        assert_eq!(edits("kitten", "sitting"), 3);
        assert_eq!(edits("same", "same"), 0);
    }

    #[test]
    fn every_unknown_key_is_told_with_its_line_and_what_to_do() {
        let text = "model_name_or_path: m\nreport_to: none\nnum_epochs: 3\n\
                    learning_rat: 1e-5\noptim: adamw_torch\nzzz_nothing_like_it: 1\n";
        let e = explain(text).unwrap();
        assert!(e.starts_with("5 keys herd does not take"), "{e}");
        for says in [
            "line 2: `report_to`: not needed, herd reports through `herd status`",
            "line 3: `num_epochs`: herd calls it `num_train_epochs`",
            "line 4: `learning_rat`: unknown field, did you mean `learning_rate`?",
            "line 5: `optim`: herd always trains with a fused AdamW",
            "line 6: `zzz_nothing_like_it`: unknown field\n",
        ] {
            assert!(format!("{e}\n").contains(says), "{says}\n{e}");
        }
    }

    #[test]
    fn known_keys_or_no_mapping_leave_the_refusal_to_serde() {
        assert_eq!(explain("model_name_or_path: m\nlearning_rate: x\n"), None);
        assert_eq!(explain("- a\n- b\n"), None);
        assert_eq!(explain("a: [\n"), None);
    }
}
