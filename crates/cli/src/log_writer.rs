//! The server's log output: lines gathered in memory and written to stderr in batches.
//!
//! The access log writes a line per request; a write system call each cost a busy server more
//! than a tenth of its time per request. Access lines therefore wait, up to [`FLUSH_EVERY`] or
//! until [`FLUSH_AT`] bytes wait; every other line goes out at once, with the access lines
//! before it, so the order holds. In the plain, uncoloured format the access lines are also
//! formatted here ([`access_line`]), the same text as `tracing`'s formatter writes for about a
//! fifth of its work.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tchserve_server::frontends::{ACCESS_LOG_TARGET, AccessEntry, AccessSink};
use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// How long an access line may wait before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How many waiting bytes are written at once, whatever the time.
pub const FLUSH_AT: usize = 64 * 1024;

/// A `MakeWriter` for tracing's formatter that batches lines to stderr.
#[derive(Clone, Debug)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
    /// False when no thread could be started to write access lines: each line goes out at once.
    batching: bool,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Held while writing, so that two flushes cannot write their batches out of order; holds
    /// how the log file rolls over, when stderr is one.
    out: Mutex<Option<Rollover>>,
}

/// A log file that stderr writes to, rolled over when it grows past `limit` bytes:
/// `tchserve.log` becomes `tchserve.log.1`, and so on up to `keep` old files, as TorchServe's
/// log4j rolls its logs at 100 MB and keeps 5.
#[derive(Debug)]
struct Rollover {
    path: std::path::PathBuf,
    limit: u64,
    keep: usize,
    /// Whether stdout writes to the file too (as under `--start`), and moves with stderr.
    stdout_too: bool,
}

impl Rollover {
    /// Rolls the file over when stderr's file has grown past the limit.
    fn check(&self) {
        let size = std::fs::metadata("/proc/self/fd/2").map_or(0, |m| m.len());
        if size <= self.limit {
            return;
        }
        let old = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            std::path::PathBuf::from(p)
        };
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(old(n), old(n + 1));
        }
        if std::fs::rename(&self.path, old(1)).is_err() {
            return;
        }
        let Ok(fresh) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        else {
            return;
        };
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors of this process; `fresh` stays valid for
        // the call, and the descriptors it replaces are closed by dup2 itself.
        unsafe {
            if self.stdout_too {
                libc::dup2(fresh.as_raw_fd(), 1);
            }
            libc::dup2(fresh.as_raw_fd(), 2);
        }
    }
}

impl BatchedStderr {
    /// The writer, with a thread that writes waiting lines every [`FLUSH_EVERY`].
    pub fn start() -> Self {
        let shared = Arc::new(Shared::default());
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("log-flush".into())
            .spawn(move || {
                while let Some(shared) = weak.upgrade() {
                    shared.flush();
                    drop(shared);
                    std::thread::sleep(FLUSH_EVERY);
                }
            });
        BatchedStderr {
            shared,
            batching: spawned.is_ok(),
        }
    }

    /// Writes every waiting line now.
    pub fn flush(&self) {
        self.shared.flush();
    }

    /// Rolls `path` over at `limit` bytes, keeping `keep` old files, when stderr writes to it
    /// (as under `--start`); does nothing when stderr is a terminal, a pipe or another file.
    pub fn roll_over(&self, path: &std::path::Path, limit: u64, keep: usize) {
        use std::os::unix::fs::MetadataExt;
        let writes_to = |fd: u8| match (
            std::fs::metadata(format!("/proc/self/fd/{fd}")),
            std::fs::metadata(path),
        ) {
            (Ok(out), Ok(file)) => out.dev() == file.dev() && out.ino() == file.ino(),
            _ => false,
        };
        if writes_to(2) {
            let rollover = Rollover {
                path: path.to_path_buf(),
                limit,
                keep: keep.max(1),
                stdout_too: writes_to(1),
            };
            *self
                .shared
                .out
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(rollover);
        }
    }

    /// A sink for the access log that formats each line itself, as [`access_line`], straight
    /// into the waiting batch. Only for the plain, uncoloured format outside any span.
    pub fn access_sink(&self) -> AccessSink {
        let shared = self.shared.clone();
        let batching = self.batching;
        Box::new(move |entry| {
            let waiting = {
                let mut pending = shared
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                access_line(&mut pending, SystemTime::now(), entry);
                pending.len()
            };
            shared.flush_if_due(!batching, waiting);
        })
    }
}

