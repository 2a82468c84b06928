//! The best checkpoint, as HF Trainer keeps it: each evaluation's `metric_for_best_model` is
//! compared with the best so far (strictly: a tie is no new best); the checkpoint of the best
//! evaluation, once it exists, is named in the trainer state, rotation never deletes it, and
//! under `load_best_model_at_end` the final model is its weights. Proven against the real
//! Trainer by worker/tests/cadence_parity.rs.

use super::state::TrainerState;
use herd_proto::JobSpec;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestRule {
    /// As the evaluation entry names it: `eval_loss`.
    pub metric: String,
    pub greater_is_better: bool,
}

impl BestRule {
    pub fn of(job: &JobSpec) -> Option<BestRule> {
        job.best_metric()
            .map(|(metric, greater_is_better)| BestRule {
                metric,
                greater_is_better,
            })
    }

    /// Whether `value` beats `best` (HF's np.greater / np.less against ±inf at first).
    pub fn improves(&self, value: f64, best: Option<f64>) -> bool {
        if self.greater_is_better {
            value > best.unwrap_or(f64::NEG_INFINITY)
        } else {
            value < best.unwrap_or(f64::INFINITY)
        }
    }
}

/// The checkpoint named best once checkpoint `saving` is written: the best evaluation's, if it
/// exists (it is this one, or an earlier one still in `existing`); else the one named before.
/// An evaluation between checkpoints is never named, as in HF.
pub fn named_after_save(
    best_step: Option<u64>,
    saving: u64,
    existing: &[u64],
    named: Option<u64>,
) -> Option<u64> {
    match best_step {
        Some(b) if b == saving || existing.contains(&b) => Some(b),
        _ => named,
    }
}

/// At resume: a best checkpoint the trainer state names but that is gone (deleted by hand, a
/// rotation outside herd) is forgotten, as HF Trainer does ("recorded in the resumed state does
/// not exist anymore. Ignoring it for this run"); `best_metric` stays, so only a better
/// evaluation names a new one, and load_best_model_at_end without one keeps the last weights.
/// Returns the forgotten path. Otherwise the run would end failing to read it, on every rerun.
pub fn forget_missing(ts: &mut TrainerState, output_dir: &std::path::Path) -> Option<String> {
    let step = ts.best_checkpoint_step();
    let here = step.map(|s| output_dir.join(format!("checkpoint-{s}")));
    if here.is_some_and(|d| d.is_dir()) || ts.best_model_checkpoint.is_none() {
        return None;
    }
    ts.best_model_checkpoint.take()
}

/// The checkpoint named best, with the evaluation that made it best (what `herd status` shows).
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    pub step: u64,
    /// As the trainer state names it: `output_dir/checkpoint-<step>`.
    pub path: String,
    pub metric: String,
    pub value: f64,
}

/// The checkpoint the trainer state names best, with its evaluation's value looked up in the
/// log history: the newest eval entry at that step that gives the metric (None if none does).
pub fn named_with_value(rule: &BestRule, ts: &TrainerState) -> Option<Named> {
    let step = ts.best_checkpoint_step()?;
    let value = ts.log_history.iter().rev().find_map(|e| {
        let at = e.get("step").and_then(serde_json::Value::as_u64);
        (at == Some(step))
            .then(|| e.get(&rule.metric).and_then(serde_json::Value::as_f64))
            .flatten()
    })?;
    Some(Named {
        step,
        path: ts.best_model_checkpoint.clone()?,
        metric: rule.metric.clone(),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_best_checkpoint_that_is_gone_is_forgotten_at_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut ts: TrainerState = serde_json::from_value(json!({
            "best_metric": 1.2, "best_global_step": 4,
            "best_model_checkpoint": "/elsewhere/checkpoint-4",
            "epoch": 1.0, "eval_steps": 4, "global_step": 8, "is_hyper_param_search": false,
            "is_local_process_zero": true, "is_world_process_zero": true, "log_history": [],
            "logging_steps": 1, "max_steps": 10, "num_input_tokens_seen": 0,
            "num_train_epochs": 1, "save_steps": 4, "total_flos": 0.0, "train_batch_size": 2,
            "trial_name": null, "trial_params": null,
        }))
        .unwrap();
        // Found where herd reads it (output_dir/checkpoint-4), whatever the recorded path.
        std::fs::create_dir(dir.path().join("checkpoint-4")).unwrap();
        assert_eq!(forget_missing(&mut ts, dir.path()), None);
        assert_eq!(ts.best_checkpoint_step(), Some(4));
        std::fs::remove_dir(dir.path().join("checkpoint-4")).unwrap();
        assert_eq!(
            forget_missing(&mut ts, dir.path()).as_deref(),
            Some("/elsewhere/checkpoint-4")
        );
        assert_eq!(
            (ts.best_model_checkpoint.as_ref(), ts.best_metric),
            (None, Some(1.2))
        );
        assert_eq!(forget_missing(&mut ts, dir.path()), None);
    }

    #[test]
    fn a_tie_is_no_new_best_and_direction_follows_the_rule() {
        let lower = BestRule {
            metric: "eval_loss".into(),
            greater_is_better: false,
        };
        assert!(lower.improves(3.0, None));
        assert!(lower.improves(2.9, Some(3.0)));
        assert!(!lower.improves(3.0, Some(3.0)));
        assert!(!lower.improves(f64::NAN, None));
        let higher = BestRule {
            greater_is_better: true,
            ..lower
        };
        assert!(higher.improves(3.1, Some(3.0)) && !higher.improves(2.9, Some(3.0)));
    }

    #[test]
    fn only_a_checkpoint_that_exists_is_named() {
        assert_eq!(named_after_save(Some(6), 6, &[2, 4], None), Some(6));
        assert_eq!(named_after_save(Some(6), 8, &[4], Some(4)), Some(4));
        assert_eq!(named_after_save(Some(4), 8, &[4, 6], Some(2)), Some(4));
        assert_eq!(named_after_save(None, 8, &[4], None), None);
    }

    #[test]
    fn the_named_checkpoint_carries_its_own_evaluation_not_the_newest_best() {
        let rule = BestRule {
            metric: "eval_loss".into(),
            greater_is_better: false,
        };
        let mut ts: TrainerState = serde_json::from_value(json!({
            "best_metric": 1.2, "best_global_step": 5, "best_model_checkpoint": "/out/checkpoint-4",
            "epoch": 1.0, "eval_steps": 1, "global_step": 5, "is_hyper_param_search": false,
            "is_local_process_zero": true, "is_world_process_zero": true, "logging_steps": 1,
            "max_steps": 10, "num_input_tokens_seen": 0, "num_train_epochs": 1, "save_steps": 4,
            "total_flos": 0.0, "train_batch_size": 1, "trial_name": null, "trial_params": null,
            "log_history": [
                {"step": 4, "loss": 2.0},
                {"step": 4, "eval_loss": 1.5},
                {"step": 5, "eval_loss": 1.2}, // a better evaluation, no checkpoint at 5
            ],
        }))
        .unwrap();
        let named = named_with_value(&rule, &ts).unwrap();
        assert_eq!(
            named,
            Named {
                step: 4,
                path: "/out/checkpoint-4".into(),
                metric: "eval_loss".into(),
                value: 1.5
            }
        );
        ts.best_model_checkpoint = Some("/out/checkpoint-6".into());
        assert_eq!(named_with_value(&rule, &ts), None);
        ts.best_model_checkpoint = None;
        assert_eq!(named_with_value(&rule, &ts), None);
    }
}
