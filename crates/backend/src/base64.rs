//! Base64 as clients send it: wrapped over lines, or as a data URL.

use base64::Engine as _;

/// Decodes `text` as standard base64, after a `data:<type>;base64,` prefix and any ASCII
/// whitespace (`base64`, MIME and openssl wrap their output over lines) are set aside.
pub fn decode_lenient(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    let text = text.trim();
    let encoded = match text.strip_prefix("data:") {
        Some(url) => url.split_once(";base64,").map_or(url, |(_, data)| data),
        None => text,
    };
    let compact: String = encoded.split_ascii_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(compact)
}

#[cfg(test)]
mod tests {
    use super::decode_lenient;

    #[test]
    fn wrapped_and_data_urls() {
        for text in [
            "aGVsbG8gd29y\nbGQ=",
            " aGVsbG8g\r\nd29ybGQ= \n",
            "data:text/plain;base64,aGVsbG8gd29y\nbGQ=",
        ] {
            assert_eq!(decode_lenient(text).unwrap(), b"hello world", "{text:?}");
        }
        assert!(decode_lenient("not base64!").is_err());
    }
}
