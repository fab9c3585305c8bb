//! How ferry's BPF programs and the layout probe are compiled, shared by
//! `build.rs`, `cargo xtask bpf` (which refreshes the shipped objects in
//! `obj/`) and the drift test (`tests/shipped_objects.rs`), so all three use
//! the same flags.
//!
//! The flags are fixed and no absolute path is recorded, so the objects do
//! not depend on where the tree is checked out.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The programs, each `src/<name>.bpf.c` → `<name>.bpf.o`.
pub const PROGRAMS: &[&str] = &["sock", "tc"];

/// The headers the programs include (for rerun-if-changed).
pub const HEADERS: &[&str] = &["ferry_maps.h", "shared_maps.bpf.h"];

/// `clang --version`'s first line, or `None` when `clang` does not run.
pub fn clang_version(clang: &str) -> Option<String> {
    let out = Command::new(clang).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next().unwrap_or_default().trim().to_string())
}

/// Compiles `<crate_dir>/src/<name>.bpf.c` into `out` (an absolute path).
/// Runs in `crate_dir` with relative source paths and the compilation
/// directory recorded as `.`, so no absolute path reaches the object.
pub fn compile_program(clang: &str, crate_dir: &Path, name: &str, out: &Path) -> Result<(), String> {
    let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    run(Command::new(clang)
        .current_dir(crate_dir)
        .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
        .arg("-fdebug-compilation-dir=.")
        .arg(format!("-fdebug-prefix-map={}=.", crate_dir.display()))
        .arg(&arch_include)
        .arg("-Isrc")
        .arg("-c")
        .arg(format!("src/{name}.bpf.c"))
        .arg("-o")
        .arg(out))
}

/// Builds and runs `src/layout.c` with the host C compiler `cc`, returning
/// what it prints (the C layout of the shared structs).
pub fn c_layout(cc: &str, crate_dir: &Path, scratch: &Path) -> Result<String, String> {
    let src = crate_dir.join("src");
    let bin = scratch.join("ferry-ebpf-layout");
    run(Command::new(cc)
        .arg("-O0")
        .arg(format!("-I{}", src.display()))
        .arg(src.join("layout.c"))
        .arg("-o")
        .arg(&bin))?;
    let printed = Command::new(&bin)
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    if !printed.status.success() {
        return Err(format!("{} failed: {}", bin.display(), printed.status));
    }
    String::from_utf8(printed.stdout).map_err(|e| format!("{}: output is not UTF-8: {e}", bin.display()))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let o = cmd.output().map_err(|e| format!("{shown}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}
