//! The access log, kept off the request path.
//!
//! Each ingress worker formats its lines into its own buffer, without
//! allocating per line; a buffer goes to the writer thread when it passes
//! [`FLUSH_BYTES`], and every [`FLUSH_EVERY`] otherwise, so a quiet worker's
//! lines do not wait. The queue to the writer is bounded: when the writer
//! falls behind (a slow disk, a stalled pipe) whole buffers are dropped and
//! their lines counted (`ferry_ingress_access_log_dropped_lines_total`)
//! rather than blocking a worker.
//!
//! Lines of one worker keep their order; lines of different workers are
//! interleaved by batch, so they may be out of timestamp order by up to
//! [`FLUSH_EVERY`].
//!
//! The lines read like the rest of ferry's log (tracing's text and JSON
//! layouts, target `ferry::access`), so existing parsers keep working.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;

use crate::bytes_fmt::{self, number};

/// A worker's buffer is handed to the writer when it holds this much.
pub const FLUSH_BYTES: usize = 32 * 1024;
/// ...or when it has waited this long.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Buffers that may wait for the writer before new ones are dropped.
const QUEUE: usize = 64;

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Off,
    Stderr,
    File(PathBuf),
}

/// The access log's settings (part of the engine's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub target: Target,
    /// One JSON object per line (as `--log-format json`), else text.
    pub json: bool,
}

/// One request, as logged.
pub struct Record<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: &'a str,
    pub endpoint: Option<SocketAddr>,
    pub duration: Duration,
}

/// The shared end of the access log: the queue to the writer thread.
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    json: bool,
    lines: Counter,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens the target and starts the writer thread; `None` when off.
    /// The thread ends once every [`Buffer`] and this log are dropped.
    pub fn start(config: &Config, lines: Counter, dropped: Counter) -> std::io::Result<Option<Arc<AccessLog>>> {
        let out: Box<dyn std::io::Write + Send> = match &config.target {
            Target::Off => return Ok(None),
            Target::Stderr => Box::new(std::io::stderr()),
            Target::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("ferry-access-log".into())
            .spawn(move || write_all(rx, out))?;
        Ok(Some(Arc::new(AccessLog {
            tx,
            json: config.json,
            lines,
            dropped,
        })))
    }

    /// A buffer for one worker.
    pub fn buffer(self: &Arc<Self>) -> Buffer {
        Buffer {
            log: self.clone(),
            local: Mutex::new(Local::default()),
        }
    }

    fn send(&self, buf: Vec<u8>, lines: u64) {
        match self.tx.try_send(buf) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc_by(lines);
            }
        }
    }
}

/// The writer thread: writes buffers in arrival order until every sender
/// is gone. A failed write is reported once and the lines are lost.
fn write_all(rx: Receiver<Vec<u8>>, mut out: Box<dyn std::io::Write + Send>) {
    let mut failed = false;
    for buf in rx {
        if let Err(e) = out.write_all(&buf).and_then(|()| out.flush()) {
            if !failed {
                tracing::warn!(error = %e, "writing the access log failed");
                failed = true;
            }
        }
    }
}

#[derive(Default)]
struct Local {
    buf: Vec<u8>,
    lines: u64,
    /// The formatted `YYYY-MM-DDTHH:MM:SS` of `second`.
    stamp: String,
    second: u64,
}

/// One worker's buffer; lines are handed to the writer in batches.
pub struct Buffer {
    log: Arc<AccessLog>,
    local: Mutex<Local>,
}

impl Buffer {
    /// Formats `r` into the buffer (no allocation once the buffer has
    /// grown), handing the buffer over when it is full.
    pub fn write(&self, r: &Record<'_>) {
        let Ok(mut l) = self.local.lock() else { return };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let l = &mut *l;
        if l.second != now.as_secs() || l.stamp.is_empty() {
            l.second = now.as_secs();
            l.stamp.clear();
            civil_time(&mut l.stamp, now.as_secs());
        }
        format_line(&mut l.buf, self.log.json, &l.stamp, now.subsec_micros(), r);
        l.lines += 1;
        self.log.lines.inc();
        if l.buf.len() >= FLUSH_BYTES {
            self.hand_over(l);
        }
    }

    /// Hands whatever is buffered to the writer (the periodic flush, and
    /// at the end of a worker).
    pub fn flush(&self) {
        if let Ok(mut l) = self.local.lock() {
            if !l.buf.is_empty() {
                self.hand_over(&mut l);
            }
        }
    }

