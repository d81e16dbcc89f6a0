//! The `tensor` handler's input: JSON numbers of any nesting, `{"instances": ...}`, or raw
//! little-endian bytes described by `X-Tensor-Dtype` and `X-Tensor-Shape`, into a libtorch
//! tensor. A refusal is a bad input; what decodes has as many rows as it says; the fast JSON
//! reading agrees with the general one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::handler::DType;
use tchserve_runtime::handler::{check_json_reading, decode_tensor};
use tchserve_runtime::job::{Part, Payload};

const DTYPES: [DType; 10] = [
    DType::Float32,
    DType::Float64,
    DType::Float16,
    DType::Bfloat16,
    DType::Int64,
    DType::Int32,
    DType::Int16,
    DType::Int8,
    DType::Uint8,
    DType::Bool,
];

fuzz_target!(|data: &[u8]| {
    // [dtype, model shape pick, header length, header bytes..., body...]
    let [pick, shape_pick, header_len, rest @ ..] = data else {
        return;
    };
    let dtype = DTYPES[usize::from(*pick) % DTYPES.len()];
    let model_shape: Option<Vec<i64>> = match shape_pick % 4 {
        0 => None,
        1 => Some(vec![-1]),
        2 => Some(vec![2, 2]),
        _ => Some(vec![3, -1]),
    };
    let split = usize::from(*header_len).min(rest.len());
    let (header, body) = rest.split_at(split);
    let header = String::from_utf8_lossy(header);
    let (dtype_header, shape_header) = match header.split_once('|') {
        Some((d, s)) => (Some(d.to_string()), Some(s.to_string())),
        None if header.is_empty() => (None, None),
        None => (None, Some(header.to_string())),
    };
    let payload = Payload {
        parts: vec![Part {
            name: "body".into(),
            content_type: None,
            data: bytes::Bytes::copy_from_slice(body),
            shape: None,
        }],
        dtype: dtype_header,
        shape: shape_header,
        want_tensor: false,
    };
    // The fast JSON reading must read every body it accepts as the general reading does.
    check_json_reading(body);
    if let Ok(decoded) = decode_tensor(&payload, dtype, model_shape.as_deref()) {
        let size = decoded.tensor.size();
        assert_eq!(size.first().copied(), Some(decoded.examples as i64));
        if let Some(expected) = &model_shape {
            assert_eq!(size.len(), expected.len() + 1);
        }
        // The tensor must be readable whole: a wrong stride or length shows here under ASan.
        let _ = decoded.tensor.f_sum(tch::Kind::Double);
    }
});
