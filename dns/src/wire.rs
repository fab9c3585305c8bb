//! The request path, pure: one request packet and the current zone in, a
//! reply packet (or a decision to forward, or to drop) out. No I/O, no
//! clock, so it can be fuzzed and called from any socket loop.
//!
//! It owns the protocol rules: malformed → FORMERR (or dropped when not even
//! a header can be read), responses and non-queries are never answered as
//! queries, EDNS payload size honoured and capped, additionals shed and then
//! TC set so that an answer never exceeds the client's limit.
//!
//! Two paths: `crate::fast` answers the common plain query for a zone name
//! by hand; everything else (and anything the fast path declines) is
//! decoded and encoded with hickory here. Both give the same bytes.

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};

use crate::fast::{self, Scratch};
use crate::zone::{name_key, Lookup, Zone};

/// The largest UDP payload we send or advertise (the DNS flag day 2020
/// value: no IP fragmentation on common paths).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The limit without EDNS (RFC 1035).
pub const CLASSIC_UDP_PAYLOAD: u16 = 512;
const HEADER_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A question that is not ours: what the forwarder needs to answer it.
#[derive(Debug, Clone)]
pub struct Request {
    pub metadata: Metadata,
    pub query: Query,
    /// `name_key` of the question name.
    pub key: Vec<u8>,
    pub edns: Option<Edns>,
    /// The client's size limit for this transport.
    pub limit: usize,
}

impl Request {
    pub fn dnssec_ok(&self) -> bool {
        self.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok)
    }
}

#[derive(Debug)]
pub enum Outcome {
    Reply {
        bytes: Vec<u8>,
        /// The question's type, when there was a readable question.
        qtype: Option<RecordType>,
        rcode: ResponseCode,
    },
    Forward(Request),
    /// Not even a header, or a response: never answered (no reflection).
    Drop,
}

/// Context of the request path beyond the zone.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// `name_key` of the cluster domain: names under it get SERVFAIL before
    /// the first zone rather than a wrong NXDOMAIN.
    pub cluster_key: &'a [u8],
    pub transport: Transport,
    /// Whether there is an upstream to forward to (RA bit; REFUSED otherwise).
    pub recursion: bool,
}

/// What `handle_into` did; a reply is in `Buffers::reply`.
#[derive(Debug)]
pub enum Handled {
    Reply {
        qtype: Option<RecordType>,
        rcode: ResponseCode,
    },
    Forward(Request),
    Drop,
}

/// Buffers that one socket loop reuses from request to request.
#[derive(Debug, Default)]
pub struct Buffers {
    scratch: Scratch,
    /// The reply bytes after `Handled::Reply`.
    pub reply: Vec<u8>,
}

/// Handles one request packet.
pub fn handle(packet: &[u8], zone: Option<&Zone>, ctx: Context<'_>) -> Outcome {
    let mut bufs = Buffers::default();
    match handle_into(packet, zone, ctx, &mut bufs) {
        Handled::Reply { qtype, rcode } => Outcome::Reply {
            bytes: bufs.reply,
            qtype,
            rcode,
        },
        Handled::Forward(req) => Outcome::Forward(req),
        Handled::Drop => Outcome::Drop,
    }
}

/// `handle` with reused buffers: the fast path first, then the general one.
pub fn handle_into(packet: &[u8], zone: Option<&Zone>, ctx: Context<'_>, bufs: &mut Buffers) -> Handled {
    if let Some(z) = zone {
        if let Some(a) = fast::answer(packet, z, ctx, &mut bufs.scratch, &mut bufs.reply) {
            return Handled::Reply {
                qtype: Some(a.qtype),
                rcode: a.rcode,
            };
        }
    }
    match handle_general(packet, zone, ctx) {
        Outcome::Reply { bytes, qtype, rcode } => {
            bufs.reply = bytes;
            Handled::Reply { qtype, rcode }
        }
        Outcome::Forward(req) => Handled::Forward(req),
        Outcome::Drop => Handled::Drop,
    }
}

