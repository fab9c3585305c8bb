//! Fuzz target for the lean HTTP/1.1 server path: any bytes go to
//! `ferry_ingress::h1_server::parse` (as the lean connection loop runs it)
//! and to hyper's HTTP/1 server as ferry configures it; every request the
//! lean path accepts must be accepted by hyper the same way (method,
//! target, version, headers in order, no body), and a lean reject must be
//! one of its documented framing rules. Run from `ingress/fuzz`:
//! `cargo +nightly fuzz run h1_head`.
//! The check is `ingress/tests/h1_diff/mod.rs`, which plain `cargo test`
//! runs over a seeded corpus and its mutants (`tests/h1_differential.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/h1_diff/mod.rs"]
mod h1_diff;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = h1_diff::check(data) {
        panic!("{e}\ninput: {:?}", String::from_utf8_lossy(data));
    }
});
