//! The iptables dataplane: the thin apply step around the pure renderer.
//!
//! It owns choosing the iptables back end (nft or legacy, like kube-proxy:
//! whichever the node already uses), feeding rendered text to
//! `iptables-restore --noflush` (atomic per table, never touching chains
//! that are not ours), installing the jumps from the built-in chains,
//! remembering what it applied so that the next sync can be partial,
//! deleting UDP conntrack entries that point at removed endpoints, and the
//! canary check.

pub mod render;
pub mod trace;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use ferry_cluster::Protocol;

use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::table::{FrontendKind, ServiceTable};
use render::{Family, Rendered};

/// Which iptables implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    Nft,
    Legacy,
}

impl IptablesBackend {
    fn tool(self, family: Family, what: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let kind = match self {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        };
        if what.is_empty() {
            format!("{base}-{kind}")
        } else {
            format!("{base}-{kind}-{what}")
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        }
    }

    /// kube-proxy's choice: a back end that holds kubelet's or kube-proxy's
    /// marker chains wins; else the one with more rules; a tie (a fresh
    /// node) goes to nft.
    pub fn detect() -> IptablesBackend {
        let save = |b: IptablesBackend| -> String {
            Command::new(b.tool(Family::V4, "save"))
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let nft = save(IptablesBackend::Nft);
        let legacy = save(IptablesBackend::Legacy);
        let marker = |s: &str| s.contains("KUBE-IPTABLES-HINT") || s.contains("KUBE-KUBELET-CANARY");
        if marker(&nft) {
            return IptablesBackend::Nft;
        }
        if marker(&legacy) {
            return IptablesBackend::Legacy;
        }
        let rules = |s: &str| s.lines().filter(|l| l.starts_with("-A ")).count();
        if rules(&legacy) > rules(&nft) {
            IptablesBackend::Legacy
        } else {
            IptablesBackend::Nft
        }
    }
}

/// Runs `program args`, feeding `stdin` when given; a failure carries the
/// first lines of stderr (nft echoes the failing line of a long script).
pub(crate) fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ProxyError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ProxyError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(|source| ProxyError::Spawn {
            program: program.to_string(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| ProxyError::Spawn {
        program: program.to_string(),
        source,
    })?;
    if !out.status.success() {
        return Err(ProxyError::Command {
            program: format!("{program} {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr)
                .trim()
                .lines()
                .take(6)
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What was applied for one family, so the next sync can be partial.
pub(crate) struct Applied {
    rendered: Rendered,
}

pub struct IptablesDataplane {
    backend: IptablesBackend,
    state: Remembered<Applied>,
}

impl IptablesDataplane {
    pub fn new(backend: IptablesBackend) -> IptablesDataplane {
        IptablesDataplane {
            backend,
            state: Remembered::default(),
        }
    }

    pub fn backend(&self) -> IptablesBackend {
        self.backend
    }

    /// Our chains per table, and which of `HOOKS` are present, from one
    /// `iptables-save` (one process instead of one per hook).
    fn kernel_state(&self, family: Family) -> Result<KernelState, ProxyError> {
        let text = run(&self.backend.tool(family, "save"), &[], None)?;
        Ok(KernelState::parse(&text))
    }

    fn sync_family(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError> {
        let next = render::render(table, family);
        let rules = next.rule_count();
        let prev = self.state.applied(family).take();
        let (text, written, removed) = match (&prev, full) {
            (Some(prev), false) => render::restore_partial(&prev.rendered, &next),
            _ => {
                let kernel = self.kernel_state(family)?;
                let desired = next.nat_chain_names();
                let stale_nat: BTreeSet<String> = kernel
                    .chains("nat")
                    .filter(|n| !desired.contains(*n))
                    .cloned()
                    .collect();
                let desired_filter: BTreeSet<String> = next.filter_fixed.iter().map(|(n, _)| n.clone()).collect();
                let stale_filter: BTreeSet<String> = kernel
                    .chains("filter")
                    .filter(|n| !desired_filter.contains(*n))
                    .cloned()
                    .collect();
                let removed = stale_nat.iter().filter(|n| n.starts_with("FERRY-SVC-")).count();
                let mut text = render::restore_full(&next, &stale_nat, &stale_filter);
                // Missing jumps from the built-in chains go into the same
                // transaction (inserted in reverse to end up in HOOKS order).
                for (i, (tbl, chain, spec)) in render::HOOKS.iter().enumerate().rev() {
                    if !kernel.hooks[i] {
                        text = insert_before_commit(&text, tbl, &format!("-I {chain} 1 {spec}"));
                    }
                }
                (text, table.services.len(), removed)
            }
        };
        run(
            &self.backend.tool(family, "restore"),
            &["--noflush", "-w", "5"],
            Some(&text),
        )?;
        *self.state.applied(family) = Some(Applied { rendered: next });
        Ok((rules, written, removed))
    }

    fn remove_hooks_and_chains(backend: IptablesBackend, family: Family) -> Result<(), ProxyError> {
        let tool = backend.tool(family, "");
        // Look first: touching a back end (or family) that holds nothing of
        // ours would make the kernel create its tables.
        let kernel = IptablesDataplane::new(backend).kernel_state(family)?;
        for (i, (table, chain, spec)) in render::HOOKS.iter().enumerate() {
            if !kernel.hooks[i] {
                continue;
            }
            let spec: Vec<&str> = spec.split_whitespace().collect();
            // A hook may have been inserted more than once by a crash-looping
            // older ferry; delete until none is left (bounded).
            for _ in 0..16 {
                let mut del = vec!["-w", "5", "-t", *table, "-D", *chain];
                del.extend(&spec);
                if run(&tool, &del, None).is_err() {
                    break;
                }
            }
        }
        let nat: Vec<&String> = kernel.chains("nat").collect();
        let filter: Vec<&String> = kernel.chains("filter").collect();
        if nat.is_empty() && filter.is_empty() {
            return Ok(());
        }
        let mut text = String::from("*filter\n");
        for n in &filter {
            text.push_str(&format!(":{n} - [0:0]\n"));
        }
        for n in &filter {
            text.push_str(&format!("-X {n}\n"));
        }
        text.push_str("COMMIT\n*nat\n");
        for n in &nat {
            text.push_str(&format!(":{n} - [0:0]\n"));
        }
        for n in &nat {
            text.push_str(&format!("-X {n}\n"));
        }
        text.push_str("COMMIT\n");
        run(&backend.tool(family, "restore"), &["--noflush", "-w", "5"], Some(&text))?;
        Ok(())
    }
}

/// What `iptables-save` says about our state.
struct KernelState {
    /// table → our chains.
    chains: std::collections::BTreeMap<String, BTreeSet<String>>,
    /// `hooks[i]`: `HOOKS[i]` is installed.
    hooks: Vec<bool>,
}

impl KernelState {
    fn parse(text: &str) -> KernelState {
        let mut chains: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
        let mut hooks = vec![false; render::HOOKS.len()];
        let mut table = "";
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.trim();
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    if name.starts_with(render::CHAIN_PREFIX) {
                        chains.entry(table.to_string()).or_default().insert(name.to_string());
                    }
                }
            } else if line.starts_with("-A ") {
                for (i, (tbl, chain, spec)) in render::HOOKS.iter().enumerate() {
                    // Match loosely (chain, comment, target): iptables-save
                    // may print matches in its own order.
                    let target = spec.rsplit(' ').next().unwrap_or_default();
                    let comment = spec
                        .split("--comment ")
                        .nth(1)
                        .and_then(|c| c.split_whitespace().next())
                        .unwrap_or_default();
                    if *tbl == table
                        && line.starts_with(&format!("-A {chain} "))
                        && line.ends_with(&format!("-j {target}"))
                        && line.contains(comment)
                        && (spec.contains("NEW") == line.contains("NEW"))
                    {
                        hooks[i] = true;
                    }
                }
            }
        }
        KernelState { chains, hooks }
    }

    fn chains(&self, table: &str) -> impl Iterator<Item = &String> {
        self.chains.get(table).into_iter().flatten()
    }
}

/// Adds `line` at the end of `table`'s section of restore input.
fn insert_before_commit(text: &str, table: &str, line: &str) -> String {
    let header = format!("*{table}\n");
    let Some(start) = text.find(&header) else {
        return format!("{text}*{table}\n{line}\nCOMMIT\n");
    };
    let Some(rel) = text[start..].find("COMMIT\n") else {
        return text.to_string();
    };
    let at = start + rel;
    format!("{}{line}\n{}", &text[..at], &text[at..])
}

/// Deletes UDP conntrack entries that would keep sending datagrams to
/// endpoints that are gone (UDP has no connection to break), and entries
/// for frontends that just got their first endpoint. Shared with the
/// nftables dataplane.
pub(crate) fn clear_udp_conntrack(prev: &ServiceTable, next: &ServiceTable) {
    for (name, old) in &prev.services {
        if old.protocol != Protocol::Udp {
            continue;
        }
        let new = next.services.get(name);
        for b in &old.backends {
            let still = new.is_some_and(|n| n.backends.iter().any(|nb| nb.ip == b.ip && nb.port == b.port));
            if still {
                continue;
            }
            for f in old.frontends.iter().filter(|f| f.ip.is_ipv4() == b.ip.is_ipv4()) {
                conntrack_delete(f.ip, f.port, f.kind, Some(b.ip));
            }
        }
    }
    for (name, new) in &next.services {
        if new.protocol != Protocol::Udp || new.backends.is_empty() {
            continue;
        }
        let had = prev.services.get(name).is_some_and(|o| !o.backends.is_empty());
        if !had {
            for f in &new.frontends {
                conntrack_delete(f.ip, f.port, f.kind, None);
            }
        }
    }
}

fn conntrack_delete(frontend: IpAddr, port: u16, kind: FrontendKind, endpoint: Option<IpAddr>) {
    let ip = frontend.to_string();
    let port = port.to_string();
    let ep = endpoint.map(|e| e.to_string());
    let family = if frontend.is_ipv4() { "ipv4" } else { "ipv6" };
    let mut args = vec!["-D", "-f", family, "-p", "udp"];
    if kind != FrontendKind::NodePort {
        args.extend(["--orig-dst", ip.as_str()]);
    }
    args.extend(["--orig-port-dst", port.as_str()]);
    if let Some(ep) = &ep {
        args.extend(["--dst-nat", ep.as_str()]);
    }
    match run("conntrack", &args, None) {
        Ok(_) => tracing::debug!(frontend = %ip, port = %port, endpoint = ?ep, "deleted stale UDP conntrack entries"),
        // conntrack exits 1 when nothing matched; that is the common case.
        Err(ProxyError::Command { stderr, .. }) if stderr.contains("0 flow entries") => {}
        Err(e) => tracing::warn!(error = %e, "deleting stale UDP conntrack entries"),
    }
}

/// Whether any frontend of `table` is of `family`.
pub(crate) fn has_family(table: &ServiceTable, family: Family) -> bool {
    table
        .services
        .values()
        .any(|e| e.frontends.iter().any(|f| Family::of(f.ip) == family))
}

/// What a netfilter dataplane remembers between syncs: the table it last
/// applied and, per address family, what it wrote (`A`).
pub(crate) struct Remembered<A> {
    pub prev_table: Option<ServiceTable>,
    v4: Option<A>,
    v6: Option<A>,
}

impl<A> Default for Remembered<A> {
    fn default() -> Self {
        Remembered {
            prev_table: None,
            v4: None,
            v6: None,
        }
    }
}

impl<A> Remembered<A> {
    pub fn applied(&mut self, family: Family) -> &mut Option<A> {
        match family {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    pub fn v6_applied(&self) -> bool {
        self.v6.is_some()
    }

    /// Forgets what is applied, so the next sync is a full one.
    pub fn forget(&mut self) {
        *self = Remembered::default();
    }
}

/// What the iptables and nftables dataplanes share in a sync: both rule
/// sets are per address family, and around them the same steps happen.
pub(crate) trait FamilySync {
    type Applied;
    fn remembered(&mut self) -> &mut Remembered<Self::Applied>;
    /// Programs one family; returns (rules or objects, written, removed).
    fn sync_one(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError>;
}

/// One sync of a netfilter dataplane: route_localnet for loopback
/// NodePorts, IPv4 always and IPv6 when used now or before, UDP conntrack
/// cleanup after success, and a full sync next time after any failure.
pub(crate) fn sync_families<D: FamilySync>(
    d: &mut D,
    table: &ServiceTable,
    full: bool,
) -> Result<SyncReport, ProxyError> {
    let full = full || d.remembered().prev_table.is_none();
    if table.node_ips.iter().any(|ip| ip.is_loopback() && ip.is_ipv4()) {
        enable_route_localnet();
    }
    let mut both = || {
        let (mut rules, written, removed) = d.sync_one(table, Family::V4, full)?;
        if has_family(table, Family::V6) || d.remembered().v6_applied() {
            rules += d.sync_one(table, Family::V6, full)?.0;
        }
        Ok::<_, ProxyError>((rules, written, removed))
    };
    match both() {
        Ok((rules, written, removed)) => {
            let state = d.remembered();
            match &mut state.prev_table {
                Some(prev) => {
                    clear_udp_conntrack(prev, table);
                    prev.assign_from(table);
                }
                None => state.prev_table = Some(table.clone()),
            }
            Ok(SyncReport {
                full,
                rules,
                services_written: written,
                services_removed: removed,
            })
        }
        Err(e) => {
            // The kernel may hold anything after a failed transaction.
            d.remembered().forget();
            Err(e)
        }
    }
}

impl FamilySync for IptablesDataplane {
    type Applied = Applied;

    fn remembered(&mut self) -> &mut Remembered<Applied> {
        &mut self.state
    }

    fn sync_one(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError> {
        self.sync_family(table, family, full)
    }
}

impl Dataplane for IptablesDataplane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn sync(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, ProxyError> {
        sync_families(self, table, full)
    }

    fn check(&mut self) -> Result<bool, ProxyError> {
        if self.state.prev_table.is_none() {
            return Ok(false);
        }
        let tool = self.backend.tool(Family::V4, "");
        for table in ["nat", "filter"] {
            match run(&tool, &["-w", "5", "-t", table, "-S", render::CANARY], None) {
                Ok(out) if out.contains(&format!("-A {}", render::CANARY)) => {}
                _ => return Ok(false),
            }
        }
        for (table, chain, spec) in render::HOOKS {
            let mut check = vec!["-w", "5", "-t", table, "-C", chain];
            check.extend(spec.split_whitespace());
            if run(&tool, &check, None).is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes our hooks and chains from both back ends and both families
    /// (a node may have switched back ends between runs).
    fn cleanup(&mut self) -> Result<(), ProxyError> {
        let mut first_err = None;
        for backend in [IptablesBackend::Nft, IptablesBackend::Legacy] {
            for family in [Family::V4, Family::V6] {
                match Self::remove_hooks_and_chains(backend, family) {
                    Ok(()) => {}
                    Err(ProxyError::Spawn { program, .. }) => {
                        tracing::debug!(%program, "not installed; nothing to clean");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, backend = backend.as_str(), "cleanup");
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        self.state.forget();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Localhost NodePorts need the kernel to route packets with a 127/8
/// source off the loopback device (see `NodeConfig::localhost_nodeports`).
pub(crate) fn enable_route_localnet() {
    let path = "/proc/sys/net/ipv4/conf/all/route_localnet";
    if std::fs::read_to_string(path).map(|s| s.trim() == "1").unwrap_or(false) {
        return;
    }
    match std::fs::write(path, "1") {
        Ok(()) => tracing::warn!("set net.ipv4.conf.all.route_localnet=1 for localhost NodePorts"),
        Err(e) => tracing::warn!(error = %e, "cannot set route_localnet; localhost NodePorts will not work"),
    }
}
