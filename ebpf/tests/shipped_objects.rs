//! The BPF objects shipped in `obj/` (used when clang is missing) must be
//! what the sources compile to: this test compiles `src/*.bpf.c` with the
//! same flags as build.rs and compares the two after normalising what may
//! vary — DWARF and BTF (string offsets, line info) are left out; sections,
//! symbols, map definitions (as aya reads them), program sections,
//! relocations and instruction bytes are compared. Instructions and
//! relocation offsets are compared only when this clang is the one that made
//! the shipped objects (`obj/clang-version.txt`): another clang may emit
//! other, equally valid code. Fix a failure with `cargo xtask bpf`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

#[path = "../compile.rs"]
mod compile;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What must agree between the shipped and the freshly compiled object.
#[derive(Debug)]
struct Normalised {
    /// Non-debug sections: name → (kind, size).
    sections: BTreeMap<String, (String, u64)>,
    /// Named function and data symbols: name → (kind, section).
    symbols: BTreeMap<String, String>,
    /// Maps as aya reads them: name → (type, key, value, max entries, flags, pinning).
    maps: BTreeMap<String, String>,
    /// Programs: name → aya's section kind.
    programs: BTreeMap<String, String>,
    /// Per program section: the symbol each relocation points at, in order.
    reloc_targets: BTreeMap<String, Vec<String>>,
    /// Per program section: instruction bytes and relocation offsets
    /// (compiler-specific; see the module comment).
    code: BTreeMap<String, (Vec<u8>, Vec<u64>)>,
}

impl Normalised {
    /// Short descriptions of what differs (`self` shipped, `other` compiled).
    fn differences(&self, other: &Normalised) -> Vec<String> {
        fn maps<V: PartialEq + std::fmt::Debug>(
            what: &str,
            a: &BTreeMap<String, V>,
            b: &BTreeMap<String, V>,
        ) -> Vec<String> {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter()
                .filter(|k| a.get(*k) != b.get(*k))
                .map(|k| format!("{what} {k}: shipped {:?}, sources {:?}", a.get(k), b.get(k)))
                .collect()
        }
        let mut out = maps("section", &self.sections, &other.sections);
        out.extend(maps("symbol", &self.symbols, &other.symbols));
        out.extend(maps("map", &self.maps, &other.maps));
        out.extend(maps("program", &self.programs, &other.programs));
        out.extend(maps("relocations of", &self.reloc_targets, &other.reloc_targets));
        for (section, (code, offsets)) in &self.code {
            let Some((code2, offsets2)) = other.code.get(section) else {
                continue;
            };
            if let Some(i) = code.chunks(8).zip(code2.chunks(8)).position(|(a, b)| a != b) {
                out.push(format!("{section}: instruction {i} differs"));
            } else if code.len() != code2.len() {
                out.push(format!(
                    "{section}: {} vs {} instruction bytes",
                    code.len(),
                    code2.len()
                ));
            }
            if offsets != offsets2 {
                out.push(format!("{section}: relocation offsets {offsets:?} vs {offsets2:?}"));
            }
        }
        if self.code.keys().ne(other.code.keys()) {
            out.push("different program sections".to_string());
        }
        out
    }

    /// Drops what depends on the compiler's code generation: instruction
    /// bytes, relocation offsets and order, and the size of code sections.
    fn without_code(&mut self) {
        self.code.clear();
        for targets in self.reloc_targets.values_mut() {
            targets.sort();
        }
        for (name, (kind, size)) in &mut self.sections {
            if kind == "Text" || name.starts_with(".rel") {
                *size = 0;
            }
        }
    }
}

fn is_debug(name: &str) -> bool {
    let name = name.strip_prefix(".rel").unwrap_or(name);
    name.starts_with(".debug") || name.starts_with(".BTF") || name == ".comment" || name == ".llvm_addrsig"
}

