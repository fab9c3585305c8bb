//! The skipped-test report of `cargo xtask test`.
//!
//! A test that cannot run here (a privileged test when not root, the BPF
//! drift test without clang) prints `SKIPPED (<reason>): <name>` and, when
//! `$FERRY_SKIPPED_LOG` names a file, appends `<reason>\t<crate> <test>` to
//! it, then returns (libtest has no runtime skip). This module turns that
//! file into the lines printed after the test run.

use std::collections::BTreeMap;

/// Set by `cargo xtask test` for the test processes.
pub const LOG_ENV: &str = "FERRY_SKIPPED_LOG";

/// The reason privileged tests give.
pub const NEEDS_ROOT: &str = "needs root";

/// One line per skipped test, then one count per reason, ending with the
/// privileged tests' summary line.
pub fn report(log: &str, root: bool) -> Vec<String> {
    let mut by_reason: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in log.lines() {
        if let Some((reason, name)) = line.split_once('\t') {
            by_reason.entry(reason).or_default().push(name);
        }
    }
    let mut out = Vec::new();
    for (reason, names) in &mut by_reason {
        names.sort_unstable();
        out.extend(names.iter().map(|n| format!("skipped ({reason}): {n}")));
    }
    for (reason, names) in &by_reason {
        if *reason != NEEDS_ROOT {
            out.push(format!("{} tests skipped ({reason})", names.len()));
        }
    }
    let privileged = by_reason.get(NEEDS_ROOT).map_or(0, Vec::len);
    out.push(match (root, privileged) {
        (true, 0) => "privileged tests ran (root)".to_string(),
        (false, n) => format!("{n} privileged tests skipped (not root)"),
        (true, n) => format!("{n} privileged tests skipped although root"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lists_names_and_counts_privileged_ones() {
        let log = "needs root\tproxy_e2e iptables_clusterip\nneeds root\tferry_proxy nftables::tests::netlink\n\
                   needs clang\tshipped_objects shipped_objects_match_the_sources\n";
        assert_eq!(
            report(log, false),
            [
                "skipped (needs clang): shipped_objects shipped_objects_match_the_sources",
                "skipped (needs root): ferry_proxy nftables::tests::netlink",
                "skipped (needs root): proxy_e2e iptables_clusterip",
                "1 tests skipped (needs clang)",
                "2 privileged tests skipped (not root)",
            ]
        );
        assert_eq!(report("", true), ["privileged tests ran (root)"]);
        assert_eq!(report("", false), ["0 privileged tests skipped (not root)"]);
    }
}
