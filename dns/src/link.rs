//! The node-local DNS addresses: the cluster DNS Service's ClusterIPs as
//! local addresses of `lo`, labelled `lo:ferry-dns`, so queries that pods
//! send to those IPs are delivered to ferry's sockets on this node without
//! any NAT (NodeLocal DNSCache's trick; it uses a dummy device, which needs
//! a kernel module that some VM kernels lack, while `lo` is always there
//! and takes any address, as LVS direct-routing servers do). The label is
//! how ferry finds its own addresses again. Spoken over rtnetlink
//! directly, so the image needs no `ip` tool.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/rtnetlink.h, if_link.h, if_addr.h, netlink.h
const NETLINK_ROUTE: i32 = 0;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_LABEL: u16 = 3;
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_HOST: u8 = 254;

/// The device the addresses live on.
const DEVICE: &str = "lo";
/// Default label of ferry's addresses (`<device>:<name>`, at most 15 bytes).
pub const DEFAULT_LABEL: &str = "lo:ferry-dns";

/// One rtnetlink request: header, fixed part, attributes.
struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Msg {
        let mut b = vec![0u8; 16];
        b[4..6].copy_from_slice(&kind.to_ne_bytes());
        b[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        b[8..12].copy_from_slice(&1u32.to_ne_bytes());
        b.extend_from_slice(fixed);
        let mut m = Msg(b);
        m.align();
        m
    }

    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.align();
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn ifaddrmsg(ip: IpAddr, index: u32) -> [u8; 8] {
    let (family, prefix) = match ip {
        IpAddr::V4(_) => (libc::AF_INET as u8, 32),
        IpAddr::V6(_) => (libc::AF_INET6 as u8, 128),
    };
    let mut b = [0u8; 8];
    b[0] = family;
    b[1] = prefix;
    b[2] = IFA_F_NODAD;
    // Host scope: the address is for this node's own sockets, never used as
    // a source for traffic leaving it.
    b[3] = RT_SCOPE_HOST;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: valid fd and a pointer to a timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Socket(fd))
    }

    fn send(&self, msg: Vec<u8>) -> io::Result<()> {
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: buffer and address are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until the ACK (or error) of a request, or the end of
    /// a dump; `each` sees every other message (type, payload).
    fn recv(&self, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut data = buf.get(..n as usize).unwrap_or(&[]);
            while data.len() >= 16 {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                if len < 16 || len > data.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                let payload = &data[16..len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EIO);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    _ => each(kind, payload),
                }
                data = &data[((len + 3) & !3).min(data.len())..];
            }
        }
    }

    fn request(&self, msg: Msg) -> io::Result<()> {
        self.send(msg.finish())?;
        self.recv(|_, _| {})
    }
}

fn index_of(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn label_bytes(label: &str) -> Vec<u8> {
    let mut b = label.as_bytes().to_vec();
    b.push(0);
    b
}

fn device_index() -> io::Result<u32> {
    index_of(DEVICE).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no {DEVICE} device")))
}

fn delete(sock: &Socket, index: u32, ip: IpAddr) -> io::Result<()> {
    let mut m = Msg::new(RTM_DELADDR, NLM_F_ACK, &ifaddrmsg(ip, index));
    m.attr(IFA_LOCAL, &ip_bytes(ip));
    match sock.request(m) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), format!("removing {ip} from {DEVICE}: {e}"))),
    }
}

/// Makes the addresses labelled `label` exactly `ips`. Returns the ones it
/// added. An address that is already local under another label is left to
/// its owner (and reported as not added).
pub fn ensure(label: &str, ips: &[IpAddr]) -> io::Result<Vec<IpAddr>> {
    let sock = Socket::open()?;
    let index = device_index()?;
    let have = addresses(&sock, index, label)?;
    for ip in have.iter().filter(|ip| !ips.contains(ip)) {
        delete(&sock, index, *ip)?;
    }
    let mut added = Vec::new();
    for ip in ips.iter().filter(|ip| !have.contains(ip)) {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE, &ifaddrmsg(*ip, index));
        m.attr(IFA_LOCAL, &ip_bytes(*ip));
        m.attr(IFA_ADDRESS, &ip_bytes(*ip));
        if ip.is_ipv4() {
            // IPv6 has no address labels.
            m.attr(IFA_LABEL, &label_bytes(label));
        }
        match sock.request(m) {
            Ok(()) => added.push(*ip),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("adding {ip} to {DEVICE}: {e}"))),
        }
    }
    Ok(added)
}

/// Removes every address labelled `label`; returns how many there were.
pub fn remove(label: &str) -> io::Result<usize> {
    let sock = Socket::open()?;
    let index = device_index()?;
    let have = addresses(&sock, index, label)?;
    for ip in &have {
        delete(&sock, index, *ip)?;
    }
    Ok(have.len())
}

/// The IPv4 addresses of device `index` labelled `label`. IPv6 has no
/// address labels: IPv6 addresses are added but, since ferry cannot tell
/// them from an administrator's, never removed.
fn addresses(sock: &Socket, index: u32, label: &str) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let want_label = label.as_bytes();
    let mut fixed = [0u8; 8];
    fixed[0] = libc::AF_INET as u8;
    sock.send(Msg::new(RTM_GETADDR, NLM_F_DUMP, &fixed).finish())?;
    sock.recv(|kind, payload| {
        if kind != RTM_NEWADDR || payload.len() < 8 {
            return;
        }
        let msg_index = u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]);
        if msg_index != index {
            return;
        }
        let mut attrs = &payload[8..];
        let mut local = None;
        let mut address = None;
        let mut labelled = false;
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
            if len < 4 || len > attrs.len() {
                break;
            }
            let data = &attrs[4..len];
            let ip = match data.len() {
                4 => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
                _ => None,
            };
            match kind {
                IFA_LOCAL => local = ip,
                IFA_ADDRESS => address = ip,
                IFA_LABEL => labelled = data.split(|b| *b == 0).next() == Some(want_label),
                _ => {}
            }
            attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
        }
        let Some(ip) = local.or(address) else {
            return;
        };
        if labelled && ip.is_ipv4() {
            out.push(ip);
        }
    })?;
    Ok(out)
}
