//! The management listener: register, list, describe, scale, set-default, unregister.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};
use tchserve_backend::WorkerState;

use crate::auth::{RenewError, Scope};
use crate::core::ApiError;
use crate::core::bounds;
use crate::core::registry::{ModelVersion, Origin, RegisterParams, ScaleOutcome};
use crate::frontends::{
    AppState, authorization, json_response, management_key, not_allowed, not_found, openapi,
    with_description, with_listener_layers,
};

type Params = Query<HashMap<String, String>>;

/// A management call's answer: its status and JSON body (the gRPC API's `msg`).
pub type Outcome = Result<(StatusCode, Value), ApiError>;

fn respond(o: Outcome) -> Response {
    match o {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => e.into_response(),
    }
}

fn status_body(code: StatusCode, message: impl Into<String>) -> Outcome {
    Ok((code, json!({"status": message.into()})))
}

/// The management listener's routes.
pub fn router(state: AppState) -> Router {
    let keyed = Router::new()
        .route("/models", get(list).post(register).fallback(not_allowed))
        .route(
            "/models/{model}",
            get(describe)
                .put(scale)
                .delete(unregister)
                .options(describe_api)
                .fallback(not_allowed),
        )
        .route(
            "/models/{model}/{version}",
            get(describe_version)
                .put(scale_version)
                .delete(unregister_version)
                .options(describe_version_api)
                .fallback(not_allowed),
        )
        .route(
            "/models/{model}/{version}/set-default",
            put(set_default).fallback(not_allowed),
        )
        // KServe v1's readiness, which TorchServe also answers here.
        .route(
            "/v1/models/{model}",
            get(kserve_readiness).fallback(not_allowed),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            management_key,
        ));
    // /token checks the API key itself.
    let router = with_description(keyed, doc)
        .route("/token", get(renew_token).fallback(not_allowed))
        .fallback(not_found);
    with_listener_layers(router, state)
}

/// `OPTIONS /models/{m}`: the management API's description, once the model is known (404
/// otherwise), as TorchServe answers it.
async fn describe_api(State(st): State<AppState>, Path(model): Path<String>) -> Response {
    respond(
        st.registry
            .get(&model, None)
            .map(|_| (StatusCode::OK, model_doc(&model, None))),
    )
}

/// `OPTIONS /models/{m}/{v}`, as [`describe_api`] for one version.
async fn describe_version_api(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    let version = Some(version.as_str()).filter(|v| *v != "all");
    respond(
        st.registry
            .get(&model, version)
            .map(|_| (StatusCode::OK, model_doc(&model, version))),
    )
}

/// One model's management routes, which `OPTIONS` on it describes, as TorchServe's management
/// description of a model does; with `version`, that version's too.
fn model_doc(name: &str, version: Option<&str>) -> Value {
    let default = format!("/models/{name}");
    let any = format!("/models/{name}/{{model_version}}");
    let one = version.map(|v| {
        (
            format!("/models/{name}/{v}"),
            format!("/models/{name}/{v}/set-default"),
        )
    });
    let mut paths: Vec<(&str, &[&str], &str)> = vec![
        (
            &default,
            &["GET", "PUT", "DELETE"],
            "Describe, scale (min_worker, max_worker, synchronous) or unregister the default version.",
        ),
        (
            &any,
            &["GET", "PUT", "DELETE"],
            "Describe, scale or unregister one version; GET .../all describes every version.",
        ),
    ];
    if let Some((this, set_default)) = &one {
        paths.push((
            this,
            &["GET", "PUT", "DELETE"],
            "Describe, scale or unregister this version.",
        ));
        paths.push((set_default, &["PUT"], "Make this version the default."));
    }
    let mut described = openapi("management", &paths);
    described["info"]["title"] = format!("tchserve management API for model {name}").into();
    described
}

