//! `model-config.yaml`: any text parses or is refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::ModelConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ModelConfig::parse(text);
    }
});
