//! ZeRO on two ranks over the real TCP ring, each rank with its own rows of the fixture batch.
//! Stage 1 (`zero_stage: 1`): each rank keeps optimizer state for its part only, and the
//! weights, the saved moments and (under mixed precision) the saved f32 master weights equal
//! the unsharded run's bit for bit, f32 and bf16. Stage 2 also keeps the gradient sum of its
//! part only (each micro-batch is reduced into the owner): bit for bit too without clipping
//! and with one micro-batch (the same two sums, one addition), close with clipping (the norm
//! is the ranks' sums of squares added) and with two micro-batches (summed in another order).

mod common;

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device};
use common::{batch, load_step, resized_model, rows, torch_adam, weight_bits};
use herd_kernels::FusedOnCpu;
use herd_worker::collective::TcpRing;
use herd_worker::data::Batch;
use herd_worker::trainer::engine::Engine;

/// What a rank ends with after three steps.
struct Ended {
    /// Every parameter's weights, as bits of their f32 values.
    weights: Vec<Vec<u32>>,
    /// Rank 0: the optimizer as a checkpoint would save it, (exp_avg, exp_avg_sq) bits.
    saved_moments: Option<Vec<(Vec<u32>, Vec<u32>)>>,
    /// Rank 0 under mixed precision: the saved f32 master weights.
    saved_master: Option<Vec<Vec<u32>>>,
    /// Bytes of optimizer state the rank holds (before the save gathered them).
    held: usize,
    /// Bytes of gradient sum the rank holds.
    gradient: usize,
    /// The parameters this rank updates (ZeRO-1), or None.
    owned: Option<std::ops::Range<usize>>,
    /// The gradient norm of each step.
    norms: Vec<f64>,
}

