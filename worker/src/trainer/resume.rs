//! What a resumed run checks against the checkpoint it loads: the same kind of job (refused
//! otherwise), and which job keys changed since (told, not refused: HF Trainer also lets a
//! resumed run change its arguments, and warns only about some).

use crate::error::Result;
use herd_proto::{JobSpec, Task};
use serde_yaml::{Mapping, Value};
use std::path::Path;

/// The job the checkpoint was written by (`training_args.yaml`; older checkpoints have none).
fn saved_args(dir: &Path) -> Option<Mapping> {
    let text = std::fs::read_to_string(dir.join("training_args.yaml")).ok()?;
    serde_yaml::from_str::<Mapping>(&text).ok()
}

/// A checkpoint resumes only the kind of job that wrote it: a reward model's or a LoRA run's
/// state cannot continue a full causal-LM fine-tune (nor the reverse), which would otherwise
/// fail on a missing tensor. Read from the checkpoint's training_args.yaml (older checkpoints
/// without one are not checked).
pub fn same_recipe(job: &JobSpec, dir: &Path) -> Result<()> {
    let Some(saved) = saved_args(dir) else {
        return Ok(());
    };
    let task = |t: Task| serde_yaml::to_value(t).unwrap_or_default();
    let saved_task = saved.get("task").cloned().unwrap_or(task(Task::CausalLm));
    let saved_r = saved.get("lora_r").and_then(serde_yaml::Value::as_u64);
    let mismatch = if saved_task != task(job.task) {
        Some(format!(
            "task {} (this job: {})",
            saved_task.as_str().unwrap_or("?"),
            task(job.task).as_str().unwrap_or("?")
        ))
    } else if saved_r != job.lora_r.map(|r| r as u64) {
        let r = |r: Option<u64>| r.map_or("none (full fine-tune)".to_string(), |r| r.to_string());
        Some(format!(
            "lora_r {} (this job: {})",
            r(saved_r),
            r(job.lora_r.map(|r| r as u64))
        ))
    } else {
        None
    };
    match mismatch {
        None => Ok(()),
        Some(what) => Err(herd_proto::JobError::Invalid {
            file: job.source.0.clone(),
            key: "output_dir",
            reason: format!(
                "{} was written by a job with {what}; a job resumes only its own kind of \
                 checkpoint: give this job another output_dir",
                dir.display()
            ),
        }
        .into()),
    }
}

/// A checkpoint written with `save_only_model` has no optimizer state to continue from; HF
/// Trainer refuses to resume it, and so does herd, naming it (a restart would meet it again).
pub fn has_optimizer_state(job: &JobSpec, dir: &Path) -> Result<()> {
    if dir.join(super::state::OPTIMIZER_FILE).is_file() {
        return Ok(());
    }
    Err(herd_proto::JobError::Invalid {
        file: job.source.0.clone(),
        key: "output_dir",
        reason: format!(
            "{} has no optimizer state (saved with save_only_model), so it cannot be resumed: \
             give this job another output_dir, or remove its checkpoint-* folders to train \
             again from the start",
            dir.display()
        ),
    }
    .into())
}

/// Keys not compared: `output_dir` is where the checkpoint was found; the batch split
/// (`world_size`, the per-device batch, the accumulation) is compared as the global batch it
/// makes, which is what the updates depend on (`herd run --workers 2` resumes `herd train`'s
/// run with the same global batch); `max_restarts` does not change training.
const NOT_COMPARED: &[&str] = &[
    "output_dir",
    "world_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_restarts",
];

/// Path keys, compared as files (see [`same_file`]); `data_path` may be a list of files or of
/// `{path, weight, format}` entries, compared entry by entry.
const PATHS: &[&str] = &[
    "model_name_or_path",
    "data_path",
    "eval_data_path",
    "tokenizer_name",
];

