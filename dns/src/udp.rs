//! Batched UDP I/O for the answer loops: `recvmmsg` takes every request
//! queued on the socket (up to `BATCH`) in one system call and `sendmmsg`
//! sends all their replies in one more, so that under load a socket thread
//! spends its time answering rather than entering the kernel twice per
//! query (nsd and knot do the same).
//!
//! The unsafe code is confined to the two calls: the message headers point
//! into buffers owned by `Batch` that outlive each call, and lengths come
//! from the kernel's return values, clamped to those buffers.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

/// The most UDP workers `default_workers` picks.
pub const DEFAULT_WORKERS_MAX: usize = 4;

/// The UDP worker count when none is configured: one per core (at most
/// `DEFAULT_WORKERS_MAX`).
///
/// ferry answers the pods of its own node, so its clients run on the same
/// cores, and a thread that waits for the socket while another answers
/// would take CPU from them. It does not: one thread at a time owns the
/// socket, and the others only join when requests queue up faster than it
/// answers them or while it is descheduled (`crate::gate`), which is when
/// one thread alone loses time to the clients. On 2 cores shared with
/// dnsperf, two threads answered 1.09-1.15x the queries of one, at the same CPU
/// per query, with no query lost on either side (`cargo xtask bench dns`).
/// Before the threads took turns, every waiting thread was woken per
/// datagram: two threads then cost 1.3-1.4x the CPU per query of one, and (with
/// a socket each) their replies came in bursts that overflowed dnsperf's
/// receive buffers, so the default was one per two cores.
pub fn default_workers() -> usize {
    workers_for_cores(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `default_workers` for a machine of `cores` cores.
pub fn workers_for_cores(cores: usize) -> usize {
    cores.clamp(1, DEFAULT_WORKERS_MAX)
}

/// Requests taken per `recvmmsg`.
pub const BATCH: usize = 32;
/// Bytes kept per request; a larger request arrives truncated and is
/// dropped (a query is far smaller).
pub const REQUEST_MAX: usize = 4096;

/// Receive buffers and peer addresses for one batch, and the replies to
/// send back.
///
/// The message headers of both calls live on the heap with the buffers
/// they point into, built once: a `recvmmsg` only resets the address
/// lengths the previous call overwrote, and a `sendmmsg` fills the headers
/// of the replies it sends, rather than zeroing and rebuilding 32 headers
/// (4 KiB) per call, which cost more instructions than answering a query.
pub struct Batch {
    bufs: Vec<u8>,
    rx_iovs: Box<[libc::iovec]>,
    rx: Box<[libc::mmsghdr]>,
    peers: Box<[libc::sockaddr_storage]>,
    lens: [usize; BATCH],
    truncated: [bool; BATCH],
    /// The first `dirty` receive headers' address lengths were overwritten
    /// by the kernel.
    dirty: usize,
    received: usize,
    /// Reply bytes, back to back, and per reply (request index, start, len).
    replies: Vec<u8>,
    outgoing: Vec<(usize, usize, usize)>,
    tx_iovs: Box<[libc::iovec]>,
    tx: Box<[libc::mmsghdr]>,
}

const NO_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

const PEER_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

fn empty_headers() -> Box<[libc::mmsghdr]> {
    // SAFETY: mmsghdr is plain old data; zeroed is a valid empty header.
    (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect()
}

impl Default for Batch {
    fn default() -> Self {
        let mut b = Batch {
            bufs: vec![0; BATCH * REQUEST_MAX],
            rx_iovs: vec![NO_IOV; BATCH].into_boxed_slice(),
            rx: empty_headers(),
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a
            // valid (AF_UNSPEC) value.
            peers: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            lens: [0; BATCH],
            truncated: [false; BATCH],
            dirty: 0,
            received: 0,
            replies: Vec::with_capacity(BATCH * 512),
            outgoing: Vec::with_capacity(BATCH),
            tx_iovs: vec![NO_IOV; BATCH].into_boxed_slice(),
            tx: empty_headers(),
        };
        // The receive headers point into heap memory owned by `b`, which
        // never reallocates: `bufs`, `rx_iovs` and `peers` keep their length.
        for (i, chunk) in b.bufs.chunks_mut(REQUEST_MAX).enumerate().take(BATCH) {
            b.rx_iovs[i].iov_base = chunk.as_mut_ptr().cast();
            b.rx_iovs[i].iov_len = chunk.len();
            let h = &mut b.rx[i].msg_hdr;
            h.msg_iov = &mut b.rx_iovs[i];
            h.msg_iovlen = 1;
            h.msg_name = (&mut b.peers[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = PEER_LEN;
        }
        b
    }
}

impl Batch {
    /// Blocks until at least one request is queued (or the socket's read
    /// timeout passes), then takes every queued one up to `BATCH`.
    pub fn recv(&mut self, sock: &UdpSocket) -> std::io::Result<usize> {
        self.receive(sock, libc::MSG_WAITFORONE)
    }

    /// Takes the requests queued now (up to `BATCH`), without waiting:
    /// `WouldBlock` when there are none.
    pub fn try_recv(&mut self, sock: &UdpSocket) -> std::io::Result<usize> {
        self.receive(sock, libc::MSG_DONTWAIT)
    }

    fn receive(&mut self, sock: &UdpSocket, flags: libc::c_int) -> std::io::Result<usize> {
        self.received = 0;
        self.replies.clear();
        self.outgoing.clear();
        for m in self.rx.iter_mut().take(self.dirty) {
            m.msg_hdr.msg_namelen = PEER_LEN;
        }
        self.dirty = 0;
        let want = self.rx.len().min(BATCH);
        // SAFETY: every header points at an iovec, a buffer and an address
        // slot on the heap owned by `self` (set up in `default`, never
        // reallocated), all alive for the whole call; the kernel writes at
        // most the lengths given.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                self.rx.as_mut_ptr(),
                want as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (n as usize).min(want);
        self.dirty = n;
        for (i, m) in self.rx.iter().enumerate().take(n) {
            self.lens[i] = (m.msg_len as usize).min(REQUEST_MAX);
            self.truncated[i] = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        }
        self.received = n;
        Ok(n)
    }

    /// Request `i` of the last `recv`, unless it arrived truncated.
    pub fn request(&self, i: usize) -> Option<&[u8]> {
        if i >= self.received || self.truncated[i] {
            return None;
        }
        self.bufs.get(i * REQUEST_MAX..i * REQUEST_MAX + self.lens[i])
    }

    /// The sender of request `i`.
    pub fn peer(&self, i: usize) -> Option<SocketAddr> {
        if i >= self.received {
            return None;
        }
        sockaddr_to_std(self.peers.get(i)?, self.rx.get(i)?.msg_hdr.msg_namelen)
    }

    /// Queues `reply` for the sender of request `i`.
    pub fn reply(&mut self, i: usize, reply: &[u8]) {
        if i < self.received {
            let start = self.replies.len();
            self.replies.extend_from_slice(reply);
            self.outgoing.push((i, start, reply.len()));
        }
    }

    /// Sends every queued reply; returns how many the kernel took.
    pub fn send(&mut self, sock: &UdpSocket) -> usize {
        let mut count = 0;
        // `replies` no longer grows: the pointers into it stay valid.
        for &(i, start, len) in self.outgoing.iter().take(BATCH) {
            let (Some(bytes), Some(rx)) = (self.replies.get_mut(start..start + len), self.rx.get(i)) else {
                continue;
            };
            let iov = &mut self.tx_iovs[count];
            iov.iov_base = bytes.as_mut_ptr().cast();
            iov.iov_len = len;
            let h = &mut self.tx[count].msg_hdr;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h.msg_name = rx.msg_hdr.msg_name;
            h.msg_namelen = rx.msg_hdr.msg_namelen;
            count += 1;
        }
        let mut sent = 0;
        // Bounded: each round sends at least one message or stops.
        while sent < count {
            // SAFETY: headers [sent, count) point into `self.replies`,
            // `self.peers` and `self.tx_iovs`, all alive and unmoved for
            // the call.
            let n = unsafe {
                libc::sendmmsg(
                    sock.as_raw_fd(),
                    self.tx[sent..].as_mut_ptr(),
                    (count - sent) as libc::c_uint,
                    0,
                )
            };
            if n <= 0 {
                // A reply the kernel refuses (no buffer, bad peer) is lost
                // like a datagram; skip it and send the rest.
                sent += 1;
                continue;
            }
            sent += n as usize;
        }
        self.outgoing.clear();
        sent
    }
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(ss.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a sockaddr_in, and
            // sockaddr_storage is larger and suitably aligned for it.
            let sin = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies go to the sender of each request, batch after batch (the
    /// headers are reused, so a stale address or length would misdirect).
    #[test]
    fn replies_reach_each_sender_across_batches() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let addr = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for c in &clients {
            c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        }
        let mut batch = Batch::default();
        for round in 0..3u8 {
            // Round 0: all three clients; then fewer, so the batch shrinks.
            let senders = &clients[..clients.len() - usize::from(round).min(2)];
            for (k, c) in senders.iter().enumerate() {
                c.send_to(&[round, k as u8], addr).unwrap();
            }
            let mut got = 0;
            while got < senders.len() {
                let n = batch.recv(&server).unwrap();
                for i in 0..n {
                    let req = batch.request(i).unwrap().to_vec();
                    assert_eq!(req[0], round);
                    let peer = batch.peer(i).unwrap();
                    assert_eq!(peer, senders[usize::from(req[1])].local_addr().unwrap());
                    batch.reply(i, &[b'r', req[0], req[1]]);
                }
                assert_eq!(batch.send(&server), n);
                got += n;
            }
            for (k, c) in senders.iter().enumerate() {
                let mut buf = [0u8; 16];
                let (len, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!(from, addr);
                assert_eq!(&buf[..len], &[b'r', round, k as u8]);
            }
        }
    }

    #[test]
    fn default_workers_one_per_core_up_to_the_cap() {
        assert_eq!(workers_for_cores(0), 1);
        assert_eq!(workers_for_cores(1), 1);
        assert_eq!(workers_for_cores(2), 2);
        assert_eq!(workers_for_cores(3), 3);
        assert_eq!(workers_for_cores(8), DEFAULT_WORKERS_MAX);
        assert_eq!(workers_for_cores(64), DEFAULT_WORKERS_MAX);
        assert!(default_workers() >= 1);
    }
}
