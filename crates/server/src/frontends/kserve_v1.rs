//! KServe v1 (TensorFlow Serving's REST predict): `GET /v1/models/{m}` and
//! `POST /v1/models/{m}[/versions/{v}]:predict` with `{"instances": [...]}` or `{"inputs": [...]}`.
//!
//! The instances of a model of one tensor are one request of that many examples, as
//! TorchServe's kserve envelope hands them to its handler. For other models each instance is
//! one request, so instances are batched by the model's batcher like any other requests. Images travel as `{"b64": "..."}` (TF Serving) or `{"data": "..."}`
//! (TorchServe's kserve envelope, whose `data` may be text too), text as a string, tensors as
//! numbers or nested lists.

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tchserve_backend::job::{Part, Payload, Prediction};

use super::{AppState, KServeError};
use crate::core::ApiError;
use tchserve_mar::handler::Input;

/// KServe v1's routes (behind the inference key).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", any(list_models))
        .route("/v1/models/{spec}", any(model))
        .route("/v1/models/{model}/versions/{spec}", any(model_version))
}

/// `{"models": [names]}`, as KServe's model server lists what it serves.
async fn list_models(State(st): State<AppState>, method: Method) -> Response {
    if method != Method::GET {
        return KServeError::from(ApiError::method_not_allowed()).into_response();
    }
    axum::Json(json!({"models": st.registry.names()})).into_response()
}

async fn model(State(st): State<AppState>, Path(spec): Path<String>, req: Request) -> Response {
    dispatch(st, spec, None, req).await
}

async fn model_version(
    State(st): State<AppState>,
    Path((model, spec)): Path<(String, String)>,
    req: Request,
) -> Response {
    // Here the verb rides on the version: `/v1/models/m/versions/2:predict`.
    let (version, verb) = split_verb(&spec);
    let spec = match verb {
        Some(v) => format!("{model}:{v}"),
        None => model,
    };
    dispatch(st, spec, Some(version.to_string()), req).await
}

fn split_verb(spec: &str) -> (&str, Option<&str>) {
    match spec.rsplit_once(':') {
        Some((name, verb)) => (name, Some(verb)),
        None => (spec, None),
    }
}

async fn dispatch(st: AppState, spec: String, version: Option<String>, req: Request) -> Response {
    let (name, verb) = split_verb(&spec);
    let result = match (req.method().clone(), verb) {
        (Method::GET, None) => model_readiness(&st, name, version.as_deref()),
        (Method::POST, Some("predict")) => predict(&st, name, version.as_deref(), req).await,
        (Method::POST, Some("explain")) => st
            .registry
            .get(name, version.as_deref())
            .and(Err(ApiError::no_explanations()))
            .map_err(Into::into),
        _ => Err(ApiError::method_not_allowed().into()),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `{"name", "ready"}`: 200 when a worker is ready, else 503 (KServe's answer, which readiness
/// probes read). v1 and v2 answer alike.
pub fn model_readiness(
    st: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Response, KServeError> {
    let ready = st.infer.model_ready(name, version)?;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((
        status,
        [("content-type", "application/json")],
        json!({"name": name, "ready": ready}).to_string(),
    )
        .into_response())
}

async fn predict(
    st: &AppState,
    name: &str,
    version: Option<&str>,
    req: Request,
) -> Result<Response, KServeError> {
    let input = st.registry.get(name, version)?.manifest.input.clone();
    let body = axum::body::to_bytes(req.into_body(), st.config.max_request_size)
        .await
        .map_err(|_| ApiError::too_large(st.config.max_request_size))?;
    // Instances are kept as the request's own text, not parsed into values and written again:
    // the handler parses each once, as it parses a TorchServe request.
    let parsed: V1Request<'_> =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(not_v1(&body, &e)))?;
    let instances: Vec<&RawValue> = match (parsed.instances, parsed.inputs) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "the request has both \"instances\" and \"inputs\": send one of them",
            )
            .into());
        }
        (Some(i), _) => i,
        (None, Some(inputs)) => {
            // TensorFlow Serving's columnar form may name the one input: `{"inputs":
            // {"input0": [...]}}` is `{"inputs": [...]}`.
            let inputs = one_value(inputs)
                .filter(|v| !matches!(input, Input::Tensors(_)) && v.get().starts_with('['))
                .unwrap_or(inputs);
            if inputs.get().trim_start().starts_with('[') {
                serde_json::from_str(inputs.get())
                    .map_err(|e| ApiError::bad_request(format!("\"inputs\": {e}")))?
            } else {
                vec![inputs]
            }
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "expected {\"instances\": [...]} or {\"inputs\": ...}",
            )
            .into());
        }
    };
    if instances.is_empty() {
        return Err(ApiError::bad_request("\"instances\" is empty").into());
    }
    // A model of one tensor takes every instance in one request, as TorchServe's kserve
    // envelope hands them to its handler: one forward, one place in the queue, and no limit
    // from the queue's length on how many a request holds.
    if matches!(input, Input::Tensor { .. })
        && let Some(rows) = instances
            .iter()
            .map(|inst| instance_numbers(inst))
            .collect::<Option<Vec<&str>>>()
    {
        let mut one = Vec::with_capacity(body.len() + 20);
        one.extend_from_slice(b"{\"instances\":[");
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                one.push(b',');
            }
            one.extend_from_slice(row.as_bytes());
        }
        one.extend_from_slice(b"]}");
        let payload = json_payload(one.into());
        let answer = json_bodies(vec![st.infer.infer(name, version, payload).await?])?;
        let answer = answer.into_iter().next().unwrap_or_default();
        return Ok((
            StatusCode::OK,
            [("content-type", "application/json")],
            answer,
        )
            .into_response());
    }
    let unwrap_one_key = !matches!(input, Input::Tensors(_));
    let payloads = instances
        .iter()
        .enumerate()
        .map(|(i, inst)| {
            instance_payload(&body, inst, unwrap_one_key)
                .map_err(|why| ApiError::bad_request(format!("instance {i}: {why}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let answers = json_bodies(
        st.infer
            .infer_items(name, version, version.is_some(), payloads)
            .await?,
    )?;
    let mut out = Vec::with_capacity(answers.iter().map(|a| a.len() + 1).sum::<usize>() + 20);
    out.extend_from_slice(b"{\"predictions\":[");
    for (i, a) in answers.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(a);
    }
    out.extend_from_slice(b"]}");
    st.infer.check_response_size(out.len())?;
    Ok((StatusCode::OK, [("content-type", "application/json")], out).into_response())
}

/// Why a body is not a v1 request, in the protocol's terms rather than the parser's.
fn not_v1(body: &[u8], e: &serde_json::Error) -> String {
    const SHAPE: &str = "expected {\"instances\": [...]} or {\"inputs\": ...}";
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return format!("the body is not JSON: {e}");
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        // serde would read a JSON array as the request's fields in order, and say so.
        return format!("{SHAPE}: the body is JSON, but not an object");
    }
    format!("{SHAPE}: {e}")
}

/// A v1 request, its instances left as text.
#[derive(Debug, Deserialize)]
struct V1Request<'a> {
    #[serde(borrow)]
    instances: Option<Vec<&'a RawValue>>,
    #[serde(borrow)]
    inputs: Option<&'a RawValue>,
}

