//! The `tensor` input decoder: JSON numbers or raw little-endian bytes to a tensor.

use serde_json::Value;
use tch::{Kind, Tensor};
use tchserve_mar::handler::{DType, NamedTensor};

use super::json_numbers::{self, Numbers};
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
    /// `[examples, ...per-example shape]`. Declared first so it is dropped before the bytes it
    /// may borrow.
    pub tensor: Tensor,
    /// Number of examples.
    pub examples: usize,
    /// How to answer.
    pub wrap: Wrap,
    /// Answer with the output tensor itself rather than JSON, where the output is a tensor.
    pub want_tensor: bool,
    /// The request bytes `tensor` reads from, when it borrows them instead of owning a copy.
    borrowed: Option<bytes::Bytes>,
    /// A model that takes several inputs: the second and later, in the manifest's order, each
    /// holding as many examples as `tensor`.
    pub more: Vec<Decoded>,
}

impl Decoded {
    /// A decoded request that owns its tensor.
    pub fn owned(tensor: Tensor, examples: usize, wrap: Wrap) -> Self {
        Decoded {
            tensor,
            examples,
            wrap,
            want_tensor: false,
            borrowed: None,
            more: Vec::new(),
        }
    }

    /// Every input's tensor, in the handler's order.
    pub fn tensors(&self) -> Vec<&Tensor> {
        std::iter::once(&self.tensor)
            .chain(self.more.iter().map(|d| &d.tensor))
            .collect()
    }

    /// The tensor as an owned value the model may keep or modify.
    pub fn owned_tensor(&self) -> Result<Tensor, tch::TchError> {
        if self.borrowed.is_some() {
            self.tensor.f_detach_copy()
        } else {
            Ok(self.tensor.shallow_clone())
        }
    }
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

/// The manifest dtype of a libtorch kind, where there is one.
pub fn dtype_of(k: Kind) -> Option<DType> {
    Some(match k {
        Kind::Float => DType::Float32,
        Kind::Double => DType::Float64,
        Kind::Half => DType::Float16,
        Kind::BFloat16 => DType::Bfloat16,
        Kind::Int64 => DType::Int64,
        Kind::Int => DType::Int32,
        Kind::Int16 => DType::Int16,
        Kind::Int8 => DType::Int8,
        Kind::Uint8 => DType::Uint8,
        Kind::Bool => DType::Bool,
        _ => return None,
    })
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

/// A shape as error messages write it: `[3, 224, 224]`.
pub(crate) fn shape_text(shape: &[i64]) -> String {
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
    let sent = Sent {
        dtype: payload.dtype.as_deref(),
        shape: part.shape.as_deref().or(payload.shape.as_deref()),
    };
    decode_part(part, sent, dtype, shape, reading_of(part, sent))
}

/// How a part's bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// JSON numbers.
    Json,
    /// Numbers written out as text: comma-, semicolon- or space-separated, a row per line (CSV).
    Delimited,
    /// Little-endian values of the model's dtype.
    Raw,
}

/// How to read `part`: what its content type says, else what its bytes look like.
///
/// Text is never taken for raw bytes: `6.1,2.8,4.7,1.2\n` is 16 bytes, four float32 values
/// of about 1e-12 that would be answered without complaint.
fn reading_of(part: &Part, sent: Sent<'_>) -> Reading {
    let ct = part.content_type.as_deref().unwrap_or("");
    if ct.contains("json") {
        return Reading::Json;
    }
    if ct.contains("octet-stream") {
        return Reading::Raw;
    }
    if matches!(
        part.data.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'[' | b'{')
    ) {
        return Reading::Json;
    }
    // A sender that gives the bytes' shape or dtype is sending raw bytes, whatever they hold.
    if sent.shape.is_some() || sent.dtype.is_some() {
        return Reading::Raw;
    }
    let untyped = ct.is_empty() || ct.starts_with("application/x-www-form-urlencoded");
    if ct.starts_with("text/") || ct.contains("csv") || (untyped && looks_like_text(&part.data)) {
        return Reading::Delimited;
    }
    Reading::Raw
}

/// Whether `body` reads as text: printable ASCII, tabs and line breaks (after a UTF-8 byte-order
/// mark, as spreadsheets write one). Raw values of more than one byte are almost never all
/// printable; a CSV file, with its header row, `nan` or a typo, always is, and is better told
/// what is wrong with it, by line, than read as bytes.
fn looks_like_text(body: &[u8]) -> bool {
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    !body.is_empty()
        && body
            .iter()
            .all(|b| (0x20..0x7f).contains(b) || matches!(b, b'\t' | b'\r' | b'\n'))
}

