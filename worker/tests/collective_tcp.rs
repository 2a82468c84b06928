//! The TCP ring collective over real sockets on 127.0.0.1, one thread per rank: exact sums,
//! identical bits on every rank and every run, authentication, and failures that end in an
//! error (never a hang). Aborts from another thread are in collective_tcp_abort.rs.

mod ring_util;

use herd_worker::collective::{Collective, SingleProcess, TcpRing};
use ring_util::*;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Integer-valued inputs: every summation order gives the exact answer.
fn int_input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((rank * 7919 + i * 31) % 2003) as f32 - 1000.0)
        .collect()
}

/// Awkward non-integer inputs (mixed magnitudes): order matters for the bits.
fn float_input(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed ^ (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let m = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let e = ((x >> 8) % 20) as i32 - 10;
            m * 2f32.powi(e)
        })
        .collect()
}

fn reduce_all(
    n: usize,
    len: usize,
    bucket_bytes: Option<usize>,
    input: fn(usize, usize) -> Vec<f32>,
) -> Vec<Vec<f32>> {
    run_ring(
        n,
        same_secret(n),
        Duration::from_secs(10),
        move |rank, ring| {
            let mut ring = ring.unwrap();
            assert_eq!(ring.rank(), rank);
            assert_eq!(ring.world_size(), n);
            assert_eq!(ring.name(), "tcp-ring");
            if let Some(b) = bucket_bytes {
                ring.set_bucket_bytes(b);
            }
            let mut buf = input(rank, len);
            ring.all_reduce_sum(&mut buf).unwrap();
            buf
        },
    )
}

/// The sum over ranks computed in f64 (exact for the integer inputs).
fn exact_sum(n: usize, len: usize, input: fn(usize, usize) -> Vec<f32>) -> Vec<f32> {
    let mut acc = vec![0f64; len];
    for r in 0..n {
        for (a, x) in acc.iter_mut().zip(input(r, len)) {
            *a += x as f64;
        }
    }
    acc.into_iter().map(|a| a as f32).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn sums_are_exact_for_many_world_sizes_and_lengths() {
    // Lengths: empty, one, smaller than N, not divisible by N, many small buckets.
    for n in 1..=5 {
        for &(len, bucket) in &[
            (0, None),
            (1, None),
            (3, None),
            (7, None),
            (1001, None),
            (1001, Some(64)),
            (997, Some(40)),
        ] {
            let got = reduce_all(n, len, bucket, int_input);
            let want = exact_sum(n, len, int_input);
            for (rank, g) in got.iter().enumerate() {
                assert_eq!(
                    g, &want,
                    "world {n}, len {len}, bucket {bucket:?}, rank {rank}"
                );
            }
        }
    }
}

#[test]
fn several_default_buckets() {
    // 4 MiB buckets = 1Mi f32; 2.3 buckets with a ragged tail.
    let len = (1 << 20) * 2 + 300_001;
    let got = reduce_all(3, len, None, int_input);
    let want = exact_sum(3, len, int_input);
    for g in &got {
        assert!(g == &want);
    }
}

#[test]
fn identical_bits_on_every_rank_and_every_run() {
    for n in [2, 3, 4, 5] {
        for &(len, bucket) in &[(4, None), (1003, Some(256)), (50_001, None)] {
            let first = reduce_all(n, len, bucket, |r, l| float_input(r, l, 42));
            for rank in 1..n {
                assert_eq!(
                    bits(&first[0]),
                    bits(&first[rank]),
                    "world {n} len {len}: rank {rank} differs"
                );
            }
            // Close to the exact sum (only rounding differs).
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| float_input(r, len, 42)).collect();
            for i in 0..len {
                let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                let scale: f64 = inputs.iter().map(|v| (v[i] as f64).abs()).sum();
                assert!(
                    (first[0][i] as f64 - exact).abs() <= scale * 1e-6 + 1e-30,
                    "elem {i}"
                );
            }
            // A fresh ring gives the same bits.
            let again = reduce_all(n, len, bucket, |r, l| float_input(r, l, 42));
            assert_eq!(
                bits(&first[0]),
                bits(&again[0]),
                "world {n} len {len}: rerun differs"
            );
        }
    }
}

