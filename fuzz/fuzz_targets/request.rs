//! Fuzz target for the DNS request path: any packet, over UDP and TCP,
//! against a zone with every record kind; whenever the fast path answers,
//! its bytes must equal the general (hickory) path's. Run:
//! `cargo +nightly fuzz run request`.
//! The same property runs in plain `cargo test` (dns/src/wire_tests.rs,
//! `no_input_panics_or_overflows`) on machines without cargo-fuzz.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use ferry_dns::fast::{self, Scratch};
use ferry_dns::wire::{handle, handle_general, Context, Outcome, Transport};
use ferry_dns::{Zone, ZoneConfig};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let text = include_str!("../../dns/tests/fixtures/cluster.yaml");
        let objects: Vec<_> = ferry_cluster::files::parse_documents(Path::new("cluster.yaml"), text)
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let snap = ferry_cluster::Snapshot::from_objects(1, objects);
        Zone::build(&snap, &ZoneConfig::default()).unwrap_or_else(|e| panic!("fixture zone: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    for (transport, limit) in [(Transport::Udp, 1232), (Transport::Tcp, 65535)] {
        let ctx = Context {
            cluster_key: b"cluster.local",
            transport,
            recursion: true,
        };
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        if fast::answer(data, zone(), ctx, &mut scratch, &mut out).is_some() {
            match handle_general(data, Some(zone()), ctx) {
                Outcome::Reply { bytes, .. } => assert_eq!(bytes, out),
                other => panic!("fast path answered, general path did {other:?}"),
            }
        }
        for z in [Some(zone()), None] {
            if let Outcome::Reply { bytes, .. } = handle(data, z, ctx) {
                assert!(bytes.len() <= limit);
                assert!(bytes.len() >= 12);
                assert_eq!(bytes[0..2], data[0..2]);
            }
        }
    }
});
