//! The Open Inference Protocol v2 over REST, with the binary tensor data extension and the
//! model repository extension.

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::tensor::{self, Datatype};
use super::{InferInput, InferOutput, Inferred, OutputData, RequestedOutput, run_infer};
use crate::core::{ApiError, ModelMetadata, TensorMeta};
use crate::frontends::kserve_v1::model_readiness;
use crate::frontends::{AppState, KServeError, management_key};

type V2Result = Result<Response, KServeError>;

fn json_ok(v: &Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

/// Health and server metadata: no key, like `/ping`, so probes can reach them.
pub fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_metadata).fallback(not_allowed))
        // Any method, as TorchServe answers them: some probes POST.
        .route("/v2/health/live", any(live))
        .route("/v2/health/ready", any(ready))
}

/// Model metadata, readiness and inference (the inference key), and the repository extension
/// (the management key: it registers and unregisters models).
pub fn keyed_routes() -> Router<AppState> {
    Router::<AppState>::new()
        .route("/v2/models/{model}", get(metadata).fallback(not_allowed))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(metadata_version).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/ready",
            get(model_ready).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_version).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/infer",
            post(infer).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/explain",
            post(explain).fallback(not_allowed),
        )
        .route(
            "/v2/models/{model}/versions/{version}/explain",
            post(explain_version).fallback(not_allowed),
        )
}

/// TorchServe's v2 explain route: 501 for a model that exists, as the other explain routes.
async fn explain(State(st): State<AppState>, Path(model): Path<String>) -> V2Result {
    st.registry.get(&model, None)?;
    Err(ApiError::no_explanations().into())
}

async fn explain_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> V2Result {
    st.registry.get(&model, Some(&version))?;
    Err(ApiError::no_explanations().into())
}

/// The repository extension, behind the management key.
pub fn repository_routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route(
            "/v2/repository/index",
            post(repository_index).fallback(not_allowed),
        )
        .route(
            "/v2/repository/models/{model}/load",
            post(load_route).fallback(not_allowed),
        )
        .route(
            "/v2/repository/models/{model}/unload",
            post(unload_route).fallback(not_allowed),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            management_key,
        ))
}

/// 405 in the protocol's shape.
async fn not_allowed() -> KServeError {
    KServeError(ApiError::method_not_allowed())
}

