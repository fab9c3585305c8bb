//! Applies a [`Script`] as one nf_tables netlink batch (one transaction),
//! without the `nft` tool: the commands are encoded into the same
//! expressions `nft` would send for their text (a root test loads a script
//! both ways and compares the kernel's listings).
//!
//! Why not `nft -f`: at 10,000 services its parser and cache cost seconds
//! of user time, and a one-endpoint change paid ~400 ms to read the
//! table back before writing two messages.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::render::{proto_number, Base, Cmd, Elem, Rule, Script, SetKind, Verdict, HAIRPIN, MASQ_MARK, TABLE};
use crate::error::ProxyError;
use crate::iptables::render::Family;

// linux/netfilter/nfnetlink.h, nf_tables.h, netlink.h
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;

const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NF_DROP: i32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

// nft's datatype numbers (informational: `nft list` prints with them).
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

/// Registers: 128-bit `NFT_REG_1..4` or 32-bit `NFT_REG32_00..15`, named
/// the way nft names them (the 128-bit name when the word is aligned).
fn reg(word: u32) -> u32 {
    if word.is_multiple_of(4) {
        1 + word / 4
    } else {
        8 + word
    }
}
const REG_VERDICT: u32 = 0;

/// A netlink message or attribute under construction.
#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.align();
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }

    fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Raw data bytes (`NFTA_DATA_VALUE`) inside attribute `kind`.
fn data_attr(b: &mut Buf, kind: u16, bytes: &[u8]) {
    b.nest(kind, |b| b.attr(NFTA_DATA_VALUE, bytes));
}

fn verdict_attr(b: &mut Buf, kind: u16, v: &Verdict) {
    let (code, chain) = match v {
        Verdict::Jump(c) => (NFT_JUMP, Some(c)),
        Verdict::Goto(c) => (NFT_GOTO, Some(c)),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Drop => (NF_DROP, None),
    };
    b.nest(kind, |b| {
        b.nest(NFTA_DATA_VERDICT, |b| {
            b.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
            if let Some(c) = chain {
                b.str(NFTA_VERDICT_CHAIN, c);
            }
        })
    });
}

fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// A value padded to whole 32-bit registers, as concatenations are laid out.
fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

struct Fam {
    nfproto: u8,
    len: u32,
    saddr: u32,
    daddr: u32,
    addr_type: u32,
}

fn fam(family: Family) -> Fam {
    match family {
        Family::V4 => Fam {
            nfproto: libc::NFPROTO_IPV4 as u8,
            len: 4,
            saddr: 12,
            daddr: 16,
            addr_type: TYPE_IPADDR,
        },
        Family::V6 => Fam {
            nfproto: libc::NFPROTO_IPV6 as u8,
            len: 16,
            saddr: 8,
            daddr: 24,
            addr_type: TYPE_IP6ADDR,
        },
    }
}

/// The expressions of one rule.
struct Exprs(Buf);

impl Exprs {
    fn expr(&mut self, name: &str, f: impl FnOnce(&mut Buf)) {
        self.0.nest(NFTA_LIST_ELEM, |b| {
            b.str(NFTA_EXPR_NAME, name);
            b.nest(NFTA_EXPR_DATA, f);
        });
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) {
        self.expr("payload", |b| {
            b.u32(1, dreg);
            b.u32(2, base);
            b.u32(3, offset);
            b.u32(4, len);
        });
    }

    fn meta_load(&mut self, key: u32, dreg: u32) {
        self.expr("meta", |b| {
            b.u32(1, dreg);
            b.u32(2, key);
        });
    }

    fn cmp(&mut self, neq: bool, data: &[u8]) {
        self.expr("cmp", |b| {
            b.u32(1, reg(0));
            b.u32(2, u32::from(neq));
            data_attr(b, 3, data);
        });
    }

    fn bitwise(&mut self, len: u32, mask: &[u8], xor: &[u8]) {
        self.expr("bitwise", |b| {
            b.u32(1, reg(0));
            b.u32(2, reg(0));
            b.u32(3, len);
            data_attr(b, 4, mask);
            data_attr(b, 5, xor);
        });
    }

    fn lookup(&mut self, set: &str, dreg: Option<u32>) {
        self.expr("lookup", |b| {
            b.str(1, set);
            b.u32(2, reg(0));
            if let Some(d) = dreg {
                b.u32(3, d);
            }
        });
    }

