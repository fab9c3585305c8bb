//! BPF programs for the eBPF service dataplane, written in C
//! (`src/*.bpf.c`), compiled by `build.rs` with clang and embedded here, plus
//! the `#[repr(C)]` mirrors of the key/value structs in `src/ferry_maps.h`.
//!
//! Addresses and ports in these structs are stored in network byte order, as
//! the kernel presents them to `cgroup/sock_addr` programs; the constructors
//! take host values and do the conversion once, on the control path.

use std::net::Ipv4Addr;

/// 8-byte aligned wrapper: aya parses the ELF in place and needs alignment.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static SOCK_OBJ: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/sock.bpf.o")));

/// The socket-level load balancer object: `cgroup/connect4`, `sendmsg4`,
/// `recvmsg4`, `getpeername4` and the four maps below.
pub fn sock_object() -> &'static [u8] {
    &SOCK_OBJ.0
}

static TC_OBJ: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/tc.bpf.o")));

/// The TC object (`src/tc.bpf.c`): `ferry_tc_ingress` / `ferry_tc_egress`
/// for traffic from outside the node; shares the services, backends and
/// affinity maps with the sock object through their pins.
pub fn tc_object() -> &'static [u8] {
    &TC_OBJ.0
}

pub const PROG_TC_INGRESS: &str = "ferry_tc_ingress";
pub const PROG_TC_EGRESS: &str = "ferry_tc_egress";

/// Program names in the sock object, with the cgroup hook each attaches to.
pub const PROG_CONNECT4: &str = "ferry_connect4";
pub const PROG_SENDMSG4: &str = "ferry_sendmsg4";
pub const PROG_RECVMSG4: &str = "ferry_recvmsg4";
pub const PROG_GETPEERNAME4: &str = "ferry_getpeername4";
pub const SOCK_PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_SENDMSG4, PROG_RECVMSG4, PROG_GETPEERNAME4];

/// Map names (also their pin file names under the bpffs directory).
pub const MAP_SERVICES: &str = "ferry_services";
pub const MAP_BACKENDS: &str = "ferry_backends";
pub const MAP_AFFINITY: &str = "ferry_affinity";
pub const MAP_REVNAT: &str = "ferry_revnat";
/// TC conntrack (LRU) and the TC program's config (`[0]` = SNAT address).
pub const MAP_CT: &str = "ferry_ct";
pub const MAP_TC_CONFIG: &str = "ferry_tc_config";
pub const MAPS: [&str; 6] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_AFFINITY,
    MAP_REVNAT,
    MAP_CT,
    MAP_TC_CONFIG,
];

/// `SvcVal::flags`: sessionAffinity ClientIP.
pub const SVC_AFFINITY: u16 = 0x1;
/// `SvcVal::flags`: externalTrafficPolicy Local (the TC program keeps the client address).
pub const SVC_EXT_LOCAL: u16 = 0x2;
/// `SvcVal::flags`: no backend here but remote ones exist: the TC program drops.
pub const SVC_DROP: u16 = 0x4;

/// `SvcKey::scope`: entries the socket LB reads.
pub const SCOPE_SOCKET: u8 = 0;
/// `SvcKey::scope`: entries the TC program reads.
pub const SCOPE_EXTERNAL: u8 = 1;

/// IANA protocol numbers as the kernel reports `sk_protocol`.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// A frontend: (address, port, protocol), network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_SOCKET` or `SCOPE_EXTERNAL`.
    pub scope: u8,
}

impl SvcKey {
    /// A frontend as the socket LB looks it up (connects made on this node).
    pub fn new(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            proto,
            scope: SCOPE_SOCKET,
        }
    }

    /// A frontend as the TC program looks it up (packets from outside).
    pub fn external(addr: Ipv4Addr, port: u16, proto: u8) -> Self {
        Self {
            scope: SCOPE_EXTERNAL,
            ..Self::new(addr, port, proto)
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.addr))
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Backend set `id` with `count` slots; `count == 0` rejects.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SvcVal {
    pub id: u32,
    pub count: u16,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub id: u32,
    pub slot: u32,
}

/// One endpoint, network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

