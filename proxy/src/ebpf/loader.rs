//! The kernel side of the eBPF dataplane: mounting bpffs when missing,
//! loading the socket-LB object with aya, attaching its four programs to a
//! cgroup v2, pinning maps and links under one bpffs directory, adopting
//! them after a restart, writing map ops, and removing everything.
//!
//! Pins (`<dir>/ferry_services`, …, `<dir>/link_ferry_connect4`, …) are what
//! make a restart seamless: the links keep the programs attached and the
//! maps keep their contents while no ferry runs, and the next ferry opens
//! the same maps instead of loading anything.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::net::Ipv4Addr;

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType};
use aya::EbpfLoader;
use ferry_ebpf::{Backend, BackendKey, SvcKey, SvcVal};

use super::entries::{MapEntries, Op};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub(crate) const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Default pin directory: where a restarted ferry finds its maps and links.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/ferry";
const HINT: &str = "the eBPF dataplane cannot run here; use --mode iptables";

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("bpffs: {path} is not on a bpf filesystem and could not be mounted ({reason}); {HINT}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("cgroup v2: {path} is not a cgroup2 directory ({reason}); pass --cgroup PATH of a cgroup v2, or {HINT}")]
    Cgroup { path: PathBuf, reason: String },
    #[error(
        "loading BPF object: {0}; missing CAP_BPF/CAP_NET_ADMIN or a kernel too old (needs ≥ 5.8 with BTF)? {HINT}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("BPF program {name}: {source}; missing CAP_BPF/CAP_NET_ADMIN or cgroup sock_addr support? {HINT}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> EbpfError + '_ {
    move |source| EbpfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// Makes sure `dir` exists on a bpffs, mounting one on its parent when the
/// parent is the conventional `/sys/fs/bpf` and nothing is mounted there.
pub fn ensure_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let bpffs_err = |reason: String| EbpfError::Bpffs {
        path: dir.to_path_buf(),
        reason,
    };
    let magic = statfs_magic(parent).map_err(|e| bpffs_err(format!("statfs {}: {e}", parent.display())))?;
    if magic != BPF_FS_MAGIC {
        if parent != Path::new("/sys/fs/bpf") {
            return Err(bpffs_err(format!("{} is not a bpffs mount", parent.display())));
        }
        mount_bpffs(parent).map_err(|e| bpffs_err(format!("mount -t bpf bpf {}: {e}", parent.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let src = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn check_cgroup(path: &Path) -> Result<File, EbpfError> {
    let cg_err = |reason: String| EbpfError::Cgroup {
        path: path.to_path_buf(),
        reason,
    };
    match statfs_magic(path) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(m) => return Err(cg_err(format!("filesystem magic {m:#x}, not cgroup2"))),
        Err(e) => return Err(cg_err(e.to_string())),
    }
    File::open(path).map_err(|e| cg_err(e.to_string()))
}

fn link_pin(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("link_{prog}"))
}

/// Handles on the pinned services and backends maps; the programs
/// themselves live on in their pinned links.
pub struct SockLb {
    services: HashMap<MapData, SvcKey, SvcVal>,
    backends: HashMap<MapData, BackendKey, Backend>,
    /// True when this instance found links in place and loaded nothing.
    pub adopted: bool,
    pub dir: PathBuf,
}

impl std::fmt::Debug for SockLb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockLb")
            .field("dir", &self.dir)
            .field("adopted", &self.adopted)
            .finish()
    }
}

fn typed<K: aya::Pod, V: aya::Pod>(name: &str, map: Map) -> Result<HashMap<MapData, K, V>, EbpfError> {
    HashMap::try_from(map).map_err(|source| EbpfError::Map {
        name: name.into(),
        source,
    })
}

fn map_err(name: &str) -> impl FnOnce(MapError) -> EbpfError + '_ {
    move |source| EbpfError::Map {
        name: name.to_string(),
        source,
    }
}

impl SockLb {
    /// Adopts the pinned links and maps in `dir` when all are there; else
    /// loads the object (reusing any pinned maps), attaches the programs to
    /// `cgroup` and pins the links.
    pub fn open(dir: &Path, cgroup: &Path) -> Result<SockLb, EbpfError> {
        SockLb::open_with(dir, || Ok(cgroup.to_path_buf()))
    }

