//! The Open Inference Protocol v2: what its REST and gRPC frontends share. A request's inputs
//! are checked against the model's metadata here (each error names the input), turned into
//! handler payloads, and the answers into output tensors.

pub mod grpc;
pub mod rest;
pub mod tensor;

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tchserve_backend::job::{Part, Payload, Prediction};

use crate::core::registry::RegisterParams;
use crate::core::{ApiError, DataType, Infer, ModelMetadata, TensorMeta};
use crate::frontends::AppState;
use tchserve_mar::handler::DType;
use tensor::Datatype;

/// An input's elements as they arrived.
#[derive(Debug, Clone)]
pub enum InputData {
    /// JSON `data`, flat or nested.
    Json(Value),
    /// Little-endian bytes (the binary extension, or gRPC's raw contents); BYTES elements
    /// length-prefixed.
    Binary(Bytes),
}

/// One input of a request.
#[derive(Debug, Clone)]
pub struct InferInput {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its elements.
    pub data: InputData,
}

/// An output the client asked for.
#[derive(Debug, Clone)]
pub struct RequestedOutput {
    /// Its name.
    pub name: String,
    /// Whether it goes back as binary data.
    pub binary: bool,
}

/// An output's elements.
#[derive(Debug, Clone)]
pub enum OutputData {
    /// Little-endian bytes of a numeric datatype.
    Raw(Vec<u8>),
    /// BYTES elements.
    Items(Vec<Vec<u8>>),
}

/// One output of a response.
#[derive(Debug, Clone)]
pub struct InferOutput {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: Datatype,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its elements.
    pub data: OutputData,
    /// Whether it goes back as binary data.
    pub binary: bool,
}

/// A finished inference.
#[derive(Debug, Clone)]
pub struct Inferred {
    /// The outputs, in the order asked for.
    pub outputs: Vec<InferOutput>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

fn shape_text(shape: &[i64]) -> String {
    format!("{shape:?}")
}

/// The protocol's description of a model input or output.
pub fn tensor_metadata(t: &crate::core::TensorMeta) -> (String, &'static str, Vec<i64>) {
    (
        t.name.clone(),
        tensor::datatype_name(t.datatype),
        t.shape.clone(),
    )
}

/// The manifest's spelling of a dtype, as the tensor handler reads it.
fn manifest_dtype(d: tchserve_mar::handler::DType) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Checks `inputs` against the model version `meta` describes, runs that version, and returns
/// the outputs asked for. `named`: whether the client named the version, for the metrics.
pub async fn run_infer(
    infer: &Infer,
    meta: &ModelMetadata,
    named: bool,
    mut inputs: Vec<InferInput>,
    outputs: Option<Vec<RequestedOutput>>,
    binary_default: bool,
) -> Result<Inferred, ApiError> {
    let model = &meta.name;
    // The version the metadata describes, even if the default changes meanwhile.
    let version = Some(meta.version.as_str());
    let requested = requested_outputs(meta, outputs, binary_default)?;
    let output = match meta.inputs.as_slice() {
        [want] if !meta.named_inputs => {
            if inputs.len() != 1 {
                return Err(bad(format!(
                    "model '{model}' takes one input ('{}'); the request has {}",
                    want.name,
                    inputs.len()
                )));
            }
            let input = inputs.pop().expect("one input");
            run_one(infer, model, version, named, want, input).await?
        }
        wants => run_several(infer, model, version, named, wants, inputs).await?,
    };
    let mut answered = match output {
        Answer::One(datatype, shape, data) => {
            let name = meta.outputs.first().map(|o| o.name.clone());
            vec![(name.unwrap_or_default(), datatype, shape, data)]
        }
        Answer::Named(tensors) => tensors
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    Datatype::of(t.dtype),
                    t.shape,
                    OutputData::Raw(t.data),
                )
            })
            .collect(),
    };
    let mut outputs = Vec::with_capacity(requested.len());
    for r in requested {
        let at = answered
            .iter()
            .position(|(name, ..)| *name == r.name)
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "model '{model}' did not answer output '{}'",
                    r.name
                ))
            })?;
        let (name, datatype, shape, data) = answered.swap_remove(at);
        outputs.push(InferOutput {
            name,
            datatype,
            shape,
            data,
            binary: r.binary,
        });
    }
    Ok(Inferred { outputs })
}

/// What a model answered: one output, or a handler's several named tensors.
enum Answer {
    /// The one output's datatype, shape and elements.
    One(Datatype, Vec<i64>, OutputData),
    /// Each named output's tensor.
    Named(Vec<(String, tchserve_backend::job::RawTensor)>),
}

