//! What keeps a server on an open network safe: TLS on every listener with a certificate made
//! here and clients that verify it, and archives registered by URL, fetched only where
//! `allowed_urls` says and never from an address it does not name. Each refusal is checked on
//! the target too: it must not have been asked for anything. Real binary, loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{assert_error, request, send_raw};
use common::server::{Server, mlp_archive};
use common::{clients_venv_bin, run};

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A self-signed certificate for localhost and 127.0.0.1, written as PEM files in `dir`.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// curl, verifying the server against `ca` (or against the system's roots when `None`).
fn curl(ca: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "-w", "\n%{http_code}"]);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    cmd.args(args).output().expect("curl runs")
}

/// curl's body and status code.
fn curl_ok(ca: &Path, args: &[&str]) -> (String, u16) {
    let out = curl(Some(ca), args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = text.rsplit_once('\n').unwrap();
    (body.to_string(), code.parse().unwrap())
}

const GRPC_CLIENT: &str = r#"
import sys
import tritonclient.grpc as g
url, ca = sys.argv[1], sys.argv[2]
try:
    if ca == "-":
        c = g.InferenceServerClient(url)
    else:
        c = g.InferenceServerClient(url, ssl=True, root_certificates=ca)
    print("live" if c.is_server_live(client_timeout=20) else "not live")
except Exception as e:
    print("failed:", str(e).splitlines()[0])
"#;

fn grpc_live(url: &str, ca: Option<&Path>) -> String {
    let ca = ca.map_or("-".to_string(), |p| p.display().to_string());
    let out = run(Command::new(clients_venv_bin("python")).args(["-c", GRPC_CLIENT, url, &ca]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn every_listener_speaks_tls_with_the_configured_certificate() {
    let mut s = Server::new("");
    let (cert, key) = certificate(s.home());
    let (i, m) = (s.inference.clone(), s.management.clone());
    s.set_config(&format!(
        "inference_address=https://{i}\nmanagement_address=https://{m}\nenable_grpc_ssl=true\n\
         certificate_file={}\nprivate_key_file={}\n",
        cert.display(),
        key.display()
    ));
    let mlp = mlp_archive(&s);
    s.start(&["--models", &format!("mlp={mlp}")]);

    // A verifying client: health, a prediction and the management API.
    let (body, code) = curl_ok(&cert, &[&format!("https://{i}/ping")]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Healthy"), "{body}");
    let input: Vec<String> = (0..784).map(|k| format!("{}", k % 7)).collect();
    let (body, code) = curl_ok(
        &cert,
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!("[{}]", input.join(",")),
            &format!("https://{i}/predictions/mlp"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .as_array()
            .map(Vec::len),
        Some(10),
        "{body}"
    );
    let (body, code) = curl_ok(&cert, &[&format!("https://localhost:{}/models", port(&m))]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"mlp\""), "{body}");

    // A client that does not trust the certificate refuses it; the server serves on.
    let untrusted = curl(None, &[&format!("https://{i}/ping")]);
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    // Plain HTTP to the TLS port is told what to do, in JSON.
    let plain = request(&i, "GET", "/ping", &[], b"");
    assert_error(&plain, 400, "BadRequestException", "use https://");
    // Bytes that are neither HTTP nor a TLS handshake, and a handshake cut short.
    let junk = send_raw(&i, b"\x16\x03\x01\x00\x05junkjunk", Duration::from_secs(20)).unwrap();
    assert!(
        junk.is_empty() || junk[0] == 0x15,
        "a TLS alert or nothing: {junk:?}"
    );
    drop(TcpStream::connect(&i).unwrap());
    // The metrics listener stayed plain, as configured.
    assert!(
        request(&s.metrics, "GET", "/metrics", &[], b"")
            .text()
            .contains("ts_inference_requests_total")
    );

    // gRPC with TLS: a verifying client gets through, a plaintext one does not.
    assert_eq!(grpc_live(&s.grpc_inference, Some(&cert)), "live");
    let plaintext = grpc_live(&s.grpc_inference, None);
    assert!(plaintext.starts_with("failed"), "{plaintext}");

    let (body, code) = curl_ok(&cert, &[&format!("https://{i}/ping")]);
    assert_eq!((code, body.contains("Healthy")), (200, true), "{body}");
    s.stop_ok();
}

fn port(address: &str) -> &str {
    address.rsplit(':').next().unwrap()
}

#[test]
fn a_bad_certificate_stops_the_start_with_its_reason() {
    let s = Server::new("");
    let (cert, _) = certificate(s.home());
    let other = rcgen::KeyPair::generate().unwrap();
    let wrong = s.home().join("wrong.pem");
    std::fs::write(&wrong, other.serialize_pem()).unwrap();
    let i = s.inference.clone();
    let cases = [
        (
            format!(
                "inference_address=https://{i}\ncertificate_file={}\nprivate_key_file={}\n",
                cert.display(),
                wrong.display()
            ),
            "wrong.pem does not belong to certificate_file",
        ),
        (
            format!(
                "inference_address=https://{i}\ncertificate_file={}\n",
                cert.display()
            ),
            "private_key_file",
        ),
        (
            format!(
                "enable_grpc_ssl=true\ncertificate_file={}\nprivate_key_file={}\n",
                s.home().join("missing.pem").display(),
                wrong.display()
            ),
            "missing.pem",
        ),
        ("keystore=keystore.p12\n".to_string(), "openssl pkcs12"),
    ];
    for (extra, expected) in cases {
        let t = Server::new(&extra);
        let out = t
            .command()
            .arg("--foreground")
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{extra}: {err}");
    }
}

/// What the archive server does on one path.
#[derive(Clone)]
enum Reply {
    /// 200 with these bytes.
    Bytes(Vec<u8>),
    /// A redirect to this location.
    Redirect(String),
    /// Headers and a little of the body, then silence.
    Stall,
    /// Announces `announced` bytes, sends `sent`, closes.
    Lying { announced: usize, sent: usize },
    /// Chunked, `total` bytes, no length announced.
    Chunked(usize),
}

/// A small HTTP/1.1 server on 127.0.0.1 that serves archives and misbehaves on request, and
/// counts every request it receives by path.
struct ArchiveServer {
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
}

impl ArchiveServer {
    fn start(routes: HashMap<String, Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (routes, log) = (Arc::new(routes), Arc::clone(&hits));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (routes, log) = (Arc::clone(&routes), Arc::clone(&log));
                std::thread::spawn(move || serve_one(conn, &routes, &log));
            }
        });
        ArchiveServer { port, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }

    /// Requests for `path`.
    fn hits_of(&self, path: &str) -> usize {
        self.hits().iter().filter(|p| *p == path).count()
    }
}

fn serve_one(mut conn: TcpStream, routes: &HashMap<String, Reply>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(path.clone());
    let head = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nconnection: close\r\n{extra}\r\n").into_bytes()
    };
    let _ = match routes.get(&path).cloned() {
        None => conn.write_all(&head("404 Not Found", "content-length: 0\r\n")),
        Some(Reply::Bytes(b)) => {
            let _ = conn.write_all(&head("200 OK", &format!("content-length: {}\r\n", b.len())));
            conn.write_all(&b)
        }
        Some(Reply::Redirect(to)) => conn.write_all(&head(
            "302 Found",
            &format!("location: {to}\r\ncontent-length: 0\r\n"),
        )),
        Some(Reply::Stall) => {
            let _ = conn.write_all(&head("200 OK", "content-length: 1000000\r\n"));
            let _ = conn.write_all(&[0u8; 1000]);
            std::thread::sleep(Duration::from_secs(30));
            Ok(())
        }
        Some(Reply::Lying { announced, sent }) => {
            let _ = conn.write_all(&head("200 OK", &format!("content-length: {announced}\r\n")));
            conn.write_all(&vec![b'x'; sent])
        }
        Some(Reply::Chunked(total)) => {
            let _ = conn.write_all(&head("200 OK", "transfer-encoding: chunked\r\n"));
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = total;
            while left > 0 {
                let n = left.min(chunk.len());
                if conn
                    .write_all(format!("{n:x}\r\n").as_bytes())
                    .and_then(|()| conn.write_all(&chunk[..n]))
                    .and_then(|()| conn.write_all(b"\r\n"))
                    .is_err()
                {
                    return;
                }
                left -= n;
            }
            conn.write_all(b"0\r\n\r\n")
        }
    };
    let _ = conn.flush();
    // Drain what the client still sends so the close is clean.
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = conn.read(&mut [0u8; 1024]);
}

fn register(s: &Server, url: &str) -> common::http::Resp {
    request(
        &s.management,
        "POST",
        &format!("/models?url={}&initial_workers=1&synchronous=true", q(url)),
        &[],
        b"",
    )
}

/// Files in the store, hidden ones included: a failed download must leave none behind.
fn store_files(s: &Server) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&s.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn archives_by_url_come_only_from_where_allowed_urls_says() {
    // The archive to serve, made in a scratch server's store.
    let scratch = Server::new("");
    let mlp = std::fs::read(scratch.store.join(mlp_archive(&scratch))).unwrap();
    // A second server that nothing may reach: every request to it is a failure of the test.
    let forbidden = ArchiveServer::start(HashMap::from([(
        "/mlp.mar".to_string(),
        Reply::Bytes(mlp.clone()),
    )]));
    let allowed = ArchiveServer::start(HashMap::from([
        ("/models/mlp.mar".to_string(), Reply::Bytes(mlp.clone())),
        (
            "/models/broken.mar".to_string(),
            Reply::Bytes(b"not an archive".to_vec()),
        ),
        (
            "/models/hop.mar".to_string(),
            Reply::Redirect("/models/mlp.mar".into()),
        ),
        (
            "/models/away.mar".to_string(),
            Reply::Redirect(forbidden.url("/mlp.mar")),
        ),
        (
            "/models/metadata.mar".to_string(),
            Reply::Redirect("http://169.254.169.254/latest/meta-data/m.mar".into()),
        ),
        (
            "/models/loop.mar".to_string(),
            Reply::Redirect("/models/loop.mar".into()),
        ),
        ("/models/stall.mar".to_string(), Reply::Stall),
        (
            "/models/short.mar".to_string(),
            Reply::Lying {
                announced: 100_000,
                sent: 100,
            },
        ),
        (
            "/models/long.mar".to_string(),
            Reply::Lying {
                announced: 100,
                sent: 200_000,
            },
        ),
        ("/models/huge.mar".to_string(), Reply::Chunked(3 << 20)),
        (
            "/models/announced.mar".to_string(),
            Reply::Lying {
                announced: 3 << 20,
                sent: 0,
            },
        ),
    ]));

    // Default configuration: nothing remote.
    let mut plain = Server::new("enable_model_api=true\n");
    plain.start(&[]);
    let r = register(&plain, &allowed.url("/models/mlp.mar"));
    assert_error(
        &r,
        404,
        "ModelNotFoundException",
        "does not match any allowed URL",
    );
    assert!(allowed.hits().is_empty(), "{:?}", allowed.hits());
    plain.stop_ok();

    let mut s = Server::new(&format!(
        "enable_model_api=true\nallowed_urls=http://127\\\\.0\\\\.0\\\\.1:{}/models/.*\n\
         max_archive_size=2097152\narchive_download_timeout=3\n",
        allowed.port
    ));
    s.start(&[]);
    let mlp_fetched = |n: usize| {
        assert_eq!(
            allowed.hits_of("/models/mlp.mar"),
            n,
            "{:?}",
            allowed.hits()
        );
    };

    // Downloaded, served, and not fetched again for the same URL.
    let r = register(&s, &allowed.url("/models/mlp.mar"));
    assert_eq!(r.status, 200, "{}", r.text());
    mlp_fetched(1);
    assert!(store_files(&s).contains(&"mlp.mar".to_string()));
    let input: Vec<String> = (0..784).map(|k| format!("{}", k % 5)).collect();
    let p = s.infer(
        "POST",
        "/predictions/mlp",
        &[("Content-Type", "application/json")],
        format!("[{}]", input.join(",")).as_bytes(),
    );
    assert_eq!(p.status, 200, "{}", p.text());
    // While it is registered, the same URL under another name uses the file already there.
    let again = request(
        &s.management,
        "POST",
        &format!(
            "/models?url={}&model_name=mlp_again",
            q(&allowed.url("/models/mlp.mar"))
        ),
        &[],
        b"",
    );
    assert_eq!(again.status, 200, "{}", again.text());
    mlp_fetched(1);
    assert!(s.log().contains("not fetching it again"));
    // The same file name from another URL does not replace the file.
    let r = register(&s, &allowed.url("/models/mlp.mar?v=2"));
    assert_error(&r, 409, "ConflictStatusException", "already exists mlp.mar");
    mlp_fetched(1);
    // Once no registered version uses the download, it is deleted, as TorchServe deletes it:
    // the URL registered again is fetched anew, so what is published there now is served.
    assert_eq!(s.manage("DELETE", "/models/mlp_again").status, 200);
    assert!(store_files(&s).contains(&"mlp.mar".to_string()));
    assert_eq!(s.manage("DELETE", "/models/mlp").status, 200);
    assert!(!store_files(&s).contains(&"mlp.mar".to_string()));
    let r = register(&s, &allowed.url("/models/mlp.mar"));
    assert_eq!(r.status, 200, "{}", r.text());
    mlp_fetched(2);
    assert_eq!(s.manage("DELETE", "/models/mlp").status, 200);
    // A redirect inside the allowed prefix is followed.
    let r = register(&s, &allowed.url("/models/hop.mar"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (
            allowed.hits_of("/models/hop.mar"),
            allowed.hits_of("/models/mlp.mar")
        ),
        (1, 3)
    );
    assert_eq!(s.manage("DELETE", "/models/mlp").status, 200);
    let hits = allowed.hits().len();

    // Refused before any request: dots, userinfo, other ports, private addresses by name.
    for (url, status, kind, message) in [
        (
            allowed.url("/models/../mlp.mar"),
            404,
            "ModelNotFoundException",
            "Relative path",
        ),
        (
            allowed.url("/models/%2e%2e/mlp.mar"),
            404,
            "ModelNotFoundException",
            "Relative path",
        ),
        (
            format!("http://x@127.0.0.1:{}/models/mlp.mar", allowed.port),
            400,
            "BadRequestException",
            "user information",
        ),
        (
            forbidden.url("/mlp.mar"),
            404,
            "ModelNotFoundException",
            "does not match",
        ),
        (
            format!("http://localhost:{}/models/mlp.mar", allowed.port),
            404,
            "ModelNotFoundException",
            "does not match",
        ),
    ] {
        let r = register(&s, &url);
        assert_error(&r, status, kind, message);
    }
    assert_eq!(allowed.hits().len(), hits, "{:?}", allowed.hits());

    // Redirects are checked again: to a server no pattern allows, to the metadata address,
    // and round in circles.
    let r = register(&s, &allowed.url("/models/away.mar"));
    assert_error(&r, 400, "DownloadArchiveException", "redirected to");
    let r = register(&s, &allowed.url("/models/metadata.mar"));
    assert_error(&r, 400, "DownloadArchiveException", "169.254.169.254");
    let r = register(&s, &allowed.url("/models/loop.mar"));
    assert_error(&r, 400, "DownloadArchiveException", "redirects");
    assert_eq!(
        allowed.hits_of("/models/loop.mar"),
        6,
        "the first request and five redirects"
    );
    assert!(forbidden.hits().is_empty(), "{:?}", forbidden.hits());

    // Stalls, short and long bodies, and archives over the cap leave nothing behind.
    let before = store_files(&s);
    let started = Instant::now();
    let r = register(&s, &allowed.url("/models/stall.mar"));
    assert_error(
        &r,
        400,
        "DownloadArchiveException",
        "Failed to download archive",
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let r = register(&s, &allowed.url("/models/short.mar"));
    assert_error(
        &r,
        400,
        "DownloadArchiveException",
        "Failed to download archive",
    );
    // hyper reads what was announced and no more: the archive is not one, and goes.
    let r = register(&s, &allowed.url("/models/long.mar"));
    assert!(r.status == 400 || r.status == 500, "{}", r.text());
    let r = register(&s, &allowed.url("/models/huge.mar"));
    assert_error(&r, 400, "DownloadArchiveException", "max_archive_size");
    let r = register(&s, &allowed.url("/models/announced.mar"));
    assert_error(&r, 400, "DownloadArchiveException", "max_archive_size");
    let r = register(&s, &allowed.url("/models/broken.mar"));
    assert!(r.status == 400 || r.status == 500, "{}", r.text());
    assert_eq!(store_files(&s), before);

    // A wildcard pattern does not open loopback, by address or by name.
    let mut wide = Server::new("enable_model_api=true\nallowed_urls=http://.*\n");
    wide.start(&[]);
    for url in [
        forbidden.url("/mlp.mar"),
        format!("http://localhost:{}/mlp.mar", forbidden.port),
        format!("http://2130706433:{}/mlp.mar", forbidden.port),
        format!("http://[::ffff:127.0.0.1]:{}/mlp.mar", forbidden.port),
    ] {
        let r = register(&wide, &url);
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        assert!(r.text().contains("loopback"), "{url}: {}", r.text());
    }
    assert!(forbidden.hits().is_empty(), "{:?}", forbidden.hits());

    // Still serving after all of it, and the registered model survives a restart.
    let r = register(&s, &allowed.url("/models/mlp.mar"));
    assert_eq!(r.status, 200, "{}", r.text());
    mlp_fetched(4);
    s.stop();
    s.start(&[]);
    assert_eq!(s.manage("GET", "/models/mlp").status, 200);
    // The restart loads the download from the store.
    mlp_fetched(4);

    // A URL among the start-up models is downloaded, as TorchServe downloads it, under the
    // same allowed_urls.
    s.stop();
    std::fs::remove_file(s.store.join("mlp.mar")).unwrap();
    let listed = format!("digits={}", allowed.url("/models/mlp.mar"));
    s.start(&["--ncs", "--models", &listed]);
    mlp_fetched(5);
    let p = s.infer(
        "POST",
        "/predictions/digits",
        &[("Content-Type", "application/json")],
        format!("[{}]", input.join(",")).as_bytes(),
    );
    assert_eq!(p.status, 200, "{}", p.text());
    s.stop();
    // Where allowed_urls does not allow it, the start stops, saying why, and nothing is fetched.
    plain.spawn(&["--ncs", "--models", &listed]);
    let status = plain.wait();
    assert!(!status.success(), "{}", plain.log());
    assert!(
        plain.log().contains("does not match any allowed URL"),
        "{}",
        plain.log()
    );
    mlp_fetched(5);
}
