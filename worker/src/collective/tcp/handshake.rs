//! Connection set-up of the ring: dial the right neighbour, accept the left one, and the
//! HMAC-SHA256 challenge-response with the job secret (protocol in the parent module's docs).

use super::{describe_io, err, MAC_LEN, MAGIC, NONCE_LEN};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[allow(clippy::too_many_arguments)]
pub(super) fn connect_right(
    rank: usize,
    right: usize,
    addr: SocketAddr,
    world: usize,
    secret: &[u8],
    deadline: Instant,
    timeout: Duration,
    abort: &Abort,
) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(10);
    let stream = loop {
        let now = Instant::now();
        if abort.is_set() {
            return Err(err(format!(
                "rank {rank}: connecting to rank {right} ({addr}) was abandoned"
            )));
        }
        let left_time = deadline.saturating_duration_since(now);
        let attempt = left_time.min(Duration::from_secs(2));
        let last = if attempt.is_zero() {
            None
        } else {
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(s) => break s,
                Err(e) => Some(e),
            }
        };
        if Instant::now() + backoff >= deadline {
            return Err(err(format!(
                "rank {rank}: could not connect to rank {right} at {addr} within {timeout:?}{}",
                last.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(200));
    };
    let ctx = |what: &str| format!("rank {rank}: handshake with rank {right} ({addr}): {what}");
    configure(&stream, timeout).map_err(|e| err(ctx(&e.to_string())))?;
    client_handshake(stream, rank, right, world, secret, timeout)
        .map_err(|reason| err(ctx(&reason)))
}

/// Handshakes in flight at once on one listener; a connection beyond them is dropped unread.
const MAX_PENDING_HANDSHAKES: usize = 16;

#[allow(clippy::too_many_arguments)]
pub(super) fn accept_left(
    listener: &TcpListener,
    rank: usize,
    left: usize,
    left_addr: SocketAddr,
    world: usize,
    secret: &[u8],
    deadline: Instant,
    timeout: Duration,
    abort: &Abort,
) -> Result<TcpStream> {
    // Every accepted connection is handshaken on a thread of its own while accepting goes on,
    // so a connection that sends nothing (a stranger holding the port, a stale attempt) cannot
    // keep the real neighbour waiting in the backlog until the timeout. The first connection
    // that proves the secret is the left neighbour; one that fails does not break the ring:
    // keep accepting until the deadline, then report the last failure.
    listener
        .set_nonblocking(true)
        .map_err(|e| err(format!("rank {rank}: cannot configure the listener: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel::<std::result::Result<TcpStream, String>>();
    let mut pending = 0usize;
    let mut last_failure: Option<String> = None;
    let mut take = |r: std::result::Result<TcpStream, String>, pending: &mut usize| {
        *pending -= 1;
        match r {
            Ok(s) => Some(s),
            Err(reason) => {
                tracing::warn!("{reason}; still waiting for rank {left}");
                last_failure = Some(reason);
                None
            }
        }
    };
    loop {
        if let Some((reason, since, grace)) = abort.get() {
            answer_while_abandoning(listener, rank, &reason, since, grace, deadline);
            return Err(err(format!(
                "rank {rank}: waiting for rank {left} was abandoned"
            )));
        }
        while let Ok(r) = rx.try_recv() {
            if let Some(s) = take(r, &mut pending) {
                return Ok(s);
            }
        }
        match listener.accept() {
            Ok((stream, from)) => {
                if pending >= MAX_PENDING_HANDSHAKES {
                    continue; // a flood of connections: this one is dropped
                }
                let ctx = move |what: &str| {
                    format!(
                        "rank {rank}: a connection from {from} (rank {left} is expected from \
                         {left_addr}) failed the handshake: {what}"
                    )
                };
                let (tx, secret) = (tx.clone(), secret.to_vec());
                let handshake = move || {
                    let r = stream
                        .set_nonblocking(false)
                        .and_then(|()| configure(&stream, timeout))
                        .map_err(|e| ctx(&e.to_string()))
                        .and_then(|()| {
                            server_handshake(stream, rank, left, world, &secret, timeout)
                                .map_err(|reason| ctx(&reason))
                        });
                    let _ = tx.send(r); // the ring may have formed without it
                };
                std::thread::Builder::new()
                    .name(format!("tcp-ring-handshake-{rank}"))
                    .spawn(handshake)
                    .map_err(|e| err(format!("rank {rank}: cannot spawn a handshake: {e}")))?;
                pending += 1;
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if Instant::now() >= deadline {
                    // Handshakes already under way may still bring the neighbour.
                    while pending > 0 {
                        match rx.recv_timeout(timeout) {
                            Ok(r) => {
                                if let Some(s) = take(r, &mut pending) {
                                    return Ok(s);
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    return Err(err(match &last_failure {
                        Some(reason) => reason.clone(),
                        None => format!(
                            "rank {rank}: rank {left} (expected from {left_addr}) did not connect within {timeout:?}"
                        ),
                    }));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(err(format!(
                    "rank {rank}: accepting rank {left} failed: {e}"
                )))
            }
        }
    }
}

/// This rank is not joining after all. For a short while, answer a neighbour that is (or is
/// about to be) connecting with the reason, instead of a bare reset. Not after an abort from
/// outside (`grace` false): the coordinator stops the neighbours itself, and the listener may
/// soon serve this worker's next ring.
fn answer_while_abandoning(
    listener: &TcpListener,
    rank: usize,
    reason: &str,
    since: Instant,
    grace: bool,
    deadline: Instant,
) {
    let grace_end = (since + if grace { ABORT_GRACE } else { Duration::ZERO }).min(deadline);
    while Instant::now() < grace_end {
        match listener.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(ABORT_GRACE));
                let _ = s.set_write_timeout(Some(ABORT_GRACE));
                let mut hello = [0u8; 16 + NONCE_LEN];
                if s.read_exact(&mut hello).is_ok() {
                    reject(
                        &mut s,
                        &format!("rank {rank} is not joining the ring: {reason}"),
                    );
                }
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// How long a rank that gave up joining keeps answering its left neighbour with the reason.
pub(super) const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Set when one side of the set-up failed, or the formation was aborted from outside: the
/// other side stops waiting. The flag says whether to answer a connecting neighbour with the
/// reason for [`ABORT_GRACE`].
#[derive(Default)]
pub(super) struct Abort(Mutex<Option<(String, Instant, bool)>>);

impl Abort {
    pub(super) fn set(&self, e: &Error, grace: bool) {
        let reason = match e {
            Error::Collective { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert((reason, Instant::now(), grace));
    }
    pub(super) fn get(&self) -> Option<(String, Instant, bool)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn is_set(&self) -> bool {
        self.get().is_some()
    }
}

pub(super) fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(())
}

pub(super) fn transcript(
    client_rank: u32,
    server_rank: u32,
    world: u32,
    nc: &[u8],
    ns: &[u8],
) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + 12 + 2 * NONCE_LEN);
    t.extend_from_slice(MAGIC);
    t.extend_from_slice(&client_rank.to_le_bytes());
    t.extend_from_slice(&server_rank.to_le_bytes());
    t.extend_from_slice(&world.to_le_bytes());
    t.extend_from_slice(nc);
    t.extend_from_slice(ns);
    t
}

pub(super) fn nonce() -> std::result::Result<[u8; NONCE_LEN], String> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| format!("no randomness for a nonce: {e}"))?;
    Ok(n)
}

pub(super) fn io_reason(what: &str, e: io::Error, timeout: Duration) -> String {
    format!("{what}: {}", describe_io(&e, timeout))
}

pub(super) fn read_reason(s: &mut TcpStream) -> String {
    let mut len = [0u8; 2];
    if s.read_exact(&mut len).is_err() {
        return "(no reason given)".into();
    }
    let mut r = vec![0u8; u16::from_le_bytes(len) as usize];
    if s.read_exact(&mut r).is_err() {
        return "(reason cut short)".into();
    }
    String::from_utf8_lossy(&r).into_owned()
}

pub(super) fn reject(s: &mut TcpStream, reason: &str) -> String {
    let r = reason.as_bytes();
    let r = &r[..r.len().min(1024)];
    let mut msg = vec![1u8];
    msg.extend_from_slice(&(r.len() as u16).to_le_bytes());
    msg.extend_from_slice(r);
    let _ = s.write_all(&msg);
    let _ = s.shutdown(Shutdown::Both);
    reason.to_string()
}

/// The connecting side: we are `rank`, the server should be `right`.
pub(super) fn client_handshake(
    mut s: TcpStream,
    rank: usize,
    right: usize,
    world: usize,
    secret: &[u8],
    timeout: Duration,
) -> std::result::Result<TcpStream, String> {
    let nc = nonce()?;
    let mut hello = Vec::with_capacity(16 + NONCE_LEN);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    hello.extend_from_slice(&nc);
    s.write_all(&hello)
        .map_err(|e| io_reason("sending hello", e, timeout))?;

    let mut status = [0u8; 1];
    s.read_exact(&mut status)
        .map_err(|e| io_reason("waiting for the peer's answer", e, timeout))?;
    if status[0] != 0 {
        return Err(format!("rejected by the peer: {}", read_reason(&mut s)));
    }
    let mut reply = [0u8; 16 + NONCE_LEN + MAC_LEN];
    s.read_exact(&mut reply)
        .map_err(|e| io_reason("reading the peer's answer", e, timeout))?;
    if &reply[..8] != MAGIC {
        let _ = s.shutdown(Shutdown::Both);
        return Err("the peer does not speak the herd ring protocol".into());
    }
    let their_rank = u32::from_le_bytes(reply[8..12].try_into().unwrap());
    let their_world = u32::from_le_bytes(reply[12..16].try_into().unwrap());
    let ns = &reply[16..16 + NONCE_LEN];
    let their_mac = &reply[16 + NONCE_LEN..];
    let t = transcript(rank as u32, their_rank, world as u32, &nc, ns);
    if !ct_eq(&hmac_sha256(secret, &[b"server", &t]), their_mac) {
        let _ = s.shutdown(Shutdown::Both);
        return Err(
            "authentication failed: the peer could not prove it holds the job secret \
                    (wrong secret, or not a herd rank of this job)"
                .into(),
        );
    }
    if their_rank as usize != right || their_world as usize != world {
        let _ = s.shutdown(Shutdown::Both);
        return Err(format!(
            "the peer claims to be rank {their_rank} of {their_world}, expected rank {right} of {world}"
        ));
    }
    let mac = hmac_sha256(secret, &[b"client", &t]);
    s.write_all(&mac)
        .map_err(|e| io_reason("sending our proof", e, timeout))?;
    s.read_exact(&mut status).map_err(|e| {
        io_reason(
            "authentication not confirmed by the peer (wrong secret?)",
            e,
            timeout,
        )
    })?;
    if status[0] != 0 {
        return Err(format!("rejected by the peer: {}", read_reason(&mut s)));
    }
    Ok(s)
}

/// The accepting side: we are `rank`, the client should be `left`.
pub(super) fn server_handshake(
    mut s: TcpStream,
    rank: usize,
    left: usize,
    world: usize,
    secret: &[u8],
    timeout: Duration,
) -> std::result::Result<TcpStream, String> {
    let mut hello = [0u8; 16 + NONCE_LEN];
    s.read_exact(&mut hello)
        .map_err(|e| io_reason("reading hello", e, timeout))?;
    if &hello[..8] != MAGIC {
        return Err(reject(
            &mut s,
            "the peer does not speak the herd ring protocol",
        ));
    }
    let their_rank = u32::from_le_bytes(hello[8..12].try_into().unwrap());
    let their_world = u32::from_le_bytes(hello[12..16].try_into().unwrap());
    let nc = &hello[16..];
    if their_world as usize != world {
        return Err(reject(
            &mut s,
            &format!("world size mismatch: rank {their_rank} says {their_world}, rank {rank} says {world}"),
        ));
    }
    if their_rank as usize != left {
        return Err(reject(
            &mut s,
            &format!("unexpected rank: rank {rank} expects its left neighbour rank {left}, got rank {their_rank}"),
        ));
    }
    let ns = nonce()?;
    let t = transcript(their_rank, rank as u32, world as u32, nc, &ns);
    let mut reply = Vec::with_capacity(1 + 16 + NONCE_LEN + MAC_LEN);
    reply.push(0);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&(rank as u32).to_le_bytes());
    reply.extend_from_slice(&(world as u32).to_le_bytes());
    reply.extend_from_slice(&ns);
    reply.extend_from_slice(&hmac_sha256(secret, &[b"server", &t]));
    s.write_all(&reply)
        .map_err(|e| io_reason("sending our answer", e, timeout))?;

    let mut their_mac = [0u8; MAC_LEN];
    if let Err(e) = s.read_exact(&mut their_mac) {
        let _ = s.shutdown(Shutdown::Both);
        return Err(io_reason(
            "authentication failed: the peer hung up instead of proving it holds the job secret \
             (wrong secret?)",
            e,
            timeout,
        ));
    }
    if !ct_eq(&hmac_sha256(secret, &[b"client", &t]), &their_mac) {
        return Err(reject(
            &mut s,
            "authentication failed: the peer could not prove it holds the job secret (wrong secret?)",
        ));
    }
    s.write_all(&[0u8])
        .map_err(|e| io_reason("confirming authentication", e, timeout))?;
    Ok(s)
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub(super) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Comparison whose time does not depend on where the inputs differ.
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