    /// `open`, finding the cgroup only when it is needed (not when the
    /// pinned links are adopted: a restart then needs no cgroup at all).
    pub fn open_with(dir: &Path, cgroup: impl FnOnce() -> Result<PathBuf, EbpfError>) -> Result<SockLb, EbpfError> {
        let all_linked = ferry_ebpf::SOCK_PROGRAMS.iter().all(|p| link_pin(dir, p).exists());
        let all_maps = [ferry_ebpf::MAP_SERVICES, ferry_ebpf::MAP_BACKENDS]
            .iter()
            .all(|m| dir.join(m).exists());
        // Check the cgroup before creating anything, so a bad --cgroup leaves no pin directory.
        let cg = if all_linked && all_maps {
            None
        } else {
            let path = cgroup()?;
            let file = check_cgroup(&path)?;
            tracing::info!(cgroup = %path.display(), "attaching the socket LB");
            Some(file)
        };
        ensure_bpffs(dir)?;
        let Some(cg) = cg else {
            let open = |name: &str| -> Result<Map, EbpfError> {
                let md = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
                Map::from_map_data(md).map_err(map_err(name))
            };
            return Ok(SockLb {
                services: typed(ferry_ebpf::MAP_SERVICES, open(ferry_ebpf::MAP_SERVICES)?)?,
                backends: typed(ferry_ebpf::MAP_BACKENDS, open(ferry_ebpf::MAP_BACKENDS)?)?,
                adopted: true,
                dir: dir.to_path_buf(),
            });
        };
        // A partial set of links (a crash mid-attach) is replaced whole.
        for p in ferry_ebpf::SOCK_PROGRAMS {
            unpin_link(&link_pin(dir, p))?;
        }
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(ferry_ebpf::sock_object())
            .map_err(EbpfError::Load)?;
        for name in ferry_ebpf::SOCK_PROGRAMS {
            let perr = |source| EbpfError::Program { name, source };
            let prog: &mut CgroupSockAddr = bpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(perr)?;
            prog.load().map_err(perr)?;
            // bpf_link_create: cgroup links always coexist (flags must be 0).
            let link_id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
            let link = prog.take_link(link_id).map_err(perr)?;
            let fd_link: FdLink = link.try_into().map_err(|source| EbpfError::Link { name, source })?;
            let path = link_pin(dir, name);
            fd_link.pin(&path).map_err(|source| EbpfError::Pin { path, source })?;
        }
        let take = |bpf: &mut aya::Ebpf, name: &str| -> Result<Map, EbpfError> {
            bpf.take_map(name).ok_or_else(|| EbpfError::Map {
                name: name.into(),
                source: MapError::InvalidName { name: name.into() },
            })
        };
        Ok(SockLb {
            services: typed(ferry_ebpf::MAP_SERVICES, take(&mut bpf, ferry_ebpf::MAP_SERVICES)?)?,
            backends: typed(ferry_ebpf::MAP_BACKENDS, take(&mut bpf, ferry_ebpf::MAP_BACKENDS)?)?,
            adopted: false,
            dir: dir.to_path_buf(),
        })
    }

    /// What the maps hold now (after a restart: what the last ferry wrote).
    pub fn read(&self) -> Result<MapEntries, EbpfError> {
        let mut m = MapEntries::default();
        for kv in self.services.iter() {
            let (k, v) = kv.map_err(map_err(ferry_ebpf::MAP_SERVICES))?;
            m.services.insert(k, v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(map_err(ferry_ebpf::MAP_BACKENDS))?;
            m.backends.insert(k, v);
        }
        Ok(m)
    }

    /// Writes `ops` in order (the order `diff` chose is what keeps every
    /// intermediate state consistent). Deleting a missing key is fine.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), EbpfError> {
        for op in ops {
            match op {
                Op::PutBackend(k, b) => self
                    .backends
                    .insert(k, b, 0)
                    .map_err(map_err(ferry_ebpf::MAP_BACKENDS))?,
                Op::PutService(k, v) => self
                    .services
                    .insert(k, v, 0)
                    .map_err(map_err(ferry_ebpf::MAP_SERVICES))?,
                Op::DeleteService(k) => {
                    ignore_missing(self.services.remove(k)).map_err(map_err(ferry_ebpf::MAP_SERVICES))?
                }
                Op::DeleteBackend(k) => {
                    ignore_missing(self.backends.remove(k)).map_err(map_err(ferry_ebpf::MAP_BACKENDS))?
                }
            }
        }
        Ok(())
    }
}

/// A TC link's pin: `link_tc_{in,out}_<ifindex>_<device>`. The ifindex
/// tells a link on a device that was since deleted (and maybe re-created
/// under the same name) from a live one.
fn tc_link_pin(dir: &Path, ingress: bool, ifindex: u32, device: &str) -> PathBuf {
    dir.join(format!(
        "link_tc_{}_{ifindex}_{device}",
        if ingress { "in" } else { "out" }
    ))
}

