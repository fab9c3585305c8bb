//! Child processes that benchmarks start (nginx, haproxy, nsd, knot, ferry):
//! stopped with SIGTERM first, because nginx's and nsd's masters stop their
//! workers on TERM while a KILL would orphan them, then SIGKILL after a
//! grace period; always reaped.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct Stopped(pub Child);

impl Stopped {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // Already exited (and now reaped): its pid may be another process's.
        if let Ok(Some(_)) = self.0.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
