//! What the gRPC frontends share: the core's errors as gRPC statuses, token authorization from
//! request metadata, and serving on a listener until the server stops.

use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Code, Status};

use crate::auth::{Scope, Tokens};
use crate::core::{ApiError, GrpcCode};
use crate::frontends::proto::google::rpc;

/// A proto3 string field as an option: empty means unset.
pub fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

/// The largest gRPC message the inference services read: a request of `max_request_size` bytes
/// of data, and room for its framing.
pub fn message_limit(st: &crate::frontends::AppState) -> usize {
    st.config.max_request_size.saturating_add(64 * 1024)
}

/// The error as a gRPC status: the core's code and the REST API's message.
pub fn status_of(e: &ApiError) -> Status {
    Status::new(Code::from_i32(e.grpc_code() as i32), bounded(e.message()))
}

/// The longest status message sent. A status travels in a header, and clients refuse headers
/// past 16 KiB: a message that repeats a huge model name would lose the error itself.
const MAX_MESSAGE: usize = 4096;

/// `message`, cut to [`MAX_MESSAGE`] bytes at a character boundary, marked when cut.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// The error as a `google.rpc.Status` message, for answers inside a stream.
pub fn rpc_status(e: &ApiError) -> rpc::Status {
    rpc::Status {
        code: e.grpc_code() as i32,
        message: bounded(e.message()),
        details: Vec::new(),
    }
}

/// Refuses a call without the key of `scope` (when token authorization is on).
pub fn check_key(
    tokens: Option<&Tokens>,
    scope: Scope,
    metadata: &tonic::metadata::MetadataMap,
) -> Result<(), Status> {
    if let Some(tokens) = tokens {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        if !tokens.allows(scope, header) {
            return Err(status_of(&ApiError::invalid_key()));
        }
    }
    Ok(())
}

/// An interceptor for TorchServe's services: it lets a call through only with the key of
/// `scope` in its `authorization` metadata (`Bearer <key>`), when token authorization is on, and
/// refuses as TorchServe does, with `PERMISSION_DENIED`.
pub fn require_key(
    tokens: Option<Arc<Tokens>>,
    scope: Scope,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Clone {
    move |req: tonic::Request<()>| {
        check_key(tokens.as_deref(), scope, req.metadata()).map_err(|refused| {
            Status::new(
                Code::from_i32(GrpcCode::PermissionDenied as i32),
                refused.message(),
            )
        })?;
        Ok(req)
    }
}

/// A gRPC listener's services, each call traced when traces are on (see
/// [`crate::telemetry::TraceLayer`]) and written to the access log (see [`AccessLayer`]).
pub type TracedRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<
        AccessLayer,
        tower::layer::util::Stack<
            tower::util::Either<crate::telemetry::TraceLayer, tower::layer::util::Identity>,
            tower::layer::util::Identity,
        >,
    >,
>;

/// Writes an access line for each gRPC call, as the REST listeners write one per request:
/// method `gRPC`, the call's path, its gRPC status code where the answer's head carries it (a
/// failed unary call; 0 otherwise, and 1, CANCELLED, for a call that ended before its answer
/// began) and the client's address.
///
/// It also answers a message over the size limit with `RESOURCE_EXHAUSTED`, the status gRPC's
/// own implementations (grpc-java under TorchServe, grpc-go, gRPC core) give it, where tonic
/// says `OUT_OF_RANGE`: clients retry and alert on the former.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLayer;

impl<S> tower::Layer<S> for AccessLayer {
    type Service = Accessed<S>;
    fn layer(&self, inner: S) -> Accessed<S> {
        Accessed { inner }
    }
}

/// A service whose calls are written to the access log (see [`AccessLayer`]).
#[derive(Debug, Clone)]
pub struct Accessed<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<axum::http::Request<B>> for Accessed<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = axum::http::Response<TooLargeExhausts<RB>>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let peer = request
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut call = CallEntry {
            path: request.uri().path().to_owned(),
            peer,
            started: std::time::Instant::now(),
            logged: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut answer = answer.await;
            let status = match &mut answer {
                Ok(response) => {
                    // A unary call's error comes in the answer's head.
                    too_large_exhausts(response.headers_mut());
                    response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0)
                }
                Err(_) => GRPC_UNKNOWN,
            };
            call.log(status);
            // A stream's comes in its trailers.
            answer.map(|r| r.map(TooLargeExhausts))
        })
    }
}

/// gRPC's OUT_OF_RANGE, as tonic refuses a message over its size limit.
const GRPC_OUT_OF_RANGE: &str = "11";
/// gRPC's RESOURCE_EXHAUSTED, as gRPC's other implementations refuse one.
const GRPC_RESOURCE_EXHAUSTED: &str = "8";