    fn immediate_data(&mut self, dreg: u32, data: &[u8]) {
        self.expr("immediate", |b| {
            b.u32(1, dreg);
            data_attr(b, 2, data);
        });
    }

    fn verdict(&mut self, v: &Verdict) {
        self.expr("immediate", |b| {
            b.u32(1, REG_VERDICT);
            verdict_attr(b, 2, v);
        });
    }

    fn l4proto(&mut self, proto: u8) {
        self.meta_load(16, reg(0));
        self.cmp(false, &[proto, 0, 0, 0]);
    }

    fn mark_set_or(&mut self) {
        self.meta_load(3, reg(0));
        self.bitwise(4, &(!MASQ_MARK).to_ne_bytes(), &MASQ_MARK.to_ne_bytes());
        self.meta_set_mark();
    }

    /// `meta mark set` from register 1.
    fn meta_set_mark(&mut self) {
        self.expr("meta", |b| {
            b.u32(2, 3);
            b.u32(3, reg(0));
        });
    }

    fn numgen(&mut self, n: u32, offset: u32) {
        self.expr("numgen", |b| {
            b.u32(1, reg(0));
            b.u32(2, n);
            b.u32(3, 1);
            if offset != 0 {
                b.u32(4, offset);
            }
        });
    }

    /// `ip saddr NET` as nft encodes a prefix: whole bytes loaded and
    /// compared, or the full address masked.
    fn saddr_in(&mut self, f: &Fam, net: &ipnet::IpNet) {
        let prefix = u32::from(net.prefix_len());
        let addr = addr_bytes(net.network());
        if prefix.is_multiple_of(8) {
            let n = (prefix / 8) as usize;
            self.payload(1, f.saddr, n as u32, reg(0));
            self.cmp(false, &addr[..n]);
        } else {
            self.payload(1, f.saddr, f.len, reg(0));
            let mask = addr_bytes(net.netmask());
            self.bitwise(f.len, &mask, &vec![0; f.len as usize]);
            self.cmp(false, &addr);
        }
    }

    fn dnat(&mut self, f: &Fam, addr_reg: u32, port_reg: u32, flags: Option<u32>) {
        self.expr("nat", |b| {
            b.u32(1, 1);
            b.u32(2, u32::from(f.nfproto));
            b.u32(3, addr_reg);
            b.u32(5, port_reg);
            if let Some(fl) = flags {
                b.u32(7, fl);
            }
        });
    }
}

