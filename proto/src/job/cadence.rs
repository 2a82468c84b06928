//! When a job logs, evaluates and saves (`*_strategy`, `*_steps`), and HF's rules for the best
//! checkpoint (`metric_for_best_model`, `load_best_model_at_end`); the worker's
//! `trainer::cadence` and `trainer::best` act on them.

use serde::{Deserialize, Serialize};

use super::{JobSpec, Task};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SaveStrategy {
    /// Save every `save_steps` optimizer steps (HF's default).
    #[default]
    Steps,
    /// Never save intermediate checkpoints (the final model is still written).
    No,
    /// Save at the end of every epoch (and where a run ends mid-epoch).
    Epoch,
    /// Save after an evaluation that improves `metric_for_best_model`.
    Best,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EvalStrategy {
    #[default]
    No,
    /// Evaluate on `eval_data_path` every `eval_steps` optimizer steps.
    Steps,
    /// Evaluate at the end of every epoch.
    Epoch,
}

/// A `logging_steps`/`save_steps`/`eval_steps` value: a number of optimizer steps, or (below 1)
/// HF's ratio of the run's total steps, ceil(total × ratio).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StepCount {
    Steps(u64),
    Ratio(f64),
}

impl<'de> Deserialize<'de> for StepCount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StepCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of steps, or a ratio of the total steps in (0, 1)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<StepCount, E> {
                Ok(StepCount::Steps(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<StepCount, E> {
                u64::try_from(v)
                    .map(StepCount::Steps)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<StepCount, E> {
                Ok(StepCount::Ratio(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl StepCount {
    /// The steps between two events of a run of `total_steps` (0 only for `Steps(0)`, which
    /// the job refuses where it is used).
    pub fn resolve(self, total_steps: u64) -> u64 {
        match self.whole() {
            StepCount::Steps(n) => n,
            StepCount::Ratio(r) => ((total_steps as f64 * r).ceil() as u64).max(1),
        }
    }

    /// A ratio of 1 or more (`10.0`) as the steps it means; a ratio below 1 stays one.
    fn whole(self) -> StepCount {
        match self {
            StepCount::Ratio(r) if r >= 1.0 => StepCount::Steps(r as u64),
            c => c,
        }
    }

    /// None when usable; else what is wrong (HF refuses the same values).
    pub(super) fn problem(self) -> Option<String> {
        match self {
            StepCount::Steps(0) => {
                Some("must be at least 1, or a ratio of the total steps in (0, 1)".into())
            }
            StepCount::Steps(_) => None,
            StepCount::Ratio(r) if r > 0.0 && r < 1.0 => None,
            StepCount::Ratio(r) if r >= 1.0 && r.fract() == 0.0 && r.is_finite() => None,
            StepCount::Ratio(r) => Some(format!(
                "must be a whole number of steps, or a ratio of the total steps in (0, 1), got {r}"
            )),
        }
    }
}

impl std::fmt::Display for StepCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepCount::Steps(n) => write!(f, "{n}"),
            StepCount::Ratio(r) => write!(f, "{r}"),
        }
    }
}

/// HF's `logging_strategy`: when a `{loss, learning_rate, grad_norm, epoch, step}` entry is
/// added to the log history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoggingStrategy {
    /// Every `logging_steps` optimizer steps (HF's default).
    #[default]
    Steps,
    /// At the end of every epoch.
    Epoch,
    No,
}

impl JobSpec {
    /// The metric that picks the best checkpoint, as the evaluation names it (`eval_loss`), and
    /// whether higher is better: HF's rules (metric "loss" under load_best_model_at_end, the
    /// `eval_` prefix added, greater_is_better false for a metric ending in "loss").
    pub fn best_metric(&self) -> Option<(String, bool)> {
        let metric = match (&self.metric_for_best_model, self.load_best_model_at_end) {
            (Some(m), _) => m.clone(),
            (None, true) => "loss".to_string(),
            (None, false) => return None,
        };
        let greater = self.greater_is_better.unwrap_or(!metric.ends_with("loss"));
        let metric = if metric.starts_with("eval_") {
            metric
        } else {
            format!("eval_{metric}")
        };
        Some((metric, greater))
    }

    /// The metrics an evaluation of this job's task logs (with the `eval_` prefix).
    pub fn eval_metrics(&self) -> &'static [&'static str] {
        match self.task {
            Task::Reward => &[
                "eval_loss",
                "eval_accuracy",
                "eval_runtime",
                "eval_samples_per_second",
                "eval_steps_per_second",
            ],
            _ => &[
                "eval_loss",
                "eval_runtime",
                "eval_samples_per_second",
                "eval_steps_per_second",
            ],
        }
    }

    /// HF's checks of load_best_model_at_end and save_strategy: best, with the key to blame;
    /// and, before any step rather than at the first evaluation as HF finds it, a metric the
    /// evaluation does not log.
    pub(super) fn best_model_problem(&self) -> Option<(&'static str, String)> {
        if let Some((metric, _)) = self.best_metric() {
            if !self.eval_metrics().contains(&metric.as_str()) {
                return Some((
                    "metric_for_best_model",
                    format!(
                        "the evaluation logs no `{metric}` (it logs {})",
                        self.eval_metrics().join(", ")
                    ),
                ));
            }
        }
        let saves_best = self.save_strategy == SaveStrategy::Best;
        if (saves_best || self.load_best_model_at_end) && self.eval_strategy == EvalStrategy::No {
            let key = if saves_best {
                "save_strategy"
            } else {
                "load_best_model_at_end"
            };
            return Some((key, "needs an evaluation to pick the best checkpoint: set eval_strategy (steps or epoch) and eval_data_path".into()));
        }
        if saves_best && self.metric_for_best_model.is_none() && !self.load_best_model_at_end {
            return Some((
                "metric_for_best_model",
                "is required with save_strategy: best (e.g. loss)".into(),
            ));
        }
        if !self.load_best_model_at_end || saves_best {
            return None;
        }
        let same = matches!(
            (self.eval_strategy, self.save_strategy),
            (EvalStrategy::Steps, SaveStrategy::Steps) | (EvalStrategy::Epoch, SaveStrategy::Epoch)
        );
        if !same {
            return Some((
                "load_best_model_at_end",
                format!(
                    "needs eval_strategy and save_strategy to match (or save_strategy: best), got eval_strategy {:?} and save_strategy {:?}",
                    self.eval_strategy, self.save_strategy
                )
                .to_lowercase(),
            ));
        }
        if self.eval_strategy != EvalStrategy::Steps {
            return None;
        }
        let eval = self.eval_steps.unwrap_or(self.logging_steps);
        let multiple = match (self.save_steps.whole(), eval.whole()) {
            (StepCount::Steps(s), StepCount::Steps(e)) => e > 0 && s % e == 0,
            (StepCount::Ratio(s), StepCount::Ratio(e)) => {
                let (s, e) = ((s * 1e6).round() as u64, (e * 1e6).round() as u64);
                e > 0 && s % e == 0
            }
            _ => false,
        };
        (!multiple).then(|| {
            (
                "load_best_model_at_end",
                format!(
                    "needs save_steps ({}) to be a multiple of eval_steps ({eval}), so every evaluation that may be the best has its checkpoint (both steps, or both ratios)",
                    self.save_steps
                ),
            )
        })
    }
}
