//! Privileged e2e of `ferry proxy --mode ebpf` with the shared scenarios of
//! tests/common/proxy_scenarios.rs, in network namespaces the scenarios
//! create. The eBPF programs attach to a cgroup this test creates and the
//! whole test process (so every client it spawns, and ferry itself) is
//! moved into it; the node namespace has no route for the service range —
//! the connect is rewritten before routing.
//!
//! Runs the scenarios whose clients are on the node or in pods (socket-level
//! LB): endpoint removal, immediate refusal, restart keeping a connection,
//! cleanup. Not the ones that need traffic from *outside* the node (NodePort
//! from the client namespace, eTP Local): that is the TC program, not built.
//! Skipped with a message when not root.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use common::netns::is_root;
use common::proxy_scenarios::{self as scenarios, Mode};

/// The test cgroup and pin directory, per test process. `ip netns exec`
/// remounts /sys, hiding the cgroup2 and bpffs mounts there from ferry, so
/// the test mounts its own cgroup2 and bpffs under /run.
struct Place {
    base: PathBuf,
    cgroup: PathBuf,
    pins: PathBuf,
}

fn place() -> &'static Place {
    static PLACE: OnceLock<Place> = OnceLock::new();
    PLACE.get_or_init(|| {
        let base = PathBuf::from(format!("/run/ferry-ebpf-e2e-{}", std::process::id()));
        Place {
            cgroup: base.join("cg").join("ferry-ebpf-e2e"),
            pins: base.join("bpf").join("pins"),
            base,
        }
    })
}

fn sh(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd).args(args).status();
}

/// Mounts cgroup2 and bpffs under /run, creates the cgroup and moves this
/// process into it; on drop moves it back, removes pins, cgroup and mounts.
struct InCgroup;

impl InCgroup {
    fn enter() -> InCgroup {
        let p = place();
        let guard = InCgroup;
        let (cg, bpf) = (p.base.join("cg"), p.base.join("bpf"));
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::create_dir_all(&bpf).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "cgroup2", "none"])
            .arg(&cg)
            .status()
            .unwrap();
        assert!(ok.success(), "mount cgroup2");
        let ok = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpf)
            .status()
            .unwrap();
        assert!(ok.success(), "mount bpffs");
        std::fs::create_dir_all(&p.cgroup).unwrap();
        std::fs::write(p.cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        guard
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let p = place();
        let _ = ferry_proxy::ebpf::cleanup(&p.pins);
        let (cg, bpf) = (p.base.join("cg"), p.base.join("bpf"));
        let _ = std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(&p.cgroup);
        sh("umount", &[&cg.to_string_lossy()]);
        sh("umount", &[&bpf.to_string_lossy()]);
        let _ = std::fs::remove_dir(&cg);
        let _ = std::fs::remove_dir(&bpf);
        let _ = std::fs::remove_dir(&p.base);
    }
}

fn ebpf_leftovers(_node_ns: &str) -> Vec<String> {
    let p = place();
    let mut out = Vec::new();
    if p.pins.exists() {
        out.push(format!("pin directory {} still exists", p.pins.display()));
    }
    if let Ok(o) = Command::new("bpftool").args(["cgroup", "show"]).arg(&p.cgroup).output() {
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("ferry_"))
                .map(|l| format!("attached: {l}")),
        );
    }
    out
}

fn mode() -> Mode {
    let p = place();
    Mode {
        name: "ebpf",
        args: vec![
            "--mode".into(),
            "ebpf".into(),
            "--cgroup".into(),
            p.cgroup.display().to_string(),
            "--bpffs".into(),
            p.pins.display().to_string(),
        ],
        leftovers: ebpf_leftovers,
    }
}

fn run(name: &str, f: fn(&Mode) -> anyhow::Result<()>) {
    if !is_root() {
        eprintln!("skipping {name}: needs root (network namespaces, BPF, cgroups)");
        return;
    }
    // One scenario at a time: they share this process's cgroup and pins.
    static SERIAL: Mutex<()> = Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _cg = InCgroup::enter();
    let mode = mode();
    let result = f(&mode);
    let _ = ferry_proxy::ebpf::cleanup(&place().pins);
    if let Err(e) = result {
        panic!("{name} ({}): {e:#}", mode.name);
    }
}

#[test]
fn ebpf_reject_and_endpoint_removal() {
    run("reject_and_endpoint_removal", scenarios::reject_and_endpoint_removal);
}

#[test]
fn ebpf_restart_and_cleanup() {
    run("restart_and_cleanup", scenarios::restart_and_cleanup);
}
