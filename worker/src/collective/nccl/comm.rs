//! One NCCL communicator that another thread can abort, which cudarc's `Comm` does not offer
//! (its handle is private). A GPU rank whose peer died or hung mid-collective would otherwise
//! wait inside NCCL for ever, deaf to the coordinator's stop order; torch's NCCL watchdog ends
//! such a wait the same way, with ncclCommAbort.
//!
//! The communicator is non-blocking (`ncclConfig_t.blocking = 0`): no NCCL call waits on a
//! peer, so every call returns at once and is followed by polling ncclCommGetAsyncError until
//! the operation is enqueued on the stream (NCCL's documented pattern for fault tolerance).
//! The handle sits behind a mutex held only for those short calls, so an abort from another
//! thread (the daemon's stop order, or the watchdog below) gets it at once, frees it, and every
//! later call answers "aborted: why" instead of touching freed memory. A kernel already waiting
//! on a dead peer ends with the abort, which frees the host thread blocked on the stream.
//!
//! The watchdog thread polls the asynchronous error every half second and aborts on one (a
//! peer's socket closed, say), so a rank whose peer died ends even before the coordinator
//! notices the missed heartbeats.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaStream, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::safe::NcclType;
use candle_core::cuda_backend::cudarc::nccl::sys::{self, ncclResult_t};

/// How often the watchdog reads the communicator's asynchronous error.
const WATCHDOG_POLL: Duration = Duration::from_millis(500);
/// `NCCL_CONFIG_UNDEF_INT`: "NCCL decides" for an int field of `ncclConfig_t`.
const UNDEF_INT: i32 = i32::MIN;
/// The `ncclConfig_t` layout cudarc's bindings describe (NCCL 2.30's header). NCCL reads at
/// most its own struct's size from the `size` field, so an older library (2.28 on the GPU
/// machine) takes the prefix it knows.
const CONFIG_VERSION: u32 = 2 * 10_000 + 30 * 100;

/// What one in-place collective does to a buffer.
#[derive(Clone, Copy, Debug)]
pub(super) enum Op {
    /// ncclAllReduce(sum).
    Sum,
    /// ncclBroadcast from the rank given.
    Broadcast(i32),
    /// ncclReduce(sum) into the rank given (ZeRO-2's gradient parts).
    Reduce(i32),
}

impl Op {
    pub fn nccl_name(self) -> &'static str {
        match self {
            Op::Sum => "ncclAllReduce",
            Op::Broadcast(_) => "ncclBroadcast",
            Op::Reduce(_) => "ncclReduce",
        }
    }
}

pub(super) struct Communicator {
    shared: Arc<Shared>,
    stream: Arc<CudaStream>,
}

/// Ends the communicator from any thread; does nothing once it is gone.
#[derive(Clone)]
pub(super) struct Aborter(Weak<Shared>);

impl Aborter {
    pub fn abort(&self, reason: &str) {
        if let Some(shared) = self.0.upgrade() {
            shared.abort(reason);
        }
    }
}

struct Shared {
    state: Mutex<State>,
    ctx: Arc<CudaContext>,
    rank: usize,
}

struct State {
    /// None once aborted: NCCL has freed it.
    comm: Option<Handle>,
    /// Why it was aborted (the first reason).
    aborted: Option<String>,
}

#[derive(Clone, Copy)]
struct Handle(sys::ncclComm_t);

// SAFETY: the handle is only used under `Shared::state`'s mutex, one thread at a time; NCCL
// allows a communicator to be used from different threads that way.
unsafe impl Send for Handle {}