#[test]
fn repeated_calls_on_one_ring_are_identical() {
    let n = 4;
    let out = run_ring(
        n,
        same_secret(n),
        Duration::from_secs(10),
        move |rank, ring| {
            let mut ring = ring.unwrap();
            ring.set_bucket_bytes(1 << 12);
            let mut results = Vec::new();
            for len in [10_007usize, 10_007, 3, 10_007] {
                let mut buf = float_input(rank, len, 7);
                ring.all_reduce_sum(&mut buf).unwrap();
                results.push(bits(&buf));
            }
            results
        },
    );
    for r in &out {
        assert_eq!(r, &out[0]);
        assert_eq!(r[0], r[1]);
        assert_eq!(r[0], r[3]);
    }
}

#[test]
fn world_size_one_is_a_no_op() {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut ring = TcpRing::connect(0, vec![addr], SECRET, Duration::from_secs(1)).unwrap();
    let mut buf = vec![1.5f32, -2.0, 3.25];
    ring.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![1.5, -2.0, 3.25]);
    assert_eq!(ring.world_size(), 1);
    let mut single = SingleProcess;
    single.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![1.5, -2.0, 3.25]);
}

#[test]
fn connect_binds_and_retries_until_peers_appear() {
    // Reserve ports, free them, and start rank 1 late: rank 0 keeps retrying.
    let (ls, addrs) = listeners(2);
    drop(ls);
    let a = addrs.clone();
    let r0 = thread::spawn(move || {
        let mut ring = TcpRing::connect(0, a, SECRET, Duration::from_secs(10)).unwrap();
        let mut buf = vec![1.0f32; 5];
        ring.all_reduce_sum(&mut buf).unwrap();
        buf
    });
    thread::sleep(Duration::from_millis(300));
    let mut ring = TcpRing::connect(1, addrs, SECRET, Duration::from_secs(10)).unwrap();
    let mut buf = vec![2.0f32; 5];
    ring.all_reduce_sum(&mut buf).unwrap();
    assert_eq!(buf, vec![3.0; 5]);
    assert_eq!(r0.join().unwrap(), vec![3.0; 5]);
}

#[test]
fn wrong_secret_is_refused() {
    for n in [2, 3] {
        let mut secrets = same_secret(n);
        secrets[1] = b"some-other-secret".to_vec();
        let t0 = Instant::now();
        let out = run_ring(n, secrets, Duration::from_secs(5), |_, ring| {
            ring.map(|_| ()).map_err(|e| e.to_string())
        });
        if n == 2 {
            assert!(
                t0.elapsed() < Duration::from_secs(4),
                "refusal took {:?}",
                t0.elapsed()
            );
        }
        // The impostor and the rank that connects to it both see the failed proof.
        for rank in [0, 1] {
            let e = out[rank]
                .as_ref()
                .expect_err("a ring with a wrong secret must not form");
            assert!(e.contains("authentication"), "rank {rank}: {e}");
        }
        // Nobody forms a ring with it.
        assert!(out.iter().all(|r| r.is_err()), "{out:?}");
    }
}

