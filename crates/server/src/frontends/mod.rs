//! The frontends: each translates one wire protocol to and from the core, and nothing more.
//! This module holds what they share: the state they reach, middleware, and TorchServe's JSON
//! style.

pub mod grpc;
pub mod kserve_v1;
pub mod metrics;
pub mod proto;
pub mod torchserve;
pub mod v2;

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::auth::{Scope, Tokens};
use crate::config::Config;

use crate::core::{ApiError, Infer, Registry};
use crate::metrics::Metrics;
use crate::snapshot::Snapshots;

/// The tracing target of the access log's lines, one per request.
pub const ACCESS_LOG_TARGET: &str = "access";

/// One request as the access log records it.
#[derive(Debug, Clone, Copy)]
pub struct AccessEntry<'a> {
    /// The request's method.
    pub method: &'a str,
    /// The request's path, without the query.
    pub path: &'a str,
    /// The answer's status code.
    pub status: u16,
    /// Microseconds from the request's arrival to its answer.
    pub micros: u64,
    /// Who sent it: the client's address (`127.0.0.1:50412`), as TorchServe's access log names
    /// it; empty where unknown.
    pub peer: &'a str,
    /// The `x-request-id` the answer carried, by which a client's report of a failure is found
    /// in the log; empty for gRPC calls, whose answers carry none.
    pub id: &'a str,
}

/// The address of the client a request came from, set by the listener on each request.
#[derive(Debug, Clone)]
pub struct Peer(pub Arc<str>);

/// Writes access lines itself, in the shape `tracing`'s formatter would have written them.
pub type AccessSink = Box<dyn Fn(&AccessEntry<'_>) + Send + Sync>;

static ACCESS_SINK: OnceLock<AccessSink> = OnceLock::new();

/// Sends the access log to `sink` rather than through `tracing`'s formatter, whose general
/// machinery cost a busy server a few percent of its CPU for a line per request. Only the first
/// call takes effect; it returns whether this one did.
pub fn set_access_sink(sink: AccessSink) -> bool {
    ACCESS_SINK.set(sink).is_ok()
}

/// Writes the access line for one request, when the log filter lets the access log through.
pub(crate) fn log_access(entry: &AccessEntry<'_>) {
    if !tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
        return;
    }
    match ACCESS_SINK.get() {
        Some(sink) => sink(entry),
        None => access_event(entry),
    }
}

/// The access line for `entry` as a `tracing` event, for every log format but the one a sink
/// writes.
pub fn access_event(entry: &AccessEntry<'_>) {
    tracing::info!(
        target: ACCESS_LOG_TARGET,
        method = %entry.method,
        path = %entry.path,
        status = entry.status,
        us = entry.micros,
        peer = %entry.peer,
        id = %entry.id,
        "request"
    );
}

/// What every route can reach: one shared [`AppContext`], so the per-request clone that axum's
/// state extraction makes is one reference count.
#[derive(Debug, Clone)]
pub struct AppState(Arc<AppContext>);

impl From<AppContext> for AppState {
    fn from(ctx: AppContext) -> Self {
        AppState(Arc::new(ctx))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;
    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct AppContext {
    /// Registered models.
    pub registry: Arc<Registry>,
    /// Readiness, metadata and predictions.
    pub infer: Infer,
    /// Metrics.
    pub metrics: Metrics,
    /// Settings.
    pub config: Arc<Config>,
    /// The snapshot writer; `None` with `--ncs`.
    pub snapshots: Option<Arc<Snapshots>>,
    /// The keys requests must carry; `None` when token authorization is off.
    pub tokens: Option<Arc<Tokens>>,
}

impl AppContext {
    /// Drops the metric series of versions that were unregistered, and of their model once no
    /// version of it is left.
    pub fn forget_metrics(&self, removed: &[std::sync::Arc<crate::core::registry::ModelVersion>]) {
        for m in removed {
            let model_gone = self.registry.get(&m.name, None).is_err();
            self.metrics.forget(&m.name, &m.version, model_gone);
        }
    }

    /// Records the registry after a management change; returns once it is on disk.
    pub async fn save_snapshot(&self) {
        if let Some(s) = &self.snapshots
            && !s.save().await
        {
            self.metrics.snapshot_write_failures.inc();
        }
    }
}

/// The inference listener: TorchServe's routes, KServe v1 and the Open Inference Protocol v2,
/// with one set of middleware.
pub fn inference_router(state: AppState) -> axum::Router {
    let mut keyed = kserve_v1::routes().merge(v2::rest::keyed_routes());
    // As for TorchServe's routes: no layer when there are no keys to check.
    if state.tokens.is_some() {
        keyed = keyed.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inference_key,
        ));
    }
    let router = torchserve::inference::routes(&state)
        .merge(keyed)
        .merge(v2::rest::open_routes())
        .merge(v2::rest::repository_routes(&state))
        .fallback(not_found_by_protocol)
        // Multipart bodies are read by axum's extractor, which applies this limit.
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_request_size,
        ));
    with_listener_layers(router, state)
}

