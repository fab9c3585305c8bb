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
pub mod notrack;
pub mod render;

#[cfg(test)]
mod tests;

use crate::dataplane::{Dataplane, SyncReport};
use crate::error::ProxyError;
use crate::iptables::render::Family;
use crate::iptables::{FamilySync, Remembered};
use crate::table::ServiceTable;
use render::Rendered;

#[derive(Default)]
pub struct NftablesDataplane {
    state: Remembered<Rendered>,
}

impl NftablesDataplane {
    pub fn new() -> NftablesDataplane {
        NftablesDataplane::default()
    }

    /// Returns (objects, written, removed).
    fn sync_family(
        &mut self,
        table: &ServiceTable,
        family: Family,
        full: bool,
    ) -> Result<(usize, usize, usize), ProxyError> {
        let mut prev = self.state.applied(family).take();
        // A partial sync updates the last rendering in place, re-rendering
        // only the service ports that changed.
        if let (Some(r), Some(t), false) = (prev.as_mut(), self.state.prev_table.as_ref(), full) {
            if let Some((script, written, removed)) = r.update(t, table) {
                netlink::apply(&script)?;
                let count = r.object_count();
                *self.state.applied(family) = prev;
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
        *self.state.applied(family) = Some(next);
        Ok((count, written, removed))
    }
}

impl FamilySync for NftablesDataplane {
    type Applied = Rendered;

    fn remembered(&mut self) -> &mut Remembered<Rendered> {
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
        if self.state.prev_table.is_none() {
            return Ok(false);
        }
        let mut families = vec![Family::V4];
        if self.state.v6_applied() {
            families.push(Family::V6);
        }
        for family in families {
            let intact = netlink::chain_looks_up(family, render::CANARY_CHAIN, render::SERVICES).unwrap_or(false);
            if !intact {
                // Not ours any more: rebuild from scratch.
                self.state.forget();
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes our tables (both families); nothing else is touched.
    fn cleanup(&mut self) -> Result<(), ProxyError> {
        self.state.forget();
        for family in [Family::V4, Family::V6] {
            if netlink::table_exists(family, render::TABLE)? {
                netlink::apply(&render::Script {
                    family,
                    table: render::TABLE,
                    cmds: vec![render::Cmd::DeleteTable],
                })?;
            }
        }
        Ok(())
    }
}
