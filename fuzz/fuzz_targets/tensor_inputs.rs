//! A `tensors` handler's inputs (a model of several named inputs): one JSON object of the names,
//! `{"instances": [...]}` of such objects, or one form field per input, JSON or raw bytes with
//! their shape. A refusal is a bad input; what decodes has one tensor per input, each of the
//! input's dtype and rank, and every one with the same number of examples.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::handler::{DType, NamedTensor};
use tchserve_runtime::handler::decode_tensors;
use tchserve_runtime::job::{Part, Payload};

/// What each field says it is: JSON, raw bytes, or nothing.
const TYPES: [Option<&str>; 3] = [
    Some("application/json"),
    Some("application/octet-stream"),
    None,
];

fuzz_target!(|data: &[u8]| {
    // [shape pick, form pick, content types, split, shape header length, shape header...,
    // body...]
    let [shape_pick, form_pick, types, split, header_len, rest @ ..] = data else {
        return;
    };
    let inputs = vec![
        NamedTensor {
            name: "ids".into(),
            dtype: DType::Int64,
            shape: match shape_pick % 3 {
                0 => None,
                1 => Some(vec![-1]),
                _ => Some(vec![3]),
            },
        },
        NamedTensor {
            name: "dense".into(),
            dtype: if shape_pick & 0x80 == 0 {
                DType::Float32
            } else {
                DType::Float16
            },
            shape: match (shape_pick >> 2) % 3 {
                0 => None,
                1 => Some(vec![2]),
                _ => Some(vec![2, -1]),
            },
        },
    ];
    let header_len = usize::from(*header_len).min(rest.len());
    let (header, body) = rest.split_at(header_len);
    let header = String::from_utf8_lossy(header);
    let shape = (!header.is_empty()).then(|| header.to_string());
    let part = |name: &str, content_type: Option<&str>, data: &[u8], shape: Option<String>| Part {
        name: name.into(),
        content_type: content_type.map(str::to_string),
        data: bytes::Bytes::copy_from_slice(data),
        shape,
    };
    let parts = if form_pick % 4 == 0 {
        // One body of JSON (or anything else).
        vec![part("body", TYPES[usize::from(*types) % 3], body, None)]
    } else {
        // A field per input; the second one carries the shape header, if any.
        let at = usize::from(*split).min(body.len());
        let (first, second) = body.split_at(at);
        let mut parts = vec![
            part("ids", TYPES[usize::from(*types) % 3], first, None),
            part("dense", TYPES[usize::from(*types / 3) % 3], second, shape),
        ];
        // A field left out, or given twice (the last one counts).
        match form_pick % 4 {
            2 => {
                parts.remove(0);
            }
            3 => parts.push(part("ids", Some("application/json"), b"[1, 2, 3]", None)),
            _ => {}
        }
        parts
    };
    let payload = Payload {
        parts,
        ..Payload::default()
    };
    let Ok(decoded) = decode_tensors(&payload, &inputs) else {
        return;
    };
    assert_eq!(decoded.more.len(), inputs.len() - 1);
    let all = std::iter::once(&decoded).chain(&decoded.more);
    for (d, input) in all.zip(&inputs) {
        let size = d.tensor.size();
        assert_eq!(
            size.first().copied(),
            Some(decoded.examples as i64),
            "{}",
            input.name
        );
        if let Some(shape) = &input.shape {
            assert_eq!(size.len(), shape.len() + 1, "{}", input.name);
        }
        let want = match input.dtype {
            DType::Int64 => tch::Kind::Int64,
            DType::Float16 => tch::Kind::Half,
            _ => tch::Kind::Float,
        };
        assert_eq!(d.tensor.kind(), want, "{}", input.name);
        // The tensor must be readable whole: a wrong stride or length shows here under ASan.
        let _ = d.tensor.f_sum(tch::Kind::Double);
    }
});
