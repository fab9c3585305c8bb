//! `cargo xtask bpf`: recompiles the BPF programs into `ebpf/obj/`, the
//! objects a build uses when clang is missing, and records the C layout and
//! the clang that made them. Run it after editing `ebpf/src/*.bpf.c` or the
//! shared headers; the drift test fails until then.

#[path = "../../ebpf/compile.rs"]
mod compile;

use std::path::PathBuf;

use anyhow::{anyhow, Context};

pub fn run() -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let dir = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    let obj = dir.join("obj");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let version = compile::clang_version(&clang).ok_or_else(|| {
        anyhow!("`{clang} --version` failed: `cargo xtask bpf` needs clang (apt-get install clang libbpf-dev)")
    })?;
    std::fs::create_dir_all(&obj).with_context(|| format!("creating {}", obj.display()))?;
    for name in compile::PROGRAMS {
        let out = obj.join(format!("{name}.bpf.o"));
        compile::compile_program(&clang, &dir, name, &out).map_err(|e| anyhow!(e))?;
        eprintln!("xtask: wrote {}", out.display());
    }
    let scratch = std::env::temp_dir().join(format!("ferry-xtask-bpf-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let layout = compile::c_layout(&clang, &dir, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::write(obj.join("layout.txt"), layout.map_err(|e| anyhow!(e))?)?;
    std::fs::write(obj.join("clang-version.txt"), format!("{version}\n"))?;
    eprintln!("xtask: wrote layout.txt and clang-version.txt ({version})");
    Ok(())
}