fn encode_rule(rule: &Rule, family: Family) -> Buf {
    let f = fam(family);
    let w = f.len / 4; // words an address takes
    let mut e = Exprs(Buf::default());
    match rule {
        Rule::RejectTcpReset => {
            e.l4proto(6);
            e.expr("reject", |b| {
                b.u32(1, 1);
                b.attr(2, &[0]);
            });
        }
        Rule::Reject => {
            let code = match family {
                Family::V4 => 3,
                Family::V6 => 4,
            };
            e.expr("reject", |b| {
                b.u32(1, 0);
                b.attr(2, &[code]);
            });
        }
        Rule::Dispatch { map, ct_new } => {
            if *ct_new {
                e.expr("ct", |b| {
                    b.u32(1, reg(0));
                    b.u32(2, 0);
                });
                e.bitwise(4, &8u32.to_ne_bytes(), &[0; 4]);
                e.cmp(true, &[0; 4]);
            }
            e.payload(1, f.daddr, f.len, reg(0));
            e.meta_load(16, reg(w));
            e.payload(2, 2, 2, reg(w + 1));
            e.lookup(map, Some(REG_VERDICT));
        }
        Rule::HairpinMasquerade => {
            e.payload(1, f.saddr, f.len, reg(0));
            e.payload(1, f.daddr, f.len, reg(w));
            e.lookup(HAIRPIN, None);
            e.expr("masq", |_| {});
        }
        Rule::ReturnUnmarked => {
            e.meta_load(3, reg(0));
            e.bitwise(4, &MASQ_MARK.to_ne_bytes(), &[0; 4]);
            e.cmp(false, &[0; 4]);
            e.verdict(&Verdict::Return);
        }
        Rule::ClearMark => {
            e.meta_load(3, reg(0));
            e.bitwise(4, &u32::MAX.to_ne_bytes(), &MASQ_MARK.to_ne_bytes());
            e.meta_set_mark();
        }
        Rule::MasqueradeFullyRandom => e.expr("masq", |b| b.u32(1, 0x10)),
        Rule::Step {
            saddr,
            fib_local,
            mark,
            verdict,
        } => {
            if let Some(net) = saddr {
                e.saddr_in(&f, net);
            }
            if *fib_local {
                e.expr("fib", |b| {
                    b.u32(1, reg(0));
                    b.u32(2, 3);
                    b.u32(3, 1);
                });
                // RTN_LOCAL
                e.cmp(false, &2u32.to_ne_bytes());
            }
            if *mark {
                e.mark_set_or();
            }
            if let Some(v) = verdict {
                e.verdict(v);
            }
        }
        Rule::AffinityHit { set, chain } => {
            e.payload(1, f.saddr, f.len, reg(0));
            e.lookup(set, None);
            e.verdict(&Verdict::Goto(chain.clone()));
        }
        Rule::Pick { n, chain } => {
            if *n > 1 {
                e.numgen(*n, 0);
                e.cmp(false, &[0; 4]);
            }
            e.verdict(&Verdict::Goto(chain.clone()));
        }
        Rule::Dnat {
            update,
            proto,
            addr,
            port,
        } => {
            if let Some(set) = update {
                e.payload(1, f.saddr, f.len, reg(0));
                e.expr("dynset", |b| {
                    b.str(1, set);
                    b.u32(3, 1);
                    b.u32(4, reg(0));
                });
            }
            e.l4proto(proto_number(*proto));
            e.immediate_data(reg(0), &addr_bytes(*addr));
            e.immediate_data(reg(4), &port.to_be_bytes());
            e.dnat(&f, reg(0), reg(4), Some(0x2));
        }
        Rule::DnatMap { proto, n, offset, map } => {
            e.l4proto(proto_number(*proto));
            e.numgen(*n, *offset);
            e.lookup(map, Some(reg(0)));
            e.dnat(&f, reg(0), reg(w), None);
        }
        Rule::Notrack {
            addr,
            proto,
            port,
            reply,
        } => {
            e.payload(1, if *reply { f.saddr } else { f.daddr }, f.len, reg(0));
            e.cmp(false, &addr_bytes(*addr));
            e.l4proto(proto_number(*proto));
            // th sport is at offset 0, dport at 2.
            e.payload(2, if *reply { 0 } else { 2 }, 2, reg(0));
            e.cmp(false, &port.to_be_bytes());
            e.expr("notrack", |_| {});
        }
    }
    e.0
}