/// Appends `entry`'s line at `now` as `tracing-subscriber`'s plain formatter writes the access
/// log's event (a test holds the two to the same text):
/// `2026-11-27T02:08:11.772751Z  INFO access: request method=GET path=/ping status=200 us=28
/// peer=127.0.0.1:50412 id=6f1c2b3a-...`.
pub fn access_line(out: &mut Vec<u8>, now: SystemTime, entry: &AccessEntry<'_>) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_date(secs / 86_400);
    let of_day = secs % 86_400;
    push_padded(out, year, 4);
    for (sep, value) in [
        (b'-', month),
        (b'-', day),
        (b'T', of_day / 3600),
        (b':', of_day / 60 % 60),
        (b':', of_day % 60),
    ] {
        out.push(sep);
        push_padded(out, value, 2);
    }
    out.push(b'.');
    push_padded(out, u64::from(since.subsec_micros()), 6);
    out.extend_from_slice(b"Z  INFO ");
    out.extend_from_slice(ACCESS_LOG_TARGET.as_bytes());
    out.extend_from_slice(b": request method=");
    out.extend_from_slice(entry.method.as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(entry.path.as_bytes());
    out.extend_from_slice(b" status=");
    push_padded(out, u64::from(entry.status), 1);
    out.extend_from_slice(b" us=");
    push_padded(out, entry.micros, 1);
    out.extend_from_slice(b" peer=");
    out.extend_from_slice(entry.peer.as_bytes());
    out.extend_from_slice(b" id=");
    out.extend_from_slice(entry.id.as_bytes());
    out.push(b'\n');
}

/// The year, month and day of the `days`th day after 1970-01-01, in the proleptic Gregorian
/// calendar (the usual conversion through 400-year eras starting on March 1st).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Appends `value` in decimal, zero-padded to `width` digits.
fn push_padded(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut n = 0;
    while value > 0 || n < width {
        digits[19 - n] = b'0' + (value % 10) as u8;
        value /= 10;
        n += 1;
    }
    out.extend_from_slice(&digits[20 - n..]);
}

impl Shared {
    /// After a line was added: writes the batch now when the line is `urgent` or `waiting`
    /// bytes are enough to go.
    fn flush_if_due(&self, urgent: bool, waiting: usize) {
        if urgent || waiting >= FLUSH_AT {
            self.flush();
        }
    }

    fn flush(&self) {
        let out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if !batch.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&batch);
            let _ = err.flush();
            if let Some(rollover) = out.as_ref() {
                rollover.check();
            }
        }
    }
}

/// One log line on its way into the batch.
#[derive(Debug)]
pub struct Line<'a> {
    shared: &'a Shared,
    urgent: bool,
}

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let waiting = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        self.shared.flush_if_due(self.urgent, waiting);
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line<'a> {
        Line {
            shared: &self.shared,
            urgent: !self.batching || meta.target() != ACCESS_LOG_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lines_wait_and_others_take_them_along() {
        let shared = Shared::default();
        let pending = || shared.pending.lock().unwrap().len();
        let line = |urgent, text: &[u8]| {
            let mut l = Line {
                shared: &shared,
                urgent,
            };
            l.write_all(text).unwrap();
        };
        line(false, b"info line\n");
        assert_eq!(pending(), 10);
        line(true, b"warning\n");
        assert_eq!(pending(), 0);
        // Enough access lines are written without waiting for the timer.
        for _ in 0..FLUSH_AT / 10 {
            line(false, b"info line\n");
        }
        assert!(pending() < FLUSH_AT);
    }

    fn line_at(now: SystemTime, entry: &AccessEntry<'_>) -> String {
        let mut out = Vec::new();
        access_line(&mut out, now, entry);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn access_lines_read_as_tracing_writes_them() {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Capture::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let entry = AccessEntry {
            method: "POST",
            path: "/predictions/mlp%20b8/2.0",
            status: 503,
            micros: 1_234_567,
            peer: "127.0.0.1:50412",
            id: "6f1c2b3a-0d4e-4f5a-8b6c-7d8e9f0a1b2c",
        };
        let before = SystemTime::now();
        tracing::subscriber::with_default(subscriber, || {
            tchserve_server::frontends::access_event(&entry);
        });
        let after = SystemTime::now();
        let theirs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let (early, late) = (line_at(before, &entry), line_at(after, &entry));
        // Everything past the timestamp is the same text; the timestamp lies between the two
        // taken around the event (the fixed-width format sorts as time does).
        assert_eq!(theirs[27..], early[27..], "{theirs:?} against {early:?}");
        assert!(early[..27] <= theirs[..27] && theirs[..27] <= late[..27]);
    }

    #[test]
    fn access_line_dates_are_the_calendar_dates() {
        let entry = AccessEntry {
            method: "GET",
            path: "/ping",
            status: 200,
            micros: 0,
            peer: "[::1]:8",
            id: "",
        };
        let at = |secs: u64, micros: u64| {
            let now = SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros);
            line_at(now, &entry)[..27].to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_795_999_999, 120_000), "2026-11-30T00:53:19.120000Z");
        assert_eq!(at(1_798_761_599, 999_999), "2026-12-31T23:59:59.999999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
        assert_eq!(
            line_at(SystemTime::UNIX_EPOCH, &entry),
            "1970-01-01T00:00:00.000000Z  INFO access: request method=GET path=/ping status=200 us=0 \
             peer=[::1]:8 id=\n"
        );
    }
}