/// The general path alone: every request decoded and every reply encoded
/// with hickory. (The fast path must give the same bytes; tests compare.)
pub fn handle_general(packet: &[u8], zone: Option<&Zone>, ctx: Context<'_>) -> Outcome {
    if packet.len() < HEADER_LEN {
        return Outcome::Drop;
    }
    // QR set: a response (or garbage claiming to be one); answering it
    // would let two servers bounce packets forever.
    if packet[2] & 0x80 != 0 {
        return Outcome::Drop;
    }
    let msg = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return header_only(packet, ResponseCode::FormErr),
    };
    let limit = client_limit(msg.edns.as_ref(), ctx.transport);
    let base = Metadata::response_from_request(&msg.metadata);
    if msg.metadata.op_code != OpCode::Query {
        return reply(
            base,
            msg.queries.first(),
            ResponseCode::NotImp,
            false,
            Sections::default(),
            &msg.edns,
            limit,
            ctx,
        );
    }
    if msg.queries.len() != 1 {
        return reply(
            base,
            None,
            ResponseCode::FormErr,
            false,
            Sections::default(),
            &msg.edns,
            limit,
            ctx,
        );
    }
    let Some(query) = msg.queries.first() else {
        return header_only(packet, ResponseCode::FormErr);
    };
    if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return reply(
            base,
            Some(query),
            ResponseCode::BADVERS,
            false,
            Sections::default(),
            &msg.edns,
            limit,
            ctx,
        );
    }
    let qtype = query.query_type();
    if matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT) {
        return reply(
            base,
            Some(query),
            ResponseCode::Refused,
            false,
            Sections::default(),
            &msg.edns,
            limit,
            ctx,
        );
    }
    let key = name_key(query.name());
    let class_ok = matches!(query.query_class(), DNSClass::IN | DNSClass::ANY);
    let cluster = crate::zone::key_is_under(&key, ctx.cluster_key);
    let lookup = match zone {
        Some(z) if class_ok => z.lookup_key(&key, query.name(), qtype),
        Some(_) | None if cluster => {
            // Before the first zone (or a class we do not serve) a cluster
            // name must not get a wrong NXDOMAIN.
            let rcode = if class_ok {
                ResponseCode::ServFail
            } else {
                ResponseCode::Refused
            };
            return reply(
                base,
                Some(query),
                rcode,
                false,
                Sections::default(),
                &msg.edns,
                limit,
                ctx,
            );
        }
        _ => Lookup::NotOurs,
    };
    let soa = || zone.map(|z| vec![z.soa().clone()]).unwrap_or_default();
    match lookup {
        Lookup::Answer { answers, additionals } => reply(
            base,
            Some(query),
            ResponseCode::NoError,
            true,
            Sections {
                answers,
                authorities: Vec::new(),
                additionals,
            },
            &msg.edns,
            limit,
            ctx,
        ),
        Lookup::NoData => reply(
            base,
            Some(query),
            ResponseCode::NoError,
            true,
            Sections {
                authorities: soa(),
                ..Sections::default()
            },
            &msg.edns,
            limit,
            ctx,
        ),
        Lookup::NxDomain => reply(
            base,
            Some(query),
            ResponseCode::NXDomain,
            true,
            Sections {
                authorities: soa(),
                ..Sections::default()
            },
            &msg.edns,
            limit,
            ctx,
        ),
        Lookup::NotOurs if !ctx.recursion => reply(
            base,
            Some(query),
            ResponseCode::Refused,
            false,
            Sections::default(),
            &msg.edns,
            limit,
            ctx,
        ),
        Lookup::NotOurs => Outcome::Forward(Request {
            metadata: msg.metadata,
            query: query.clone(),
            key,
            edns: msg.edns,
            limit,
        }),
    }
}

/// The reply to a forwarded request from the upstream's answer.
pub fn forwarded_reply(req: &Request, upstream: &Message) -> Vec<u8> {
    let base = Metadata::response_from_request(&req.metadata);
    let ctx = Context {
        cluster_key: &[],
        transport: Transport::Tcp,
        recursion: true,
    };
    let sections = Sections {
        answers: upstream.answers.clone(),
        authorities: upstream.authorities.clone(),
        additionals: upstream.additionals.clone(),
    };
    let mut base = base;
    base.authentic_data = upstream.metadata.authentic_data && req.metadata.authentic_data;
    match reply(
        base,
        Some(&req.query),
        upstream.metadata.response_code,
        false,
        sections,
        &req.edns,
        req.limit,
        ctx,
    ) {
        Outcome::Reply { bytes, .. } => bytes,
        _ => Vec::new(),
    }
}