/// The REST APIs a listener may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Predictions, health, KServe v1 and v2.
    Inference,
    /// TorchServe's management API.
    Management,
    /// Prometheus metrics.
    Metrics,
}

/// The router of a listener serving `apis`. Several APIs on one listener (their addresses are
/// equal, as TorchServe allows) are told apart by path: `/metrics` is the metrics API's,
/// `/models...` (but a model's `invoke`) and `/token` the management API's, everything else
/// the inference API's, or, without it, the management API's.
pub fn router_for(apis: &[Api], state: AppState) -> axum::Router {
    use tower::ServiceExt;
    let router_of = |api: Api| match api {
        Api::Inference => inference_router(state.clone()),
        Api::Management => torchserve::management::router(state.clone()),
        Api::Metrics => metrics::router(state.clone()),
    };
    if let [only] = apis {
        return router_of(*only);
    }
    let pick = |api: Api| apis.contains(&api).then(|| router_of(api));
    let (management, metrics) = (pick(Api::Management), pick(Api::Metrics));
    // Inference and management together describe both at `/` and `/api-description`.
    let description = (apis.contains(&Api::Inference) && management.is_some()).then(|| {
        with_listener_layers(
            with_description_and_liveness(axum::Router::new(), both_descriptions),
            state.clone(),
        )
    });
    // What no other API claims: inference's, else management's (metrics is never alone here).
    let rest = pick(Api::Inference)
        .or_else(|| management.clone())
        .unwrap_or_else(|| router_of(Api::Metrics));
    axum::Router::new().fallback_service(tower::service_fn(move |req: Request| {
        let path = req.uri().path();
        let routes = match (&metrics, &management, &description) {
            (Some(m), _, _) if path == "/metrics" => m,
            (_, _, Some(d)) if path == "/" || path == "/api-description" => d,
            (_, Some(m), _) if is_management_path(path) => m,
            _ => &rest,
        };
        routes.clone().oneshot(req)
    }))
}

/// The inference and management APIs' descriptions as one, for a listener serving both.
fn both_descriptions() -> Value {
    let mut doc = torchserve::inference::doc();
    if let (Some(paths), Value::Object(more)) = (
        doc["paths"].as_object_mut(),
        torchserve::management::doc()["paths"].take(),
    ) {
        for (path, ops) in more {
            match paths.get_mut(&path).and_then(Value::as_object_mut) {
                Some(known) => known.extend(ops.as_object().cloned().unwrap_or_default()),
                None => {
                    paths.insert(path, ops);
                }
            }
        }
    }
    doc["info"]["title"] = json!("tchserve inference and management API");
    doc
}

/// Whether a path on a shared listener is the management API's.
fn is_management_path(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["token"] => true,
        ["models", _, "invoke"] => false,
        ["models", ..] => true,
        _ => false,
    }
}

/// What every route of the inference and management listeners goes through: the body read
/// within its limits and timeout, then TorchServe's headers, the status count and the access
/// log. One layer for all of it: each layer costs every request a boxed future.
pub fn with_listener_layers(router: axum::Router<AppState>, state: AppState) -> axum::Router {
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            common_headers,
        ))
        .with_state(state)
}

