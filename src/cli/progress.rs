//! The progress bar of a training run: step/total, loss, lr, tokens/s, ETA. Log entries are
//! printed above it as HF prints them (one dict per logging step).

use herd_worker::trainer::{Event, Observer};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    tokens_per_sec: f64,
}

impl Progress {
    pub fn new(show_bar: bool) -> Self {
        let bar = show_bar.then(|| {
            let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            pb
        });
        Progress {
            bar,
            tokens_per_sec: 0.0,
        }
    }

    /// Leave the bar where a paused run stopped it, so the lines after it start on their own
    /// (an exit with the signal's code runs no destructor that would).
    pub fn leave(&self) {
        if let Some(pb) = self.bar.as_ref().filter(|pb| !pb.is_finished()) {
            pb.abandon();
        }
    }

    fn println(&self, line: String) {
        match &self.bar {
            Some(pb) => pb.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn event(&mut self, e: &Event) {
        match e {
            Event::Started {
                start_step,
                total_steps,
                examples,
                skipped_records,
                parameters,
                resumed_from,
                changed_since_checkpoint,
                added_tokens,
            } => {
                let mut line = format!(
                    "training {parameters} parameters on {examples} examples for {total_steps} steps"
                );
                if *skipped_records > 0 {
                    line.push_str(&format!(" ({skipped_records} malformed records skipped)"));
                }
                if *added_tokens > 0 {
                    line.push_str(&format!(
                        "; added {added_tokens} special token(s) to the tokenizer"
                    ));
                }
                if let Some(d) = resumed_from {
                    line.push_str(&format!(
                        "; resumed at step {start_step} from {}",
                        d.display()
                    ));
                }
                self.println(line);
                if !changed_since_checkpoint.is_empty() {
                    self.println(herd_worker::trainer::resume::changed_line(
                        changed_since_checkpoint,
                    ));
                }
                if let Some(pb) = &self.bar {
                    pb.set_length(*total_steps);
                    pb.set_position(*start_step);
                    pb.reset_eta();
                }
            }
            Event::Step {
                step,
                stats,
                tokens_per_sec,
                ..
            } => {
                // Smooth tokens/s over steps so the display is readable.
                self.tokens_per_sec = if self.tokens_per_sec == 0.0 {
                    *tokens_per_sec
                } else {
                    0.8 * self.tokens_per_sec + 0.2 * tokens_per_sec
                };
                if let Some(pb) = &self.bar {
                    pb.set_position(*step);
                    pb.set_message(format!(
                        "loss {:.4} lr {:.3e} {:.0} tok/s",
                        stats.loss, stats.learning_rate, self.tokens_per_sec
                    ));
                }
            }
            Event::Logged(entry) | Event::Evaluated(entry) => self.println(short(entry)),
            Event::Saved {
                step,
                path,
                rotated,
                best,
            } => self.println(herd_worker::trainer::saved_line(
                *step,
                path,
                rotated,
                best.as_ref(),
            )),
            Event::Finished { summary, .. } => {
                if let Some(pb) = &self.bar {
                    pb.finish_and_clear();
                }
                if !summary.is_null() {
                    eprintln!("{}", short(summary));
                }
                eprintln!("{}", herd_worker::trainer::finished_line(e));
            }
        }
    }
}

/// A log entry as HF Trainer prints it: floats to 4 significant digits (the trainer_state.json
/// keeps them whole), e.g. `{"epoch": 0.4286, "grad_norm": 1.699, "loss": 4.109, "step": 3}`.
fn short(entry: &serde_json::Value) -> String {
    let Some(map) = entry.as_object() else {
        return entry.to_string();
    };
    let fields: Vec<String> = map
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                format!("\"{k}\": {}", g4(n.as_f64().unwrap_or(f64::NAN)))
            }
            _ => format!("\"{k}\": {v}"),
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// Python's `f"{x:.4g}"`: 4 significant digits, trailing zeros dropped, an exponent outside
/// [1e-4, 1e4).
fn g4(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let exp = x.abs().log10().floor() as i32;
    if !(-4..4).contains(&exp) {
        let s = format!("{x:.3e}");
        let (mantissa, e) = s.split_once('e').unwrap_or((&s, "0"));
        let mantissa = trim_zeros(mantissa);
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    trim_zeros(&format!("{x:.*}", (3 - exp) as usize)).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_pythons_4g() {
        for (x, want) in [
            (4.10912, "4.109"),
            (0.42857142857142855, "0.4286"),
            (0.001, "0.001"),
            (1.0, "1"),
            (2.0e-5, "2e-05"),
            (1.6666e-4, "0.0001667"),
            (12345.6, "1.235e+04"),
            (1699.0, "1699"),
            (-5.12345, "-5.123"),
        ] {
            assert_eq!(g4(x), want, "{x}");
        }
        let e = serde_json::json!({"epoch": 0.42857142857142855, "loss": 4.10912, "step": 3});
        assert_eq!(short(&e), r#"{"epoch": 0.4286, "loss": 4.109, "step": 3}"#);
    }
}
