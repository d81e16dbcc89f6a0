//! `MAR-INF/MANIFEST.json`: any bytes parse or are refused; what parses writes back and parses
//! again to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_mar::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let again = Manifest::parse(m.to_json().as_bytes()).expect("a written manifest parses");
        assert_eq!(again.to_json(), m.to_json());
    }
});
