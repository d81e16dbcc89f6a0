//! The server's log output: lines gathered in memory and written to stderr in batches.
//!
//! The access log writes a line per request; a write system call each cost a busy server more
//! than a tenth of its time per request. Access lines therefore wait, up to [`FLUSH_EVERY`] or
//! until [`FLUSH_AT`] bytes wait; every other line goes out at once, with the access lines
//! before it, so the order holds.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tchserve_server::frontends::ACCESS_LOG_TARGET;
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
    /// Held while writing, so that two flushes cannot write their batches out of order.
    out: Mutex<()>,
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
}

impl Shared {
    fn flush(&self) {
        let _out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if !batch.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&batch);
            let _ = err.flush();
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
        if self.urgent || waiting >= FLUSH_AT {
            self.shared.flush();
        }
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
}
