//! `TcpRing`: the CPU gradient collective over plain TCP (blocking `std::net` sockets).
//!
//! Rank r listens on `peers[r]`, connects to its right neighbour `(r+1) mod N` and accepts one
//! connection from its left neighbour `(r-1) mod N`. Data only ever flows rightwards: rank r
//! writes to the right and reads from the left.
//!
//! **Handshake** (on each link; the connecting side is the client, the accepting side the server;
//! the job secret never crosses the wire):
//! 1. client → server: `MAGIC, rank, world, nonce_c[32]`
//! 2. server checks the claimed rank is its left neighbour and the world size matches, then
//!    server → client: `0, MAGIC, rank, world, nonce_s[32], HMAC(secret, "server" ‖ transcript)`,
//!    or `1, len, reason` to reject.
//! 3. client verifies the server's MAC, then client → server: `HMAC(secret, "client" ‖ transcript)`.
//! 4. server verifies it and answers one status byte (`0` accepted, `1` + reason rejected).
//!
//! The transcript binds both nonces, both ranks and the world size, and the role labels differ,
//! so a MAC cannot be replayed or reflected. Anything that fails closes the connection and the
//! constructor returns [`Error::Collective`] saying which neighbour, which address and why.
//!
//! **All-reduce** is the bucketed ring: the buffer is cut into buckets (4 MiB by default); each
//! bucket is split N ways and reduced with N-1 reduce-scatter steps (partial sum arrives from the
//! left, `partial + own` goes on to the right) and N-1 all-gather steps (finished chunks are
//! copied around). A dedicated sender thread writes to the right while the caller reads from the
//! left (`links`), so two neighbours sending at once never deadlock on full socket buffers. Chunk c is
//! always summed in the order `((x[c] + x[c+1]) + x[c+2]) + … + x[c-1]` (ranks mod N), and the
//! all-gather copies the finished bits, so every rank gets identical bits and the same inputs
//! give the same bits on every run. Values travel as little-endian f32.
//!
//! **Broadcast** (ZeRO-1's weight sharing) is a pipeline along the ring: the root sends its
//! buffer in segments to the right, each other rank copies what arrives and passes it on, the
//! rank left of the root only keeps it. Every link carries the buffer once (an all-reduce
//! carries it about twice) and the bits are copied, never summed.
//!
//! **Reduce** (ZeRO-2's gradient parts) is the same pipeline summing: the rank right of the root
//! sends its buffer, each next rank adds its own to what arrives and sends that on, and the root
//! adds its own last. Every link carries the buffer once; only the root's answer is the sum.
//!
//! Every call starts with a header (call number, length, and the bucket size of an all-reduce or
//! the root of a broadcast or reduce) checked against the left neighbour, so ranks that disagree on the
//! buffer or the operation get a clear error instead of garbage. Socket
//! read/write timeouts turn a dead or stalled peer into an error naming its rank and address.
//! After any failure the ring shuts its sockets (so the neighbours fail fast too) and every later
//! call returns the same error.

use super::{AbortHook, Collective};
use crate::{Error, Result};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKEND: &str = "tcp-ring";
const MAGIC: &[u8; 8] = b"HERDRNG1";
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Bytes read from the socket before they are folded into the buffer.
const RECV_SEGMENT_BYTES: usize = 256 * 1024;
/// Messages the caller may queue ahead of the sender thread.
const SEND_QUEUE: usize = 4;
/// How often a forming ring looks at its aborter.
const ABORT_POLL: Duration = Duration::from_millis(50);

fn err(reason: impl Into<String>) -> Error {
    Error::Collective {
        backend: BACKEND,
        reason: reason.into(),
    }
}

/// A ring all-reduce over TCP between N processes (or threads). See the module docs.
pub struct TcpRing {
    rank: usize,
    world: usize,
    timeout: Duration,
    bucket_elems: usize,
    calls: u64,
    links: Option<Links>,
    /// Set after the first failure; later calls repeat it.
    broken: Option<String>,
    aborter: RingAborter,
}

