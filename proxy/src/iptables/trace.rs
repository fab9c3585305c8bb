//! A pure packet tracer over rendered iptables-restore text, for tests:
//! "where does a TCP/UDP packet from X to VIP:port end up?" — at which
//! endpoints with which probability, rejected, dropped, masqueraded.
//!
//! It understands exactly the matches and targets the renderer emits
//! (kube-proxy keeps a similar tracer over its fake iptables). `statistic`
//! rules fork the trace with their probability; `recent --rcheck` never
//! matches (a first packet has no affinity entry) and `--set` is recorded.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use ferry_cluster::Protocol;
use ipnet::IpNet;

use super::render;

/// Where a packet is first seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Arrives from a network (nat PREROUTING).
    Network,
    /// Sent by a process on the node (nat OUTPUT).
    Node,
}

#[derive(Debug, Clone, Copy)]
pub struct Packet {
    pub origin: Origin,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub dport: u16,
    /// Addresses that count as local for `addrtype` (the node's addresses).
    pub src_local: bool,
    pub dst_local: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    /// DNATed to this endpoint.
    Endpoint(SocketAddr),
    /// Not touched by our rules: delivered as addressed.
    Untouched,
    Reject,
    Drop,
}

/// One way the packet can go, with its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Path {
    pub probability: f64,
    pub verdict: Verdict,
    pub masquerade: bool,
    /// A `recent --set` (ClientIP affinity) was recorded on the way.
    pub affinity: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub paths: Vec<Path>,
}

impl Trace {
    /// Endpoint → probability of reaching it.
    pub fn endpoints(&self) -> BTreeMap<SocketAddr, f64> {
        let mut out = BTreeMap::new();
        for p in &self.paths {
            if let Verdict::Endpoint(ep) = p.verdict {
                *out.entry(ep).or_insert(0.0) += p.probability;
            }
        }
        out
    }

    /// The only verdict, when every path agrees.
    pub fn single(&self) -> Option<Verdict> {
        let first = self.paths.first()?.verdict;
        self.paths.iter().all(|p| p.verdict == first).then_some(first)
    }

    pub fn all_masquerade(&self) -> bool {
        !self.paths.is_empty() && self.paths.iter().all(|p| p.masquerade)
    }

    pub fn none_masquerade(&self) -> bool {
        self.paths.iter().all(|p| !p.masquerade)
    }
}

#[derive(Debug, Clone)]
enum Match {
    Src(IpNet, bool),
    Dst(IpNet, bool),
    Proto(String),
    Dport(u16),
    SrcLocal,
    DstLocal,
    Mark(bool),
    Probability(f64),
    RecentCheck,
    RecentSet,
    CtNew,
    CtEstablished,
}

#[derive(Debug, Clone)]
struct Rule {
    matches: Vec<Match>,
    target: String,
    to: Option<SocketAddr>,
}

/// Parsed `*table` → chain → rules.
#[derive(Debug, Default)]
pub struct Ruleset {
    tables: HashMap<String, HashMap<String, Vec<Rule>>>,
}

fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|e| format!("bad address {s}: {e}"))
}

