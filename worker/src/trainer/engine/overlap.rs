//! The gradient sum across ranks overlapped with the backward, as PyTorch's DDP does it: the
//! parameters are cut into buckets of at least `ddp_bucket_cap_mb` from the last layer down
//! ([`bucket_plan`], a pure function of the parameter sizes), and in a step's last micro-batch
//! each bucket is summed across ranks on a thread of its own as soon as the backward has made
//! all of its gradients final, while the layers below are still in backward.
//!
//! Every rank sends the same buckets in the same order (the plan's, whatever order its own
//! gradients became final in; a rank with nothing to compute sends them all at the end), so the
//! collective's calls match across ranks and its fixed reduction order holds per bucket: runs
//! repeat bit for bit. On two ranks a sum has one order anyway, so the bits equal one sum over
//! the whole buffer. Only CPU ranks training in f32 overlap (their sum is the host buffer);
//! mixed precision and ZeRO-2 keep their own reduces after the backward.

use std::ops::Range;
use std::sync::mpsc;

use super::Engine;
use super::Trainable;
use crate::collective::Collective;
use crate::{Error, Result};

/// DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_CAP_MB: u64 = 25;

/// f32 elements in a bucket of `mb` MiB.
pub fn bucket_elems(mb: u64) -> usize {
    (mb as usize).saturating_mul(1 << 20) / 4
}

/// Buckets of whole parameters (index ranges into the parameter list), in the order they are
/// sent: from the last parameter down, each bucket growing until it holds at least `cap`
/// elements (the first one reached, the last parameters, may hold fewer only if it is all).
pub fn bucket_plan(sizes: &[usize], cap: usize) -> Vec<Range<usize>> {
    let mut plan = Vec::new();
    let mut end = sizes.len();
    let mut filled = 0usize;
    for i in (0..sizes.len()).rev() {
        filled += sizes[i];
        if filled >= cap.max(1) {
            plan.push(i..end);
            end = i;
            filled = 0;
        }
    }
    if end > 0 {
        plan.push(0..end);
    }
    plan
}

/// A bucket on its way: its index in the plan and its values.
type Bucket = (usize, Vec<f32>);

/// The trainer's side of an overlapped micro-batch: buckets go to the reducing thread and come
/// back summed, and each is copied into the gradient buffer as it returns, so at most the
/// buckets in flight exist twice.
pub(super) struct Overlap {
    plan: Vec<Range<usize>>,
    /// The next bucket of the plan to send.
    next: usize,
    /// None once the reducing thread has stopped (its error comes from the join).
    tx: Option<mpsc::Sender<Bucket>>,
    /// The summed buckets, back from the reducing thread.
    done: mpsc::Receiver<Bucket>,
    /// How many came back.
    returned: usize,
}

impl Overlap {
    /// Takes back the buckets summed so far, then sends, in plan order, each bucket whose
    /// parameters are all `folded` into `grad`.
    pub(super) fn send_ready(&mut self, folded: &[bool], grad: &mut [f32], offsets: &[usize]) {
        while let Ok(bucket) = self.done.try_recv() {
            self.take_back(bucket, grad, offsets);
        }
        while let Some(r) = self.plan.get(self.next) {
            if !r.clone().all(|i| folded[i]) {
                break;
            }
            self.send_next(grad, offsets);
        }
    }

    /// Sends every bucket not sent yet (unless the micro-batch failed: `send_rest` false),
    /// closes the channel and takes back what the reducing thread sends until it ends. Returns
    /// whether every bucket came back.
    fn finish(mut self, send_rest: bool, grad: &mut [f32], offsets: &[usize]) -> bool {
        while send_rest && self.next < self.plan.len() {
            self.send_next(grad, offsets);
        }
        self.tx = None;
        while let Ok(bucket) = self.done.recv() {
            self.take_back(bucket, grad, offsets);
        }
        self.returned == self.plan.len()
    }

    fn send_next(&mut self, grad: &[f32], offsets: &[usize]) {
        let k = self.next;
        let r = &self.plan[k];
        self.next += 1;
        let values = grad[offsets[r.start]..offsets[r.end]].to_vec();
        if let Some(tx) = &self.tx {
            if tx.send((k, values)).is_err() {
                self.tx = None;
            }
        }
    }

    fn take_back(&mut self, (k, values): Bucket, grad: &mut [f32], offsets: &[usize]) {
        let r = &self.plan[k];
        grad[offsets[r.start]..offsets[r.end]].copy_from_slice(&values);
        self.returned += 1;
    }
}

impl<M: Trainable> Engine<M> {
    /// Whether this engine sums its gradient buffer across `world` ranks bucket by bucket during
    /// the backward (a CPU rank in f32, not ZeRO-2, several ranks). GPU ranks are never in
    /// f32 (they train in mixed precision), and their collective must not be driven from a
    /// thread that has no CUDA context.
    fn overlaps(&self, world: usize) -> bool {
        world > 1 && self.mixed.is_none() && !self.reduce_to_owner && self.device.is_cpu()
    }

