//! The Debian packages ferry's tests and benches need, and the step that
//! installs the missing ones (`cargo xtask ci` on a fresh machine).
//!
//! As root on Debian/Ubuntu the missing packages are installed with
//! apt-get, behind a `policy-rc.d` that keeps their daemons (nginx, nsd,
//! knot, haproxy) from starting and holding ports the tests use. Otherwise
//! the one apt-get command to run is printed and the task stops. Elsewhere
//! (no dpkg) a warning lists the packages and the task goes on.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// What `cargo xtask ci` needs: building the BPF programs from source (and
/// checking the shipped objects), the privileged e2e tests, the DNS tests.
pub const TEST: &[&str] = &[
    "clang",          // BPF programs from source, drift test
    "llvm",           // llvm-strip/objdump for BPF work
    "libbpf-dev",     // bpf/bpf_helpers.h
    "linux-libc-dev", // linux/bpf.h
    "bpftool",        // eBPF tests read the kernel's view
    "iproute2",       // network namespaces, veths
    "iptables",       // iptables mode e2e
    "nftables",       // nftables mode e2e (compares with `nft`)
    "conntrack",      // UDP conntrack cleanup
    "dnsutils",       // dig in the node e2e
    "curl",           // HTTP checks in e2e tests
    "python3",        // the pods' servers in e2e namespaces
];

/// What `cargo xtask e2e cluster` needs besides kube-kit (which installs its
/// own): the test zone's resolver, and the tools that read the dataplanes.
pub const CLUSTER_E2E: &[&str] = &[
    "nsd",      // the node's upstream resolver, serving the test zone
    "dnsutils", // dig checks that nsd answers
    "curl",     // NodePort and Ingress from the node and the client namespace
    "iproute2", // the client namespace
    "iptables", // leftover checks
    "nftables", // leftover checks
    "bpftool",  // leftover checks
    "binutils", // objcopy strips the image's binary
];

/// What `cargo xtask bench` needs on top: the software ferry is measured against.
pub const BENCH: &[&str] = &[
    "knot-dnsutils",
    "nginx-light",
    "haproxy",
    "nsd",
    "knot",
    "dnsperf",
    "wrk",
    "nghttp2-client",
];

/// How a missing package is reported: by running `dpkg-query`, or (tests) a fake.
pub trait Dpkg {
    /// `dpkg-query -W -f='${Status}' pkg`, or `None` when dpkg is absent.
    fn status(&self, pkg: &str) -> Option<String>;
}

/// The real dpkg database.
pub struct System;

impl Dpkg for System {
    fn status(&self, pkg: &str) -> Option<String> {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .ok()?;
        // An unknown package is a failed query with empty output: not installed.
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The packages of `wanted` that dpkg does not list as installed, or `None`
/// when there is no dpkg to ask.
pub fn missing(dpkg: &impl Dpkg, wanted: &[&str]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for p in wanted {
        let status = dpkg.status(p)?;
        if !status.split_whitespace().eq(["install", "ok", "installed"]) {
            out.push((*p).to_string());
        }
    }
    Some(out)
}

/// The one command that installs `pkgs`.
pub fn apt_command(pkgs: &[String]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        pkgs.join(" ")
    )
}

/// Whether /etc/os-release describes Debian or a derivative (Ubuntu …).
pub fn debian_like(os_release: &str) -> bool {
    os_release.lines().any(|l| {
        let Some((k, v)) = l.split_once('=') else { return false };
        let v = v.trim_matches('"');
        (k == "ID" && (v == "debian" || v == "ubuntu"))
            || (k == "ID_LIKE" && v.split_whitespace().any(|w| w == "debian"))
    })
}

/// What to do about the missing packages.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Everything is there.
    Nothing,
    /// Root on Debian: install these.
    Install(Vec<String>),
    /// Not root: the user must run this command.
    AskUser { command: String },
    /// No dpkg (not Debian): cannot check; the list of Debian names.
    Unknown,
}