/// The numbers of a delimited text body, nested as the same rows in a JSON list would be: one
/// line is a list of values, several lines a list of rows.
fn delimited_numbers(body: &[u8]) -> Result<Numbers, PredictError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        bad(
            "the body is neither JSON, nor numbers written as text (it is not UTF-8), nor raw \
             bytes (Content-Type application/octet-stream)",
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut flat = Vec::new();
    let mut rows = 0i64;
    let mut width = None;
    let mut header: Option<&str> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        // Fields are separated by commas or semicolons, and within them by spaces: `1, 2`,
        // `1;2`, `1 2` and `1,2 3` are all numbers in a row; `1,,2` misses one.
        let line = line.strip_suffix([',', ';']).unwrap_or(line);
        let fields: Vec<&str> = line
            .split([',', ';'])
            .flat_map(|f| {
                let words: Vec<&str> = f.split_ascii_whitespace().collect();
                if words.is_empty() { vec![""] } else { words }
            })
            .collect();
        // A first row of names (`sepal_length,sepal_width,...`), as pandas and spreadsheets
        // write one, is a header, not a row of values.
        if width.is_none()
            && header.is_none()
            && fields
                .iter()
                .all(|f| !f.is_empty() && f.parse::<f64>().is_err())
        {
            header = Some(line);
            continue;
        }
        let before = flat.len();
        for field in fields {
            let value = field.parse::<f64>().map_err(|_| {
                if field.is_empty() {
                    bad(format!(
                        "line {}: a value is missing between separators",
                        i + 1
                    ))
                } else {
                    bad(format!(
                        "line {}: {:?} is not a number (a text body is read as numbers \
                         separated by commas, semicolons or spaces, a row per line)",
                        i + 1,
                        short_text(field)
                    ))
                }
            })?;
            flat.push(value);
        }
        let n = (flat.len() - before) as i64;
        match width {
            None => width = Some(n),
            Some(w) if w != n => {
                return Err(bad(format!(
                    "line {} holds {n} values and the first row {w}: every row must hold as many",
                    i + 1
                )));
            }
            Some(_) => {}
        }
        rows += 1;
    }
    let Some(width) = width else {
        // A lone row of words is no header: it is input that holds no number.
        if let Some(line) = header {
            return Err(bad(format!(
                "the body holds no numbers: {:?} is not a row of numbers (a text body is read \
                 as numbers separated by commas, semicolons or spaces, a row per line)",
                short_text(line)
            )));
        }
        return Err(bad("the request holds no values"));
    };
    let dims = if rows == 1 {
        vec![width]
    } else {
        vec![rows, width]
    };
    Ok(Numbers {
        dims,
        flat,
        instances: false,
    })
}

/// At most 40 characters of `s`, for error messages.
fn short_text(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// What a raw tensor's sender says of it: its `X-Tensor-Dtype` and `X-Tensor-Shape`.
#[derive(Debug, Clone, Copy, Default)]
struct Sent<'a> {
    dtype: Option<&'a str>,
    shape: Option<&'a str>,
}

/// One part's tensor: JSON numbers, or raw bytes.
fn decode_part(
    part: &Part,
    sent: Sent<'_>,
    dtype: DType,
    shape: Option<&[i64]>,
    reading: Reading,
) -> Result<Decoded, PredictError> {
    let decoded = match reading {
        Reading::Json => {
            let numbers = match json_numbers::read(&part.data) {
                Some(n) => n,
                None => numbers_of_value(&part.data)?,
            };
            from_numbers(numbers, dtype, shape)?
        }
        Reading::Delimited => {
            let mut numbers = delimited_numbers(&part.data)?;
            // A row that holds one whole example of a fixed shape of several axes is that
            // example, as a row of a `[4]` input is: `1,2,3,4,5,6` for `[2, 3]`.
            if let Some(per) = shape.filter(|s| s.len() > 1 && s.iter().all(|d| *d > 0))
                && numbers.dims.last().copied() == checked_product(per)
            {
                let rows = &numbers.dims[..numbers.dims.len() - 1];
                numbers.dims = rows.iter().chain(per).copied().collect();
            }
            from_numbers(numbers, dtype, shape)?
        }
        Reading::Raw => decode_raw(part, sent, dtype, shape)?,
    };
    check_shape(&decoded, shape)?;
    Ok(decoded)
}

fn check_shape(decoded: &Decoded, shape: Option<&[i64]>) -> Result<(), PredictError> {
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
    Ok(())
}

/// Decodes a request for a model that takes several named tensors. A request gives each input
/// by its name, either as fields (multipart form fields, TorchServe gRPC's `input` map, a
/// typed protocol's inputs), each a part as a single input takes it, or in one JSON body:
/// `{"a": ..., "b": ...}` (one example, or a list of examples, as for a single input),
/// `{"data": {"a": ..., "b": ...}}`, `[{"a": ..., "b": ...}, ...]` or
/// `{"instances": [{"a": ..., "b": ...}, ...]}`. Every input must hold as many examples.
pub fn decode_named(payload: &Payload, inputs: &[NamedTensor]) -> Result<Decoded, PredictError> {
    let named = |e: PredictError, name: &str| match e {
        PredictError::BadInput(m) => bad(format!("input '{name}': {m}")),
        other => other,
    };
    let as_fields = payload
        .parts
        .iter()
        .any(|p| inputs.iter().any(|i| i.name == p.name));
    let mut decoded = Vec::with_capacity(inputs.len());
    if as_fields {
        for input in inputs {
            // Of several fields of one name the last counts, as for a single input.
            let part = payload
                .parts
                .iter()
                .rev()
                .find(|p| p.name == input.name)
                .ok_or_else(|| bad(missing(&input.name, inputs)))?;
            let sent = Sent {
                dtype: None,
                shape: part.shape.as_deref(),
            };
            // A field is numbers (`-F dense=0.25`, a query's `?dense=0.25`, `-F 'ids=1,2,3'`)
            // unless it says it is raw bytes or carries its shape, or looks like neither JSON
            // nor numbers written out (a file field sent without a type).
            let reading = match reading_of(part, sent) {
                Reading::Raw | Reading::Delimited
                    if part.shape.is_none()
                        && !part
                            .content_type
                            .as_deref()
                            .is_some_and(|c| c.contains("octet-stream"))
                        && serde_json::from_slice::<serde::de::IgnoredAny>(&part.data).is_ok() =>
                {
                    Reading::Json
                }
                r => r,
            };
            let d = decode_part(part, sent, input.dtype, input.shape.as_deref(), reading)
                .map_err(|e| named(e, &input.name))?;
            decoded.push(d);
        }
    } else {
        let part = payload
            .main_part()
            .ok_or_else(|| bad("the request has no body"))?;
        let value: Value = serde_json::from_slice(&part.data).map_err(|e| {
            // A body that starts as JSON but is broken is told so; any other, what to send.
            let starts_as_json = matches!(
                part.data.iter().find(|b| !b.is_ascii_whitespace()),
                Some(b'[' | b'{')
            );
            if starts_as_json {
                return bad(format!("the body is not valid JSON: {e}"));
            }
            bad(format!(
                "the model takes named inputs ({}): send them as a JSON object of the names, or \
                 as form fields ({e})",
                names(inputs)
            ))
        })?;
        let (by_name, examples) = split_named(value, inputs)?;
        for (input, value) in inputs.iter().zip(by_name) {
            let mut n = Numbers {
                instances: examples.is_some(),
                ..Numbers::default()
            };
            flatten(&value, 0, &mut n.dims, &mut n.flat).map_err(|e| named(e, &input.name))?;
            let shape = input.shape.as_deref();
            let mut d = from_numbers(n, input.dtype, shape)
                .and_then(|d| check_shape(&d, shape).map(|()| d))
                .map_err(|e| named(e, &input.name))?;
            if let Some(wrap) = examples {
                d.wrap = wrap;
            }
            decoded.push(d);
        }
    }
    // One example is answered bare only when every input gave it bare.
    let wrap = decoded
        .iter()
        .map(|d| d.wrap)
        .find(|w| *w != Wrap::Single)
        .unwrap_or(Wrap::Single);
    let mut decoded = decoded.into_iter();
    let mut first = decoded
        .next()
        .ok_or_else(|| bad("the model takes no input"))?;
    first.wrap = wrap;
    for (d, input) in decoded.zip(&inputs[1..]) {
        if d.examples != first.examples {
            return Err(bad(format!(
                "input '{}' holds {} example(s) and input '{}' {}: each input needs one row \
                 per example",
                input.name, d.examples, inputs[0].name, first.examples
            )));
        }
        first.more.push(d);
    }
    Ok(first)
}

