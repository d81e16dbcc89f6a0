//! `config.properties`: any text parses into keys, and the keys into a configuration or an
//! error naming the key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tchserve_server::Config;
use tchserve_server::config::parse_properties;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let props = parse_properties(text);
        let _ = Config::from_properties(&props, &|_| None);
    }
});
