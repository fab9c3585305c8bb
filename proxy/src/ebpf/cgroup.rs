//! The default `--cgroup`: the cgroup v2 the socket LB attaches to, so that
//! every process of the node is served.
//!
//! `/sys/fs/cgroup` is not always cgroup2: hybrid hosts (systemd's default
//! on older distributions) have the v1 hierarchies there and cgroup2 at
//! `/sys/fs/cgroup/unified`, and `ip netns exec` or a container may show no
//! cgroup2 at all. So the default is the best cgroup2 mount listed in
//! /proc/self/mountinfo (verified with statfs), else a cgroup2 that ferry
//! mounts itself at `/run/ferry/cgroup2` (as Cilium does). Every mount of
//! cgroup2 shows the same single hierarchy; what differs is the directory
//! of it a mount shows (the mountinfo "root" field, relative to this
//! process's cgroup namespace root):
//! - `/`: the namespace root — the whole hierarchy on a host;
//! - `/..`, `/../..`: an ancestor of the namespace root, e.g. the host's
//!   /sys/fs/cgroup bind-mounted into a container that has a private cgroup
//!   namespace — more of the node than `/`, so preferred, highest first;
//! - anything else (`/kubepods/...`): a subtree, never the node's root.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::loader::{statfs_magic, EbpfError, CGROUP2_SUPER_MAGIC};

/// Where ferry mounts cgroup2 when none is visible.
pub const SELF_MOUNT_DIR: &str = "/run/ferry/cgroup2";

/// Inode number of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`).
const INITIAL_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// A cgroup2 line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// The directory of the hierarchy the mount shows, relative to this
    /// process's cgroup namespace root.
    pub root: String,
    pub mount_point: PathBuf,
}

impl Cgroup2Mount {
    /// How far above the namespace root the mount starts: 0 for `/`, n for
    /// n `..` segments; None for a subtree.
    pub fn height(&self) -> Option<usize> {
        let mut n = 0;
        for seg in self.root.split('/').filter(|s| !s.is_empty()) {
            if seg != ".." {
                return None;
            }
            n += 1;
        }
        Some(n)
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mounts of a mountinfo text, in its order.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = pre.split_whitespace();
            let root = unescape(f.nth(3)?);
            let mount_point = PathBuf::from(unescape(f.next()?));
            Some(Cgroup2Mount { root, mount_point })
        })
        .collect()
}

/// The mounts worth attaching to, best first: those that show the
/// namespace root or an ancestor of it, highest first (ties: mountinfo
/// order); subtrees are left out.
pub fn candidates(mounts: &[Cgroup2Mount]) -> Vec<&Cgroup2Mount> {
    let mut c: Vec<(usize, usize, &Cgroup2Mount)> = mounts
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.height().map(|h| (h, i, m)))
        .collect();
    c.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    c.into_iter().map(|(_, _, m)| m).collect()
}

/// Whether this process is in the initial cgroup namespace (on a host, or
/// in a container sharing the host's). None when it cannot be told.
fn in_initial_cgroup_ns() -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/cgroup")
        .ok()
        .map(|m| m.ino() == INITIAL_CGROUP_NS_INO)
}

/// The host's cgroup2 root as this process sees it: the best mount listed
/// in /proc/self/mountinfo that statfs confirms is cgroup2. None when no
/// such mount is visible.
pub fn cgroup2_root() -> Result<Option<Cgroup2Mount>, EbpfError> {
    let info = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(info).map_err(|source| EbpfError::Io {
        path: info.to_path_buf(),
        source,
    })?;
    let mounts = cgroup2_mounts(&text);
    Ok(candidates(&mounts)
        .into_iter()
        .find(|m| matches!(statfs_magic(&m.mount_point), Ok(CGROUP2_SUPER_MAGIC)))
        .cloned())
}

