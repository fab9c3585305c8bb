//! The eBPF dataplane: socket-level load balancing with the programs of the
//! `ferry-ebpf` crate, loaded and attached with aya.
//!
//! `entries` is the pure half (ServiceTable → map entries, diff); `loader`
//! owns the kernel objects (bpffs pins, programs, cgroup links, maps);
//! `cgroup` finds (or mounts) the cgroup v2 to attach to; `devices` picks
//! the network devices for the TC program;
//! `dataplane` glues them behind the `Dataplane` trait.

pub mod cgroup;
pub mod dataplane;
pub mod devices;
pub mod entries;
pub mod loader;

pub use cgroup::{cgroup2_root, default_cgroup};
pub use dataplane::EbpfDataplane;
pub use entries::{compile, diff, render, Incremental, MapEntries, Op, Skipped, Update};
pub use loader::{cleanup, EbpfError, SockLb, DEFAULT_BPFFS_DIR};
