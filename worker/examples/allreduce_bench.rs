//! Ring all-reduce over loopback TCP, ranks as threads, next to a plain memcpy of the same size.
//!
//!     cargo run --release -p herd-worker --example allreduce_bench -- --world 2,4 --sizes 1,4,16,64,256
//!
//! Options: `--world` (comma list), `--sizes` (MB, comma list), `--iters` (timed iterations per
//! size; default: enough for ~1 s, at least 3), `--bucket-mb` (ring bucket, default 4).
//! algbw = bytes / time; busbw = algbw · 2(N-1)/N (the nccl-tests definition for all-reduce).
//! Time is the slowest rank's, from a shared start (barrier) to the last rank finishing.

use herd_worker::collective::{Collective, TcpRing};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

fn parse_list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {x}"))
        })
        .collect()
}

fn main() {
    let mut worlds = vec![2, 4];
    let mut sizes = vec![1, 4, 16, 64, 256];
    let mut iters: Option<usize> = None;
    let mut bucket_mb: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--world" => worlds = parse_list(&val()),
            "--sizes" => sizes = parse_list(&val()),
            "--iters" => iters = Some(val().parse().expect("--iters")),
            "--bucket-mb" => bucket_mb = Some(val().parse().expect("--bucket-mb")),
            "-h" | "--help" => {
                println!("allreduce_bench [--world 2,4] [--sizes 1,4,16,64,256] [--iters N] [--bucket-mb 4]");
                return;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("ring all-reduce over 127.0.0.1, ranks as threads, {cores} CPU cores");
    println!(
        "{:>5} {:>8} {:>6} {:>11} {:>12} {:>12} {:>13} {:>13}",
        "world",
        "size_MB",
        "iters",
        "time_ms",
        "algbw_GB/s",
        "busbw_GB/s",
        "memcpy_ms",
        "memcpy_GB/s"
    );
    for &n in &worlds {
        bench_world(n, &sizes, iters, bucket_mb);
    }
}

fn memcpy_time(elems: usize, iters: usize) -> Duration {
    let src = vec![1.0f32; elems];
    let mut dst = vec![0.0f32; elems];
    dst.copy_from_slice(&src); // fault the pages in
    let t0 = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    t0.elapsed() / iters as u32
}

fn bench_world(n: usize, sizes: &[usize], iters: Option<usize>, bucket_mb: Option<usize>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let barrier = Arc::new(Barrier::new(n));
    // Per size: the iteration count (decided by rank 0 from the warm-up) and the timings.
    let plan = Arc::new(Mutex::new(0usize));
    let results = Arc::new(Mutex::new(Vec::<(usize, usize, Duration)>::new()));
    let sizes = sizes.to_vec();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, barrier, plan, results, sizes) = (
                addrs.clone(),
                barrier.clone(),
                plan.clone(),
                results.clone(),
                sizes.clone(),
            );
            std::thread::spawn(move || {
                let mut ring = TcpRing::with_listener(
                    rank,
                    l,
                    addrs,
                    b"bench-secret",
                    Duration::from_secs(60),
                )
                .expect("ring");
                if let Some(mb) = bucket_mb {
                    ring.set_bucket_bytes(mb << 20);
                }
                for &mb in &sizes {
                    let elems = (mb << 20) / 4;
                    let mut buf = vec![rank as f32 * 0.5 + 1.0; elems];
                    // Warm-up (also sizes the run).
                    barrier.wait();
                    let t0 = Instant::now();
                    ring.all_reduce_sum(&mut buf).expect("all-reduce");
                    barrier.wait();
                    if rank == 0 {
                        let warm = t0.elapsed().as_secs_f64();
                        *plan.lock().unwrap() =
                            iters.unwrap_or(((1.0 / warm.max(1e-6)) as usize).clamp(3, 200));
                    }
                    barrier.wait();
                    let k = *plan.lock().unwrap();
                    let mut total = Duration::ZERO;
                    for _ in 0..k {
                        barrier.wait();
                        let t0 = Instant::now();
                        ring.all_reduce_sum(&mut buf).expect("all-reduce");
                        barrier.wait();
                        total += t0.elapsed();
                    }
                    if rank == 0 {
                        results.lock().unwrap().push((mb, k, total / k as u32));
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("rank thread");
    }
    for (mb, k, t) in results.lock().unwrap().iter().copied() {
        let bytes = (mb << 20) as f64;
        let secs = t.as_secs_f64();
        let algbw = bytes / secs / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let mc = memcpy_time((mb << 20) / 4, k.max(3)).as_secs_f64();
        println!(
            "{:>5} {:>8} {:>6} {:>11.2} {:>12.3} {:>12.3} {:>13.3} {:>13.2}",
            n,
            mb,
            k,
            secs * 1e3,
            algbw,
            busbw,
            mc * 1e3,
            bytes / mc / 1e9
        );
    }
}
