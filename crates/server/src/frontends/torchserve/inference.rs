//! The inference listener: `/ping`, `/predictions/{model}[/{version}]`, API description.

use axum::Router;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use tchserve_backend::job::{Part, Payload, Prediction};

use crate::core::ApiError;
use crate::frontends::{
    AppState, inference_key, is_kserve_path, json_response, kserve_error_response, not_allowed,
    openapi, status_message, with_description_and_liveness,
};

/// TorchServe's inference routes; the listener adds the others and its middleware.
pub fn routes(state: &AppState) -> Router<AppState> {
    let mut keyed = Router::new()
        .route("/predictions/{model}", any(predict_default))
        .route("/predictions/{model}/{version}", any(predict_version))
        .route(
            "/predictions/{model}/{version}/{*extra}",
            any(predict_version_extra),
        )
        // The same prediction under the other names TorchServe answers it by: SageMaker's
        // routes and the legacy `/m/predict`.
        .route("/invocations", any(invocations))
        .route("/models/{model}/invoke", any(predict_default))
        .route("/{model}/predict", any(legacy_default))
        .route("/{model}/{version}/predict", any(legacy_version))
        .route(
            "/explanations/{model}",
            post(explain_default).fallback(not_allowed),
        )
        .route(
            "/explanations/{model}/{version}",
            post(explain_version).fallback(not_allowed),
        );
    // Without keys the check would pass every request: leaving the layer out spares each one
    // its cost. The state's keys cannot change once the routers are built.
    if state.tokens.is_some() {
        keyed = keyed.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            inference_key,
        ));
    }
    // /ping answers without a key, unlike TorchServe's: health probes (Kubernetes, load
    // balancers) cannot carry a key that changes every hour.
    with_description_and_liveness(keyed, doc).route("/ping", any(ping))
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(limit)
    } else {
        ApiError::bad_request(format!("malformed multipart body: {e}"))
    }
}

/// One model's prediction routes, which `OPTIONS` on any of them describes, as TorchServe's
/// description of a model does.
pub(crate) fn model_doc(name: &str, version: Option<&str>) -> serde_json::Value {
    let default = format!("/predictions/{name}");
    let one = version.map(|v| format!("/predictions/{name}/{v}"));
    let (v1, v2) = (
        format!("/v1/models/{name}:predict"),
        format!("/v2/models/{name}/infer"),
    );
    let mut paths: Vec<(&str, &[&str], &str)> = vec![(
        &default,
        &["POST"],
        "Prediction from the model's default version.",
    )];
    if let Some(one) = &one {
        paths.push((one, &["POST"], "Prediction from this version."));
    }
    paths.push((&v1, &["POST"], "KServe v1 prediction."));
    paths.push((&v2, &["POST"], "Open Inference Protocol v2 inference."));
    let mut described = openapi("inference", &paths);
    described["info"]["title"] = format!("tchserve inference API for model {name}").into();
    described
}

/// This API's OpenAPI description.
pub(crate) fn doc() -> serde_json::Value {
    openapi(
        "inference",
        &[
            ("/", &["OPTIONS"], "This API description."),
            (
                "/ping",
                &["GET"],
                "Health: Healthy when every model's default version has its minimum workers ready.",
            ),
            (
                "/predictions/{model_name}",
                &["POST"],
                "Prediction from the model's default version.",
            ),
            (
                "/predictions/{model_name}/{model_version}",
                &["POST"],
                "Prediction from one version.",
            ),
            (
                "/invocations",
                &["POST"],
                "Prediction from the default version of model_name (query), or of the only model.",
            ),
            (
                "/models/{model_name}/invoke",
                &["POST"],
                "Prediction from the model's default version.",
            ),
            (
                "/{model_name}/predict",
                &["POST"],
                "Prediction from the model's default version (TorchServe's legacy name).",
            ),
            (
                "/{model_name}/{model_version}/predict",
                &["POST"],
                "Prediction from one version (TorchServe's legacy name).",
            ),
            (
                "/explanations/{model_name}",
                &["POST"],
                "501: tchserve's handlers have no explain step.",
            ),
            (
                "/v1/models/{model_name}:predict",
                &["POST"],
                "KServe v1 prediction.",
            ),
            (
                "/v2/models/{model_name}/infer",
                &["POST"],
                "Open Inference Protocol v2 inference.",
            ),
            ("/api-description", &["GET"], "This API description."),
        ],
    )
}

