//! `lr_scheduler_type` and `lr_scheduler_kwargs`: transformers' schedulers by name and the
//! arguments each scheduler function takes (the worker's `schedule` computes them).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    #[default]
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
    Constant,
    ConstantWithWarmup,
    InverseSqrt,
    CosineWithMinLr,
    /// cosine_with_min_lr whose warmup starts above 0 (at `warmup_lr_rate`, or 1/warmup) and
    /// whose decay starts one step in.
    CosineWarmupWithMinLr,
    WarmupStableDecay,
}

/// The curve of a warmup_stable_decay warmup or decay (`warmup_type`, `decay_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WsdCurve {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

impl SchedulerType {
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerType::Linear => "linear",
            SchedulerType::Cosine => "cosine",
            SchedulerType::CosineWithRestarts => "cosine_with_restarts",
            SchedulerType::Polynomial => "polynomial",
            SchedulerType::Constant => "constant",
            SchedulerType::ConstantWithWarmup => "constant_with_warmup",
            SchedulerType::InverseSqrt => "inverse_sqrt",
            SchedulerType::CosineWithMinLr => "cosine_with_min_lr",
            SchedulerType::CosineWarmupWithMinLr => "cosine_warmup_with_min_lr",
            SchedulerType::WarmupStableDecay => "warmup_stable_decay",
        }
    }

    /// The `lr_scheduler_kwargs` transformers' scheduler function takes.
    pub fn kwargs(self) -> &'static [&'static str] {
        match self {
            SchedulerType::Cosine | SchedulerType::CosineWithRestarts => &["num_cycles"],
            SchedulerType::Polynomial => &["lr_end", "power"],
            SchedulerType::InverseSqrt => &["timescale"],
            SchedulerType::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            SchedulerType::CosineWarmupWithMinLr => {
                &["num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"]
            }
            SchedulerType::WarmupStableDecay => &[
                "num_decay_steps",
                "num_stable_steps",
                "warmup_type",
                "decay_type",
                "min_lr_ratio",
                "num_cycles",
            ],
            SchedulerType::Linear | SchedulerType::Constant | SchedulerType::ConstantWithWarmup => {
                &[]
            }
        }
    }
}

/// HF's `lr_scheduler_kwargs`: the scheduler function's own arguments (see
/// [`SchedulerType::kwargs`]); unset ones take transformers' defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SchedulerKwargs {
    /// cosine: 0.5 (half a wave), cosine_with_restarts: 1, cosine_with_min_lr: 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_cycles: Option<f64>,
    /// polynomial: 1e-7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_end: Option<f64>,
    /// polynomial: 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// inverse_sqrt: the warmup steps, or 10000 without warmup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timescale: Option<u64>,
    /// cosine_with_min_lr: the floor, as an lr or as a ratio of the lr (one of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr_rate: Option<f64>,
    /// cosine_warmup_with_min_lr: the first warmup step's lr as a ratio of the lr (default
    /// 1/warmup, rising by as much each step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_lr_rate: Option<f64>,
    /// warmup_stable_decay: the decay's steps (required), the stable steps (default: what
    /// warmup and decay leave of the total), the curves (linear warmup, cosine decay) and the
    /// floor as a ratio of the lr (0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_decay_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_stable_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_type: Option<WsdCurve>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decay_type: Option<WsdCurve>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_lr_ratio: Option<f64>,
}

impl SchedulerKwargs {
    fn given(&self) -> Vec<&'static str> {
        [
            ("num_cycles", self.num_cycles.is_some()),
            ("lr_end", self.lr_end.is_some()),
            ("power", self.power.is_some()),
            ("timescale", self.timescale.is_some()),
            ("min_lr", self.min_lr.is_some()),
            ("min_lr_rate", self.min_lr_rate.is_some()),
            ("warmup_lr_rate", self.warmup_lr_rate.is_some()),
            ("num_decay_steps", self.num_decay_steps.is_some()),
            ("num_stable_steps", self.num_stable_steps.is_some()),
            ("warmup_type", self.warmup_type.is_some()),
            ("decay_type", self.decay_type.is_some()),
            ("min_lr_ratio", self.min_lr_ratio.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect()
    }

    /// A value no schedule can use: not finite, or outside the range its formula makes sense
    /// in (a NaN power or a negative floor would train on a NaN or negative learning rate).
    fn value_problem(&self) -> Option<String> {
        let ranges: [(&str, Option<f64>, f64, f64); 7] = [
            ("num_cycles", self.num_cycles, 0.0, f64::MAX),
            ("lr_end", self.lr_end, 0.0, f64::MAX),
            ("power", self.power, 0.0, f64::MAX),
            ("min_lr", self.min_lr, 0.0, f64::MAX),
            ("min_lr_rate", self.min_lr_rate, 0.0, 1.0),
            ("warmup_lr_rate", self.warmup_lr_rate, 0.0, 1.0),
            ("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0),
        ];
        ranges.into_iter().find_map(|(key, v, lo, hi)| {
            let v = v?;
            (!(v.is_finite() && (lo..=hi).contains(&v))).then(|| match hi {
                f64::MAX => format!("{key} must be a finite number >= 0, got {v}"),
                _ => format!("{key} must be in [{lo}, {hi}], got {v}"),
            })
        })
    }

    /// None when `kind` takes these, with the job's `lr`; else what is wrong (transformers
    /// raises on the same).
    pub(super) fn problem(&self, kind: SchedulerType, lr: f64) -> Option<String> {
        if let Some(k) = self
            .given()
            .into_iter()
            .find(|k| !kind.kwargs().contains(k))
        {
            let takes = match kind.kwargs() {
                [] => "none".to_string(),
                ks => ks.join(", "),
            };
            return Some(format!(
                "`{k}` is not an argument of {} (it takes {takes})",
                kind.as_str()
            ));
        }
        if let Some(p) = self.value_problem() {
            return Some(p);
        }
        match kind {
            SchedulerType::Polynomial if self.lr_end.unwrap_or(1e-7) >= lr => Some(format!(
                "lr_end ({}) must be smaller than learning_rate ({lr})",
                self.lr_end.unwrap_or(1e-7)
            )),
            SchedulerType::CosineWithMinLr | SchedulerType::CosineWarmupWithMinLr => {
                match (self.min_lr, self.min_lr_rate) {
                    (Some(_), Some(_)) => Some("give min_lr or min_lr_rate, not both".into()),
                    (None, None) => Some(format!("{} needs min_lr or min_lr_rate", kind.as_str())),
                    _ => None,
                }
            }
            SchedulerType::WarmupStableDecay if self.num_decay_steps.is_none() => {
                Some("warmup_stable_decay needs num_decay_steps".into())
            }
            SchedulerType::InverseSqrt if self.timescale == Some(0) => {
                Some("timescale must be at least 1".into())
            }
            _ => None,
        }
    }
}
