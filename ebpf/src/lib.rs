//! BPF programs for the eBPF service dataplane, written in C
//! (`src/*.bpf.c`), compiled by `build.rs` with clang and embedded here, plus
//! the `#[repr(C)]` types shared with the C side. Built by the eBPF issue.
