//! `herd from-command -- torchrun ... train.py --flags`: the job file of the command a user runs
//! today, on stdout, with what was left out as comments (and on stderr). The conversion itself
//! is `herd_proto::job::from_command::convert` (pure).

use anyhow::{bail, Result};

pub fn run(command: &[String]) -> Result<()> {
    let c = match herd_proto::job::from_command::convert(command) {
        Ok(c) => c,
        Err(e) => bail!("{e}"),
    };
    let mut out = format!("# herd from-command -- {}\n", shell_words(command));
    for n in &c.notes {
        out.push_str(&format!("# note: {n}\n"));
        eprintln!("herd: note: {n}");
    }
    out.push_str(&c.yaml);
    print!("{out}");
    Ok(())
}

/// The command as it could be typed again (words with spaces or quotes single-quoted).
fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if w.is_empty()
                || w.chars()
                    .any(|c| c.is_whitespace() || "'\"$`\\".contains(c))
            {
                format!("'{}'", w.replace('\'', r"'\''"))
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