impl Backend {
    pub fn new(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            addr: u32::from(addr).to_be(),
            port: port.to_be(),
            pad: 0,
        }
    }

    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from_be(self.addr))
    }

    pub fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub id: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AffinityVal {
    pub last_used_ns: u64,
    pub backend: Backend,
    pub slot: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RevNatVal {
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

// SAFETY: all of these are #[repr(C)], made only of integers, with explicit
// padding fields, so every bit pattern is valid and there are no holes.
unsafe impl aya::Pod for SvcKey {}
unsafe impl aya::Pod for SvcVal {}
unsafe impl aya::Pod for BackendKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityVal {}
unsafe impl aya::Pod for RevNatKey {}
unsafe impl aya::Pod for RevNatVal {}

/// `name size` and `name.field offset` lines printed by the C side
/// (`src/layout.c`, built and run by build.rs).
pub const C_LAYOUT: &str = include_str!(concat!(env!("OUT_DIR"), "/layout.txt"));

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn rust_layout_matches_c() {
        let c: HashMap<&str, usize> = C_LAYOUT
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k, v.parse().unwrap())
            })
            .collect();
        let rust: Vec<(&str, usize)> = vec![
            ("ferry_svc_key", size_of::<SvcKey>()),
            ("ferry_svc_key.addr", offset_of!(SvcKey, addr)),
            ("ferry_svc_key.port", offset_of!(SvcKey, port)),
            ("ferry_svc_key.proto", offset_of!(SvcKey, proto)),
            ("ferry_svc_val", size_of::<SvcVal>()),
            ("ferry_svc_val.id", offset_of!(SvcVal, id)),
            ("ferry_svc_val.count", offset_of!(SvcVal, count)),
            ("ferry_svc_val.flags", offset_of!(SvcVal, flags)),
            ("ferry_svc_val.affinity_timeout", offset_of!(SvcVal, affinity_timeout)),
            ("ferry_backend_key", size_of::<BackendKey>()),
            ("ferry_backend_key.id", offset_of!(BackendKey, id)),
            ("ferry_backend_key.slot", offset_of!(BackendKey, slot)),
            ("ferry_backend", size_of::<Backend>()),
            ("ferry_backend.addr", offset_of!(Backend, addr)),
            ("ferry_backend.port", offset_of!(Backend, port)),
            ("ferry_affinity_key", size_of::<AffinityKey>()),
            ("ferry_affinity_key.netns_cookie", offset_of!(AffinityKey, netns_cookie)),
            ("ferry_affinity_key.id", offset_of!(AffinityKey, id)),
            ("ferry_affinity_val", size_of::<AffinityVal>()),
            ("ferry_affinity_val.last_used_ns", offset_of!(AffinityVal, last_used_ns)),
            ("ferry_affinity_val.backend", offset_of!(AffinityVal, backend)),
            ("ferry_affinity_val.slot", offset_of!(AffinityVal, slot)),
            ("ferry_revnat_key", size_of::<RevNatKey>()),
            ("ferry_revnat_key.cookie", offset_of!(RevNatKey, cookie)),
            ("ferry_revnat_key.addr", offset_of!(RevNatKey, addr)),
            ("ferry_revnat_key.port", offset_of!(RevNatKey, port)),
            ("ferry_revnat_val", size_of::<RevNatVal>()),
            ("ferry_revnat_val.addr", offset_of!(RevNatVal, addr)),
            ("ferry_revnat_val.port", offset_of!(RevNatVal, port)),
        ];
        assert_eq!(rust.len(), c.len(), "every C layout line is checked");
        for (name, value) in rust {
            assert_eq!(c.get(name), Some(&value), "{name}");
        }
    }

    #[test]
    fn object_is_an_aligned_bpf_elf() {
        let obj = sock_object();
        assert_eq!(obj.as_ptr() as usize % 8, 0);
        assert_eq!(&obj[..4], b"\x7fELF");
        // e_machine at offset 18 (little endian): EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([obj[18], obj[19]]), 247);
    }

    #[test]
    fn constructors_store_network_order() {
        let k = SvcKey::new(Ipv4Addr::new(127, 10, 0, 1), 80, IPPROTO_TCP);
        assert_eq!(k.addr.to_ne_bytes(), [127, 10, 0, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!((k.ip(), k.port()), (Ipv4Addr::new(127, 10, 0, 1), 80));
        let b = Backend::new(Ipv4Addr::new(127, 0, 0, 2), 8080);
        assert_eq!((b.ip(), b.port()), (Ipv4Addr::new(127, 0, 0, 2), 8080));
    }
}