/// The device's index, None when no such device exists.
pub fn ifindex(device: &str) -> Option<u32> {
    let c = CString::new(device).ok()?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Unpins TC links whose device is gone or is another device now (a
/// different ifindex): the kernel detached them when the device went.
/// Returns how many pins were removed.
pub fn prune_tc(dir: &Path) -> Result<usize, EbpfError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("link_tc_in_")
            .or_else(|| name.strip_prefix("link_tc_out_"))
        else {
            continue;
        };
        let live = rest
            .split_once('_')
            .and_then(|(idx, dev)| Some((idx.parse::<u32>().ok()?, dev)))
            .is_some_and(|(idx, dev)| ifindex(dev) == Some(idx));
        if !live {
            unpin_link(&e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Attaches the TC programs (tcx ingress and egress) to each of `devices`
/// unless their link pins are already there (a restart adopts them), and
/// pins the links. A device that does not exist (any more) is skipped.
/// Needs the shared maps pinned in `dir` first (`SockLb::open`). Returns
/// how many links were created.
pub fn attach_tc(dir: &Path, devices: &[String]) -> Result<usize, EbpfError> {
    let present: Vec<(&String, u32)> = devices.iter().filter_map(|d| Some((d, ifindex(d)?))).collect();
    let missing: Vec<(&String, u32, bool)> = present
        .iter()
        .flat_map(|(d, idx)| [(*d, *idx, true), (*d, *idx, false)])
        .filter(|(d, idx, ingress)| !tc_link_pin(dir, *ingress, *idx, d).exists())
        .collect();
    let mut created = 0;
    if !missing.is_empty() {
        let mut bpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(ferry_ebpf::tc_object())
            .map_err(EbpfError::Load)?;
        for name in [ferry_ebpf::PROG_TC_INGRESS, ferry_ebpf::PROG_TC_EGRESS] {
            let perr = |source| EbpfError::Program { name, source };
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(perr)?;
            prog.load().map_err(perr)?;
            let ingress = name == ferry_ebpf::PROG_TC_INGRESS;
            for (dev, idx, _) in missing.iter().filter(|(_, _, i)| *i == ingress) {
                let attach_type = if ingress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let link_id = prog
                    .attach_with_options(dev, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
                    .map_err(perr)?;
                let link = prog.take_link(link_id).map_err(perr)?;
                let fd_link: FdLink = link.try_into().map_err(|source| EbpfError::Link { name, source })?;
                let path = tc_link_pin(dir, ingress, *idx, dev);
                fd_link.pin(&path).map_err(|source| EbpfError::Pin { path, source })?;
                created += 1;
            }
        }
    }
    Ok(created)
}

/// Names of the programs attached with tcx to `device` (ingress, then
/// egress), as the kernel reports them: what is really attached, whatever
/// the pins say.
pub fn tcx_programs(device: &str) -> Result<Vec<String>, EbpfError> {
    let mut out = Vec::new();
    for (name, at) in [
        ("tcx ingress", TcAttachType::Ingress),
        ("tcx egress", TcAttachType::Egress),
    ] {
        let (_, progs) =
            SchedClassifier::query_tcx(device, at).map_err(|source| EbpfError::Program { name, source })?;
        out.extend(progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_string()));
    }
    Ok(out)
}

/// Writes the SNAT address the TC program uses for
/// `externalTrafficPolicy: Cluster` flows (None: the frontend address).
pub fn set_tc_snat(dir: &Path, snat: Option<Ipv4Addr>) -> Result<(), EbpfError> {
    let name = ferry_ebpf::MAP_TC_CONFIG;
    let md = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    let map = Map::from_map_data(md).map_err(map_err(name))?;
    let mut config: Array<MapData, u32> = Array::try_from(map).map_err(map_err(name))?;
    let addr = snat.map_or(0, |ip| u32::from(ip).to_be());
    config.set(0, addr, 0).map_err(map_err(name))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}

/// Unpins a link: once no fd holds it, the kernel detaches the program.
fn unpin_link(path: &Path) -> Result<(), EbpfError> {
    if !path.exists() {
        return Ok(());
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            let _detached = link.unpin().map_err(io_err(path))?;
            Ok(())
        }
        // Not a link (or unreadable): remove the file anyway.
        Err(_) => std::fs::remove_file(path).map_err(io_err(path)),
    }
}

/// Removes every link and map pin under `dir`, then `dir` itself: the
/// programs detach and the maps are freed once nothing references them.
/// Returns how many pins were removed. A missing `dir` is not an error.
pub fn cleanup(dir: &Path) -> Result<usize, EbpfError> {
    if !dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for p in ferry_ebpf::SOCK_PROGRAMS {
        let path = link_pin(dir, p);
        if path.exists() {
            unpin_link(&path)?;
            removed += 1;
        }
    }
    let tc_links: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("link_tc_"))
        })
        .collect();
    for path in tc_links {
        unpin_link(&path)?;
        removed += 1;
    }
    for m in ferry_ebpf::MAPS {
        let path = dir.join(m);
        if path.exists() {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(dir)(e)),
    }
    Ok(removed)
}