/// This API's OpenAPI description.
pub(crate) fn doc() -> Value {
    openapi(
        "management",
        &[
            ("/", &["OPTIONS"], "This API description."),
            (
                "/models",
                &["GET", "POST"],
                "List models (limit, next_page_token); register a model (url, model_name, handler, runtime, batch_size, max_batch_delay, initial_workers, synchronous, response_timeout, startup_timeout).",
            ),
            (
                "/models/{model_name}",
                &["GET", "PUT", "DELETE"],
                "Describe, scale (min_worker, max_worker, synchronous) or unregister the default version.",
            ),
            (
                "/models/{model_name}/{model_version}",
                &["GET", "PUT", "DELETE"],
                "Describe, scale or unregister one version; GET .../all describes every version.",
            ),
            (
                "/models/{model_name}/{model_version}/set-default",
                &["PUT"],
                "Make a version the default.",
            ),
            (
                "/token",
                &["GET"],
                "With the API key: issue a new inference or management key (type=inference|management).",
            ),
            ("/api-description", &["GET"], "This API description."),
        ],
    )
}

/// `GET /token?type=inference|management`: a fresh key of that type, for the API key's holder.
async fn renew_token(
    State(st): State<AppState>,
    Query(q): Params,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let Some(tokens) = &st.tokens else {
        return Err(ApiError::resource_not_found());
    };
    // The key first, as TorchServe checks it: without it, nothing about the request is answered.
    if !tokens.holds_api_key(authorization(&headers)) {
        return Err(ApiError::invalid_key());
    }
    let asked = q.get("type").map(String::as_str).unwrap_or("");
    let scope = Scope::parse(asked).ok_or_else(|| {
        ApiError::UnknownKeyType(format!(
            "unknown key type {asked:?}: use type=inference or type=management"
        ))
    })?;
    let tokens = Arc::clone(tokens);
    let header = authorization(&headers).map(str::to_owned);
    // The renewal writes and syncs the key file: blocking work, kept off the async threads.
    let renewed = tokio::task::spawn_blocking(move || tokens.renew(scope, header.as_deref())).await;
    let renewed = renewed.map_err(|e| ApiError::internal(format!("renewing the key: {e}")))?;
    match renewed {
        Ok(entry) => {
            tracing::info!("issued a new {} key", scope.name());
            Ok(json_response(StatusCode::OK, &entry))
        }
        Err(RenewError::Denied) => Err(ApiError::invalid_key()),
        Err(RenewError::File(e)) => Err(ApiError::internal(e.to_string())),
    }
}

/// An integer parameter of a management call: `None` when absent or empty, 400 when not an
/// integer.
fn int_param(params: &HashMap<String, String>, key: &str) -> Result<Option<i64>, ApiError> {
    bounds::parse_int(key, params.get(key).map(String::as_str)).map_err(ApiError::bad_request)
}

fn int(params: &HashMap<String, String>, key: &str) -> Option<i64> {
    params.get(key).and_then(|v| v.trim().parse().ok())
}

async fn list(State(st): State<AppState>, Query(q): Params) -> Response {
    respond(list_models(&st, &q))
}

/// Lists the models' default versions, a page at a time (`limit`, `next_page_token`).
pub fn list_models(st: &AppState, q: &HashMap<String, String>) -> Outcome {
    let limit = int(q, "limit")
        .filter(|l| (0..=100).contains(l))
        .unwrap_or(100) as usize;
    let start = int(q, "next_page_token").unwrap_or(0).max(0) as usize;
    let entries = st.registry.snapshot_entries();
    let all: Vec<Value> = entries
        .iter()
        .filter_map(|(name, e)| {
            e.versions
                .get(&e.default)
                .map(|m| json!({"modelName": name, "modelUrl": m.url}))
        })
        .collect();
    let page: Vec<Value> = all.iter().skip(start).take(limit).cloned().collect();
    let mut body = serde_json::Map::new();
    if start + limit < all.len() {
        body.insert("nextPageToken".into(), json!((start + limit).to_string()));
    }
    body.insert("models".into(), Value::Array(page));
    Ok((StatusCode::OK, Value::Object(body)))
}