    fn hand_over(&self, l: &mut Local) {
        let buf = std::mem::replace(&mut l.buf, Vec::with_capacity(FLUSH_BYTES + 1024));
        self.log.send(buf, std::mem::take(&mut l.lines));
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of a Unix time.
fn civil_time(out: &mut String, secs: u64) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
}

/// One line in tracing's layout, text or JSON.
fn format_line(out: &mut Vec<u8>, json: bool, stamp: &str, micros: u32, r: &Record<'_>) {
    let us = u64::try_from(r.duration.as_micros()).unwrap_or(u64::MAX);
    let duration = |out: &mut Vec<u8>| {
        number(out, us / 1000, 10, 1);
        out.push(b'.');
        number(out, us % 1000, 10, 3);
    };
    let timestamp = |out: &mut Vec<u8>| {
        out.extend_from_slice(stamp.as_bytes());
        out.push(b'.');
        number(out, u64::from(micros), 10, 6);
        out.push(b'Z');
    };
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\",\"client\":\"");
        bytes_fmt::ip(out, r.client);
        out.extend_from_slice(b"\",\"method\":\"");
        json_str(out, r.method);
        out.extend_from_slice(b"\",\"host\":\"");
        json_str(out, r.host);
        out.extend_from_slice(b"\",\"path\":\"");
        json_str(out, r.path);
        out.extend_from_slice(b"\",\"status\":");
        number(out, u64::from(r.status), 10, 1);
        out.extend_from_slice(b",\"upstream\":\"");
        json_str(out, r.upstream);
        out.extend_from_slice(b"\",\"endpoint\":\"");
        if let Some(e) = r.endpoint {
            bytes_fmt::socket_addr(out, e);
        }
        out.extend_from_slice(b"\",\"duration_ms\":");
        duration(out);
        out.extend_from_slice(b"},\"target\":\"ferry::access\"}\n");
    } else {
        timestamp(out);
        out.extend_from_slice(b"  INFO ferry::access: request client=");
        bytes_fmt::ip(out, r.client);
        out.extend_from_slice(b" method=");
        text(out, r.method);
        out.extend_from_slice(b" host=");
        text(out, r.host);
        out.extend_from_slice(b" path=");
        text(out, r.path);
        out.extend_from_slice(b" status=");
        number(out, u64::from(r.status), 10, 1);
        out.extend_from_slice(b" upstream=");
        text(out, r.upstream);
        out.extend_from_slice(b" endpoint=");
        if let Some(e) = r.endpoint {
            bytes_fmt::socket_addr(out, e);
        }
        out.extend_from_slice(b" duration_ms=");
        duration(out);
        out.push(b'\n');
    }
}

/// A text field: bytes that could break the line (controls, spaces,
/// backslash) as `\xNN`.
fn text(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        if b <= b' ' || b == 0x7f || b == b'\\' {
            out.extend_from_slice(b"\\x");
            number(out, u64::from(b), 16, 2);
        } else {
            out.push(b);
        }
    }
}

/// A JSON string's contents.
fn json_str(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f | 0x7f => {
                out.extend_from_slice(b"\\u");
                number(out, u64::from(b), 16, 4);
            }
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(host: &'a str, path: &'a str) -> Record<'a> {
        Record {
            client: "127.0.0.9".parse().unwrap(),
            method: "GET",
            host,
            path,
            status: 200,
            upstream: "default/s:80",
            endpoint: Some("10.0.0.1:8080".parse().unwrap()),
            duration: Duration::from_micros(1_234),
        }
    }

    #[test]
    fn civil_times() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_218_855, "2026-12-02T13:40:55"),
            (4_107_542_399, "2100-02-28T23:59:59"),
        ] {
            let mut s = String::new();
            civil_time(&mut s, secs);
            assert_eq!(s, want, "{secs}");
        }
    }

    #[test]
    fn text_and_json_lines() {
        let mut out = Vec::new();
        format_line(&mut out, false, "2026-12-02T13:40:55", 42, &record("a.test", "/x y\n"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-02T13:40:55.000042Z  INFO ferry::access: request client=127.0.0.9 method=GET host=a.test path=/x\\x20y\\x0a status=200 upstream=default/s:80 endpoint=10.0.0.1:8080 duration_ms=1.234\n"
        );
        let mut out = Vec::new();
        format_line(
            &mut out,
            true,
            "2026-12-02T13:40:55",
            42,
            &record("a\"b.test", "/\u{1}"),
        );
        let line = String::from_utf8(out).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["fields"]["host"], "a\"b.test");
        assert_eq!(v["fields"]["path"], "/\u{1}");
        assert_eq!(v["fields"]["status"], 200);
        assert_eq!(v["fields"]["duration_ms"], 1.234);
        assert_eq!(v["target"], "ferry::access");
        assert_eq!(v["timestamp"], "2026-12-02T13:40:55.000042Z");
    }

    #[test]
    fn buffers_reach_the_file_in_order_and_a_full_queue_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let (lines, dropped) = (Counter::default(), Counter::default());
        let config = Config {
            target: Target::File(path.clone()),
            json: false,
        };
        let log = AccessLog::start(&config, lines.clone(), dropped.clone())
            .unwrap()
            .unwrap();
        let buffer = log.buffer();
        for i in 0..1000 {
            buffer.write(&record("a.test", &format!("/{i}")));
        }
        drop(buffer);
        drop(log);
        // The writer ends when every sender is gone; wait for the file.
        let want = 1000 - dropped.get();
        let mut got = 0;
        for _ in 0..200 {
            got = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
            if got == want {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!((got, lines.get()), (want, 1000));
        let text = std::fs::read_to_string(&path).unwrap();
        let paths: Vec<&str> = text
            .lines()
            .map(|l| l.split(" path=").nth(1).unwrap().split(' ').next().unwrap())
            .collect();
        let mut sorted = paths.clone();
        sorted.sort_by_key(|p| p[1..].parse::<u32>().unwrap());
        assert_eq!(paths, sorted, "lines out of order");

        // A writer that never drains: the queue fills, then buffers are
        // dropped and counted, and `write` never blocks.
        let (tx, _rx) = sync_channel(1);
        let stalled = Arc::new(AccessLog {
            tx,
            json: false,
            lines: Counter::default(),
            dropped: Counter::default(),
        });
        let buffer = stalled.buffer();
        for _ in 0..20_000 {
            buffer.write(&record("a.test", "/a/longer/path/to/fill/the/buffer/faster"));
        }
        buffer.flush();
        assert!(stalled.dropped.get() > 0);
        assert!(stalled.dropped.get() < 20_000);
    }
}
