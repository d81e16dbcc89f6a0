//! The `tensor` input decoder: JSON numbers or raw little-endian bytes to a tensor.

use serde_json::Value;
use tch::{Kind, Tensor};
use tchserve_mar::handler::DType;

use crate::job::{Part, Payload, PredictError};

/// How a request's examples are wrapped in its response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrap {
    /// One example, answered bare.
    Single,
    /// A list of examples, answered as a list.
    List,
    /// `{"instances": [...]}`, answered as `{"predictions": [...]}`.
    Predictions,
}

/// A decoded request: `examples` rows along axis 0.
#[derive(Debug)]
pub struct Decoded {
    /// `[examples, ...per-example shape]`.
    pub tensor: Tensor,
    /// Number of examples.
    pub examples: usize,
    /// How to answer.
    pub wrap: Wrap,
}

fn bad(msg: impl Into<String>) -> PredictError {
    PredictError::BadInput(msg.into())
}

/// The libtorch kind of a manifest dtype.
pub fn kind_of(d: DType) -> Kind {
    match d {
        DType::Float32 => Kind::Float,
        DType::Float64 => Kind::Double,
        DType::Float16 => Kind::Half,
        DType::Bfloat16 => Kind::BFloat16,
        DType::Int64 => Kind::Int64,
        DType::Int32 => Kind::Int,
        DType::Int16 => Kind::Int16,
        DType::Int8 => Kind::Int8,
        DType::Uint8 => Kind::Uint8,
        DType::Bool => Kind::Bool,
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    serde_json::from_value(Value::String(s.trim().to_ascii_lowercase())).ok()
}

/// The manifest spelling of a dtype.
pub fn dtype_name(d: DType) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn shape_text(shape: &[i64]) -> String {
    format!("{shape:?}")
}

/// Decodes a request for a model taking `dtype` examples of `shape` (per example; -1 = any).
pub fn decode(
    payload: &Payload,
    dtype: DType,
    shape: Option<&[i64]>,
) -> Result<Decoded, PredictError> {
    let part = payload
        .main_part()
        .ok_or_else(|| bad("the request has no body"))?;
    let decoded = if looks_like_json(part) {
        decode_json(part, dtype, shape)?
    } else {
        decode_raw(part, payload, dtype, shape)?
    };
    if let Some(expected) = shape {
        let got = &decoded.tensor.size()[1..];
        let fits = got.len() == expected.len()
            && got.iter().zip(expected).all(|(g, e)| *e == -1 || g == e);
        if !fits {
            return Err(bad(format!(
                "input shape {} does not match the model's per-example shape {}",
                shape_text(got),
                shape_text(expected)
            )));
        }
    }
    Ok(decoded)
}

fn looks_like_json(part: &Part) -> bool {
    if let Some(ct) = &part.content_type {
        if ct.contains("json") {
            return true;
        }
        if ct.contains("octet-stream") {
            return false;
        }
    }
    matches!(
        part.data.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'[' | b'{')
    )
}

fn decode_json(part: &Part, dtype: DType, shape: Option<&[i64]>) -> Result<Decoded, PredictError> {
    let value: Value = serde_json::from_slice(&part.data)
        .map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let (data, instances) = match value {
        Value::Object(mut o) => {
            if let Some(v) = o.remove("instances") {
                (v, true)
            } else if let Some(v) = o.remove("data") {
                (v, false)
            } else {
                return Err(bad(
                    "expected a JSON list, {\"data\": ...} or {\"instances\": [...]}",
                ));
            }
        }
        v => (v, false),
    };
    let mut dims = Vec::new();
    let mut flat = Vec::new();
    flatten(&data, 0, &mut dims, &mut flat)?;
    let per_example_rank = shape.map(<[i64]>::len);
    let (wrap, tensor_shape) = if instances {
        if dims.is_empty() {
            return Err(bad("\"instances\" must be a list"));
        }
        (Wrap::Predictions, dims.clone())
    } else {
        match per_example_rank {
            Some(r) if dims.len() == r + 1 => (Wrap::List, dims.clone()),
            Some(r) if dims.len() == r => (Wrap::Single, [vec![1], dims.clone()].concat()),
            Some(r) => {
                return Err(bad(format!(
                    "expected {r} dimensions per example (or {} for a list of examples), got {} ({})",
                    r + 1,
                    dims.len(),
                    shape_text(&dims)
                )));
            }
            None => (Wrap::Single, [vec![1], dims.clone()].concat()),
        }
    };
    let examples = tensor_shape[0] as usize;
    if examples == 0 {
        return Err(bad("the request holds no examples"));
    }
    let kind = kind_of(dtype);
    let is_float = matches!(
        dtype,
        DType::Float32 | DType::Float64 | DType::Float16 | DType::Bfloat16
    );
    if let Some(x) = flat.iter().find(|x| !is_float && x.fract() != 0.0) {
        return Err(bad(format!(
            "the model takes {} input; {x} is not one",
            dtype_name(dtype)
        )));
    }
    let tensor = Tensor::from_slice(&flat)
        .f_to_kind(kind)
        .and_then(|t| t.f_reshape(&tensor_shape))
        .map_err(|e| PredictError::ModelFailed(e.to_string()))?;
    Ok(Decoded {
        tensor,
        examples,
        wrap,
    })
}

