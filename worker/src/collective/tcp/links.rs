//! A ring rank's two links: the stream from the left neighbour, read by the caller, and the
//! stream to the right one, written by a dedicated sender thread (so two neighbours sending at
//! once never deadlock on full socket buffers). Errors name the neighbour, its address and why.

use super::{describe_io, err, RECV_SEGMENT_BYTES, SEND_QUEUE};
use crate::{Error, Result};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

enum Msg {
    Data(Vec<u8>),
    Flush,
}

enum Event {
    Returned(Vec<u8>),
    Flushed,
    Failed(io::Error),
}

pub(super) struct Links {
    rank: usize,
    pub(super) left: usize,
    pub(super) left_addr: SocketAddr,
    right: usize,
    right_addr: SocketAddr,
    timeout: Duration,
    recv: TcpStream,
    /// A handle on the right stream, only to shut it down.
    send_ctl: TcpStream,
    to_sender: Option<SyncSender<Msg>>,
    events: Receiver<Event>,
    sender: Option<JoinHandle<()>>,
    pool: Vec<Vec<u8>>,
    recv_buf: Vec<u8>,
}

impl Links {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        rank: usize,
        left: usize,
        left_addr: SocketAddr,
        right: usize,
        right_addr: SocketAddr,
        recv: TcpStream,
        send: TcpStream,
        timeout: Duration,
    ) -> Result<Self> {
        let send_ctl = send.try_clone().map_err(|e| {
            err(format!(
                "rank {rank}: cannot clone the socket to rank {right}: {e}"
            ))
        })?;
        let (to_sender, msgs) = mpsc::sync_channel::<Msg>(SEND_QUEUE);
        let (ev_tx, events) = mpsc::channel::<Event>();
        let sender = std::thread::Builder::new()
            .name(format!("tcp-ring-send-{rank}"))
            .spawn(move || {
                let mut stream = send;
                while let Ok(msg) = msgs.recv() {
                    let ev = match msg {
                        Msg::Data(v) => match stream.write_all(&v) {
                            Ok(()) => Event::Returned(v),
                            Err(e) => {
                                let _ = ev_tx.send(Event::Failed(e));
                                return;
                            }
                        },
                        Msg::Flush => Event::Flushed,
                    };
                    if ev_tx.send(ev).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| err(format!("cannot spawn the sender thread: {e}")))?;
        Ok(Links {
            rank,
            left,
            left_addr,
            right,
            right_addr,
            timeout,
            recv,
            send_ctl,
            to_sender: Some(to_sender),
            events,
            sender: Some(sender),
            pool: Vec::new(),
            recv_buf: vec![0u8; RECV_SEGMENT_BYTES],
        })
    }

    fn send_error(&self, e: &io::Error) -> Error {
        err(format!(
            "rank {}: sending to rank {} ({}) failed: {}",
            self.rank,
            self.right,
            self.right_addr,
            describe_io(e, self.timeout)
        ))
    }

    fn recv_error(&self, e: &io::Error) -> Error {
        err(format!(
            "rank {}: receiving from rank {} ({}) failed: {}",
            self.rank,
            self.left,
            self.left_addr,
            describe_io(e, self.timeout)
        ))
    }

    fn sender_gone(&self) -> Error {
        // The thread only exits early after reporting a failure; find it.
        loop {
            match self.events.try_recv() {
                Ok(Event::Failed(e)) => return self.send_error(&e),
                Ok(_) => continue,
                Err(_) => {
                    return err(format!(
                        "rank {}: the sender thread to rank {} ({}) stopped",
                        self.rank, self.right, self.right_addr
                    ))
                }
            }
        }
    }

    /// Collect buffers the sender has finished with (and any failure it reported).
    fn drain_events(&mut self) -> Result<()> {
        loop {
            match self.events.try_recv() {
                Ok(Event::Returned(v)) => self.pool.push(v),
                Ok(Event::Flushed) => {}
                Ok(Event::Failed(e)) => return Err(self.send_error(&e)),
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => return Err(self.sender_gone()),
            }
        }
    }

    pub(super) fn take_buffer(&mut self) -> Result<Vec<u8>> {
        self.drain_events()?;
        let mut v = self.pool.pop().unwrap_or_default();
        v.clear();
        Ok(v)
    }

    pub(super) fn send(&mut self, v: Vec<u8>) -> Result<()> {
        let tx = self.to_sender.as_ref().expect("sender channel is open");
        if tx.send(Msg::Data(v)).is_err() {
            return Err(self.sender_gone());
        }
        Ok(())
    }

    pub(super) fn send_f32(&mut self, xs: &[f32]) -> Result<()> {
        if xs.is_empty() {
            return Ok(());
        }
        let mut v = self.take_buffer()?;
        v.resize(xs.len() * 4, 0);
        for (d, x) in v.chunks_exact_mut(4).zip(xs) {
            d.copy_from_slice(&x.to_le_bytes());
        }
        self.send(v)
    }

    pub(super) fn recv_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.recv.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.recv_error(&e)),
        }
    }

    /// Receive `dst.len()` f32s from the left; add them (`received + dst`) or copy them.
    pub(super) fn recv_f32(&mut self, dst: &mut [f32], add: bool) -> Result<()> {
        let per_seg = RECV_SEGMENT_BYTES / 4;
        for seg in dst.chunks_mut(per_seg) {
            let bytes = seg.len() * 4;
            let mut tmp = std::mem::take(&mut self.recv_buf);
            let r = self.recv.read_exact(&mut tmp[..bytes]);
            if let Err(e) = r {
                self.recv_buf = tmp;
                return Err(self.recv_error(&e));
            }
            let src = tmp[..bytes]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if add {
                for (d, x) in seg.iter_mut().zip(src) {
                    *d += x; // partial-so-far + own: addition commutes, so the bits are fixed
                }
            } else {
                for (d, x) in seg.iter_mut().zip(src) {
                    *d = x;
                }
            }
            self.recv_buf = tmp;
        }
        Ok(())
    }

    /// Wait until everything queued has been written to the socket.
    pub(super) fn flush(&mut self) -> Result<()> {
        let tx = self.to_sender.as_ref().expect("sender channel is open");
        if tx.send(Msg::Flush).is_err() {
            return Err(self.sender_gone());
        }
        // The sender's writes time out on their own; this bound is only a backstop.
        let limit = self.timeout * 2 + Duration::from_secs(1);
        loop {
            match self.events.recv_timeout(limit) {
                Ok(Event::Returned(v)) => self.pool.push(v),
                Ok(Event::Flushed) => return Ok(()),
                Ok(Event::Failed(e)) => return Err(self.send_error(&e)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(err(format!(
                        "rank {}: sending to rank {} ({}) did not finish within {:?}",
                        self.rank, self.right, self.right_addr, limit
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.sender_gone()),
            }
        }
    }

    pub(super) fn shutdown(&self) {
        let _ = self.recv.shutdown(Shutdown::Both);
        let _ = self.send_ctl.shutdown(Shutdown::Both);
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // Closing the channel ends the sender thread once its queue is written; if the ring
        // broke, the sockets are already shut so pending writes fail at once.
        self.to_sender = None;
        if let Some(h) = self.sender.take() {
            let _ = h.join();
        }
    }
}
