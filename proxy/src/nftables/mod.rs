//! The nftables dataplane (`--mode nftables`): ferry's own tables
//! (`table ip ferry`, and `table ip6 ferry` when IPv6 frontends exist),
//! written as one nf_tables netlink batch (one transaction) per family and
//! sync; the canary is read back by a netlink dump. The `nft` tool is not
//! needed.
//!
//! It owns remembering what it applied (so that a partial sync writes only
//! changed service ports), the canary (our dispatch rule must still be in
//! `nat-prerouting`), deleting UDP conntrack entries of removed endpoints
//! (the iptables dataplane's code) and `--cleanup` (delete our tables).
//! It never reads or touches any other table, so no cache of the whole
//! ruleset is loaded.

pub mod netlink;
pub mod render;

#[cfg(test)]
mod tests;

use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::iptables::render::Family;
use crate::iptables::FamilySync;
use crate::table::ServiceTable;
use render::Rendered;

#[derive(Default)]
pub struct NftablesDataplane {
    prev_table: Option<ServiceTable>,
    applied_v4: Option<Rendered>,
    applied_v6: Option<Rendered>,
}

impl NftablesDataplane {
    pub fn new() -> NftablesDataplane {
        NftablesDataplane::default()
    }

    fn applied(&mut self, family: Family) -> &mut Option<Rendered> {
        match family {
            Family::V4 => &mut self.applied_v4,
            Family::V6 => &mut self.applied_v6,
        }
    }

    /// Returns (objects, written, removed).
    fn sync_family(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError> {
        let mut prev = self.applied(family).take();
        // A partial sync updates the last rendering in place, re-rendering
        // only the service ports that changed.
        if let (Some(r), Some(t), false) = (prev.as_mut(), self.prev_table.as_ref(), full) {
            if let Some((script, written, removed)) = r.update(t, table) {
                netlink::apply(&script)?;
                let count = r.object_count();
                *self.applied(family) = prev;
                return Ok((count, written, removed));
            }
        }
        let next = render::render(table, family);
        let count = next.object_count();
        let removed = prev
            .as_ref()
            .map(|p| p.services.keys().filter(|k| !next.services.contains_key(*k)).count())
            .unwrap_or(0);
        let script = render::script_full(&next, prev.as_ref());
        let written = next.services.len();
        netlink::apply(&script)?;
        *self.applied(family) = Some(next);
        Ok((count, written, removed))
    }
}

impl FamilySync for NftablesDataplane {
    fn previous(&self) -> Option<&ServiceTable> {
        self.prev_table.as_ref()
    }

    fn v6_applied(&self) -> bool {
        self.applied_v6.is_some()
    }

    fn sync_one(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError> {
        self.sync_family(table, family, full)
    }

    fn remember(&mut self, table: &ServiceTable) {
        self.prev_table = Some(table.clone());
    }

    /// The kernel may hold anything after a failed transaction: the next
    /// sync recreates the table.
    fn forget(&mut self) {
        self.prev_table = None;
        self.applied_v4 = None;
        self.applied_v6 = None;
    }
}

impl Dataplane for NftablesDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn sync(&mut self, table: &ServiceTable, full: bool) -> Result<SyncReport, ProxyError> {
        crate::iptables::sync_families(self, table, full)
    }

    /// Our dispatch rule must still be in `nat-prerouting` of every family
    /// we programmed; anything else (table deleted, ruleset flushed) asks
    /// for a full sync that recreates the table.
    fn check(&mut self) -> Result<bool, ProxyError> {
        if self.prev_table.is_none() {
            return Ok(false);
        }
        let mut families = vec![Family::V4];
        if self.applied_v6.is_some() {
            families.push(Family::V6);
        }
        for family in families {
            let intact = netlink::chain_looks_up(family, render::CANARY_CHAIN, render::SERVICES).unwrap_or(false);
            if !intact {
                // Not ours any more: rebuild from scratch.
                self.forget();
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes our tables (both families); nothing else is touched.
    fn cleanup(&mut self) -> Result<(), ProxyError> {
        self.forget();
        for family in [Family::V4, Family::V6] {
            if netlink::table_exists(family)? {
                netlink::apply(&render::Script {
                    family,
                    cmds: vec![render::Cmd::DeleteTable],
                })?;
            }
        }
        Ok(())
    }
}