/// Reads the body (see [`buffer_body`]), runs the route, adds TorchServe's response headers,
/// counts the status, and writes the access log line.
pub async fn common_headers(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let peer = req.extensions().get::<Peer>().map(|p| Arc::clone(&p.0));
    let started = std::time::Instant::now();
    let mut unanswered = Unanswered {
        method: method.as_str(),
        path: &path,
        peer: peer.as_deref().unwrap_or_default(),
        started,
        armed: true,
    };
    let cors = &st.config.cors;
    let mut resp = if is_preflight(&req, cors) {
        StatusCode::OK.into_response()
    } else if !decodes_to_utf8(&path) {
        // Answered here in the API's shape, where the router's path extractor would answer
        // in plain text.
        error_by_protocol(
            &path,
            ApiError::bad_request("the request path is not UTF-8 once percent-decoded"),
        )
    } else if let Some(tokens) = &st.tokens
        && has_body(&req)
        && !tokens.holds_any_key(authorization(req.headers()))
    {
        if needs_no_key(&path) {
            // These routes read no body: a probe that sends one anyway is answered, and the
            // body is left unread.
            let (parts, _) = req.into_parts();
            next.run(Request::from_parts(parts, axum::body::Body::empty()))
                .await
        } else {
            // Refused before the body is read: a client without a key costs neither the
            // memory nor the wait of a body. (Which key the route needs is checked once it is
            // routed.)
            error_by_protocol(&path, ApiError::invalid_key())
        }
    } else {
        match buffered(&st, req).await {
            Ok(req) => next.run(req).await,
            Err(refused) => error_by_protocol(&path, refused),
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    h.insert(
        "cache-control",
        HeaderValue::from_static("no-cache; no-store, must-revalidate, private"),
    );
    h.insert("pragma", HeaderValue::from_static("no-cache"));
    h.insert(
        "expires",
        HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 UTC"),
    );
    add_cors(h, cors);
    let status = resp.status().as_u16();
    st.metrics.count_status(status);
    unanswered.armed = false;
    log_access(&AccessEntry {
        method: method.as_str(),
        path: &path,
        status,
        micros: started.elapsed().as_micros() as u64,
        peer: peer.as_deref().unwrap_or_default(),
        id: &id,
    });
    resp
}

/// The status an access line gives a request whose connection closed before its answer was
/// written (the client went away, or a stop cut it off), as nginx logs one.
pub const CLOSED_UNANSWERED: u16 = 499;

/// A request not yet answered: dropped so (its connection closed under it), it still gets its
/// access line, with [`CLOSED_UNANSWERED`], so that the log holds every request accepted.
struct Unanswered<'a> {
    method: &'a str,
    path: &'a str,
    peer: &'a str,
    started: std::time::Instant,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            log_access(&AccessEntry {
                method: self.method,
                path: self.path,
                status: CLOSED_UNANSWERED,
                micros: self.started.elapsed().as_micros() as u64,
                peer: self.peer,
                id: "",
            });
        }
    }
}

/// Stops the workers of unregistered versions: what is queued is answered within `drain`, and
/// the call returns then, or a little after. A batch still running then is not waited for (a
/// model stuck in a loop may never return): its clients get their answers when it returns, and
/// its thread ends then.
pub async fn stop_workers(
    removed: Vec<std::sync::Arc<crate::core::registry::ModelVersion>>,
    drain: std::time::Duration,
) {
    let names: Vec<String> = removed
        .iter()
        .map(|m| format!("{}:{}", m.name, m.version))
        .collect();
    let stopping = tokio::task::spawn_blocking(move || {
        for m in removed {
            m.pool.shutdown(drain);
        }
    });
    let grace = drain + std::time::Duration::from_secs(5);
    if tokio::time::timeout(grace, stopping).await.is_err() {
        tracing::warn!(
            models = ?names,
            "the unregistered versions still had work {} s after the unregistration; it is not waited for",
            grace.as_secs()
        );
    }
}

/// Whether `path` is one of the routes that need no key and read no body: the health routes
/// and the API's description.
fn needs_no_key(path: &str) -> bool {
    let path = match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    matches!(
        path,
        "/" | "/ping" | "/v2" | "/v2/health/live" | "/v2/health/ready" | "/api-description"
    )
}

/// Whether `req` announces a body: a `Content-Length` other than 0, or chunks.
fn has_body(req: &Request) -> bool {
    let headers = req.headers();
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.to_str().map_or(true, |v| v.trim() != "0"))
}

