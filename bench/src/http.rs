//! Just enough HTTP/1.1 over a keep-alive TCP connection to time a server without measuring a
//! client library.

use anyhow::{Context, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A POST request's bytes, ready to write again and again.
pub fn post(path: &str, content_type: &str, extra_headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// Refuses any target but loopback: benchmarks never send traffic elsewhere.
pub fn check_loopback(addr: &str) -> anyhow::Result<()> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        bail!("{addr}: benchmarks only target loopback addresses");
    }
    Ok(())
}

/// Reads more of the response into `buf` after its first `filled` bytes, growing it as needed.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    filled: usize,
) -> anyhow::Result<usize> {
    if filled == buf.len() {
        buf.resize(buf.len() * 2, 0);
    }
    let n = stream.read(&mut buf[filled..]).await?;
    if n == 0 {
        bail!("connection closed");
    }
    Ok(filled + n)
}

/// Reads one response with a Content-Length body; returns its status.
pub async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<u16> {
    let mut filled = 0;
    loop {
        filled = read_more(stream, buf, filled).await?;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])?;
            let status: u16 = head.split_whitespace().nth(1).context("status")?.parse()?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .context("content-length")?;
            let total = end + 4 + len;
            while filled < total {
                filled = read_more(stream, buf, filled).await?;
            }
            return Ok(status);
        }
    }
}
