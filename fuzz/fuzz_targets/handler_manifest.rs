//! Handler manifests: any bytes validate or are refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::HandlerManifest;

fuzz_target!(|data: &[u8]| {
    let _ = HandlerManifest::parse("handler.json", data);
});
