//! Image decoding as a worker does it: any bytes (raw, or base64 text in a JSON body) go through
//! format sniffing, the pixel cap and the JPEG, PNG, WebP, BMP and GIF decoders. A refusal is a
//! bad input; what decodes has as many bytes as its pixels need.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_runtime::handler::decode_image;
use tchserve_runtime::job::{Part, Payload};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let content_type = match pick % 3 {
        0 => None,
        1 => Some("image/jpeg".to_string()),
        _ => Some("application/json".to_string()),
    };
    let payload = Payload {
        parts: vec![Part {
            name: "data".into(),
            content_type,
            data: bytes::Bytes::copy_from_slice(rest),
            shape: None,
        }],
        ..Payload::default()
    };
    // The default cap in handler manifests is far larger; a small one keeps each run fast and
    // still exercises the refusal.
    if let Ok(rgb) = decode_image(&payload, 1 << 20) {
        assert_eq!(
            rgb.data.len() as u64,
            u64::from(rgb.width) * u64::from(rgb.height) * 3
        );
        assert!(u64::from(rgb.width) * u64::from(rgb.height) <= 1 << 20);
    }
});