fn normalise(path: &Path) -> Normalised {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let elf = object::File::parse(&*data).unwrap();
    let mut n = Normalised {
        sections: BTreeMap::new(),
        symbols: BTreeMap::new(),
        maps: BTreeMap::new(),
        programs: BTreeMap::new(),
        reloc_targets: BTreeMap::new(),
        code: BTreeMap::new(),
    };
    for s in elf.sections() {
        let name = s.name().unwrap().to_string();
        if is_debug(&name) || matches!(s.kind(), SectionKind::Metadata) {
            continue;
        }
        n.sections.insert(name.clone(), (format!("{:?}", s.kind()), s.size()));
        if s.kind() != SectionKind::Text {
            continue;
        }
        let mut targets = Vec::new();
        let mut offsets = Vec::new();
        for (off, r) in s.relocations() {
            let target = match r.target() {
                RelocationTarget::Symbol(i) => elf.symbol_by_index(i).unwrap().name().unwrap().to_string(),
                other => format!("{other:?}"),
            };
            targets.push(target);
            offsets.push(off);
        }
        n.reloc_targets.insert(name.clone(), targets);
        n.code.insert(name, (s.data().unwrap().to_vec(), offsets));
    }
    for sym in elf.symbols() {
        let name = sym.name().unwrap();
        if name.is_empty() || !sym.is_global() && sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let section = sym
            .section_index()
            .map(|i| elf.section_by_index(i).unwrap().name().unwrap().to_string());
        n.symbols
            .insert(name.to_string(), format!("{:?} {section:?}", sym.kind()));
    }
    let obj = aya_obj::Object::parse(&data).unwrap();
    for (name, m) in &obj.maps {
        n.maps.insert(
            name.clone(),
            format!(
                "type {} key {} value {} max {} flags {} pinning {:?}",
                m.map_type(),
                m.key_size(),
                m.value_size(),
                m.max_entries(),
                m.map_flags(),
                m.pinning()
            ),
        );
    }
    for (name, p) in &obj.programs {
        n.programs.insert(name.clone(), format!("{:?}", p.section));
    }
    n
}

/// Records a skip the way the workspace's tests do (tests/common/skip.rs).
fn skip(reason: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED ({reason}): {name}");
    if let Some(path) = std::env::var_os("FERRY_SKIPPED_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{reason}\t{} {name}", env!("CARGO_CRATE_NAME"));
        }
    }
}

#[test]
fn shipped_objects_match_the_sources() {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let Some(version) = compile::clang_version(&clang) else {
        skip("needs clang");
        return;
    };
    let dir = crate_dir();
    let shipped_version = std::fs::read_to_string(dir.join("obj/clang-version.txt")).unwrap();
    let same_compiler = shipped_version.trim() == version;
    let tmp = tempfile::tempdir().unwrap();
    for name in compile::PROGRAMS {
        let fresh = tmp.path().join(format!("{name}.bpf.o"));
        compile::compile_program(&clang, &dir, name, &fresh).unwrap_or_else(|e| panic!("{e}"));
        let mut want = normalise(&fresh);
        let mut have = normalise(&dir.join(format!("obj/{name}.bpf.o")));
        assert!(!want.programs.is_empty() && !want.maps.is_empty(), "{name}: {want:?}");
        if !same_compiler {
            eprintln!(
                "{name}.bpf.o: instructions not compared: shipped objects made by {}, this is {version}",
                shipped_version.trim()
            );
            for n in [&mut want, &mut have] {
                n.without_code();
            }
        }
        let diffs = have.differences(&want);
        assert!(
            diffs.is_empty(),
            "ebpf/obj/{name}.bpf.o is stale (run `cargo xtask bpf`):\n  {}",
            diffs.join("\n  ")
        );
    }
}

/// The layout the ABI test uses when no C compiler is present is the one
/// `src/layout.c` prints.
#[test]
fn shipped_layout_matches_the_headers() {
    let shipped = std::fs::read_to_string(crate_dir().join("obj/layout.txt")).unwrap();
    assert_eq!(
        shipped,
        ferry_ebpf::C_LAYOUT,
        "ebpf/obj/layout.txt is stale: run `cargo xtask bpf`"
    );
}

/// The embedded objects (compiled or shipped) hold every program and map
/// the loader asks for, as aya parses them.
#[test]
fn embedded_objects_have_every_program_and_map() {
    let sock = aya_obj::Object::parse(ferry_ebpf::sock_object()).unwrap();
    let tc = aya_obj::Object::parse(ferry_ebpf::tc_object()).unwrap();
    for p in ferry_ebpf::SOCK_PROGRAMS {
        assert!(sock.programs.contains_key(p), "sock object lacks {p}");
    }
    for p in [ferry_ebpf::PROG_TC_INGRESS, ferry_ebpf::PROG_TC_EGRESS] {
        assert!(tc.programs.contains_key(p), "tc object lacks {p}");
    }
    for m in ferry_ebpf::MAPS {
        assert!(
            sock.maps.contains_key(m) || tc.maps.contains_key(m),
            "no object defines map {m}"
        );
    }
}