/// Whether `req` is a browser's CORS preflight: with CORS configured, the answer is yes on
/// every path, and the `Access-Control-Allow-*` headers say what is allowed.
fn is_preflight(req: &Request, cors: &crate::config::Cors) -> bool {
    cors.is_on()
        && req.method() == axum::http::Method::OPTIONS
        && req.headers().contains_key("access-control-request-method")
}

/// Adds the configured `Access-Control-Allow-*` headers.
fn add_cors(h: &mut axum::http::HeaderMap, cors: &crate::config::Cors) {
    for (name, value) in [
        ("access-control-allow-origin", &cors.origin),
        ("access-control-allow-methods", &cors.methods),
        ("access-control-allow-headers", &cors.headers),
    ] {
        // The configuration checked each value.
        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            h.insert(name, v);
        }
    }
}

/// The metrics listener's CORS, as TorchServe's sends it: a dashboard in a browser may read
/// `/metrics` from another origin.
pub async fn metrics_cors(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let cors = &st.config.cors;
    if !cors.is_on() {
        return next.run(req).await;
    }
    let mut resp = if is_preflight(&req, cors) {
        StatusCode::OK.into_response()
    } else {
        next.run(req).await
    };
    add_cors(resp.headers_mut(), cors);
    resp
}

/// Whether `path` percent-decodes to UTF-8 text (a `%` not followed by two hex digits stays
/// as it is, as the router reads it).
fn decodes_to_utf8(path: &str) -> bool {
    !path.contains('%')
        || percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .is_ok()
}

/// The router, with `/models/x/` routed as `/models/x` (TorchServe treats them alike, and its
/// clients send both). The path is rewritten before routing, which middleware of the router
/// itself cannot do.
pub fn ignoring_trailing_slash(router: axum::Router) -> axum::Router {
    use tower::ServiceExt as _;
    axum::Router::new().fallback_service(router.map_request(without_trailing_slash))
}

fn without_trailing_slash(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = path.trim_end_matches('/');
        let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
        let rebuilt = match req.uri().query() {
            Some(q) => format!("{trimmed}?{q}"),
            None => trimmed.to_string(),
        };
        if let Ok(uri) = rebuilt.parse() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// Reads the whole request body before the route runs, within `body_read_timeout` and
/// `max_request_size`: a client that sends its body slowly, or never, is answered 408 instead
/// of holding the connection and its handler forever.
pub async fn buffer_body(State(st): State<AppState>, req: Request, next: Next) -> Response {
    match buffered(&st, req).await {
        Ok(req) => next.run(req).await,
        Err(refused) => refused.into_response(),
    }
}

/// The request with its body read whole (and decompressed, for a gzip or deflate
/// `Content-Encoding`), or the error refusing it.
async fn buffered(st: &AppContext, req: Request) -> Result<Request, ApiError> {
    let (mut parts, body) = req.into_parts();
    let limit = st.config.max_request_size;
    // A body announced as too large is refused before a byte of it is read, and before a
    // client that sent `Expect: 100-continue` is asked to send it.
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let timeout = st.config.body_read_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => return Err(ApiError::too_large(limit)),
        Err(_) => {
            return Err(ApiError::timeout_reading(format!(
                "the request body did not arrive within body_read_timeout ({} s)",
                timeout.as_secs()
            )));
        }
    };
    let bytes = match content_coding(&parts.headers)? {
        None => bytes,
        Some(coding) => {
            let inflated = tokio::task::spawn_blocking(move || decompress(coding, &bytes, limit))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))??;
            // The route sees the body as if it had been sent plain.
            parts.headers.remove(header::CONTENT_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, inflated.len().into());
            inflated
        }
    };
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// A request body's compression, as tritonclient's `request_compression_algorithm` sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Gzip,
    /// HTTP's "deflate": zlib's format (RFC 1950).
    Deflate,
}