/// The outputs a request asks for, each once and known to the model; every output when it
/// names none.
fn requested_outputs(
    meta: &ModelMetadata,
    outputs: Option<Vec<RequestedOutput>>,
    binary_default: bool,
) -> Result<Vec<RequestedOutput>, ApiError> {
    let model = &meta.name;
    let list = match outputs {
        Some(list) if !list.is_empty() => list,
        _ => {
            return Ok(meta
                .outputs
                .iter()
                .map(|o| RequestedOutput {
                    name: o.name.clone(),
                    binary: binary_default,
                })
                .collect());
        }
    };
    for o in &list {
        if !meta.outputs.iter().any(|m| m.name == o.name) {
            let names: Vec<String> = meta
                .outputs
                .iter()
                .map(|m| format!("'{}'", m.name))
                .collect();
            let its = if names.len() == 1 {
                format!("its output is {}", names[0])
            } else {
                format!("its outputs are {}", names.join(", "))
            };
            return Err(bad(format!(
                "unexpected inference output '{}' for model '{model}': {its}",
                o.name
            )));
        }
        // Naming an output twice would only multiply the answer.
        let times = list.iter().filter(|other| other.name == o.name).count();
        if times > 1 {
            return Err(bad(format!(
                "output '{}' is requested {times} times",
                o.name
            )));
        }
    }
    Ok(list)
}

/// Runs a model of one input. The input may go by any name, as TorchServe takes it (KServe's
/// samples send `input-0`); errors name it as the client did.
async fn run_one(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
    named: bool,
    want: &TensorMeta,
    input: InferInput,
) -> Result<Answer, ApiError> {
    let name = &input.name;
    Ok(match want.datatype {
        DataType::Tensor(dtype) => {
            let payload = raw_payload(tensor_part("body", input, want, dtype)?, dtype, true);
            output_of(infer.infer_counted(model, version, named, payload).await?)
        }
        // An image model takes the picture's input after preprocessing as numbers too, as
        // TorchServe's vision handlers do (its KServe v2 MNIST sample sends the digit as a
        // [1, 28, 28] FP32 tensor): the handler checks their shape; a text model refuses them.
        DataType::Bytes if input.datatype == Datatype::Fp32 => {
            let name = name.clone();
            let numbers = TensorMeta {
                name: name.clone(),
                datatype: DataType::Tensor(DType::Float32),
                shape: vec![-1; input.shape.len().max(1)],
            };
            let part = tensor_part("body", input, &numbers, DType::Float32)?;
            let payload = raw_payload(part, DType::Float32, false);
            output_of(
                infer
                    .infer_counted(model, version, named, payload)
                    .await
                    .map_err(|e| e.prefixed(&format!("input '{name}': ")))?,
            )
        }
        DataType::Bytes => {
            if input.datatype != Datatype::Bytes {
                return Err(bad(format!(
                    "input '{name}': datatype {} does not match the model's BYTES (an image \
                     model also takes FP32: the picture preprocessed)",
                    input.datatype.name()
                )));
            }
            let items: Vec<Bytes> = match input.data {
                InputData::Json(data) => {
                    let mut flat = Vec::new();
                    tensor::flatten(&data, &mut flat);
                    flat.into_iter()
                        .enumerate()
                        .map(|(i, v)| match v {
                            Value::String(s) => Ok(Bytes::from(s.clone().into_bytes())),
                            other => Err(bad(format!(
                                "input '{name}': element {i} ({other}) is not a string"
                            ))),
                        })
                        .collect::<Result<_, _>>()?
                }
                InputData::Binary(b) => tensor::split_bytes(&b)
                    .map_err(|why| bad(format!("input '{name}': {why}")))?
                    .into_iter()
                    .map(|s| b.slice_ref(s))
                    .collect(),
            };
            if items.is_empty() {
                return Err(bad(format!("input '{name}' has no elements")));
            }
            let shape = bytes_shape(&input.shape, items.len()).ok_or_else(|| {
                bad(format!(
                    "input '{name}': shape {} does not hold the {} elements sent",
                    shape_text(&input.shape),
                    items.len()
                ))
            })?;
            let payloads = items
                .into_iter()
                .map(|data| Payload {
                    parts: vec![Part {
                        name: "body".into(),
                        content_type: None,
                        data,
                        shape: None,
                    }],
                    ..Payload::default()
                })
                .collect();
            let answers = infer
                .infer_items(model, version, named, payloads)
                .await
                .map_err(|e| e.prefixed(&format!("input '{name}': ")))?;
            let items = answers
                .into_iter()
                .map(|p| match p {
                    Prediction::Json(b) => Ok(b),
                    // Elements are asked for in JSON, the TorchServe route's answer.
                    Prediction::Tensor(_) | Prediction::Tensors(_) => {
                        Err(ApiError::internal("unexpected tensor answer"))
                    }
                })
                .collect::<Result<_, _>>()?;
            // One answer per element, laid out as the elements came: `[1, 1]` in, `[1, 1]` out.
            Answer::One(Datatype::Bytes, shape, OutputData::Items(items))
        }
    })
}