/// The job keys whose values differ from the checkpoint's job, as `key old → new` (sorted by
/// key): a resumed run with another learning rate, global batch or step count trains something
/// else than either job alone, and the user should hear it. The saved job is read as a job
/// (defaults filled in, so a key added to herd since is not a change).
pub fn changed_since(job: &JobSpec, dir: &Path) -> Vec<String> {
    let path = dir.join("training_args.yaml");
    let Some(saved) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| JobSpec::from_yaml_str(&t, &path.display().to_string()).ok())
    else {
        return vec![];
    };
    let (Ok(Value::Mapping(then)), Ok(Value::Mapping(now))) =
        (serde_yaml::to_value(&saved), serde_yaml::to_value(job))
    else {
        return vec![];
    };
    let mut keys: Vec<&str> = then
        .keys()
        .chain(now.keys())
        .filter_map(Value::as_str)
        .filter(|k| !NOT_COMPARED.contains(k))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut changed: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (then.get(k), now.get(k));
            let same = match (PATHS.contains(&k), a, b) {
                (true, Some(a), Some(b)) => same_paths(a, b),
                _ => same_value(a, b),
            };
            (!same).then(|| format!("{k} {} → {}", show(a), show(b)))
        })
        .collect();
    let (a, b) = (saved.global_batch_size(), job.global_batch_size());
    if a != b {
        changed.push(format!(
            "global batch {a} → {b} (per_device_train_batch_size × gradient_accumulation_steps \
             × world_size)"
        ));
    }
    changed
}

/// Path values (a string, or lists and maps holding them) naming the same files.
fn same_paths(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => same_file(x, y),
        (Value::Sequence(xs), Value::Sequence(ys)) => {
            xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| same_paths(x, y))
        }
        (Value::Mapping(xm), Value::Mapping(ym)) => {
            xm.len() == ym.len()
                && xm
                    .iter()
                    .all(|(k, x)| ym.get(k).is_some_and(|y| same_paths(x, y)))
        }
        (x, y) => same_value(Some(x), Some(y)),
    }
}