/// Ends a ring from another thread: records why and shuts both of the rank's sockets, so a
/// call blocked on a hung or dead peer returns at once ("aborted: why") instead of at the
/// socket timeout, and the neighbours fail fast too. The worker daemon uses it when the
/// coordinator has already given up on the attempt (a stop order), where waiting is pointless.
#[derive(Clone, Default)]
pub struct RingAborter(Arc<AborterState>);

#[derive(Default)]
struct AborterState(std::sync::Mutex<AborterSlot>);

#[derive(Default)]
struct AborterSlot {
    reason: Option<String>,
    /// Clones of the rank's two streams once the ring has formed, only to shut them down.
    streams: Vec<TcpStream>,
    /// What else ends with the ring (an NCCL communicator bootstrapped over it).
    hooks: Vec<AbortHook>,
}

impl RingAborter {
    /// Abort the ring with `reason` (the first reason given wins); later calls are no-ops.
    /// Given to [`TcpRing::form`], it also ends a ring that is still forming.
    pub fn abort(&self, reason: &str) {
        let mut slot = self.slot();
        if slot.reason.is_none() {
            slot.reason = Some(reason.to_string());
            shut(&slot.streams);
            for hook in &slot.hooks {
                hook(reason);
            }
        }
    }

    /// Runs `hook` with the reason when the ring is aborted, at once if it already was; once.
    pub fn on_abort(&self, hook: AbortHook) {
        let mut slot = self.slot();
        match &slot.reason {
            Some(why) => hook(why),
            None => slot.hooks.push(hook),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, AborterSlot> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason(&self) -> Option<String> {
        self.slot().reason.clone()
    }

    /// Hands the formed ring's sockets over; an abort that came first shuts them at once and
    /// returns its reason.
    fn attach(&self, streams: Vec<TcpStream>) -> std::result::Result<(), String> {
        let mut slot = self.slot();
        slot.streams = streams;
        match &slot.reason {
            Some(why) => {
                shut(&slot.streams);
                Err(why.clone())
            }
            None => Ok(()),
        }
    }
}

fn shut<'a>(streams: impl IntoIterator<Item = &'a TcpStream>) {
    for s in streams {
        let _ = s.shutdown(Shutdown::Both);
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        // The aborter's clones would keep the sockets open after the ring is gone, and a
        // neighbour would not see it close: drop the links (their queue is written first),
        // then shut the sockets.
        drop(self.links.take());
        shut(&self.aborter.slot().streams);
    }
}

impl std::fmt::Debug for TcpRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpRing")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("bucket_elems", &self.bucket_elems)
            .field("broken", &self.broken)
            .finish()
    }
}

impl TcpRing {
    /// Default bucket: 4 MiB of f32 per ring pass.
    pub const DEFAULT_BUCKET_BYTES: usize = 4 << 20;

