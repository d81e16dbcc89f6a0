//! The server attacked as someone who wants it down would: each attack must get a clear answer
//! while the server, and every model in it, keeps serving. Real binary, real models, loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::http::{Resp, assert_error, parse, post_json, request, try_request};
use common::run_ok;
use common::server::{
    Server, archive, fixture_handler, fixtures, scale_archive, tiny_image_archive,
};
use image::ImageEncoder as _;
use serde_json::Value;

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn post_image(s: &Server, model: &str, bytes: &[u8]) -> Resp {
    s.infer(
        "POST",
        &format!("/predictions/{model}"),
        &[("Content-Type", "application/octet-stream")],
        bytes,
    )
}

fn ping_ok(s: &Server) {
    let r = try_request(
        &s.inference,
        "GET",
        "/ping",
        &[],
        b"",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("/ping: {e}\n{}", s.log()));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn images_that_grow_past_the_pixel_limit_are_refused() {
    let mut s = Server::new("");
    let tiny = tiny_image_archive(&s, &[]);
    let scale = scale_archive(&s, "scale");
    s.start(&[
        "--models",
        &format!("tiny={tiny}"),
        &format!("scale={scale}"),
    ]);
    // Thin strips are small to send and small to decode, but resizing their short side to 256
    // multiplies them: 1 x 1,000,000 becomes 256 x 256,000,000.
    for (w, h) in [(1u32, 1_000_000u32), (1_000_000, 1), (1, 20_000)] {
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new_with_quality(
            &mut png,
            image::codecs::png::CompressionType::Best,
            image::codecs::png::FilterType::NoFilter,
        )
        .write_image(
            &vec![0u8; (w * h) as usize],
            w,
            h,
            image::ExtendedColorType::L8,
        )
        .unwrap();
        assert!(png.len() < 16_000, "{w}x{h} is {} bytes", png.len());
        assert_error(
            &post_image(&s, "tiny", &png),
            400,
            "InvalidInputException",
            "more than the 89478485 allowed",
        );
    }
    assert!(
        rss_kb(s.pid()) < 2 << 20,
        "RSS {} kB after the bombs",
        rss_kb(s.pid())
    );
    // Both models still answer.
    let photo = encode(
        &image::DynamicImage::new_rgb8(64, 48),
        image::ImageFormat::Png,
    );
    assert_eq!(post_image(&s, "tiny", &photo).status, 200);
    let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A request the model fails on is answered with the brief message; the whole one (here a
/// TorchScript traceback of a kilobyte and more) is logged once a minute, not per request, so
/// that a client sending bad input all day does not fill the disk.
#[test]
fn a_failure_repeated_by_every_request_is_logged_whole_once() {
    let mut s = Server::new("");
    let mlp = common::server::archive(
        &s.store,
        "mlpt",
        "1.0",
        &common::server::fixtures().join("mlp.pt"),
        std::path::Path::new("tensor"),
        &[],
    );
    s.start(&["--models", &format!("mlpt={mlp}")]);
    // Once the model has run on 784 numbers, 3 numbers are the request's mistake.
    let good = format!("[{}]", vec!["0.5"; 784].join(","));
    assert_eq!(
        post_json(&s.inference, "/predictions/mlpt", &good).status,
        200
    );
    for _ in 0..20 {
        let r = post_json(&s.inference, "/predictions/mlpt", "[1, 2, 3]");
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("cannot be multiplied"), "{}", r.text());
    }
    let log = s.log();
    let whole = log
        .lines()
        .filter(|l| {
            // On one line, the interpreter's traceback and the error it ends with: a log shipper
            // reading a record per line keeps it whole.
            l.contains("the model failed")
                && l.contains("TorchScript interpreter")
                && l.contains("cannot be multiplied")
        })
        .count();
    assert_eq!(whole, 1, "{log}");
}

#[test]
fn a_truncated_jpeg_is_refused() {
    let mut s = Server::new("");
    let tiny = tiny_image_archive(&s, &[]);
    s.start(&["--models", &format!("tiny={tiny}")]);
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
    }));
    let jpeg = encode(&img, image::ImageFormat::Jpeg);
    assert_eq!(post_image(&s, "tiny", &jpeg).status, 200);
    assert_error(
        &post_image(&s, "tiny", &jpeg[..jpeg.len() * 2 / 3]),
        400,
        "InvalidInputException",
        "truncated",
    );
}

