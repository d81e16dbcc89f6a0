//! Writing results as JSON: compact, with floats in their shortest exact form.

use tch::{Kind, Tensor};
use tchserve_backend::json;

use crate::job::PredictError;

/// A tensor's values, flattened, in a form that prints without losing precision.
pub enum Values {
    /// 32-bit (or narrower) floats, printed as f32 so 0.1 stays `0.1`.
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// Integers.
    I64(Vec<i64>),
    /// Booleans.
    Bool(Vec<bool>),
}

fn failed(e: tch::TchError) -> PredictError {
    PredictError::ModelFailed(format!("reading the model output: {e}"))
}

impl Values {
    /// Copies a tensor's values to the host.
    pub fn of(t: &Tensor) -> Result<Self, PredictError> {
        let flat = t
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_flatten(0, -1))
            .map_err(failed)?;
        // tch converts to the element type while copying the flat tensor out.
        Ok(match t.kind() {
            Kind::Double => Values::F64(Vec::try_from(&flat).map_err(failed)?),
            Kind::Float
            | Kind::Half
            | Kind::BFloat16
            | Kind::Float8e5m2
            | Kind::Float8e4m3fn
            | Kind::Float8e5m2fnuz
            | Kind::Float8e4m3fnuz => Values::F32(Vec::try_from(&flat).map_err(failed)?),
            Kind::Bool => {
                let bytes: Vec<u8> = Vec::try_from(&flat).map_err(failed)?;
                Values::Bool(bytes.into_iter().map(|b| b != 0).collect())
            }
            _ => Values::I64(Vec::try_from(&flat).map_err(failed)?),
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F64(v) => v.len(),
            Values::I64(v) => v.len(),
            Values::Bool(v) => v.len(),
        }
    }

    /// Value `i` as an f64, for ranking.
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            Values::F32(v) => f64::from(v[i]),
            Values::F64(v) => v[i],
            Values::I64(v) => v[i] as f64,
            Values::Bool(v) => f64::from(u8::from(v[i])),
        }
    }

    /// Writes value `i` as a JSON number (`null` for NaN and infinities, which JSON cannot hold).
    pub fn write(&self, out: &mut String, i: usize) {
        match self {
            Values::F32(v) => json::write_f32(out, v[i]),
            Values::F64(v) => json::write_f64(out, v[i]),
            Values::I64(v) => json::write_int(out, v[i]),
            Values::Bool(v) => out.push_str(if v[i] { "true" } else { "false" }),
        }
    }
}

/// Writes `values[offset..]` shaped as `dims` as nested JSON lists.
pub fn write_nested(out: &mut String, values: &Values, dims: &[i64], offset: usize) {
    write_nested_with(out, dims, offset, &mut |out, i| values.write(out, i));
}

/// Writes nested JSON lists shaped as `dims`, each element by `leaf` from its flat index (from
/// `offset`, in row-major order).
pub fn write_nested_with<F: FnMut(&mut String, usize)>(
    out: &mut String,
    dims: &[i64],
    offset: usize,
    leaf: &mut F,
) {
    match dims.split_first() {
        None => leaf(out, offset),
        Some((&n, rest)) => {
            let stride: usize = rest.iter().map(|&d| d as usize).product();
            out.push('[');
            for i in 0..n as usize {
                if i > 0 {
                    out.push(',');
                }
                write_nested_with(out, rest, offset + i * stride, leaf);
            }
            out.push(']');
        }
    }
}

/// Writes a JSON string.
pub fn write_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
}