/// The default `--cgroup`: `cgroup2_root`, else cgroup2 mounted at
/// `SELF_MOUNT_DIR` (reused when it already is one). Logs which, and warns
/// when only this cgroup namespace's part of the node will be served.
pub fn default_cgroup() -> Result<PathBuf, EbpfError> {
    let initial = in_initial_cgroup_ns();
    if let Some(m) = cgroup2_root()? {
        tracing::info!(path = %m.mount_point.display(), root = %m.root, "cgroup v2 found in mountinfo");
        if m.height() == Some(0) && initial == Some(false) {
            warn_namespaced(&m.mount_point);
        }
        return Ok(m.mount_point);
    }
    let dir = PathBuf::from(SELF_MOUNT_DIR);
    let cg_err = |reason: String| EbpfError::Cgroup {
        path: dir.clone(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| cg_err(format!("creating the mount point: {e}")))?;
    if statfs_magic(&dir).ok() == Some(CGROUP2_SUPER_MAGIC) {
        tracing::info!(path = %dir.display(), "no cgroup v2 in mountinfo; reusing ferry's cgroup2 mount");
    } else {
        mount_cgroup2(&dir).map_err(|e| {
            cg_err(format!(
                "no cgroup2 mount is visible and mount -t cgroup2 none {} failed: {e}",
                dir.display()
            ))
        })?;
        tracing::info!(path = %dir.display(), "no cgroup v2 in mountinfo; mounted cgroup2 for the socket LB");
    }
    if initial == Some(false) {
        warn_namespaced(&dir);
    }
    Ok(dir)
}

fn warn_namespaced(path: &Path) {
    tracing::warn!(
        path = %path.display(),
        "ferry runs in a private cgroup namespace: the socket LB serves only processes under its root; \
         run it in the host's cgroup namespace, mount the host's /sys/fs/cgroup, or pass --cgroup"
    );
}

fn mount_cgroup2(at: &Path) -> io::Result<()> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fstype = c"cgroup2";
    let src = c"none";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picked(text: &str) -> Option<String> {
        let mounts = cgroup2_mounts(text);
        candidates(&mounts).first().map(|m| m.mount_point.display().to_string())
    }

    const V2_ONLY: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:10 - bpf bpf rw,mode=700
";

    const HYBRID: &str = "\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
";

    /// A container with a private cgroup namespace: its own cgroup at
    /// /sys/fs/cgroup (root `/`), the host's bind-mounted at
    /// /host/sys/fs/cgroup (an ancestor, `/../..`), a pod's subtree.
    const CONTAINER: &str = "\
700 690 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
701 690 0:23 /kubepods/besteffort /var/lib/kubelet/pod-cg rw,relatime - cgroup2 cgroup2 rw
702 690 0:23 /.. /host/one\\040up rw,relatime - cgroup2 cgroup2 rw
703 690 0:23 /../.. /host/sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v2_only_host() {
        assert_eq!(picked(V2_ONLY).as_deref(), Some("/sys/fs/cgroup"));
    }

    #[test]
    fn hybrid_host_uses_the_unified_mount() {
        assert_eq!(picked(HYBRID).as_deref(), Some("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn container_prefers_the_highest_ancestor_and_skips_subtrees() {
        let mounts = cgroup2_mounts(CONTAINER);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[2].mount_point, PathBuf::from("/host/one up"), "\\040 unescaped");
        let order: Vec<String> = candidates(&mounts)
            .iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        assert_eq!(order, ["/host/sys/fs/cgroup", "/host/one up", "/sys/fs/cgroup"]);
        assert_eq!(mounts[1].height(), None);
    }

    #[test]
    fn none_visible() {
        let netns_exec = "22 28 0:99 / /sys rw,relatime - sysfs sysfs rw\n";
        assert_eq!(picked(netns_exec), None);
        assert_eq!(picked(""), None);
        let only_subtree = "40 22 0:23 /system.slice /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(picked(only_subtree), None);
    }
}