    /// Runs `f` (a step's last micro-batch: its forward and backward) with the gradient sum
    /// across ranks overlapped with the backward; once `f` is done the buffer holds the sum
    /// and [`Engine::apply`] does not sum it again. Without overlap (see `overlaps`) it is `f`.
    pub fn overlapped<T>(
        &mut self,
        collective: &mut dyn Collective,
        f: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        if !self.overlaps(collective.world_size()) {
            return f(self);
        }
        let sizes: Vec<usize> = self.offsets.windows(2).map(|w| w[1] - w[0]).collect();
        let plan = bucket_plan(&sizes, self.ddp_bucket_elems);
        let buckets = plan.len();
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Bucket>();
            let (done_tx, done) = mpsc::channel::<Bucket>();
            let reducer = std::thread::Builder::new()
                .name("grad-reduce".into())
                .spawn_scoped(s, move || -> Result<()> {
                    for (k, mut values) in rx {
                        collective.all_reduce_sum(&mut values)?;
                        if done_tx.send((k, values)).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| Error::Collective {
                    backend: "overlap",
                    reason: format!("cannot start the gradient-reduce thread: {e}"),
                })?;
            self.overlap = Some(Overlap {
                plan,
                next: 0,
                tx: Some(tx),
                done,
                returned: 0,
            });
            let out = f(self);
            let backward_done = std::time::Instant::now();
            let all_back = match self.overlap.take() {
                Some(o) => o.finish(out.is_ok(), &mut self.grad, &self.offsets),
                None => false,
            };
            match reducer.join() {
                Ok(r) => r?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
            let out = out?;
            if !all_back {
                return Err(Error::Collective {
                    backend: "overlap",
                    reason: "the gradient-reduce thread ended before every bucket was summed"
                        .into(),
                });
            }
            self.grad_reduced = true;
            let waited_ms = (backward_done.elapsed().as_secs_f64() * 1e4).round() / 10.0;
            tracing::debug!(
                waited_ms,
                buckets,
                "gradient sum overlapped with the backward: waited after it"
            );
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_whole_parameters_from_the_last_down() {
        // sizes 5 3 3 4, cap 6: 4+3 = 7 is the first bucket, 3+5 = 8 the second
        assert_eq!(bucket_plan(&[5, 3, 3, 4], 6), vec![2..4, 0..2]);
        // a parameter over the cap is a bucket alone
        assert_eq!(bucket_plan(&[2, 10, 1], 4), vec![1..3, 0..1]);
        // the last bucket reached takes what is left, however small
        assert_eq!(bucket_plan(&[1, 8], 4), vec![1..2, 0..1]);
        // a cap over the total: one bucket, sent when the whole backward is done
        assert_eq!(bucket_plan(&[5, 3, 3, 4], 100), vec![0..4]);
        assert_eq!(bucket_plan(&[], 4), Vec::<Range<usize>>::new());
        // a cap of 0 counts as 1: one bucket per parameter
        assert_eq!(bucket_plan(&[1, 1], 0), vec![1..2, 0..1]);
    }

    #[test]
    fn every_parameter_is_in_exactly_one_bucket() {
        let sizes: Vec<usize> = (0..50).map(|i| (i * 7919) % 23 + 1).collect();
        for cap in [1, 5, 20, 64, 1000] {
            let plan = bucket_plan(&sizes, cap);
            let mut seen = vec![0; sizes.len()];
            for r in &plan {
                r.clone().for_each(|i| seen[i] += 1);
            }
            assert!(seen.iter().all(|&n| n == 1), "cap {cap}: {plan:?}");
            // every bucket but the last reached holds at least the cap
            for r in &plan[..plan.len() - 1] {
                assert!(
                    sizes[r.clone()].iter().sum::<usize>() >= cap,
                    "cap {cap}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn buckets_go_out_in_plan_order_once_all_their_parameters_are_final() {
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let offsets = [0, 1, 3, 6, 10]; // sizes 1 2 3 4
        let mut grad: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let mut o = Overlap {
            plan: bucket_plan(&[1, 2, 3, 4], 4), // [3..4, 1..3, 0..1]
            next: 0,
            tx: Some(tx),
            done,
            returned: 0,
        };
        // the middle bucket is final before the last one: nothing may overtake the plan
        o.send_ready(&[false, true, true, false], &mut grad, &offsets);
        assert!(rx.try_recv().is_err());
        o.send_ready(&[false, true, true, true], &mut grad, &offsets);
        assert_eq!(rx.try_recv().unwrap(), (0, vec![6.0, 7.0, 8.0, 9.0]));
        assert_eq!(rx.try_recv().unwrap(), (1, vec![1.0, 2.0, 3.0, 4.0, 5.0]));
        assert!(rx.try_recv().is_err());
        // a summed bucket is copied in at the next chance
        done_tx.send((0, vec![-6.0, -7.0, -8.0, -9.0])).unwrap();
        o.send_ready(&[false, true, true, true], &mut grad, &offsets);
        assert_eq!(&grad[6..], &[-6.0, -7.0, -8.0, -9.0]);
        // the rest goes out at the end, and what comes back before the thread ends is taken
        done_tx.send((1, vec![-1.0; 5])).unwrap();
        done_tx.send((2, vec![-0.5])).unwrap();
        drop(done_tx);
        assert!(o.finish(true, &mut grad, &offsets));
        assert_eq!(rx.try_recv().unwrap(), (2, vec![0.0]));
        assert_eq!(grad[..6], [-0.5, -1.0, -1.0, -1.0, -1.0, -1.0]);
    }

    #[test]
    fn a_bucket_that_never_comes_back_is_noticed() {
        let (tx, _rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel::<Bucket>();
        drop(done_tx); // the reducing thread ended early (its error comes from the join)
        let o = Overlap {
            plan: bucket_plan(&[1], 1),
            next: 0,
            tx: Some(tx),
            done,
            returned: 0,
        };
        assert!(!o.finish(true, &mut [1.0], &[0, 1]));
    }
}