/// A payload of one raw tensor part, with the headers a raw body over REST carries
/// (`X-Tensor-Dtype`, `X-Tensor-Shape`); `want_tensor` asks for a tensor answer.
fn raw_payload(part: Part, dtype: DType, want_tensor: bool) -> Payload {
    Payload {
        dtype: Some(manifest_dtype(dtype)),
        shape: part.shape.clone(),
        parts: vec![part],
        want_tensor,
    }
}

/// The shape of `count` BYTES elements sent as `shape`: the shape itself when it holds them, or
/// with its one `-1` worked out, as TorchServe's own KServe v2 samples (`mnist_v2_bytes.json`)
/// send `[-1]`, a shape TorchServe never reads. `None` when it cannot hold them.
fn bytes_shape(shape: &[i64], count: usize) -> Option<Vec<i64>> {
    let count = count as i64;
    let unknown = shape.iter().filter(|d| **d < 0).count();
    // Checked: sizes whose product wraps around could claim to hold the elements sent.
    let known = shape
        .iter()
        .filter(|d| **d >= 0)
        .try_fold(1i64, |n, d| n.checked_mul(*d))?;
    match unknown {
        0 if known == count => Some(shape.to_vec()),
        1 if shape.iter().all(|d| *d >= -1) && known > 0 && count % known == 0 => Some(
            shape
                .iter()
                .map(|d| if *d == -1 { count / known } else { *d })
                .collect(),
        ),
        _ => None,
    }
}

/// Runs a model of several named inputs: the request gives each once, by its name.
async fn run_several(
    infer: &Infer,
    model: &str,
    version: Option<&str>,
    named: bool,
    wants: &[TensorMeta],
    inputs: Vec<InferInput>,
) -> Result<Answer, ApiError> {
    let names = || {
        wants
            .iter()
            .map(|w| format!("'{}'", w.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, input) in inputs.iter().enumerate() {
        if !wants.iter().any(|w| w.name == input.name) {
            return Err(bad(format!(
                "unexpected inference input '{}' for model '{model}': it takes {}",
                input.name,
                names()
            )));
        }
        if inputs[..i].iter().any(|o| o.name == input.name) {
            return Err(bad(format!("input '{}' is given twice", input.name)));
        }
    }
    let mut inputs = inputs;
    let mut parts = Vec::with_capacity(wants.len());
    for want in wants {
        let at = inputs
            .iter()
            .position(|i| i.name == want.name)
            .ok_or_else(|| {
                bad(format!(
                    "input '{}' is missing: model '{model}' takes {}",
                    want.name,
                    names()
                ))
            })?;
        let input = inputs.swap_remove(at);
        let DataType::Tensor(dtype) = want.datatype else {
            return Err(ApiError::internal(format!(
                "input '{}' of model '{model}' is not a tensor",
                want.name
            )));
        };
        parts.push(tensor_part(&want.name, input, want, dtype)?);
    }
    let payload = Payload {
        parts,
        want_tensor: true,
        ..Payload::default()
    };
    Ok(output_of(
        infer.infer_counted(model, version, named, payload).await?,
    ))
}

/// A tensor answer as the protocol's outputs; any other answer as one BYTES element.
fn output_of(prediction: Prediction) -> Answer {
    match prediction {
        Prediction::Tensor(t) => {
            Answer::One(Datatype::of(t.dtype), t.shape, OutputData::Raw(t.data))
        }
        Prediction::Tensors(tensors) => Answer::Named(tensors),
        Prediction::Json(body) => {
            Answer::One(Datatype::Bytes, vec![1], OutputData::Items(vec![body]))
        }
    }
}

/// A tensor input as the raw part `name` of a handler payload, carrying its own shape.
fn tensor_part(
    name: &str,
    input: InferInput,
    want: &TensorMeta,
    dtype: DType,
) -> Result<Part, ApiError> {
    // `X-Tensor-Shape`'s spelling.
    let shape = input
        .shape
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    Ok(Part {
        name: name.into(),
        content_type: Some("application/octet-stream".into()),
        data: tensor_bytes(input, want, dtype)?,
        shape: Some(shape),
    })
}

/// The number of elements an input's shape holds, refused when a size is negative or the
/// product is too large.
fn element_count(input: &InferInput) -> Result<usize, ApiError> {
    let name = &input.name;
    if input.shape.iter().any(|d| *d < 0) {
        return Err(bad(format!(
            "input '{name}': shape {} has a negative size",
            shape_text(&input.shape)
        )));
    }
    input
        .shape
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d as u64))
        .filter(|n| *n <= u32::MAX as u64)
        .ok_or_else(|| {
            bad(format!(
                "input '{name}': shape {} is too large",
                shape_text(&input.shape)
            ))
        })
        .map(|n| n as usize)
}

