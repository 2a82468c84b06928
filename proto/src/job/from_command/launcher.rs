//! The launcher in front of the training script (torchrun, `python -m torch.distributed.run` or
//! `.launch`, deepspeed, accelerate launch, plain python): its options, read as it reads them
//! (which take a value and which do not, so the script is found where the launcher finds it),
//! give the job's `world_size` and, for accelerate, the keys its config sets. An option herd
//! does not know is refused by name: whether it takes a value decides where the script starts.

use serde_yaml::Value;

use super::options::*;
use super::{accelerate, hostfile, Files};

/// The launcher's part of the command.
pub(super) struct Launch<'a> {
    pub world: usize,
    /// The training script (or module) as the command names it.
    pub script: &'a str,
    pub args: &'a [String],
    /// Job keys the launcher's settings give (accelerate's mixed precision, ZeRO stage …).
    pub keys: Vec<(&'static str, Value)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Launcher {
    Torchrun,
    DeepSpeed,
    Accelerate,
    Python,
}

impl Launcher {
    fn name(self) -> &'static str {
        match self {
            Launcher::Torchrun => "torchrun",
            Launcher::DeepSpeed => "deepspeed",
            Launcher::Accelerate => "accelerate launch",
            Launcher::Python => "python",
        }
    }

    /// (options without a value, options with one, short names) as the launcher's argparse
    /// has them, in underscore spelling.
    fn options(self) -> (&'static [&'static str], &'static [&'static str], Short) {
        match self {
            Launcher::Torchrun => (TORCHRUN_FLAGS, TORCHRUN_VALUES, TORCHRUN_SHORT),
            Launcher::DeepSpeed => (DEEPSPEED_FLAGS, DEEPSPEED_VALUES, DEEPSPEED_SHORT),
            Launcher::Accelerate => (ACCELERATE_FLAGS, ACCELERATE_VALUES, ACCELERATE_SHORT),
            Launcher::Python => (PYTHON_FLAGS, PYTHON_VALUES, &[]),
        }
    }
}

/// Why herd needs no counterpart for a launcher option, by what the option is about.
pub(super) const RDZV: &str =
    "the launcher's, not needed: herd's coordinator assigns ranks and rendezvous";
pub(super) const PROCESS: &str =
    "the launcher's, not needed: each rank is a herd worker, which starts no script";
pub(super) const LOGS: &str =
    "the launcher's, not needed: each herd process logs as `herd --log FILTER` says, and \
     `herd status` follows the job";
pub(super) const DEVICE: &str =
    "the launcher's, not needed: each herd worker trains on its own device (`herd worker \
     --device cpu|cuda:N`)";

/// What to do when herd cannot count the ranks.
pub(super) const COUNT_HINT: &str =
    "give the count on the command line instead (deepspeed --num_gpus N [--num_nodes K], \
     accelerate launch --num_processes N), or write the job's `world_size: N` yourself \
     (`herd submit --world-size N` and `herd run --workers N` also set it)";

/// Launcher options before the script: name (long, underscores) and value.
pub(super) type Opts = Vec<(String, Option<String>)>;

pub(super) fn read<'a>(
    words: &'a [String],
    env: &[(String, String)],
    files: &dyn Files,
    notes: &mut Vec<String>,
    errors: &mut Vec<String>,
) -> Result<Launch<'a>, String> {
    let Some(first) = words.first() else {
        return Err("no command given: pass the launch command after `--`".into());
    };
    let name = first.rsplit('/').next().unwrap_or(first);
    let (kind, rest) = if name == "torchrun" {
        (Launcher::Torchrun, &words[1..])
    } else if name == "deepspeed" {
        (Launcher::DeepSpeed, &words[1..])
    } else if name == "accelerate" && words.get(1).is_some_and(|w| w == "launch") {
        (Launcher::Accelerate, &words[2..])
    } else if name == "accelerate-launch" {
        (Launcher::Accelerate, &words[1..])
    } else if name.starts_with("python") {
        (Launcher::Python, &words[1..])
    } else if name.ends_with(".py") {
        (Launcher::Python, words)
    } else {
        return Err(format!(
            "{first}: expected torchrun, python, deepspeed or accelerate launch, then the training script"
        ));
    };
    let (opts, script) = options(kind, rest)?;
    let (kind, opts, script) = match (kind, python_module(&opts)) {
        // `python -m torch.distributed.run …`: the module is the launcher.
        (Launcher::Python, Some("torch.distributed.run" | "torch.distributed.launch")) => {
            let (o, s) = options(Launcher::Torchrun, script)?;
            (Launcher::Torchrun, o, s)
        }
        (Launcher::Python, Some("deepspeed.launcher.runner")) => {
            let (o, s) = options(Launcher::DeepSpeed, script)?;
            (Launcher::DeepSpeed, o, s)
        }
        (Launcher::Python, Some("accelerate.commands.launch")) => {
            let (o, s) = options(Launcher::Accelerate, script)?;
            (Launcher::Accelerate, o, s)
        }
        // `python -m package.train --flags`: the module is the script.
        (Launcher::Python, Some(_)) => (kind, opts, &rest[rest.len() - script.len() - 1..]),
        _ => (kind, opts, script),
    };
    let Some((script_name, script_args)) = script.split_first() else {
        return Err("the command names no training script".into());
    };
    let mut keys = Vec::new();
    let world = match kind {
        Launcher::Torchrun => torchrun(&opts, notes, errors),
        Launcher::DeepSpeed => match hostfile::world(&opts, env, files, notes) {
            Ok(n) => n,
            Err(e) => {
                errors.push(e);
                1
            }
        },
        Launcher::Accelerate => accelerate::read(&opts, files, &mut keys, notes, errors),
        Launcher::Python => 1,
    };
    Ok(Launch {
        world,
        script: script_name,
        args: script_args,
        keys,
    })
}

