//! Runtime skips: a test that cannot run here (privileged tests when not
//! root) says so by name and returns, since libtest has no runtime skip.
//! `cargo xtask test` sets `$FERRY_SKIPPED_LOG` and lists what was recorded
//! there (format: `<reason>\t<crate> <test>` per line; see xtask/src/skipped.rs).

use std::io::Write;

/// True when root; otherwise records this test as skipped (`needs root`).
/// Use as `if !require_root() { return; }` at the top of a privileged test.
pub fn require_root() -> bool {
    if super::netns::is_root() {
        return true;
    }
    skip("needs root");
    false
}

/// Prints `SKIPPED (<reason>): <test>` and appends it to `$FERRY_SKIPPED_LOG`.
/// libtest runs each test on a thread named after it.
pub fn skip(reason: &str) {
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("SKIPPED ({reason}): {name}");
    if let Some(path) = std::env::var_os("FERRY_SKIPPED_LOG") {
        let line = format!("{reason}\t{} {name}\n", env!("CARGO_CRATE_NAME"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Ok(mut f) = file {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
