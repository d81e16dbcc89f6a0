//! Accepting and serving connections, with the limits a server on an open port needs.
//!
//! - A cap on open connections per listener: past it a new connection is answered 503 at once
//!   and closed, so file descriptors never run out and the listener keeps accepting.
//! - Per connection, a deadline for silence: an idle keep-alive connection may wait
//!   `keep_alive_timeout` for its next request, and once a request has begun its head must be
//!   complete within `header_read_timeout`. While a request is being served there is no such
//!   deadline (a model may take its time); the body has its own timeout, applied where the body
//!   is read ([`crate::frontends::buffer_body`]).
//! - A deadline for writing: a client that takes none of its answer for `write_timeout` is
//!   disconnected, and the answer's memory freed.
//! - hyper's own error answers (a malformed request, a head too large, a URI too long) get
//!   TorchServe's JSON error body instead of an empty one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;

use crate::frontends::Peer;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// How long connections may stay silent, and how many may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Longest a request's head may take to arrive once it has begun.
    pub header_read_timeout: Duration,
    /// Longest an idle connection waits for its next request.
    pub keep_alive_timeout: Duration,
    /// Longest a client may take none of its answer: a client that stops reading would
    /// otherwise hold the answer's memory and its connection for ever.
    pub write_timeout: Duration,
    /// Most connections open at once on one listener.
    pub max_connections: usize,
}

/// Connections past the cap that may be waiting for their 503 at once; beyond these, new
/// connections are closed without an answer.
const REFUSING_AT_ONCE: usize = 64;
/// How long a refused connection is given to take its 503.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request head (request line and headers): past it hyper answers 431, in JSON here.
const MAX_HEAD_SIZE: usize = 64 * 1024;

/// Serves `router` on `listener` until `stop` turns true, then stops accepting, lets each
/// connection finish the request it is serving, and returns once all are closed.
pub async fn serve<L>(
    listener: L,
    router: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
) where
    L: Listener,
    L::Addr: std::fmt::Debug,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max = limits.max_connections;
    accept_loop(
        listener,
        limits,
        stop,
        move |io, stop, peer| connection(io, router.clone(), limits, stop, peer),
        move |io| refuse(io, max),
    )
    .await;
}

/// [`serve`] over TLS: each connection's handshake runs on its own task, within
/// `header_read_timeout`, so a slow or silent client holds no one else up. Connections over
/// the cap are closed (a 503 would need a handshake first).
pub async fn serve_tls<L>(
    listener: L,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
) where
    L: Listener<Io = tokio::net::TcpStream>,
    L::Addr: std::fmt::Debug,
{
    accept_loop(
        listener,
        limits,
        stop,
        move |tcp, stop, peer| {
            let (acceptor, router) = (acceptor.clone(), router.clone());
            async move {
                if let Some(tls) =
                    crate::tls::accept(&acceptor, tcp, limits.header_read_timeout).await
                {
                    connection(tls, router, limits, stop, peer).await;
                }
            }
        },
        |io| async move { drop(io) },
    )
    .await;
}