#[test]
fn world_size_mismatch_is_refused() {
    let (mut ls, addrs) = listeners(3);
    let l1 = ls.remove(1);
    let l0 = ls.remove(0);
    let two = addrs[..2].to_vec();
    let r1 = thread::spawn(move || {
        TcpRing::with_listener(1, l1, addrs, SECRET, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let e0 = TcpRing::with_listener(0, l0, two, SECRET, Duration::from_secs(2))
        .unwrap_err()
        .to_string();
    assert!(e0.contains("world size"), "{e0}");
    assert!(r1.join().unwrap().is_err());
}

#[test]
fn a_stalled_peer_gives_an_error_within_the_timeout() {
    let n = 3;
    let timeout = Duration::from_secs(1);
    let start = Arc::new(Barrier::new(n));
    let out = run_ring(n, same_secret(n), timeout, move |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![1.0f32; 200_000];
        ring.all_reduce_sum(&mut buf).unwrap();
        start.wait();
        if rank == 2 {
            // Alive (sockets open) but never takes part again.
            thread::sleep(Duration::from_secs(3));
            return Ok(Duration::ZERO);
        }
        let t0 = Instant::now();
        let r = ring.all_reduce_sum(&mut buf);
        let took = t0.elapsed();
        let e = r
            .expect_err("a stalled peer must not look like success")
            .to_string();
        // The ring stays broken.
        let again = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
        assert!(again.contains("broken"), "{again}");
        Err((e, took))
    });
    for (rank, r) in out.iter().enumerate().take(2) {
        let (e, took) = r.as_ref().unwrap_err();
        assert!(*took < timeout * 3, "rank {rank} took {took:?}");
        assert!(e.contains("rank "), "{e}");
    }
    // Rank 0 reads from rank 2: it is the one that times out, and names the peer.
    let (e0, _) = out[0].as_ref().unwrap_err();
    assert!(e0.contains("rank 2") && e0.contains("timed out"), "{e0}");
}

#[test]
fn a_peer_that_dies_mid_reduce_gives_an_error() {
    let n = 4;
    let timeout = Duration::from_secs(2);
    let start = Arc::new(Barrier::new(n));
    let out = run_ring(n, same_secret(n), timeout, move |rank, ring| {
        let mut ring = ring.unwrap();
        ring.set_bucket_bytes(1 << 16);
        let mut buf = vec![1.0f32; 3_000_000];
        ring.all_reduce_sum(&mut buf).unwrap();
        start.wait();
        if rank == 1 {
            // Let the others get going on a big reduce, then vanish (sockets closed).
            thread::sleep(Duration::from_millis(50));
            drop(ring);
            return None;
        }
        let t0 = Instant::now();
        let r = ring.all_reduce_sum(&mut buf);
        Some((r.map_err(|e| e.to_string()), t0.elapsed()))
    });
    for rank in [0, 2, 3] {
        let (r, took) = out[rank].as_ref().unwrap();
        let e = r
            .as_ref()
            .expect_err("a dead peer must not look like success");
        assert!(*took < timeout * 3, "rank {rank} took {took:?}: {e}");
        assert!(e.contains("rank "), "{e}");
    }
}

#[test]
fn mismatched_lengths_are_reported() {
    let n = 2;
    let out = run_ring(n, same_secret(n), Duration::from_secs(2), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![1.0f32; 10 + rank];
        ring.all_reduce_sum(&mut buf).map_err(|e| e.to_string())
    });
    for r in &out {
        let e = r.as_ref().unwrap_err();
        assert!(e.contains("disagrees"), "{e}");
    }
}

#[test]
fn bad_arguments_are_rejected() {
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let t = Duration::from_secs(1);
    assert!(TcpRing::connect(0, vec![], SECRET, t).is_err());
    assert!(TcpRing::connect(2, vec![a, a], SECRET, t).is_err());
    assert!(TcpRing::connect(0, vec![a], b"", t).is_err());
}

#[test]
fn a_stray_connection_does_not_break_the_ring() {
    // A leftover connection from an earlier attempt (or a stranger) reaches rank 1 before rank
    // 0 does: rank 1 drops it and keeps waiting for its real neighbour.
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.remove(1);
    let l0 = ls.remove(0);
    {
        use std::io::Write;
        let mut stray = std::net::TcpStream::connect(addrs[1]).unwrap();
        stray
            .write_all(b"not a herd peer, just some bytes")
            .unwrap();
    }
    let a1 = addrs.clone();
    let r1 = thread::spawn(move || {
        let mut ring = TcpRing::with_listener(1, l1, a1, SECRET, Duration::from_secs(5)).unwrap();
        let mut v = vec![2.0f32, 3.0];
        ring.all_reduce_sum(&mut v).unwrap();
        v
    });
    thread::sleep(Duration::from_millis(200));
    let mut ring = TcpRing::with_listener(0, l0, addrs, SECRET, Duration::from_secs(5)).unwrap();
    let mut v = vec![1.0f32, 1.0];
    ring.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, vec![3.0, 4.0]);
    assert_eq!(r1.join().unwrap(), vec![3.0, 4.0]);
}

