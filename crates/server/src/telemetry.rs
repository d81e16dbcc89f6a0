//! OpenTelemetry traces, on when `otlp_endpoint` is set: a server span per REST request (a child
//! of the caller's when the request carries a W3C `traceparent`, which the response then names),
//! with children for the time queued, the batch that held the request (its size an attribute),
//! the batch's preprocessing and model run, and the reply. Spans go to an OTLP/HTTP collector in
//! batches, from a thread of their own.
//!
//! The worker threads know nothing of this: they report when each stage ended, and the spans
//! are written with those times once the answer is back. Off, it costs one check per request.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::Request;
use axum::http::{self as http, HeaderMap, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tchserve_backend::job::Timings;

/// The tracer, once [`Telemetry::start`] has run.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

tokio::task_local! {
    /// The request being served on this task, when traces are on.
    static CURRENT: RequestTrace;
}

#[derive(Clone)]
struct RequestTrace {
    /// The server span's context: the parent of every span of this request.
    cx: Context,
    /// When the last worker answer arrived: the reply span runs from there to the response.
    /// Shared with the tasks a request spreads its items over.
    replied: Arc<Mutex<Option<Instant>>>,
}

impl RequestTrace {
    fn replied(&self) -> Option<Instant> {
        *self.replied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an answer's arrival; the last one counts.
    fn answered(&self, at: Instant) {
        let mut r = self.replied.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none_or(|prev| prev < at) {
            *r = Some(at);
        }
    }
}

/// `fut`, run on a task of its own, still belongs to the current request's trace (a request
/// whose items are answered as separate jobs).
pub fn in_current_trace<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    match CURRENT.try_with(RequestTrace::clone) {
        Ok(trace) => futures_util::future::Either::Left(CURRENT.scope(trace, fut)),
        Err(_) => futures_util::future::Either::Right(fut),
    }
}

/// Why traces cannot be sent.
#[derive(Debug, thiserror::Error)]
#[error("otlp_endpoint {endpoint}: {why}")]
pub struct TelemetryError {
    endpoint: String,
    why: String,
}

/// The trace pipeline; [`Telemetry::shutdown`] sends what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts sending traces to the collector at `endpoint` (its base URL, e.g.
    /// `http://127.0.0.1:4318`), over `runtime`.
    pub fn start(endpoint: &str, runtime: tokio::runtime::Handle) -> Result<Self, TelemetryError> {
        let err = |why: String| TelemetryError {
            endpoint: endpoint.to_string(),
            why,
        };
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(crate::core::fetch::client_tls().map_err(err)?)
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            // Used as given: the signal's path is not appended to an explicit endpoint.
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .with_http_client(OtlpHttp { client, runtime })
            .build()
            .map_err(|e| err(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("tchserve").build())
            .build();
        // A second start (tests run several servers in one process) keeps the first tracer.
        let _ = TRACER.set(provider.tracer("tchserve"));
        tracing::info!(endpoint, "sending traces over OTLP/HTTP");
        Ok(Telemetry { provider })
    }

    /// Sends the spans still buffered and stops. Blocking: call it outside the async threads,
    /// while the runtime given to [`Telemetry::start`] still runs.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("traces not all sent: {e}");
        }
    }
}

/// The exporter's HTTP client: the server's reqwest. The exporter runs on a thread of its own
/// with no async runtime, so each request runs as a task on the server's runtime and that thread
/// waits for it.
#[derive(Debug, Clone)]
struct OtlpHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: axum::http::Request<Bytes>,
    ) -> Result<axum::http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move {
                let response = client.execute(reqwest::Request::try_from(request)?).await?;
                // Answers other than 2xx go back as they are: the exporter decides on retries.
                let mut out = axum::http::Response::new(Bytes::new());
                *out.status_mut() = response.status();
                *out.headers_mut() = response.headers().clone();
                *out.body_mut() = response.bytes().await?;
                Ok::<_, HttpError>(out)
            })
            .await?
    }
}