async fn server_metadata() -> Response {
    json_ok(&json!({
        "name": "tchserve",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

async fn live() -> Response {
    json_ok(&json!({"live": true}))
}

async fn ready(State(st): State<AppState>) -> Response {
    let ready = st.infer.server_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [("content-type", "application/json")],
        json!({"ready": ready}).to_string(),
    )
        .into_response()
}

fn tensor_md(t: &TensorMeta) -> Value {
    let (name, datatype, shape) = super::tensor_metadata(t);
    json!({"name": name, "datatype": datatype, "shape": shape})
}

fn metadata_json(m: &ModelMetadata) -> Value {
    json!({
        "name": m.name,
        "versions": m.versions,
        "platform": "pytorch_torchscript",
        "inputs": m.inputs.iter().map(tensor_md).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(tensor_md).collect::<Vec<_>>(),
    })
}

async fn metadata(State(st): State<AppState>, Path(model): Path<String>) -> V2Result {
    Ok(json_ok(&metadata_json(&st.infer.metadata(&model, None)?)))
}

async fn metadata_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> V2Result {
    Ok(json_ok(&metadata_json(
        &st.infer.metadata(&model, Some(&version))?,
    )))
}

async fn model_ready(State(st): State<AppState>, Path(model): Path<String>) -> V2Result {
    model_readiness(&st, &model, None)
}

async fn model_ready_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> V2Result {
    model_readiness(&st, &model, Some(&version))
}

async fn infer(State(st): State<AppState>, Path(model): Path<String>, req: Request) -> Response {
    infer_inner(st, model, None, req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn infer_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    infer_inner(st, model, Some(version), req)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One input of a JSON request.
#[derive(Debug, Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    data: Option<Value>,
}

/// One requested output.
#[derive(Debug, Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// An inference request's JSON part.
#[derive(Debug, Deserialize)]
struct JsonRequest {
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<JsonInput>,
    outputs: Option<Vec<JsonOutput>>,
}

fn bad(msg: impl Into<String>) -> KServeError {
    KServeError(ApiError::bad_request(msg))
}

/// Splits a body into its JSON header and the binary tensor data after it.
fn split_body(headers: &HeaderMap, body: &Bytes) -> Result<(Bytes, Bytes), KServeError> {
    match headers.get("inference-header-content-length") {
        None => Ok((body.clone(), Bytes::new())),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length is not a number"))?;
            if n > body.len() {
                return Err(bad(format!(
                    "Inference-Header-Content-Length ({n}) is larger than the body ({} bytes)",
                    body.len()
                )));
            }
            if n == 0 {
                return Err(bad(
                    "a raw binary request (Inference-Header-Content-Length: 0) is not supported: \
                     send a JSON header that names the input",
                ));
            }
            Ok((body.slice(..n), body.slice(n..)))
        }
    }
}

fn param_bool(p: &Map<String, Value>, key: &str) -> Option<bool> {
    p.get(key).and_then(Value::as_bool)
}

async fn infer_inner(
    st: AppState,
    model: String,
    version: Option<String>,
    req: Request,
) -> V2Result {
    let meta = st.infer.metadata(&model, version.as_deref())?;
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, st.config.max_request_size)
        .await
        .map_err(|_| ApiError::too_large(st.config.max_request_size))?;
    let (header, mut binary) = split_body(&parts.headers, &body)?;
    let request: JsonRequest = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the inference request is not valid: {e}")))?;

    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in request.inputs {
        let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
            bad(format!(
                "input '{}': unknown datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        let data = match input.parameters.get("binary_data_size") {
            // Which of the two is the tensor would be a guess.
            Some(_) if input.data.is_some() => {
                return Err(bad(format!(
                    "input '{}' has both data and binary_data_size: send one",
                    input.name
                )));
            }
            Some(size) => {
                let n = size.as_u64().ok_or_else(|| {
                    bad(format!(
                        "input '{}': binary_data_size is not a size",
                        input.name
                    ))
                })? as usize;
                if n > binary.len() {
                    return Err(bad(format!(
                        "input '{}': binary_data_size {n} is more than the {} bytes of binary data left",
                        input.name,
                        binary.len()
                    )));
                }
                let data = binary.slice(..n);
                binary = binary.slice(n..);
                super::InputData::Binary(data)
            }
            None => match input.data {
                Some(d) => super::InputData::Json(d),
                None => return Err(bad(format!("input '{}' has no data", input.name))),
            },
        };
        inputs.push(InferInput {
            name: input.name,
            datatype,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        )));
    }
    let binary_default = param_bool(&request.parameters, "binary_data_output").unwrap_or(false);
    let outputs = match request.outputs {
        None => None,
        Some(outs) => Some(
            outs.into_iter()
                .map(|o| {
                    if o.parameters.contains_key("classification") {
                        return Err(bad(format!(
                            "output '{}': the classification extension is not supported; \
                             the image handlers answer with labels already",
                            o.name
                        )));
                    }
                    Ok(RequestedOutput {
                        binary: param_bool(&o.parameters, "binary_data").unwrap_or(binary_default),
                        name: o.name,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let done = run_infer(
        &st.infer,
        &meta,
        version.is_some(),
        inputs,
        outputs,
        binary_default,
    )
    .await?;
    write_response(&meta, request.id, done, &st.infer)
}

/// The response: JSON alone, or JSON followed by the binary outputs; held as a whole to
/// `max_response_size`.
fn write_response(
    meta: &ModelMetadata,
    id: Option<String>,
    done: Inferred,
    infer: &crate::core::Infer,
) -> V2Result {
    let mut head = String::with_capacity(256);
    head.push_str("{\"model_name\":");
    head.push_str(&Value::String(meta.name.clone()).to_string());
    head.push_str(",\"model_version\":");
    head.push_str(&Value::String(meta.version.clone()).to_string());
    if let Some(id) = id {
        head.push_str(",\"id\":");
        head.push_str(&Value::String(id).to_string());
    }
    head.push_str(",\"outputs\":[");
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    for (i, out) in done.outputs.into_iter().enumerate() {
        if i > 0 {
            head.push(',');
        }
        let InferOutput {
            name,
            datatype,
            shape,
            data,
            binary,
        } = out;
        head.push_str("{\"name\":");
        head.push_str(&Value::String(name).to_string());
        head.push_str(",\"datatype\":\"");
        head.push_str(datatype.name());
        head.push_str("\",\"shape\":");
        head.push_str(&json!(shape).to_string());
        let bytes = match (&data, binary) {
            (OutputData::Raw(b), true) => Some(b.clone()),
            (OutputData::Items(items), true) => {
                Some(tensor::join_bytes(items.iter().map(Vec::as_slice)))
            }
            _ => None,
        };
        match bytes {
            Some(b) => {
                head.push_str(",\"parameters\":{\"binary_data_size\":");
                head.push_str(&b.len().to_string());
                head.push_str("}}");
                blobs.push(b);
            }
            None => {
                head.push_str(",\"data\":");
                match data {
                    OutputData::Raw(b) => head.push_str(&tensor::decode_json(datatype, &b)),
                    OutputData::Items(items) => {
                        head.push('[');
                        for (k, item) in items.iter().enumerate() {
                            if k > 0 {
                                head.push(',');
                            }
                            head.push_str(
                                &Value::String(String::from_utf8_lossy(item).into_owned())
                                    .to_string(),
                            );
                        }
                        head.push(']');
                    }
                }
                head.push('}');
            }
        }
    }
    head.push_str("]}");
    infer.check_response_size(head.len() + blobs.iter().map(Vec::len).sum::<usize>())?;
    if blobs.is_empty() {
        return Ok((StatusCode::OK, [("content-type", "application/json")], head).into_response());
    }
    let header_len = head.len();
    let mut body = head.into_bytes();
    for b in blobs {
        body.extend_from_slice(&b);
    }
    Ok((
        StatusCode::OK,
        [
            ("content-type", "application/octet-stream".to_string()),
            ("inference-header-content-length", header_len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// `{"ready": true}` lists only models that can answer.
#[derive(Debug, Default, Deserialize)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

async fn repository_index(State(st): State<AppState>, body: Bytes) -> V2Result {
    let asked: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not valid: {e}")))?
    };
    let out: Vec<Value> = super::repository_index(&st, asked.ready)
        .into_iter()
        .map(|e| {
            let mut o = json!({"name": e.name, "state": e.state, "reason": e.reason});
            if !e.version.is_empty() {
                o["version"] = json!(e.version);
            }
            o
        })
        .collect();
    Ok(json_ok(&Value::Array(out)))
}

async fn load_route(
    State(st): State<AppState>,
    Path(model): Path<String>,
    body: Bytes,
) -> V2Result {
    // The model API is checked first, as the gRPC call checks it, whatever the body says.
    if !st.config.enable_model_api {
        return Err(ApiError::method_not_allowed().into());
    }
    let asked: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?
    };
    let named: Vec<&str> = match (asked.as_object(), asked.get("parameters")) {
        (None, _) => {
            return Err(ApiError::BadRequest(
                "the body is not a JSON object: a load takes {} or {\"parameters\": {...}}".into(),
            )
            .into());
        }
        (Some(_), None | Some(Value::Null)) => Vec::new(),
        (Some(_), Some(Value::Object(p))) => p.keys().map(String::as_str).collect(),
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest("\"parameters\" is not a JSON object".into()).into());
        }
    };
    super::load(&st, &model, &named).await?;
    Ok(json_ok(&json!({})))
}

async fn unload_route(State(st): State<AppState>, Path(model): Path<String>) -> V2Result {
    super::unload(&st, &model).await?;
    Ok(json_ok(&json!({})))
}