/// The body's one content coding; several (in one field or several) are refused rather than
/// half undone.
fn content_coding(headers: &axum::http::HeaderMap) -> Result<Option<Coding>, ApiError> {
    let refuse = |text: &str| {
        ApiError::bad_request(format!(
            "Content-Encoding {text:?} is not supported: send the body plain, gzip or deflate"
        ))
    };
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| refuse(&String::from_utf8_lossy(value.as_bytes())))?;
        for coding in text.split(',').map(|c| c.trim().to_ascii_lowercase()) {
            match coding.as_str() {
                "" | "identity" => {}
                "gzip" | "x-gzip" => codings.push(Coding::Gzip),
                "deflate" => codings.push(Coding::Deflate),
                // Compressions the body would arrive unreadable in.
                "br" | "zstd" | "compress" | "x-compress" => return Err(refuse(&coding)),
                // No compression at all (`utf-8`, `binary`, ...: a charset or a transfer word
                // some clients put here): the body is as sent, as TorchServe takes it.
                _ => {}
            }
        }
    }
    match codings[..] {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(ApiError::bad_request(
            "the body names several Content-Encodings; send it compressed once, gzip or deflate",
        )),
    }
}

/// The body decompressed, refused once it grows past `limit`: a small body must not expand
/// into more memory than a plain one may take.
fn decompress(coding: Coding, body: &[u8], limit: usize) -> Result<Bytes, ApiError> {
    use std::io::Read as _;
    let reader: Box<dyn std::io::Read + '_> = match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        // Some clients send deflate's raw stream (RFC 1951) without zlib's wrapping.
        Coding::Deflate if zlib_wrapped(body) => Box::new(flate2::read::ZlibDecoder::new(body)),
        Coding::Deflate => Box::new(flate2::read::DeflateDecoder::new(body)),
    };
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ApiError::bad_request(format!("the body cannot be decompressed: {e}")))?;
    if out.len() > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(out.into())
}

/// Whether `body` starts with a zlib header (RFC 1950: method 8, a window of at most 32 KiB,
/// and the two bytes a multiple of 31), which a raw deflate stream's first bytes fail.
fn zlib_wrapped(body: &[u8]) -> bool {
    match body {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

/// `e` in the shape of the protocol `path` belongs to: `{"error": "..."}` on the KServe
/// protocols' paths, whose clients (tritonclient among them) cannot decode TorchServe's shape,
/// and TorchServe's elsewhere.
fn error_by_protocol(path: &str, e: ApiError) -> Response {
    if is_kserve_path(path) {
        kserve_error_response(&e)
    } else {
        e.into_response()
    }
}

/// Whether a path belongs to the KServe protocols (v1 or v2).
pub fn is_kserve_path(path: &str) -> bool {
    ["/v1", "/v2"].iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Lets a request through only with the inference key (when token authorization is on).
pub async fn inference_key(State(st): State<AppState>, req: Request, next: Next) -> Response {
    require_key(&st, Scope::Inference, req, next).await
}

/// Lets a request through only with the management key (when token authorization is on).
pub async fn management_key(State(st): State<AppState>, req: Request, next: Next) -> Response {
    require_key(&st, Scope::Management, req, next).await
}

/// Runs the request when it carries `scope`'s key (or keys are off); else answers the refusal
/// in the shape of the path's protocol, so that a KServe client can read it even on a path
/// that no route serves.
async fn require_key(st: &AppState, scope: Scope, req: Request, next: Next) -> Response {
    if let Some(tokens) = &st.tokens
        && !tokens.allows(scope, authorization(req.headers()))
    {
        return error_by_protocol(req.uri().path(), ApiError::invalid_key());
    }
    next.run(req).await
}

/// The `Authorization` header's value, when it is text.
pub fn authorization(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// TorchServe's JSON style: 2-space indent and a trailing newline.
pub fn pretty_json(value: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// A JSON response in TorchServe's style.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        pretty_json(value),
    )
        .into_response()
}

/// An error in the KServe protocols' shape (v1 and v2), `{"error": "..."}`, with the core's
/// status.
#[derive(Debug)]
pub struct KServeError(pub ApiError);

impl From<ApiError> for KServeError {
    fn from(e: ApiError) -> Self {
        KServeError(e)
    }
}

impl IntoResponse for KServeError {
    fn into_response(self) -> Response {
        kserve_error_response(&self.0)
    }
}

/// `{"error": message}` with the error's status.
pub fn kserve_error_response(e: &ApiError) -> Response {
    (
        e.status(),
        [("content-type", "application/json")],
        json!({"error": e.message()}).to_string(),
    )
        .into_response()
}

/// TorchServe's error body, `{"code", "type", "message"}`.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        json_response(
            status,
            &json!({"code": status.as_u16(), "type": self.kind(), "message": self.message()}),
        )
    }
}