/// The numbers an instance of a one-tensor model holds: the instance itself when it is a number
/// or a list, or the one value of an object of one key, as TorchServe's kserve envelope writes
/// `{"data": [...]}` and TensorFlow Serving names an input (`{"input0": [...]}`). `None` for
/// anything else.
fn instance_numbers(inst: &RawValue) -> Option<&str> {
    let numbers = |text: &str| {
        matches!(text.as_bytes().first(), Some(b'[' | b'-' | b'0'..=b'9')).then_some(())
    };
    let text = inst.get();
    if text.starts_with('{') {
        let inner = one_value(inst)?.get();
        return numbers(inner).map(|()| inner);
    }
    numbers(text).map(|()| text)
}

/// The value of a JSON object of one key; `None` for anything else.
fn one_value(raw: &RawValue) -> Option<&RawValue> {
    if !raw.get().starts_with('{') {
        return None;
    }
    let fields: std::collections::BTreeMap<&str, &RawValue> =
        serde_json::from_str(raw.get()).ok()?;
    let mut values = fields.into_values();
    match (values.next(), values.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// One instance as handler input; `body` is the request the instance's text lies in. With
/// `unwrap_one_key`, for a model of one input, an object of one key other than `b64` and `data`
/// is its value, as TensorFlow Serving names an input (`{"image": {"b64": ...}}`).
fn instance_payload(
    body: &Bytes,
    inst: &RawValue,
    unwrap_one_key: bool,
) -> Result<Payload, String> {
    let b64 = |s: &str| {
        tchserve_backend::base64::decode_lenient(s).map_err(|e| format!("not valid base64: {e}"))
    };
    let text = inst.get();
    let (data, content_type): (Bytes, &str) = match text.as_bytes().first() {
        Some(b'{') => {
            let mut o: serde_json::Map<String, Value> =
                serde_json::from_str(text).map_err(|e| e.to_string())?;
            if unwrap_one_key
                && o.len() == 1
                && !o.contains_key("b64")
                && !o.contains_key("data")
                && let Some((_, value)) = std::mem::take(&mut o).into_iter().next()
            {
                o = match value {
                    Value::Object(inner) => inner,
                    Value::String(s) => [("data".to_string(), Value::String(s))]
                        .into_iter()
                        .collect(),
                    other => {
                        return Ok(json_payload(other.to_string().into()));
                    }
                };
            }
            match (o.get("b64"), o.get("data")) {
                (Some(Value::String(s)), _) if o.len() == 1 => {
                    (b64(s)?.into(), "application/octet-stream")
                }
                // TorchServe's kserve envelope hands `data` to the handler as it is: an image
                // handler reads its base64, a text handler the text itself.
                (_, Some(Value::String(s))) => (s.clone().into(), "text/plain"),
                (_, Some(other)) => (other.to_string().into(), "application/json"),
                _ => (body.slice_ref(text.as_bytes()), "application/json"),
            }
        }
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
            (s.into(), "text/plain")
        }
        _ => (body.slice_ref(text.as_bytes()), "application/json"),
    };
    Ok(Payload {
        parts: vec![Part {
            name: "body".into(),
            content_type: Some(content_type.into()),
            data,
            shape: None,
        }],
        ..Payload::default()
    })
}

/// A payload of one JSON part.
fn json_payload(data: Bytes) -> Payload {
    Payload {
        parts: vec![Part {
            name: "body".into(),
            content_type: Some("application/json".into()),
            data,
            shape: None,
        }],
        ..Payload::default()
    }
}

/// The JSON bodies of predictions that should all be JSON.
pub fn json_bodies(answers: Vec<Prediction>) -> Result<Vec<Vec<u8>>, ApiError> {
    answers
        .into_iter()
        .map(|p| match p {
            Prediction::Json(b) => Ok(b),
            Prediction::Tensor(_) | Prediction::Tensors(_) => {
                Err(ApiError::internal("unexpected tensor answer"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_in_every_form() {
        let body = |v: Value| {
            let text = Bytes::from(v.to_string());
            let raw: &RawValue = serde_json::from_slice(&text).unwrap();
            let p = instance_payload(&text, raw, true).unwrap();
            let part = &p.parts[0];
            (part.data.to_vec(), part.content_type.clone().unwrap())
        };
        assert_eq!(
            body(json!({"b64": "aGk="})),
            (b"hi".to_vec(), "application/octet-stream".into())
        );
        // `data` is the handler's to read: base64 to an image handler, text to a text one.
        assert_eq!(
            body(json!({"data": "I love it"})),
            (b"I love it".to_vec(), "text/plain".into())
        );
        assert_eq!(
            body(json!({"b64": "data:image/png;base64,aG\nk="})).0,
            b"hi",
            "a data URL, wrapped"
        );
        assert_eq!(
            body(json!({"data": [1, 2]})),
            (b"[1,2]".to_vec(), "application/json".into())
        );
        assert_eq!(body(json!([1.5, 2])).0, b"[1.5,2]");
        assert_eq!(body(json!("I love it")).0, b"I love it");
        let bad = Bytes::from(json!({"b64": "!!"}).to_string());
        let raw: &RawValue = serde_json::from_slice(&bad).unwrap();
        assert!(instance_payload(&bad, raw, true).is_err());
        // TensorFlow Serving names a model's one input.
        assert_eq!(
            body(json!({"image": {"b64": "aGk="}})),
            (b"hi".to_vec(), "application/octet-stream".into())
        );
        assert_eq!(
            body(json!({"text": "I love it"})),
            (b"I love it".to_vec(), "text/plain".into())
        );
        assert_eq!(body(json!({"input0": [1, 2]})).0, b"[1,2]");
        // A model of several named inputs takes the object whole.
        let named = Bytes::from(json!({"ids": [1, 2]}).to_string());
        let raw: &RawValue = serde_json::from_slice(&named).unwrap();
        let p = instance_payload(&named, raw, false).unwrap();
        assert_eq!(&p.parts[0].data[..], &named[..]);
    }

    #[test]
    fn the_numbers_of_an_instance() {
        let numbers = |text: &str| {
            let raw: &RawValue = serde_json::from_str(text).unwrap();
            instance_numbers(raw).map(str::to_owned)
        };
        assert_eq!(numbers("[1, 2]").as_deref(), Some("[1, 2]"));
        assert_eq!(numbers("-3").as_deref(), Some("-3"));
        assert_eq!(numbers(r#"{"data": [1]}"#).as_deref(), Some("[1]"));
        assert_eq!(numbers(r#"{"input0": [[1]]}"#).as_deref(), Some("[[1]]"));
        assert_eq!(numbers(r#"{"a": [1], "b": [2]}"#), None);
        assert_eq!(numbers(r#"{"b64": "aGk="}"#), None);
        assert_eq!(numbers(r#""text""#), None);
    }

    #[test]
    fn verbs_ride_on_the_last_segment() {
        assert_eq!(split_verb("mnist:predict"), ("mnist", Some("predict")));
        assert_eq!(split_verb("mnist"), ("mnist", None));
        assert_eq!(split_verb("2.0:predict"), ("2.0", Some("predict")));
    }
}
