//! Batched UDP I/O for the DNS server: one `recvmmsg` takes up to
//! [`BATCH`] queries, one `sendmmsg` sends their answers (instead of a
//! `recvfrom` and a `sendto` per query: most of a DNS server's time is
//! these system calls).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::debug;

/// Datagrams per system call.
pub(crate) const BATCH: usize = 32;

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4((*v4).into()))
    } else {
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }
}

/// Buffers for one `recvmmsg`. (The message headers hold raw pointers, so
/// they are made per call, inside the non-async part: two small allocations
/// per batch.)
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// Length and source of each datagram of the last batch.
    got: Vec<(usize, Option<SocketAddr>)>,
}

impl RecvBatch {
    /// [`BATCH`] buffers of `buf_len` bytes.
    pub(crate) fn new(buf_len: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0; buf_len]).collect(),
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Waits until the socket is readable, then receives what is queued
    /// (at most [`BATCH`] datagrams, at least one). A batch that is not
    /// full emptied the queue: the socket's readiness is cleared then
    /// (saving the call that would only return EAGAIN).
    pub(crate) async fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        loop {
            socket.readable().await?;
            let mut short = 0;
            let r = socket.try_io(Interest::READABLE, || {
                let n = self.recv_now(socket.as_raw_fd())?;
                if n < BATCH {
                    short = n;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            if short > 0 {
                return Ok(short);
            }
            match r {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_now(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        self.got.clear();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(b.as_mut_slice())])
            .collect();
        let msgs = recvmmsg(
            fd,
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        for m in msgs {
            self.got
                .push((m.bytes, m.address.as_ref().and_then(to_std)));
        }
        if self.got.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last batch: its bytes and source.
    pub(crate) fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        let (len, src) = *self.got.get(i)?;
        let buf = self.bufs.get(i)?;
        Some((buf.get(..len).unwrap_or(buf), src?))
    }
}

/// Answers collected while a batch is handled, sent with `sendmmsg`.
pub(crate) struct SendBatch {
    replies: Vec<(Vec<u8>, SocketAddr)>,
}

impl SendBatch {
    pub(crate) fn new() -> Self {
        Self {
            replies: Vec::with_capacity(BATCH),
        }
    }

    /// Queue an answer (empty ones are not sent).
    pub(crate) fn push(&mut self, reply: Vec<u8>, dst: SocketAddr) {
        if !reply.is_empty() {
            self.replies.push((reply, dst));
        }
    }

    /// Send what is queued. A full socket buffer makes it wait for room,
    /// like `send_to`; a datagram the kernel refuses is dropped (logged).
    pub(crate) async fn flush(&mut self, socket: &UdpSocket) {
        let mut sent = 0;
        while sent < self.replies.len() {
            let r = socket.try_io(Interest::WRITABLE, || {
                Self::send_now(self.replies.get(sent..).unwrap_or(&[]), socket.as_raw_fd())
            });
            match r {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if socket.writable().await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    // The first datagram was refused (e.g. an unreachable
                    // destination): skip it, keep the others.
                    let dst = self.replies.get(sent).map(|r| r.1);
                    debug!(?dst, error = %e, "DNS UDP send failed");
                    sent += 1;
                }
            }
        }
        self.replies.clear();
    }

    fn send_now(replies: &[(Vec<u8>, SocketAddr)], fd: std::os::fd::RawFd) -> io::Result<usize> {
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let replies = replies.get(..BATCH).unwrap_or(replies);
        let iovs: Vec<[IoSlice<'_>; 1]> = replies
            .iter()
            .map(|(b, _)| [IoSlice::new(b.as_slice())])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> = replies
            .iter()
            .map(|(_, a)| Some(SockaddrStorage::from(*a)))
            .collect();
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let r = sendmmsg(
            fd,
            &mut headers,
            iovs.iter(),
            addrs,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(r.count())
    }
}