/// The `-m` module of `python -m MODULE`, if the interpreter was told one.
fn python_module(opts: &Opts) -> Option<&str> {
    opts.iter()
        .find(|(k, _)| k == "m")
        .and_then(|(_, v)| v.as_deref())
}

/// The launcher's options up to the script (the first word that is not one, nor an option's
/// value): `--k v`, `--k=v`, `-k v`, or a flag alone, as its argparse reads them.
fn options(kind: Launcher, words: &[String]) -> Result<(Opts, &[String]), String> {
    let (flags, values, short) = kind.options();
    let mut opts = Vec::new();
    let mut i = 0;
    while i < words.len() && words[i].starts_with('-') && words[i] != "-" {
        let word = &words[i];
        // The interpreter's options are case-sensitive single letters; the launchers' long
        // options take `-` or `_` alike.
        let raw = match kind {
            Launcher::Python => word.trim_start_matches('-').to_string(),
            _ => word.trim_start_matches('-').replace('-', "_"),
        };
        let (name, inline) = match raw.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (raw, None),
        };
        let name = match short
            .iter()
            .find(|(s, _)| *s == name && !word.starts_with("--"))
        {
            Some((_, long)) => long.to_string(),
            None => name,
        };
        if word == "--" {
            i += 1;
            break;
        }
        if flags.contains(&name.as_str()) {
            opts.push((name, inline));
        } else if values.contains(&name.as_str()) {
            let v = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    words
                        .get(i)
                        .cloned()
                        .ok_or_else(|| format!("{word}: no value"))?
                }
            };
            opts.push((name.clone(), Some(v)));
            // `python -m module`: what follows is the module's.
            if kind == Launcher::Python && name == "m" {
                return Ok((opts, &words[i + 1..]));
            }
        } else {
            return Err(format!(
                "{word}: not a {} option herd knows, so it cannot tell whether the option takes \
                 a value, where the script starts, or what the option changes",
                kind.name()
            ));
        }
        i += 1;
    }
    Ok((opts, &words[i..]))
}

/// A positive count of processes or nodes.
pub(super) fn count(k: &str, v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("--{k} {v}: expected a number of processes (herd needs the count)"))
}

/// torchrun: nodes × processes per node.
fn torchrun(opts: &Opts, notes: &mut Vec<String>, errors: &mut Vec<String>) -> usize {
    let mut per_node = 1;
    let mut nodes = 1;
    for (k, v) in opts {
        let v = v.as_deref().unwrap_or("");
        let note = match k.as_str() {
            "nproc_per_node" => {
                match count(k, v) {
                    Ok(n) => per_node = n,
                    Err(e) => errors.push(e),
                }
                continue;
            }
            "nnodes" => {
                // An elastic range MIN:MAX: the job is sized for the most.
                let max = v.rsplit(':').next().unwrap_or(v);
                if max != v {
                    notes.push(format!(
                        "--nnodes {v}: world_size counts {max} nodes (herd's world size is \
                         fixed per job, not elastic)"
                    ));
                }
                match count(k, max) {
                    Ok(n) => nodes = n,
                    Err(e) => errors.push(e),
                }
                continue;
            }
            "max_restarts" => {
                notes.push(format!(
                    "--max_restarts {v}: herd's max_restarts is a job key; set it there"
                ));
                continue;
            }
            "standalone" | "rdzv_backend" | "rdzv_endpoint" | "rdzv_id" | "rdzv_conf"
            | "node_rank" | "master_addr" | "master_port" | "local_addr" => RDZV,
            "log_dir" | "redirects" | "tee" | "local_ranks_filter" | "logs_specs"
            | "event_log_handler" => LOGS,
            _ => PROCESS,
        };
        notes.push(format!("--{k}: {note}"));
    }
    per_node * nodes
}