async fn register(State(st): State<AppState>, Query(q): Params, req: Request) -> Response {
    if !st.config.enable_model_api {
        return ApiError::method_not_allowed().into_response();
    }
    let is_json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("application/json"));
    let params: HashMap<String, String> = if is_json {
        let body = match axum::body::to_bytes(req.into_body(), 1 << 20).await {
            Ok(b) => b,
            Err(e) => {
                return ApiError::bad_request(format!("reading the body: {e}")).into_response();
            }
        };
        match serde_json::from_slice::<serde_json::Map<String, Value>>(&body) {
            Ok(m) => m
                .into_iter()
                .filter_map(|(k, v)| json_param(v).map(|v| (k, v)))
                .collect(),
            Err(e) => {
                return ApiError::bad_request(format!("the body is not a JSON object: {e}"))
                    .into_response();
            }
        }
    } else {
        q
    };
    respond(register_model(&st, &params).await)
}

/// A JSON register field as the parameter's text, as TorchServe's JSON reader takes it: `null`
/// is an absent field and `2.0` the whole number 2.
fn json_param(v: Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s),
        Value::Number(n) => Some(match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        }),
        other => Some(other.to_string()),
    }
}

async fn kserve_readiness(State(st): State<AppState>, Path(model): Path<String>) -> Response {
    crate::frontends::kserve_v1::model_readiness(&st, &model, None)
        .unwrap_or_else(IntoResponse::into_response)
}

/// Registers an archive (`url`, `model_name`, `handler`, `runtime`, `batch_size`, ...).
pub async fn register_model(st: &AppState, params: &HashMap<String, String>) -> Outcome {
    if !st.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    let Some(mut url) = params.get("url").cloned() else {
        return Err(ApiError::bad_request("Parameter url is required."));
    };
    let mut fresh_download = None;
    if crate::core::fetch::is_remote(&url) {
        // The registry keeps the store's file name: a restart loads it from there.
        let fetched = st.registry.fetch_archive(&url).await?;
        url = fetched.name.clone();
        fresh_download = fetched.fresh.then_some(fetched.name);
    }
    let number = |key| int_param(params, key);
    let p = RegisterParams {
        url,
        model_name: params.get("model_name").cloned(),
        handler: params.get("handler").cloned().filter(|h| !h.is_empty()),
        runtime: params.get("runtime").cloned().filter(|r| !r.is_empty()),
        batch_size: number("batch_size")?,
        max_batch_delay: number("max_batch_delay")?,
        initial_workers: number("initial_workers")?,
        max_workers: None,
        response_timeout: number("response_timeout")?,
        startup_timeout: number("startup_timeout")?,
        // TorchServe's rule: anything but "true" means false; absent means true.
        synchronous: params
            .get("synchronous")
            .is_none_or(|s| s.eq_ignore_ascii_case("true")),
        origin: Origin::Api,
        make_default: false,
    };
    let registry = Arc::clone(&st.registry);
    let sync = p.synchronous;
    let reg = tokio::task::spawn_blocking(move || registry.register(&p))
        .await
        .map_err(|e| ApiError::internal(format!("registration failed: {e}")))
        .and_then(|r| r);
    let reg = match reg {
        Ok(reg) => reg,
        Err(e) => {
            // As TorchServe does: an archive downloaded for a registration that failed goes.
            if let Some(name) = fresh_download {
                st.registry.discard_download(&name);
            }
            return Err(e);
        }
    };
    st.save_snapshot().await;
    let (m, v) = (&reg.model.name, &reg.model.version);
    tracing::info!(model = %m, version = %v, workers = reg.workers, "model registered");
    if reg.workers == 0 {
        status_body(
            StatusCode::OK,
            format!(
                "Model \"{m}\" Version: {v} registered with 0 initial workers. Use scale workers API to add workers for the model."
            ),
        )
    } else if sync {
        status_body(
            StatusCode::OK,
            format!(
                "Model \"{m}\" Version: {v} registered with {} initial workers",
                reg.workers
            ),
        )
    } else {
        status_body(StatusCode::ACCEPTED, "Processing worker updates...")
    }
}

