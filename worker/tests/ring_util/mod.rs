//! What the TCP ring tests share: free listeners on 127.0.0.1 and a ring of N ranks on threads.

use herd_worker::collective::TcpRing;
use herd_worker::Error;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

pub const SECRET: &[u8] = b"job-secret-for-tests";

pub fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Build a ring of `n` ranks on threads, run `f(rank, ring)` on each, return results by rank.
pub fn run_ring<T: Send + 'static>(
    n: usize,
    secrets: Vec<Vec<u8>>,
    timeout: Duration,
    f: impl Fn(usize, Result<TcpRing, Error>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (ls, addrs) = listeners(n);
    let f = Arc::new(f);
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f, secret) = (addrs.clone(), f.clone(), secrets[rank].clone());
            thread::spawn(move || {
                f(
                    rank,
                    TcpRing::with_listener(rank, l, addrs, &secret, timeout),
                )
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

pub fn same_secret(n: usize) -> Vec<Vec<u8>> {
    vec![SECRET.to_vec(); n]
}
