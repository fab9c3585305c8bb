//! The default `--devices`: the network devices the TC program must be on.
//!
//! A NodePort flow from outside enters on the device facing the client and
//! (with `externalTrafficPolicy: Cluster`) its replies come back on the
//! device facing the pod — a bridge, a pod's veth, an overlay — so the TC
//! program belongs on every device that carries node or pod traffic:
//! - devices holding a node IP;
//! - devices the endpoints' addresses are routed to (longest prefix match
//!   in the main routing table), and devices with a route inside a cluster
//!   CIDR (a bridge, an overlay, per-pod veths of routed CNIs);
//! - every other up device with a global address (a second uplink).
//!
//! Left out: loopback, devices that are down, devices enslaved to a bridge
//! or bond (their master carries the routed traffic), dummy devices (they
//! carry nothing; e.g. kube-ipvs0) and ferry's own (`ferry*`, e.g. the DNS
//! dummy `ferry-dns`). The dataplane re-runs this every few seconds, so new
//! devices get the program; a vanished device's links die with it. Without
//! any node IP the dataplane attaches nowhere (it cannot tell the node's
//! outside from its inside).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net};

use super::loader::EbpfError;
use crate::table::ServiceTable;

/// One network device as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub up: bool,
    pub loopback: bool,
    /// Its driver (ethtool), e.g. `dummy`, `veth`, `bridge`.
    pub driver: Option<String>,
    /// A bridge port or bond slave.
    pub enslaved: bool,
    pub addrs: Vec<IpAddr>,
}

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dev: String,
    pub dst: Ipv4Net,
}

/// What the selection needs from the service table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub node_ips: Vec<Ipv4Addr>,
    /// Every endpoint's address (deduplicated).
    pub endpoints: BTreeSet<Ipv4Addr>,
    pub cluster_cidrs: Vec<Ipv4Net>,
}

fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || link_local)
        }
    }
}

/// Whether ferry must leave the device alone whatever it carries.
fn excluded(i: &Iface) -> bool {
    !i.up || i.loopback || i.enslaved || i.name.starts_with("ferry") || i.driver.as_deref() == Some("dummy")
}

/// Devices that routes point at for `endpoints` (longest prefix match)
/// or that have a route inside a cluster CIDR. Pure.
pub fn routed_devices<'a>(
    routes: &[Route],
    endpoints: impl IntoIterator<Item = &'a Ipv4Addr>,
    cluster_cidrs: &[Ipv4Net],
) -> BTreeSet<String> {
    let mut routed = BTreeSet::new();
    for ip in endpoints {
        let best = routes
            .iter()
            .filter(|r| r.dst.contains(ip))
            .max_by_key(|r| r.dst.prefix_len());
        if let Some(r) = best {
            if !routed.contains(&r.dev) {
                routed.insert(r.dev.clone());
            }
        }
    }
    for r in routes {
        if r.dst.prefix_len() > 0
            && cluster_cidrs
                .iter()
                .any(|c| c.contains(&r.dst.network()) || r.dst.contains(&c.network()))
        {
            routed.insert(r.dev.clone());
        }
    }
    routed
}

/// The devices to attach to, in `ifaces` order: not excluded, and routed
/// to (`routed_devices`), or holding a node IP, or a global address. Pure.
pub fn select(ifaces: &[Iface], routed: &BTreeSet<String>, node_ips: &[Ipv4Addr]) -> Vec<String> {
    ifaces
        .iter()
        .filter(|i| !excluded(i))
        .filter(|i| {
            routed.contains(&i.name)
                || i.addrs.iter().any(|a| match a {
                    IpAddr::V4(v4) => node_ips.contains(v4),
                    IpAddr::V6(_) => false,
                })
                || i.addrs.iter().any(is_global)
        })
        .map(|i| i.name.clone())
        .collect()
}

/// /proc/net/route: the main table's IPv4 routes that are up. Addresses
/// are the raw network-order words printed in hex (so native-endian bytes).
pub fn parse_routes(text: &str) -> Vec<Route> {
    const RTF_UP: u32 = 0x1;
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let word = |s: &str| u32::from_str_radix(s, 16).ok();
            let (dst, flags, mask) = (word(f[1])?, word(f[3])?, word(f[7])?);
            if flags & RTF_UP == 0 {
                return None;
            }
            let mask = Ipv4Addr::from(mask.to_ne_bytes());
            let prefix = u32::from(mask).leading_ones() as u8;
            let dst = Ipv4Net::new(Ipv4Addr::from(dst.to_ne_bytes()), prefix).ok()?;
            Some(Route {
                dev: f[0].to_string(),
                dst,
            })
        })
        .collect()
}