#[derive(Clone, Copy)]
struct Setup {
    stage: u8,
    bf16: bool,
    max_grad_norm: f64,
    /// Micro-batches per step: 1 (a rank's two rows at once) or 2 (one row each).
    micro: usize,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn from_bits(v: &[u32]) -> Vec<f32> {
    v.iter().map(|&x| f32::from_bits(x)).collect()
}

fn run(s: Setup) -> Vec<Ended> {
    let listeners: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                let _fused = s.bf16.then(FusedOnCpu::enable);
                let mut ring =
                    TcpRing::with_listener(rank, l, peers, b"zero", Duration::from_secs(30))
                        .unwrap();
                let step = load_step();
                let adam = torch_adam(0.1);
                let mut e = Engine::new(resized_model(&step), adam, s.max_grad_norm);
                if s.stage >= 1 {
                    e.shard_optimizer(rank, 2).unwrap();
                }
                if s.stage >= 2 {
                    e.shard_gradients().unwrap();
                }
                // Several buckets per part (the fixture's parameters are small).
                e.bucket_elems = 3000;
                if s.bf16 {
                    e.place(&Device::Cpu, DType::BF16).unwrap();
                }
                let all = batch(&step);
                assert_eq!(all.batch, 4, "the fixture's batch: two rows per rank");
                let micro_batches: Vec<Batch> = match s.micro {
                    1 => vec![rows(&all, 2 * rank..2 * rank + 2)],
                    _ => (0..2)
                        .map(|m| rows(&all, 2 * rank + m..2 * rank + m + 1))
                        .collect(),
                };
                let mut norms = vec![];
                for k in 0..3 {
                    e.zero_grad().unwrap();
                    for (m, b) in micro_batches.iter().enumerate() {
                        if m > 0 {
                            e.reduce_micro_batch(&mut ring).unwrap();
                        }
                        e.accumulate(b).unwrap();
                    }
                    let stats = e.apply(&mut ring, 1e-3 * (k + 1) as f64).unwrap();
                    norms.push(stats.grad_norm);
                }
                let held = e.optimizer_state_bytes();
                let gradient = e.gradient_bytes();
                let master = e.master_model(&mut ring).unwrap();
                let opt = e.optimizer_to_save(&mut ring).unwrap();
                let weights = weight_bits(&e.model);
                let saved_master = master.filter(|_| rank == 0).map(|m| {
                    m.trainable()
                        .iter()
                        .map(|(_, v)| {
                            bits(&v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                        })
                        .collect()
                });
                let saved_moments = (rank == 0).then(|| {
                    opt.states
                        .iter()
                        .map(|s| (bits(&s.exp_avg), bits(&s.exp_avg_sq)))
                        .collect()
                });
                Ended {
                    weights,
                    saved_moments,
                    saved_master,
                    held,
                    gradient,
                    owned: e.shard().map(|s| s.owned()),
                    norms,
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The largest difference between two runs' f32 values given as bits.
fn max_diff(a: &[Vec<u32>], b: &[Vec<u32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            from_bits(x)
                .into_iter()
                .zip(from_bits(y))
                .map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The sharded run's ranks: `exact`ly or closely (1e-5) the plain run's weights, saved moments
/// and masters, and each rank's state (and under ZeRO-2 gradient) a part of the whole.
fn compare(s: Setup, exact: bool) {
    let plain = run(Setup { stage: 0, ..s });
    let zero = run(s);
    let n = plain[0].weights.len();
    let (a, b) = (
        zero[0].owned.clone().unwrap(),
        zero[1].owned.clone().unwrap(),
    );
    assert_eq!((a.start, a.end, b.end), (0, b.start, n), "{a:?} {b:?}");
    assert!(!a.is_empty() && !b.is_empty(), "{a:?} {b:?}");
    assert_eq!(zero[0].weights, zero[1].weights, "the ranks agree");
    let moments = plain[0].saved_moments.as_ref().unwrap();
    assert!(moments.iter().all(|(m, _)| m.iter().any(|&x| x != 0)));
    let (zm, pm) = (
        zero[0].saved_moments.as_ref().unwrap(),
        plain[0].saved_moments.as_ref().unwrap(),
    );
    let first = |m: &Vec<(Vec<u32>, Vec<u32>)>| m.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    let second = |m: &Vec<(Vec<u32>, Vec<u32>)>| m.iter().map(|x| x.1.clone()).collect::<Vec<_>>();
    if exact {
        for r in 0..2 {
            assert_eq!(zero[r].weights, plain[r].weights, "rank {r}: weights");
        }
        assert_eq!(zm, pm, "the saved moments");
        assert_eq!(zero[0].saved_master, plain[0].saved_master, "the masters");
    } else {
        // bf16 weights may round the other way; the f32 masters carry the comparison then.
        if !s.bf16 {
            let d = max_diff(&zero[0].weights, &plain[0].weights);
            assert!(d <= 1e-5, "weights differ by {d}");
        }
        let d = max_diff(&first(zm), &first(pm));
        assert!(d <= 1e-6, "exp_avg differs by {d}");
        let d = max_diff(&second(zm), &second(pm));
        assert!(d <= 1e-8, "exp_avg_sq differs by {d}");
    }
    if s.bf16 {
        let (zs, ps) = (
            zero[0].saved_master.as_ref(),
            plain[0].saved_master.as_ref(),
        );
        let d = max_diff(zs.unwrap(), ps.unwrap());
        assert!(d <= 1e-5, "the masters differ by {d}");
    }
    for (z, p) in zero[0].norms.iter().zip(&plain[0].norms) {
        assert!(*p > 0.0 && (z - p).abs() <= 1e-5 * p, "norms {z} vs {p}");
    }
    assert_eq!(zero[0].norms, zero[1].norms, "the ranks agree on the norm");
    // Each rank holds its part's state only: the two parts add up to the whole (up to the
    // word that packs two low halves where a part has an odd length).
    let whole = plain[0].held;
    let parts = zero[0].held + zero[1].held;
    assert!(
        zero[0].held < whole && zero[1].held < whole,
        "{whole} {parts}"
    );
    assert!(parts.abs_diff(whole) <= 8, "{whole} vs {parts}");
    let whole = plain[0].gradient;
    let parts = zero[0].gradient + zero[1].gradient;
    if s.stage >= 2 {
        assert!(whole > 0, "the plain run holds a gradient sum");
        assert_eq!(
            parts, whole,
            "ZeRO-2: the gradient sums are parts of the whole"
        );
    } else {
        assert_eq!(
            zero[0].gradient, whole,
            "ZeRO-1 keeps the whole gradient sum"
        );
    }
}

const PLAIN: Setup = Setup {
    stage: 1,
    bf16: false,
    max_grad_norm: 1.0,
    micro: 1,
};

#[test]
fn zero1_equals_the_unsharded_step_bit_for_bit_in_f32() {
    compare(PLAIN, true);
}

#[test]
fn zero1_equals_the_unsharded_step_bit_for_bit_in_bf16() {
    compare(
        Setup {
            bf16: true,
            ..PLAIN
        },
        true,
    );
}

const ZERO2: Setup = Setup {
    stage: 2,
    max_grad_norm: 0.0,
    ..PLAIN
};

#[test]
fn zero2_without_clipping_equals_the_unsharded_step_bit_for_bit_in_f32() {
    compare(ZERO2, true);
}

#[test]
fn zero2_without_clipping_equals_the_unsharded_step_bit_for_bit_in_bf16() {
    compare(
        Setup {
            bf16: true,
            ..ZERO2
        },
        true,
    );
}

#[test]
fn zero2_with_clipping_and_two_micro_batches_is_close_in_f32() {
    let s = Setup {
        max_grad_norm: 1.0,
        micro: 2,
        ..ZERO2
    };
    compare(s, false);
}

#[test]
fn zero2_with_clipping_and_two_micro_batches_is_close_in_bf16() {
    let s = Setup {
        bf16: true,
        max_grad_norm: 1.0,
        micro: 2,
        ..ZERO2
    };
    compare(s, false);
}

#[test]
fn sharding_after_the_mixed_state_is_built_is_refused() {
    let _fused = FusedOnCpu::enable();
    let step = load_step();
    let adam = torch_adam(0.0);
    let mut e = Engine::new(resized_model(&step), adam, 1.0);
    e.place(&Device::Cpu, DType::BF16).unwrap();
    let err = e.shard_optimizer(0, 2).unwrap_err().to_string();
    assert!(err.contains("zero_stage"), "{err}");
    assert!(e.shard().is_none());
    let err = e.shard_gradients().unwrap_err().to_string();
    assert!(err.contains("zero_stage"), "{err}");
}
