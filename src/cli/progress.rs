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
            Event::Logged(entry) | Event::Evaluated(entry) => self.println(entry.to_string()),
            Event::Saved {
                step,
                path,
                rotated,
            } => {
                let mut line = format!("saved checkpoint-{step} at {}", path.display());
                if !rotated.is_empty() {
                    line.push_str(&format!(" (removed {rotated:?} per save_total_limit)"));
                }
                self.println(line);
            }
            Event::Finished {
                output_dir,
                train_loss,
                runtime_s,
            } => {
                if let Some(pb) = &self.bar {
                    pb.finish_and_clear();
                }
                eprintln!(
                    "done in {runtime_s:.1}s, mean logged loss {train_loss:.4}; final model in {}",
                    output_dir.display()
                );
            }
        }
    }
}
