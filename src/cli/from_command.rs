//! `herd from-command -- torchrun ... train.py --flags`: the job file of the command a user runs
//! today, on stdout, with what was left out as comments (and on stderr). The conversion itself
//! is `herd_proto::job::from_command::convert_with` (pure); this reads the files the command
//! names that change its number of ranks (a DeepSpeed hostfile, an accelerate config).

use anyhow::{bail, Result};
use herd_proto::job::from_command::{convert_with, redacted, Files};
use std::path::PathBuf;

/// The files of this machine, read where the command would be run from.
struct Here;

impl Files for Here {
    fn read(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }

    /// accelerate's `default_config_file`: $HF_HOME/accelerate, else
    /// $XDG_CACHE_HOME/huggingface/accelerate, else ~/.cache/huggingface/accelerate;
    /// default_config.yaml, or default_config.json when only that exists.
    fn accelerate_default_config(&self) -> Option<String> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = var("HF_HOME").or_else(|| {
            var("XDG_CACHE_HOME")
                .or_else(|| var("HOME").map(|h| h.join(".cache")))
                .map(|c| c.join("huggingface"))
        })?;
        let dir = home.join("accelerate");
        let (yaml, json) = (
            dir.join("default_config.yaml"),
            dir.join("default_config.json"),
        );
        let file = match !yaml.is_file() && json.is_file() {
            true => json,
            false => yaml,
        };
        Some(file.display().to_string())
    }
}

pub fn run(command: &[String]) -> Result<()> {
    let c = match convert_with(command, &Here) {
        Ok(c) => c,
        Err(e) => bail!("{e}"),
    };
    // A token on the command line is not copied into the job file.
    let mut out = format!(
        "# herd from-command -- {}\n",
        shell_words(&redacted(command))
    );
    // The notes are comments in the job file; on stderr too when the file goes elsewhere
    // (on a terminal they would show twice).
    let to_terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    for n in &c.notes {
        out.push_str(&format!("# note: {n}\n"));
        if !to_terminal {
            eprintln!("herd: note: {n}");
        }
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
