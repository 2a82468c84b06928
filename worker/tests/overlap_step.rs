//! The gradient sum overlapped with the backward (`Engine::overlapped`, DDP's buckets) over the
//! real TCP ring, each rank with its own rows of the parity fixture's batch. On two ranks the
//! steps equal the sum taken after the backward bit for bit (a two-way sum has one order), with
//! one micro-batch or two; on three ranks, one of them without rows (it sends every bucket at
//! the end), they are within f32 rounding of it and repeat bit for bit. The buckets are the
//! plan's, summed on the reducing thread, last layer first.

// The micro-batch closures return the engine's own Result, whose error is large by design.
#![allow(clippy::result_large_err)]

mod common;

use std::net::TcpListener;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{batch, load_step, resized_model, rows, torch_adam, weight_bits};
use herd_worker::collective::{Collective, TcpRing};
use herd_worker::data::Batch;
use herd_worker::trainer::engine::Engine;

/// The real ring, noting each all-reduce's calling thread and length.
struct Noted {
    ring: TcpRing,
    calls: Arc<Mutex<Vec<(String, usize)>>>,
}

impl Collective for Noted {
    fn rank(&self) -> usize {
        self.ring.rank()
    }
    fn world_size(&self) -> usize {
        self.ring.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> herd_worker::Result<()> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.calls.lock().unwrap().push((thread, buf.len()));
        self.ring.all_reduce_sum(buf)
    }
    fn name(&self) -> &'static str {
        "noted tcp-ring"
    }
}

/// What a rank ends with after three steps.
#[derive(Debug, PartialEq)]
struct Ended {
    /// Every parameter's weights, as bits of their f32 values.
    weights: Vec<Vec<u32>>,
    /// Each step's (loss, gradient norm), as bits.
    stats: Vec<(u64, u64)>,
    /// The all-reduces of the last step: (thread, length).
    calls: Vec<(String, usize)>,
}

/// `micro[rank]`: each rank's micro-batches (row ranges; an empty range: no rows, as a rank
/// past the end of the data). `bucket`: elements per overlapped bucket, or None for the sum
/// after the backward.
fn run(micro: &[Vec<Range<usize>>], bucket: Option<usize>) -> Vec<Ended> {
    let world = micro.len();
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let threads: Vec<_> = listeners
        .into_iter()
        .zip(micro.to_vec())
        .enumerate()
        .map(|(rank, (l, mine))| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let ring = TcpRing::with_listener(rank, l, peers, b"ovl", Duration::from_secs(30))
                    .unwrap();
                let calls = Arc::new(Mutex::new(vec![]));
                let mut ring = Noted {
                    ring,
                    calls: calls.clone(),
                };
                let step = load_step();
                let mut e = Engine::new(resized_model(&step), torch_adam(0.1), 1.0);
                if let Some(b) = bucket {
                    e.ddp_bucket_elems = b;
                }
                let all = batch(&step);
                let batches: Vec<Batch> = mine.iter().map(|r| rows(&all, r.clone())).collect();
                let mut stats = vec![];
                for k in 0..3 {
                    calls.lock().unwrap().clear();
                    e.zero_grad().unwrap();
                    for (m, b) in batches.iter().enumerate() {
                        let empty = b.batch == 0; // a rank past the end of the data
                        if bucket.is_some() && m + 1 == batches.len() {
                            e.overlapped(&mut ring, |e| match empty {
                                true => Ok((0.0, 0)),
                                false => e.accumulate(b),
                            })
                            .unwrap();
                        } else if !empty {
                            e.accumulate(b).unwrap();
                        }
                    }
                    let s = e.apply(&mut ring, 1e-3 * (k + 1) as f64).unwrap();
                    stats.push((s.loss.to_bits(), s.grad_norm.to_bits()));
                }
                let weights = weight_bits(&e.model);
                let calls = calls.lock().unwrap().clone();
                Ended {
                    weights,
                    stats,
                    calls,
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Elements of each trainable parameter of the fixture's model.
fn sizes() -> Vec<usize> {
    let m = resized_model(&load_step());
    m.trainable().iter().map(|(_, v)| v.elem_count()).collect()
}

const BUCKET: usize = 3000;

/// The overlapped step's calls: the plan's buckets on the reducing thread, last parameters
/// first, then the step's totals (loss, tokens, …) on the trainer's thread.
fn assert_bucketed(calls: &[(String, usize)]) {
    let plan = herd_worker::trainer::engine::bucket_plan(&sizes(), BUCKET);
    assert!(
        plan.len() > 3,
        "the fixture is cut into several buckets: {plan:?}"
    );
    let sizes = sizes();
    let want: Vec<usize> = plan.iter().map(|r| sizes[r.clone()].iter().sum()).collect();
    let (buckets, totals) = calls.split_at(calls.len() - 1);
    let got: Vec<usize> = buckets.iter().map(|c| c.1).collect();
    assert_eq!(got, want, "bucket lengths in plan order");
    assert!(buckets.iter().all(|c| c.0 == "grad-reduce"), "{buckets:?}");
    assert_ne!(totals[0].0, "grad-reduce", "the totals are the trainer's");
}

#[test]
fn two_ranks_overlapped_equal_the_sum_after_the_backward_bit_for_bit() {
    for micro in [
        vec![vec![0..2], vec![2..4]],             // one micro-batch each
        vec![vec![0..1, 1..2], vec![2..3, 3..4]], // two: the first one's sum rides along
    ] {
        let after = run(&micro, None);
        let overlapped = run(&micro, Some(BUCKET));
        for r in 0..2 {
            assert_eq!(
                overlapped[r].weights, after[r].weights,
                "rank {r}: {micro:?}"
            );
            assert_eq!(overlapped[r].stats, after[r].stats, "rank {r}: {micro:?}");
            assert_bucketed(&overlapped[r].calls);
            assert_eq!(after[r].calls.len(), 2, "one gradient sum and the totals");
        }
    }
}

#[test]
fn three_ranks_overlapped_are_close_and_repeat_bit_for_bit() {
    // rank 2 has no rows: it computes nothing and sends every bucket when its turn ends
    let micro = vec![vec![0..2], vec![2..4], vec![4..4]];
    let after = run(&micro, None);
    let overlapped = run(&micro, Some(BUCKET));
    let again = run(&micro, Some(BUCKET));
    assert_eq!(
        overlapped, again,
        "the same buckets in the same order: the same bits"
    );
    for r in 0..3 {
        assert_bucketed(&overlapped[r].calls);
        assert_eq!(
            overlapped[r].weights, overlapped[0].weights,
            "rank {r} agrees"
        );
        for (p, (a, b)) in overlapped[r]
            .weights
            .iter()
            .zip(&after[r].weights)
            .enumerate()
        {
            for (x, y) in a.iter().zip(b) {
                let (x, y) = (f32::from_bits(*x), f32::from_bits(*y));
                assert!(
                    (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                    "param {p}: {x} vs {y}"
                );
            }
        }
        let (o, a) = (&overlapped[r].stats, &after[r].stats);
        assert_eq!(o[0].0, a[0].0, "the first loss is not in the buckets");
        for ((l1, n1), (l2, n2)) in o.iter().zip(a) {
            let (l1, l2) = (f64::from_bits(*l1), f64::from_bits(*l2));
            assert!((l1 - l2).abs() <= 1e-6 * l2, "loss {l1} vs {l2}");
            let (n1, n2) = (f64::from_bits(*n1), f64::from_bits(*n2));
            assert!((n1 - n2).abs() <= 1e-6 * n2, "norm {n1} vs {n2}");
        }
    }
}
