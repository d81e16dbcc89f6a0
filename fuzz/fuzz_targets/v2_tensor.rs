//! The Open Inference Protocol's tensor data: JSON `data` of any shape in every datatype, and
//! BYTES elements in binary form. Encoding refuses or gives whole elements; what encodes decodes
//! to as many elements.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_server::frontends::v2::tensor::{self, Datatype};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let _ = tensor::split_bytes(rest);
    let datatype = Datatype::ALL[usize::from(pick) % Datatype::ALL.len()];
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    let mut flat = Vec::new();
    tensor::flatten(&value, &mut flat);
    if let (Ok(bytes), Some(size)) = (tensor::encode_json(datatype, &flat), datatype.size()) {
        assert_eq!(bytes.len(), flat.len() * size);
        let back: serde_json::Value =
            serde_json::from_str(&tensor::decode_json(datatype, &bytes)).expect("valid JSON");
        assert_eq!(back.as_array().map(Vec::len), Some(flat.len()));
    }
});