/// Whether two spellings name one file. The checkpoint does not record the directory a
/// relative path was read from, and a coordinator hands its workers absolute paths, so a
/// relative path is the same as another spelling that ends with it, leading `..` aside
/// (`small.json`, `../small.json` and `/data/small.json`): a false "changed" would cry wolf
/// on every resume under a coordinator of a run begun with `herd train`, or begun from
/// another directory. Two absolute paths are compared as they are.
fn same_file(x: &str, y: &str) -> bool {
    // `./a/b` is `a/b`: components without the `.`s.
    let plain = |s: &str| -> std::path::PathBuf {
        Path::new(s)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    let (p, q) = (plain(x), plain(y));
    if p == q || matches!((p.canonicalize(), q.canonicalize()), (Ok(a), Ok(b)) if a == b) {
        return true;
    }
    if p.is_absolute() && q.is_absolute() {
        return false;
    }
    // The path below any root and leading `..`s.
    let below = |p: &Path| -> std::path::PathBuf {
        p.components()
            .skip_while(|c| !matches!(c, std::path::Component::Normal(_)))
            .collect()
    };
    let (a, b) = (below(&p), below(&q));
    !a.as_os_str().is_empty() && !b.as_os_str().is_empty() && (a.ends_with(&b) || b.ends_with(&a))
}

/// The warning a resumed run prints when its job changed since the checkpoint.
pub fn changed_line(changed: &[String]) -> String {
    format!(
        "warning: the job changed since the checkpoint it resumes ({}); the run continues with \
         the new values (use another output_dir to start afresh)",
        changed.join(", ")
    )
}

fn same_value(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
        (x, y) => x.unwrap_or(&Value::Null) == y.unwrap_or(&Value::Null),
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "(unset)".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => serde_json::to_string(v).unwrap_or_else(|_| "?".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &str) -> JobSpec {
        JobSpec::from_yaml_str(
            &format!("model_name_or_path: m\ndata_path: d\noutput_dir: o\n{extra}"),
            "j",
        )
        .unwrap()
    }

    #[test]
    fn changed_keys_are_listed_old_to_new_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let saved = job("learning_rate: 1.0e-3\nmax_steps: 200\n");
        std::fs::write(dir.path().join("training_args.yaml"), saved.to_yaml()).unwrap();
        assert!(changed_since(&saved, dir.path()).is_empty());
        let mut now = job("learning_rate: 0.01\nmax_steps: 220\nper_device_train_batch_size: 4\n");
        now.output_dir = "elsewhere".into();
        now.max_restarts = 9;
        assert_eq!(
            changed_since(&now, dir.path()),
            vec![
                "learning_rate 0.001 → 0.01",
                "max_steps 200 → 220",
                "global batch 8 → 4 (per_device_train_batch_size × gradient_accumulation_steps \
                 × world_size)",
            ]
        );
        // No training_args.yaml (an older checkpoint): nothing to compare.
        assert!(changed_since(&now, tempfile::tempdir().unwrap().path()).is_empty());
    }

    #[test]
    fn the_same_global_batch_split_another_way_is_no_change() {
        // herd train (1 rank, accumulation 2) resumed by herd run --workers 2.
        let dir = tempfile::tempdir().unwrap();
        let saved = job("gradient_accumulation_steps: 2\n");
        std::fs::write(dir.path().join("training_args.yaml"), saved.to_yaml()).unwrap();
        let now = job("world_size: 2\n");
        assert!(changed_since(&now, dir.path()).is_empty());
    }

    #[test]
    fn paths_are_compared_as_the_files_they_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("m")).unwrap();
        let saved = job(""); // model_name_or_path: m (relative)
        std::fs::write(dir.path().join("training_args.yaml"), saved.to_yaml()).unwrap();
        let mut now = job("");
        now.model_name_or_path = dir.path().join("m");
        assert!(changed_since(&now, dir.path()).is_empty());
        // Both absolute: the same directory spelled another way is no change, another is.
        let mut saved = job("");
        saved.model_name_or_path = dir.path().join("m");
        std::fs::write(dir.path().join("training_args.yaml"), saved.to_yaml()).unwrap();
        now.model_name_or_path = dir.path().join("m/../m");
        assert!(changed_since(&now, dir.path()).is_empty());
        now.model_name_or_path = dir.path().join("other");
        assert_eq!(changed_since(&now, dir.path()).len(), 1);
        // Relative spellings: another file is a change, and so is another file in a mixture;
        // an absolute path ending with the relative one is not.
        let saved = job("");
        std::fs::write(dir.path().join("training_args.yaml"), saved.to_yaml()).unwrap();
        let mut now = job("");
        for same in ["./m", "../m", "../../runs/m"] {
            now.model_name_or_path = same.into();
            assert!(changed_since(&now, dir.path()).is_empty(), "{same}");
        }
        let other = "model_name_or_path: m\ndata_path: d2\noutput_dir: o\n";
        let now = JobSpec::from_yaml_str(other, "j").unwrap();
        assert_eq!(changed_since(&now, dir.path()), ["data_path d → d2"]);
        let mixture = |a: &str, w: u32| {
            let text = format!(
                "model_name_or_path: m\noutput_dir: o\ndata_path:\n  - path: {a}\n    \
                 weight: {w}\n  - b.json\n"
            );
            JobSpec::from_yaml_str(&text, "j").unwrap()
        };
        std::fs::write(
            dir.path().join("training_args.yaml"),
            mixture("a.json", 2).to_yaml(),
        )
        .unwrap();
        assert!(changed_since(&mixture("/data/a.json", 2), dir.path()).is_empty());
        assert_eq!(changed_since(&mixture("c.json", 2), dir.path()).len(), 1);
        assert_eq!(changed_since(&mixture("a.json", 3), dir.path()).len(), 1);
    }

    #[test]
    fn a_key_herd_added_since_is_its_default_not_a_change() {
        let dir = tempfile::tempdir().unwrap();
        // An older herd wrote only these keys.
        std::fs::write(
            dir.path().join("training_args.yaml"),
            "model_name_or_path: m\ndata_path: d\noutput_dir: o\n",
        )
        .unwrap();
        assert!(changed_since(&job(""), dir.path()).is_empty());
    }
}
