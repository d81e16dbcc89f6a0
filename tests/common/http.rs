//! A minimal blocking HTTP/1.1 client over loopback TCP or a Unix socket, for tests.

use std::io::{Read, Write};
use std::time::Duration;

/// A response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a server listens: `127.0.0.1:port` or `unix:/path`.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// A request that may fail: no connection, no complete answer within `timeout`.
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Resp, String> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let raw = send_raw(addr, &req, timeout).map_err(|e| e.to_string())?;
    parse(&raw).ok_or_else(|| {
        format!(
            "no complete HTTP answer: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Sends `bytes` as they are and reads until the server closes the connection; an error when
/// that takes longer than `timeout`.
pub fn send_raw(addr: &str, bytes: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    if let Some(path) = addr.strip_prefix("unix:") {
        let mut s = std::os::unix::net::UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(bytes)?;
        s.read_to_end(&mut raw)?;
    } else {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(bytes)?;
        s.read_to_end(&mut raw)?;
    }
    Ok(raw)
}

/// Parses a complete HTTP answer.
pub fn parse(raw: &[u8]) -> Option<Resp> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Some(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 4 + size..];
    }
}

/// POST a JSON text.
pub fn post_json(addr: &str, path: &str, json: &str) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        json.as_bytes(),
    )
}

/// Asserts an answer is the KServe protocols' error body, `{"error": "..."}`, with this status
/// and part of a message.
pub fn assert_kserve_error(r: &Resp, status: u16, message_part: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert!(
        j["error"]
            .as_str()
            .is_some_and(|m| m.contains(message_part)),
        "`{message_part}` not in {j}"
    );
}

/// Asserts an answer is TorchServe's error body with this status, type and part of a message.
pub fn assert_error(r: &Resp, status: u16, kind: &str, message_part: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["code"], status, "{j}");
    assert_eq!(j["type"], kind, "{j}");
    assert!(
        j["message"].as_str().unwrap().contains(message_part),
        "`{message_part}` not in {j}"
    );
}
