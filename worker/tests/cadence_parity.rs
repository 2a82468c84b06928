//! When training logs, evaluates and saves, and the epoch it logs, against HF Trainer: the
//! fixture (tests/fixtures/make_cadence.py) ran transformers' Trainer with each case's
//! TrainingArguments and recorded the steps of its log entries, evaluations and checkpoints, the
//! checkpoints save_total_limit left, and the epoch of every entry; with a metric_for_best_model,
//! the eval losses and the best checkpoint it chose. The same keys as a herd job must give the
//! same steps, the same checkpoints, bit-identical epochs and, fed the same eval losses, the same
//! best checkpoint.

mod common;

use herd_proto::JobSpec;
use herd_proto::SaveStrategy;
use herd_worker::checkpoint::{final_victims, rotation_victims};
use herd_worker::trainer::best::{named_after_save, BestRule};
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
    assert!(cases.len() >= 14);
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
        // The best checkpoint, fed HF's eval losses (herd's own differ: another model).
        let rule = BestRule::of(&job);
        let best = &case["best"];
        let mut eval_losses = best["eval_losses"].as_array().into_iter().flatten();
        let (mut best_metric, mut best_step, mut named) = (None, None, None);
        if job.eval_on_start {
            evals.push((0, 0.0)); // the trainer's evaluation before the loop
        }
        for step in 1..=plan.total_steps {
            let due = cadence.after(&plan, step);
            let at = (step, plan.epoch_progress(step));
            if due.log {
                logs.push(at);
            }
            let mut new_best = false;
            if due.evaluate {
                evals.push(at);
                if let Some(rule) = &rule {
                    let value = eval_losses.next().unwrap().as_f64().unwrap();
                    if rule.improves(value, best_metric) {
                        (best_metric, new_best) = (Some(value), true);
                        if job.save_strategy != SaveStrategy::No {
                            best_step = Some(step);
                        }
                    }
                }
            }
            if due.save || (job.save_strategy == SaveStrategy::Best && new_best) {
                saved.push(step);
                named = named_after_save(best_step, step, &kept, named);
                kept.push(step);
                let gone = rotation_victims(&kept, job.save_total_limit, named);
                kept.retain(|s| !gone.contains(s));
            }
        }
        let gone = final_victims(&kept, job.save_total_limit, named);
        kept.retain(|s| !gone.contains(s));
        if rule.is_some() {
            assert_eq!(
                best_metric,
                best["best_metric"].as_f64(),
                "{name}: best_metric"
            );
            assert_eq!(
                best_step,
                best["best_global_step"].as_u64(),
                "{name}: best step"
            );
            let named = named.map(|s| format!("checkpoint-{s}"));
            assert_eq!(
                named.as_deref(),
                best["best_model_checkpoint"].as_str(),
                "{name}: best_model_checkpoint"
            );
        } else {
            assert!(
                best.is_null(),
                "{name}: HF tracked a best model herd does not"
            );
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
