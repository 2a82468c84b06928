//! The DeepSpeed config's `scheduler` section: DeepSpeed's three warmup schedules
//! (`deepspeed.runtime.lr_schedules.WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`), read the way
//! HF Trainer hands them to DeepSpeed.
//!
//! HF fills `warmup_min_lr: "auto"` with 0 and `warmup_max_lr: "auto"` with the learning rate
//! (a different number is a mismatch) when the job is read; `warmup_num_steps` and
//! `total_num_steps` only when training starts and the number of optimizer steps is known
//! (`trainer_config_finalize`: "auto" takes the job's warmup and total steps, a different number
//! is a mismatch). That second half is [`DsScheduler::resolve`]. A parameter left out takes
//! DeepSpeed's own default (0.19: warmup 1000 steps, logarithmic; WarmupDecayLR's peak 0.001).
//! What DeepSpeed would reject (a missing `total_num_steps`, an unknown parameter, a warmup of
//! no steps) is refused here with the reason, before any step runs.

use serde_json::{Map, Value};

/// Which of DeepSpeed's schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsScheduleKind {
    /// Warm up from `warmup_min_lr` to `warmup_max_lr`, then stay there.
    WarmupLr,
    /// The same warmup, then linear decay to 0 at `total_num_steps`.
    WarmupDecayLr,
    /// Warm up from `warmup_min_ratio` × lr to lr, then half a cosine to `cos_min_ratio` × lr.
    WarmupCosineLr,
}

impl DsScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DsScheduleKind::WarmupLr => "WarmupLR",
            DsScheduleKind::WarmupDecayLr => "WarmupDecayLR",
            DsScheduleKind::WarmupCosineLr => "WarmupCosineLR",
        }
    }

    /// The parameters DeepSpeed's constructor takes (besides the optimizer).
    fn params(self) -> &'static [&'static str] {
        match self {
            DsScheduleKind::WarmupLr => &[
                "warmup_min_lr",
                "warmup_max_lr",
                "warmup_num_steps",
                "warmup_type",
            ],
            DsScheduleKind::WarmupDecayLr => &[
                "total_num_steps",
                "warmup_min_lr",
                "warmup_max_lr",
                "warmup_num_steps",
                "warmup_type",
            ],
            DsScheduleKind::WarmupCosineLr => &[
                "total_num_steps",
                "warmup_min_ratio",
                "warmup_num_steps",
                "cos_min_ratio",
                "warmup_type",
            ],
        }
    }
}

/// How the warmup rises: DeepSpeed's default is `log` (ln(i + 1) / ln(W)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmupType {
    Log,
    Linear,
}

/// The section once read. `warmup_num_steps` and `total_num_steps` are `None` where "auto":
/// they become the job's numbers in [`DsScheduler::resolve`].
#[derive(Debug, Clone, PartialEq)]
pub struct DsScheduler {
    pub kind: DsScheduleKind,
    pub warmup_type: WarmupType,
    /// WarmupLR / WarmupDecayLR: the lr of the first step and where warmup starts.
    pub warmup_min_lr: f64,
    /// WarmupLR / WarmupDecayLR: where warmup ends.
    pub warmup_max_lr: f64,
    /// WarmupCosineLR: the optimizer's lr (the job's `learning_rate`) the ratios scale.
    pub base_lr: f64,
    pub warmup_min_ratio: f64,
    pub cos_min_ratio: f64,
    pub warmup_num_steps: Option<u64>,
    pub total_num_steps: Option<u64>,
    /// `warmup_num_steps` was left out: DeepSpeed's default (1000) runs, and HF's
    /// `fill_match` checks nothing against the job, as it only fills keys that are there.
    pub warmup_defaulted: bool,
}

