//! ZeRO-1 (`zero_stage: 1`) on two ranks over the real TCP ring: each rank keeps optimizer
//! state for its part only, and the weights, the saved moments and (under mixed precision) the
//! saved f32 master weights equal the unsharded run's bit for bit, f32 and bf16.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device};
use common::{batch, load_step, resized_model, torch_adam};
use herd_kernels::FusedOnCpu;
use herd_worker::collective::TcpRing;
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
    /// The parameters this rank updates (ZeRO-1), or None.
    owned: Option<std::ops::Range<usize>>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn run(zero: bool, bf16: bool) -> Vec<Ended> {
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
                let _fused = bf16.then(FusedOnCpu::enable);
                let mut ring =
                    TcpRing::with_listener(rank, l, peers, b"zero", Duration::from_secs(30))
                        .unwrap();
                let step = load_step();
                let adam = torch_adam(0.1);
                let mut e = Engine::new(resized_model(&step), adam, 1.0);
                if zero {
                    e.shard_optimizer(rank, 2).unwrap();
                }
                if bf16 {
                    e.place(&Device::Cpu, DType::BF16).unwrap();
                }
                let batch = batch(&step);
                for s in 0..3 {
                    e.zero_grad().unwrap();
                    e.accumulate(&batch).unwrap();
                    e.apply(&mut ring, 1e-3 * (s + 1) as f64).unwrap();
                }
                let held = e.optimizer_state_bytes();
                let master = e.master_model(&mut ring).unwrap();
                let opt = e.optimizer_to_save(&mut ring).unwrap();
                let weights = e
                    .model
                    .trainable()
                    .iter()
                    .map(|(_, v)| {
                        let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                        bits(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                    })
                    .collect();
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
                    owned: e.shard().map(|s| s.owned()),
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn check(bf16: bool) {
    let plain = run(false, bf16);
    let zero = run(true, bf16);
    let n = plain[0].weights.len();
    let (a, b) = (
        zero[0].owned.clone().unwrap(),
        zero[1].owned.clone().unwrap(),
    );
    assert_eq!((a.start, a.end, b.end), (0, b.start, n), "{a:?} {b:?}");
    assert!(!a.is_empty() && !b.is_empty(), "{a:?} {b:?}");
    for r in 0..2 {
        assert_eq!(zero[r].weights, plain[r].weights, "rank {r}: weights");
    }
    assert_eq!(zero[0].weights, zero[1].weights, "the ranks agree");
    assert_eq!(
        zero[0].saved_moments, plain[0].saved_moments,
        "the saved moments"
    );
    let moments = plain[0].saved_moments.as_ref().unwrap();
    assert!(moments.iter().all(|(m, _)| m.iter().any(|&x| x != 0)));
    if bf16 {
        assert!(plain[0].saved_master.is_some());
        assert_eq!(zero[0].saved_master, plain[0].saved_master, "the masters");
    }
    // Each rank holds its part's state only: the two parts add up to the whole (up to the
    // word that packs two low halves where a part has an odd length).
    let whole = plain[0].held;
    let parts = zero[0].held + zero[1].held;
    assert!(
        zero[0].held < whole && zero[1].held < whole,
        "{whole} {parts}"
    );
    assert!(parts.abs_diff(whole) <= 8, "{whole} vs {parts}");
}

#[test]
fn zero1_equals_the_unsharded_step_bit_for_bit_in_f32() {
    check(false);
}

#[test]
fn zero1_equals_the_unsharded_step_bit_for_bit_in_bf16() {
    check(true);
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
}