/// W3C trace context for a span: `00-<trace id>-<span id>-<flags>`.
pub fn traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Middleware: a server span around each REST request, continuing the caller's trace.
pub async fn trace_requests(request: Request, next: Next) -> Response {
    let Some(tracer) = TRACER.get() else {
        return next.run(request).await;
    };
    let head = (
        request.method().clone(),
        request.uri().clone(),
        request.headers().clone(),
    );
    let serve = async { Ok::<_, std::convert::Infallible>(next.run(request).await) };
    match traced(tracer, head, serve).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Runs `serve` (one request's handling) under a server span continuing the trace in the
/// request's headers, and names that span in the response's `traceparent`.
async fn traced<B, E>(
    tracer: &SdkTracer,
    (method, uri, headers): (Method, Uri, HeaderMap),
    serve: impl Future<Output = Result<http::Response<B>, E>>,
) -> Result<http::Response<B>, E> {
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let path = uri.path().to_string();
    let mut attributes = vec![
        KeyValue::new("http.request.method", method.to_string()),
        KeyValue::new("url.path", path.clone()),
    ];
    if grpc {
        attributes.push(KeyValue::new("rpc.system", "grpc"));
    }
    // gRPC names its span by service and method, as OpenTelemetry's conventions do.
    let name = if grpc {
        path.trim_start_matches('/').to_string()
    } else {
        format!("{method} {path}")
    };
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    let cx = parent.with_span(span);
    let trace = RequestTrace {
        cx: cx.clone(),
        replied: Arc::new(Mutex::new(None)),
    };
    let (served, replied) = CURRENT
        .scope(trace, async {
            let served = serve.await;
            (served, CURRENT.with(RequestTrace::replied))
        })
        .await;
    let span = cx.span();
    let mut response = match served {
        Ok(r) => r,
        Err(e) => {
            span.set_status(Status::error("the service failed"));
            span.end();
            return Err(e);
        }
    };
    if let Some(at) = replied {
        let reply = tracer
            .span_builder("reply")
            .with_start_time(WallClock::now().at(at))
            .start_with_context(tracer, &cx);
        end_now(reply);
    }
    let status = response.status();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    // A unary gRPC call that fails answers its status in the headers.
    let grpc_status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<i64>().ok());
    if let Some(code) = grpc_status {
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
    }
    if status.is_server_error() || grpc_status.is_some_and(|c| c != 0) {
        span.set_status(Status::error(status.to_string()));
    }
    let sc = span.span_context().clone();
    span.end();
    if sc.is_valid()
        && let Ok(v) = HeaderValue::from_str(&traceparent(&sc))
    {
        response.headers_mut().insert("traceparent", v);
    }
    Ok(response)
}

/// The same for gRPC listeners: a tower layer around tonic's router.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

/// A service whose calls are traced (see [`TraceLayer`]).
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Traced<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(tracer) = TRACER.get() else {
            return Box::pin(inner.call(request));
        };
        let head = (
            request.method().clone(),
            request.uri().clone(),
            request.headers().clone(),
        );
        Box::pin(traced(tracer, head, inner.call(request)))
    }
}

/// Records the stages of one answered job under the current request's span: queued, then the
/// batch that held it, split into preprocessing and the model run.
pub fn record_job(enqueued: Instant, t: &Timings) {
    let Some(tracer) = TRACER.get() else {
        return;
    };
    let _ = CURRENT.try_with(|trace| {
        let now = Instant::now();
        trace.answered(now);
        // Refused before a worker took it (timed out in the queue): no stages to show.
        if t.batch_size == 0 {
            return;
        }
        // One reading of both clocks, so that the spans of a request nest exactly.
        let clock = WallClock::now();
        let us = |n: u64| Duration::from_micros(n);
        let started = enqueued + us(t.queue_us);
        let decoded = started + us(t.decode_us);
        interval(
            tracer,
            &trace.cx,
            "queue",
            clock.at(enqueued),
            clock.at(started),
        );
        let batch = tracer
            .span_builder("batch")
            .with_start_time(clock.at(started))
            .with_attributes([KeyValue::new("batch.size", t.batch_size as i64)])
            .start_with_context(tracer, &trace.cx);
        let batch_cx = trace.cx.with_span(batch);
        interval(
            tracer,
            &batch_cx,
            "preprocess",
            clock.at(started),
            clock.at(decoded),
        );
        if t.run_us > 0 {
            let ran = decoded + us(t.run_us);
            interval(
                tracer,
                &batch_cx,
                "forward",
                clock.at(decoded),
                clock.at(ran),
            );
        }
        batch_cx
            .span()
            .end_with_timestamp(clock.at(started + us(t.handler_us)));
    });
}

fn interval(
    tracer: &SdkTracer,
    parent: &Context,
    name: &'static str,
    from: SystemTime,
    to: SystemTime,
) {
    let mut span = tracer
        .span_builder(name)
        .with_start_time(from)
        .start_with_context(tracer, parent);
    span.end_with_timestamp(to);
}

fn end_now(mut span: impl opentelemetry::trace::Span) {
    span.end();
}

/// Both clocks read at one moment, to turn monotonic instants into wall-clock times.
struct WallClock {
    mono: Instant,
    wall: SystemTime,
}

impl WallClock {
    fn now() -> Self {
        WallClock {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The wall-clock time of `at`.
    fn at(&self, at: Instant) -> SystemTime {
        match self.mono.checked_duration_since(at) {
            Some(ago) => self.wall - ago,
            None => self.wall + at.duration_since(self.mono),
        }
    }
}