/// Reads `section` (the value of `scheduler`) for a job whose `learning_rate` is
/// `learning_rate`. Every problem is returned, one sentence each.
pub fn read(section: &Value, learning_rate: f64) -> Result<DsScheduler, Vec<String>> {
    let mut errors = Vec::new();
    let kind = match section.get("type").and_then(Value::as_str) {
        Some("WarmupLR") => DsScheduleKind::WarmupLr,
        Some("WarmupDecayLR") => DsScheduleKind::WarmupDecayLr,
        Some("WarmupCosineLR") => DsScheduleKind::WarmupCosineLr,
        Some(other @ ("LRRangeTest" | "OneCycle")) => {
            return Err(vec![format!(
                "`scheduler.type` {other} is not supported (herd has DeepSpeed's WarmupLR, \
                 WarmupDecayLR and WarmupCosineLR); leave the section out to use the job's \
                 lr_scheduler_type"
            )])
        }
        _ => {
            return Err(vec![format!(
                "`scheduler.type` is {} but DeepSpeed's schedules herd runs are WarmupLR, \
                 WarmupDecayLR and WarmupCosineLR",
                section.get("type").unwrap_or(&Value::Null)
            )])
        }
    };
    let empty = Map::new();
    let params = match section.get("params") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(vec![format!(
                "`scheduler.params` is {other}, not an object"
            )])
        }
    };
    for key in params.keys() {
        if !kind.params().contains(&key.as_str()) {
            errors.push(format!(
                "`scheduler.params.{key}` is not a parameter of DeepSpeed's {} (it takes {})",
                kind.as_str(),
                kind.params().join(", ")
            ));
        }
    }

    let mut number = |key: &str, auto: Option<f64>, default: f64| -> f64 {
        match params.get(key) {
            None => default,
            Some(v) if is_auto(v) => match auto {
                Some(a) => a,
                None => {
                    errors.push(format!(
                        "`scheduler.params.{key}` is \"auto\" but HF Trainer fills no value \
                         for it: give a number"
                    ));
                    default
                }
            },
            Some(v) => v.as_f64().unwrap_or_else(|| {
                errors.push(format!("`scheduler.params.{key}` is {v}, not a number"));
                default
            }),
        }
    };
    let warmup_min_lr = number("warmup_min_lr", Some(0.0), 0.0);
    let max_default = match kind {
        // DeepSpeed 0.19: WarmupLR's None means the optimizer's lr; WarmupDecayLR passes 0.001.
        DsScheduleKind::WarmupDecayLr => 0.001,
        _ => learning_rate,
    };
    let warmup_max_lr = number("warmup_max_lr", Some(learning_rate), max_default);
    let warmup_min_ratio = number("warmup_min_ratio", None, 0.0);
    let cos_min_ratio = number("cos_min_ratio", None, 0.0001);
    if kind != DsScheduleKind::WarmupCosineLr
        && params.get("warmup_max_lr").is_some_and(|v| !is_auto(v))
        && warmup_max_lr != learning_rate
    {
        errors.push(format!(
            "`scheduler.params.warmup_max_lr` is {warmup_max_lr} but the job's learning_rate \
             is {learning_rate}"
        ));
    }

    let mut steps = |key: &str, default: Option<u64>| -> Option<u64> {
        match params.get(key) {
            None => {
                if default.is_none() {
                    errors.push(format!(
                        "DeepSpeed's {} needs `scheduler.params.{key}` (\"auto\" takes the \
                         job's number of optimizer steps)",
                        kind.as_str()
                    ));
                }
                default
            }
            Some(v) if is_auto(v) => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    errors.push(format!(
                        "`scheduler.params.{key}` is {v}, not a whole number of steps"
                    ));
                    None
                }
            },
        }
    };
    let warmup_num_steps = steps("warmup_num_steps", Some(1000));
    let total_num_steps = match kind {
        DsScheduleKind::WarmupLr => None,
        _ => steps("total_num_steps", None),
    };
    if warmup_num_steps == Some(0) {
        errors.push(warmup_of_no_steps("is 0"));
    }
    let warmup_type = match params.get("warmup_type") {
        None => WarmupType::Log,
        Some(v) => match v.as_str() {
            Some("log") => WarmupType::Log,
            Some("linear") => WarmupType::Linear,
            _ => {
                errors.push(format!(
                    "`scheduler.params.warmup_type` is {v} but DeepSpeed's are \"log\" and \
                     \"linear\""
                ));
                WarmupType::Log
            }
        },
    };

    if errors.is_empty() {
        Ok(DsScheduler {
            kind,
            warmup_type,
            warmup_min_lr,
            warmup_max_lr,
            base_lr: learning_rate,
            warmup_min_ratio,
            cos_min_ratio,
            warmup_num_steps,
            total_num_steps,
            warmup_defaulted: params.get("warmup_num_steps").is_none(),
        })
    } else {
        Err(errors)
    }
}

impl DsScheduler {
    /// HF's `trainer_config_finalize` once the job's optimizer steps are known: "auto" takes the
    /// job's warmup (`warmup_steps`, else ceil(warmup_ratio × total), at least 1) and total, and
    /// a number must equal them. The result has both step counts set.
    pub fn resolve(&self, job_warmup: u64, job_total: u64) -> Result<DsScheduler, String> {
        let mut mismatches = Vec::new();
        let mut fill = |key: &str, given: Option<u64>, ours: u64, what: &str| match given {
            Some(n) if n != ours => {
                mismatches.push(format!(
                    "`scheduler.params.{key}` is {n} but the job's {what} is {ours}"
                ));
                n
            }
            _ => ours,
        };
        // transformers 5 fills at least 1, so that a job without warmup still runs (DeepSpeed
        // refuses 0, and warms up over max(2, n) steps anyway).
        let warmup = match (self.warmup_defaulted, self.warmup_num_steps) {
            (true, Some(n)) => n,
            _ => fill(
                "warmup_num_steps",
                self.warmup_num_steps,
                job_warmup.max(1),
                "warmup (warmup_steps, or warmup_ratio × steps, at least 1)",
            ),
        };
        let total = match self.kind {
            DsScheduleKind::WarmupLr => None,
            _ => Some(fill(
                "total_num_steps",
                self.total_num_steps,
                job_total,
                "number of optimizer steps",
            )),
        };
        if mismatches.is_empty() {
            Ok(DsScheduler {
                warmup_num_steps: Some(warmup),
                total_num_steps: total,
                ..self.clone()
            })
        } else {
            Err(format!(
                "the DeepSpeed config disagrees with the job (as HF Trainer, herd takes \"auto\" \
                 or the job's own value): {}",
                mismatches.join("; ")
            ))
        }
    }
}

fn warmup_of_no_steps(how: &str) -> String {
    format!(
        "`scheduler.params.warmup_num_steps` {how}, and DeepSpeed's warmup schedules need at \
         least one step (DeepSpeed raises \"warmup_num_steps must be a positive integer\"): set \
         warmup_steps or warmup_ratio in the job, or leave the scheduler section out to use \
         lr_scheduler_type"
    )
}

fn is_auto(v: &Value) -> bool {
    v.as_str() == Some("auto")
}

#[cfg(test)]
mod tests;