impl Communicator {
    /// Starts joining `world` ranks as `rank` on `stream`'s GPU. The join goes on in NCCL's
    /// threads: [`Communicator::aborter`] can end it, [`Communicator::ready`] waits for it.
    pub fn start(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: sys::ncclUniqueId,
    ) -> Result<Self, String> {
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))?;
        let mut config = non_blocking_config();
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call (NCCL copies the config); the id is
        // the 128 bytes rank 0's ncclGetUniqueId made.
        let r = unsafe {
            sys::ncclCommInitRankConfig(&mut comm, world as i32, id, rank as i32, &mut config)
        };
        if !matches!(r, ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress) {
            return Err(format!("ncclCommInitRankConfig: {}", describe(r)));
        }
        if comm.is_null() {
            return Err("ncclCommInitRankConfig gave no communicator".into());
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                comm: Some(Handle(comm)),
                aborted: None,
            }),
            ctx,
            rank,
        });
        watch(Arc::downgrade(&shared));
        Ok(Communicator { shared, stream })
    }

    pub fn aborter(&self) -> Aborter {
        Aborter(Arc::downgrade(&self.shared))
    }

    /// Waits until the join is complete (all ranks have come); an abort ends the wait.
    pub fn ready(&self) -> Result<(), String> {
        self.settle("ncclCommInitRankConfig")
    }

    /// `op` in place on `buf`, enqueued on the communicator's stream.
    pub fn run<T: NcclType, B: DevicePtrMut<T>>(&self, op: Op, buf: &mut B) -> Result<(), String> {
        let count = buf.len();
        let dtype = T::as_nccl_type();
        // Recorded as written when `_written` drops, after the op is enqueued below.
        let (ptr, _written) = buf.device_ptr_mut(&self.stream);
        let p = ptr as *mut c_void;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let r = {
            let state = self.shared.lock();
            let comm = self.shared.live(&state, op.nccl_name())?;
            // SAFETY: `p` addresses `count` elements of `dtype` on this GPU, kept alive by
            // `buf`'s borrow; `comm` is live while the lock is held; in place is allowed.
            unsafe {
                match op {
                    Op::Sum => sys::ncclAllReduce(
                        p,
                        p,
                        count,
                        dtype,
                        sys::ncclRedOp_t::ncclSum,
                        comm,
                        stream,
                    ),
                    Op::Broadcast(root) => {
                        sys::ncclBroadcast(p, p, count, dtype, root, comm, stream)
                    }
                    Op::Reduce(root) => sys::ncclReduce(
                        p,
                        p,
                        count,
                        dtype,
                        sys::ncclRedOp_t::ncclSum,
                        root,
                        comm,
                        stream,
                    ),
                }
            }
        };
        match r {
            ncclResult_t::ncclSuccess | ncclResult_t::ncclInProgress => self.settle(op.nccl_name()),
            e => Err(self.shared.fail(op.nccl_name(), e)),
        }
    }

    /// Polls until the last call's work is handed to the stream (or the join is done), an
    /// error comes, or the communicator is aborted.
    fn settle(&self, what: &str) -> Result<(), String> {
        let mut tries = 0u32;
        loop {
            match self.shared.async_state(what)? {
                ncclResult_t::ncclSuccess => return Ok(()),
                ncclResult_t::ncclInProgress => {
                    tries += 1;
                    if tries < 1000 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                e => return Err(self.shared.fail(what, e)),
            }
        }
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // As cudarc's `Comm` does: abort frees everything without waiting on the peers, who
        // may be gone; every collective of a finished job has completed by now (its results
        // were read back).
        self.shared.abort("the communicator was dropped");
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, state: &State, what: &str) -> Result<sys::ncclComm_t, String> {
        match (state.comm, &state.aborted) {
            (Some(Handle(c)), _) => Ok(c),
            (None, why) => Err(format!(
                "{what}: rank {}: aborted: {}",
                self.rank,
                why.as_deref().unwrap_or("unknown reason")
            )),
        }
    }

    /// ncclCommGetAsyncError of the live communicator.
    fn async_state(&self, what: &str) -> Result<ncclResult_t, String> {
        let state = self.lock();
        let comm = self.live(&state, what)?;
        let mut async_state = ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live while the lock is held; `async_state` outlives the call.
        let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut async_state) };
        drop(state);
        match r {
            ncclResult_t::ncclSuccess => Ok(async_state),
            e => Err(self.fail(&format!("{what} (ncclCommGetAsyncError)"), e)),
        }
    }

    /// A failed call's message; the communicator is aborted, as NCCL asks after an error.
    fn fail(&self, what: &str, e: ncclResult_t) -> String {
        let message = format!("{what}: {}", describe(e));
        self.abort(&message);
        message
    }

    fn abort(&self, reason: &str) {
        let mut state = self.lock();
        state.aborted.get_or_insert_with(|| reason.to_string());
        let Some(Handle(comm)) = state.comm.take() else {
            return;
        };
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `comm` was live and is taken out under the lock, so no call uses it again.
        let r = unsafe { sys::ncclCommAbort(comm) };
        tracing::info!(rank = self.rank, reason, result = ?r, "NCCL communicator aborted");
    }
}

/// Aborts the communicator when NCCL reports an asynchronous error; ends with it.
fn watch(shared: Weak<Shared>) {
    let spawned = std::thread::Builder::new()
        .name("nccl-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(WATCHDOG_POLL);
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.lock().comm.is_none() {
                return; // aborted or dropped: nothing left to watch
            }
            // An error aborts the communicator inside `async_state`.
            if let Err(e) = shared.async_state("NCCL watchdog") {
                tracing::warn!(rank = shared.rank, "NCCL communicator aborted: {e}");
                return;
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no NCCL watchdog thread: {e}");
    }
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`.
fn non_blocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
        graphUsageMode: UNDEF_INT,
        numRmaCtx: UNDEF_INT,
        maxP2pPeers: UNDEF_INT,
    }
}

/// An NCCL result in NCCL's own words: the code, its text, and the last error NCCL recorded
/// (which names the cause, such as "Duplicate GPU detected").
pub(super) fn describe(e: ncclResult_t) -> String {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated strings it owns and keeps (static for the
            // error text, per thread for the last error); they are copied at once.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: plain queries; a null communicator asks for the last error of this thread.
    let (what, last) = unsafe {
        (
            text(sys::ncclGetErrorString(e)),
            text(sys::ncclGetLastError(std::ptr::null_mut())),
        )
    };
    let last = if last.is_empty() {
        " (NCCL_DEBUG=WARN makes NCCL explain itself in the log)".to_string()
    } else {
        format!("; NCCL: {last}")
    };
    format!("{e:?} ({what}){last}")
}