fn set_attrs(b: &mut Buf, table: &str, name: &str, kind: SetKind, family: Family, id: u32) {
    let f = fam(family);
    let concat = |types: &[u32]| types.iter().fold(0u32, |acc, t| (acc << 6) | t);
    b.str(NFTA_SET_TABLE, table);
    b.str(NFTA_SET_NAME, name);
    b.u32(NFTA_SET_ID, id);
    match kind {
        SetKind::Frontends => {
            b.u32(NFTA_SET_FLAGS, NFT_SET_MAP);
            b.u32(
                NFTA_SET_KEY_TYPE,
                concat(&[f.addr_type, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
            );
            b.u32(NFTA_SET_KEY_LEN, f.len + 8);
            b.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        }
        SetKind::Hairpin => {
            b.u32(NFTA_SET_FLAGS, 0);
            b.u32(NFTA_SET_KEY_TYPE, concat(&[f.addr_type, f.addr_type]));
            b.u32(NFTA_SET_KEY_LEN, f.len * 2);
        }
        SetKind::Backends(_) => {
            b.u32(NFTA_SET_FLAGS, NFT_SET_MAP);
            b.u32(NFTA_SET_KEY_TYPE, TYPE_INTEGER);
            b.u32(NFTA_SET_KEY_LEN, 4);
            b.u32(NFTA_SET_DATA_TYPE, concat(&[f.addr_type, TYPE_INET_SERVICE]));
            b.u32(NFTA_SET_DATA_LEN, f.len + 4);
        }
        SetKind::Affinity(timeout) => {
            b.u32(NFTA_SET_FLAGS, NFT_SET_TIMEOUT | NFT_SET_EVAL);
            b.u32(NFTA_SET_KEY_TYPE, f.addr_type);
            b.u32(NFTA_SET_KEY_LEN, f.len);
            b.attr(NFTA_SET_TIMEOUT, &(u64::from(timeout) * 1000).to_be_bytes());
        }
    }
}

fn elem_attrs(b: &mut Buf, e: &Elem, with_data: bool) {
    b.nest(NFTA_LIST_ELEM, |b| match e {
        Elem::Frontend { key, verdict } => {
            let mut k = padded(&addr_bytes(key.ip));
            k.extend_from_slice(&padded(&[proto_number(key.proto)]));
            k.extend_from_slice(&padded(&key.port.to_be_bytes()));
            data_attr(b, NFTA_SET_ELEM_KEY, &k);
            if with_data {
                verdict_attr(b, NFTA_SET_ELEM_DATA, verdict);
            }
        }
        Elem::Hairpin(ip) => {
            let mut k = addr_bytes(*ip);
            k.extend_from_slice(&addr_bytes(*ip));
            data_attr(b, NFTA_SET_ELEM_KEY, &k);
        }
        Elem::Backend { key, addr, port } => {
            data_attr(b, NFTA_SET_ELEM_KEY, &key.to_ne_bytes());
            if with_data {
                let mut d = addr_bytes(*addr);
                d.extend_from_slice(&padded(&port.to_be_bytes()));
                data_attr(b, NFTA_SET_ELEM_DATA, &d);
            }
        }
    });
}

/// Builds the batch: (bytes, the command index of each sequence number).
fn encode(script: &Script) -> (Vec<u8>, Vec<Option<usize>>) {
    let family = script.family;
    let table = script.table;
    let nfproto = fam(family).nfproto;
    let mut out = Vec::with_capacity(64 + script.cmds.len() * 160);
    // Per sequence number, the command it came from (formatted only for
    // an error).
    let mut what: Vec<Option<usize>> = Vec::with_capacity(script.cmds.len() + 2);
    let msg =
        |out: &mut Vec<u8>, what: &mut Vec<Option<usize>>, kind: u16, flags: u16, body: Buf, desc: Option<usize>| {
            let seq = what.len() as u32;
            let len = 16 + 4 + body.0.len();
            out.extend_from_slice(&(len as u32).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
            out.extend_from_slice(&seq.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            // nfgenmsg: family, version, res_id (big endian)
            let res_id: u16 = if kind == NFNL_MSG_BATCH_BEGIN || kind == NFNL_MSG_BATCH_END {
                NFNL_SUBSYS_NFTABLES
            } else {
                0
            };
            let fam_byte = if res_id != 0 { 0 } else { nfproto };
            out.push(fam_byte);
            out.push(0);
            out.extend_from_slice(&res_id.to_be_bytes());
            out.extend_from_slice(&body.0);
            what.push(desc);
        };
    let nft = |m: u16| (NFNL_SUBSYS_NFTABLES << 8) | m;
    msg(&mut out, &mut what, NFNL_MSG_BATCH_BEGIN, 0, Buf::default(), None);
    let mut last = None;
    for (index, cmd) in script.cmds.iter().enumerate() {
        let mut b = Buf::default();
        let (kind, flags) = match cmd {
            Cmd::AddTable => {
                b.str(NFTA_TABLE_NAME, table);
                (nft(NFT_MSG_NEWTABLE), NLM_F_CREATE)
            }
            Cmd::DeleteTable => {
                b.str(NFTA_TABLE_NAME, table);
                (nft(NFT_MSG_DELTABLE), 0)
            }
            Cmd::FlushTable => {
                b.str(NFTA_RULE_TABLE, table);
                (nft(NFT_MSG_DELRULE), 0)
            }
            Cmd::AddSet(name, kind) => {
                set_attrs(&mut b, table, name, *kind, family, what.len() as u32);
                (nft(NFT_MSG_NEWSET), NLM_F_CREATE)
            }
            Cmd::FlushSet(name, _) => {
                b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                b.str(NFTA_SET_ELEM_LIST_SET, name);
                (nft(NFT_MSG_DELSETELEM), 0)
            }
            Cmd::DeleteSet(name, _) => {
                b.str(NFTA_SET_TABLE, table);
                b.str(NFTA_SET_NAME, name);
                (nft(NFT_MSG_DELSET), 0)
            }
            Cmd::AddChain(name, base) => {
                b.str(NFTA_CHAIN_TABLE, table);
                b.str(NFTA_CHAIN_NAME, name);
                if let Some(Base { nat, hook, priority }) = base {
                    b.nest(NFTA_CHAIN_HOOK, |b| {
                        b.u32(NFTA_HOOK_HOOKNUM, *hook);
                        b.attr(NFTA_HOOK_PRIORITY, &priority.to_be_bytes());
                    });
                    b.u32(NFTA_CHAIN_POLICY, NF_ACCEPT);
                    b.str(NFTA_CHAIN_TYPE, if *nat { "nat" } else { "filter" });
                }
                (nft(NFT_MSG_NEWCHAIN), NLM_F_CREATE)
            }
            Cmd::FlushChain(name) => {
                b.str(NFTA_RULE_TABLE, table);
                b.str(NFTA_RULE_CHAIN, name);
                (nft(NFT_MSG_DELRULE), 0)
            }
            Cmd::DeleteChain(name) => {
                b.str(NFTA_CHAIN_TABLE, table);
                b.str(NFTA_CHAIN_NAME, name);
                (nft(NFT_MSG_DELCHAIN), 0)
            }
            Cmd::AddRule(chain, rule) => {
                b.str(NFTA_RULE_TABLE, table);
                b.str(NFTA_RULE_CHAIN, chain);
                let exprs = encode_rule(rule, family);
                b.nest(NFTA_RULE_EXPRESSIONS, |b| b.0.extend_from_slice(&exprs.0));
                (nft(NFT_MSG_NEWRULE), NLM_F_CREATE | NLM_F_APPEND)
            }
            Cmd::AddElements(set, elems) | Cmd::DeleteElements(set, elems) => {
                let add = matches!(cmd, Cmd::AddElements(..));
                let (kind, flags) = if add {
                    (nft(NFT_MSG_NEWSETELEM), NLM_F_CREATE)
                } else {
                    (nft(NFT_MSG_DELSETELEM), 0)
                };
                // An attribute's length is 16 bits: one message per ~32 KiB.
                let mut rest = elems.as_slice();
                while !rest.is_empty() {
                    let mut b = Buf::default();
                    b.str(NFTA_SET_ELEM_LIST_TABLE, table);
                    b.str(NFTA_SET_ELEM_LIST_SET, set);
                    let mut taken = 0;
                    b.nest(NFTA_SET_ELEM_LIST_ELEMENTS, |b| {
                        for e in rest {
                            elem_attrs(b, e, add);
                            taken += 1;
                            if b.0.len() > 32 * 1024 {
                                break;
                            }
                        }
                    });
                    last = Some(out.len());
                    msg(&mut out, &mut what, kind, flags, b, Some(index));
                    rest = &rest[taken..];
                }
                continue;
            }
        };
        last = Some(out.len());
        msg(&mut out, &mut what, kind, flags, b, Some(index));
    }
    // The last command asks for an acknowledgement: a batch the kernel
    // aborted without a per-message error (a malformed message) sends none.
    if let Some(pos) = last {
        let flags = u16::from_ne_bytes([out[pos + 6], out[pos + 7]]) | NLM_F_ACK;
        out[pos + 6..pos + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    msg(&mut out, &mut what, NFNL_MSG_BATCH_END, 0, Buf::default(), None);
    (out, what)
}

/// A short description for errors (element lists are not spelled out).
fn cmd_summary(cmd: &Cmd, family: Family, table: &str) -> String {
    match cmd {
        Cmd::AddElements(set, v) => format!("add elements to {set} (a message of the {} in this command)", v.len()),
        Cmd::DeleteElements(set, v) => format!(
            "delete elements from {set} (a message of the {} in this command)",
            v.len()
        ),
        other => other.text(family, table),
    }
}

fn socket() -> Result<OwnedFd, ProxyError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER) };
    if fd < 0 {
        return Err(ProxyError::Other(format!(
            "netlink socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_buf(fd: &OwnedFd, opt: i32, size: usize) {
    let v = size.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt with a pointer to a live c_int of the right size;
    // failure only means a smaller buffer (sendmsg then reports EMSGSIZE).
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Sends `script` as one transaction; any error aborts all of it, and the
/// error names the command the kernel refused.
pub fn apply(script: &Script) -> Result<(), ProxyError> {
    if script.is_empty() {
        return Ok(());
    }
    let (batch, what) = encode(script);
    let fd = socket()?;
    set_buf(&fd, libc::SO_SNDBUFFORCE, batch.len() + 65536);
    set_buf(&fd, libc::SO_RCVBUFFORCE, 4 << 20);
    // SAFETY: zeroed sockaddr_nl is valid (pid 0 = the kernel).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: the buffer and address outlive the call; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            batch.as_ptr().cast(),
            batch.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 || sent as usize != batch.len() {
        return Err(ProxyError::Other(format!(
            "netlink send of {} bytes: {}",
            batch.len(),
            std::io::Error::last_os_error()
        )));
    }
    // The kernel processes the batch inside sendto: every error, and the
    // acknowledgement of the last message, is queued by now.
    let mut errors = Vec::new();
    let mut acked = false;
    let last_seq = what.len().saturating_sub(2);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: recv into an owned buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                break;
            }
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            errors.push(format!("reading netlink replies: {err}"));
            break;
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + 16 <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                break;
            }
            if kind == NLMSG_ERROR && len >= 20 + 16 {
                let code = i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
                let seq = u32::from_ne_bytes([buf[at + 28], buf[at + 29], buf[at + 30], buf[at + 31]]) as usize;
                if code == 0 && seq == last_seq {
                    acked = true;
                } else if code != 0 {
                    let cmd = match what.get(seq) {
                        Some(Some(i)) => cmd_summary(&script.cmds[*i], script.family, script.table),
                        Some(None) => "batch".to_string(),
                        None => format!("message {seq}"),
                    };
                    errors.push(format!("{cmd}: {}", std::io::Error::from_raw_os_error(-code)));
                }
            }
            at += (len + 3) & !3;
        }
    }
    if errors.is_empty() && !acked {
        errors.push("the kernel aborted the batch without naming a message (malformed batch?)".into());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ProxyError::Other(format!(
            "nftables transaction on table {} {} refused: {}",
            super::render::fam(script.family),
            script.table,
            errors.join("; ")
        )))
    }
}

const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETRULE: u16 = 7;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;

/// Attributes of one level: (type without flags, payload).
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & !NLA_F_NESTED;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    out
}

fn attr_str(data: &[u8]) -> &str {
    std::str::from_utf8(data.split(|b| *b == 0).next().unwrap_or_default()).unwrap_or_default()
}

/// Sends one dump request and returns the payloads (after the nfgenmsg)
/// of the replies.
fn dump(family: Family, msg: u16, body: Buf) -> Result<Vec<Vec<u8>>, ProxyError> {
    let fd = socket()?;
    let mut req = Vec::new();
    let len = 16 + 4 + body.0.len();
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[fam(family).nfproto, 0, 0, 0]);
    req.extend_from_slice(&body.0);
    // SAFETY: the buffer outlives the call; its length is its own.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(ProxyError::Other(format!(
            "netlink dump request: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: recv into an owned buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ProxyError::Other(format!("netlink dump: {err}")));
        }
        let n = n as usize;
        let mut at = 0usize;
        while at + 16 <= n {
            let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < 16 || at + len > n {
                break;
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
                    if code == -libc::ENOENT {
                        return Ok(Vec::new());
                    }
                    return Err(ProxyError::Other(format!(
                        "netlink dump: {}",
                        std::io::Error::from_raw_os_error(-code)
                    )));
                }
                _ if len >= 20 => out.push(buf[at + 20..at + len].to_vec()),
                _ => {}
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// Whether ferry's `table` of `family` exists.
pub fn table_exists(family: Family, table: &str) -> Result<bool, ProxyError> {
    let tables = dump(family, NFT_MSG_GETTABLE, Buf::default())?;
    Ok(tables.iter().any(|t| {
        attrs(t)
            .iter()
            .any(|(k, v)| *k == NFTA_TABLE_NAME && attr_str(v) == table)
    }))
}

/// Whether `chain` of ferry's table holds a rule that looks `map` up: the
/// canary (a flushed or deleted table has none).
pub fn chain_looks_up(family: Family, chain: &str, map: &str) -> Result<bool, ProxyError> {
    let mut b = Buf::default();
    b.str(NFTA_RULE_TABLE, TABLE);
    b.str(NFTA_RULE_CHAIN, chain);
    let rules = dump(family, NFT_MSG_GETRULE, b)?;
    Ok(rules.iter().any(|rule| {
        attrs(rule)
            .iter()
            .filter(|(k, _)| *k == NFTA_RULE_EXPRESSIONS)
            .flat_map(|(_, list)| attrs(list))
            .any(|(_, expr)| {
                let fields = attrs(expr);
                let is_lookup = fields
                    .iter()
                    .any(|(k, v)| *k == NFTA_EXPR_NAME && attr_str(v) == "lookup");
                is_lookup
                    && fields
                        .iter()
                        .filter(|(k, _)| *k == NFTA_EXPR_DATA)
                        .flat_map(|(_, d)| attrs(d))
                        .any(|(k, v)| k == 1 && attr_str(v) == map)
            })
    }))
}