/// Stops the server with SIGTERM and fails the test if it has not exited within `within`.
fn stop_within(s: &mut Server, within: Duration) {
    let pid = s.pid();
    // SAFETY: plain kill(2) on the test's own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |st| st.contains(") Z "))
        {
            s.stop_ok();
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server did not stop within {within:?}:\n{}", s.log());
}

#[test]
fn scaling_under_health_and_metrics_polling_never_deadlocks() {
    let mut s = Server::new("");
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}")]);
    let done = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let pollers: Vec<_> = [
        (s.inference.clone(), "/ping"),
        (s.metrics.clone(), "/metrics"),
    ]
    .into_iter()
    .map(|(addr, path)| {
        let (done, polls) = (Arc::clone(&done), Arc::clone(&polls));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let r = try_request(&addr, "GET", path, &[], b"", Duration::from_secs(20));
                let r = r.unwrap_or_else(|e| panic!("{path} hung while scaling: {e}"));
                assert!(r.status == 200 || path == "/ping", "{path}: {}", r.status);
                polls.fetch_add(1, Ordering::Relaxed);
            }
        })
    })
    .collect();
    let started = Instant::now();
    let mut scales = 0;
    while started.elapsed() < Duration::from_secs(15) {
        let n = 1 + scales % 2;
        let r = try_request(
            &s.management,
            "PUT",
            &format!("/models/scale?min_worker={n}&synchronous=true"),
            &[],
            b"",
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("scale #{scales} hung: {e}"));
        assert_eq!(r.status, 200, "{}", r.text());
        scales += 1;
    }
    done.store(true, Ordering::Relaxed);
    for p in pollers {
        p.join().unwrap();
    }
    assert!(scales > 20, "only {scales} scales in 15 s");
    assert!(polls.load(Ordering::Relaxed) > 100);
    ping_ok(&s);
    stop_within(&mut s, Duration::from_secs(30));
}

/// What the clients of the snapshot test know about a model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Registered,
    Unregistered,
    /// A call was in flight or failed: either state is right.
    Unknown,
}

