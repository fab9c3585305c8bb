//! The fast path of the request path: the common query (one question, class
//! IN, at most an OPT without options) for a name the zone answers, parsed
//! by hand and answered by writing the reply bytes straight from the
//! compact zone, with no hickory `Message` and no allocation once the
//! buffers have grown. An A or AAAA query for a name with such records
//! (every Service name) does not even resolve: its answer section was
//! compiled into wire bytes with the zone (`Zone::wire_answers`), so the
//! reply is a header patched from the request's, the question copied as
//! received, and those bytes.
//!
//! Anything else — other opcodes, several questions, EDNS options or
//! versions, names we forward, replies over the client's limit (which need
//! shedding or TC) — returns `None` and takes the general hickory path in
//! `wire`. The reply is byte for byte what the general path encodes: the
//! same sections in the same order, and names compressed the way hickory's
//! encoder does it (case-sensitive suffix matches, at most 64 candidate
//! pointers and 120 compressed names, SRV targets never compressed), which
//! `wire_tests` checks query by query and over the mutation run.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::wire::{Context, Transport, CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD};
use crate::zone::{for_each_key_label, push_key_label, Answer, Data, Owner, Rr, Status, Zone, SCHEMA_VERSION};

const HEADER_LEN: usize = 12;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
/// hickory's limits on name compression (see `BinEncoder`).
const POINTER_CANDIDATES: usize = 64;
const COMPRESSED_NAMES: usize = 120;
/// At most 127 labels fit in a 255-byte name.
const MAX_LABELS: usize = 128;

/// Buffers reused from query to query by one socket loop.
#[derive(Debug, Default)]
pub struct Scratch {
    key: Vec<u8>,
    answer: Answer,
    names: Compressor,
}

/// What the fast path answered (the reply is in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub qtype: RecordType,
    pub rcode: ResponseCode,
}

/// A parsed request that the fast path may answer.
struct Question<'p> {
    /// The question section as received (name, type, class).
    section: &'p [u8],
    /// The question name's labels as received, without the root byte.
    name: &'p [u8],
    qtype: u16,
    /// The client's EDNS payload size, when it sent an OPT.
    edns_payload: Option<u16>,
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*p.get(at)?, *p.get(at + 1)?]))
}

/// Parses the header, the one question into `key` and an optional bare
/// OPT; `None` for anything the fast path leaves to the general path.
fn parse<'p>(packet: &'p [u8], key: &mut Vec<u8>) -> Option<Question<'p>> {
    let opcode = (packet.get(2)? >> 3) & 0x0f;
    if packet.len() < HEADER_LEN || packet[2] & 0x80 != 0 || opcode != 0 {
        return None;
    }
    let (qd, an, ns, ar) = (be16(packet, 4)?, be16(packet, 6)?, be16(packet, 8)?, be16(packet, 10)?);
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    key.clear();
    let mut pos = HEADER_LEN;
    for _ in 0..MAX_LABELS {
        let len = usize::from(*packet.get(pos)?);
        if len == 0 {
            break;
        }
        // Pointers and extended label types: general path.
        if len > 63 {
            return None;
        }
        let label = packet.get(pos + 1..pos + 1 + len)?;
        if !key.is_empty() {
            key.push(b'.');
        }
        push_key_label(key, label);
        pos += 1 + len;
    }
    if *packet.get(pos)? != 0 || pos + 1 - HEADER_LEN > 255 {
        return None;
    }
    let name = packet.get(HEADER_LEN..pos)?;
    pos += 1;
    let qtype = be16(packet, pos)?;
    let qclass = be16(packet, pos + 2)?;
    pos += 4;
    let section = packet.get(HEADER_LEN..pos)?;
    if qclass != CLASS_IN || matches!(qtype, TYPE_OPT | 251 | 252) {
        return None;
    }
    let edns_payload = if ar == 1 {
        // Root owner, type OPT, payload, extended rcode 0, version 0, no
        // flags but DO, no options.
        let opt = packet.get(pos..pos + 11)?;
        if opt[0] != 0 || be16(opt, 1)? != TYPE_OPT || opt[5] != 0 || opt[6] != 0 || opt[7] & 0x7f != 0 || opt[8] != 0 {
            return None;
        }
        if be16(opt, 9)? != 0 {
            return None;
        }
        pos += 11;
        Some(be16(opt, 3)?)
    } else {
        None
    };
    if pos != packet.len() {
        return None;
    }
    Some(Question {
        section,
        name,
        qtype,
        edns_payload,
    })
}

