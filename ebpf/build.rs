//! Compiles the BPF programs (`src/*.bpf.c`) with clang into OUT_DIR, and
//! builds + runs a host program (`src/layout.c`) that prints the C layout of
//! the shared structs into OUT_DIR/layout.txt for the ABI test.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAMS: &[&str] = &["sock", "tc"];

fn main() {
    if let Err(e) = build() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let src = Path::new("src");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=src/ferry_maps.h");
    println!("cargo:rerun-if-changed=src/shared_maps.bpf.h");
    println!("cargo:rerun-if-changed=src/layout.c");

    match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err(format!(
                "ferry-ebpf needs clang to compile its BPF programs, and `{clang} --version` failed. \
                 Install it (Debian/Ubuntu: apt-get install clang llvm libbpf-dev) or set CLANG=/path/to/clang."
            ))
        }
    }
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        println!("cargo:warning=/usr/include/bpf/bpf_helpers.h not found; install libbpf-dev if the BPF build fails");
    }

    let arch_include = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for name in PROGRAMS {
        let input = src.join(format!("{name}.bpf.c"));
        println!("cargo:rerun-if-changed={}", input.display());
        let output = out.join(format!("{name}.bpf.o"));
        run(Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .arg(&arch_include)
            .arg("-Isrc")
            .arg("-c")
            .arg(&input)
            .arg("-o")
            .arg(&output))?;
    }

    let layout_bin = out.join("layout");
    run(Command::new(&clang)
        .arg("-O0")
        .arg("-Isrc")
        .arg(src.join("layout.c"))
        .arg("-o")
        .arg(&layout_bin))?;
    let printed = Command::new(&layout_bin)
        .output()
        .map_err(|e| format!("running {}: {e}", layout_bin.display()))?;
    if !printed.status.success() {
        return Err(format!("{} failed: {}", layout_bin.display(), printed.status));
    }
    std::fs::write(out.join("layout.txt"), &printed.stdout).map_err(|e| format!("writing layout.txt: {e}"))?;
    Ok(())
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