async fn ping(State(st): State<AppState>) -> Response {
    if st.infer.server_healthy() {
        status_message(StatusCode::OK, "Healthy")
    } else {
        status_message(StatusCode::INTERNAL_SERVER_ERROR, "Unhealthy")
    }
}

async fn predict_default(
    State(st): State<AppState>,
    Path(model): Path<String>,
    req: Request,
) -> Response {
    respond(predict(st, Some(model), None, Query::Ignored, req).await)
}

async fn predict_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    respond(predict(st, Some(model), Some(version), Query::Ignored, req).await)
}

/// `/predictions/m/v/more/segments`: TorchServe hands the extra segments to its handler (its
/// `url_path` header); tchserve's handlers take no such input, so they are left out.
async fn predict_version_extra(
    State(st): State<AppState>,
    Path((model, version, _extra)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    respond(predict(st, Some(model), Some(version), Query::Ignored, req).await)
}

fn respond(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `/m/predict`. The route also catches `/v2/predict` and the like, where the router found no
/// KServe route: those are the KServe protocols' unknown paths, answered in their shape.
async fn legacy_default(
    State(st): State<AppState>,
    Path(model): Path<String>,
    req: Request,
) -> Response {
    if is_kserve_path(req.uri().path()) {
        return kserve_error_response(&ApiError::resource_not_found());
    }
    respond(predict(st, Some(model), None, Query::Inputs, req).await)
}

/// `/m/v/predict`; see [`legacy_default`].
async fn legacy_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    req: Request,
) -> Response {
    if is_kserve_path(req.uri().path()) {
        return kserve_error_response(&ApiError::resource_not_found());
    }
    respond(predict(st, Some(model), Some(version), Query::Inputs, req).await)
}

/// `/invocations`, SageMaker's route: the model is named by `model_name` in the query or in the
/// body's fields; without a name, the one model registered, if there is one.
async fn invocations(State(st): State<AppState>, req: Request) -> Response {
    respond(predict(st, None, None, Query::Inputs, req).await)
}

/// What a route makes of the query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    /// Nothing (`/predictions`).
    Ignored,
    /// Each parameter is an input field, before the body's (TorchServe's SageMaker and legacy
    /// routes: `/m/predict?data=...`).
    Inputs,
}

/// The query's parameters as input fields.
fn query_parts(req: &Request) -> Result<Vec<Part>, ApiError> {
    let Some(q) = req.uri().query() else {
        return Ok(Vec::new());
    };
    let fields = serde_urlencoded::from_str(q)
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))?;
    Ok(field_parts(fields))
}

/// Form or query fields as input parts, in order.
fn field_parts(fields: Vec<(String, String)>) -> Vec<Part> {
    fields
        .into_iter()
        .map(|(name, value)| Part {
            name,
            content_type: None,
            data: value.into_bytes().into(),
            shape: None,
        })
        .collect()
}

/// The model a request of `/invocations` names: the first non-empty `model_name` field (the
/// query's before the body's), taken out of the inputs, else the only model registered.
fn invoked_model(st: &AppState, payload: &mut Payload) -> Result<String, ApiError> {
    let named = payload
        .parts
        .iter()
        .find(|p| p.name == "model_name" && !p.data.is_empty())
        .map(|p| String::from_utf8_lossy(&p.data).into_owned());
    payload.parts.retain(|p| p.name != "model_name");
    if let Some(name) = named {
        return Ok(name);
    }
    match st.registry.names().as_slice() {
        [only] => Ok(only.clone()),
        _ => Err(ApiError::bad_request("Parameter model_name is required.")),
    }
}

async fn explain_default(State(st): State<AppState>, Path(model): Path<String>) -> ApiError {
    explain(&st, &model, None)
}