fn describe_one(m: &ModelVersion) -> Value {
    let (min, max) = m.min_max();
    let rss = crate::metrics::process_rss();
    let workers: Vec<Value> = m
        .pool
        .workers()
        .into_iter()
        .map(|w| {
            let status = match w.state {
                WorkerState::Ready => "READY",
                WorkerState::Starting => "STARTING",
                WorkerState::Failed(_) => "FAILED",
                WorkerState::Stopped => "UNLOADING",
            };
            let started = chrono::DateTime::<chrono::Utc>::from(w.started);
            let mut o = json!({
                "id": w.id.to_string(),
                "startTime": started.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
                "status": status,
                "memoryUsage": rss,
                "pid": std::process::id(),
                "gpu": w.on_gpu(),
                "gpuUsage": "N/A",
            });
            if let WorkerState::Failed(why) = &w.state {
                o["error"] = json!(why);
            }
            o
        })
        .collect();
    json!({
        "modelName": m.name,
        "modelVersion": m.version,
        "modelUrl": m.url,
        "runtime": m.runtime.as_str(),
        "handler": m.handler,
        "minWorkers": min,
        "maxWorkers": max,
        "batchSize": m.batch_size,
        "maxBatchDelay": m.max_batch_delay_ms,
        "responseTimeout": m.response_timeout_s,
        "startupTimeout": m.startup_timeout_s,
        "maxRetryTimeoutInSec": 300,
        "clientTimeoutInMills": m.client_timeout_ms,
        "parallelType": "",
        "parallelLevel": 0,
        "deviceType": m.device_type,
        "continuousBatching": false,
        "useJobTicket": m.use_job_ticket,
        "useVenv": false,
        "stateful": false,
        "sequenceMaxIdleMSec": 0,
        "sequenceTimeoutMSec": 0,
        "maxNumSequence": 0,
        "maxSequenceJobQueueSize": 0,
        "loadedAtStartup": m.loaded_at_startup,
        "workers": workers,
        "jobQueueStatus": {"remainingCapacity": m.pool.remaining_capacity(), "pendingRequests": m.pool.queue_len()},
    })
}

fn describe_response(
    st: &AppState,
    name: &str,
    version: Option<&str>,
    q: &HashMap<String, String>,
) -> Response {
    let customized = q
        .get("customized")
        .is_some_and(|s| s.eq_ignore_ascii_case("true"));
    respond(describe_model(st, name, version, customized))
}

/// Describes a version, the default, or every version (`all`). `customized` adds each
/// version's `customizedMetadata`: where TorchServe asks the handler's Python code, the handler
/// here is its manifest, so the manifest is what describes it.
pub fn describe_model(
    st: &AppState,
    name: &str,
    version: Option<&str>,
    customized: bool,
) -> Outcome {
    let models = st.registry.describe(name, version)?;
    // TorchServe describes `all` without the handlers' metadata, whatever `customized` says.
    let customized = customized && version != Some("all");
    let mut described = Vec::with_capacity(models.len());
    for m in &models {
        let mut one = describe_one(m);
        if customized {
            // As TorchServe: the handler's description comes from a worker, so none is a 503.
            if m.pool.worker_count() == 0 {
                return Err(ApiError::unavailable(format!(
                    "Model \"{}\" has no worker to serve describe request. Please use scale \
                     workers API to add workers.",
                    m.name
                )));
            }
            one["customizedMetadata"] =
                serde_json::to_value(&m.manifest).map_err(|e| ApiError::internal(e.to_string()))?;
        }
        described.push(one);
    }
    Ok((StatusCode::OK, Value::Array(described)))
}

async fn describe(
    State(st): State<AppState>,
    Path(model): Path<String>,
    Query(q): Params,
) -> Response {
    describe_response(&st, &model, None, &q)
}

async fn describe_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    describe_response(&st, &model, Some(&version), &q)
}

async fn scale(
    State(st): State<AppState>,
    Path(model): Path<String>,
    Query(q): Params,
) -> Response {
    // A version named by the query is named in the answer too, as TorchServe names it.
    let version = q.get("model_version").cloned();
    let named = version.is_some();
    respond(scale_workers(&st, model, version, named, &q).await)
}

async fn scale_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    Query(q): Params,
) -> Response {
    respond(scale_workers(&st, model, Some(version), true, &q).await)
}

