//! Puts the BPF objects (`sock.bpf.o`, `tc.bpf.o`) and the C layout of the
//! shared structs (`layout.txt`, for the ABI test) into OUT_DIR.
//!
//! With a working clang (`$CLANG`, else `clang`) the objects are compiled
//! from `src/*.bpf.c`; when clang is missing or fails, the objects shipped in
//! `obj/` are used instead (refreshed by `cargo xtask bpf`; a test keeps them
//! equal to the sources), so a machine with only the Rust toolchain builds.
//! The layout is printed by `src/layout.c` built with clang, else the host C
//! compiler (`$CC`, else `cc`), else taken from `obj/layout.txt`.

#[path = "compile.rs"]
mod compile;

use std::path::{Path, PathBuf};

fn main() {
    if let Err(e) = build() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?);
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed=compile.rs");
    println!("cargo:rerun-if-changed=src/layout.c");
    println!("cargo:rerun-if-changed=obj");
    for h in compile::HEADERS {
        println!("cargo:rerun-if-changed=src/{h}");
    }
    for name in compile::PROGRAMS {
        println!("cargo:rerun-if-changed=src/{name}.bpf.c");
    }

    let compiled = match compile::clang_version(&clang) {
        None => Err(format!("`{clang} --version` failed")),
        Some(_) => compile::PROGRAMS
            .iter()
            .try_for_each(|name| compile::compile_program(&clang, &dir, name, &out.join(format!("{name}.bpf.o")))),
    };
    if let Err(e) = compiled {
        let first = e.lines().next().unwrap_or_default().to_string();
        println!(
            "cargo:warning=using the BPF objects shipped in ebpf/obj/ (clang could not compile src/*.bpf.c: {first}); \
             install clang and libbpf-dev to build them from source"
        );
        if e.lines().count() > 1 {
            eprintln!("{e}");
        }
        for name in compile::PROGRAMS {
            copy(
                &dir.join("obj").join(format!("{name}.bpf.o")),
                &out.join(format!("{name}.bpf.o")),
            )?;
        }
    }

    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let layout = compile::c_layout(&clang, &dir, &out).or_else(|_| compile::c_layout(&cc, &dir, &out));
    match layout {
        Ok(text) => std::fs::write(out.join("layout.txt"), text).map_err(|e| format!("writing layout.txt: {e}"))?,
        Err(e) => {
            println!(
                "cargo:warning=no C compiler could build src/layout.c ({}); the ABI test uses ebpf/obj/layout.txt",
                e.lines().next().unwrap_or_default()
            );
            copy(&dir.join("obj/layout.txt"), &out.join("layout.txt"))?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}