/// `{"status": "..."}` with a status code.
pub fn status_message(code: StatusCode, message: impl Into<String>) -> Response {
    json_response(code, &json!({"status": message.into()}))
}

/// 404 for unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::resource_not_found()
}

/// 404 for unknown paths of the inference listener, in the shape of the protocol the path
/// belongs to (`/v2/models/m/config`, which Triton has and tchserve does not, among them).
async fn not_found_by_protocol(uri: axum::http::Uri) -> Response {
    error_by_protocol(uri.path(), ApiError::resource_not_found())
}

/// 405 for known paths with the wrong method.
pub async fn not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

/// Adds `OPTIONS /` and `GET /api-description`, both answering the listener's OpenAPI document;
/// any other method on `/` is 405, as TorchServe answers.
pub fn with_description(
    router: axum::Router<AppState>,
    doc: fn() -> Value,
) -> axum::Router<AppState> {
    described(router, doc, false)
}

/// [`with_description`] for a listener that serves inference, where `GET /` also answers
/// `{"status": "alive"}`, as KServe's model server does for its clients' liveness check
/// (`is_server_live` of KServe's v1 REST client).
pub fn with_description_and_liveness(
    router: axum::Router<AppState>,
    doc: fn() -> Value,
) -> axum::Router<AppState> {
    described(router, doc, true)
}

fn described(
    router: axum::Router<AppState>,
    doc: fn() -> Value,
    alive: bool,
) -> axum::Router<AppState> {
    let describe = move || async move { json_response(StatusCode::OK, &doc()) };
    let mut root = axum::routing::options(describe);
    if alive {
        root = root.get(|| async { status_message(StatusCode::OK, "alive") });
    }
    router
        .route(
            "/",
            root.fallback(|| async { ApiError::method_not_allowed() }),
        )
        .route(
            "/api-description",
            axum::routing::get(describe).fallback(|| async { ApiError::method_not_allowed() }),
        )
}

/// An OpenAPI 3.0.1 document listing `paths` as (path, methods, summary).
pub fn openapi(title_suffix: &str, paths: &[(&str, &[&str], &str)]) -> Value {
    let mut p = serde_json::Map::new();
    for (path, methods, summary) in paths {
        let mut ops = serde_json::Map::new();
        for m in *methods {
            ops.insert(
                m.to_ascii_lowercase(),
                json!({"summary": summary, "responses": {"200": {"description": "OK"}}}),
            );
        }
        p.insert((*path).to_string(), Value::Object(ops));
    }
    json!({
        "openapi": "3.0.1",
        "info": {"title": format!("tchserve {title_suffix} API"), "version": env!("CARGO_PKG_VERSION")},
        "paths": p,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_listener_sends_management_paths_to_management() {
        for path in [
            "/models",
            "/models/",
            "/models/m",
            "/models/m/1.0",
            "/models/m/1.0/set-default",
            "/token",
        ] {
            assert!(is_management_path(path), "{path}");
        }
        for path in [
            "/models/m/invoke",
            "/predictions/m",
            "/ping",
            "/",
            "/v1/models/m",
            "/v2/models/m/infer",
            "/modelsx",
            "/api-description",
        ] {
            assert!(!is_management_path(path), "{path}");
        }
    }

    #[test]
    fn paths_that_do_not_decode_to_text_are_told_apart() {
        for ok in [
            "/predictions/m",
            "/predictions/%6Cin",
            "/models/caf%C3%A9",
            "/x/100%",
            "/a%zz",
        ] {
            assert!(decodes_to_utf8(ok), "{ok}");
        }
        for bad in ["/predictions/%FF", "/predictions/lin/%C0", "/models/%C3"] {
            assert!(!decodes_to_utf8(bad), "{bad}");
        }
    }

    #[test]
    fn trailing_slashes_go_before_routing() {
        let path = |uri: &str| {
            let req = Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap();
            without_trailing_slash(req).uri().to_string()
        };
        assert_eq!(path("/models/squeezenet1_1/"), "/models/squeezenet1_1");
        assert_eq!(
            path("/models/m/?synchronous=true"),
            "/models/m?synchronous=true"
        );
        assert_eq!(path("/models//"), "/models");
        assert_eq!(path("/"), "/");
        assert_eq!(path("/ping"), "/ping");
    }
}