pub fn plan(dpkg: &impl Dpkg, wanted: &[&str], os_release: &str, root: bool) -> Plan {
    if !debian_like(os_release) {
        return Plan::Unknown;
    }
    match missing(dpkg, wanted) {
        None => Plan::Unknown,
        Some(m) if m.is_empty() => Plan::Nothing,
        Some(m) if root => Plan::Install(m),
        Some(m) => Plan::AskUser {
            command: format!("sudo sh -c '{}'", apt_command(&m)),
        },
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Makes sure `wanted` are installed (see the module comment).
pub fn ensure(wanted: &[&str], what: &str) -> anyhow::Result<()> {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    match plan(&System, wanted, &os_release, is_root()) {
        Plan::Nothing => Ok(()),
        Plan::Unknown => {
            eprintln!(
                "xtask: not a Debian/Ubuntu system, cannot check packages; {what} need (Debian names): {}",
                wanted.join(" ")
            );
            Ok(())
        }
        Plan::AskUser { command } => bail!(
            "{what} need Debian packages that are missing here. Run this once (as root), then again `cargo xtask`:\n\n    {command}\n\n\
             (run as root, `cargo xtask` installs them itself)"
        ),
        Plan::Install(pkgs) => install(&pkgs),
    }
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

fn install(pkgs: &[String]) -> anyhow::Result<()> {
    eprintln!("xtask: installing {}", pkgs.join(" "));
    apt(&["update", "-q"])?;
    // Daemons from these packages must not start and hold ports the tests
    // use. Only a policy we wrote ourselves is removed afterwards.
    let ours = !Path::new(POLICY_RC_D).exists();
    if ours {
        std::fs::write(POLICY_RC_D, "#!/bin/sh\nexit 101\n").with_context(|| format!("writing {POLICY_RC_D}"))?;
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(POLICY_RC_D, mode).with_context(|| format!("chmod {POLICY_RC_D}"))?;
    }
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(pkgs.iter().map(String::as_str));
    let result = apt(&args);
    if ours {
        let _ = std::fs::remove_file(POLICY_RC_D);
    }
    result
}

fn apt(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// rustfmt and clippy come with rustup's default profile, not the minimal one.
pub fn ensure_rust_components(cargo: &str) {
    let have = |sub: &str| {
        Command::new(cargo)
            .args([sub, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !(have("fmt") && have("clippy")) {
        eprintln!("xtask: rustup component add rustfmt clippy");
        let _ = Command::new("rustup")
            .args(["component", "add", "rustfmt", "clippy"])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// dpkg's answers as the real tool prints them for these states.
    struct Fake(HashMap<&'static str, &'static str>);

    impl Dpkg for Fake {
        fn status(&self, pkg: &str) -> Option<String> {
            Some(self.0.get(pkg).copied().unwrap_or("").to_string())
        }
    }

    struct NoDpkg;

    impl Dpkg for NoDpkg {
        fn status(&self, _: &str) -> Option<String> {
            None
        }
    }

    const DEBIAN: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nID=debian\n";
    const UBUNTU: &str = "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n";
    const MINT: &str = "NAME=\"Linux Mint\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
    const FEDORA: &str = "NAME=\"Fedora Linux\"\nID=fedora\n";

    fn dpkg() -> Fake {
        Fake(HashMap::from([
            ("clang", "install ok installed"),
            ("iproute2", "install ok installed"),
            // Removed but its config files kept: not installed.
            ("curl", "deinstall ok config-files"),
            // Half-configured after a failed install: not installed.
            ("python3", "install ok half-configured"),
        ]))
    }

    #[test]
    fn missing_packages_are_those_dpkg_does_not_list_as_installed() {
        let m = missing(&dpkg(), &["clang", "curl", "iproute2", "nftables", "python3"]);
        assert_eq!(m, Some(vec!["curl".into(), "nftables".into(), "python3".into()]));
        assert_eq!(missing(&NoDpkg, TEST), None);
    }

    #[test]
    fn root_on_debian_installs_only_what_is_missing() {
        assert_eq!(
            plan(&dpkg(), &["clang", "nftables", "iproute2"], DEBIAN, true),
            Plan::Install(vec!["nftables".into()])
        );
        assert_eq!(plan(&dpkg(), &["clang", "iproute2"], UBUNTU, true), Plan::Nothing);
    }

    #[test]
    fn a_user_gets_the_one_command_to_run() {
        let Plan::AskUser { command } = plan(&dpkg(), &["clang", "nftables", "curl"], MINT, false) else {
            panic!("expected the command to run")
        };
        assert_eq!(
            command,
            "sudo sh -c 'apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables curl'"
        );
        // Nothing missing: nothing asked, root or not.
        assert_eq!(plan(&dpkg(), &["clang"], DEBIAN, false), Plan::Nothing);
    }

    #[test]
    fn other_systems_are_not_checked() {
        assert_eq!(plan(&dpkg(), TEST, FEDORA, true), Plan::Unknown);
        assert_eq!(plan(&NoDpkg, TEST, DEBIAN, true), Plan::Unknown);
        assert!(debian_like(DEBIAN) && debian_like(UBUNTU) && debian_like(MINT));
        assert!(!debian_like(FEDORA) && !debian_like(""));
    }

    /// The real query on this machine: every package the CI installed.
    #[test]
    fn the_real_dpkg_query_reads_this_machine() {
        let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        if !debian_like(&os) {
            eprintln!("SKIPPED (not Debian): the_real_dpkg_query_reads_this_machine");
            return;
        }
        let m = missing(&System, &["dpkg", "ferry-no-such-package"]).unwrap();
        assert_eq!(m, vec!["ferry-no-such-package".to_string()]);
    }
}
