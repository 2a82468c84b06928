//! Ending a TCP ring from another thread (`RingAborter`): a call blocked on a hung peer, a
//! dropped ring's sockets, and a ring still forming, all end at once instead of at a timeout.

mod ring_util;

use herd_worker::collective::{Collective, RingAborter, TcpRing};
use ring_util::*;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn an_abort_ends_a_call_blocked_on_a_hung_peer_at_once() {
    let n = 3;
    let timeout = Duration::from_secs(60);
    let start = Arc::new(Barrier::new(n));
    let out = run_ring(n, same_secret(n), timeout, move |rank, ring| {
        let mut ring = ring.unwrap();
        let mut buf = vec![1.0f32; 1000];
        ring.all_reduce_sum(&mut buf).unwrap();
        start.wait();
        if rank == 2 {
            // Hung: sockets open, never takes part again (until the others have given up).
            thread::sleep(Duration::from_secs(2));
            return None;
        }
        let aborter = ring.aborter();
        let t0 = Instant::now();
        if rank == 0 {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(300));
                aborter.abort("told to stop");
            });
        }
        let e = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
        let again = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
        Some((e, again, t0.elapsed()))
    });
    // Rank 0 says why; rank 1 fails fast because rank 0's sockets closed; neither waits the
    // 60 s socket timeout.
    let (e0, again0, took0) = out[0].clone().unwrap();
    assert!(e0.contains("rank 0: aborted: told to stop"), "{e0}");
    assert!(
        again0.contains("broken") && again0.contains("told to stop"),
        "{again0}"
    );
    assert!(took0 < Duration::from_secs(10), "rank 0 took {took0:?}");
    let (e1, _, took1) = out[1].clone().unwrap();
    assert!(
        took1 < Duration::from_secs(10),
        "rank 1 took {took1:?}: {e1}"
    );
}

#[test]
fn a_dropped_ring_closes_its_sockets_while_its_aborter_lives() {
    let n = 2;
    let start = Arc::new(Barrier::new(n));
    let out = run_ring(
        n,
        same_secret(n),
        Duration::from_secs(60),
        move |rank, ring| {
            let mut ring = ring.unwrap();
            let mut buf = vec![1.0f32; 1000];
            ring.all_reduce_sum(&mut buf).unwrap();
            if rank == 1 {
                // The rank fails outside the collective; the daemon still holds its aborter.
                let aborter = ring.aborter();
                drop(ring);
                start.wait();
                thread::sleep(Duration::from_secs(4));
                drop(aborter);
                return None;
            }
            start.wait();
            let t0 = Instant::now();
            let e = ring.all_reduce_sum(&mut buf).unwrap_err().to_string();
            Some((e, t0.elapsed()))
        },
    );
    let (e, took) = out[0].clone().unwrap();
    assert!(took < Duration::from_secs(2), "rank 0 waited {took:?}: {e}");
}

/// A rank whose neighbour never comes: the right one's address accepts TCP connections (its
/// backlog) but never answers the handshake, and the left one never dials.
#[test]
fn an_abort_ends_a_ring_still_forming_at_once() {
    let (mut ls, addrs) = listeners(2);
    let silent_peer = ls.pop().unwrap();
    let mine = ls.pop().unwrap();
    let aborter = RingAborter::default();
    let form = {
        let aborter = aborter.clone();
        thread::spawn(move || {
            let t0 = Instant::now();
            let r = TcpRing::form(0, mine, addrs, SECRET, Duration::from_secs(60), aborter);
            (r.map(|_| ()).unwrap_err().to_string(), t0.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(500));
    aborter.abort("stop order from the coordinator: gave up");
    let (e, took) = form.join().unwrap();
    assert!(
        e.contains("rank 0: aborted while forming the ring: stop order from the coordinator"),
        "{e}"
    );
    assert!(
        took < Duration::from_secs(5),
        "formation took {took:?}: {e}"
    );
    drop(silent_peer);
}

/// An abort asked for before the ring forms ends the formation too, even when both neighbours
/// are there and the handshakes succeed (the abort is found when the sockets are handed over).
#[test]
fn an_abort_before_forming_refuses_the_ring() {
    let (ls, addrs) = listeners(2);
    let aborters = [RingAborter::default(), RingAborter::default()];
    aborters[0].abort("told to stop");
    let mut handles: Vec<_> = ls
        .into_iter()
        .zip(aborters.clone())
        .enumerate()
        .map(|(rank, (l, aborter))| {
            let addrs = addrs.clone();
            thread::spawn(move || {
                let t0 = Instant::now();
                let r = TcpRing::form(rank, l, addrs, SECRET, Duration::from_secs(60), aborter);
                (r.map(|_| ()).map_err(|e| e.to_string()), t0.elapsed())
            })
        })
        .collect();
    let (r0, took0) = handles.remove(0).join().unwrap();
    let e0 = r0.unwrap_err();
    assert!(
        e0.contains("rank 0: aborted while forming the ring: told to stop"),
        "{e0}"
    );
    assert!(took0 < Duration::from_secs(5), "rank 0 took {took0:?}");
    // Rank 1 formed (its first call would fail) or still waits for rank 0: the coordinator
    // would stop it too.
    aborters[1].abort("the attempt was given up");
    let (_, took1) = handles.remove(0).join().unwrap();
    assert!(took1 < Duration::from_secs(5), "rank 1 took {took1:?}");
}

/// What is bootstrapped over the ring (NCCL, on GPU ranks) hears of its abort through
/// `on_abort`: a hook given before the abort runs once with its reason, one given after runs at
/// once, and a second abort runs none again.
#[test]
fn abort_hooks_run_once_with_the_first_reason() {
    use std::sync::Mutex;
    let out = run_ring(2, same_secret(2), Duration::from_secs(60), |_, ring| {
        let mut ring = ring.unwrap();
        let heard = Arc::new(Mutex::new(Vec::<String>::new()));
        let hook = |tag: &'static str| -> herd_worker::collective::AbortHook {
            let heard = heard.clone();
            Box::new(move |why: &str| heard.lock().unwrap().push(format!("{tag}: {why}")))
        };
        ring.on_abort(hook("before"));
        let aborter = ring.aborter();
        aborter.abort("stop order from the coordinator: gave up");
        aborter.abort("a later reason");
        ring.on_abort(hook("after"));
        let e = ring
            .all_reduce_sum(&mut [1.0f32; 8])
            .unwrap_err()
            .to_string();
        let heard = heard.lock().unwrap().clone();
        Some((heard, e))
    });
    for (rank, r) in out.into_iter().enumerate() {
        let (heard, e) = r.unwrap();
        assert_eq!(
            heard,
            [
                "before: stop order from the coordinator: gave up",
                "after: stop order from the coordinator: gave up"
            ],
            "rank {rank}"
        );
        assert!(
            e.contains("aborted: stop order from the coordinator"),
            "{e}"
        );
    }
}