#[test]
fn silent_connections_do_not_keep_the_neighbour_waiting() {
    // Strangers connect to rank 1's port first and send nothing, and stay connected: the real
    // neighbour is still admitted at once, well within a timeout the strangers would use up.
    let (mut ls, addrs) = listeners(2);
    let l1 = ls.remove(1);
    let l0 = ls.remove(0);
    let silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(addrs[1]).unwrap())
        .collect();
    let timeout = Duration::from_secs(3);
    let t0 = std::time::Instant::now();
    let a1 = addrs.clone();
    let r1 = thread::spawn(move || {
        let mut ring = TcpRing::with_listener(1, l1, a1, SECRET, timeout).unwrap();
        let mut v = vec![2.0f32, 3.0];
        ring.all_reduce_sum(&mut v).unwrap();
        v
    });
    let mut ring = TcpRing::with_listener(0, l0, addrs, SECRET, timeout).unwrap();
    let mut v = vec![1.0f32, 1.0];
    ring.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, vec![3.0, 4.0]);
    assert_eq!(r1.join().unwrap(), vec![3.0, 4.0]);
    assert!(t0.elapsed() < timeout, "waited {:?}", t0.elapsed());
    drop(silent);
}

/// Rank `root`'s buffer with values a sum would not keep: -0.0, a NaN payload, infinities.
fn special_input(root: usize, len: usize) -> Vec<f32> {
    let mut v = float_input(root, len, 7);
    for (i, x) in v.iter_mut().enumerate().step_by(97) {
        *x = [-0.0, f32::from_bits(0x7fc0_1234), f32::NEG_INFINITY][i % 3];
    }
    v
}

#[test]
fn broadcast_copies_the_roots_bits_to_every_rank() {
    for n in [2usize, 3, 5] {
        for len in [0usize, 1, 1000, 70_000] {
            let out = run_ring(
                n,
                same_secret(n),
                Duration::from_secs(10),
                move |rank, ring| {
                    let mut ring = ring.unwrap();
                    let mut got = vec![];
                    for root in 0..n {
                        let mut buf = if rank == root {
                            special_input(root, len)
                        } else {
                            vec![1.5; len]
                        };
                        ring.broadcast(&mut buf, root).unwrap();
                        got.push(bits(&buf));
                    }
                    // The ring still sums after broadcasts.
                    let mut sum = int_input(rank, 33);
                    ring.all_reduce_sum(&mut sum).unwrap();
                    (got, sum)
                },
            );
            for (rank, (got, sum)) in out.iter().enumerate() {
                for (root, b) in got.iter().enumerate() {
                    assert_eq!(
                        b,
                        &bits(&special_input(root, len)),
                        "world {n} len {len}: rank {rank} from root {root}"
                    );
                }
                assert_eq!(sum, &exact_sum(n, 33, int_input), "world {n}");
            }
        }
    }
}

#[test]
fn ranks_that_disagree_on_the_root_get_an_error() {
    let out = run_ring(2, same_secret(2), Duration::from_secs(5), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![0.0f32; 10];
        let bad_root = ring.broadcast(&mut buf, rank);
        let out_of_world = ring.broadcast(&mut buf, 7);
        (bad_root.map_err(|e| e.to_string()), out_of_world.is_err())
    });
    let errors: Vec<String> = out.iter().filter_map(|(r, _)| r.clone().err()).collect();
    assert!(!errors.is_empty(), "a root disagreement went unnoticed");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("disagrees") && e.contains("a broadcast from rank")),
        "{errors:?}"
    );
    assert!(out.iter().all(|(_, oow)| *oow));
}