/// The devices of this network namespace, from getifaddrs (names, flags,
/// addresses), ethtool (driver) and sysfs (`master`).
pub fn interfaces() -> Result<Vec<Iface>, EbpfError> {
    let mut out: Vec<Iface> = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(EbpfError::Io {
            path: PathBuf::from("getifaddrs"),
            source: io::Error::last_os_error(),
        });
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated interface name.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(Iface {
                    up: ifa.ifa_flags & libc::IFF_UP as u32 != 0,
                    loopback: ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0,
                    driver: None,
                    enslaved: false,
                    addrs: Vec::new(),
                    name,
                });
                out.len() - 1
            }
        };
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: non-null address; its family says which sockaddr it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = if family == libc::AF_INET {
            // SAFETY: AF_INET addresses are sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        } else if family == libc::AF_INET6 {
            // SAFETY: AF_INET6 addresses are sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        } else {
            None
        };
        if let Some(ip) = ip {
            out[idx].addrs.push(ip);
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    for i in &mut out {
        i.driver = driver(&i.name);
        i.enslaved = std::path::Path::new("/sys/class/net")
            .join(&i.name)
            .join("master")
            .exists();
    }
    Ok(out)
}

/// `struct ifreq` with the `ifr_data` member of the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The device's driver name (ETHTOOL_GDRVINFO), None when it has none.
fn driver(name: &str) -> Option<String> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let cname = CString::new(name).ok()?;
    let bytes = cname.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: both structs are plain C data for which all-zero is valid.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: (&mut info as *mut DrvInfo).cast(),
        _pad: [0; 16],
    };
    for (d, s) in req.name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a plain datagram socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` points at `info`, both live for the call.
    let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq) };
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

/// Runs the selection on this network namespace, remembering what the
/// endpoint route lookups found: they are redone for all endpoints only
/// when the routes or the endpoint set as a whole changed, and for the
/// added endpoints otherwise (at 100k endpoints a whole lookup is
/// milliseconds, too much for every partial sync and every rescan).
#[derive(Debug, Default)]
pub struct Scanner {
    want: Wanted,
    /// Endpoints added since the last scan.
    added: Vec<Ipv4Addr>,
    routes_text: Option<String>,
    routed: BTreeSet<String>,
}

impl Scanner {
    /// Replaces the inputs (a full sync).
    pub fn set(&mut self, want: Wanted) {
        if want != self.want {
            self.want = want;
            self.routes_text = None;
            self.added.clear();
        }
    }

    /// Node IPs and cluster CIDRs as of now, plus endpoints that appeared
    /// (a partial sync); endpoints that went are forgotten at the next `set`.
    pub fn update(&mut self, node_ips: Vec<Ipv4Addr>, cluster_cidrs: Vec<Ipv4Net>, added: &[Ipv4Addr]) {
        if node_ips != self.want.node_ips || cluster_cidrs != self.want.cluster_cidrs {
            self.want.node_ips = node_ips;
            self.want.cluster_cidrs = cluster_cidrs;
            self.routes_text = None;
        }
        for ip in added {
            if self.want.endpoints.insert(*ip) {
                self.added.push(*ip);
            }
        }
    }

    pub fn node_ips(&self) -> &[Ipv4Addr] {
        &self.want.node_ips
    }

    /// The devices to attach to now.
    pub fn scan(&mut self) -> Result<Vec<String>, EbpfError> {
        let path = "/proc/net/route";
        let text = std::fs::read_to_string(path).map_err(|source| EbpfError::Io {
            path: PathBuf::from(path),
            source,
        })?;
        let routes = parse_routes(&text);
        if self.routes_text.as_deref() != Some(text.as_str()) {
            self.routed = routed_devices(&routes, &self.want.endpoints, &self.want.cluster_cidrs);
            self.routes_text = Some(text);
        } else if !self.added.is_empty() {
            self.routed.extend(routed_devices(&routes, &self.added, &[]));
        }
        self.added.clear();
        Ok(select(&interfaces()?, &self.routed, &self.want.node_ips))
    }
}

/// The table's IPv4 node IPs (not loopback): NodePort addresses, the
/// first one the SNAT source.
pub fn node_ips(table: &ServiceTable) -> Vec<Ipv4Addr> {
    table
        .node_ips
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
            _ => None,
        })
        .collect()
}

/// The table's IPv4 cluster CIDRs.
pub fn cluster_cidrs(table: &ServiceTable) -> Vec<Ipv4Net> {
    table
        .cluster_cidrs
        .iter()
        .filter_map(|c| match c {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect()
}

/// The selection inputs of a service table (every endpoint: a full sync).
pub fn wanted(table: &ServiceTable) -> Wanted {
    Wanted {
        node_ips: node_ips(table),
        endpoints: table
            .services
            .values()
            .flat_map(|e| e.backends.iter())
            .filter_map(|b| match b.ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        cluster_cidrs: cluster_cidrs(table),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, driver: &str, addrs: &[&str]) -> Iface {
        Iface {
            name: name.into(),
            up: true,
            loopback: name == "lo",
            driver: Some(driver.into()),
            enslaved: false,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    /// A node as the netns e2e builds it, plus what real nodes have.
    fn node() -> (Vec<Iface>, Vec<Route>) {
        let mut port = iface("vp0", "veth", &[]);
        port.enslaved = true;
        let mut down = iface("eth9", "veth", &["203.0.113.9"]);
        down.up = false;
        let ifaces = vec![
            iface("lo", "", &["127.0.0.1", "::1"]),
            iface("ext0", "veth", &["192.0.2.1", "fe80::1"]),
            iface("ext1", "veth", &["198.51.100.1"]),
            iface("br0", "bridge", &["10.244.0.1"]),
            port,
            down,
            iface("cali1234", "veth", &["fe80::ecee:eeff:feee:eeee"]),
            iface("kube-ipvs0", "dummy", &["10.96.0.10"]),
            iface("ferry-dns", "dummy", &["169.254.20.10"]),
            iface("ferry-x", "veth", &["192.0.2.77"]),
            iface("mgmt", "veth", &["fe80::2"]),
        ];
        let route = |dev: &str, net: &str| Route {
            dev: dev.into(),
            dst: net.parse().unwrap(),
        };
        let routes = vec![
            route("ext0", "0.0.0.0/0"),
            route("ext0", "192.0.2.0/24"),
            route("ext1", "198.51.100.0/24"),
            route("br0", "10.244.0.0/24"),
            route("cali1234", "10.244.5.7/32"),
            route("kube-ipvs0", "10.244.9.0/24"),
        ];
        (ifaces, routes)
    }

    #[test]
    fn node_ip_pod_routes_and_global_addresses_but_not_dummies_ports_or_ours() {
        let (ifaces, routes) = node();
        let endpoints: Vec<Ipv4Addr> = ["10.244.0.10", "10.244.5.7"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let routed = routed_devices(&routes, &endpoints, &[]);
        assert_eq!(routed, ["br0", "cali1234"].map(String::from).into_iter().collect());
        let node_ips = ["192.0.2.1".parse().unwrap()];
        assert_eq!(select(&ifaces, &routed, &node_ips), ["ext0", "ext1", "br0", "cali1234"]);
    }

    #[test]
    fn cluster_cidr_routes_count_without_endpoints() {
        let (ifaces, routes) = node();
        let cidrs = ["10.244.0.0/16".parse().unwrap()];
        let routed = routed_devices(&routes, &[], &cidrs);
        // cali1234's /32 lies in the CIDR; kube-ipvs0 is a dummy.
        assert_eq!(select(&ifaces, &routed, &[]), ["ext0", "ext1", "br0", "cali1234"]);
        // Without any hint, address-less devices are left alone.
        assert_eq!(select(&ifaces, &BTreeSet::new(), &[]), ["ext0", "ext1", "br0"]);
    }

    /// The text a little-endian machine prints.
    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_route() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
            br0\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            old\t0000F40A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_routes(text);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].dst.to_string(), "0.0.0.0/0");
        assert_eq!(r[1].dev, "br0");
        assert_eq!(r[1].dst.to_string(), "10.244.0.0/24");
    }
}