#[test]
fn concurrent_management_calls_survive_a_crash() {
    let mut s = Server::new("enable_model_api=true");
    let scale = scale_archive(&s, "scale");
    s.start(&[]);
    let snapshot = s.home().join("logs/config/snapshot.json");
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let unreadable = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, unreadable, snapshot) =
            (Arc::clone(&stop), Arc::clone(&unreadable), snapshot.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(bytes) = std::fs::read(&snapshot)
                    && serde_json::from_slice::<Value>(&bytes).is_err()
                {
                    unreadable.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let clients: Vec<_> = (0..8)
        .map(|t| {
            let (stop, acknowledged) = (Arc::clone(&stop), Arc::clone(&acknowledged));
            let (management, scale) = (s.management.clone(), scale.clone());
            std::thread::spawn(move || {
                let names: Vec<String> = (0..4).map(|k| format!("c{t}_{k}")).collect();
                let mut known: BTreeMap<String, Known> = names
                    .iter()
                    .map(|n| (n.clone(), Known::Unregistered))
                    .collect();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let name = &names[i % names.len()];
                    i += 1;
                    let (method, path, then) = match known[name] {
                        Known::Registered => {
                            ("DELETE", format!("/models/{name}"), Known::Unregistered)
                        }
                        _ => (
                            "POST",
                            format!("/models?url={scale}&model_name={name}&initial_workers=0"),
                            Known::Registered,
                        ),
                    };
                    let r = try_request(
                        &management,
                        method,
                        &path,
                        &[],
                        b"",
                        Duration::from_secs(30),
                    );
                    let state = match r {
                        Ok(r) if r.status == 200 => {
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                            then
                        }
                        // A name whose state is unknown is registered again next time round;
                        // a 409 or 404 then settles it.
                        Ok(r) if r.status == 409 => Known::Registered,
                        Ok(r) if r.status == 404 && method == "DELETE" => Known::Unregistered,
                        Ok(r) if !stop.load(Ordering::Relaxed) => {
                            panic!("{method} {path}: {} {}", r.status, r.text())
                        }
                        _ => Known::Unknown,
                    };
                    known.insert(name.clone(), state);
                }
                known
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(20));
    // Crash while calls are in flight.
    stop.store(true, Ordering::Relaxed);
    s.kill();
    let mut known = BTreeMap::new();
    for c in clients {
        known.extend(c.join().unwrap());
    }
    reader.join().unwrap();
    assert_eq!(
        unreadable.load(Ordering::Relaxed),
        0,
        "the snapshot was seen half-written"
    );
    let acked = acknowledged.load(Ordering::Relaxed);
    assert!(acked > 40, "only {acked} calls acknowledged in 20 s");

    s.start(&[]);
    let listed = request(&s.management, "GET", "/models?limit=100", &[], b"").json();
    let present: BTreeSet<String> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap().to_string())
        .collect();
    let mut checked = 0;
    for (name, state) in &known {
        match state {
            Known::Registered => assert!(
                present.contains(name),
                "{name} was acknowledged but is gone after the restart"
            ),
            Known::Unregistered => assert!(
                !present.contains(name),
                "{name} was unregistered but came back"
            ),
            Known::Unknown => continue,
        }
        checked += 1;
    }
    assert!(
        checked >= 24,
        "only {checked} of 32 names had a known state"
    );
}

#[test]
fn an_unreadable_snapshot_is_kept_aside_not_overwritten() {
    // Damaged JSON, and JSON that is not a snapshot's shape, which would restore nothing.
    let damaged: [&[u8]; 2] = [
        b"{\"models\": {\"lost\": {\"1.0\": {\"marName\": \"lost.mar\"}}}} trailing",
        b"{\"models\": []}",
    ];
    for damaged in damaged {
        let mut s = Server::new("");
        let scale = scale_archive(&s, "scale");
        let config = s.home().join("logs/config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join("snapshot.json"), damaged).unwrap();
        s.start(&["--models", &format!("scale={scale}")]);
        let aside: Vec<_> = std::fs::read_dir(&config)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot.json.unreadable-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(std::fs::read(config.join(&aside[0])).unwrap(), damaged);
        assert!(s.log().contains("cannot be read"), "{}", s.log());
        // The configured model serves instead.
        ping_ok(&s);
        assert_eq!(
            request(
                &s.inference,
                "POST",
                "/predictions/scale",
                &[],
                b"[1, 2, 3, 4]"
            )
            .status,
            200
        );
    }
}

#[test]
fn absurd_worker_counts_and_batch_settings_are_refused() {
    let mut s = Server::new("enable_model_api=true");
    let scale = scale_archive(&s, "scale");
    std::fs::write(s.home().join("huge.yaml"), "batchSize: 4000000\n").unwrap();
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .args(["--model-name", "huge", "--version", "1.0", "--handler"])
            .arg(fixture_handler("vec4.json"))
            .arg("--serialized-file")
            .arg(fixtures().join("scale2.pt"))
            .arg("--config-file")
            .arg(s.home().join("huge.yaml"))
            .arg("--export-path")
            .arg(out.path()),
    );
    std::fs::rename(out.path().join("huge.mar"), s.store.join("huge.mar")).unwrap();
    s.start(&["--models", &format!("scale={scale}")]);
    let quick = |method: &str, path: &str| {
        try_request(
            &s.management,
            method,
            path,
            &[],
            b"",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };
    for path in [
        "/models/scale?min_worker=10000",
        "/models/scale?min_worker=10000&synchronous=true",
        "/models/scale?min_worker=1&max_worker=100000",
    ] {
        assert_error(
            &quick("PUT", path),
            400,
            "BadRequestException",
            "is out of range: it must be from 0 to 128",
        );
    }
    for (query, message) in [
        ("batch_size=4000000", "batch_size 4000000 is out of range"),
        (
            "batch_size=100000000",
            "batch_size 100000000 is out of range",
        ),
        ("batch_size=1e8", "batch_size: expected an integer"),
        ("max_batch_delay=999999999", "max_batch_delay 999999999 ms"),
        (
            "response_timeout=99999999999",
            "response_timeout 99999999999 s",
        ),
        (
            "startup_timeout=99999999999",
            "startup_timeout 99999999999 s",
        ),
        (
            "initial_workers=10000",
            "initial_workers 10000 is out of range",
        ),
    ] {
        assert_error(
            &quick(
                "POST",
                &format!("/models?url={scale}&model_name=other&{query}"),
            ),
            400,
            "BadRequestException",
            message,
        );
    }
    assert_error(
        &quick("POST", "/models?url=huge.mar"),
        400,
        "BadRequestException",
        "batch_size 4000000 is out of range: it must be from 1 to 1024 (set by model-config.yaml)",
    );
    let models = quick("GET", "/models").json();
    assert_eq!(models["models"].as_array().unwrap().len(), 1, "{models}");
    let described = quick("GET", "/models/scale").json();
    assert_eq!(described[0]["workers"].as_array().unwrap().len(), 1);
    ping_ok(&s);
}

#[test]
fn local_urls_name_archives_in_the_store_and_nothing_else() {
    let mut s = Server::new("enable_model_api=true");
    let scale = scale_archive(&s, "scale");
    let mkfifo = |p: &std::path::Path| run_ok(Command::new("mkfifo").arg(p));
    let outside = s.home().join("outside.fifo");
    mkfifo(&outside);
    mkfifo(&s.store.join("pipe.mar"));
    std::fs::create_dir(s.store.join("sub")).unwrap();
    std::fs::copy(s.store.join(&scale), s.store.join("sub/nested.mar")).unwrap();
    s.start(&[]);
    let register = |url: &str| {
        try_request(
            &s.management,
            "POST",
            &format!("/models?url={}", q(url)),
            &[],
            b"",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("registering {url} hung: {e}"))
    };
    let store_fifo = s.store.join("pipe.mar").display().to_string();
    for url in [
        outside.display().to_string(),
        "pipe.mar".into(),
        store_fifo,
        "/etc/shadow".into(),
        "/etc/passwd".into(),
        "/etc/nonexistent".into(),
        "file:///etc/passwd".into(),
        "sub/nested.mar".into(),
        "sub".into(),
    ] {
        let r = register(&url);
        if url == "sub" {
            // A folder in the store is a directory archive; this one has no manifest.
            assert_eq!(r.status, 400, "{}", r.text());
            continue;
        }
        assert_error(
            &r,
            404,
            "ModelNotFoundException",
            &format!("Model not found at: {url}"),
        );
    }
    // Each refusal is immediate, so many of them cannot pin the server's blocking threads.
    let refusals: Vec<_> = (0..8)
        .map(|_| {
            let (management, url) = (s.management.clone(), q(&outside.display().to_string()));
            std::thread::spawn(move || {
                for _ in 0..80 {
                    let r = try_request(
                        &management,
                        "POST",
                        &format!("/models?url={url}"),
                        &[],
                        b"",
                        Duration::from_secs(10),
                    )
                    .unwrap();
                    assert_eq!(r.status, 404);
                }
            })
        })
        .collect();
    for r in refusals {
        r.join().unwrap();
    }
    // An archive of the store, by name or by its absolute path, registers.
    assert_eq!(register(&scale).status, 200);
    let abs = s.store.join(&scale).display().to_string();
    let r = try_request(
        &s.management,
        "POST",
        &format!("/models?url={}&model_name=again", q(&abs)),
        &[],
        b"",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_path_that_is_not_text_gets_a_json_error() {
    let mut s = Server::new("");
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}")]);
    for (addr, path) in [
        (&s.inference, "/predictions/%FF"),
        (&s.inference, "/predictions/scale/%C0"),
        (&s.management, "/models/%FF"),
    ] {
        let r = request(addr, "POST", path, &[], b"[1, 2, 3, 4]");
        assert_error(
            &r,
            400,
            "BadRequestException",
            "the request path is not UTF-8 once percent-decoded",
        );
    }
    let r = request(&s.inference, "POST", "/v2/models/%FF/infer", &[], b"{}");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"].as_str().unwrap().contains("UTF-8"),
        "{}",
        r.text()
    );
    ping_ok(&s);
}

#[test]
fn without_a_model_store_the_api_reads_no_path() {
    let mut s = Server::new("enable_model_api=true");
    s.without_store_config();
    let scale = s.store.join(scale_archive(&s, "scale"));
    // The operator's own start-up list may name an archive by path.
    s.start(&["--models", &format!("scale={}", scale.display())]);
    let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
    assert_eq!(r.status, 200, "{}", r.text());
    // The management API may not: an archive, a folder and a missing path all get the same
    // answer, so that it neither loads nor tells what the host holds.
    let elsewhere = s.home().join("elsewhere.mar");
    std::fs::copy(&scale, &elsewhere).unwrap();
    for url in [
        elsewhere.display().to_string(),
        "/etc".into(),
        "/etc/passwd".into(),
        "/etc/nonexistent".into(),
        "scale-1.0.mar".into(),
    ] {
        let r = s.manage("POST", &format!("/models?url={}&model_name=x", q(&url)));
        assert_error(
            &r,
            404,
            "ModelNotFoundException",
            "Model store has not been configured.",
        );
    }
    assert_eq!(
        s.manage("GET", "/models").json()["models"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// Opens a connection and sends `bytes`; the stream stays open.
fn open(addr: &str, bytes: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(bytes).unwrap();
    c
}

/// How long until the server closes `c` (reading and dropping whatever it sends), or `None`
/// if it is still open after `limit`.
fn closed_after(mut c: TcpStream, limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    c.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return Some((start.elapsed(), got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some((start.elapsed(), got));
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn slow_idle_and_excess_connections_are_closed_or_refused() {
    let mut s = Server::new(
        "header_read_timeout=1\nkeep_alive_timeout=3\nbody_read_timeout=1\nmax_connections=8",
    );
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}")]);
    let limit = Duration::from_secs(15);

    // A head that never ends.
    let c = open(&s.inference, b"GET /ping HTTP/1.1\r\nHost: x\r\n");
    let (took, _) = closed_after(c, limit).expect("a half-sent head kept the connection");
    assert!(took < Duration::from_secs(10), "{took:?}");

    // A connection that says nothing, and one that goes quiet after a request.
    let c = open(&s.inference, b"");
    assert!(
        closed_after(c, limit).is_some(),
        "an idle connection stayed"
    );
    let c = open(&s.inference, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n");
    let (_, answer) = closed_after(c, limit).expect("a kept-alive connection stayed forever");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");

    // A body that never arrives.
    let c = open(
        &s.inference,
        b"POST /predictions/scale HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n[1, 2",
    );
    let (_, answer) = closed_after(c, limit).expect("a half-sent body kept the connection");
    let r = parse(&answer).expect("an answer");
    assert_error(&r, 408, "RequestTimeoutException", "body_read_timeout");

    // Past the cap, new connections are answered 503 at once; the server stays usable.
    let held: Vec<TcpStream> = (0..8).map(|_| open(&s.management, b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let c = open(
        &s.management,
        b"GET /models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let (_, answer) = closed_after(c, limit).expect("an answer past the cap");
    assert_error(
        &parse(&answer).expect("an answer"),
        503,
        "ServiceUnavailableException",
        "too many open connections (max_connections is 8)",
    );
    // Other listeners have caps of their own.
    ping_ok(&s);
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        request(&s.management, "GET", "/models", &[], b"").status,
        200
    );

    // The gRPC listeners too: past the cap a connection is closed at once, and once the idle
    // ones go, a new one is served (the server's HTTP/2 SETTINGS answer the client preface).
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let served = |c: &mut TcpStream| {
        c.set_read_timeout(Some(limit)).unwrap();
        let mut head = [0u8; 9];
        c.read_exact(&mut head).is_ok() && head[3] == 0x04
    };
    let held: Vec<TcpStream> = (0..8).map(|_| open(&s.grpc_inference, b"")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let c = open(&s.grpc_inference, b"");
    let (_, answer) = closed_after(c, limit).expect("a gRPC connection past the cap stayed");
    assert!(answer.is_empty(), "{answer:?}");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = open(&s.grpc_inference, PREFACE);
    assert!(served(&mut c), "a gRPC connection under the cap is served");
    // A connection that stays silent, or stops inside the preface, is closed after
    // header_read_timeout rather than holding its place under the cap for good.
    for sent in [&b""[..], &PREFACE[..16], &PREFACE[..24]] {
        let c = open(&s.grpc_management, sent);
        let (took, _) = closed_after(c, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("a gRPC connection that sent {sent:?} stayed"));
        assert!(took < Duration::from_secs(30), "{sent:?}: {took:?}");
    }
    let mut c = open(&s.grpc_management, PREFACE);
    assert!(served(&mut c), "a whole preface is served");
}

#[test]
fn protocol_errors_and_wrong_methods_answer_in_json() {
    let mut s = Server::new("");
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}")]);
    for (addr, method, path) in [
        (&s.inference, "DELETE", "/api-description"),
        (&s.management, "POST", "/api-description"),
        (&s.metrics, "POST", "/metrics"),
    ] {
        assert_error(
            &request(addr, method, path, &[], b""),
            405,
            "MethodNotAllowedException",
            "not allowed",
        );
    }
    let big = "x".repeat(100_000);
    assert_error(
        &request(&s.inference, "GET", "/ping", &[("X-Big", &big)], b""),
        431,
        "RequestHeaderFieldsTooLargeException",
        "too large",
    );
    let raw = common::http::send_raw(
        &s.inference,
        b"THIS IS NOT HTTP\r\n\r\n",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_error(
        &parse(&raw).expect("an answer"),
        400,
        "BadRequestException",
        "not valid HTTP",
    );
    ping_ok(&s);
}

#[test]
fn a_stale_pid_file_never_signals_another_process() {
    let s = Server::new("");
    let mut other = Command::new("sleep").arg("60").spawn().unwrap();
    let logs = s.home().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("tchserve.pid"), format!("{}\n", other.id())).unwrap();
    let status = common::run(s.command().arg("--status"));
    assert!(!status.status.success());
    // The pid file's server went without stopping, and is said to have.
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("not running"), "{said}");
    assert!(said.contains("ended without being stopped"), "{said}");
    let stop = common::run(s.command().arg("--stop"));
    assert!(String::from_utf8_lossy(&stop.stdout).contains("not running"));
    // --stop took the stale file away: it is not said again.
    let status = common::run(s.command().arg("--status"));
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(!said.contains("ended without being stopped"), "{said}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        other.try_wait().unwrap().is_none(),
        "--stop signalled a process that is not tchserve"
    );
    other.kill().unwrap();
    other.wait().unwrap();
}

#[test]
fn malformed_tensors_fail_alone_with_400() {
    let mut s = Server::new("");
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}")]);
    let accents = format!("[\"{}\"]", "é".repeat(46));
    assert_error(
        &s.infer(
            "POST",
            "/predictions/scale",
            &[("Content-Type", "application/json")],
            accents.as_bytes(),
        ),
        400,
        "InvalidInputException",
        "expected numbers",
    );
    for dtype in ["float16", "bfloat16", "float64"] {
        assert_error(
            &s.infer(
                "POST",
                "/predictions/scale",
                &[
                    ("Content-Type", "application/octet-stream"),
                    ("X-Tensor-Dtype", dtype),
                ],
                &[0u8; 16],
            ),
            400,
            "InvalidInputException",
            &format!("X-Tensor-Dtype {dtype} does not match the model's input dtype float32"),
        );
    }
    // A header that is not text is refused, not ignored.
    let mut raw = b"POST /predictions/scale HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                    Content-Type: application/octet-stream\r\nX-Tensor-Dtype: \xff\xfe\r\n\
                    Content-Length: 16\r\n\r\n"
        .to_vec();
    raw.extend_from_slice(&[0u8; 16]);
    let r = parse(&common::http::send_raw(&s.inference, &raw, Duration::from_secs(10)).unwrap())
        .unwrap();
    assert_error(&r, 400, "BadRequestException", "X-Tensor-Dtype");
    // Found by fuzzing: sizes whose product wraps around to the number of values sent.
    assert_error(
        &s.infer(
            "POST",
            "/predictions/scale",
            &[
                ("Content-Type", "application/octet-stream"),
                ("X-Tensor-Shape", "7,7905747460161236407"),
            ],
            &[0u8; 4],
        ),
        400,
        "InvalidInputException",
        "does not hold the 1 values sent",
    );
    let ok = s.infer(
        "POST",
        "/predictions/scale",
        &[("Content-Type", "application/octet-stream")],
        &[0u8; 16],
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn outputs_that_disagree_fail_their_request_and_the_worker_serves_on() {
    let mut s = Server::new("enable_model_api=true");
    let lopsided = archive(
        &s.store,
        "lopsided",
        "1.0",
        &fixtures().join("lopsided.pt"),
        &fixture_handler("lopsided.json"),
        &[],
    );
    s.start(&[]);
    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={lopsided}&initial_workers=1&batch_size=4&max_batch_delay=300"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let worker_before =
        request(&s.management, "GET", "/models/lopsided", &[], b"").json()[0]["workers"][0]["id"]
            .clone();
    // One request the handler cannot write and one it can, batched together.
    let send = |body: &'static str| {
        let addr = s.inference.clone();
        std::thread::spawn(move || {
            request(
                &addr,
                "POST",
                "/predictions/lopsided",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
        })
    };
    let (bad, good) = (send("[1, 0]"), send("[-1, 0]"));
    let (bad, good) = (bad.join().unwrap(), good.join().unwrap());
    assert_error(
        &bad,
        500,
        "InternalServerException",
        "the detector returned 2 scores, 2 labels and 4 box coordinates",
    );
    assert_eq!(good.status, 200, "{}", good.text());
    assert_eq!(good.json().as_array().unwrap().len(), 2);
    let after = request(&s.management, "GET", "/models/lopsided", &[], b"").json();
    assert_eq!(after[0]["workers"][0]["id"], worker_before, "{after}");
    assert_eq!(after[0]["workers"][0]["status"], "READY");
    assert!(!s.log().contains("restarting"), "{}", s.log());
}

#[test]
fn model_names_are_plain_and_duplicate_entries_are_refused() {
    let mut s = Server::new("enable_model_api=true");
    let scale = scale_archive(&s, "scale");
    // The same archive with its manifest twice, the second naming another model.
    let twice = s.store.join("twice.mar");
    {
        let mut src =
            zip::ZipArchive::new(std::fs::File::open(s.store.join(&scale)).unwrap()).unwrap();
        let mut out = zip::ZipWriter::new(std::fs::File::create(&twice).unwrap());
        for i in 0..src.len() {
            out.raw_copy_file(src.by_index(i).unwrap()).unwrap();
        }
        let opts = zip::write::SimpleFileOptions::default();
        out.start_file("MAR-INF/MANIFESX.json", opts).unwrap();
        out.write_all(br#"{"model": {"modelName": "evil", "handler": "tensor", "serializedFile": "scale2.pt", "modelVersion": "6.6"}}"#)
            .unwrap();
        out.finish().unwrap();
    }
    let mut bytes = std::fs::read(&twice).unwrap();
    let (from, to) = (b"MAR-INF/MANIFESX.json", b"MAR-INF/MANIFEST.json");
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
        }
        i += 1;
    }
    std::fs::write(&twice, bytes).unwrap();
    s.start(&[]);
    let register =
        |query: &str| request(&s.management, "POST", &format!("/models?{query}"), &[], b"");
    assert_error(
        &register("url=twice.mar"),
        400,
        "InvalidModelException",
        "the same entry name twice",
    );
    for name in ["../x", "a/b", "a\nb", ".hidden", "-dash", "sp ace"] {
        assert_error(
            &register(&format!("url={scale}&model_name={}", q(name))),
            400,
            "BadRequestException",
            "Invalid model name",
        );
    }
    // A name every route can still name: the longest is taken, one more is refused.
    let long = "n".repeat(256);
    assert_error(
        &register(&format!("url={scale}&model_name={long}")),
        400,
        "BadRequestException",
        "at most 255 characters (256 here)",
    );
    assert_eq!(
        register(&format!("url={scale}&model_name={}", &long[1..])).status,
        200
    );
    assert_eq!(
        request(
            &s.management,
            "DELETE",
            &format!("/models/{}", &long[1..]),
            &[],
            b""
        )
        .status,
        200
    );
    assert_eq!(
        register(&format!("url={scale}&model_name=ok-name.v1_2")).status,
        200
    );
}