/// Answers `packet` into `out` when it is a plain query for a name `zone`
/// answers and the reply fits the client's limit; `None` otherwise (the
/// general path decides).
pub fn answer(
    packet: &[u8],
    zone: &Zone,
    ctx: Context<'_>,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Option<Answered> {
    let q = parse(packet, &mut scratch.key)?;
    let qtype = RecordType::from(q.qtype);
    let limit = match (ctx.transport, q.edns_payload) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(p)) => usize::from(p.clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)),
        (Transport::Udp, None) => usize::from(CLASSIC_UDP_PAYLOAD),
    };
    // The commonest query, an address of a name with addresses: its answer
    // section was compiled with the zone, so the reply is the header, the
    // question as received and those bytes.
    if let Some((records, count)) = zone.wire_answers(&scratch.key, qtype) {
        out.clear();
        write_header(
            out,
            packet,
            ctx,
            ResponseCode::NoError,
            [1, count, 0, usize::from(q.edns_payload.is_some())],
        )?;
        out.extend_from_slice(q.section);
        out.extend_from_slice(records);
        if q.edns_payload.is_some() {
            write_opt(out);
        }
        if out.len() > limit {
            return None;
        }
        return Some(Answered {
            qtype,
            rcode: ResponseCode::NoError,
        });
    }
    let status = zone.resolve(&scratch.key, qtype, &mut scratch.answer);
    let rcode = match status {
        Status::Answer | Status::NoData => ResponseCode::NoError,
        Status::NxDomain => ResponseCode::NXDomain,
        Status::NotOurs => return None,
    };
    let answers = &scratch.answer.answers;
    let additionals = &scratch.answer.additionals;
    let authority = usize::from(status != Status::Answer);
    let counts = [
        1,
        answers.len(),
        authority,
        additionals.len() + usize::from(q.edns_payload.is_some()),
    ];

    out.clear();
    write_header(out, packet, ctx, rcode, counts)?;
    let names = &mut scratch.names;
    names.clear();
    // The question, as received; its suffixes are compression targets.
    names.write(out, NameSrc::Wire(q.name), true);
    out.extend_from_slice(&q.section[q.name.len() + 1..]);
    let ttl = zone.ttl();
    for rr in answers {
        write_record(out, names, zone, q.name, rr, ttl);
        if out.len() > limit {
            return None;
        }
    }
    if authority == 1 {
        let (origin, _, _, _) = zone.soa_parts();
        names.write(out, NameSrc::Key(zone.key_of(origin)), true);
        write_rest(out, names, zone, &Data::Soa, zone.soa().ttl);
    }
    for rr in additionals {
        write_record(out, names, zone, q.name, rr, ttl);
        if out.len() > limit {
            return None;
        }
    }
    if q.edns_payload.is_some() {
        write_opt(out);
    }
    if out.len() > limit {
        return None;
    }
    Some(Answered { qtype, rcode })
}

/// The reply header: the request's ID; QR, opcode QUERY, AA, RD echoed; RA,
/// CD echoed, `rcode`; the section counts.
fn write_header(
    out: &mut Vec<u8>,
    packet: &[u8],
    ctx: Context<'_>,
    rcode: ResponseCode,
    counts: [usize; 4],
) -> Option<()> {
    out.extend_from_slice(packet.get(0..2)?);
    out.push(0x84 | (packet.get(2)? & 0x01));
    out.push((u8::from(ctx.recursion) << 7) | (packet.get(3)? & 0x10) | (u16::from(rcode) & 0x0f) as u8);
    for c in counts {
        out.extend_from_slice(&u16::try_from(c).ok()?.to_be_bytes());
    }
    Some(())
}

/// Our OPT: root, OPT, our payload, extended rcode 0, version 0, no flags,
/// no options.
fn write_opt(out: &mut Vec<u8>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
}

fn write_record(out: &mut Vec<u8>, names: &mut Compressor, zone: &Zone, qname: &[u8], rr: &Rr, ttl: u32) {
    let owner = match rr.owner {
        Owner::Query => NameSrc::Wire(qname),
        Owner::Name(id) => NameSrc::Key(zone.key_of(id)),
    };
    names.write(out, owner, true);
    write_rest(out, names, zone, &rr.data, ttl);
}

