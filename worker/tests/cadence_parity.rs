//! When training logs, evaluates and saves, and the epoch it logs, against HF Trainer: the
//! fixture (tests/fixtures/make_cadence.py) ran transformers' Trainer with each case's
//! TrainingArguments and recorded the steps of its log entries, evaluations and checkpoints, the
//! checkpoints save_total_limit left, and the epoch of every entry. The same keys as a herd job
//! must give the same steps, the same checkpoints and bit-identical epochs.

mod common;

use herd_proto::JobSpec;
use herd_worker::checkpoint::rotation_victims;
use herd_worker::trainer::cadence::Cadence;
use herd_worker::trainer::Plan;
use serde_json::Value;

fn steps_and_epochs(v: &Value) -> Vec<(u64, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap()))
        .collect()
}

#[test]
fn logs_evaluations_checkpoints_and_epochs_fall_where_hf_trainer_puts_them() {
    let text = std::fs::read_to_string(common::fixtures().join("cadence.json")).unwrap();
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut keys = case["job"].clone();
        keys["model_name_or_path"] = "m".into();
        keys["data_path"] = "d.json".into();
        keys["output_dir"] = "o".into();
        keys["eval_data_path"] = "e.json".into();
        // JSON is YAML: the fixture's keys are the job file.
        let yaml = serde_json::to_string(&keys).unwrap();
        let job = JobSpec::from_yaml_str(&yaml, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let examples = case["examples"].as_u64().unwrap() as usize;
        let plan = Plan::new(&job, examples, 1).unwrap();
        assert_eq!(
            plan.total_steps,
            case["max_steps"].as_u64().unwrap(),
            "{name}"
        );
        let cadence = Cadence::of(&job, plan.total_steps);
        let (mut logs, mut evals, mut saved, mut kept) = (vec![], vec![], vec![], vec![]);
        for step in 1..=plan.total_steps {
            let due = cadence.after(&plan, step);
            let at = (step, plan.epoch_progress(step));
            if due.log {
                logs.push(at);
            }
            if due.evaluate {
                evals.push(at);
            }
            if due.save {
                saved.push(step);
                kept.push(step);
                let gone = rotation_victims(&kept, job.save_total_limit);
                kept.retain(|s| !gone.contains(s));
            }
        }
        assert_eq!(logs, steps_and_epochs(&case["logs"]), "{name}: logs");
        assert_eq!(evals, steps_and_epochs(&case["evals"]), "{name}: evals");
        let summary = (plan.total_steps, plan.epoch_progress(plan.total_steps));
        assert_eq!(
            summary,
            steps_and_epochs(&Value::Array(vec![case["summary"].clone()]))[0],
            "{name}: the final entry"
        );
        let want_saved: Vec<u64> = case["saved"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        assert_eq!(saved, want_saved, "{name}: checkpoints saved");
        let kept: Vec<String> = kept.iter().map(|s| format!("checkpoint-{s}")).collect();
        let want_kept: Vec<String> = case["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(kept, want_kept, "{name}: checkpoints kept");
    }
}