async fn explain_version(
    State(st): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiError {
    explain(&st, &model, Some(&version))
}

/// An unknown model or version is still a 404; a known one learns that there are no
/// explanations rather than that the route does not exist.
fn explain(st: &AppState, model: &str, version: Option<&str>) -> ApiError {
    match st.registry.get(model, version) {
        Ok(_) => ApiError::no_explanations(),
        Err(e) => e,
    }
}

async fn predict(
    st: AppState,
    name: Option<String>,
    version: Option<String>,
    query: Query,
    req: Request,
) -> Result<Response, ApiError> {
    let mut fields = match query {
        Query::Inputs => query_parts(&req)?,
        Query::Ignored => Vec::new(),
    };
    // An unknown model is a 404 before the body is looked at, and before its description.
    if let Some(name) = &name {
        st.registry.get(name, version.as_deref())?;
    }
    if req.method() == Method::OPTIONS {
        let described = match &name {
            Some(name) => model_doc(name, version.as_deref()),
            None => doc(),
        };
        return Ok(json_response(StatusCode::OK, &described));
    }
    let mut payload = read_payload(req, st.config.max_request_size).await?;
    if !fields.is_empty() {
        fields.append(&mut payload.parts);
        payload.parts = fields;
    }
    let name = match name {
        Some(name) => name,
        None => invoked_model(&st, &mut payload)?,
    };
    let body = match st.infer.infer(&name, version.as_deref(), payload).await? {
        Prediction::Json(body) => body,
        // Only requests that ask for tensors get them.
        Prediction::Tensor(_) | Prediction::Tensors(_) => {
            return Err(ApiError::internal("unexpected tensor answer"));
        }
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn header_str(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// The request as handler input: multipart and form fields by name, any other body as `body`.
async fn read_payload(req: Request, limit: usize) -> Result<Payload, ApiError> {
    let headers = req.headers();
    let content_type = header_str(headers, "content-type");
    // Absent is fine; present but not text is the client's mistake, not a header to ignore.
    let tensor_header = |name: &str| match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ApiError::bad_request(format!("the {name} header is not ASCII text"))),
    };
    let mut payload = Payload {
        parts: Vec::new(),
        dtype: tensor_header("X-Tensor-Dtype")?,
        shape: tensor_header("X-Tensor-Shape")?,
        want_tensor: false,
    };
    let ct = content_type.as_deref().unwrap_or("").to_ascii_lowercase();
    if ct.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad_request(format!("malformed multipart body: {e}")))?;
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| multipart_error(e, limit))?
        {
            let name = field.name().unwrap_or("body").to_string();
            let content_type = field.content_type().map(str::to_owned);
            let shape = match field.headers().get("x-tensor-shape") {
                Some(v) => Some(
                    v.to_str()
                        .map_err(|_| {
                            ApiError::bad_request(format!(
                                "the X-Tensor-Shape header of field '{name}' is not text"
                            ))
                        })?
                        .to_owned(),
                ),
                None => None,
            };
            let data = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
            payload.parts.push(Part {
                name,
                content_type,
                data,
                shape,
            });
        }
        return Ok(payload);
    }
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::too_large(limit))?;
    // `curl -d '[1, 2]'` sends JSON labelled as a form; a body that starts like JSON is JSON.
    // Likewise `curl --data-binary @photo.jpg`: a form is text, so a body that is not UTF-8 is
    // the payload itself.
    let json_like = matches!(
        body.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'[' | b'{')
    );
    // And `curl -d 'I love it'`: a "form" without a single `key=value` pair is the text itself.
    let form = ct.starts_with("application/x-www-form-urlencoded")
        && !json_like
        && body.contains(&b'=')
        && std::str::from_utf8(&body).is_ok();
    if form {
        let fields = serde_urlencoded::from_bytes(&body)
            .map_err(|e| ApiError::bad_request(format!("malformed form body: {e}")))?;
        payload.parts = field_parts(fields);
    } else {
        payload.parts.push(Part {
            name: "body".into(),
            content_type,
            data: body,
            shape: None,
        });
    }
    Ok(payload)
}