#[test]
fn reduce_sums_into_the_root_exactly() {
    for n in [2usize, 3, 5] {
        for len in [0usize, 1, 1000, 70_000] {
            let out = run_ring(
                n,
                same_secret(n),
                Duration::from_secs(10),
                move |rank, ring| {
                    let mut ring = ring.unwrap();
                    let mut got = vec![];
                    for root in 0..n {
                        let mut buf = int_input(rank + root, len);
                        ring.reduce(&mut buf, root).unwrap();
                        got.push(buf);
                    }
                    // The ring still all-reduces after reduces.
                    let mut sum = int_input(rank, 33);
                    ring.all_reduce_sum(&mut sum).unwrap();
                    (got, sum)
                },
            );
            for (root, (got, _)) in out.iter().enumerate() {
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| int_input(r + root, len)).collect();
                let want: Vec<f32> = (0..len)
                    .map(|i| inputs.iter().map(|v| v[i]).sum())
                    .collect();
                assert_eq!(got[root], want, "world {n} len {len}: root {root}");
            }
            for (got, sum) in &out {
                assert_eq!(got.len(), n);
                assert_eq!(sum, &exact_sum(n, 33, int_input), "world {n}");
            }
        }
    }
}

#[test]
fn two_rank_reduce_has_the_all_reduce_bits() {
    // Two ranks: a + b either way round, so ZeRO-2's reduced gradient equals the all-reduced one.
    let out = run_ring(2, same_secret(2), Duration::from_secs(10), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut all = float_input(rank, 5000, 3);
        ring.all_reduce_sum(&mut all).unwrap();
        let mut into: Vec<Vec<u32>> = vec![];
        for root in 0..2 {
            let mut buf = float_input(rank, 5000, 3);
            ring.reduce(&mut buf, root).unwrap();
            into.push(bits(&buf));
        }
        (bits(&all), into)
    });
    for (root, (all, into)) in out.iter().enumerate() {
        assert_eq!(&into[root], all, "root {root}");
    }
}

#[test]
fn ranks_that_disagree_on_the_reduce_root_get_an_error() {
    let out = run_ring(2, same_secret(2), Duration::from_secs(5), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![0.0f32; 10];
        let bad_root = ring.reduce(&mut buf, rank);
        let out_of_world = ring.reduce(&mut buf, 2);
        (bad_root.map_err(|e| e.to_string()), out_of_world.is_err())
    });
    let errors: Vec<String> = out.iter().filter_map(|(r, _)| r.clone().err()).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("disagrees") && e.contains("a reduce into rank")),
        "{errors:?}"
    );
    assert!(out.iter().all(|(_, oow)| *oow));
}

#[test]
fn a_reduce_and_a_broadcast_at_the_same_call_disagree() {
    let out = run_ring(2, same_secret(2), Duration::from_secs(5), |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![0.0f32; 10];
        let r = if rank == 0 {
            ring.reduce(&mut buf, 0)
        } else {
            ring.broadcast(&mut buf, 0)
        };
        r.map_err(|e| e.to_string())
    });
    let errors: Vec<String> = out.iter().filter_map(|r| r.clone().err()).collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("a reduce into rank 0") && e.contains("a broadcast from rank 0")),
        "{errors:?}"
    );
}

#[test]
fn a_bf16_broadcast_copies_the_roots_bits_in_half_the_words() {
    use candle_core::{DType, Device, Tensor};
    use half::bf16;
    // Every bf16 bit pattern once (NaN payloads, infinities, subnormals, -0.0), plus an odd tail.
    let pattern: Vec<bf16> = (0..=u16::MAX).chain([7]).map(bf16::from_bits).collect();
    let want: Vec<u16> = pattern.iter().map(|x| x.to_bits()).collect();
    let out = run_ring(
        3,
        same_secret(3),
        Duration::from_secs(10),
        move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut got = vec![];
            for root in 0..3 {
                let t = if rank == root {
                    Tensor::new(pattern.as_slice(), &Device::Cpu).unwrap()
                } else {
                    Tensor::zeros(pattern.len(), DType::BF16, &Device::Cpu).unwrap()
                };
                let t = ring.broadcast_tensor(t, root).unwrap();
                assert_eq!(t.dtype(), DType::BF16);
                let v = t.to_vec1::<bf16>().unwrap();
                got.push(v.iter().map(|x| x.to_bits()).collect::<Vec<u16>>());
            }
            got
        },
    );
    for (rank, got) in out.iter().enumerate() {
        for (root, g) in got.iter().enumerate() {
            assert!(g == &want, "rank {rank}, root {root}: bits differ");
        }
    }
}