/// Accepts connections until `stop`, handing each to `serve_one` on its own task while under
/// the cap and to `refuse_one` past it; returns once every connection has closed.
async fn accept_loop<L, S, SF, R, RF>(
    mut listener: L,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
    serve_one: S,
    refuse_one: R,
) where
    L: Listener,
    L::Addr: std::fmt::Debug,
    S: Fn(L::Io, watch::Receiver<bool>, Peer) -> SF,
    SF: Future<Output = ()> + Send + 'static,
    R: Fn(L::Io) -> RF,
    RF: Future<Output = ()> + Send + 'static,
{
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        match Arc::clone(&open).try_acquire_owned() {
            Ok(permit) => {
                let task = serve_one(io, stop.clone(), peer_of(&addr));
                tokio::spawn(async move {
                    task.await;
                    drop(permit);
                });
            }
            Err(_) => {
                if let Ok(permit) = Arc::clone(&refusing).try_acquire_owned() {
                    let task = refuse_one(io);
                    tokio::spawn(async move {
                        task.await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    // Every connection holds a permit until it closes.
    let _ = open.acquire_many(limits.max_connections as u32).await;
}

/// The client's address as the access log names it: `127.0.0.1:50412`, or `unix` for a client
/// of a Unix socket (which has no address of its own).
fn peer_of<A: std::fmt::Debug>(addr: &A) -> Peer {
    let text = format!("{addr:?}");
    // An IP socket address prints as itself; a Unix one as `(unnamed)` or a quoted path.
    if text.starts_with('(') || text.starts_with('"') {
        Peer("unix".into())
    } else {
        Peer(text.into())
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse<I: AsyncWrite + Unpin>(io: I, max: usize) {
    answer_and_close(
        io,
        "503 Service Unavailable",
        "ServiceUnavailableException",
        &format!("too many open connections (max_connections is {max}); try again later"),
    )
    .await;
}

/// Writes one JSON error response, TorchServe's shape, without reading the request, and closes
/// the connection; gives up after a second on a client that does not read.
pub(crate) async fn answer_and_close<I: AsyncWrite + Unpin>(
    mut io: I,
    status: &str,
    kind: &str,
    message: &str,
) {
    let code: u16 = status
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(500);
    let body = crate::frontends::pretty_json(&serde_json::json!({
        "code": code,
        "type": kind,
        "message": message,
    }));
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        let _ = io.write_all(response.as_bytes()).await;
        let _ = io.shutdown().await;
    })
    .await;
}

async fn connection<I>(
    io: I,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
    peer: Peer,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = Arc::new(Clock::new(limits, Instant::now()));
    let io = TokioIo::new(Guarded::new(io, Arc::clone(&clock)));
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        let (router, clock) = (router.clone(), Arc::clone(&clock));
        req.extensions_mut().insert(peer.clone());
        async move {
            let _serving = clock.serving();
            router.oneshot(req).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true).max_header_size(MAX_HEAD_SIZE);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    // Finishes the request in flight, if any, then closes.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// What a connection is doing, which decides how long it may stay silent.
#[derive(Debug)]
pub struct Clock {
    limits: ConnectionLimits,
    state: Mutex<ClockState>,
}

#[derive(Debug, Clone, Copy)]
struct ClockState {
    /// Requests handed to the router and not yet answered.
    serving: usize,
    /// When the connection last went idle (opened, or answered its last request).
    idle_since: Instant,
    /// When the first byte of the next request arrived, if one has.
    head_since: Option<Instant>,
}

impl Clock {
    /// A connection opened at `now`.
    pub fn new(limits: ConnectionLimits, now: Instant) -> Self {
        Clock {
            limits,
            state: Mutex::new(ClockState {
                serving: 0,
                idle_since: now,
                head_since: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes arrived at `now`.
    pub fn bytes_read(&self, now: Instant) {
        let mut s = self.lock();
        if s.serving == 0 && s.head_since.is_none() {
            s.head_since = Some(now);
        }
    }

    /// A request is being served until the guard drops.
    pub fn serving(self: &Arc<Self>) -> Serving {
        let mut s = self.lock();
        s.serving += 1;
        s.head_since = None;
        Serving(Arc::clone(self))
    }

    /// When the connection must have said something by, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let s = self.lock();
        if s.serving > 0 {
            return None;
        }
        Some(match s.head_since {
            Some(t) => t + self.limits.header_read_timeout,
            None => s.idle_since + self.limits.keep_alive_timeout,
        })
    }
}

/// Marks a request in service; dropping it makes the connection idle again.
#[derive(Debug)]
pub struct Serving(Arc<Clock>);

impl Drop for Serving {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.serving -= 1;
        if s.serving == 0 {
            s.idle_since = Instant::now();
            s.head_since = None;
        }
    }
}

/// A connection's stream that enforces its [`Clock`] on reads and gives hyper's own error
/// answers a JSON body on writes.
struct Guarded<I> {
    inner: I,
    clock: Arc<Clock>,
    sleep: Pin<Box<Sleep>>,
    /// A rewritten answer still to be written, and how much of it has been.
    pending: Option<(Vec<u8>, usize)>,
    /// Since when writes have gone nowhere, if they have.
    write_stalled_since: Option<Instant>,
    write_sleep: Pin<Box<Sleep>>,
}

impl<I> Guarded<I> {
    fn new(inner: I, clock: Arc<Clock>) -> Self {
        Guarded {
            inner,
            clock,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            pending: None,
            write_stalled_since: None,
            write_sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        }
    }

    /// Follows a write's outcome: `Pending` past `write_timeout` since the last progress
    /// becomes an error, which ends the connection.
    fn timed_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.write_stalled_since = None;
            return r;
        }
        let since = *self.write_stalled_since.get_or_insert_with(Instant::now);
        let deadline = since + self.clock.limits.write_timeout;
        timed_out(
            &mut self.write_sleep,
            deadline,
            cx,
            "the client took none of its answer past write_timeout",
        )
    }
}

/// `Pending` until `deadline`, then a `TimedOut` error saying `why`; `sleep` is re-armed only
/// when the deadline moved.
fn timed_out<T>(
    sleep: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
    why: &'static str,
) -> Poll<io::Result<T>> {
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    match sleep.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why))),
        Poll::Pending => Poll::Pending,
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.bytes_read(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Some(deadline) = this.clock.deadline() else {
                    return Poll::Pending;
                };
                timed_out(
                    &mut this.sleep,
                    deadline,
                    cx,
                    "the client was silent past its timeout",
                )
            }
            ready => ready,
        }
    }
}

impl<I: AsyncWrite + Unpin> Guarded<I> {
    /// Writes what is left of a rewritten answer; ready once it is all out.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    if *done == bytes.len() {
                        self.pending = None;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // Only a write that had something to write counts for the stall clock.
        if this.pending.is_some() {
            let before = this.poll_pending(cx);
            match this.timed_write(cx, before) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if let Some(answer) = json_error_answer(buf) {
            this.pending = Some((answer, 0));
            // hyper's answer counts as written; ours goes out in its place.
            let _ = this.poll_pending(cx);
            return Poll::Ready(Ok(buf.len()));
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.timed_write(cx, written)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let flushed = match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        };
        this.timed_write(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // TLS writes its close_notify here: a client that reads nothing stalls this too.
        let shut = match this.poll_pending(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        };
        this.timed_write(cx, shut)
    }
}

/// When `buf` starts hyper's own error answer (an error status, no body, and none of the
/// headers every routed answer carries), the same answer with a JSON error body.
fn json_error_answer(buf: &[u8]) -> Option<Vec<u8>> {
    // Every answer passes here: a status below 400 ("HTTP/1.1 200") is let through before the
    // head is searched.
    if !buf.starts_with(b"HTTP/1.") || buf.get(9).is_none_or(|c| *c < b'4') {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let code: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<&str> = lines.collect();
    let has = |name: &str| {
        headers.iter().any(|h| {
            h.split(':')
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
        })
    };
    let empty = headers.iter().any(|h| {
        h.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("content-length") && v.trim() == "0"
        })
    });
    if code < 400 || !empty || has("x-request-id") || has("content-type") {
        return None;
    }
    let (kind, message) = match code {
        400 => ("BadRequestException", "the request is not valid HTTP"),
        408 => (
            "RequestTimeoutException",
            "the request took too long to arrive",
        ),
        413 => ("RequestTooLargeException", "the request is too large"),
        414 => ("UriTooLongException", "the request's URI is too long"),
        431 => (
            "RequestHeaderFieldsTooLargeException",
            "the request's headers are too large",
        ),
        501 => (
            "NotImplementedException",
            "the request's method is not supported",
        ),
        505 => (
            "VersionNotSupportedException",
            "the HTTP version is not supported",
        ),
        _ => ("InternalServerException", "the request could not be served"),
    };
    let body = crate::frontends::pretty_json(&serde_json::json!({
        "code": code, "type": kind, "message": message,
    }));
    let mut out = String::with_capacity(end + body.len() + 64);
    out.push_str(status_line);
    out.push_str("\r\n");
    for h in &headers {
        let name = h.split(':').next().unwrap_or("").trim();
        if !name.eq_ignore_ascii_case("content-length") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut bytes = out.into_bytes();
    // Whatever followed the head in the same write (nothing, for an answer without a body).
    bytes.extend_from_slice(&buf[end + 4..]);
    Some(bytes)
}

/// Raises the soft limit on open files to the hard limit and returns it, so the connection caps
/// can be set below what the process may really open.
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// The default cap per listener for a process that may open `open_files` files: the five
/// listeners (three REST, two gRPC) share what is left after a reserve for archives, logs and
/// the model store.
pub fn default_max_connections(open_files: u64) -> usize {
    const RESERVE: u64 = 256;
    (open_files.saturating_sub(RESERVE) / 5).clamp(16, 10_000) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_millis(200),
            max_connections: 10,
        }
    }

    #[tokio::test]
    async fn a_client_that_takes_none_of_its_answer_is_let_go() {
        let (server_end, mut client_end) = tokio::io::duplex(1024);
        let clock = Arc::new(Clock::new(limits(), Instant::now()));
        let mut io = Guarded::new(server_end, clock);
        let answer = vec![b'x'; 64 * 1024];
        let t = Instant::now();
        // The client reads nothing: the duplex buffer fills, then the write stalls.
        let e = io
            .write_all(&answer)
            .await
            .expect_err("a stalled write fails");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // A client that reads, however slowly, keeps its connection.
        let (server_end, mut slow) = tokio::io::duplex(1024);
        let clock = Arc::new(Clock::new(limits(), Instant::now()));
        let mut io = Guarded::new(server_end, clock);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let mut total = 0;
            while total < 8 * 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += tokio::io::AsyncReadExt::read(&mut slow, &mut buf)
                    .await
                    .unwrap();
            }
            total
        });
        io.write_all(&answer[..8 * 1024])
            .await
            .expect("slow but going");
        assert_eq!(reader.await.unwrap(), 8 * 1024);
        drop(client_end.shutdown().await);
    }

    #[test]
    fn silence_is_timed_by_what_the_connection_waits_for() {
        let t0 = Instant::now();
        let clock = Arc::new(Clock::new(limits(), t0));
        assert_eq!(clock.deadline(), Some(t0 + Duration::from_secs(60)), "idle");
        let t1 = t0 + Duration::from_secs(2);
        clock.bytes_read(t1);
        assert_eq!(
            clock.deadline(),
            Some(t1 + Duration::from_secs(5)),
            "a head has begun"
        );
        clock.bytes_read(t1 + Duration::from_secs(1));
        assert_eq!(
            clock.deadline(),
            Some(t1 + Duration::from_secs(5)),
            "more bytes of the same head do not extend it"
        );
        let serving = clock.serving();
        assert_eq!(
            clock.deadline(),
            None,
            "a request in service may take its time"
        );
        clock.bytes_read(t1 + Duration::from_secs(9));
        assert_eq!(clock.deadline(), None, "body bytes while serving");
        drop(serving);
        let d = clock.deadline().unwrap();
        assert!(
            d >= t0 + Duration::from_secs(60),
            "idle again from the answer"
        );
    }

    #[test]
    fn hyper_errors_get_a_json_body() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(json_error_answer(hyper_431).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains("date: x"));
        assert!(head.contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], 431);
        assert_eq!(v["type"], "RequestHeaderFieldsTooLargeException");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        // Routed answers are left alone: they carry a request id, a type, or a body.
        for own in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nx-request-id: 1\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"[1, 2, 3]",
        ] {
            assert_eq!(json_error_answer(own), None);
        }
    }

    #[test]
    fn connection_caps_leave_room_for_the_rest() {
        assert_eq!(default_max_connections(1024), 153);
        assert_eq!(default_max_connections(100), 16);
        assert_eq!(default_max_connections(1 << 20), 10_000);
    }
}
