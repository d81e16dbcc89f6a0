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
/// [`crate::telemetry::TraceLayer`]).
pub type TracedRouter = tonic::transport::server::Router<
    tower::layer::util::Stack<
        tower::util::Either<crate::telemetry::TraceLayer, tower::layer::util::Identity>,
        tower::layer::util::Identity,
    >,
>;

/// Serves `router` on `listener` until `stop` turns true; calls in flight finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: TracedRouter,
    mut stop: watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt as _;
    // Small answers must not wait on Nagle's algorithm (a 40 ms stall against delayed ACKs).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
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