/// Sets a version's workers (`min_worker`, `max_worker`, `synchronous`).
pub async fn scale_workers(
    st: &AppState,
    model: String,
    version: Option<String>,
    version_in_path: bool,
    q: &HashMap<String, String>,
) -> Outcome {
    let limit = st.config.max_workers_per_model;
    let count = |key: &'static str| -> Result<Option<i64>, ApiError> {
        int_param(q, key)?
            .map(|n| bounds::workers(key, limit).check(n))
            .transpose()
            .map_err(|why| {
                ApiError::bad_request(format!("{why} (max_workers_per_model is {limit})"))
            })
    };
    let min = count("min_worker")?.unwrap_or(1);
    let max = count("max_worker")?.unwrap_or(min);
    if max < min {
        return Err(ApiError::bad_request(
            "max_worker cannot be less than min_worker.",
        ));
    }
    let sync = q
        .get("synchronous")
        .is_some_and(|s| s.eq_ignore_ascii_case("true"));
    let registry = Arc::clone(&st.registry);
    let v = version.clone();
    let (min, max) = (min as usize, max as usize);
    let result =
        tokio::task::spawn_blocking(move || registry.scale(&model, v.as_deref(), min, max, sync))
            .await;
    let (mv, outcome) =
        result.map_err(|e| ApiError::internal(format!("scaling failed: {e}")))??;
    match &outcome {
        ScaleOutcome::Done if sync => {
            tracing::info!(model = %mv.name, version = %mv.version, min_worker = min, max_worker = max, "workers scaled")
        }
        ScaleOutcome::Failed(why) => {
            tracing::warn!(model = %mv.name, version = %mv.version, min_worker = min, max_worker = max, "workers asked for, some failed to start{why}")
        }
        _ => {
            tracing::info!(model = %mv.name, version = %mv.version, min_worker = min, max_worker = max, synchronous = sync, "workers scaling")
        }
    }
    st.save_snapshot().await;
    if !sync {
        return status_body(StatusCode::ACCEPTED, "Processing worker updates...");
    }
    match outcome {
        ScaleOutcome::Done => {
            let mut msg = format!("Workers scaled to {min} for model: {}", mv.name);
            if version_in_path {
                msg.push_str(&format!(", version: {}", mv.version));
            }
            status_body(StatusCode::OK, msg)
        }
        ScaleOutcome::InProgress => status_body(
            StatusCode::PARTIAL_CONTENT,
            "Workers scaling in progress...",
        ),
        ScaleOutcome::Failed(why) => Err(ApiError::internal(format!(
            "Failed to start workers for model {} version: {}{why}",
            mv.name, mv.version
        ))),
    }
}

async fn set_default(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    respond(set_default_version(&st, &model, &version).await)
}

/// Makes `version` the default of `model`.
pub async fn set_default_version(st: &AppState, model: &str, version: &str) -> Outcome {
    st.registry.set_default(model, version)?;
    tracing::info!(model = %model, version = %version, "default version set");
    st.save_snapshot().await;
    status_body(
        StatusCode::OK,
        format!("Default version successfully updated for model \"{model}\" to \"{version}\""),
    )
}

async fn unregister(State(st): State<AppState>, Path(model): Path<String>) -> Response {
    respond(unregister_model(&st, &model, None).await)
}

async fn unregister_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    respond(unregister_model(&st, &model, Some(&version)).await)
}

/// Removes a version (the default when none is named); queued requests are still answered.
pub async fn unregister_model(st: &AppState, model: &str, version: Option<&str>) -> Outcome {
    if !st.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    let removed = st.registry.unregister(model, version)?;
    // Before any await, so that a registration of the same name meanwhile keeps its series.
    st.forget_metrics(std::slice::from_ref(&removed));
    st.save_snapshot().await;
    st.registry.forget_download(&removed);
    // Queued requests are still answered; the workers then stop and the scratch files go.
    let drain = std::time::Duration::from_secs(removed.response_timeout_s);
    let removed_version = removed.version.clone();
    crate::frontends::stop_workers(vec![removed], drain).await;
    tracing::info!(model = %model, version = %removed_version, "model version unregistered");
    status_body(StatusCode::OK, format!("Model \"{model}\" unregistered"))
}
