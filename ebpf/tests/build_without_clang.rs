//! A machine with only the Rust toolchain: this crate builds with no clang
//! and no C compiler for the layout probe (`CLANG=/bin/false CC=/bin/false`),
//! into a fresh target directory, using the objects and layout shipped in
//! `obj/`; its own tests (ABI layout, object format) pass on that build.
//! Costs a debug build of aya and its dependencies (no network: `--offline`,
//! they were fetched for this build already).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn builds_and_passes_its_tests_without_clang() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = tempfile::tempdir().unwrap();
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&crate_dir)
        .args(["test", "--offline", "-p", "ferry-ebpf", "--lib"])
        .env("CARGO_TARGET_DIR", target.path())
        .env("CLANG", "/bin/false")
        .env("CC", "/bin/false")
        .env_remove("RUSTC_WRAPPER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("test result: ok."), "{stdout}");
    assert!(
        stderr.contains("using the BPF objects shipped in ebpf/obj/"),
        "{stderr}"
    );
    assert!(stderr.contains("the ABI test uses ebpf/obj/layout.txt"), "{stderr}");

    // The build embedded exactly the shipped files.
    let out_dir = find_out_dir(&target.path().join("debug/build")).expect("ferry-ebpf's OUT_DIR");
    for f in ["sock.bpf.o", "tc.bpf.o", "layout.txt"] {
        let built = std::fs::read(out_dir.join(f)).unwrap();
        let shipped = std::fs::read(crate_dir.join("obj").join(f)).unwrap();
        assert!(built == shipped, "{f} in OUT_DIR is not the shipped one");
    }
}

/// `build/ferry-ebpf-<hash>/out` holding the objects (the other
/// `ferry-ebpf-<hash>` directory holds the build script itself).
fn find_out_dir(build: &Path) -> Option<PathBuf> {
    std::fs::read_dir(build)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("out"))
        .find(|p| {
            p.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n.to_string_lossy().starts_with("ferry-ebpf-"))
                && p.join("sock.bpf.o").exists()
        })
}