    /// Bind `peers[rank]`, then join the ring as [`TcpRing::with_listener`] does. World size 1
    /// (`peers.len() == 1`) binds nothing and never touches the network.
    pub fn connect(
        rank: usize,
        peers: Vec<SocketAddr>,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<Self> {
        check_args(rank, &peers, secret, timeout)?;
        if peers.len() == 1 {
            return Ok(Self::single(timeout));
        }
        let listener = TcpListener::bind(peers[rank]).map_err(|e| {
            err(format!(
                "rank {rank}: cannot listen on {}: {e}",
                peers[rank]
            ))
        })?;
        Self::with_listener(rank, listener, peers, secret, timeout)
    }

    /// Join the ring using an already-bound listener for this rank (so a caller can bind port 0
    /// and publish the address without a race). Connects to `peers[(rank+1) % N]` (retrying
    /// until `timeout`), accepts one authenticated connection from rank `(rank-1) mod N`, and
    /// uses `timeout` afterwards as the socket read/write timeout.
    pub fn with_listener(
        rank: usize,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<Self> {
        Self::form(
            rank,
            listener,
            peers,
            secret,
            timeout,
            RingAborter::default(),
        )
    }

    /// [`TcpRing::with_listener`] with an aborter made beforehand: aborting it while the ring
    /// forms (a neighbour that never comes) ends the formation at once with "aborted while
    /// forming the ring: why" instead of at the `timeout` deadline; afterwards it is the
    /// ring's [`TcpRing::aborter`].
    pub fn form(
        rank: usize,
        listener: TcpListener,
        peers: Vec<SocketAddr>,
        secret: &[u8],
        timeout: Duration,
        aborter: RingAborter,
    ) -> Result<Self> {
        check_args(rank, &peers, secret, timeout)?;
        let world = peers.len();
        if world == 1 {
            return Ok(Self::single(timeout));
        }
        let left = (rank + world - 1) % world;
        let right = (rank + 1) % world;
        let deadline = Instant::now() + timeout;
        let abort = Arc::new(Abort::default());
        let secret: Arc<[u8]> = Arc::from(secret);

        // Accept and connect on two helper threads; whichever fails first ends the
        // construction and tells the other to stop.
        enum Side {
            Left(Result<TcpStream>),
            Right(Result<TcpStream>),
        }
        let (tx, rx) = mpsc::channel::<Side>();
        {
            let (abort, secret, tx) = (abort.clone(), secret.clone(), tx.clone());
            let left_addr = peers[left];
            std::thread::Builder::new()
                .name(format!("tcp-ring-accept-{rank}"))
                .spawn(move || {
                    let r = accept_left(
                        &listener, rank, left, left_addr, world, &secret, deadline, timeout, &abort,
                    );
                    let _ = tx.send(Side::Left(r));
                })
                .map_err(|e| err(format!("cannot spawn the accept thread: {e}")))?;
        }
        {
            let (abort, secret) = (abort.clone(), secret.clone());
            let right_addr = peers[right];
            std::thread::Builder::new()
                .name(format!("tcp-ring-connect-{rank}"))
                .spawn(move || {
                    let r = connect_right(
                        rank, right, right_addr, world, &secret, deadline, timeout, &abort,
                    );
                    let _ = tx.send(Side::Right(r));
                })
                .map_err(|e| err(format!("cannot spawn the connect thread: {e}")))?;
        }
        let (mut left_stream, mut right_stream) = (None, None);
        while left_stream.is_none() || right_stream.is_none() {
            let mut grace = true;
            let r = match rx.recv_timeout(ABORT_POLL) {
                Ok(Side::Left(r)) => r.map(|s| left_stream = Some(s)),
                Ok(Side::Right(r)) => r.map(|s| right_stream = Some(s)),
                Err(mpsc::RecvTimeoutError::Timeout) => match aborter.reason() {
                    Some(why) => {
                        grace = false;
                        Err(err(format!(
                            "rank {rank}: aborted while forming the ring: {why}"
                        )))
                    }
                    None => Ok(()),
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    Err(err(format!("rank {rank}: a connection thread died")))
                }
            };
            if let Err(e) = r {
                // The helper threads see it and stop (after a failure here the accept side
                // tells a connecting neighbour why for a moment).
                abort.set(&e, grace);
                shut(left_stream.iter().chain(right_stream.iter()));
                return Err(e);
            }
        }
        let (left_stream, right_stream) = (left_stream.unwrap(), right_stream.unwrap());
        let streams = [&left_stream, &right_stream]
            .iter()
            .map(|s| s.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| err(format!("rank {rank}: cannot clone a ring socket: {e}")))?;
        aborter.attach(streams).map_err(|why| {
            err(format!(
                "rank {rank}: aborted while forming the ring: {why}"
            ))
        })?;

        let links = Links::new(
            rank,
            left,
            peers[left],
            right,
            peers[right],
            left_stream,
            right_stream,
            timeout,
        )?;
        Ok(TcpRing {
            rank,
            world,
            timeout,
            bucket_elems: Self::DEFAULT_BUCKET_BYTES / 4,
            calls: 0,
            links: Some(links),
            broken: None,
            aborter,
        })
    }

    fn single(timeout: Duration) -> Self {
        TcpRing {
            rank: 0,
            world: 1,
            timeout,
            bucket_elems: Self::DEFAULT_BUCKET_BYTES / 4,
            calls: 0,
            links: None,
            broken: None,
            aborter: RingAborter::default(),
        }
    }

    /// A handle that ends this ring from another thread (see [`RingAborter`]).
    pub fn aborter(&self) -> RingAborter {
        self.aborter.clone()
    }

    /// Change the bucket size (rounded down to whole f32s, at least one). Every rank must use
    /// the same value; a mismatch is reported by the next `all_reduce_sum`.
    pub fn set_bucket_bytes(&mut self, bytes: usize) {
        self.bucket_elems = (bytes / 4).max(1);
    }

    pub fn bucket_bytes(&self) -> usize {
        self.bucket_elems * 4
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Exchanges this call's header with the neighbours: every rank must agree on what the
    /// call is (`op` of `len` elements, with `param`: the bucket size or the root).
    fn agree(&mut self, op: Op, len: usize, param: usize) -> Result<()> {
        let rank = self.rank;
        let call = self.calls;
        self.calls += 1;
        let links = self.links.as_mut().expect("world > 1 has links");
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&call.to_le_bytes());
        header[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        header[16..].copy_from_slice(&op.code(param).to_le_bytes());
        let mut out = links.take_buffer()?;
        out.extend_from_slice(&header);
        links.send(out)?;
        let mut theirs = [0u8; 24];
        links.recv_exact(&mut theirs)?;
        if theirs != header {
            // Make sure our own header reaches the right neighbour before the ring is shut, so
            // it reports the disagreement too rather than a bare hang-up.
            let _ = links.flush();
            let f = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
            return Err(err(format!(
                "rank {rank}: rank {} ({}) disagrees on call {call}: here {} of {len} elements, \
                 there call {} is {} of {} elements",
                links.left,
                links.left_addr,
                op.describe(param as u64),
                f(&theirs[..8]),
                Op::describe_code(f(&theirs[16..])),
                f(&theirs[8..16]),
            )));
        }
        Ok(())
    }

    fn reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let (rank, world, bucket) = (self.rank, self.world, self.bucket_elems);
        self.agree(Op::AllReduce, buf.len(), bucket)?;
        let links = self.links.as_mut().expect("world > 1 has links");
        for bucket_buf in buf.chunks_mut(bucket) {
            let n = bucket_buf.len();
            let bounds = |i: usize| (i * n / world)..((i + 1) * n / world);
            // Reduce-scatter: at step s send chunk r-s, receive chunk r-s-1 and add.
            for s in 0..world - 1 {
                let send_c = (rank + world - s) % world;
                let recv_c = (rank + 2 * world - s - 1) % world;
                links.send_f32(&bucket_buf[bounds(send_c)])?;
                links.recv_f32(&mut bucket_buf[bounds(recv_c)], true)?;
            }
            // All-gather: rank r now owns the finished chunk r+1; pass finished chunks on.
            for s in 0..world - 1 {
                let send_c = (rank + 1 + world - s) % world;
                let recv_c = (rank + world - s) % world;
                links.send_f32(&bucket_buf[bounds(send_c)])?;
                links.recv_f32(&mut bucket_buf[bounds(recv_c)], false)?;
            }
        }
        links.flush()
    }

    /// The broadcast: from `root` round the ring, each rank copying what arrives.
    fn pass_on(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.agree(Op::Broadcast, buf.len(), root)?;
        self.pipeline(buf, root, false)
    }

    /// The reduce into `root`: the rank after the root starts, each next rank adds its own to
    /// the partial sum that arrives, and the root adds its own last; the others keep partial
    /// sums.
    fn sum_into(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.agree(Op::Reduce, buf.len(), root)?;
        self.pipeline(buf, (root + 1) % self.world, true)
    }

    /// `buf` travels segment by segment from `start` round the ring to the rank left of it:
    /// every rank but `start` receives each segment (added to its own with `add`, else over
    /// it), every rank but the last sends it on. Each link carries the buffer once.
    fn pipeline(&mut self, buf: &mut [f32], start: usize, add: bool) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        let links = self.links.as_mut().expect("world > 1 has links");
        let last = (start + world - 1) % world;
        for seg in buf.chunks_mut(RECV_SEGMENT_BYTES / 4) {
            if rank != start {
                links.recv_f32(seg, add)?;
            }
            if rank != last {
                links.send_f32(seg)?;
            }
        }
        links.flush()
    }

    /// A call with a root (`what` rank `root`): refused outside the world, nothing to do on one
    /// rank, else [`TcpRing::guarded`].
    fn rooted(
        &mut self,
        what: &str,
        root: usize,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if root >= self.world {
            return Err(err(format!(
                "{what} rank {root} in a world of {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        self.guarded(f)
    }

    /// Runs `f` unless the ring is broken; a failure breaks it (sockets shut, so the neighbours
    /// fail fast too) and is repeated by every later call.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        if let Some(reason) = &self.broken {
            return Err(err(format!(
                "the ring is broken by an earlier failure: {reason}"
            )));
        }
        let mut r = f(self);
        if let Some(why) = self.aborter.reason().filter(|_| r.is_err()) {
            // The sockets were shut on purpose: say so, not "connection reset".
            r = Err(err(format!("rank {}: aborted: {why}", self.rank)));
        }
        if let Err(e) = &r {
            self.broken = Some(match e {
                Error::Collective { reason, .. } => reason.clone(),
                other => other.to_string(),
            });
            if let Some(links) = &self.links {
                links.shutdown();
            }
        }
        r
    }
}

/// What a call does, as its header's third word says.
#[derive(Clone, Copy)]
enum Op {
    AllReduce,
    Broadcast,
    Reduce,
}

const BROADCAST_FLAG: u64 = 1 << 63;
const REDUCE_FLAG: u64 = 1 << 62;

impl Op {
    fn code(self, param: usize) -> u64 {
        match self {
            Op::AllReduce => param as u64,
            Op::Broadcast => BROADCAST_FLAG | param as u64,
            Op::Reduce => REDUCE_FLAG | param as u64,
        }
    }

    fn describe(self, param: u64) -> String {
        match self {
            Op::AllReduce => format!("an all-reduce in buckets of {param}"),
            Op::Broadcast => format!("a broadcast from rank {param}"),
            Op::Reduce => format!("a reduce into rank {param}"),
        }
    }

    fn describe_code(code: u64) -> String {
        let param = code & !(BROADCAST_FLAG | REDUCE_FLAG);
        if code & BROADCAST_FLAG != 0 {
            Op::Broadcast.describe(param)
        } else if code & REDUCE_FLAG != 0 {
            Op::Reduce.describe(param)
        } else {
            Op::AllReduce.describe(code)
        }
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded(|ring| ring.reduce(buf))
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.rooted("broadcast from", root, |ring| ring.pass_on(buf, root))
    }
    fn reduce(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.rooted("reduce into", root, |ring| ring.sum_into(buf, root))
    }
    fn on_abort(&mut self, hook: AbortHook) {
        self.aborter.on_abort(hook);
    }
    fn name(&self) -> &'static str {
        BACKEND
    }
}

fn check_args(rank: usize, peers: &[SocketAddr], secret: &[u8], timeout: Duration) -> Result<()> {
    if peers.is_empty() {
        return Err(err("the peer list is empty"));
    }
    if peers.len() > u32::MAX as usize {
        return Err(err("too many peers"));
    }
    if rank >= peers.len() {
        return Err(err(format!(
            "rank {rank} is outside a world of {} ranks",
            peers.len()
        )));
    }
    if secret.is_empty() {
        return Err(err("the job secret is empty"));
    }
    if timeout.is_zero() {
        return Err(err("the timeout is zero"));
    }
    Ok(())
}

fn describe_io(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("timed out after {timeout:?} (peer dead or stalled?)")
        }
        io::ErrorKind::UnexpectedEof => "the connection was closed by the peer".to_string(),
        _ => e.to_string(),
    }
}

mod handshake;
mod links;
#[cfg(test)]
mod tests;

use handshake::*;
use links::Links;