/// Turns tonic's `OUT_OF_RANGE` for a message over the size limit into `RESOURCE_EXHAUSTED`.
fn too_large_exhausts(fields: &mut axum::http::HeaderMap) {
    let over_limit = fields
        .get("grpc-status")
        .is_some_and(|v| v == GRPC_OUT_OF_RANGE)
        && fields.get("grpc-message").is_some_and(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .contains("message length too large")
        });
    if over_limit {
        fields.insert(
            "grpc-status",
            axum::http::HeaderValue::from_static(GRPC_RESOURCE_EXHAUSTED),
        );
    }
}

/// An answer's body whose trailers get [`too_large_exhausts`].
#[derive(Debug)]
pub struct TooLargeExhausts<B>(B);

impl<B: http_body::Body + Unpin> http_body::Body for TooLargeExhausts<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.0).poll_frame(cx).map(|frame| {
            frame.map(|f| {
                f.map(|f| match f.into_trailers() {
                    Ok(mut trailers) => {
                        too_large_exhausts(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(other) => other,
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// gRPC's CANCELLED: the call ended before its answer began (the client went away, or its
/// deadline passed).
const GRPC_CANCELLED: u16 = 1;
/// gRPC's UNKNOWN.
const GRPC_UNKNOWN: u16 = 2;

/// A gRPC call on its way to its access line; one dropped unanswered is logged as cancelled.
struct CallEntry {
    path: String,
    peer: String,
    started: std::time::Instant,
    logged: bool,
}

impl CallEntry {
    fn log(&mut self, status: u16) {
        self.logged = true;
        super::log_access(&super::AccessEntry {
            method: "gRPC",
            path: &self.path,
            status,
            micros: self.started.elapsed().as_micros() as u64,
            peer: &self.peer,
            id: "",
        });
    }
}

impl Drop for CallEntry {
    fn drop(&mut self) {
        if !self.logged {
            self.log(GRPC_CANCELLED);
        }
    }
}

/// Serves `router` on `listener` until `stop` turns true; calls in flight finish first. At most
/// `max_connections` connections are open at once: one past the cap is closed as soon as it is
/// accepted, so idle clients cannot take every file descriptor of the process (as the REST
/// listeners answer 503 past theirs). A connection that has not sent its first bytes (HTTP/2's
/// preface, or a TLS hello) within `preface_timeout` is closed: HTTP/2's pings, which end idle
/// connections later, only start after the preface, so silent sockets would hold their places
/// under the cap for good.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: TracedRouter,
    max_connections: usize,
    preface_timeout: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt as _;
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let incoming =
        tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |conn| {
            let tcp = match conn {
                Ok(tcp) => tcp,
                Err(e) => return Some(Err(e)),
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                tracing::warn!(
                    "gRPC: too many open connections (max_connections is {max_connections}); \
                     closing a new one"
                );
                return None;
            };
            // Small answers must not wait on Nagle's algorithm (a 40 ms stall against delayed
            // ACKs).
            let _ = tcp.set_nodelay(true);
            Some(Ok(Counted {
                tcp,
                _permit: permit,
                preface: Some(Preface {
                    awaited: PREFACE_LEN,
                    deadline: Box::pin(tokio::time::sleep(preface_timeout)),
                }),
            }))
        });
    let stopped = async move {
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
        tracing::error!("gRPC listener failed: {e}");
    }
}

/// An accepted connection holding its place under the listener's cap until it closes.
struct Counted {
    tcp: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Until the client's first bytes have arrived: how many, and by when.
    preface: Option<Preface>,
}

/// The length of HTTP/2's client preface (RFC 9113, 3.4): the 24 bytes of
/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, then at least the 9-byte header of a SETTINGS frame.
const PREFACE_LEN: usize = 24 + 9;

/// The bytes a new connection must send before its deadline (see [`serve`]).
struct Preface {
    awaited: usize,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf);
        let Some(preface) = &mut self.preface else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                preface.awaited = preface.awaited.saturating_sub(got);
                if preface.awaited == 0 || got == 0 {
                    self.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if preface.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent no HTTP/2 preface in time",
                )))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// Refuses a call that registers or unregisters when `enable_model_api` is off, as TorchServe's gRPC
/// API refuses it (the REST API answers 405 instead), so clients that match its words work.
pub fn model_api_enabled(st: &crate::frontends::AppState) -> Result<(), Status> {
    if st.config.enable_model_api {
        Ok(())
    } else {
        Err(Status::permission_denied("Model API disabled"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_are_bounded_at_a_character_boundary() {
        assert_eq!(bounded("short".into()), "short");
        // 'é' is two bytes: a cut at MAX_MESSAGE would split the last one.
        let long = format!("x{}", "é".repeat(MAX_MESSAGE));
        let cut = bounded(long);
        assert!(
            cut.ends_with("...") && cut.len() <= MAX_MESSAGE + 3,
            "{}",
            cut.len()
        );
        let status = status_of(&ApiError::model_not_found(format!(
            "Model not found: {}",
            "m".repeat(900_000)
        )));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().len() <= MAX_MESSAGE + 3);
    }
}
