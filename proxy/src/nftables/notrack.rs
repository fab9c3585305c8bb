//! `table ip ferry-dns` (and `ip6`): `notrack` for DNS to the addresses
//! this node answers itself (the cluster DNS Service's ClusterIPs taken
//! over by `ferry node`), so those queries make no conntrack entries, as
//! NodeLocal DNSCache's NOTRACK rules do: DNS is most of a node's short
//! flows, and racing or exhausted conntrack entries are what make queries
//! time out. A table of its own, apart from the Service proxy's, so it
//! works whatever `--mode` is and a mode switch never removes it; written
//! whole each time (a handful of rules) in one transaction.

use std::net::IpAddr;

use ferry_cluster::Protocol;

use super::netlink;
use super::render::{Base, Cmd, Rule, Script};
use crate::error::ProxyError;
use crate::iptables::render::Family;

/// The table's name.
pub const NOTRACK_TABLE: &str = "ferry-dns";
/// Before conntrack (-200): the `raw` priority.
const RAW_PRIORITY: i32 = -300;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;

/// The transaction that makes the table hold exactly `ips` (of `family`)
/// on `port`; `None` when there is nothing to do (no addresses and, per
/// `exists`, no table).
pub fn script(family: Family, ips: &[IpAddr], port: u16, exists: bool) -> Option<Script> {
    let ips: Vec<IpAddr> = ips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == (family == Family::V4))
        .collect();
    let mut cmds = Vec::new();
    if exists {
        // `add` first so that `delete` never fails: one atomic replace.
        cmds.extend([Cmd::AddTable, Cmd::DeleteTable]);
    }
    if !ips.is_empty() {
        cmds.push(Cmd::AddTable);
        // Queries from pods (prerouting), queries from the node itself and
        // every answer (output).
        for (chain, hook, directions) in [
            ("prerouting", NF_INET_PRE_ROUTING, &[false][..]),
            ("output", NF_INET_LOCAL_OUT, &[false, true][..]),
        ] {
            cmds.push(Cmd::AddChain(
                chain.into(),
                Some(Base {
                    nat: false,
                    hook,
                    priority: RAW_PRIORITY,
                }),
            ));
            for &reply in directions {
                for ip in &ips {
                    for proto in [Protocol::Udp, Protocol::Tcp] {
                        cmds.push(Cmd::AddRule(
                            chain.into(),
                            Rule::Notrack {
                                addr: *ip,
                                proto,
                                port,
                                reply,
                            },
                        ));
                    }
                }
            }
        }
    }
    (!cmds.is_empty()).then_some(Script {
        family,
        table: NOTRACK_TABLE,
        cmds,
    })
}

/// Makes the kernel's `ferry-dns` tables hold exactly `ips` on `port`
/// (no addresses: no tables).
pub fn apply(ips: &[IpAddr], port: u16) -> Result<(), ProxyError> {
    for family in [Family::V4, Family::V6] {
        let exists = match netlink::table_exists(family, NOTRACK_TABLE) {
            Ok(exists) => exists,
            // Nothing to take over and the ruleset unreadable (no
            // CAP_NET_ADMIN, no nf_tables): nothing of ours can be there.
            Err(_) if ips.is_empty() => continue,
            Err(e) => return Err(e),
        };
        if let Some(s) = script(family, ips, port, exists) {
            netlink::apply(&s)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_per_address_protocol_hook_and_direction() {
        let ips: Vec<IpAddr> = vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()];
        let text = script(Family::V4, &ips, 53, false).unwrap().text();
        assert_eq!(
            text,
            "add table ip ferry-dns\n\
             add chain ip ferry-dns prerouting { type filter hook prerouting priority raw; policy accept; }\n\
             add rule ip ferry-dns prerouting ip daddr 10.96.0.10 meta l4proto udp th dport 53 notrack\n\
             add rule ip ferry-dns prerouting ip daddr 10.96.0.10 meta l4proto tcp th dport 53 notrack\n\
             add chain ip ferry-dns output { type filter hook output priority raw; policy accept; }\n\
             add rule ip ferry-dns output ip daddr 10.96.0.10 meta l4proto udp th dport 53 notrack\n\
             add rule ip ferry-dns output ip daddr 10.96.0.10 meta l4proto tcp th dport 53 notrack\n\
             add rule ip ferry-dns output ip saddr 10.96.0.10 meta l4proto udp th sport 53 notrack\n\
             add rule ip ferry-dns output ip saddr 10.96.0.10 meta l4proto tcp th sport 53 notrack\n"
        );
        let v6 = script(Family::V6, &ips, 53, true).unwrap().text();
        assert!(
            v6.starts_with("add table ip6 ferry-dns\ndelete table ip6 ferry-dns\nadd table ip6 ferry-dns\n"),
            "{v6}"
        );
        assert!(
            v6.contains("ip6 daddr fd00::a meta l4proto udp th dport 53 notrack"),
            "{v6}"
        );
        // Nothing to take over: the table goes, or nothing happens.
        assert_eq!(
            script(Family::V4, &[], 53, true).unwrap().text(),
            "add table ip ferry-dns\ndelete table ip ferry-dns\n"
        );
        assert!(script(Family::V4, &[], 53, false).is_none());
    }
}