impl Ruleset {
    pub fn parse(text: &str) -> Result<Ruleset, String> {
        let mut rs = Ruleset::default();
        let mut table = String::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default().to_string();
                rs.tables.entry(table.clone()).or_default().entry(name).or_default();
                continue;
            }
            if !line.starts_with("-A ") {
                continue;
            }
            let t = tokens(line);
            let chain = t.get(1).cloned().ok_or("rule without chain")?;
            let mut rule = Rule {
                matches: Vec::new(),
                target: String::new(),
                to: None,
            };
            let mut neg = false;
            let mut i = 2;
            while i < t.len() {
                let arg = t.get(i + 1).map(String::as_str).unwrap_or_default();
                match t[i].as_str() {
                    "!" => {
                        neg = true;
                        i += 1;
                        continue;
                    }
                    "-s" => rule.matches.push(Match::Src(net(arg)?, neg)),
                    "-d" => rule.matches.push(Match::Dst(net(arg)?, neg)),
                    "-p" => rule.matches.push(Match::Proto(arg.to_string())),
                    "--dport" => rule.matches.push(Match::Dport(arg.parse().map_err(|_| "bad --dport")?)),
                    "--src-type" => rule.matches.push(Match::SrcLocal),
                    "--dst-type" => rule.matches.push(Match::DstLocal),
                    "--mark" => rule.matches.push(Match::Mark(!neg)),
                    "--probability" => rule
                        .matches
                        .push(Match::Probability(arg.parse().map_err(|_| "bad --probability")?)),
                    "--ctstate" => rule.matches.push(if arg.contains("NEW") {
                        Match::CtNew
                    } else {
                        Match::CtEstablished
                    }),
                    "--rcheck" => {
                        rule.matches.push(Match::RecentCheck);
                        i += 1;
                        continue;
                    }
                    "--set" => {
                        rule.matches.push(Match::RecentSet);
                        i += 1;
                        continue;
                    }
                    "--reap" => {
                        i += 1;
                        continue;
                    }
                    "-j" => rule.target = arg.to_string(),
                    "--to-destination" => {
                        rule.to = Some(arg.parse().map_err(|_| format!("bad --to-destination {arg}"))?);
                    }
                    _ => {}
                }
                neg = false;
                i += 2;
            }
            rs.tables
                .entry(table.clone())
                .or_default()
                .entry(chain)
                .or_default()
                .push(rule);
        }
        Ok(rs)
    }

    fn chain(&self, table: &str, chain: &str) -> &[Rule] {
        self.tables
            .get(table)
            .and_then(|t| t.get(chain))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Follows a packet through nat (PREROUTING or OUTPUT), filter and nat
    /// POSTROUTING as the kernel would, via ferry's hooks.
    pub fn trace(&self, p: &Packet) -> Trace {
        let mut paths = Vec::new();
        let start = State {
            probability: 1.0,
            mark: false,
            affinity: false,
            dnat: None,
        };
        for s in self.walk("nat", render::SERVICES, p, start, 0) {
            let s = match s {
                Outcome::Continue(s) | Outcome::Dnat(s) => s,
                Outcome::Filtered(..) => continue,
            };
            // filter: the packet now goes to its (possibly translated) address.
            let mut fp = *p;
            if let Some(ep) = s.dnat {
                fp.dst = ep.ip();
                fp.dport = ep.port();
                fp.dst_local = false;
            }
            for f in self.walk("filter", render::FILTER, &fp, s.clone(), 0) {
                match f {
                    Outcome::Filtered(st, v) => paths.push(Path {
                        probability: st.probability,
                        verdict: v,
                        masquerade: false,
                        affinity: st.affinity,
                    }),
                    Outcome::Continue(st) | Outcome::Dnat(st) => {
                        let mut masq = false;
                        for o in self.walk("nat", render::POSTROUTING, &fp, st.clone(), 0) {
                            if let Outcome::Dnat(x) = o {
                                masq = x.mark || masq;
                            }
                        }
                        paths.push(Path {
                            probability: st.probability,
                            verdict: st.dnat.map(Verdict::Endpoint).unwrap_or(Verdict::Untouched),
                            masquerade: masq,
                            affinity: st.affinity,
                        });
                    }
                }
            }
        }
        Trace { paths }
    }

    fn walk(&self, table: &str, chain: &str, p: &Packet, state: State, depth: usize) -> Vec<Outcome> {
        if depth > 16 {
            return vec![Outcome::Continue(state)];
        }
        let mut done = Vec::new();
        // States still traversing this chain.
        let mut live = vec![state];
        for rule in self.chain(table, chain) {
            let mut next_live = Vec::new();
            for st in live {
                let (hit, miss) = rule_matches(rule, p, &st);
                if let Some(m) = miss {
                    next_live.push(m);
                }
                let Some(mut h) = hit else { continue };
                if rule.matches.iter().any(|m| matches!(m, Match::RecentSet)) {
                    h.affinity = true;
                }
                match rule.target.as_str() {
                    "RETURN" => done.push(Outcome::Continue(h)),
                    "ACCEPT" => done.push(Outcome::Continue(h)),
                    "DROP" => done.push(Outcome::Filtered(h, Verdict::Drop)),
                    "REJECT" => done.push(Outcome::Filtered(h, Verdict::Reject)),
                    "DNAT" => {
                        h.dnat = rule.to;
                        done.push(Outcome::Dnat(h));
                    }
                    "MASQUERADE" => done.push(Outcome::Dnat(State { mark: true, ..h })),
                    "MARK" => {
                        // --or-mark sets our bit; --xor-mark (POSTROUTING) clears
                        // it, but the MASQUERADE decision was already taken.
                        h.mark = true;
                        next_live.push(h);
                    }
                    target => {
                        for o in self.walk(table, target, p, h, depth + 1) {
                            match o {
                                Outcome::Continue(s) => next_live.push(s),
                                other => done.push(other),
                            }
                        }
                    }
                }
            }
            live = next_live;
        }
        done.extend(live.into_iter().map(Outcome::Continue));
        done
    }
}

#[derive(Debug, Clone)]
struct State {
    probability: f64,
    mark: bool,
    affinity: bool,
    dnat: Option<SocketAddr>,
}

enum Outcome {
    /// Fell off the end of the chain (or RETURN/ACCEPT).
    Continue(State),
    /// A terminal NAT decision (DNAT, MASQUERADE).
    Dnat(State),
    Filtered(State, Verdict),
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// (state if the rule matches, state if it does not); statistic forks.
fn rule_matches(rule: &Rule, p: &Packet, st: &State) -> (Option<State>, Option<State>) {
    let mut prob = 1.0;
    for m in &rule.matches {
        let ok = match m {
            Match::Src(n, neg) => n.contains(&p.src) != *neg,
            Match::Dst(n, neg) => n.contains(&p.dst) != *neg,
            Match::Proto(s) => s == proto_name(p.protocol),
            Match::Dport(d) => *d == p.dport,
            Match::SrcLocal => p.src_local,
            Match::DstLocal => p.dst_local,
            Match::Mark(want) => st.mark == *want,
            Match::Probability(x) => {
                prob = *x;
                true
            }
            Match::RecentCheck => false,
            Match::RecentSet => true,
            Match::CtNew => true,
            Match::CtEstablished => false,
        };
        if !ok {
            return (None, Some(st.clone()));
        }
    }
    if prob >= 1.0 {
        return (Some(st.clone()), None);
    }
    let hit = State {
        probability: st.probability * prob,
        ..st.clone()
    };
    let miss = State {
        probability: st.probability * (1.0 - prob),
        ..st.clone()
    };
    (Some(hit), Some(miss))
}