/// A tensor input's elements as the little-endian bytes the model takes, checked against the
/// model's datatype and shape.
fn tensor_bytes(input: InferInput, want: &TensorMeta, dtype: DType) -> Result<Bytes, ApiError> {
    let name = &input.name;
    let count = element_count(&input)?;
    let expected = Datatype::of(dtype);
    if input.datatype != expected {
        return Err(bad(format!(
            "input '{name}': datatype {} does not match the model's {}",
            input.datatype.name(),
            expected.name()
        )));
    }
    let model_shape = &want.shape;
    let fits = model_shape == &[-1]
        || (model_shape.len() == input.shape.len()
            && model_shape
                .iter()
                .zip(&input.shape)
                .all(|(m, g)| *m == -1 || m == g));
    if !fits || input.shape.is_empty() {
        return Err(bad(format!(
            "input '{name}': shape {} does not match the model's {}",
            shape_text(&input.shape),
            shape_text(model_shape)
        )));
    }
    let size = expected.size().unwrap_or(1);
    Ok(match input.data {
        InputData::Json(data) => {
            // Sized by what arrived, never by the shape a client claims.
            let mut flat = Vec::new();
            tensor::flatten(&data, &mut flat);
            if flat.len() != count {
                return Err(bad(format!(
                    "input '{name}': shape {} holds {count} elements but data has {}",
                    shape_text(&input.shape),
                    flat.len()
                )));
            }
            tensor::encode_json(expected, &flat)
                .map_err(|why| bad(format!("input '{name}': {why}")))?
                .into()
        }
        InputData::Binary(b) => {
            if b.len() != count * size {
                // gRPC's typed contents arrive as elements, the binary forms as bytes: both.
                let whole = if b.len() % size == 0 {
                    format!(" ({} elements)", b.len() / size)
                } else {
                    String::new()
                };
                return Err(bad(format!(
                    "input '{name}': shape {} holds {count} elements, {} bytes of {}, but {} \
                     bytes arrived{whole}",
                    shape_text(&input.shape),
                    count * size,
                    expected.name(),
                    b.len()
                )));
            }
            if expected == Datatype::Bool && b.iter().any(|v| *v > 1) {
                return Err(bad(format!(
                    "input '{name}': a BOOL element is a byte of 0 or 1"
                )));
            }
            b
        }
    })
}

/// A model's name from its archive's file name.
pub fn archive_stem(file: &str) -> &str {
    for ext in [".mar", ".tar.gz", ".tgz", ".zip"] {
        if let Some(stem) = file.strip_suffix(ext) {
            return stem;
        }
    }
    file
}

/// Registers the store's archive for `model` with one worker, unless it is registered. A load
/// that names `parameters` is refused (see [`no_load_parameters`]), once the model API is known
/// to be on.
pub async fn load(st: &AppState, model: &str, parameters: &[&str]) -> Result<(), ApiError> {
    if !st.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    no_load_parameters(parameters)?;
    if st.registry.get(model, None).is_ok() {
        return Ok(());
    }
    let store = st
        .registry
        .store()
        .ok_or_else(|| ApiError::model_not_found("Model store has not been configured."))?;
    let url = store
        .all()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .find(|n| archive_stem(n) == model)
        .ok_or_else(|| {
            ApiError::model_not_found(format!("no archive for model {model} in the model store"))
        })?;
    let p = RegisterParams {
        url,
        model_name: Some(model.to_string()),
        initial_workers: Some(1),
        synchronous: true,
        ..RegisterParams::default()
    };
    let registry = Arc::clone(&st.registry);
    let loaded = tokio::task::spawn_blocking(move || registry.register(&p))
        .await
        .map_err(|e| ApiError::internal(format!("loading failed: {e}")))?;
    match loaded {
        Ok(_) => {}
        // Another load of the same model won the race: loaded is loaded.
        Err(ApiError::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e),
    }
    st.save_snapshot().await;
    tracing::info!(model = %model, "model loaded through the repository API");
    Ok(())
}