/// A reply with an error code and no records (SERVFAIL when every upstream
/// failed, REFUSED on a forwarding loop).
pub fn error_reply(req: &Request, rcode: ResponseCode) -> Vec<u8> {
    let base = Metadata::response_from_request(&req.metadata);
    let ctx = Context {
        cluster_key: &[],
        transport: Transport::Tcp,
        recursion: true,
    };
    match reply(
        base,
        Some(&req.query),
        rcode,
        false,
        Sections::default(),
        &req.edns,
        req.limit,
        ctx,
    ) {
        Outcome::Reply { bytes, .. } => bytes,
        _ => Vec::new(),
    }
}

/// The size limit of the client: its EDNS payload (at least 512, at most
/// ours) over UDP, 512 without EDNS, 65535 over TCP.
pub fn client_limit(edns: Option<&Edns>, transport: Transport) -> usize {
    match transport {
        Transport::Tcp => usize::from(u16::MAX),
        Transport::Udp => match edns {
            Some(e) => usize::from(e.max_payload().clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD)),
            None => usize::from(CLASSIC_UDP_PAYLOAD),
        },
    }
}

#[derive(Default)]
struct Sections {
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

#[allow(clippy::too_many_arguments)]
fn reply(
    mut meta: Metadata,
    query: Option<&Query>,
    rcode: ResponseCode,
    authoritative: bool,
    sections: Sections,
    client_edns: &Option<Edns>,
    limit: usize,
    ctx: Context<'_>,
) -> Outcome {
    meta.response_code = rcode;
    meta.authoritative = authoritative;
    meta.recursion_available = ctx.recursion;
    let mut msg = Message::new(meta.id, MessageType::Response, meta.op_code);
    msg.metadata = meta;
    if let Some(q) = query {
        msg.add_query(q.clone());
    }
    msg.answers = sections.answers;
    msg.authorities = sections.authorities;
    msg.additionals = sections.additionals;
    if client_edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        edns.set_version(0);
        msg.set_edns(edns);
    }
    let qtype = query.map(|q| q.query_type());
    let bytes = match encode_within(&mut msg, limit) {
        Some(b) => b,
        None => {
            return header_only_with(
                meta.id,
                meta.op_code,
                meta.recursion_desired,
                ResponseCode::ServFail,
                qtype,
            )
        }
    };
    Outcome::Reply { bytes, qtype, rcode }
}

/// Encodes `msg` so it fits in `limit`: first whole; then without the
/// additional section (which a client may do without); then truncated
/// (TC set, no records) so the client retries over TCP.
fn encode_within(msg: &mut Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = msg.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    if !msg.additionals.is_empty() {
        msg.additionals.clear();
        let bytes = msg.to_vec().ok()?;
        if bytes.len() <= limit {
            return Some(bytes);
        }
    }
    msg.answers.clear();
    msg.authorities.clear();
    msg.additionals.clear();
    msg.metadata.truncation = true;
    let bytes = msg.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    // A question too long for the limit (only possible below 512 bytes,
    // which we never use): drop the question too.
    msg.queries.clear();
    msg.edns = None;
    msg.to_vec().ok().filter(|b| b.len() <= limit)
}

/// A 12-byte reply built from the raw request header, for requests too
/// broken to decode.
fn header_only(packet: &[u8], rcode: ResponseCode) -> Outcome {
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op_code = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let rd = packet[2] & 0x01 != 0;
    header_only_with(id, op_code, rd, rcode, None)
}

fn header_only_with(id: u16, op_code: OpCode, rd: bool, rcode: ResponseCode, qtype: Option<RecordType>) -> Outcome {
    let op = u8::from(op_code) & 0x0f;
    let mut b = vec![0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&id.to_be_bytes());
    b[2] = 0x80 | (op << 3) | u8::from(rd);
    b[3] = u8::try_from(u16::from(rcode) & 0x0f).unwrap_or(2);
    Outcome::Reply { bytes: b, qtype, rcode }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
