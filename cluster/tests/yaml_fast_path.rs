//! Holds the YAML fast path (`ferry_cluster::yaml::to_json`) to serde-saphyr,
//! the full parser: whenever the fast path answers, its JSON must be the
//! value serde-saphyr reads from the same document (and serde-saphyr must
//! accept the document). Checked on every YAML file of the repository and
//! on seeded mutations of each document, which is how a subset parser that
//! accepts too much is caught.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::{Path, PathBuf};

use serde_json::Value;

/// serde-saphyr as the file source configures it.
fn full_parser(doc: &str) -> Result<Value, String> {
    serde_saphyr::from_str_with_options(doc, ferry_cluster::files::yaml_options()).map_err(|e| e.to_string())
}

/// `None` when the fast path declines; panics when it disagrees.
fn check(doc: &str, origin: &str) -> Option<()> {
    let json = ferry_cluster::yaml::to_json(doc)?;
    let fast: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("{origin}: fast path wrote invalid JSON ({e}):\n{json}\nfrom:\n{doc}"));
    match full_parser(doc) {
        Ok(full) => assert_eq!(fast, full, "{origin}: values differ for:\n{doc}\nJSON: {json}"),
        Err(e) => panic!("{origin}: the fast path accepted what the full parser rejects ({e}):\n{doc}\nJSON: {json}"),
    }
    Some(())
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" && !name.starts_with("target-") {
                yaml_files(&path, out);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
}

/// Every document of every YAML file in the repository (and the seed
/// notes' manifests when they are beside it).
fn corpus() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    yaml_files(root, &mut files);
    yaml_files(&root.join("../shared/seed"), &mut files);
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, doc) in text.split("\n---").enumerate() {
            let doc = doc.strip_prefix("---").unwrap_or(doc);
            if !doc.trim().is_empty() {
                docs.push((format!("{}#{i}", f.display()), doc.to_string()));
            }
        }
    }
    docs
}

/// Documents the fast path must read (and agree on), and ones it must
/// leave to the full parser.
#[test]
fn agrees_with_the_full_parser_on_chosen_cases() {
    let fast = [
        "a: 1\nb: -2\nc: true\nd: false\ne: null\nf:\ng: text\n",
        "metadata: {name: s, labels: {app: x}}\nports: [{port: 80, name: http}, {port: 443}]\n",
        "a: [a, b, ]\nb: []\nc: {}\n",
        "ip: 10.96.0.1\nversion: 1.2.3\nurl: http://x:80/p\nhash: a#b\n",
        "k: 'it''s'\nq: \"tab\\there \\u00e9 \\\"q\\\"\"\n\"quoted key\": 1\n",
        "list:\n- a\n- b: 1\n  c: 2\n-\n  d: 3\n- [x, z]\nafter: 1\n",
        "spec:\n  ports:\n  - name: http\n    port: 80\n  selector:\n    app: web\n",
        "data:\n  cert: |\n    -----BEGIN-----\n    abc\n\n    def\n  strip: |-\n    x\n  keep: |+\n    y\n\nnext: 1\n",
        "a: x # comment\n# whole line\nb: 'y' # c\nc: [1] # c\n",
        "a: é ünïcode\n",
        "- 1\n- two\n",
    ];
    for (i, doc) in fast.iter().enumerate() {
        assert!(
            check(doc, &format!("fast[{i}]")).is_some(),
            "fast[{i}] declined:\n{doc}"
        );
    }
    let declined = [
        "a: yes\n",
        "a: on\n",
        "a: y\n",
        "a: 1.5\n",
        "a: 010\n",
        "a: 0x1F\n",
        "a: 1_000\n",
        "a: ~\n",
        "a: Null\n",
        "a: True\n",
        "a: .inf\n",
        "a: &x 1\nb: *x\n",
        "a: !!str 1\n",
        "a: >\n  folded\n",
        "a: |2\n   x\n",
        "a: b\n  continued\n",
        "a: \"multi\n  line\"\n",
        "a: 1\na: 2\n",
        "a: 1\n\"a\": 2\n",
        "? a\n: b\n",
        "a:\tb\n",
        "a: b\r\n",
        "- - nested\n",
        "a: [1,\n  2]\n",
        "80: x\n",
        "a: b: c\n",
        "a: 99999999999999999999\n",
        "a: {b:1}\n",
        "a: [,]\n",
        "a: @x\n",
        "a: `x`\n",
        "a: \"\\x41\"\n",
        "a: 1\n b: 2\n",
        "plain\n",
    ];
    for (i, doc) in declined.iter().enumerate() {
        assert!(
            ferry_cluster::yaml::to_json(doc).is_none(),
            "declined[{i}] was read by the fast path:\n{doc}\n{:?}",
            ferry_cluster::yaml::to_json(doc)
        );
    }
}

#[test]
fn agrees_with_the_full_parser_on_every_manifest_here() {
    let docs = corpus();
    assert!(docs.len() > 50, "corpus too small: {}", docs.len());
    let read = docs.iter().filter(|(origin, doc)| check(doc, origin).is_some()).count();
    // The manifests users write are what the fast path is for.
    println!("fast path read {read} of {} documents", docs.len());
    assert!(
        read * 10 >= docs.len() * 9,
        "fast path read only {read} of {} documents",
        docs.len()
    );
}

/// Seeded mutations of every corpus document: one character inserted,
/// deleted or replaced, a line re-indented or doubled. Whatever the fast
/// path still reads must mean what serde-saphyr says.
#[test]
fn agrees_with_the_full_parser_on_mutations() {
    let mutations: usize = std::env::var("YAML_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    const CHARS: &[u8] = b" -:#\"'|>&*![]{},\n?%0.t~\\@`";
    let docs = corpus();
    let mut rng = fastrand::Rng::with_seed(0x5eed_fe44);
    let mut read = 0;
    for (origin, doc) in &docs {
        for m in 0..mutations {
            let mut bytes = doc.as_bytes().to_vec();
            let at = rng.usize(..bytes.len().max(1));
            match m % 5 {
                0 => bytes.insert(at.min(bytes.len()), CHARS[rng.usize(..CHARS.len())]),
                1 if !bytes.is_empty() => {
                    bytes.remove(at.min(bytes.len() - 1));
                }
                2 if !bytes.is_empty() => {
                    let i = at.min(bytes.len() - 1);
                    bytes[i] = CHARS[rng.usize(..CHARS.len())];
                }
                3 => {
                    // Re-indent a line by one or two spaces either way.
                    let start = doc[..at.min(doc.len())].rfind('\n').map_or(0, |i| i + 1);
                    if rng.bool() {
                        bytes.splice(start..start, std::iter::repeat_n(b' ', rng.usize(1..3)));
                    } else if bytes.get(start) == Some(&b' ') {
                        bytes.remove(start);
                    }
                }
                _ => {
                    let start = doc[..at.min(doc.len())].rfind('\n').map_or(0, |i| i + 1);
                    let end = doc[start..].find('\n').map_or(doc.len(), |i| start + i + 1);
                    let line = bytes[start..end].to_vec();
                    bytes.splice(start..start, line);
                }
            }
            let Ok(mutant) = String::from_utf8(bytes) else { continue };
            if check(&mutant, &format!("{origin} mutation {m}")).is_some() {
                read += 1;
            }
        }
    }
    println!("{read} mutants read by the fast path, of {}", docs.len() * mutations);
    assert!(read > 0, "no mutation was read by the fast path");
}