/// Flattens a rectangular nested list of numbers, recording its dimensions.
fn flatten(
    v: &Value,
    depth: usize,
    dims: &mut Vec<i64>,
    out: &mut Vec<f64>,
) -> Result<(), PredictError> {
    match v {
        Value::Array(items) => {
            if dims.len() == depth {
                if !out.is_empty() {
                    return Err(bad(
                        "the nested lists are ragged: every row must have the same depth",
                    ));
                }
                dims.push(items.len() as i64);
            } else if dims.len() < depth || dims[depth] != items.len() as i64 {
                return Err(bad(
                    "the nested lists are ragged: every row must have the same length",
                ));
            }
            for item in items {
                flatten(item, depth + 1, dims, out)?;
            }
            Ok(())
        }
        Value::Number(n) if dims.len() == depth => {
            out.push(
                n.as_f64()
                    .ok_or_else(|| bad(format!("{n} is out of range")))?,
            );
            Ok(())
        }
        Value::Bool(b) if dims.len() == depth => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        Value::Number(_) | Value::Bool(_) => Err(bad(
            "the nested lists are ragged: numbers and lists at the same depth",
        )),
        other => Err(bad(format!("expected numbers, found {}", short(other)))),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 {
        format!("{}...", &s[..40])
    } else {
        s
    }
}

fn decode_raw(
    part: &Part,
    payload: &Payload,
    dtype: DType,
    shape: Option<&[i64]>,
) -> Result<Decoded, PredictError> {
    let dtype = match payload.dtype.as_deref() {
        Some(s) => {
            parse_dtype(s).ok_or_else(|| bad(format!("X-Tensor-Dtype: unknown dtype {s:?}")))?
        }
        None => dtype,
    };
    let size = dtype.size();
    if !part.data.len().is_multiple_of(size) {
        return Err(bad(format!(
            "the body has {} bytes, not a whole number of {size}-byte {} values",
            part.data.len(),
            dtype_name(dtype)
        )));
    }
    let n = (part.data.len() / size) as i64;
    let (wrap, full): (Wrap, Vec<i64>) = match payload.shape.as_deref() {
        Some(text) => {
            let dims: Vec<i64> = text
                .split(',')
                .map(|d| d.trim().parse::<i64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    bad(format!(
                        "X-Tensor-Shape: expected comma-separated sizes, got {text:?}"
                    ))
                })?;
            if dims.iter().any(|d| *d < 0) || dims.iter().product::<i64>() != n {
                return Err(bad(format!(
                    "X-Tensor-Shape {} does not hold the {n} values sent",
                    shape_text(&dims)
                )));
            }
            match shape.map(<[i64]>::len) {
                Some(r) if dims.len() == r => (Wrap::Single, [vec![1], dims].concat()),
                _ => (Wrap::List, dims),
            }
        }
        None => {
            let Some(per) = shape.filter(|s| s.iter().all(|d| *d > 0)) else {
                return Err(bad(
                    "a raw tensor body needs an X-Tensor-Shape header (the model's shape is not fixed)",
                ));
            };
            let per_n: i64 = per.iter().product();
            if n % per_n != 0 || n == 0 {
                return Err(bad(format!(
                    "{n} values are not a whole number of examples of shape {}",
                    shape_text(per)
                )));
            }
            let k = n / per_n;
            (
                (if k == 1 { Wrap::Single } else { Wrap::List }),
                [vec![k], per.to_vec()].concat(),
            )
        }
    };
    if full.first().copied().unwrap_or(0) == 0 {
        return Err(bad("the request holds no examples"));
    }
    let tensor = Tensor::f_from_data_size(&part.data, &full, kind_of(dtype))
        .map_err(|e| bad(format!("cannot read the raw tensor: {e}")))?;
    Ok(Decoded {
        examples: full[0] as usize,
        tensor,
        wrap,
    })
}