fn names(inputs: &[NamedTensor]) -> String {
    inputs
        .iter()
        .map(|i| format!("'{}'", i.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn missing(name: &str, inputs: &[NamedTensor]) -> String {
    format!(
        "input '{name}' is missing: the model takes {}",
        names(inputs)
    )
}

/// Each input's value from a JSON body, in `inputs`' order, and how the request's examples are
/// wrapped when the body lists them one object each (`None`: each value holds one example or a
/// list of them, as a single input's body does).
fn split_named(
    value: Value,
    inputs: &[NamedTensor],
) -> Result<(Vec<Value>, Option<Wrap>), PredictError> {
    let expected = || {
        bad(format!(
            "the model takes named inputs ({}): expected {{\"{}\": ..., ...}}, a list of such \
             objects, or {{\"instances\": [...]}} of them",
            names(inputs),
            inputs[0].name
        ))
    };
    let (rows, wrap) = match value {
        Value::Object(mut o) => match (o.remove("instances"), o.remove("data")) {
            (Some(Value::Array(rows)), _) => (rows, Wrap::Predictions),
            (Some(_), _) => return Err(bad("\"instances\" must be a list")),
            (None, Some(Value::Object(inner))) => return by_key(inner, inputs),
            (None, Some(Value::Array(rows))) => (rows, Wrap::List),
            (None, Some(_)) => return Err(expected()),
            (None, None) => return by_key(o, inputs),
        },
        Value::Array(rows) => (rows, Wrap::List),
        _ => return Err(expected()),
    };
    if rows.is_empty() {
        return Err(bad("the request holds no examples"));
    }
    let mut columns: Vec<Vec<Value>> = vec![Vec::with_capacity(rows.len()); inputs.len()];
    for (r, row) in rows.into_iter().enumerate() {
        let Value::Object(mut row) = row else {
            return Err(bad(format!(
                "example {r} is not an object of the inputs ({})",
                names(inputs)
            )));
        };
        for (input, column) in inputs.iter().zip(&mut columns) {
            let v = row
                .remove(&input.name)
                .ok_or_else(|| bad(format!("example {r}: {}", missing(&input.name, inputs))))?;
            column.push(v);
        }
    }
    Ok((columns.into_iter().map(Value::Array).collect(), Some(wrap)))
}

fn by_key(
    mut object: serde_json::Map<String, Value>,
    inputs: &[NamedTensor],
) -> Result<(Vec<Value>, Option<Wrap>), PredictError> {
    let values = inputs
        .iter()
        .map(|i| {
            object
                .remove(&i.name)
                .ok_or_else(|| bad(missing(&i.name, inputs)))
        })
        .collect::<Result<_, _>>()?;
    Ok((values, None))
}

/// The number of elements of `dims`, if it fits in an `i64`.
fn checked_product(dims: &[i64]) -> Option<i64> {
    dims.iter().try_fold(1i64, |acc, d| acc.checked_mul(*d))
}

/// A tensor of the numbers read from a JSON body.
fn from_numbers(
    numbers: Numbers,
    dtype: DType,
    shape: Option<&[i64]>,
) -> Result<Decoded, PredictError> {
    let Numbers {
        dims,
        flat,
        instances,
    } = numbers;
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
    if !is_float && let Some(x) = flat.iter().find(|x| x.fract() != 0.0) {
        return Err(bad(format!(
            "the model takes {} input; {x} is not one",
            dtype_name(dtype)
        )));
    }
    // A whole number outside the dtype would be wrapped or saturated by the conversion below
    // (300 as uint8 is 44): the client gets no error and a wrong answer.
    if let Some((lo, hi)) = integer_range(dtype)
        && let Some(x) = flat.iter().find(|&&x| x < lo || x > hi)
    {
        let beyond = if dtype == DType::Int64 {
            " (JSON numbers carry int64 exactly up to 2^53 - 1; send larger ones as a raw tensor)"
        } else {
            ""
        };
        return Err(bad(format!(
            "the model takes {} input; {x} is out of its range, {lo} to {hi}{beyond}",
            dtype_name(dtype)
        )));
    }
    // The tensor below is written from the numbers read, element for element, so the shape
    // must hold exactly that many.
    if checked_product(&tensor_shape) != Some(flat.len() as i64) {
        return Err(PredictError::ModelFailed(format!(
            "{} numbers read for shape {}",
            flat.len(),
            shape_text(&tensor_shape)
        )));
    }
    // float32 and float64 bodies are written straight into their tensor: converting them
    // through a float64 tensor took three libtorch calls, and `from_data_size` two more copies
    // (it zero-fills the tensor, then copies a buffer into it).
    let tensor = match dtype {
        DType::Float32 => filled(&tensor_shape, kind, &flat, |x| x as f32),
        DType::Float64 => filled(&tensor_shape, kind, &flat, |x| x),
        _ => Tensor::from_slice(&flat)
            .f_to_kind(kind)
            .and_then(|t| t.f_reshape(&tensor_shape)),
    }
    .map_err(|e| PredictError::ModelFailed(e.to_string()))?;
    Ok(Decoded::owned(tensor, examples, wrap))
}

/// The whole numbers an integer (or bool) dtype holds that a JSON number read as `f64` carries
/// exactly; `None` for floating-point dtypes.
fn integer_range(dtype: DType) -> Option<(f64, f64)> {
    // Past 2^53 an f64 no longer holds every integer, so a larger int64 would arrive rounded.
    const EXACT: f64 = 9_007_199_254_740_991.0;
    Some(match dtype {
        DType::Float32 | DType::Float64 | DType::Float16 | DType::Bfloat16 => return None,
        DType::Int64 => (-EXACT, EXACT),
        DType::Int32 => (i32::MIN.into(), i32::MAX.into()),
        DType::Int16 => (i16::MIN.into(), i16::MAX.into()),
        DType::Int8 => (i8::MIN.into(), i8::MAX.into()),
        DType::Uint8 => (0.0, u8::MAX.into()),
        DType::Bool => (0.0, 1.0),
    })
}

/// A new CPU tensor of `shape` and `kind` holding `values` converted by `convert`, written in
/// place. The caller has checked that `shape` holds `values.len()` elements.
fn filled<T: Copy>(
    shape: &[i64],
    kind: Kind,
    values: &[f64],
    convert: impl Fn(f64) -> T,
) -> Result<Tensor, tch::TchError> {
    let tensor = Tensor::f_empty(shape, (kind, tch::Device::Cpu))?;
    assert_eq!(tensor.numel(), values.len(), "shape and values disagree");
    assert_eq!(kind.elt_size_in_bytes(), std::mem::size_of::<T>());
    if values.is_empty() {
        return Ok(tensor);
    }
    // SAFETY: `empty` gives a fresh, contiguous tensor that nothing else references, of exactly
    // `values.len()` elements of `T`'s size (both asserted above), so its storage is a valid,
    // aligned, exclusive `[T]` of that length while `tensor` lives.
    let out =
        unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr().cast::<T>(), values.len()) };
    for (o, &x) in out.iter_mut().zip(values) {
        *o = convert(x);
    }
    Ok(tensor)
}

/// Panics when [`json_numbers::read`] accepts `body` but reads it otherwise than the general
/// reading: the fuzz target's check of the fast path.
pub fn check_json_reading(body: &[u8]) {
    if let Some(fast) = json_numbers::read(body) {
        match numbers_of_value(body) {
            Ok(general) => assert_eq!(fast, general, "the two readings of a JSON body differ"),
            Err(e) => panic!("the fast reading accepts a body the general one refuses: {e}"),
        }
    }
}

/// The numbers of a JSON body through a `Value` tree: the general reading, which explains what
/// is wrong with a body [`json_numbers::read`] declines.
fn numbers_of_value(body: &[u8]) -> Result<Numbers, PredictError> {
    let value: Value = serde_json::from_slice(body)
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
    let mut n = Numbers {
        instances,
        ..Numbers::default()
    };
    flatten(&data, 0, &mut n.dims, &mut n.flat)?;
    Ok(n)
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

/// The start of a value's JSON text, for error messages: at most 40 characters (not bytes, so
/// a multi-byte character is never cut).
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(40) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

fn decode_raw(
    part: &Part,
    sent: Sent<'_>,
    dtype: DType,
    shape: Option<&[i64]>,
) -> Result<Decoded, PredictError> {
    // The header names the bytes' type for the client's sake; the model takes one dtype, and
    // feeding it another fails inside the model, so a mismatch is the client's error.
    if let Some(s) = sent.dtype {
        let sent =
            parse_dtype(s).ok_or_else(|| bad(format!("X-Tensor-Dtype: unknown dtype {s:?}")))?;
        if sent != dtype {
            return Err(bad(format!(
                "X-Tensor-Dtype {} does not match the model's input dtype {}",
                dtype_name(sent),
                dtype_name(dtype)
            )));
        }
    }
    let size = dtype.size();
    if !part.data.len().is_multiple_of(size) {
        return Err(bad(format!(
            "the body has {} bytes, not a whole number of {size}-byte {} values",
            part.data.len(),
            dtype_name(dtype)
        )));
    }
    let n = (part.data.len() / size) as i64;
    if n == 0 {
        return Err(bad("the request holds no values"));
    }
    let (wrap, full): (Wrap, Vec<i64>) = match sent.shape {
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
            // Checked: a product that wraps around to `n` would make the tensor claim far more
            // memory than the body holds.
            if dims.iter().any(|d| *d < 0) || checked_product(&dims) != Some(n) {
                return Err(bad(format!(
                    "X-Tensor-Shape {} does not hold the {n} values sent",
                    shape_text(&dims)
                )));
            }
            match shape.map(<[i64]>::len) {
                Some(r) if dims.len() == r => (Wrap::Single, [vec![1], dims].concat()),
                Some(r) if dims.len() != r + 1 => {
                    return Err(bad(format!(
                        "expected {r} dimensions per example (or {} for a list of examples), \
                         got {} ({})",
                        r + 1,
                        dims.len(),
                        shape_text(&dims)
                    )));
                }
                _ => (Wrap::List, dims),
            }
        }
        None => {
            let Some(per) = shape.filter(|s| s.iter().all(|d| *d > 0)) else {
                return Err(bad(
                    if part
                        .content_type
                        .as_deref()
                        .is_some_and(|c| c.contains("octet-stream"))
                    {
                        "a raw tensor body needs an X-Tensor-Shape header (the model's shape is not fixed)"
                    } else {
                        "the body is neither JSON (a list, {\"data\": ...} or {\"instances\": [...]}) nor a \
                     raw tensor (Content-Type application/octet-stream with an X-Tensor-Shape header)"
                    },
                ));
            };
            let Some(per_n) = checked_product(per) else {
                return Err(bad(format!(
                    "the model's per-example shape {} is too large",
                    shape_text(per)
                )));
            };
            if n % per_n != 0 {
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
    let kind = kind_of(dtype);
    let aligned = (part.data.as_ptr() as usize).is_multiple_of(size);
    let (tensor, borrowed) = if aligned {
        let mut strides = vec![1i64; full.len()];
        for i in (0..full.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * full[i + 1];
        }
        // SAFETY: the pointer is aligned for the dtype and covers exactly the product of `full`
        // elements (checked above); `borrowed` keeps the bytes alive at least as long as the
        // tensor (field order), and the tensor is only read (batching copies it, and a lone
        // request is copied by `owned_tensor`).
        let t = unsafe {
            Tensor::f_from_blob(part.data.as_ptr(), &full, &strides, kind, tch::Device::Cpu)
        };
        (t, Some(part.data.clone()))
    } else {
        (Tensor::f_from_data_size(&part.data, &full, kind), None)
    };
    let tensor = tensor.map_err(|e| bad(format!("cannot read the raw tensor: {e}")))?;
    Ok(Decoded {
        examples: full[0] as usize,
        tensor,
        wrap,
        want_tensor: false,
        borrowed,
        more: Vec::new(),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn raw_payload(data: bytes::Bytes, shape: Option<&str>) -> Payload {
        Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: Some("application/octet-stream".into()),
                data,
                shape: None,
            }],
            dtype: None,
            shape: shape.map(str::to_owned),
            ..Payload::default()
        }
    }

    #[test]
    fn the_fast_json_reading_agrees_with_the_general_one() {
        let bodies = [
            &b"[0.5, 1e-3, -2, 9999999999999999999, -9223372036854775809, 1e22, true]"[..],
            b"[[1, 2, 3], [4, 5, 6]]",
            b"{\"data\": [[[1], [2]], [[3], [4]]]}",
            b"{\"instances\": [[1, 2]], \"data\": [[3]]}",
            b"{\"data\": 3.25}",
            b"[-0, -0.0, 0.000000000000000001, 123456789.0987654321]",
            b"[[], []]",
            b"[]",
            b"{\"instances\": []}",
        ];
        for body in bodies {
            assert!(json_numbers::read(body).is_some(), "{body:?}");
            check_json_reading(body);
        }
        // Numbers of every length and exponent, in lists of a few shapes: whatever the fast
        // reading takes must come out as the general reading's, bit for bit.
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut taken = 0;
        for _ in 0..3000 {
            let mut body = String::from("[");
            for i in 0..8 {
                if i > 0 {
                    body.push_str(", ");
                }
                if next(2) == 0 {
                    body.push('-');
                }
                // Mostly short numbers, now and then one too long for the fast reading.
                let long = next(16) == 0;
                let int_digits = 1 + next(if long { 21 } else { 6 });
                body.push(char::from(b'1' + next(9) as u8));
                for _ in 1..int_digits {
                    body.push(char::from(b'0' + next(10) as u8));
                }
                if next(2) == 0 {
                    body.push('.');
                    for _ in 0..1 + next(if long { 20 } else { 9 }) {
                        body.push(char::from(b'0' + next(10) as u8));
                    }
                }
                if next(3) == 0 {
                    body.push_str(["e", "E-", "e+"][next(3) as usize]);
                    body.push_str(&next(if long { 400 } else { 12 }).to_string());
                }
            }
            body.push(']');
            taken += usize::from(json_numbers::read(body.as_bytes()).is_some());
            check_json_reading(body.as_bytes());
        }
        // Most of them are short enough for the fast reading.
        assert!(
            taken > 300,
            "the fast reading took only {taken} of 3000 bodies"
        );
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap()
    }

    fn two_inputs() -> Vec<NamedTensor> {
        vec![
            NamedTensor {
                name: "ids".into(),
                dtype: DType::Int64,
                shape: Some(vec![3]),
            },
            NamedTensor {
                name: "dense".into(),
                dtype: DType::Float32,
                shape: Some(vec![2]),
            },
        ]
    }

    /// A request of one JSON part holding `text`.
    pub(in crate::handler) fn body(text: &str) -> Payload {
        Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: Some("application/json".into()),
                data: bytes::Bytes::copy_from_slice(text.as_bytes()),
                shape: None,
            }],
            ..Payload::default()
        }
    }

    fn ids(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(&t.flatten(0, -1)).unwrap()
    }

    #[test]
    fn several_inputs_from_every_body_form() {
        let inputs = two_inputs();
        for (text, examples, wrap) in [
            (
                r#"{"ids": [1, 2, 3], "dense": [0.5, 0.25]}"#,
                1,
                Wrap::Single,
            ),
            (
                r#"{"data": {"dense": [0.5, 0.25], "ids": [1, 2, 3]}}"#,
                1,
                Wrap::Single,
            ),
            (
                r#"{"ids": [[1, 2, 3]], "dense": [[0.5, 0.25]]}"#,
                1,
                Wrap::List,
            ),
            (
                r#"[{"ids": [1, 2, 3], "dense": [0.5, 0.25]}]"#,
                1,
                Wrap::List,
            ),
            (
                r#"{"instances": [{"ids": [1, 2, 3], "dense": [0.5, 0.25]},
                                  {"ids": [4, 5, 6], "dense": [1, 2], "other": 1}]}"#,
                2,
                Wrap::Predictions,
            ),
        ] {
            let d = decode_named(&body(text), &inputs).unwrap();
            assert_eq!((d.examples, d.wrap), (examples, wrap), "{text}");
            assert_eq!(d.tensor.size(), [examples as i64, 3], "{text}");
            assert_eq!(d.tensor.kind(), Kind::Int64, "{text}");
            assert_eq!(&ids(&d.tensor)[..3], [1, 2, 3], "{text}");
            assert_eq!(d.more.len(), 1);
            assert_eq!(d.more[0].tensor.size(), [examples as i64, 2], "{text}");
            assert_eq!(d.more[0].tensor.kind(), Kind::Float, "{text}");
            assert_eq!(&values(&d.more[0].tensor)[..2], [0.5, 0.25], "{text}");
        }
    }

    #[test]
    fn several_inputs_as_fields_json_or_raw() {
        let inputs = two_inputs();
        let raw: Vec<u8> = [0.5f32, 0.25, 1.0, 2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let payload = Payload {
            parts: vec![
                Part {
                    name: "dense".into(),
                    content_type: Some("application/octet-stream".into()),
                    data: raw.into(),
                    shape: Some("2,2".into()),
                },
                Part {
                    name: "ids".into(),
                    content_type: None,
                    data: bytes::Bytes::from_static(b"[[1, 2, 3], [4, 5, 6]]"),
                    shape: None,
                },
                Part {
                    name: "unrelated_query_field".into(),
                    content_type: None,
                    data: bytes::Bytes::from_static(b"x"),
                    shape: None,
                },
            ],
            // The request's own header speaks of its body, not of the fields.
            shape: Some("9".into()),
            ..Payload::default()
        };
        let d = decode_named(&payload, &inputs).unwrap();
        assert_eq!((d.examples, d.wrap), (2, Wrap::List));
        assert_eq!(ids(&d.tensor), [1, 2, 3, 4, 5, 6]);
        assert_eq!(values(&d.more[0].tensor), [0.5, 0.25, 1.0, 2.0]);
        // A file field sent without a type (as Python's requests sends `files=`) is raw bytes
        // when it is not JSON.
        let mut untyped = payload.clone();
        untyped.parts[0].content_type = None;
        untyped.parts[0].shape = None;
        let d = decode_named(&untyped, &inputs).unwrap();
        assert_eq!(values(&d.more[0].tensor), [0.5, 0.25, 1.0, 2.0]);
        // A text field is numbers written out, even a bare one, as `curl -F scale=0.25` sends.
        let scaled = [
            NamedTensor {
                name: "scale".into(),
                dtype: DType::Float32,
                shape: Some(vec![]),
            },
            NamedTensor {
                name: "flag".into(),
                dtype: DType::Uint8,
                shape: Some(vec![]),
            },
        ];
        let field = |name: &str, text: &'static str| Part {
            name: name.into(),
            content_type: None,
            data: bytes::Bytes::from_static(text.as_bytes()),
            shape: None,
        };
        let payload = Payload {
            parts: vec![field("scale", "0.25"), field("flag", "1")],
            ..Payload::default()
        };
        let d = decode_named(&payload, &scaled).unwrap();
        assert_eq!((d.examples, d.wrap), (1, Wrap::Single));
        assert_eq!(values(&d.tensor), [0.25]);
        assert_eq!(Vec::<u8>::try_from(&d.more[0].tensor).unwrap(), [1]);
    }

    #[test]
    fn several_inputs_refuse_what_does_not_fit_naming_the_input() {
        let inputs = two_inputs();
        for (text, says) in [
            (
                r#"{"ids": [1, 2, 3]}"#,
                "input 'dense' is missing: the model takes 'ids', 'dense'",
            ),
            (
                r#"{"ids": [1, 2, 3], "dense": [0.5, 0.25, 1]}"#,
                "input 'dense': input shape [3] does not match the model's per-example shape [2]",
            ),
            (
                r#"{"ids": [1.5, 2, 3], "dense": [0.5, 0.25]}"#,
                "input 'ids': the model takes int64 input; 1.5 is not one",
            ),
            (
                r#"{"ids": [[1, 2, 3], [4, 5, 6]], "dense": [0.5, 0.25]}"#,
                "input 'dense' holds 1 example(s) and input 'ids' 2",
            ),
            (
                r#"{"instances": [{"ids": [1, 2, 3], "dense": [0.5, 0.25]}, {"ids": [1, 2, 3]}]}"#,
                "example 1: input 'dense' is missing",
            ),
            (
                r#"{"instances": [[1, 2, 3]]}"#,
                "example 0 is not an object of the inputs",
            ),
            (r#"{"instances": []}"#, "holds no examples"),
            ("[1, 2, 3]", "example 0 is not an object"),
            ("7", "expected {\"ids\": ..., ...}"),
            (
                "not json",
                "the model takes named inputs ('ids', 'dense'): send them",
            ),
            (
                r#"{"ids": [1, 2, 3], "dense": [0.5,"#,
                "the body is not valid JSON: EOF",
            ),
            (
                r#"{"ids": "abc", "dense": [0.5, 0.25]}"#,
                "input 'ids': expected numbers",
            ),
        ] {
            let e = decode_named(&body(text), &inputs).expect_err(text);
            assert!(matches!(e, PredictError::BadInput(_)), "{text}: {e:?}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
        let fields = Payload {
            parts: vec![Part {
                name: "ids".into(),
                content_type: None,
                data: bytes::Bytes::from_static(b"[1, 2, 3]"),
                shape: None,
            }],
            ..Payload::default()
        };
        let e = decode_named(&fields, &inputs).expect_err("a field missing");
        assert!(e.to_string().contains("input 'dense' is missing"), "{e}");
    }

    /// Found by the tensor_input fuzz target: an X-Tensor-Shape whose product overflows.
    /// 7 x 7905747460161236407 wraps around to 1, which once matched a one-value body and
    /// described a tensor of 5.5e19 elements over 4 bytes.
    #[test]
    fn shapes_whose_size_overflows_are_refused() {
        let one = bytes::Bytes::copy_from_slice(&1.5f32.to_le_bytes());
        for shape in [
            "7,7905747460161236407",
            "4611686018427387904,4,1",
            "444,88,4,44,88,4,448",
        ] {
            let e = decode(&raw_payload(one.clone(), Some(shape)), DType::Float32, None)
                .expect_err(shape);
            assert!(e.to_string().contains("does not hold"), "{shape}: {e}");
        }
        let e = decode(
            &raw_payload(bytes::Bytes::new(), Some("444,88,4,44,88,4,448,4")),
            DType::Int64,
            None,
        )
        .expect_err("empty");
        assert!(e.to_string().contains("no values"), "{e}");
    }

    #[test]
    fn raw_bytes_decode_aligned_or_not() {
        let floats = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0];
        let mut bytes: Vec<u8> = vec![0];
        bytes.extend(floats.iter().flat_map(|f| f.to_le_bytes()));
        let all = bytes::Bytes::from(bytes);
        // A view one byte into a fresh allocation is misaligned (copied); a copy is aligned
        // (borrowed). Both must decode the same.
        let unaligned = all.slice(1..);
        let aligned = bytes::Bytes::copy_from_slice(&unaligned);
        assert!(!(unaligned.as_ptr() as usize).is_multiple_of(4));
        assert!((aligned.as_ptr() as usize).is_multiple_of(4));
        for data in [unaligned, aligned] {
            let d = decode(
                &raw_payload(data.clone(), Some("2,3")),
                DType::Float32,
                Some(&[3]),
            )
            .unwrap();
            assert_eq!((d.tensor.size(), d.wrap), (vec![2, 3], Wrap::List));
            assert_eq!(values(&d.tensor), floats);
            assert_eq!(values(&d.owned_tensor().unwrap()), floats);
            let d = decode(&raw_payload(data, None), DType::Float32, Some(&[6])).unwrap();
            assert_eq!(d.wrap, Wrap::Single);
            assert_eq!(values(&d.tensor), floats);
        }
    }

    #[test]
    fn json_forms_and_errors() {
        let p = |body: &str| Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: Some("application/json".into()),
                data: body.to_owned().into(),
                shape: None,
            }],
            ..Payload::default()
        };
        let d = decode(&p("[1, 2]"), DType::Int64, Some(&[2])).unwrap();
        assert_eq!(
            (d.examples, d.wrap, d.tensor.kind()),
            (1, Wrap::Single, Kind::Int64)
        );
        let d = decode(
            &p("{\"instances\": [[1, 2], [3, 4], [5, 6]]}"),
            DType::Float32,
            Some(&[-1]),
        )
        .unwrap();
        assert_eq!((d.examples, d.wrap), (3, Wrap::Predictions));
        let e = decode(&p("[1.5, 2]"), DType::Int64, Some(&[2])).unwrap_err();
        assert_eq!(
            e,
            PredictError::BadInput("the model takes int64 input; 1.5 is not one".into())
        );
        // Whole numbers outside the dtype are refused, not wrapped or saturated; its bounds pass.
        for (dtype, body, value) in [
            (DType::Uint8, "[3, 300]", "300"),
            (DType::Uint8, "[-1, 2]", "-1"),
            (DType::Uint8, "[1e10, 2]", "10000000000"),
            (DType::Bool, "[2, 0]", "2"),
            (DType::Int8, "[-129, 0]", "-129"),
            (DType::Int32, "[2147483648, 0]", "2147483648"),
            (DType::Int64, "[1e30, 0]", "1000000000000000000000000000000"),
            (DType::Int64, "[9007199254740993, 0]", "9007199254740992"),
        ] {
            let e = decode(&p(body), dtype, Some(&[2])).unwrap_err().to_string();
            let want = format!(
                "the model takes {} input; {value} is out of its range",
                dtype_name(dtype)
            );
            assert!(e.starts_with(&want), "{body} as {dtype:?}: {e}");
        }
        for (dtype, body, kind, ends) in [
            (DType::Uint8, "[0, 255]", Kind::Uint8, [0, 255]),
            (DType::Int8, "[-128, 127]", Kind::Int8, [-128, 127]),
            (DType::Bool, "[true, 0]", Kind::Bool, [1, 0]),
            (
                DType::Int64,
                "[-9007199254740991, 9007199254740991]",
                Kind::Int64,
                [-9007199254740991, 9007199254740991],
            ),
        ] {
            let d = decode(&p(body), dtype, Some(&[2])).unwrap();
            let t = d.tensor.to_kind(Kind::Int64);
            assert_eq!(d.tensor.kind(), kind);
            assert_eq!(
                Vec::<i64>::try_from(t.flatten(0, -1)).unwrap(),
                ends.to_vec(),
                "{body}"
            );
        }
        let e = decode(&p("[[1, 2, 3]]"), DType::Float32, Some(&[2])).unwrap_err();
        assert!(
            e.to_string().contains("input shape [3] does not match"),
            "{e}"
        );
    }

    #[test]
    fn text_bodies_are_numbers_not_raw_bytes() {
        let p = |body: &'static str, ct: Option<&str>| Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: ct.map(str::to_owned),
                data: bytes::Bytes::from_static(body.as_bytes()),
                shape: None,
            }],
            ..Payload::default()
        };
        // 16 bytes, as many as four float32 values: read as the numbers they spell.
        for ct in [
            None,
            Some("text/plain"),
            Some("text/csv"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let d = decode(&p("6.1,2.8,4.7,1.2\n", ct), DType::Float32, Some(&[4])).unwrap();
            assert_eq!((d.examples, d.wrap), (1, Wrap::Single), "{ct:?}");
            assert_eq!(values(&d.tensor), [6.1, 2.8, 4.7, 1.2], "{ct:?}");
        }
        let d = decode(
            &p("1 2 3 4\r\n5 6 7 8\r\n\r\n", None),
            DType::Float32,
            Some(&[4]),
        )
        .unwrap();
        assert_eq!((d.examples, d.wrap), (2, Wrap::List));
        assert_eq!(values(&d.tensor), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let d = decode(&p("1;2;3;\n", None), DType::Int64, None).unwrap();
        assert_eq!(d.tensor.size(), [1, 3]);
        assert_eq!(ids(&d.tensor), [1, 2, 3]);
        for (body, ct, says) in [
            (
                "1,2\n3,4,5\n",
                None,
                "line 2 holds 3 values and the first row 2",
            ),
            ("1,,2,3", None, "line 1: a value is missing"),
            (
                "sepal,2,3,4",
                Some("text/csv"),
                "line 1: \"sepal\" is not a number",
            ),
            (" \n", Some("text/plain"), "the request holds no values"),
            ("garbage", None, "\"garbage\" is not a row of numbers"),
            ("1.5,2,3,4", None, "1.5 is not one"),
        ] {
            let dtype = if body.starts_with("1.5") {
                DType::Int64
            } else {
                DType::Float32
            };
            let e = decode(&p(body, ct), dtype, Some(&[-1]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{body:?}: {e}");
        }
        // As spreadsheets and pandas write CSV: a byte-order mark, a header row, NaN, and
        // separators mixed; sent without a type, it is text all the same.
        let d = decode(
            &p(
                "\u{feff}sepal_length,sepal_width; petal length\r\n1,2 nan;4\r\n",
                None,
            ),
            DType::Float32,
            Some(&[4]),
        )
        .unwrap();
        assert_eq!(d.tensor.size(), [1, 4]);
        assert!(values(&d.tensor)[2].is_nan());
        // Only a first row is a header: a row of words after values is an error, by line.
        let e = decode(&p("1,2,3,4\na,b,c,d\n", None), DType::Float32, Some(&[4]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2: \"a\" is not a number"), "{e}");
        // A row holding a whole example of several axes is that example.
        let d = decode(
            &p("1,2,3,4,5,6\n7,8,9,10,11,12", None),
            DType::Float32,
            Some(&[2, 3]),
        )
        .unwrap();
        assert_eq!((d.examples, d.wrap), (2, Wrap::List));
        assert_eq!(d.tensor.size(), [2, 2, 3]);
        let d = decode(&p("1,2,3\n4,5,6", None), DType::Float32, Some(&[2, 3])).unwrap();
        assert_eq!((d.examples, d.wrap), (1, Wrap::Single));
        // Said to be raw, by its type or by a shape header, the same bytes are raw.
        let d = decode(
            &p("6.1,2.8,4.7,1.2\n", Some("application/octet-stream")),
            DType::Float32,
            Some(&[4]),
        )
        .unwrap();
        assert!(values(&d.tensor).iter().all(|v| v.abs() < 1e-6));
        let mut shaped = p("6.1,2.8,4.7,1.2\n", None);
        shaped.shape = Some("4".into());
        let d = decode(&shaped, DType::Float32, None).unwrap();
        assert!(values(&d.tensor).iter().all(|v| v.abs() < 1e-6));
        // Bytes that are not text stay raw without a type, as `curl -T x.bin` sends them.
        let raw: Vec<u8> = [0.5f32, 0.25, 1.0, 2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let untyped = Payload {
            parts: vec![Part {
                name: "body".into(),
                content_type: None,
                data: raw.into(),
                shape: None,
            }],
            ..Payload::default()
        };
        let d = decode(&untyped, DType::Float32, Some(&[4])).unwrap();
        assert_eq!(values(&d.tensor), [0.5, 0.25, 1.0, 2.0]);
    }

    #[test]
    fn json_tensors_equal_libtorchs_own_conversion() {
        // Values that round in float32 (0.1), fall below its normal range (1e-40), keep their
        // sign (-0.0), an integer past float32's exact ones; the second body overflows float32
        // (1e39), which the general reader reads.
        for body in [
            "[[0.1, 1e-40, 2e-5, -0.0, 16777217, -2.5], [1, 0, 7, 3.25, -1e-7, 123456789.125]]",
            "[[0.1, 1e-40, 1e39, -0.0, 16777217, -2.5], [1, 0, 7, 3.25, -1e-7, 123456789.125]]",
        ] {
            let payload = Payload {
                parts: vec![Part {
                    name: "body".into(),
                    content_type: Some("application/json".into()),
                    data: body.as_bytes().to_vec().into(),
                    shape: None,
                }],
                ..Payload::default()
            };
            let numbers = numbers_of_value(body.as_bytes()).unwrap();
            for dtype in [
                DType::Float32,
                DType::Float64,
                DType::Float16,
                DType::Bfloat16,
            ] {
                let d = decode(&payload, dtype, Some(&[6])).unwrap();
                let expected = Tensor::from_slice(&numbers.flat)
                    .to_kind(kind_of(dtype))
                    .reshape([2, 6]);
                assert_eq!(d.tensor.size(), [2, 6], "{dtype:?}");
                assert_eq!(d.tensor.kind(), kind_of(dtype), "{dtype:?}");
                // Bit for bit, so that infinities, subnormals and -0.0 all count.
                let bits =
                    |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1));
                let (got, want) = (bits(&d.tensor).unwrap(), bits(&expected).unwrap());
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{dtype:?}: {got:?} against {want:?}"
                );
            }
        }
    }
}
