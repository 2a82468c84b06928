//! Submit-time checks. A job that fails any of them is refused with INVALID_ARGUMENT naming the
//! problem, and nothing is stored. They run outside the state lock (loading a data file can take
//! a moment).

use std::path::Path;

use herd_proto::JobSpec;

/// A job that passed every check: its spec with absolute paths, and that spec as YAML (what the
/// assignments carry).
#[derive(Debug, Clone)]
pub struct ValidatedJob {
    pub spec: JobSpec,
    pub yaml: String,
    pub source_name: String,
    pub records: usize,
    /// What the job's DeepSpeed config asks that herd does otherwise (stage 3 runs as 2,
    /// offload, ignored knobs): kept as the job's events, not only told at submit.
    pub warnings: Vec<String>,
}

/// Why a job was refused (the message the client sees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::invalid_argument(r.0)
    }
}

/// Parse, validate, resolve paths against `base_dir`, and check the files the job names.
pub fn validate_submission(
    job_yaml: &str,
    source_name: &str,
    base_dir: &str,
) -> Result<ValidatedJob, Refusal> {
    let source = if source_name.trim().is_empty() {
        "<submitted job>"
    } else {
        source_name
    };
    let mut spec = JobSpec::from_yaml_str(job_yaml, source).map_err(|e| Refusal(e.to_string()))?;
    if !base_dir.is_empty() {
        spec.resolve_paths(Path::new(base_dir));
    }
    // `herd submit` sends the config inline; a file (a client of our own) is found where a
    // relative data_path is, and stored inline so the workers need not read it.
    let ds_base = Path::new(if base_dir.is_empty() { "." } else { base_dir });
    let warnings = spec
        .load_deepspeed(ds_base, source)
        .map_err(|e| Refusal(e.to_string()))?;
    for w in &warnings {
        tracing::warn!(source, "deepspeed: {w}");
    }
    let bad = |key: &str, msg: String| Err(Refusal(format!("{source}: `{key}`: {msg}")));
    let mut paths: Vec<(&str, &Path)> = vec![
        ("model_name_or_path", spec.model_name_or_path.as_path()),
        ("output_dir", spec.output_dir.as_path()),
    ];
    for p in spec.data_path.paths() {
        paths.push(("data_path", p));
    }
    if let Some(t) = spec.tokenizer_name.as_ref() {
        paths.push(("tokenizer_name", t.as_path()));
    }
    if let Some(e) = spec.eval_data_path.as_ref() {
        paths.push(("eval_data_path", e.as_path()));
    }
    for (key, p) in paths {
        if p.is_relative() {
            return bad(
                key,
                format!(
                    "{} is relative and the submission has no absolute base_dir ({base_dir:?}) to resolve it against",
                    p.display()
                ),
            );
        }
    }

    // One directory, one spelling: through a symlink or `..` two jobs could otherwise share an
    // output_dir that the coordinator's "still in use" check sees as two.
    spec.output_dir = canonical(&spec.output_dir);
    if spec.output_dir == canonical(&spec.model_name_or_path) {
        return bad(
            "output_dir",
            format!(
                "{} is model_name_or_path: the trained model would overwrite the base model",
                spec.output_dir.display()
            ),
        );
    }
    let model = &spec.model_name_or_path;
    if !model.is_dir() {
        return bad(
            "model_name_or_path",
            format!("{} is not a directory", model.display()),
        );
    }
    if !model.join("config.json").is_file() {
        return bad(
            "model_name_or_path",
            format!(
                "{} has no config.json (expected a Hugging Face model directory)",
                model.display()
            ),
        );
    }
    if let Some(t) = spec.tokenizer_name.as_ref() {
        if !t.is_dir() {
            return bad(
                "tokenizer_name",
                format!("{} is not a directory", t.display()),
            );
        }
    }
    herd_worker::trainer::check_supported(&spec).map_err(|e| Refusal(format!("{source}: {e}")))?;
    for data in spec.data_path.paths() {
        if !data.exists() {
            return bad("data_path", format!("{} does not exist", data.display()));
        }
        if !data.is_file() {
            return bad("data_path", format!("{} is not a file", data.display()));
        }
    }
    // Every file is read (format, records) and the mixture built, as the trainer will.
    let n = if spec.task == herd_proto::Task::Reward {
        herd_worker::trainer::reward::load_job_comparisons(&spec)
            .map_err(|e| Refusal(format!("{source}: `data_path`: {e}")))?
            .0
            .len()
    } else {
        herd_worker::data::mixture::load_mixture(&spec.data_path, spec.seed, spec.skip_bad_records)
            .map_err(|e| Refusal(format!("{source}: `data_path`: {e}")))?
            .records
            .len()
    };
    // The held-out set is read too, so a missing or malformed one is refused now rather than
    // failing every attempt at its first evaluation's set-up.
    if let Some(eval) = spec.eval_data_path.as_ref() {
        if !eval.is_file() {
            return bad(
                "eval_data_path",
                format!("{} does not exist or is not a file", eval.display()),
            );
        }
        let read = if spec.task == herd_proto::Task::Reward {
            herd_worker::data::comparisons::load_comparisons(eval, false)
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            herd_worker::eval::read_records(eval)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        read.map_err(|e| Refusal(format!("{source}: `eval_data_path`: {e}")))?;
    }
    let data = &spec.data_path;
    if spec.world_size > n {
        return bad(
            "world_size",
            format!(
                "{} workers are more than the {n} usable records in {}",
                spec.world_size, data
            ),
        );
    }
    let global = spec.global_batch_size();
    if n < global {
        return bad(
            "data_path",
            format!(
                "{} has {n} usable records, fewer than one global batch of {global} \
                 (per_device_train_batch_size {} x gradient_accumulation_steps {} x world_size {})",
                data,
                spec.per_device_train_batch_size,
                spec.gradient_accumulation_steps,
                spec.world_size
            ),
        );
    }
    if let Some(problem) = herd_worker::checkpoint::output_dir_problem(&spec.output_dir) {
        return bad(
            "output_dir",
            format!("{} {problem}", spec.output_dir.display()),
        );
    }
    let yaml = spec.to_yaml();
    Ok(ValidatedJob {
        spec,
        yaml,
        source_name: source.to_string(),
        records: n,
        warnings,
    })
}

/// `p` with symlinks and `..` resolved as far as it exists; the part that does not exist yet
/// is kept as written.
fn canonical(p: &Path) -> std::path::PathBuf {
    let mut missing = Vec::new();
    let mut existing = p;
    loop {
        if let Ok(mut c) = existing.canonicalize() {
            c.extend(missing.iter().rev());
            return c;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                existing = parent;
            }
            _ => return p.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_str().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(
            dir.path().join("d.json"),
            r#"[{"instruction":"a","output":"b"},{"instruction":"c","output":"d"}]"#,
        )
        .unwrap();
        let ok = "model_name_or_path: model\ndata_path: d.json\noutput_dir: out\nper_device_train_batch_size: 1\n";

        let e = validate_submission(ok, "j.yaml", base).unwrap_err();
        assert!(e.0.contains("no config.json"), "{e}");
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let v = validate_submission(ok, "j.yaml", base).unwrap();
        assert_eq!(v.records, 2);
        assert!(v.warnings.is_empty());
        // What a DeepSpeed config asks that herd does otherwise is kept for the job's events.
        let ds = format!("{ok}deepspeed: {{zero_optimization: {{stage: 3}}}}\n");
        let v = validate_submission(&ds, "j.yaml", base).unwrap();
        assert!(
            v.warnings.iter().any(|w| w.contains("stage 3")),
            "{:?}",
            v.warnings
        );
        assert!(v.spec.data_path.paths()[0].is_absolute());
        assert!(v.yaml.contains(base));

        let e = validate_submission(&format!("{ok}bogus: 1\n"), "j.yaml", base).unwrap_err();
        assert!(
            e.0.contains("j.yaml") && e.0.contains("bogus") && e.0.contains("line"),
            "{e}"
        );
        let e = validate_submission(&format!("{ok}world_size: 0\n"), "j.yaml", base).unwrap_err();
        assert!(e.0.contains("world_size"), "{e}");
        let e = validate_submission(&format!("{ok}world_size: 3\n"), "j.yaml", base).unwrap_err();
        assert!(
            e.0.contains("3 workers are more than the 2 usable records"),
            "{e}"
        );
        let e = validate_submission(
            &format!("{ok}gradient_accumulation_steps: 3\n"),
            "j.yaml",
            base,
        )
        .unwrap_err();
        assert!(e.0.contains("fewer than one global batch of 3"), "{e}");
        let e =
            validate_submission(&ok.replace("d.json", "missing.json"), "j.yaml", base).unwrap_err();
        assert!(e.0.contains("missing.json does not exist"), "{e}");
        let e = validate_submission(ok, "j.yaml", "").unwrap_err();
        assert!(e.0.contains("relative"), "{e}");
        // Every file of a mixture is checked: a bad second file is named.
        std::fs::write(
            dir.path().join("c.jsonl"),
            "{\"conversations\": [{\"from\": \"gpt\", \"value\": \"a\"}]}\n",
        )
        .unwrap();
        let mixed = ok.replace(
            "data_path: d.json",
            "data_path: [d.json, {path: c.jsonl, weight: 2}]",
        );
        let e = validate_submission(&mixed, "j.yaml", base).unwrap_err();
        assert!(e.0.contains("c.jsonl: record 1 (line 1): turn 1"), "{e}");
        std::fs::write(
            dir.path().join("c.jsonl"),
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"q\"}, {\"from\": \"gpt\", \"value\": \"a\"}]}\n",
        )
        .unwrap();
        let v = validate_submission(&mixed, "j.yaml", base).unwrap();
        assert_eq!(v.records, 4);
        // The held-out set: missing, then a bad record, is named before the job is queued.
        let with_eval =
            format!("{ok}eval_strategy: steps\neval_steps: 1\neval_data_path: e.json\n");
        let e = validate_submission(&with_eval, "j.yaml", base).unwrap_err();
        assert!(
            e.0.contains("`eval_data_path`") && e.0.contains("e.json does not exist"),
            "{e}"
        );
        std::fs::write(dir.path().join("e.json"), r#"[{"instruction":2}]"#).unwrap();
        let e = validate_submission(&with_eval, "j.yaml", base).unwrap_err();
        assert!(
            e.0.contains("`eval_data_path`")
                && e.0.contains("e.json")
                && e.0.contains("instruction"),
            "{e}"
        );
        std::fs::write(
            dir.path().join("e.json"),
            r#"[{"instruction":"a","output":"b"}]"#,
        )
        .unwrap();
        let v = validate_submission(&with_eval, "j.yaml", base).unwrap();
        assert!(v.spec.eval_data_path.unwrap().is_absolute());

        // output_dir is stored in one spelling: through a symlink, or with `..`, it is the
        // directory it names (the part that does not exist yet kept as written).
        std::fs::create_dir_all(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let real = dir.path().canonicalize().unwrap().join("real");
        for out in ["link", "model/../real/", "real"] {
            let job = ok.replace("output_dir: out", &format!("output_dir: {out}"));
            let v = validate_submission(&job, "j.yaml", base).unwrap();
            assert_eq!(v.spec.output_dir, real, "{out}");
        }
        let job = ok.replace("output_dir: out", "output_dir: real/../model");
        let e = validate_submission(&job, "j.yaml", base).unwrap_err();
        assert!(e.0.contains("overwrite the base model"), "{e}");
        let job = ok.replace("output_dir: out", "output_dir: link/new/run1");
        let v = validate_submission(&job, "j.yaml", base).unwrap();
        assert_eq!(v.spec.output_dir, real.join("new/run1"));

        std::fs::write(dir.path().join("d.json"), "[{\"instruction\": 1}]").unwrap();
        let e = validate_submission(ok, "j.yaml", base).unwrap_err();
        assert!(e.0.contains("data_path"), "{e}");
    }
}