/// Refuses a load that names parameters (Triton's `config` override, `file:` contents): a
/// model's settings come from its archive, and a load that quietly left them out would serve
/// the model otherwise than asked.
fn no_load_parameters(named: &[&str]) -> Result<(), ApiError> {
    if named.is_empty() {
        return Ok(());
    }
    Err(ApiError::BadRequest(format!(
        "load parameters are not taken (given: {}): a model's settings come from its archive's \
         model-config.yaml; to set batch size or workers, register it through the management \
         API (POST /models?url=...&batch_size=...)",
        named.join(", ")
    )))
}

/// Unregisters every version of `model`, answering what is queued first.
pub async fn unload(st: &AppState, model: &str) -> Result<(), ApiError> {
    if !st.config.enable_model_api {
        return Err(ApiError::method_not_allowed());
    }
    let removed = st.registry.unregister_all(model)?;
    st.forget_metrics(&removed);
    st.save_snapshot().await;
    for m in &removed {
        st.registry.forget_download(m);
    }
    let drain = removed
        .iter()
        .map(|m| std::time::Duration::from_secs(m.response_timeout_s))
        .max()
        .unwrap_or_default();
    crate::frontends::stop_workers(removed, drain).await;
    tracing::info!(model = %model, "model unloaded through the repository API");
    Ok(())
}

/// One entry of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Model name.
    pub name: String,
    /// Version; empty for an archive not loaded.
    pub version: String,
    /// `READY` or `UNAVAILABLE`.
    pub state: &'static str,
    /// Why it is not ready.
    pub reason: &'static str,
}

/// The repository index: every registered version, then (unless `ready_only`) the store's
/// archives that are not registered, by name.
pub fn repository_index(st: &AppState, ready_only: bool) -> Vec<IndexEntry> {
    let entries = st.registry.snapshot_entries();
    let mut out = Vec::new();
    for (name, entry) in &entries {
        for (version, m) in &entry.versions {
            let ready = m.pool.ready_count() > 0;
            if ready_only && !ready {
                continue;
            }
            out.push(IndexEntry {
                name: name.clone(),
                version: version.clone(),
                state: if ready { "READY" } else { "UNAVAILABLE" },
                reason: if ready { "" } else { "no worker is ready" },
            });
        }
    }
    // The store's other archives are offered only where they may be loaded: without the model
    // API, what the store holds is the operator's business.
    if ready_only || !st.config.enable_model_api {
        return out;
    }
    let Some(store) = st.registry.store() else {
        return out;
    };
    // An archive registered under another name (its manifest's) is not offered again.
    let registered: std::collections::HashSet<&str> = entries
        .values()
        .flat_map(|e| e.versions.values())
        .map(|m| m.url.as_str())
        .collect();
    let mut names: Vec<String> = store
        .all()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|file| !registered.contains(file.as_str()))
        .map(|file| archive_stem(&file).to_string())
        .filter(|n| !entries.contains_key(n))
        .collect();
    names.sort();
    names.dedup();
    out.extend(names.into_iter().map(|name| IndexEntry {
        name,
        version: String::new(),
        state: "UNAVAILABLE",
        reason: "unloaded",
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bytes_shape_may_leave_one_size_to_its_elements() {
        assert_eq!(bytes_shape(&[1], 1), Some(vec![1]));
        assert_eq!(bytes_shape(&[-1], 3), Some(vec![3]));
        assert_eq!(bytes_shape(&[2, -1], 6), Some(vec![2, 3]));
        assert_eq!(bytes_shape(&[2], 3), None);
        assert_eq!(bytes_shape(&[2, -1], 5), None);
        assert_eq!(bytes_shape(&[-1, -1], 4), None);
        assert_eq!(bytes_shape(&[-2], 2), None);
        assert_eq!(bytes_shape(&[0, -1], 2), None);
        assert_eq!(bytes_shape(&[1 << 62, 4, -1], 4), None);
        assert_eq!(bytes_shape(&[1 << 32, 1 << 32], 0), None);
    }
}