/// A record after its owner name: type, class, TTL, RDATA.
fn write_rest(out: &mut Vec<u8>, names: &mut Compressor, zone: &Zone, data: &Data, ttl: u32) {
    out.extend_from_slice(&u16::from(data.record_type()).to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    let rdlen_at = out.len();
    out.extend_from_slice(&[0, 0]);
    match *data {
        Data::A(v4) => out.extend_from_slice(&v4.octets()),
        Data::Aaaa(v6) => out.extend_from_slice(&v6.octets()),
        Data::Srv { weight, port, target } => {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&weight.to_be_bytes());
            out.extend_from_slice(&port.to_be_bytes());
            // RFC 2782: SRV targets are not compressed.
            names.write(out, NameSrc::Key(zone.key_of(target)), false);
        }
        Data::Cname(t) | Data::Ptr(t) => names.write(out, NameSrc::Key(zone.key_of(t)), true),
        Data::Txt => {
            out.push(SCHEMA_VERSION.len() as u8);
            out.extend_from_slice(SCHEMA_VERSION.as_bytes());
        }
        Data::Soa => {
            let (_, mname, rname, soa) = zone.soa_parts();
            names.write(out, NameSrc::Key(zone.key_of(mname)), true);
            names.write(out, NameSrc::Key(zone.key_of(rname)), true);
            out.extend_from_slice(&soa.serial.to_be_bytes());
            out.extend_from_slice(&soa.refresh.to_be_bytes());
            out.extend_from_slice(&soa.retry.to_be_bytes());
            out.extend_from_slice(&soa.expire.to_be_bytes());
            out.extend_from_slice(&soa.minimum.to_be_bytes());
        }
    }
    // RDATA is far below 64 KiB; a failure here cannot happen, and the
    // caller's limit check catches any oddity.
    let _ = patch_rdlen(out, rdlen_at);
}

fn patch_rdlen(out: &mut [u8], at: usize) -> Option<()> {
    let len = u16::try_from(out.len().checked_sub(at + 2)?).ok()?;
    out.get_mut(at..at + 2)?.copy_from_slice(&len.to_be_bytes());
    Some(())
}

/// Where a name's labels come from.
#[derive(Clone, Copy)]
enum NameSrc<'a> {
    /// Wire labels without the root byte (and without pointers).
    Wire(&'a [u8]),
    /// A zone key (see `zone::name_key`).
    Key(&'a [u8]),
}

/// hickory's name compression, reproduced: every written name suffix is a
/// candidate (offset, uncompressed bytes); a name is written whole, then
/// replaced from its first label whose suffix matches a candidate by a
/// pointer.
#[derive(Debug, Default)]
struct Compressor {
    /// (offset in the message, range in `bytes`).
    candidates: Vec<(usize, usize, usize)>,
    bytes: Vec<u8>,
    compressed: usize,
    starts: Vec<usize>,
}

impl Compressor {
    fn clear(&mut self) {
        self.candidates.clear();
        self.bytes.clear();
        self.compressed = 0;
    }

    fn store(&mut self, out: &[u8], start: usize, end: usize) {
        if end < 0x3fff && self.candidates.len() < POINTER_CANDIDATES {
            let from = self.bytes.len();
            self.bytes.extend_from_slice(&out[start..end]);
            self.candidates.push((start, from, self.bytes.len()));
        }
    }

    fn find(&self, search: &[u8]) -> Option<usize> {
        self.candidates
            .iter()
            .find(|&&(_, from, to)| self.bytes.get(from..to) == Some(search))
            .map(|&(offset, _, _)| offset)
    }

    fn write(&mut self, out: &mut Vec<u8>, name: NameSrc<'_>, compress: bool) {
        self.starts.clear();
        match name {
            NameSrc::Wire(mut w) => {
                while let Some((&len, rest)) = w.split_first() {
                    let len = usize::from(len).min(rest.len());
                    self.starts.push(out.len());
                    out.push(len as u8);
                    out.extend_from_slice(&rest[..len]);
                    w = &rest[len..];
                }
            }
            NameSrc::Key(k) => for_each_key_label(k, |label| {
                self.starts.push(out.len());
                out.push(label.len() as u8);
                out.extend_from_slice(label);
            }),
        }
        let end = out.len();
        let compress = compress && self.compressed < COMPRESSED_NAMES;
        if compress {
            self.compressed += 1;
        }
        for i in 0..self.starts.len() {
            let start = self.starts[i];
            if compress {
                if let Some(at) = self.find(&out[start..end]).filter(|at| at & 0xc000 == 0) {
                    out.truncate(start);
                    self.candidates.retain(|&(offset, _, _)| offset < start);
                    out.extend_from_slice(&(0xc000 | at as u16).to_be_bytes());
                    return;
                }
            }
            self.store(out, start, end);
        }
        out.push(0);
    }
}
