//! The server end to end: the real `tchserve` binary, real TorchScript models, HTTP over
//! loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::http::{Resp, assert_error, assert_kserve_error, post_json, request};
use common::server::{Server, archive, digits_build, fixture_handler, fixtures, mlp_archive};
use common::{run, worker_threads};
use image::ImageEncoder as _;
use serde_json::{Value, json};

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Archives a model from tests/fixtures as `<name>` 1.0 into the server's store.
fn fixture_archive(s: &Server, name: &str, model: &str, handler: &str) -> String {
    archive(
        &s.store,
        name,
        "1.0",
        &fixtures().join(model),
        &fixture_handler(handler),
        &[],
    )
}

/// Archives a model from tests/fixtures as `<name>` 1.0 into the server's store, with a handler
/// manifest the test writes.
fn archive_with_manifest(s: &Server, name: &str, model: &str, manifest: &str) -> String {
    let handler = s.dir.path().join(format!("{name}.json"));
    std::fs::write(&handler, manifest).unwrap();
    archive(
        &s.store,
        name,
        "1.0",
        &fixtures().join(model),
        &handler,
        &[],
    )
}

fn register(s: &Server, query: &str) -> Resp {
    s.manage("POST", &format!("/models?{query}"))
}

/// A server with model `scale` v1.0 (x*2) and v2.0 (x*3) archived in its store.
fn scale_server(extra_config: &str) -> (Server, String, String) {
    let s = Server::new(extra_config);
    let h = fixture_handler("vec4.json");
    let v1 = archive(
        &s.store,
        "scale",
        "1.0",
        &fixtures().join("scale2.pt"),
        &h,
        &[],
    );
    let v2 = archive(
        &s.store,
        "scale",
        "2.0",
        &fixtures().join("scale3.pt"),
        &h,
        &[],
    );
    (s, v1, v2)
}

/// Runs `cmd --start --ncs --models <models>`, as a user starts a server in the background.
fn start_in_background(mut cmd: std::process::Command, models: &str) -> std::process::Output {
    run(cmd.args(["--start", "--ncs", "--models", models]))
}

/// Asserts that a `--start` succeeded, showing what it said when not.
#[track_caller]
fn assert_started(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn start_status_stop_through_the_cli() {
    let (s, mar, _) = scale_server("");
    let out = run(s
        .command()
        .args(["--start", "--ts-config", "config.properties", "--models"])
        .arg(format!("scale={mar}")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tchserve is running"));
    // --start returned only once the server answers.
    assert_eq!(
        s.infer("GET", "/ping", &[], b"").json(),
        json!({"status": "Healthy"})
    );
    let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
    assert_eq!(floats(&r.json()), [2.0, 4.0, 6.0, 8.0]);

    // Refused before anything else is said: not that a snapshot will be restored.
    let again = run(s
        .command()
        .args(["--start", "--ts-config", "config.properties", "--models"])
        .arg(format!("scale={mar}")));
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    assert!(
        said.starts_with("tchserve: tchserve is already running"),
        "{said}"
    );
    assert_eq!(said.lines().count(), 1, "{said}");
    let status = run(s.command().arg("--status"));
    assert!(
        status.status.success() && String::from_utf8_lossy(&status.stdout).contains("is running")
    );

    // From another folder, the one server running is found, as TorchServe's --stop finds it;
    // a log folder named there is looked in alone.
    let elsewhere = tempfile::tempdir().unwrap();
    let logs = s.dir.path().join("logs");
    let status = run(s.command().current_dir(elsewhere.path()).arg("--status"));
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{said}");
    assert!(
        said.contains(&format!("logs in {}", logs.display())),
        "{said}"
    );
    let named =
        run(s
            .command()
            .current_dir(elsewhere.path())
            .args(["--stop", "--log-dir", "logs"]));
    assert!(!named.status.success());
    assert!(std::net::TcpStream::connect(&s.inference).is_ok());
    // With two running, --stop from elsewhere names both and stops neither.
    let (second, mar2, _) = scale_server("");
    let shared_tmp = |mut c: std::process::Command| {
        c.env("TMPDIR", s.temp_dir());
        c
    };
    assert_started(&start_in_background(
        shared_tmp(second.command()),
        &format!("scale={mar2}"),
    ));
    let both = run(s.command().current_dir(elsewhere.path()).arg("--stop"));
    let said = String::from_utf8_lossy(&both.stderr);
    assert!(!both.status.success(), "{said}");
    assert!(said.contains(&logs.display().to_string()), "{said}");
    assert!(
        said.contains(&second.dir.path().join("logs").display().to_string()),
        "{said}"
    );
    assert!(
        run(shared_tmp(second.command()).arg("--stop"))
            .status
            .success()
    );
    // A folder whose own server has stopped does not stand for another: a second stop there
    // (a retry, a script's stop-before-start) leaves the first server running, and its status
    // is "not running", naming the server elsewhere.
    let retry = run(shared_tmp(second.command()).arg("--stop"));
    let said = String::from_utf8_lossy(&retry.stdout);
    assert!(!retry.status.success(), "{said}");
    assert!(said.contains("left alone"), "{said}");
    assert!(std::net::TcpStream::connect(&s.inference).is_ok());
    let status = run(shared_tmp(second.command()).arg("--status"));
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(!status.status.success(), "{said}");
    assert!(said.contains(&logs.display().to_string()), "{said}");

    let stop = run(s.command().current_dir(elsewhere.path()).arg("--stop"));
    let said = String::from_utf8_lossy(&stop.stdout);
    assert!(stop.status.success(), "{said}");
    assert!(said.contains(&logs.display().to_string()), "{said}");
    assert!(said.contains("tchserve has stopped"), "{said}");
    assert!(!s.dir.path().join("logs/tchserve.pid").exists());
    assert!(
        std::net::TcpStream::connect(&s.inference).is_err(),
        "still listening after --stop"
    );
    let status = run(s.command().arg("--status"));
    assert!(!status.status.success());
    assert!(s.dir.path().join("logs/tchserve.log").exists());
}

/// `--start` leaves nothing of its caller's open in the server: a server holding the write end
/// of its caller's pipe (`$(tchserve --start)`, a CI runner's log pipe) would keep the caller
/// waiting until the server stops.
#[test]
fn the_server_keeps_none_of_its_callers_files() {
    let (s, mar, _) = scale_server("");
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a two-element array; without O_CLOEXEC, children inherit both ends.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    assert_started(&start_in_background(s.command(), &format!("scale={mar}")));
    let pid_file = std::fs::read_to_string(s.dir.path().join("logs/tchserve.pid")).unwrap();
    let pid = pid_file.lines().next().unwrap().trim().to_string();
    // SAFETY: fstat on a descriptor this test owns, into a zeroed stat.
    let inode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        assert_eq!(libc::fstat(fds[1], &mut st), 0);
        st.st_ino
    };
    let ours = format!("pipe:[{inode}]");
    let held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .filter(|l| *l == ours)
        .collect();
    // SAFETY: closing the two descriptors pipe(2) gave this test.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert!(run(s.command().arg("--stop")).status.success());
    assert!(
        held.is_empty(),
        "the server holds its caller's pipe: {held:?}"
    );
}

/// SIGQUIT logs what each model's workers are doing and how much is queued, and the server
/// keeps serving, where a JVM would print its thread dump.
#[test]
fn sigquit_reports_the_workers_and_keeps_serving() {
    let (mut s, v1, _) = scale_server("");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    // SAFETY: kill(2) on the test's own child.
    unsafe { libc::kill(s.pid() as i32, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("queued=") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = s.log();
    assert!(log.contains("as asked by SIGQUIT"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("model=scale") && l.contains("Ready")),
        "{log}"
    );
    let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
    assert_eq!(r.status, 200, "{}", r.text());
    s.stop_ok();
}

/// With `log_format=json` every line of the log is JSON, the reason a start failed included.
#[test]
fn a_json_log_stays_json_when_the_start_fails() {
    let s = Server::new("log_format=json\n");
    let junk = s.dir.path().join("junk.pt");
    std::fs::write(&junk, vec![7u8; 3000]).unwrap();
    let broken = archive(
        &s.store,
        "broken",
        "1.0",
        &junk,
        std::path::Path::new("tensor"),
        &[],
    );
    let log_file = s.dir.path().join("logs/tchserve.log");
    let failed_start = |rust_log: &str| {
        let _ = std::fs::remove_file(&log_file);
        let mut command = s.command();
        command.env("RUST_LOG", rust_log);
        let out = start_in_background(command, &format!("broken={broken}"));
        assert!(!out.status.success());
        let log = std::fs::read_to_string(&log_file).unwrap();
        for line in log.lines() {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "not JSON: {line:?}\n{log}"
            );
        }
        assert!(
            log.contains("cannot be loaded"),
            "RUST_LOG={rust_log}: {log}"
        );
    };
    failed_start("info");
    // A filter that names only other crates silences the server's own lines, but not why it
    // did not start.
    failed_start("hyper=warn");
}

/// Under `--start` the log rolls over at `log_max_bytes`, keeping `log_max_files` old files,
/// so that it cannot fill the disk the snapshots are written to.
#[test]
fn the_log_rolls_over() {
    let (s, mar, _) = scale_server("log_max_bytes=20000\nlog_max_files=2\n");
    assert_started(&start_in_background(s.command(), &format!("scale={mar}")));
    // About 130 bytes of access log each: several times the limit.
    let mut last_id = String::new();
    for _ in 0..800 {
        let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
        assert_eq!(r.status, 200, "{}", r.text());
        last_id = r.header("x-request-id").unwrap().to_string();
    }
    assert!(run(s.command().arg("--stop")).status.success());
    let logs = s.dir.path().join("logs");
    let size = |name: &str| std::fs::metadata(logs.join(name)).map(|m| m.len());
    for name in ["tchserve.log", "tchserve.log.1", "tchserve.log.2"] {
        let bytes = size(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A batch of access lines (up to 64 KiB) goes out whole before the size is looked at.
        assert!(bytes <= 20_000 + 70_000, "{name}: {bytes} bytes");
    }
    assert!(
        size("tchserve.log.3").is_err(),
        "more old files than log_max_files"
    );
    let newest = std::fs::read_to_string(logs.join("tchserve.log")).unwrap();
    assert!(newest.contains("stopped"), "{newest}");
    // A request is found in the log by the id its answer carried.
    let all: String = ["tchserve.log.1", "tchserve.log"]
        .iter()
        .map(|n| std::fs::read_to_string(logs.join(n)).unwrap())
        .collect();
    assert!(
        all.lines().any(
            |l| l.contains("path=/predictions/scale") && l.ends_with(&format!("id={last_id}"))
        ),
        "{all}"
    );
}

/// With `enable_envvars_config=true`, TS_ variables beat the command-line flags, in
/// TorchServe's order: a deployment's TS_DISABLE_TOKEN_AUTHORIZATION=false keeps the keys on
/// whatever flag a script passes.
#[test]
fn ts_variables_beat_the_flags_as_in_torchserve() {
    let (s, mar, _) = scale_server("enable_envvars_config=true\n");
    let empty_store = s.dir.path().join("empty-store");
    std::fs::create_dir(&empty_store).unwrap();
    let out = run(s
        .command()
        .args(["--start", "--ncs", "--disable-token-auth", "--model-store"])
        .arg(&empty_store)
        .arg("--models")
        .arg(format!("scale={mar}"))
        .env("TS_DISABLE_TOKEN_AUTHORIZATION", "false")
        .env("TS_MODEL_STORE", &s.store));
    let log = || std::fs::read_to_string(s.dir.path().join("logs/tchserve.log")).unwrap();
    // The archive is found in TS_MODEL_STORE, not in the --model-store folder.
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        log()
    );
    let r = post_json(&s.inference, "/predictions/scale", "[1, 2, 3, 4]");
    assert_error(&r, 400, "InvalidKeyException", "Token Authorization failed");
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.dir.path().join("key_file.json")).unwrap())
            .unwrap();
    let key = format!("Bearer {}", keys["inference"]["key"].as_str().unwrap());
    let r = request(
        &s.inference,
        "POST",
        "/predictions/scale",
        &[
            ("Authorization", &key),
            ("Content-Type", "application/json"),
        ],
        b"[1, 2, 3, 4]",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(run(s.command().arg("--stop")).status.success());
}

#[test]
fn register_version_rollback_scale_unregister() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.start(&[]);
    let r = register(&s, &format!("url={v1}&initial_workers=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["status"],
        "Model \"scale\" Version: 1.0 registered with 1 initial workers"
    );
    let r = register(&s, &format!("url={v2}&initial_workers=1&synchronous=true"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_error(
        &register(&s, &format!("url={v2}")),
        409,
        "ConflictStatusException",
        "Model version 2.0 is already registered for model scale",
    );

    let x = "[1, 2, 3, 4]";
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", x).json()),
        [2.0, 4.0, 6.0, 8.0]
    );
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale/2.0", x).json()),
        [3.0, 6.0, 9.0, 12.0]
    );

    let all = s.manage("GET", "/models/scale/all").json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let d = &s.manage("GET", "/models/scale").json()[0];
    assert_eq!(
        (
            d["modelName"].as_str(),
            d["modelVersion"].as_str(),
            d["modelUrl"].as_str()
        ),
        (Some("scale"), Some("1.0"), Some(v1.as_str()))
    );
    assert_eq!(d["workers"][0]["status"], "READY");
    assert_eq!(d["jobQueueStatus"]["remainingCapacity"], 100);
    // customized=true adds what describes the handler: here, its manifest.
    assert!(d.get("customizedMetadata").is_none(), "{d}");
    let c = &s.manage("GET", "/models/scale/2.0?customized=true").json()[0];
    assert_eq!(c["modelVersion"], "2.0");
    assert_eq!(c["customizedMetadata"]["name"], "vec4", "{c}");
    assert_eq!(
        c["customizedMetadata"]["input"],
        json!({"tensor": {"dtype": "float32", "shape": [4]}}),
        "{c}"
    );

    let r = s.manage("PUT", "/models/scale/2.0/set-default");
    assert_eq!(
        r.json()["status"],
        "Default version successfully updated for model \"scale\" to \"2.0\""
    );
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", x).json()),
        [3.0, 6.0, 9.0, 12.0]
    );
    // Rollback.
    assert_eq!(s.manage("PUT", "/models/scale/1.0/set-default").status, 200);
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", x).json()),
        [2.0, 4.0, 6.0, 8.0]
    );
    assert_error(
        &s.manage("PUT", "/models/scale/7.0/set-default"),
        404,
        "ModelVersionNotFoundException",
        "7.0",
    );
    assert_error(
        &s.manage("DELETE", "/models/scale/1.0"),
        403,
        "InvalidModelVersionException",
        "Cannot remove default version for model scale",
    );

    let r = s.manage("PUT", "/models/scale?min_worker=2&synchronous=true");
    assert_eq!(r.json()["status"], "Workers scaled to 2 for model: scale");
    let workers = &s.manage("GET", "/models/scale").json()[0]["workers"];
    assert_eq!(workers.as_array().unwrap().len(), 2);
    assert!(
        workers
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["status"] == "READY"),
        "{workers}"
    );
    let r = s.manage("PUT", "/models/scale/2.0?min_worker=1&synchronous=true");
    assert_eq!(
        r.json()["status"],
        "Workers scaled to 1 for model: scale, version: 2.0"
    );
    // A version named in the query is named in the answer too, as TorchServe names it.
    let r = s.manage(
        "PUT",
        "/models/scale?model_version=2.0&min_worker=1&synchronous=true",
    );
    assert_eq!(
        r.json()["status"],
        "Workers scaled to 1 for model: scale, version: 2.0"
    );
    assert_eq!(s.manage("PUT", "/models/scale?min_worker=1").status, 202);
    // With no worker there is nothing to describe the handler, as TorchServe answers.
    let r = s.manage("PUT", "/models/scale/2.0?min_worker=0&synchronous=true");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_error(
        &s.manage("GET", "/models/scale/2.0?customized=true"),
        503,
        "ServiceUnavailableException",
        "Model \"scale\" has no worker to serve describe request.",
    );
    // OPTIONS on a model describes the management API, once the model is known.
    let r = s.manage("OPTIONS", "/models/scale");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["openapi"], "3.0.1");
    for route in ["/models/scale", "/models/scale/{model_version}"] {
        assert!(r.json()["paths"][route]["put"].is_object(), "{}", r.text());
    }
    let r = s.manage("OPTIONS", "/models/scale/2.0");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["paths"]["/models/scale/2.0/set-default"]["put"].is_object(),
        "{}",
        r.text()
    );
    assert_error(
        &s.manage("OPTIONS", "/models/nope"),
        404,
        "ModelNotFoundException",
        "nope",
    );
    // `all` is described without the handlers' metadata, whatever customized says (TorchServe).
    let r = s.manage("GET", "/models/scale/all?customized=true");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    assert!(
        r.json()[0].get("customizedMetadata").is_none(),
        "{}",
        r.text()
    );
    assert_error(
        &s.manage("PUT", "/models/scale?min_worker=3&max_worker=1"),
        400,
        "BadRequestException",
        "max_worker cannot be less than min_worker.",
    );
    assert_error(
        &s.manage("PUT", "/models/nope?min_worker=1"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );

    let list = s.manage("GET", "/models?limit=1").json();
    assert_eq!(
        list,
        json!({"models": [{"modelName": "scale", "modelUrl": v1}]})
    );

    let r = s.manage("DELETE", "/models/scale/2.0");
    assert_eq!(r.json()["status"], "Model \"scale\" unregistered");
    let r = s.manage("DELETE", "/models/scale");
    assert_eq!(r.status, 200);
    assert_error(
        &post_json(&s.inference, "/predictions/scale", x),
        404,
        "ModelNotFoundException",
        "Model not found: scale",
    );
    assert_eq!(s.manage("GET", "/models").json(), json!({"models": []}));
}

#[test]
fn registration_errors_and_zero_workers() {
    let (mut s, v1, _) = scale_server("enable_model_api=true");
    std::fs::write(s.store.join("handler.py"), "def handle(d, c): return d\n").unwrap();
    let py = archive(
        &s.store,
        "py",
        "1.0",
        &fixtures().join("scale2.pt"),
        &s.store.join("handler.py"),
        &[],
    );
    s.start(&[]);
    assert_error(
        &s.manage("POST", "/models"),
        400,
        "BadRequestException",
        "Parameter url is required.",
    );
    assert_error(
        &register(&s, "url=../x.mar"),
        404,
        "ModelNotFoundException",
        "Relative path is not allowed in url: ../x.mar",
    );
    assert_error(
        &register(&s, "url=missing.mar"),
        404,
        "ModelNotFoundException",
        "Model not found at: missing.mar",
    );
    assert_error(
        &register(&s, &format!("url={v1}&runtime=python4")),
        400,
        "BadRequestException",
        "Invalid RuntimeType value: python4",
    );
    assert_error(
        &register(&s, &format!("url={py}")),
        400,
        "InvalidModelException",
        "Python code",
    );
    // A broken archive is named as the client named it, not by where the store is on the host.
    std::fs::write(s.store.join("broken.mar"), b"not a zip").unwrap();
    let r = register(&s, "url=broken.mar");
    assert_error(&r, 400, "InvalidModelException", "broken.mar");
    let store = s.store.display().to_string();
    assert!(!r.text().contains(&store), "{}", r.text());

    let r = register(&s, &format!("url={v1}&model_name=idle"));
    assert_eq!(
        r.json()["status"],
        "Model \"idle\" Version: 1.0 registered with 0 initial workers. Use scale workers API to add workers for the model."
    );
    assert_error(
        &post_json(&s.inference, "/predictions/idle", "[1,2,3,4]"),
        503,
        "ServiceUnavailableException",
        "has no worker",
    );
    let r = register(
        &s,
        &format!("url={v1}&model_name=later&initial_workers=1&synchronous=false"),
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["status"], "Processing worker updates...");
}

#[test]
fn model_api_is_off_by_default() {
    let (mut s, v1, _) = scale_server("");
    s.start(&["--models", &format!("scale={v1}")]);
    assert_error(
        &register(&s, &format!("url={v1}")),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    assert_error(
        &s.manage("DELETE", "/models/scale"),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    assert_eq!(
        s.manage("PUT", "/models/scale?min_worker=1&synchronous=true")
            .status,
        200
    );
    // --enable-model-api turns it on.
    s.stop();
    let mut s2 = Server::new("");
    std::fs::copy(s.store.join(&v1), s2.store.join(&v1)).unwrap();
    s2.start(&["--enable-model-api"]);
    assert_eq!(register(&s2, &format!("url={v1}")).status, 200);
}

#[test]
fn bad_inputs_and_model_failures_keep_the_server_serving() {
    let mut s = Server::new("enable_model_api=true");
    let picky = fixture_archive(&s, "picky", "picky.pt", "vec4.json");
    s.start(&["--models", &format!("picky={picky}")]);
    let ok = |s: &Server| {
        assert_eq!(
            floats(&post_json(&s.inference, "/predictions/picky", "[0, 1, 2, 3]").json()),
            [1.0, 2.0, 3.0, 4.0]
        )
    };
    ok(&s);
    assert_error(
        &post_json(&s.inference, "/predictions/picky", "[1, 2, 3]"),
        400,
        "InvalidInputException",
        "input shape [3] does not match the model's per-example shape [4]",
    );
    ok(&s);
    assert_error(
        &post_json(&s.inference, "/predictions/picky", "{\"data\": [1, 2,"),
        400,
        "InvalidInputException",
        "not valid JSON",
    );
    assert_error(
        &post_json(&s.inference, "/predictions/picky", "[[1, 2], [3]]"),
        400,
        "InvalidInputException",
        "ragged",
    );
    assert_error(
        &post_json(&s.inference, "/predictions/picky", "[\"a\", 1, 2, 3]"),
        400,
        "InvalidInputException",
        "expected numbers",
    );
    ok(&s);
    assert_error(
        &post_json(&s.inference, "/predictions/picky", "[-1, 1, 2, 3]"),
        500,
        "InternalServerException",
        "negative inputs are not allowed",
    );
    ok(&s);
    // Raw little-endian bytes, with and without a shape header.
    let raw: Vec<u8> = [0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[("Content-Type", "application/octet-stream")],
        &raw,
    );
    assert_eq!(
        r.json(),
        json!([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    );
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[
            ("Content-Type", "application/octet-stream"),
            ("X-Tensor-Shape", "2,4"),
        ],
        &raw,
    );
    assert_eq!(
        r.json(),
        json!([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    );
    assert_error(
        &s.infer(
            "POST",
            "/predictions/picky",
            &[("Content-Type", "application/octet-stream")],
            &raw[..6],
        ),
        400,
        "InvalidInputException",
        "6 bytes",
    );
    // The request forms TorchServe clients use.
    let r = post_json(
        &s.inference,
        "/predictions/picky",
        "{\"instances\": [[0, 0, 0, 0], [1, 1, 1, 1]]}",
    );
    assert_eq!(
        r.json(),
        json!({"predictions": [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]})
    );
    let r = post_json(
        &s.inference,
        "/predictions/picky",
        "{\"data\": [0, 0, 0, 1]}",
    );
    assert_eq!(r.json(), json!([1.0, 1.0, 1.0, 2.0]));
    let boundary = "XyZ";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\nContent-Type: application/json\r\n\r\n[4, 3, 2, 1]\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[("Content-Type", &ct)],
        form.as_bytes(),
    );
    assert_eq!(r.json(), json!([5.0, 4.0, 3.0, 2.0]), "{}", r.text());
    // Unknown names.
    assert_error(
        &post_json(&s.inference, "/predictions/nope", "[1]"),
        404,
        "ModelNotFoundException",
        "Model not found: nope",
    );
    assert_error(
        &post_json(&s.inference, "/predictions/picky/3.0", "[1]"),
        404,
        "ModelVersionNotFoundException",
        "Model version: 3.0 does not exist for model: picky",
    );
    assert_error(
        &s.infer("GET", "/nowhere", &[], b""),
        404,
        "ResourceNotFoundException",
        "Requested resource is not found",
    );
    // KServe's liveness answer, which its v1 REST client's is_server_live reads; other
    // methods on `/` are 405, as TorchServe answers.
    let r = s.infer("GET", "/", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"status": "alive"}));
    assert_error(
        &s.infer("DELETE", "/", &[], b""),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    assert_error(
        &request(&s.management, "GET", "/", &[], b""),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    let doc = s.infer("OPTIONS", "/", &[], b"").json();
    assert_eq!(doc["openapi"], "3.0.1");
    assert!(
        doc["paths"]["/predictions/{model_name}"].is_object(),
        "{doc}"
    );
    assert_eq!(s.infer("GET", "/api-description", &[], b"").json(), doc);
    // A model's own route describes that model's prediction routes when the model is there,
    // and is 404 for one that is not, as TorchServe looks the model up first.
    let picky = s.infer("OPTIONS", "/predictions/picky", &[], b"").json();
    assert_eq!(picky["openapi"], "3.0.1");
    assert!(
        picky["info"]["title"].as_str().unwrap().contains("picky"),
        "{picky}"
    );
    let routes: Vec<&String> = picky["paths"].as_object().unwrap().keys().collect();
    assert_eq!(
        routes,
        [
            "/predictions/picky",
            "/v1/models/picky:predict",
            "/v2/models/picky/infer"
        ],
        "{picky}"
    );
    for route in routes {
        assert!(picky["paths"][route]["post"].is_object(), "{picky}");
    }
    assert_error(
        &s.infer("OPTIONS", "/predictions/nope", &[], b""),
        404,
        "ModelNotFoundException",
        "nope",
    );
    // The metrics listener describes its one route too, as TorchServe's does.
    let metrics_doc = request(&s.metrics, "OPTIONS", "/", &[], b"").json();
    assert!(
        metrics_doc["paths"]["/metrics"]["get"].is_object(),
        "{metrics_doc}"
    );
    ok(&s);
}

#[test]
fn one_bad_request_never_fails_its_batch_mates() {
    let mut s = Server::new("enable_model_api=true");
    let picky = fixture_archive(&s, "picky", "picky.pt", "vec4.json");
    s.start(&[]);
    let r = register(
        &s,
        &format!("url={picky}&initial_workers=1&batch_size=8&max_batch_delay=500"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let bodies: Vec<String> = (0..8)
        .map(|i| match i {
            3 => "[-1, 0, 0, 0]".to_string(),
            5 => "[1, 2]".to_string(),
            _ => format!("[{i}, {}, 0.5, -0.0]", i * 10),
        })
        .collect();
    let batched: Vec<Resp> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| scope.spawn(|| post_json(&s.inference, "/predictions/picky", b)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in batched.iter().enumerate() {
        match i {
            3 => assert_error(
                r,
                500,
                "InternalServerException",
                "negative inputs are not allowed",
            ),
            5 => assert_eq!(r.status, 400, "{}", r.text()),
            _ => {
                assert_eq!(r.status, 200, "request {i}: {}", r.text());
                // Identical to the same request served alone.
                let alone = post_json(&s.inference, "/predictions/picky", &bodies[i]);
                assert_eq!(r.body, alone.body, "request {i}");
            }
        }
    }
    let metrics = s.metrics_text();
    let count = metric(
        &metrics,
        "tchserve_batch_size_count{model_name=\"picky\",model_version=\"1.0\"}",
    );
    let sum = metric(
        &metrics,
        "tchserve_batch_size_sum{model_name=\"picky\",model_version=\"1.0\"}",
    );
    assert!(
        sum / count > 1.0,
        "no batching happened: {count} batches for {sum} requests"
    );
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
}

/// A server with the slow fixture model registered as `slow`, one worker, with `query` added
/// to the registration.
fn slow_server(config: &str, query: &str) -> Server {
    let mut s = Server::new(config);
    let slow = fixture_archive(&s, "slow", "slow.pt", "vec2.json");
    s.start(&[]);
    let r = register(&s, &format!("url={slow}&initial_workers=1{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    s
}

#[test]
fn a_full_queue_answers_503_at_once() {
    let s = slow_server("enable_model_api=true\njob_queue_size=2", "");
    let results: Vec<(u16, Duration)> = std::thread::scope(|scope| {
        let first =
            scope.spawn(|| post_json(&s.inference, "/predictions/slow", "[30000, 0]").status);
        std::thread::sleep(Duration::from_millis(300));
        let rest: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let t = Instant::now();
                    (
                        post_json(&s.inference, "/predictions/slow", "[1, 0]").status,
                        t.elapsed(),
                    )
                })
            })
            .collect();
        let mut out: Vec<(u16, Duration)> = rest.into_iter().map(|h| h.join().unwrap()).collect();
        out.push((first.join().unwrap(), Duration::ZERO));
        out
    });
    let rejected: Vec<_> = results.iter().filter(|(st, _)| *st == 503).collect();
    assert!(rejected.len() >= 5, "{results:?}");
    assert!(
        rejected.iter().all(|(_, t)| *t < Duration::from_secs(1)),
        "503 was not immediate: {results:?}"
    );
    assert!(
        results.iter().all(|(st, _)| *st == 200 || *st == 503),
        "{results:?}"
    );
    let r = post_json(&s.inference, "/predictions/slow", "[1, 5]");
    assert_eq!(floats(&r.json()), [1.0, 5.0]);
}

/// A request whose client goes away before its answer still gets its access line, with 499,
/// so that the log holds every request accepted.
#[test]
fn a_request_whose_client_went_away_is_logged_499() {
    let s = slow_server("enable_model_api=true", "");
    let head = "POST /predictions/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 8\r\n\r\n[3000,0]";
    let mut c = std::net::TcpStream::connect(&s.inference).unwrap();
    std::io::Write::write_all(&mut c, head.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(20);
    let logged = || {
        s.log()
            .lines()
            .any(|l| l.contains("path=/predictions/slow status=499"))
    };
    while !logged() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logged(), "{}", s.log());
}

#[test]
fn a_shape_the_model_cannot_take_is_the_clients_mistake() {
    // The built-in `tensor` handler declares no shape: only the model knows it takes 784.
    let mut s = Server::new("");
    let mlp = archive(
        &s.store,
        "mlp",
        "1.0",
        &fixtures().join("mlp.pt"),
        std::path::Path::new("tensor"),
        &[],
    );
    s.start(&["--models", &format!("mlp={mlp}")]);
    let good = format!("[{}]", vec!["0.5"; 784].join(", "));
    assert_eq!(
        post_json(&s.inference, "/predictions/mlp", &good).status,
        200
    );
    let r = post_json(&s.inference, "/predictions/mlp", "[1, 2, 3, 4, 5]");
    assert_error(
        &r,
        400,
        "InvalidInputException",
        "the model cannot take this input, examples of shape [5] (float32); it last ran on \
         examples of shape [784] (float32)",
    );
    // libtorch's own words follow, for the client to see what did not fit.
    assert!(r.text().contains("784"), "{}", r.text());
    assert_eq!(
        post_json(&s.inference, "/predictions/mlp", &good).status,
        200
    );
}

#[test]
fn a_model_out_of_memory_answers_507_and_serves_on() {
    let mut s = Server::new("");
    let greedy = fixture_archive(&s, "greedy", "greedy.pt", "vec2.json");
    s.start(&["--models", &format!("greedy={greedy}")]);
    // 1 TiB: libtorch's allocator refuses it at once.
    let r = post_json(&s.inference, "/predictions/greedy", "[1024, 0]");
    assert_error(&r, 507, "InternalServerException", "Out of resources");
    assert!(r.text().contains("allocate"), "{}", r.text());
    let r = post_json(&s.inference, "/predictions/greedy", "[0, 5]");
    assert_eq!(floats(&r.json()), [0.0, 5.0]);
}

#[test]
fn a_model_that_refuses_zeros_serves_without_a_warm_up() {
    // Loading runs the model on zeros (a warm-up, and a probe of the handler's stages); a model
    // that refuses them of its own accord still serves, as TorchServe serves it.
    let mut s = Server::new("");
    let mar = fixture_archive(&s, "no_zeros", "no_zeros.pt", "vec4.json");
    s.start(&["--models", &format!("no_zeros={mar}")]);
    let r = post_json(&s.inference, "/predictions/no_zeros", "[1, 2, 3, 4]");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(floats(&r.json()), [2.0, 3.0, 4.0, 5.0]);
    let r = post_json(&s.inference, "/predictions/no_zeros", "[0, 0, 0, 0]");
    assert_error(&r, 500, "InternalServerException", "an input of zeros");
    assert!(
        s.log().contains("serving it without a warm-up"),
        "{}",
        s.log()
    );
}

#[test]
fn job_tickets_and_client_timeouts_come_from_the_yaml() {
    let mut s = Server::new("enable_model_api=true");
    let slow_with = |name: &str, yaml: &str| {
        let file = s.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).unwrap();
        archive(
            &s.store,
            name,
            "1.0",
            &fixtures().join("slow.pt"),
            &fixture_handler("vec2.json"),
            &["--config-file", file.to_str().unwrap()],
        )
    };
    let ticket = slow_with(
        "ticket",
        "minWorkers: 1\nmaxWorkers: 1\nuseJobTicket: true\n",
    );
    let expiring = slow_with(
        "expiring",
        "minWorkers: 1\nmaxWorkers: 1\nclientTimeoutInMills: 1000\n",
    );
    s.start(&[]);
    for url in [&ticket, &expiring] {
        let r = register(&s, &format!("url={url}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let described =
        |m: &str, key: &str| s.manage("GET", &format!("/models/{m}")).json()[0][key].clone();
    assert_eq!(described("ticket", "useJobTicket"), json!(true));
    assert_eq!(described("expiring", "clientTimeoutInMills"), json!(1000));
    assert_eq!(described("expiring", "useJobTicket"), json!(false));

    // A request that finds the model's one worker free runs; one sent while it is busy is
    // refused at once instead of queueing behind it.
    let admitted = |body: &'static str| loop {
        // The worker takes a moment between answering and waiting again.
        let r = post_json(&s.inference, "/predictions/ticket", body);
        if r.status != 503 {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (long, refused) = std::thread::scope(|scope| {
        let long = scope.spawn(|| admitted("[30000, 0]"));
        std::thread::sleep(Duration::from_millis(300));
        // Until the long one has the worker, a short one may still find it free.
        let mut tries = 0;
        let r = loop {
            let r = post_json(&s.inference, "/predictions/ticket", "[1, 2]");
            tries += 1;
            if r.status == 503 || tries == 40 {
                break r;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let answered = Instant::now();
        (long.join().unwrap(), (r, answered))
    });
    assert_eq!(long.status, 200, "{}", long.text());
    let (r, answered) = refused;
    assert_error(&r, 503, "ServiceUnavailableException", "useJobTicket");
    // Refused while the long forward still ran, not once it was over.
    let long_ended_after = answered.elapsed();
    assert!(
        long_ended_after > Duration::from_millis(200),
        "the refusal came only {long_ended_after:?} before the long forward ended"
    );
    assert_eq!(floats(&admitted("[1, 2]").json()), [1.0, 2.0]);

    // A request queued for longer than clientTimeoutInMills is answered without running.
    let (long, late) = std::thread::scope(|scope| {
        let long = scope.spawn(|| post_json(&s.inference, "/predictions/expiring", "[30000, 0]"));
        std::thread::sleep(Duration::from_millis(200));
        let late = post_json(&s.inference, "/predictions/expiring", "[1, 2]");
        (long.join().unwrap(), late)
    });
    assert_eq!(long.status, 200, "{}", long.text());
    assert_error(
        &late,
        504,
        "RequestTimeoutException",
        "clientTimeoutInMills (1000 ms)",
    );
    let r = post_json(&s.inference, "/predictions/expiring", "[1, 2]");
    assert_eq!(floats(&r.json()), [1.0, 2.0]);
}

#[test]
fn requests_queued_when_scaled_to_no_worker_are_answered_at_once() {
    let s = slow_server("enable_model_api=true", "&response_timeout=120");
    let timed = |body: &'static str| {
        let r = post_json(&s.inference, "/predictions/slow", body);
        (r, Instant::now())
    };
    let (running, queued) = std::thread::scope(|scope| {
        // The one worker runs a forward of about 3 s; two requests queue behind it.
        let running = scope.spawn(|| timed("[30000, 0]"));
        std::thread::sleep(Duration::from_millis(300));
        let queued: Vec<_> = (0..2).map(|_| scope.spawn(|| timed("[1, 0]"))).collect();
        // Batches of one: two waiting means the first one runs.
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.manage("GET", "/models/slow").json()[0]["jobQueueStatus"]["pendingRequests"] != 2 {
            assert!(Instant::now() < deadline, "the two requests never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            s.manage("PUT", "/models/slow?min_worker=0&max_worker=0")
                .status,
            202
        );
        let queued: Vec<_> = queued.into_iter().map(|h| h.join().unwrap()).collect();
        (running.join().unwrap(), queued)
    });
    // The stopping worker answers what it runs; what waited for it is answered before that,
    // not after its response_timeout.
    assert_eq!(floats(&running.0.json()), [30000.0, 0.0]);
    for (r, done) in &queued {
        assert_error(r, 503, "ServiceUnavailableException", "scaled to no worker");
        assert!(*done < running.1, "answered only after the running forward");
    }
    assert_eq!(
        s.manage("GET", "/models/slow").json()[0]["jobQueueStatus"]["pendingRequests"],
        0
    );
    assert_eq!(
        s.manage("PUT", "/models/slow?min_worker=1&synchronous=true")
            .status,
        200
    );
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/slow", "[1, 2]").json()),
        [1.0, 2.0]
    );
}

#[test]
fn a_worker_stuck_past_the_response_timeout_is_replaced() {
    let mut s = slow_server("enable_model_api=true", "&response_timeout=1");
    let worker_ids = || -> Vec<u64> {
        s.manage("GET", "/models/slow").json()[0]["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let first = worker_ids();
    assert_eq!(first.len(), 1);
    // About a minute of forward on this machine: far longer than the test, so whatever serves
    // meanwhile is not the worker that runs it.
    let t = Instant::now();
    assert_error(
        &post_json(&s.inference, "/predictions/slow", "[600000, 0]"),
        504,
        "RequestTimeoutException",
        "timed out after 1 s",
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Within a second or two a new worker takes the stuck one's place and serves the queue.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = post_json(&s.inference, "/predictions/slow", "[1, 2]");
        if r.status == 200 {
            assert_eq!(floats(&r.json()), [1.0, 2.0]);
            break;
        }
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "no worker took the stuck one's place"
        );
    }
    let now = worker_ids();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first);
    // The old thread runs on in its forward beside the new one: it cannot be killed. (Threads
    // a worker starts take its name, so a worker may count more than one.)
    assert!(common::worker_threads(s.pid(), &first[0].to_string()) >= 1);
    assert!(common::worker_threads(s.pid(), &now[0].to_string()) >= 1);
    let log = s.log();
    assert!(log.contains("a new worker takes this one's place"), "{log}");
    // An operator sees both in the metrics, per model.
    let metrics = s.metrics_text();
    let labels = "{model_name=\"slow\",model_version=\"1.0\"}";
    assert_eq!(
        metric(
            &metrics,
            &format!("tchserve_workers_replaced_total{labels}")
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, &format!("tchserve_timeouts_total{labels}")) >= 1.0,
        "{metrics}"
    );

    // A stop does not wait for the thread that was replaced, nor run libtorch's destructors
    // beneath it.
    let status = s.stop();
    assert!(status.success(), "{status}\n{}", s.log());
    assert!(s.log().contains("still inside a forward"), "{}", s.log());
}

#[test]
fn a_model_that_hangs_again_is_given_one_stuck_thread_per_worker() {
    let s = slow_server("enable_model_api=true", "&response_timeout=1");
    let hang = |body: &str| {
        assert_error(
            &post_json(&s.inference, "/predictions/slow", body),
            504,
            "RequestTimeoutException",
            "timed out after 1 s",
        )
    };
    let wait_for = |line: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.log().contains(line) {
            assert!(Instant::now() < deadline, "{}", s.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = s.manage("GET", "/models/slow").json()[0]["workers"][0]["id"].clone();
    hang("[600000, 0]");
    wait_for("a new worker takes this one's place");
    // Registering the version again does not start its count of stuck threads afresh.
    let t = Instant::now();
    let r = s.manage("DELETE", "/models/slow");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let r = register(&s, "url=slow-1.0.mar&initial_workers=1&response_timeout=1");
    assert_eq!(r.status, 200, "{}", r.text());
    // A second request that hangs the model while the first still runs is not given a third
    // thread: one stuck thread per worker at most, said once in the log.
    hang("[600000, 1]");
    wait_for("is not replaced until one of them returns");
    std::thread::sleep(Duration::from_millis(2500));
    let log = s.log();
    assert_eq!(
        log.matches("is not replaced until one of them returns")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("a new worker takes this one's place").count(),
        1,
        "{log}"
    );
    // A model that serves nothing says so wherever a probe or an operator looks.
    let described = s.manage("GET", "/models/slow").json();
    let workers = described[0]["workers"].as_array().unwrap().clone();
    assert_eq!(workers.len(), 1, "{described}");
    assert_eq!(workers[0]["status"], "FAILED", "{described}");
    let ping = s.infer("GET", "/ping", &[], b"");
    assert_eq!(ping.status, 500, "{}", ping.text());
    let ready = s.infer("GET", "/v2/models/slow/ready", &[], b"");
    assert_eq!(ready.status, 503, "{}", ready.text());
    // SIGQUIT names the thread out of its pool as well, and the one stuck in it.
    // SAFETY: kill(2) on the test's own child.
    unsafe { libc::kill(s.pid() as i32, libc::SIGQUIT) };
    wait_for(&format!(
        "out of its model version, not returned yet: slow:1.0 worker {}, ",
        first.as_str().unwrap()
    ));
    wait_for("(in a batch for ");
    // A synchronous scale starts its workers as asked, the stuck one notwithstanding.
    let r = s.manage("PUT", "/models/slow?min_worker=2&synchronous=true");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(&s.inference, "/predictions/slow", "[1, 2]");
    assert_eq!(floats(&r.json()), [1.0, 2.0]);
}

/// A synchronous registration answers at its startup_timeout, not when a long load ends.
#[test]
fn a_synchronous_registration_fails_at_its_startup_timeout() {
    let mut s = Server::new("enable_model_api=true");
    fixture_archive(&s, "slow_start", "slow_start.pt", "vec2.json");
    s.start(&[]);
    let r = register(
        &s,
        "url=slow_start-1.0.mar&initial_workers=1&synchronous=true&startup_timeout=1",
    );
    assert_error(
        &r,
        500,
        "InternalServerException",
        "not ready within startup_timeout (1 s)",
    );
    // The load (seconds of warm-up) is still under way, and the log says what happened.
    let log = s.log();
    assert!(!log.contains("worker ready"), "{log}");
    assert!(!log.contains("stopped while loading"), "{log}");
    assert!(
        log.contains("registration refused: not ready within startup_timeout (1 s)"),
        "{log}"
    );
    assert_eq!(s.manage("GET", "/models").json(), json!({"models": []}));
    // While that load goes on, trying again is refused at once rather than starting another.
    let again = register(
        &s,
        "url=slow_start-1.0.mar&initial_workers=1&synchronous=true&startup_timeout=1",
    );
    assert_error(
        &again,
        503,
        "ServiceUnavailableException",
        "still loading for a registration that was refused",
    );
    // SAFETY: kill(2) on the test's own child.
    unsafe { libc::kill(s.pid() as i32, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log().contains("slow_start:1.0 worker") {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.log().contains(", loading"), "{}", s.log());
}

#[test]
fn snapshot_restores_registrations_after_restart() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.start(&[]);
    assert_eq!(
        register(
            &s,
            &format!("url={v1}&initial_workers=1&batch_size=4&max_batch_delay=7")
        )
        .status,
        200
    );
    assert_eq!(
        register(&s, &format!("url={v2}&initial_workers=1")).status,
        200
    );
    assert_eq!(s.manage("PUT", "/models/scale/2.0/set-default").status, 200);
    assert_eq!(
        s.manage(
            "PUT",
            "/models/scale/1.0?min_worker=2&max_worker=3&synchronous=true"
        )
        .status,
        200
    );
    s.stop_ok();

    s.start(&[]);
    let all = s.manage("GET", "/models/scale/all").json();
    let v1d = all
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["modelVersion"] == "1.0")
        .unwrap();
    assert_eq!(
        (v1d["batchSize"].as_u64(), v1d["maxBatchDelay"].as_u64()),
        (Some(4), Some(7))
    );
    assert_eq!(
        (v1d["minWorkers"].as_u64(), v1d["maxWorkers"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(v1d["workers"].as_array().unwrap().len(), 2);
    // The default version survived too.
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,1,1,1]").json()),
        [3.0; 4]
    );
    s.stop_ok();

    // --ncs neither restores nor writes.
    s.start(&["--ncs"]);
    assert_eq!(s.manage("GET", "/models").json(), json!({"models": []}));
}

#[test]
fn a_restart_keeps_the_scale_and_finds_a_moved_store() {
    let (mut s, v1, _) = scale_server("enable_model_api=true");
    let yaml = s.dir.path().join("model-config.yaml");
    std::fs::write(&yaml, "minWorkers: 2\nmaxWorkers: 3\n").unwrap();
    let yml = archive(
        &s.store,
        "yml",
        "1.0",
        &fixtures().join("scale2.pt"),
        &fixture_handler("vec4.json"),
        &["--config-file", yaml.to_str().unwrap()],
    );
    s.start(&[]);
    assert_eq!(register(&s, &format!("url={yml}")).status, 200);
    let workers = |s: &Server| s.manage("GET", "/models/yml").json()[0]["workers"].clone();
    assert_eq!(workers(&s).as_array().unwrap().len(), 2, "from the yaml");
    let r = s.manage(
        "PUT",
        "/models/yml?min_worker=1&max_worker=1&synchronous=true",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // By absolute path, as `file://`.
    let path = s.store.join(&v1);
    let r = register(
        &s,
        &format!("url=file://{}&initial_workers=1", path.display()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    s.stop_ok();

    // The store moves (mounted elsewhere, a folder renamed): the snapshot still finds it.
    let moved = s.dir.path().join("moved-store");
    std::fs::rename(&s.store, &moved).unwrap();
    s.store = moved;
    s.start(&[]);
    // The scale made through the API beats the archive's yaml, as in TorchServe's restore.
    let d = &s.manage("GET", "/models/yml").json()[0];
    assert_eq!(
        (d["minWorkers"].as_u64(), d["maxWorkers"].as_u64()),
        (Some(1), Some(1)),
        "{d}"
    );
    assert_eq!(workers(&s).as_array().unwrap().len(), 1);
    // What a snapshot restores counts as registered through the API, as in TorchServe.
    assert_eq!(d["loadedAtStartup"], false, "{d}");
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,1,1,1]").json()),
        [2.0; 4]
    );
}

#[test]
fn the_version_listed_first_is_the_default_at_start_up() {
    // 1.0 starts three workers and 2.0 one, so 2.0 tends to be ready first; 1.0 is listed
    // first and is the default every time, as TorchServe registers the list in order.
    let (mut s, v1, v2) =
        scale_server(r#"models={"scale": {"1.0": {"minWorkers": 3, "maxWorkers": 3}}}"#);
    for _ in 0..3 {
        s.start(&["--ncs", "--models", &v1, &v2]);
        assert_eq!(
            floats(&post_json(&s.inference, "/predictions/scale", "[1,1,1,1]").json()),
            [2.0; 4]
        );
        s.stop_ok();
    }
}

#[test]
fn json_registrations_read_as_torchserve_reads_them() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.start(&[]);
    let post = |content_type: &str, body: &str| {
        request(
            &s.management,
            "POST",
            "/models",
            &[("Content-Type", content_type)],
            body.as_bytes(),
        )
    };
    // null is an absent field, and 1.0 the whole number 1, as TorchServe's JSON reader takes
    // them.
    let r = post(
        "application/json",
        &format!(r#"{{"url": "{v1}", "batch_size": null, "initial_workers": 1.0}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = &s.manage("GET", "/models/scale").json()[0];
    assert_eq!(d["batchSize"], 1, "{d}");
    assert_eq!(d["workers"].as_array().unwrap().len(), 1, "{d}");
    let r = post(
        "application/json",
        &format!(r#"{{"url": "{v2}", "initial_workers": 1.5}}"#),
    );
    assert_error(&r, 400, "BadRequestException", "initial_workers");
    // The media type is read whatever its case.
    let r = post(
        "Application/JSON; charset=utf-8",
        &format!(r#"{{"url": "{v2}", "model_name": "named"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.manage("GET", "/models/named").status, 200);
}

#[test]
fn max_response_size_holds_for_the_whole_answer() {
    let (mut s, v1, _) = scale_server("max_response_size=300");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    // One small answer passes.
    let r = post_json(&s.inference, "/predictions/scale", "[1,1,1,1]");
    assert_eq!(r.status, 200, "{}", r.text());
    // KServe v1: 30 instances, each answer small, the whole over the limit.
    let instances = vec!["[1,1,1,1]"; 30].join(",");
    let r = post_json(
        &s.inference,
        "/v1/models/scale:predict",
        &format!("{{\"instances\": [{instances}]}}"),
    );
    assert_kserve_error(&r, 500, "exceeds max_response_size (300)");
    // v2 JSON: 240 bytes of float32, written as more than 300 bytes of JSON numbers.
    let v2 = |rows: usize| {
        let data = vec!["1.5"; rows * 4].join(",");
        post_json(
            &s.inference,
            "/v2/models/scale/infer",
            &format!(
                "{{\"inputs\": [{{\"name\": \"input0\", \"datatype\": \"FP32\", \
                 \"shape\": [{rows}, 4], \"data\": [{data}]}}]}}"
            ),
        )
    };
    assert_eq!(v2(2).status, 200, "{}", v2(2).text());
    assert_kserve_error(&v2(15), 500, "exceeds max_response_size (300)");
    // And the server serves on.
    assert_eq!(
        post_json(&s.inference, "/predictions/scale", "[1,1,1,1]").status,
        200
    );
}

#[test]
fn an_empty_store_with_models_all_says_so() {
    // Ready and serving nothing is what an empty volume looks like: the log says why.
    let mut s = Server::new("");
    s.start(&["--models", "all", "--ncs"]);
    assert_eq!(s.manage("GET", "/models").json(), json!({"models": []}));
    assert!(s.log().contains("holds no archive"), "{}", s.log());
}

#[test]
fn graceful_stop_finishes_requests_in_flight() {
    let mut s = Server::new("");
    let slow = fixture_archive(&s, "slow", "slow.pt", "vec2.json");
    s.start(&["--models", &format!("slow={slow}")]);
    let inference = s.inference.clone();
    let in_flight =
        std::thread::spawn(move || post_json(&inference, "/predictions/slow", "[15000, 3]"));
    std::thread::sleep(Duration::from_millis(300));
    let status = s.stop();
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(floats(&r.json()), [15000.0, 3.0]);
    assert!(status.success(), "{status}");
}

#[test]
fn a_second_stop_signal_stops_waiting_for_the_drain() {
    let mut s = Server::new("enable_model_api=true");
    let slow = fixture_archive(&s, "slow", "slow.pt", "vec2.json");
    s.start(&["--models", &format!("slow={slow}")]);
    let send = |body: &'static str| {
        let inference = s.inference.clone();
        std::thread::spawn(move || {
            common::http::try_request(
                &inference,
                "POST",
                "/predictions/slow",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
                Duration::from_secs(180),
            )
        })
    };
    // About a minute of forward, longer than the test and than the 30 s grace period, and a
    // second request queued behind it.
    let running = send("[600000, 0]");
    // SIGQUIT says when a worker is inside a batch: then the second request queues behind it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains("(in a batch for ") {
        assert!(Instant::now() < deadline, "the first request never ran");
        // SAFETY: kill(2) on the test's own child.
        unsafe { libc::kill(s.pid() as i32, libc::SIGQUIT) };
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = send("[1, 0]");
    while s.manage("GET", "/models/slow").json()[0]["jobQueueStatus"]["pendingRequests"] != 1 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A terminal's Ctrl-C that reaches a wrapper script and the server, and the wrapper's own
    // signal passed on a moment later, are one stop: the server goes on draining.
    let signal = |sig: i32| {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(s.pid() as i32, sig) };
    };
    signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(150));
    signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains("stopping: unready") {
        assert!(Instant::now() < deadline, "{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !s.log().contains("asked again to stop"),
        "two signals at once were taken for two:\n{}",
        s.log()
    );
    let asked_again = Instant::now();
    signal(libc::SIGTERM);
    let status = s.wait();
    let took = asked_again.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after the second signal"
    );
    assert!(status.success(), "{status}");
    let log = s.log();
    assert!(log.contains("asked again to stop"), "{log}");
    // The log says what was cut: the batch running and the request queued behind it.
    assert!(
        log.lines()
            .any(|l| l.contains("requests cut off unanswered") && l.contains("queued=1")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("cut off inside a batch") && l.contains("model=slow")),
        "{log}"
    );
    assert!(log.contains("stopped, with work cut off"), "{log}");
    // Their clients learn the server went away rather than waiting on.
    assert!(running.join().unwrap().is_err());
    assert!(queued.join().unwrap().is_err());
}

#[test]
fn sigterm_under_load_answers_every_accepted_request() {
    // One worker at batch 1 and requests of about 0.1 s each: most of them still wait in the
    // queue when the signal comes.
    let mut s = Server::new("job_queue_size=100");
    let slow = fixture_archive(&s, "slow", "slow.pt", "vec2.json");
    s.start(&["--models", &format!("slow={slow}")]);
    let ready = |addr: &str| {
        common::http::try_request(
            addr,
            "GET",
            "/v2/health/ready",
            &[],
            b"",
            Duration::from_secs(5),
        )
    };
    assert_eq!(ready(&s.inference).unwrap().status, 200);
    const CLIENTS: usize = 24;
    let (answers, signalled, refused) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let addr = s.inference.clone();
                scope.spawn(move || {
                    let body = format!("[1000, {i}]");
                    let r = common::http::try_request(
                        &addr,
                        "POST",
                        "/predictions/slow",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                        Duration::from_secs(60),
                    );
                    (i, r, Instant::now())
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let signalled = Instant::now();
        s.signal_stop();
        // Once the server has seen the signal, readiness never says yes again, and new
        // connections are refused soon.
        let mut unready = false;
        let refused = loop {
            match ready(&s.inference) {
                Ok(r) if r.status == 200 => assert!(!unready, "ready again while stopping"),
                Ok(_) => unready = true,
                Err(_) => break Instant::now(),
            }
            assert!(
                signalled.elapsed() < Duration::from_secs(10),
                "still accepting"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (answers, signalled, refused)
    });
    let status = s.wait();
    for (i, r, _) in &answers {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} lost: {e}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(floats(&r.json()), [1000.0, *i as f64]);
    }
    // The test means something only when the queue outlived the listener.
    let after_refusal = answers.iter().filter(|(_, _, at)| *at > refused).count();
    assert!(
        after_refusal >= 5,
        "only {after_refusal} answers came after the listener closed ({:?} after the signal)",
        refused - signalled
    );
    assert!(status.success(), "{status}\n{}", s.log());
    assert!(s.log().contains("stopped"), "{}", s.log());
}

/// A stop does not wait out the batch delay for a batch that can no longer fill: nothing more
/// is accepted, so what is in flight runs at once and is answered within the grace period.
#[test]
fn a_stop_runs_a_partial_batch_at_once() {
    let (mut s, v1, _) = scale_server(
        "graceful_shutdown_timeout=4\n\
         models={\"scale\": {\"1.0\": {\"batchSize\": 8, \"maxBatchDelay\": 20000}}}\n",
    );
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    let answers = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..3)
            .map(|i| {
                let inference = s.inference.clone();
                scope.spawn(move || {
                    common::http::try_request(
                        &inference,
                        "POST",
                        "/predictions/scale",
                        &[("Content-Type", "application/json")],
                        format!("[{i}, 1, 1, 1]").as_bytes(),
                        Duration::from_secs(60),
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        s.signal_stop();
        let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        (answers, t.elapsed())
    });
    let (answers, took) = answers;
    for (i, r) in answers.iter().enumerate() {
        let r = r
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} lost: {e}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(floats(&r.json())[0], 2.0 * i as f64);
    }
    // Well inside the 20 s delay and the 4 s grace period.
    assert!(
        took < Duration::from_secs(3),
        "answered {took:?} after the stop"
    );
    let status = s.wait();
    assert!(status.success(), "{status}\n{}", s.log());
}

#[test]
fn graceful_shutdown_timeout_bounds_a_stop() {
    let mut s = Server::new("graceful_shutdown_timeout=1");
    let slow = fixture_archive(&s, "slow", "slow.pt", "vec2.json");
    s.start(&["--models", &format!("slow={slow}")]);
    let inference = s.inference.clone();
    // About 6 s of work: far past the grace period.
    let in_flight = std::thread::spawn(move || {
        common::http::try_request(
            &inference,
            "POST",
            "/predictions/slow",
            &[("Content-Type", "application/json")],
            b"[60000, 1]",
            Duration::from_secs(60),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let status = s.stop();
    let took = t.elapsed();
    assert!(status.success(), "{status}\n{}", s.log());
    assert!(took < Duration::from_secs(4), "the stop took {took:?}");
    assert!(in_flight.join().unwrap().is_err(), "cut off, not answered");
    assert!(
        s.log().contains("graceful_shutdown_timeout passed"),
        "{}",
        s.log()
    );
}

#[test]
fn token_authorization_guards_inference_and_management() {
    let (mut s, v1, _) = scale_server("disable_token_authorization=false");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    let key_file = s.home().join("key_file.json");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only the owner may read the keys");
    }
    let keys: Value = serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    let bearer = |kind: &str| format!("Bearer {}", keys[kind]["key"].as_str().unwrap());
    let (inference, management, api) = (bearer("inference"), bearer("management"), bearer("API"));
    let (inference_addr, management_addr) = (s.inference.clone(), s.management.clone());
    let predict = move |auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(
            &inference_addr,
            "POST",
            "/predictions/scale",
            &headers,
            b"[1,2,3,4]",
        )
    };
    let manage = move |path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(&management_addr, "GET", path, &headers, b"")
    };
    let refused = "Token Authorization failed";

    assert_error(&predict(None), 400, "InvalidKeyException", refused);
    assert_error(
        &predict(Some(&management)),
        400,
        "InvalidKeyException",
        refused,
    );
    assert_error(
        &predict(Some("Bearer nope")),
        400,
        "InvalidKeyException",
        refused,
    );
    let r = predict(Some(&inference));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(floats(&r.json()), [2.0, 4.0, 6.0, 8.0]);
    // Refused before the body is read: a body announced and never sent is not waited for
    // (body_read_timeout is 60 s; without the check the answer would be its 408).
    for path in ["/predictions/scale", "/v2/models/scale/infer"] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\nConnection: close\r\n\r\n[1,"
        );
        let raw = common::http::send_raw(&s.inference, head.as_bytes(), Duration::from_secs(20))
            .expect("answered before the body");
        let r = common::http::parse(&raw).expect("an HTTP answer");
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.text().contains(refused), "{path}: {}", r.text());
    }
    // KServe paths are refused in KServe's shape, whether a route serves them or not.
    for path in [
        "/v2/models/scale/infer",
        "/v1/models/scale:predict",
        // TorchServe's /{model}/{version}/predict route would take it, were it not /v2.
        "/v2/x/predict",
    ] {
        assert_kserve_error(&s.infer("POST", path, &[], b"{}"), 400, refused);
    }
    assert_kserve_error(
        &s.infer("POST", "/v2/repository/index", &[], b"{}"),
        400,
        refused,
    );
    assert_error(
        &manage("/models", None),
        400,
        "InvalidKeyException",
        refused,
    );
    assert_error(
        &manage("/models", Some(&inference)),
        400,
        "InvalidKeyException",
        refused,
    );
    assert_eq!(manage("/models", Some(&management)).status, 200);
    // Health, descriptions and metrics need no key.
    assert_eq!(s.infer("GET", "/ping", &[], b"").status, 200);
    assert_eq!(s.infer("GET", "/api-description", &[], b"").status, 200);
    assert_eq!(manage("/api-description", None).status, 200);
    // Even when a probe sends a body, which they do not read.
    for path in ["/ping", "/v2/health/ready", "/v2/health/live/"] {
        let r = s.infer("POST", path, &[], b"{}");
        assert_ne!(r.status, 400, "{path}: {}", r.text());
        assert!(!r.text().contains(refused), "{path}: {}", r.text());
    }
    let r = s.infer("GET", "/v2/health/ready", &[], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s.metrics_text().contains("ts_inference_requests_total"));

    // The API key issues a new inference key; the old one stops working.
    assert_error(
        &manage("/token?type=inference", Some(&management)),
        400,
        "InvalidKeyException",
        refused,
    );
    assert_error(
        &manage("/token?type=everything", Some(&api)),
        400,
        "InvalidKeyException",
        "unknown key type \"everything\"",
    );
    let r = manage("/token?type=inference", Some(&api));
    assert_eq!(r.status, 200, "{}", r.text());
    let fresh = format!("Bearer {}", r.json()["inference"]["key"].as_str().unwrap());
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    assert_eq!(
        format!("Bearer {}", on_disk["inference"]["key"].as_str().unwrap()),
        fresh
    );
    assert_eq!(on_disk["management"], keys["management"]);
    assert_error(
        &predict(Some(&inference)),
        400,
        "InvalidKeyException",
        refused,
    );
    assert_eq!(predict(Some(&fresh)).status, 200);

    s.stop_ok();
    assert!(!key_file.exists(), "the keys end with the server");

    // --disable-token-auth turns it all off.
    s.start(&[
        "--models",
        &format!("scale={v1}"),
        "--ncs",
        "--disable-token-auth",
    ]);
    assert!(!key_file.exists());
    assert_eq!(predict(None).status, 200);
    assert_eq!(manage("/models", None).status, 200);
    assert_error(
        &manage("/token?type=inference", None),
        404,
        "ResourceNotFoundException",
        "",
    );
}

#[test]
fn extraction_folders_go_away_even_after_a_crash() {
    let (mut s, v1, _) = scale_server("");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    let crashed = s.temp_dir().join(format!("tchserve-{}", s.pid()));
    assert!(
        std::fs::read_dir(&crashed).unwrap().next().is_some(),
        "the archive is extracted under {}",
        crashed.display()
    );
    s.kill();
    assert!(crashed.exists(), "a killed server cannot clean up");
    // A folder whose process is alive (this test) belongs to someone else and stays.
    let alive = s
        .temp_dir()
        .join(format!("tchserve-{}", std::process::id()));
    std::fs::create_dir(&alive).unwrap();

    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    assert!(
        !crashed.exists(),
        "the next start sweeps what the crash left"
    );
    assert!(alive.exists());
    let current = s.temp_dir().join(format!("tchserve-{}", s.pid()));
    assert!(current.exists());
    s.stop_ok();
    assert!(!current.exists(), "a graceful stop removes its own folder");
}

#[test]
fn a_stop_sent_while_the_server_starts_is_graceful() {
    let (mut s, v1, v2) = scale_server("");
    let pid_file = s.home().join("logs").join("tchserve.pid");
    // Once the PID file is there, a stop is caught: while the models load, between the
    // listeners answering and the server waiting for a stop, and while it serves.
    for delay_ms in [0, 20, 100, 400] {
        s.spawn(&[
            "--models",
            &format!("scale={v1}"),
            &format!("other={v2}"),
            "--ncs",
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "no PID file:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let scratch = s.temp_dir().join(format!("tchserve-{}", s.pid()));
        s.stop_ok();
        assert!(!scratch.exists(), "after {delay_ms} ms: {}", s.log());
        assert!(!pid_file.exists(), "after {delay_ms} ms: {}", s.log());
    }
}

#[test]
fn a_hangup_stops_gracefully() {
    let (mut s, v1, _) = scale_server("");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    let scratch = s.temp_dir().join(format!("tchserve-{}", s.pid()));
    assert!(scratch.exists());
    // What a closed terminal sends a server in the foreground: a stop, not a crash.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(s.pid() as i32, libc::SIGHUP) };
    let status = s.wait();
    assert!(status.success(), "{status}: {}", s.log());
    assert!(s.log().contains("stopped"), "{}", s.log());
    assert!(!scratch.exists());

    // Under nohup, SIGHUP is ignored as asked, and SIGTERM still stops.
    let mut cmd = s.command();
    cmd.args(["--foreground", "--ncs"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: signal(2) is async-signal-safe; this is what nohup does before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::http::try_request(
        &s.inference,
        "GET",
        "/ping",
        &[],
        b"",
        Duration::from_secs(5),
    )
    .map(|r| r.status)
    .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "a hangup stopped a nohup server"
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn torchserve_route_aliases_predict_and_explanations_say_why_not() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.start(&["--models", &format!("scale={v1}")]);
    // With one model registered, /invocations needs no name.
    for path in [
        "/invocations?model_name=scale",
        "/invocations",
        "/invocations?model_name=",
        "/models/scale/invoke",
        "/scale/predict",
        "/scale/1.0/predict",
    ] {
        let r = post_json(&s.inference, path, "[1, 1, 1, 1]");
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(floats(&r.json()), [2.0; 4], "{path}");
    }
    for path in ["/explanations/scale", "/explanations/scale/1.0"] {
        assert_error(
            &post_json(&s.inference, path, "[1, 1, 1, 1]"),
            501,
            "NotImplementedException",
            "explanations are not supported",
        );
    }
    assert_error(
        &post_json(&s.inference, "/explanations/nope", "[1]"),
        404,
        "ModelNotFoundException",
        "nope",
    );
    let r = post_json(
        &s.inference,
        "/v1/models/scale:explain",
        r#"{"instances": [[1, 1, 1, 1]]}"#,
    );
    assert_kserve_error(&r, 501, "explanations are not supported");
    // Bodies that are not v1 requests are told so in the protocol's terms.
    for (body, says) in [
        ("[1, 1, 1, 1]", "the body is JSON, but not an object"),
        ("[[1, 1, 1, 1]]", "the body is JSON, but not an object"),
        (r#"{"instances": [[1, 1"#, "the body is not JSON"),
        (
            r#"{"instances": [[1, 1, 1, 1]], "inputs": [[1, 1, 1, 1]]}"#,
            "both \"instances\" and \"inputs\"",
        ),
    ] {
        let r = post_json(&s.inference, "/v1/models/scale:predict", body);
        assert_kserve_error(&r, 400, says);
        assert!(!r.text().contains("V1Request"), "{}", r.text());
    }
    for path in [
        "/v2/models/scale/explain",
        "/v2/models/scale/versions/1.0/explain",
    ] {
        let r = post_json(&s.inference, path, "{}");
        assert_kserve_error(&r, 501, "explanations are not supported");
    }
    assert_kserve_error(
        &post_json(&s.inference, "/v2/models/nope/explain", "{}"),
        404,
        "nope",
    );
    // The legacy route leaves the KServe protocols' unknown paths their own shape of 404.
    for path in ["/v2/predict", "/v1/scale/predict"] {
        assert_kserve_error(&post_json(&s.inference, path, "[1, 1, 1, 1]"), 404, "");
    }
    assert_error(
        &s.infer("GET", "/explanations/scale", &[], b""),
        405,
        "MethodNotAllowedException",
        "not allowed",
    );
    // KServe v1's readiness is answered on the management listener too, as TorchServe does.
    assert_eq!(
        s.manage("GET", "/v1/models/scale").json(),
        json!({"name": "scale", "ready": true})
    );
    // And the list of models, as KServe's model server answers it.
    assert_eq!(
        s.infer("GET", "/v1/models", &[], b"").json(),
        json!({"models": ["scale"]})
    );
    // With two, it must be told which.
    assert_eq!(
        register(&s, &format!("url={v2}&model_name=other&initial_workers=1")).status,
        200
    );
    assert_error(
        &post_json(&s.inference, "/invocations", "[1, 1, 1, 1]"),
        400,
        "BadRequestException",
        "Parameter model_name is required.",
    );
    let r = post_json(
        &s.inference,
        "/invocations?model_name=other",
        "[1, 1, 1, 1]",
    );
    assert_eq!(floats(&r.json()), [3.0; 4]);
    // Or name it in the body's fields, as TorchServe's own tests do: a form, or multipart.
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = s.infer(
        "POST",
        "/invocations",
        &form,
        b"model_name=other&data=%5B1%2C1%2C1%2C1%5D",
    );
    assert_eq!(floats(&r.json()), [3.0; 4], "{}", r.text());
    let multipart = b"--B\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nscale\r\n\
        --B\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n[1, 1, 1, 1]\r\n--B--\r\n";
    let ct = [("Content-Type", "multipart/form-data; boundary=B")];
    let r = s.infer("POST", "/invocations", &ct, multipart);
    assert_eq!(floats(&r.json()), [2.0; 4], "{}", r.text());
    // The SageMaker and legacy routes take the query's parameters as inputs too.
    for path in [
        "/invocations?model_name=other&data=%5B1,1,1,1%5D",
        "/other/predict?data=%5B1,1,1,1%5D",
    ] {
        let r = s.infer("POST", path, &[], b"");
        assert_eq!(floats(&r.json()), [3.0; 4], "{path}: {}", r.text());
    }
    // Of two fields of one name the last counts, as in TorchServe.
    let r = s.infer(
        "POST",
        "/predictions/scale",
        &form,
        b"data=%5B1%2C1%2C1%2C1%5D&data=%5B2%2C2%2C2%2C2%5D",
    );
    assert_eq!(floats(&r.json()), [4.0; 4], "{}", r.text());
    // Path segments past the version are TorchServe's `url_path`, which no handler here reads.
    let r = post_json(
        &s.inference,
        "/predictions/scale/1.0/extra/segs",
        "[1, 1, 1, 1]",
    );
    assert_eq!(floats(&r.json()), [2.0; 4], "{}", r.text());
}

#[test]
fn v2_metadata_names_the_output_type_the_model_gives() {
    let (mut s, v1, _) = scale_server("");
    let argmax = fixture_archive(&s, "argmax", "argmax.pt", "vec4.json");
    s.start(&[
        "--models",
        &format!("scale={v1}"),
        &format!("argmax={argmax}"),
    ]);
    // Known from the workers' warm-up, before any request: float32 rows of 4, and one int64
    // per example.
    let output = |model: &str| {
        request(
            &s.inference,
            "GET",
            &format!("/v2/models/{model}"),
            &[],
            b"",
        )
        .json()["outputs"][0]
            .clone()
    };
    assert_eq!(
        output("scale"),
        json!({"name": "output0", "datatype": "FP32", "shape": [-1, 4]})
    );
    assert_eq!(
        output("argmax"),
        json!({"name": "output0", "datatype": "INT64", "shape": [-1]})
    );
    // The answers carry the same type.
    let r = post_json(
        &s.inference,
        "/v2/models/argmax/infer",
        r#"{"inputs": [{"name": "input0", "shape": [2, 4], "datatype": "FP32", "data": [1, 5, 2, 0, 9, 1, 1, 1]}]}"#,
    );
    assert_eq!(
        r.json()["outputs"][0],
        json!({"name": "output0", "datatype": "INT64", "shape": [2], "data": [1, 0]})
    );
    // The one input by another name, as KServe's TorchServe samples send it; the errors name it
    // as sent.
    let r = post_json(
        &s.inference,
        "/v2/models/argmax/infer",
        r#"{"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 5, 2, 0]}]}"#,
    );
    assert_eq!(r.json()["outputs"][0]["data"], json!([1]), "{}", r.text());
    let r = post_json(
        &s.inference,
        "/v2/models/argmax/infer",
        r#"{"inputs": [{"name": "input-0", "shape": [1, 3], "datatype": "FP32", "data": [1, 5, 2]}]}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("input-0"), "{}", r.text());
}

#[test]
fn metrics_count_what_was_sent() {
    let (mut s, v1, _) = scale_server("");
    s.start(&["--models", &format!("scale={v1}")]);
    for _ in 0..5 {
        assert_eq!(
            post_json(&s.inference, "/predictions/scale", "[1,1,1,1]").status,
            200
        );
    }
    for _ in 0..2 {
        assert_eq!(
            post_json(&s.inference, "/predictions/scale/1.0", "[1,1]").status,
            400
        );
    }
    // The v2 protocol counts as TorchServe's routes do: under "default" unless the version is
    // named in the request.
    let v2 = r#"{"inputs": [{"name": "input0", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}"#;
    for path in [
        "/v2/models/scale/infer",
        "/v2/models/scale/versions/1.0/infer",
    ] {
        assert_eq!(post_json(&s.inference, path, v2).status, 200);
    }
    // A KServe v1 request is one request however many instances it holds, as TorchServe
    // counts it.
    let instances = r#"{"instances": [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]}"#;
    for path in [
        "/v1/models/scale:predict",
        "/v1/models/scale/versions/1.0:predict",
    ] {
        let r = post_json(&s.inference, path, instances);
        assert_eq!(
            r.json()["predictions"].as_array().unwrap().len(),
            3,
            "{}",
            r.text()
        );
    }
    let text = s.metrics_text();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let series = |v: &str| {
        format!(
            "ts_inference_requests_total{{model_name=\"scale\",model_version=\"{v}\",hostname=\"{host}\",}}"
        )
    };
    assert_eq!(metric(&text, &series("default")), 7.0);
    assert_eq!(metric(&text, &series("1.0")), 4.0);
    assert!(
        metric(
            &text,
            &format!("Requests2XX{{Level=\"Host\",Hostname=\"{host}\",}}")
        ) >= 5.0
    );
    assert_eq!(
        metric(
            &text,
            &format!("Requests4XX{{Level=\"Host\",Hostname=\"{host}\",}}")
        ),
        2.0
    );
    assert!(
        metric(
            &text,
            &format!(
                "ts_inference_latency_microseconds{{model_name=\"scale\",model_version=\"default\",hostname=\"{host}\",}}"
            )
        ) > 0.0
    );
    assert!(
        text.contains(
            "tchserve_workers{model_name=\"scale\",model_version=\"1.0\",state=\"ready\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("process_resident_memory_bytes"));
    // TorchServe's own test suite (its Postman collection) matches
    // `Requests2XX\{Level="Host",Hostname=".*",\} \d+\.\d+`: labels in that order, a trailing
    // comma, a float.
    let line = text
        .lines()
        .find(|l| l.starts_with("Requests2XX{"))
        .unwrap_or_else(|| panic!("no Requests2XX in:\n{text}"));
    let value = line
        .strip_prefix(&format!(
            "Requests2XX{{Level=\"Host\",Hostname=\"{host}\",}} "
        ))
        .unwrap_or_else(|| panic!("{line}"));
    let (whole, fraction) = value.split_once('.').unwrap_or_else(|| panic!("{line}"));
    assert!(
        [whole, fraction]
            .iter()
            .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())),
        "{line}"
    );
    let only = request(&s.metrics, "GET", "/metrics?name[]=Requests4XX", &[], b"").text();
    assert!(
        only.contains("Requests4XX") && !only.contains("Requests2XX"),
        "{only}"
    );
}

#[test]
fn torchserve_default_metrics_are_served() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.start(&["--models", &format!("scale={v1}")]);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    // Requests of four instances: each waits as long as its longest-queued item, never more
    // than the request took.
    let instances = r#"{"instances": [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]]}"#;
    for _ in 0..20 {
        assert_eq!(
            post_json(&s.inference, "/v1/models/scale:predict", instances).status,
            200
        );
    }
    // Failed requests add to neither, as in TorchServe.
    for _ in 0..3 {
        assert_eq!(
            post_json(&s.inference, "/predictions/scale", "[1, 1]").status,
            400
        );
    }
    let text = s.metrics_text();
    let labels = format!("model_name=\"scale\",model_version=\"default\",hostname=\"{host}\",");
    let latency = metric(
        &text,
        &format!("ts_inference_latency_microseconds{{{labels}}}"),
    );
    let queued = metric(&text, &format!("ts_queue_latency_microseconds{{{labels}}}"));
    assert!(queued > 0.0 && queued < latency, "{queued} vs {latency}");

    // TorchServe's gauges, under its names and labels, in its style.
    let host_labels = format!("{{Level=\"Host\",Hostname=\"{host}\",}}");
    for name in ["QueueTime", "WorkerThreadTime"] {
        assert!(metric(&text, &format!("{name}{host_labels}")) >= 0.0);
    }
    let model = format!("{{ModelName=\"scale\",Level=\"Model\",Hostname=\"{host}\",}}");
    let handler = metric(&text, &format!("HandlerTime{model}"));
    let prediction = metric(&text, &format!("PredictionTime{model}"));
    assert!(
        handler > 0.0 && handler <= prediction,
        "{handler} {prediction}"
    );
    let workers = s.manage("GET", "/models/scale").json();
    let id = workers[0]["workers"][0]["id"].as_str().unwrap().to_string();
    let load = metric(
        &text,
        &format!(
            "WorkerLoadTime{{WorkerName=\"W-{id}-scale_1.0\",Level=\"Host\",Hostname=\"{host}\",}}"
        ),
    );
    assert!(load > 0.0, "{text}");

    // Host metrics, as psutil reports them, compared with what the machine says.
    let cpu = metric(&text, &format!("CPUUtilization{host_labels}"));
    assert!((0.0..=100.0).contains(&cpu), "{cpu}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_mb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0;
    let used = metric(&text, &format!("MemoryUsed{host_labels}"));
    let available = metric(&text, &format!("MemoryAvailable{host_labels}"));
    assert!(used > 0.0 && available > 0.0 && used + available <= total_mb * 1.01);
    let percent = metric(&text, &format!("MemoryUtilization{host_labels}"));
    assert!(
        (percent - (total_mb - available) / total_mb * 100.0).abs() < 5.0,
        "{percent}"
    );
    let disk = metric(&text, &format!("DiskUsage{host_labels}"));
    let free = metric(&text, &format!("DiskAvailable{host_labels}"));
    let disk_percent = metric(&text, &format!("DiskUtilization{host_labels}"));
    assert!(disk > 0.0 && free > 0.0, "{disk} {free}");
    assert!((disk_percent - disk / (disk + free) * 100.0).abs() < 0.5);

    // The process's CPU time to the tick, not in whole seconds.
    let cpu_seconds = text
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .unwrap()
        .parse::<f64>()
        .unwrap();
    // As /proc says, read right after: whole seconds would be up to a second short.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let proc_seconds = ticks / per_second;
    assert!(
        cpu_seconds > 0.0 && (0.0..0.2).contains(&(proc_seconds - cpu_seconds)),
        "{cpu_seconds} vs {proc_seconds}"
    );

    // An unregistered model's series go with it; the others stay.
    let r = register(
        &s,
        &format!("url={v2}&model_name=brief&initial_workers=1&synchronous=true"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for path in ["/predictions/brief", "/predictions/brief/2.0"] {
        assert_eq!(post_json(&s.inference, path, "[1, 1, 1, 1]").status, 200);
    }
    let text = s.metrics_text();
    assert!(
        text.contains("model_name=\"brief\",model_version=\"2.0\""),
        "{text}"
    );
    assert!(text.contains("ModelName=\"brief\""), "{text}");
    assert_eq!(s.manage("DELETE", "/models/brief").status, 200);
    let text = s.metrics_text();
    assert!(!text.contains("brief"), "{text}");
    assert!(text.contains("ModelName=\"scale\""), "{text}");
    s.stop_ok();

    // disable_system_metrics leaves the host out, as in TorchServe.
    s.set_config("enable_model_api=true\ndisable_system_metrics=true");
    s.start(&["--models", &format!("scale={v1}")]);
    let text = s.metrics_text();
    assert!(!text.contains("CPUUtilization{"), "{text}");
    assert!(text.contains("Requests2XX"));
}

#[test]
fn unix_socket_listener() {
    let (mut s, v1, _) = scale_server("");
    let sock = s.dir.path().join("mgmt.sock");
    s.management = format!("unix:{}", sock.display());
    s.start(&["--models", &format!("scale={v1}")]);
    let r = s.manage("GET", "/models");
    assert_eq!(r.json()["models"][0]["modelName"], "scale");

    // A second server told to use the same socket refuses to start, rather than take the
    // socket from the running one.
    let mut other = Server::new("");
    other.management = s.management.clone();
    let mut child = other
        .command()
        .arg("--foreground")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second server started on a socket in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("another process is listening"), "{err}");
    let r = s.manage("GET", "/models");
    assert_eq!(
        r.json()["models"][0]["modelName"],
        "scale",
        "still answering"
    );
}

#[test]
fn inference_and_management_can_share_one_address() {
    let (mut s, v1, v2) = scale_server("enable_model_api=true");
    s.management = s.inference.clone();
    s.start(&["--models", &format!("scale={v1}")]);
    let on_the_one = |method: &str, path: &str| s.infer(method, path, &[], b"");
    assert_eq!(
        on_the_one("GET", "/ping").json(),
        json!({"status": "Healthy"})
    );
    assert_eq!(
        on_the_one("GET", "/models").json()["models"][0]["modelName"],
        "scale"
    );
    let r = on_the_one("POST", &format!("/models?url={v2}&initial_workers=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        on_the_one("GET", "/models/scale/2.0").json()[0]["modelVersion"],
        "2.0"
    );
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale/2.0", "[1, 1, 1, 1]").json()),
        [3.0; 4]
    );
    // A model's invoke route is inference's, though it lies under /models.
    assert_eq!(
        floats(&post_json(&s.inference, "/models/scale/invoke", "[1, 1, 1, 1]").json()),
        [2.0; 4]
    );
    assert_error(
        &on_the_one("GET", "/nowhere"),
        404,
        "ResourceNotFoundException",
        "",
    );
    assert!(s.metrics_text().contains("ts_inference_requests_total"));
    s.stop_ok();

    // All three on one address, with keys: each path still asks for its own API's key.
    s.metrics = s.inference.clone();
    s.set_config("enable_model_api=true\ndisable_token_authorization=false");
    s.start(&["--models", &format!("scale={v1}"), "--ncs"]);
    let keys: Value =
        serde_json::from_str(&std::fs::read_to_string(s.home().join("key_file.json")).unwrap())
            .unwrap();
    let bearer = |kind: &str| format!("Bearer {}", keys[kind]["key"].as_str().unwrap());
    let (inference, management) = (bearer("inference"), bearer("management"));
    let with = |path: &str, key: &str| s.infer("GET", path, &[("Authorization", key)], b"").status;
    assert_eq!(with("/models", &management), 200);
    assert_eq!(with("/models", &inference), 400);
    let predict = |key: &str| {
        s.infer(
            "POST",
            "/models/scale/invoke",
            &[("Authorization", key), ("Content-Type", "application/json")],
            b"[1, 1, 1, 1]",
        )
        .status
    };
    assert_eq!(predict(&inference), 200);
    assert_eq!(predict(&management), 400);
    let metrics = s.infer("GET", "/metrics", &[], b"");
    assert_eq!(metrics.status, 200);
    assert!(metrics.text().contains("ts_inference_requests_total"));
    // The one listener describes both APIs it serves, without a key.
    let doc = s.infer("OPTIONS", "/", &[], b"").json();
    for path in ["/predictions/{model_name}", "/models", "/ping"] {
        assert!(doc["paths"][path].is_object(), "{path}: {doc}");
    }
    assert_eq!(s.infer("GET", "/api-description", &[], b"").json(), doc);
}

#[test]
fn digits_through_the_server_equal_pytorch() {
    let build = digits_build();
    let test: Value =
        serde_json::from_slice(&std::fs::read(build.join("test.json")).unwrap()).unwrap();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(build.join("expected.json")).unwrap()).unwrap();
    let mut s = Server::new("enable_model_api=true");
    let handler = common::repo_root().join("examples/digits/digits_handler.json");
    let mar = archive(
        &s.store,
        "digits",
        "1.0",
        &build.join("digits.pt"),
        &handler,
        &[],
    );
    s.start(&[]);
    assert_eq!(
        register(
            &s,
            &format!("url={mar}&initial_workers=2&batch_size=8&max_batch_delay=5")
        )
        .status,
        200
    );

    let inputs = test["inputs"].as_array().unwrap();
    let labels: Vec<i64> = test["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_i64().unwrap())
        .collect();
    // One request per digit, 8 at a time, so they are batched.
    let outputs: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = inputs
            .chunks(inputs.len().div_ceil(8))
            .map(|chunk| {
                let inference = &s.inference;
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|x| {
                            let r = post_json(inference, "/predictions/digits", &x.to_string());
                            assert_eq!(r.status, 200, "{}", r.text());
                            floats(&r.json())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    // And all of them in one request.
    let all = post_json(
        &s.inference,
        "/predictions/digits",
        &Value::Array(inputs.clone()).to_string(),
    )
    .json();
    let all: Vec<Vec<f64>> = all.as_array().unwrap().iter().map(floats).collect();

    let want: Vec<Vec<f64>> = expected["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    for got in [&outputs, &all] {
        let max_diff = got
            .iter()
            .zip(&want)
            .map(|(g, w)| common::max_abs_diff(g, w))
            .fold(0.0, f64::max);
        assert!(max_diff <= 1e-5, "max abs diff {max_diff}");
        let argmax = |v: &Vec<f64>| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as i64
        };
        let correct = got
            .iter()
            .zip(&labels)
            .filter(|(g, l)| argmax(g) == **l)
            .count();
        let pytorch_correct =
            (expected["accuracy"].as_f64().unwrap() * labels.len() as f64).round() as usize;
        assert_eq!(correct, pytorch_correct, "accuracy differs from PyTorch's");
    }
    let metrics = s.metrics_text();
    let count = metric(
        &metrics,
        "tchserve_batch_size_count{model_name=\"digits\",model_version=\"1.0\"}",
    );
    let sum = metric(
        &metrics,
        "tchserve_batch_size_sum{model_name=\"digits\",model_version=\"1.0\"}",
    );
    assert!(
        sum / count > 1.0,
        "digits were never batched ({sum} requests in {count} batches)"
    );
}

#[test]
fn requests_whose_client_left_are_dropped_before_inference() {
    let s = slow_server("enable_model_api=true", "&batch_size=1");
    std::thread::scope(|scope| {
        // Occupies the only worker for about two seconds.
        let busy = scope.spawn(|| post_json(&s.inference, "/predictions/slow", "[20000, 0]"));
        std::thread::sleep(Duration::from_millis(300));
        // Queued behind it, then abandoned: the client hangs up without waiting.
        for _ in 0..3 {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect(&s.inference).unwrap();
            let body = "[5000, 0]";
            let req = format!(
                "POST /predictions/slow HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            c.write_all(req.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(c);
        }
        assert_eq!(busy.join().unwrap().status, 200);
    });
    let t = Instant::now();
    assert_eq!(
        post_json(&s.inference, "/predictions/slow", "[1, 0]").status,
        200
    );
    // Had the three abandoned requests run, each would have taken about half a second first.
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "abandoned requests ran: {:?}",
        t.elapsed()
    );
    let metrics = s.metrics_text();
    let batches = metric(
        &metrics,
        "tchserve_batch_size_count{model_name=\"slow\",model_version=\"1.0\"}",
    );
    assert_eq!(
        batches, 2.0,
        "only the two requests with a client should have run"
    );
}

#[test]
fn workers_that_cannot_load_fail_registration_and_ping() {
    // A short response timeout, so that a request left waiting fails as a 504 rather than
    // holding the test for two minutes.
    let mut s = Server::new("enable_model_api=true\ndefault_response_timeout=15");
    std::fs::write(s.dir.path().join("broken.pt"), b"not a TorchScript file").unwrap();
    let broken = archive(
        &s.store,
        "broken",
        "1.0",
        &s.dir.path().join("broken.pt"),
        &fixture_handler("vec4.json"),
        &[],
    );
    let ok = fixture_archive(&s, "scale", "scale2.pt", "vec4.json");
    s.start(&["--models", &format!("scale={ok}")]);
    assert_eq!(
        s.infer("GET", "/ping", &[], b"").json(),
        json!({"status": "Healthy"})
    );

    // Synchronous: the registration fails with the reason and leaves nothing registered.
    let r = register(&s, &format!("url={broken}&initial_workers=1"));
    assert_error(
        &r,
        500,
        "InternalServerException",
        "Failed to start workers for model broken version: 1.0",
    );
    assert_error(
        &s.manage("GET", "/models/broken"),
        404,
        "ModelNotFoundException",
        "broken",
    );

    // Asynchronous: registered, its worker keeps failing, describe says why and /ping is unhealthy.
    assert_eq!(
        register(
            &s,
            &format!("url={broken}&initial_workers=1&synchronous=false")
        )
        .status,
        202
    );
    let broken_and_the_other_serving = |s: &Server| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let worker = loop {
            let w = s.manage("GET", "/models/broken").json()[0]["workers"][0].clone();
            if w["status"] == "FAILED" || Instant::now() > deadline {
                break w;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(worker["status"], "FAILED", "{worker}");
        assert!(
            worker["error"].as_str().unwrap().contains("broken.pt"),
            "{worker}"
        );
        let ping = s.infer("GET", "/ping", &[], b"");
        assert_eq!(
            (ping.status, ping.json()),
            (500, json!({"status": "Unhealthy"}))
        );
        // A request for it is answered at once with the reason, not after its response
        // timeout: no worker can take it.
        let r = post_json(&s.inference, "/predictions/broken", "[1, 1, 1, 1]");
        assert_error(
            &r,
            503,
            "ServiceUnavailableException",
            "Model \"broken\" version 1.0 has no worker that can serve it: loading failed",
        );
        assert!(r.text().contains("broken.pt"), "{}", r.text());
        // The other model is untouched.
        assert_eq!(
            floats(&post_json(&s.inference, "/predictions/scale", "[1, 1, 1, 1]").json()),
            [2.0; 4]
        );
    };
    broken_and_the_other_serving(&s);
    // A synchronous scale of it fails with the workers' reason too.
    let r = s.manage("PUT", "/models/broken?min_worker=2&synchronous=true");
    assert_error(
        &r,
        500,
        "InternalServerException",
        "Failed to start workers for model broken version: 1.0",
    );
    assert!(r.text().contains("broken.pt"), "{}", r.text());

    // A restart restores it from the snapshot, its workers failing as before, instead of
    // refusing to start and serving nothing. --models is not loaded then, and the terminal
    // says so.
    s.stop_ok();
    s.start(&["--models", &format!("scale={ok}")]);
    broken_and_the_other_serving(&s);
    assert!(s.log().contains("--models is not loaded"), "{}", s.log());
    // Unregistering the broken model makes the server healthy again.
    assert_eq!(s.manage("DELETE", "/models/broken").status, 200);
    assert_eq!(s.infer("GET", "/ping", &[], b"").status, 200);
}

#[test]
fn request_size_limit_covers_raw_and_multipart_bodies() {
    let form = |field: &[u8]| {
        let mut f = b"--B\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n".to_vec();
        f.extend_from_slice(field);
        f.extend_from_slice(b"\r\n--B--\r\n");
        f
    };
    let ct = [("Content-Type", "multipart/form-data; boundary=B")];
    // Default limit (6553500 bytes): a 3 MB multipart field is read whole and reaches the handler.
    let mut s = Server::new("");
    let picky = fixture_archive(&s, "picky", "picky.pt", "vec4.json");
    s.start(&["--models", &format!("picky={picky}")]);
    let mut big = vec![b' '; 3 << 20];
    big[0] = b'[';
    let r = s.infer("POST", "/predictions/picky", &ct, &form(&big));
    assert_error(&r, 400, "InvalidInputException", "not valid JSON");
    s.stop();

    let mut s = Server::new("max_request_size=1000");
    let picky = fixture_archive(&s, "picky", "picky.pt", "vec4.json");
    s.start(&["--models", &format!("picky={picky}")]);
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[("Content-Type", "application/octet-stream")],
        &[0u8; 2000],
    );
    assert_error(
        &r,
        413,
        "RequestTooLargeException",
        "max_request_size (1000 bytes)",
    );
    // Announced too large, a body is refused before it is asked for: a client that waits for
    // `100 Continue` gets the 413 instead, and never uploads it.
    {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(&s.inference).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(
            b"POST /predictions/picky HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
              Content-Length: 7000000\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    }
    let r = s.infer("POST", "/predictions/picky", &ct, &form(&[b'1'; 2000]));
    assert_error(
        &r,
        413,
        "RequestTooLargeException",
        "max_request_size (1000 bytes)",
    );
    let r = s.infer("POST", "/predictions/picky", &ct, &form(b"[1, 2, 3, 4]"));
    assert_eq!(floats(&r.json()), [2.0, 3.0, 4.0, 5.0]);
    // The KServe routes refuse it in their own shape, which their clients read.
    for path in ["/v2/models/picky/infer", "/v1/models/picky:predict"] {
        assert_kserve_error(
            &s.infer("POST", path, &[], &[b' '; 2000]),
            413,
            "max_request_size",
        );
    }

    // A compressed body is read decompressed, and held to the same limit once decompressed: 2,000
    // spaces compress to a few bytes.
    let json = [("Content-Type", "application/json")];
    for coding in ["gzip", "deflate", "raw deflate"] {
        let body = compress(coding, b"[1, 2, 3, 4]");
        let header = coding.trim_start_matches("raw ");
        let headers = [json[0], ("Content-Encoding", header)];
        let r = s.infer("POST", "/predictions/picky", &headers, &body);
        assert_eq!(floats(&r.json()), [2.0, 3.0, 4.0, 5.0], "{coding}");
        let mut bomb = vec![b' '; 2000];
        bomb[..12].copy_from_slice(b"[1, 2, 3, 4]");
        let body = compress(coding, &bomb);
        assert!(body.len() < 1000);
        let r = s.infer("POST", "/predictions/picky", &headers, &body);
        assert_error(&r, 413, "RequestTooLargeException", "max_request_size");
    }
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[json[0], ("Content-Encoding", "br")],
        b"[1, 2, 3, 4]",
    );
    assert_error(
        &r,
        400,
        "BadRequestException",
        "Content-Encoding \"br\" is not supported",
    );
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[json[0], ("Content-Encoding", "gzip")],
        b"[1, 2, 3, 4]",
    );
    assert_error(&r, 400, "BadRequestException", "cannot be decompressed");
    let twice = compress("gzip", &compress("gzip", b"[1, 2, 3, 4]"));
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[
            json[0],
            ("Content-Encoding", "gzip"),
            ("Content-Encoding", "gzip"),
        ],
        &twice,
    );
    assert_error(&r, 400, "BadRequestException", "several Content-Encodings");
    // A word that names no compression (a charset, as some clients put there) leaves the body
    // as sent, as TorchServe reads it.
    let r = s.infer(
        "POST",
        "/predictions/picky",
        &[json[0], ("Content-Encoding", "utf-8")],
        b"[1, 2, 3, 4]",
    );
    assert_eq!(floats(&r.json()), [2.0, 3.0, 4.0, 5.0], "{}", r.text());
}

/// `body` compressed as HTTP's `gzip` or `deflate` (zlib) content coding, or as the raw deflate
/// stream some clients send for `deflate`.
fn compress(coding: &str, body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    match coding {
        "gzip" => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            w.write_all(body).unwrap();
            w.finish().unwrap()
        }
        "raw deflate" => {
            let mut w = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
            w.write_all(body).unwrap();
            w.finish().unwrap()
        }
        _ => {
            let mut w = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
            w.write_all(body).unwrap();
            w.finish().unwrap()
        }
    }
}

/// Names of the server's threads that belong to worker `id` (the worker and any OpenMP team
#[test]
fn a_small_model_never_starts_an_openmp_team() {
    // A team's threads outlive its work, and once the process holds more of them than cores,
    // OpenMP stops spinning at its barriers: an idle MLP beside ResNet-18 cost the ResNet a
    // quarter of its throughput for the life of the process (bench/multi_model.sh measures it).
    let mut s = Server::new("cpu_threads=2");
    let mlp = mlp_archive(&s);
    s.start(&["--models", &format!("mlp={mlp}")]);
    let body = format!("[{}]", vec!["0.5"; 784].join(","));
    for _ in 0..20 {
        assert_eq!(
            post_json(&s.inference, "/predictions/mlp", &body).status,
            200
        );
    }
    let d = s.manage("GET", "/models/mlp").json();
    let id = d[0]["workers"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        worker_threads(s.pid(), &id),
        1,
        "the MLP's worker started threads of its own"
    );
}

#[test]
fn cors_headers_when_configured() {
    let (mut s, v1, _) = scale_server(
        "cors_allowed_origin=https://app.example\ncors_allowed_methods=GET, POST, OPTIONS\n\
         cors_allowed_headers=Content-Type, Authorization\nenable_metrics_api=false",
    );
    s.start(&["--models", &format!("scale={v1}")]);
    // A browser's preflight is answered yes, with what is allowed, on any route.
    let r = s.infer(
        "OPTIONS",
        "/predictions/scale",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, OPTIONS")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("Content-Type, Authorization")
    );
    // Every answer carries the origin, errors too.
    let r = post_json(&s.inference, "/predictions/scale", "[1, 1, 1, 1]");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = s.manage("GET", "/models/nope");
    assert_eq!(r.status, 404);
    assert!(r.header("access-control-allow-origin").is_some());
    // OPTIONS / without a preflight's header is still the API description.
    assert!(s.infer("OPTIONS", "/", &[], b"").json()["openapi"].is_string());
    // No metrics listener.
    assert!(std::net::TcpStream::connect(&s.metrics).is_err());
    assert!(s.log().contains("configuration read from"), "{}", s.log());

    // The metrics listener carries them too, as TorchServe's does, for a dashboard in a
    // browser.
    let mut m =
        Server::new("cors_allowed_origin=https://app.example\ncors_allowed_methods=GET, OPTIONS");
    m.start(&[]);
    let r = request(&m.metrics, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let r = request(
        &m.metrics,
        "OPTIONS",
        "/metrics",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, OPTIONS")
    );

    // Without the keys, no CORS header.
    let (mut plain, v1, _) = scale_server("");
    plain.start(&["--models", &format!("scale={v1}")]);
    let r = post_json(&plain.inference, "/predictions/scale", "[1, 1, 1, 1]");
    assert!(r.header("access-control-allow-origin").is_none());
}

#[test]
fn handlers_whose_output_stages_do_not_fit_the_model_fail_registration() {
    // The output stages run on a request of zeros at load: a mistake in them is a failed
    // registration that says why, not a 500 on every request.
    let mut s = Server::new("enable_model_api=true");
    s.start(&[]);
    let cases = [
        (
            "over_the_batch",
            "argmax.pt",
            r#""model": {"feed": "stacked"}, "postprocess": [{"softmax": {"dim": -1}}]"#,
            "softmax over axis -1 of the model's 1-dimensional output is over the batch",
        ),
        (
            "no_tuple",
            "scale2.pt",
            r#""model": {"feed": "stacked", "output": {"index": 1}}"#,
            "model.output index 1 needs a tuple or list output; the model gave a tensor",
        ),
    ];
    for (name, model, stages, why) in cases {
        let handler = s.dir.path().join(format!("{name}.json"));
        std::fs::write(
            &handler,
            format!(
                r#"{{"schema": 1, "name": "{name}",
                    "input": {{"tensor": {{"dtype": "float32", "shape": [4]}}}},
                    {stages}, "output": {{"tensor": {{}}}}}}"#
            ),
        )
        .unwrap();
        let mar = archive(
            &s.store,
            name,
            "1.0",
            &fixtures().join(model),
            &handler,
            &[],
        );
        let r = register(&s, &format!("url={mar}&initial_workers=1"));
        assert_error(&r, 500, "InternalServerException", why);
        assert!(
            r.text().contains("a made-up request, answered at load"),
            "{}",
            r.text()
        );
    }
}

/// A model of two inputs of two dtypes (`two_inputs.pt`: int64 ids, float32 dense), over every
/// REST route and body form that names inputs, batched with requests that fail alone.
#[test]
fn a_model_of_two_named_inputs_over_every_route() {
    let mut s = Server::new("enable_model_api=true");
    let mar = fixture_archive(&s, "two", "two_inputs.pt", "two_inputs.json");
    s.start(&["--ncs"]);
    let r = register(
        &s,
        &format!(
            "url={mar}&model_name=two&initial_workers=1&batch_size=8&max_batch_delay=300&synchronous=true"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Nested lists of numbers, flattened, whether written as 11 or 11.0.
    fn flat(v: &Value) -> Vec<f64> {
        match v {
            Value::Array(items) => items.iter().flat_map(flat).collect(),
            other => vec![
                other
                    .as_f64()
                    .unwrap_or_else(|| panic!("not a number: {other}")),
            ],
        }
    }
    // Row i of the model's table is [i, -i]: ids 1, 2, 3 add [6, -6] to dense.
    let one = r#"{"ids": [1, 2, 3], "dense": [0.5, 0.25]}"#;
    let r = post_json(&s.inference, "/predictions/two", one);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(flat(&r.json()), [6.5, -5.75]);
    let r = post_json(
        &s.inference,
        "/predictions/two",
        r#"{"instances": [{"ids": [1, 2, 3], "dense": [0.5, 0.25]},
                          {"ids": [0, 0, 10], "dense": [1, 2]}]}"#,
    );
    assert_eq!(flat(&r.json()["predictions"]), [6.5, -5.75, 11.0, -8.0]);
    let r = post_json(
        &s.inference,
        "/v1/models/two:predict",
        r#"{"instances": [{"dense": [1, 2], "ids": [0, 0, 10]}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["predictions"].as_array().map(Vec::len), Some(1));
    assert_eq!(flat(&r.json()["predictions"]), [11.0, -8.0]);

    // Form fields: the dense input as raw float32 with its own shape, the ids as JSON.
    let dense: Vec<u8> = [0.5f32, 0.25, 1.0, 2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let mut form = b"--B\r\nContent-Disposition: form-data; name=\"dense\"\r\n\
        Content-Type: application/octet-stream\r\nX-Tensor-Shape: 2,2\r\n\r\n"
        .to_vec();
    form.extend_from_slice(&dense);
    form.extend_from_slice(
        b"\r\n--B\r\nContent-Disposition: form-data; name=\"ids\"\r\n\r\n[[1, 2, 3], [0, 0, 10]]\r\n--B--\r\n",
    );
    let ct = [("Content-Type", "multipart/form-data; boundary=B")];
    let r = s.infer("POST", "/predictions/two", &ct, &form);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().as_array().map(Vec::len), Some(2));
    assert_eq!(flat(&r.json()), [6.5, -5.75, 11.0, -8.0]);

    // The Open Inference Protocol: the metadata names both inputs; a request gives each.
    let meta = s.infer("GET", "/v2/models/two", &[], b"").json();
    assert_eq!(
        meta["inputs"],
        json!([
            {"name": "ids", "datatype": "INT64", "shape": [-1, 3]},
            {"name": "dense", "datatype": "FP32", "shape": [-1, 2]}
        ])
    );
    let v2 = |inputs: Value| {
        post_json(
            &s.inference,
            "/v2/models/two/infer",
            &json!({"inputs": inputs}).to_string(),
        )
    };
    let dense_in = json!({"name": "dense", "datatype": "FP32", "shape": [2, 2],
                          "data": [0.5, 0.25, 1, 2]});
    let ids_in = json!({"name": "ids", "datatype": "INT64", "shape": [2, 3],
                        "data": [[1, 2, 3], [0, 0, 10]]});
    let r = v2(json!([dense_in, ids_in]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"][0]["shape"], json!([2, 2]));
    assert_eq!(
        flat(&r.json()["outputs"][0]["data"]),
        [6.5, -5.75, 11.0, -8.0]
    );
    assert_kserve_error(
        &v2(json!([dense_in])),
        400,
        "input 'ids' is missing: model 'two' takes 'ids', 'dense'",
    );
    let mut wrong = ids_in.clone();
    wrong["name"] = json!("tokens");
    assert_kserve_error(
        &v2(json!([dense_in, ids_in, wrong])),
        400,
        "unexpected inference input 'tokens' for model 'two'",
    );
    wrong["name"] = json!("ids");
    wrong["datatype"] = json!("INT32");
    assert_kserve_error(
        &v2(json!([dense_in, wrong])),
        400,
        "input 'ids': datatype INT32 does not match the model's INT64",
    );
    let mut short = ids_in.clone();
    short["shape"] = json!([1, 3]);
    short["data"] = json!([1, 2, 3]);
    assert_kserve_error(
        &v2(json!([dense_in, short])),
        400,
        "input 'dense' holds 2 example(s) and input 'ids' 1",
    );

    // A `tensors` input of one name goes by that name, where a model of one `tensor` input
    // takes any.
    let one_named = archive_with_manifest(
        &s,
        "one_named",
        "scale2.pt",
        r#"{"schema": 1, "name": "one_named",
            "input": {"tensors": [{"name": "x", "dtype": "float32", "shape": [4]}]},
            "model": {"feed": "stacked"}, "output": {"tensor": {}}}"#,
    );
    let r = register(
        &s,
        &format!("url={one_named}&initial_workers=1&synchronous=true"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let one_input = |name: &str| {
        post_json(
            &s.inference,
            "/v2/models/one_named/infer",
            &json!({"inputs": [{"name": name, "datatype": "FP32", "shape": [1, 4],
                                "data": [1, 2, 3, 4]}]})
            .to_string(),
        )
    };
    let r = one_input("x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(flat(&r.json()["outputs"][0]["data"]), [2.0, 4.0, 6.0, 8.0]);
    assert_kserve_error(
        &one_input("input0"),
        400,
        "unexpected inference input 'input0' for model 'one_named': it takes 'x'",
    );
    let r = post_json(
        &s.inference,
        "/predictions/one_named",
        r#"{"x": [1, 2, 3, 4]}"#,
    );
    assert_eq!(flat(&r.json()), [2.0, 4.0, 6.0, 8.0]);

    // Bad input to the TorchServe API names the input; the server serves on.
    let r = post_json(&s.inference, "/predictions/two", r#"{"ids": [1, 2, 3]}"#);
    assert_error(&r, 400, "InvalidInputException", "input 'dense' is missing");
    let r = post_json(
        &s.inference,
        "/predictions/two",
        r#"{"ids": [1, 2, 300], "dense": [0.5, 0.25]}"#,
    );
    // An id past the model's table fails inside the model, for that request only.
    assert_error(
        &r,
        500,
        "InternalServerException",
        "index 300 is out of bounds",
    );

    // Batched: each request gets its own rows back; one whose ids run past the model's table
    // fails in the batch's forward, and alone when its batch-mates are run again one by one; one
    // whose input does not fit fails at decoding, alone.
    let batches = || {
        let text = s.metrics_text();
        let series = |what: &str| {
            metric(
                &text,
                &format!("tchserve_batch_size_{what}{{model_name=\"two\",model_version=\"1.0\"}}"),
            )
        };
        (series("count"), series("sum"))
    };
    let (count_before, sum_before) = batches();
    let answers: Vec<(usize, Resp)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8usize)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let body = if i == 5 {
                        r#"{"ids": [300, 0, 0], "dense": [0.5, 5]}"#.to_string()
                    } else if i == 6 {
                        r#"{"ids": [1, 2, 3], "dense": [[1, 2, 3]]}"#.to_string()
                    } else {
                        format!(r#"{{"ids": [{i}, 0, 0], "dense": [0.5, {i}]}}"#)
                    };
                    (i, post_json(&s.inference, "/predictions/two", &body))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in answers {
        if i == 5 {
            assert_error(
                &r,
                500,
                "InternalServerException",
                "index 300 is out of bounds",
            );
        } else if i == 6 {
            assert_error(&r, 400, "InvalidInputException", "input 'dense'");
        } else {
            assert_eq!(r.status, 200, "request {i}: {}", r.text());
            assert_eq!(flat(&r.json()), [0.5 + i as f64, 0.0], "request {i}");
        }
    }
    let (count, sum) = batches();
    let (count, sum) = (count - count_before, sum - sum_before);
    assert!(
        sum / count > 1.0,
        "no batching happened: {count} batches for {sum} requests"
    );
}

/// A handler that answers several named outputs, from a model returning a tuple and one
/// returning a dict: each example's answer names them over the TorchServe API, and the Open
/// Inference Protocol answers one typed output per name.
#[test]
fn a_model_of_two_named_outputs_over_every_route() {
    let mut s = Server::new("enable_model_api=true");
    let tuple = fixture_archive(&s, "pair", "pair.pt", "pair.json");
    let dict = fixture_archive(&s, "pair_dict", "pair_dict.pt", "pair.json");
    s.start(&[
        "--ncs",
        "--models",
        &format!("pair={tuple}"),
        &format!("pair_dict={dict}"),
    ]);
    for model in ["pair", "pair_dict"] {
        let path = format!("/predictions/{model}");
        let r = post_json(&s.inference, &path, "[1.5, 2]");
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        assert_eq!(r.text(), r#"{"double":[3.0,4.0],"total":4}"#, "{model}");
        let r = post_json(&s.inference, &path, r#"{"instances": [[1, 2], [3, 4]]}"#);
        assert_eq!(
            r.json(),
            json!({"predictions": [{"double": [2.0, 4.0], "total": 3},
                                   {"double": [6.0, 8.0], "total": 7}]}),
            "{model}"
        );
        let r = post_json(
            &s.inference,
            &format!("/v1/models/{model}:predict"),
            r#"{"instances": [[1, 2]]}"#,
        );
        assert_eq!(
            r.json(),
            json!({"predictions": [{"double": [2.0, 4.0], "total": 3}]}),
            "{model}"
        );

        // The metadata types each output from the warm-up's forward.
        let meta = s
            .infer("GET", &format!("/v2/models/{model}"), &[], b"")
            .json();
        assert_eq!(
            meta["outputs"],
            json!([
                {"name": "double", "datatype": "FP32", "shape": [-1, 2]},
                {"name": "total", "datatype": "INT64", "shape": [-1]}
            ]),
            "{model}"
        );
        let v2 = |outputs: Value| {
            let mut body = json!({"inputs": [{"name": "input0", "datatype": "FP32",
                                              "shape": [2, 2], "data": [1, 2, 3, 4]}]});
            if !outputs.is_null() {
                body["outputs"] = outputs;
            }
            post_json(
                &s.inference,
                &format!("/v2/models/{model}/infer"),
                &body.to_string(),
            )
        };
        let r = v2(Value::Null);
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        assert_eq!(
            r.json()["outputs"],
            json!([
                {"name": "double", "datatype": "FP32", "shape": [2, 2], "data": [2.0, 4.0, 6.0, 8.0]},
                {"name": "total", "datatype": "INT64", "shape": [2], "data": [3, 7]}
            ]),
            "{model}"
        );
        // Outputs asked for come in the order asked, and only those.
        let got = v2(json!([{"name": "total"}, {"name": "double"}])).json();
        let names: Vec<&str> = got["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["total", "double"], "{model}");
        let r = v2(json!([{"name": "total"}]));
        assert_eq!(
            r.json()["outputs"],
            json!([{"name": "total", "datatype": "INT64", "shape": [2], "data": [3, 7]}]),
            "{model}"
        );
        assert_kserve_error(
            &v2(json!([{"name": "output0"}])),
            400,
            "unexpected inference output 'output0' for model",
        );
        assert_kserve_error(
            &v2(json!([{"name": "total"}, {"name": "total"}])),
            400,
            "output 'total' is requested 2 times",
        );
    }
    // An image model's answers are JSON per image, whatever its output: the typed protocols
    // describe and answer them as BYTES.
    let pictures = archive_with_manifest(
        &s,
        "pictures",
        "tiny_vision.pt",
        r#"{"schema": 1, "name": "image_outputs", "input": {"image": {}},
            "preprocess": [{"resize": {"size": [8, 8]}}, {"to_tensor": {}}],
            "model": {"feed": "stacked"}, "output": {"tensors": ["logits"]}}"#,
    );
    let r = register(
        &s,
        &format!("url={pictures}&initial_workers=1&synchronous=true"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&[200u8; 4 * 4 * 3], 4, 4, image::ExtendedColorType::Rgb8)
        .unwrap();
    let r = s.infer(
        "POST",
        "/predictions/pictures",
        &[("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rest_answer = r.json();
    assert_eq!(
        rest_answer["logits"].as_array().map(Vec::len),
        Some(10),
        "{rest_answer}"
    );
    let meta = s.infer("GET", "/v2/models/pictures", &[], b"").json();
    assert_eq!(
        meta["outputs"],
        json!([{"name": "output0", "datatype": "BYTES", "shape": [-1]}])
    );
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&png);
    let r = post_json(
        &s.inference,
        "/v2/models/pictures/infer",
        &json!({"inputs": [{"name": "input0", "datatype": "BYTES", "shape": [1],
                            "data": [encoded]}]})
        .to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer: Value =
        serde_json::from_str(r.json()["outputs"][0]["data"][0].as_str().unwrap()).unwrap();
    assert_eq!(answer, rest_answer);

    // A handler naming an output the model does not give fails its registration, saying what
    // the model gives.
    let wrong = archive_with_manifest(
        &s,
        "wrong",
        "pair_dict.pt",
        &std::fs::read_to_string(fixture_handler("pair.json"))
            .unwrap()
            .replace("\"total\"", "\"count\""),
    );
    let r = register(
        &s,
        &format!("url={wrong}&initial_workers=1&synchronous=true"),
    );
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(
        r.text()
            .contains("the model's output has no entry 'count'; its entries are 'total', 'double'"),
        "{}",
        r.text()
    );
    let r = post_json(&s.inference, "/predictions/pair", "[1.5, 2]");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An image handler fed stacked is tried at load on a made-up photo: stages that do not fit the
/// model fail the registration with the reason, not every request after it.
#[test]
fn image_handlers_that_do_not_fit_the_model_fail_their_registration() {
    let mut s = Server::new("enable_model_api=true");
    let dir = s.dir.path().join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = |name: &str, mode: &str, dim: i64| {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(
            &path,
            json!({
                "schema": 1,
                "name": name,
                "input": {"image": {"mode": mode}},
                "preprocess": [{"resize": {"size": [40, 40]}}, {"to_tensor": {}}],
                "model": {"feed": "stacked"},
                "postprocess": [{"softmax": {"dim": dim}}],
                "output": {"classes": {"top_k": 3}}
            })
            .to_string(),
        )
        .unwrap();
        archive(
            &s.store,
            name,
            "1.0",
            &fixtures().join("tiny_vision.pt"),
            &path,
            &[],
        )
    };
    let good = manifest("good", "RGB", 1);
    let no_axis = manifest("no_axis", "RGB", 5);
    let grey = manifest("grey", "L", 1);
    s.start(&[]);
    let register = |mar: &str| {
        request(
            &s.management,
            "POST",
            &format!("/models?url={mar}&initial_workers=1&synchronous=true"),
            &[],
            b"",
        )
    };
    let r = register(&good);
    assert_eq!(r.status, 200, "{}", r.text());
    for (mar, says) in [
        (&no_axis, "Dimension out of range"),
        (&grey, "shapes cannot be multiplied"),
    ] {
        let r = register(mar);
        assert_ne!(r.status, 200, "{mar}: {}", r.text());
        assert!(r.text().contains(says), "{mar}: {}", r.text());
    }
    let names = request(&s.management, "GET", "/models", &[], b"").json();
    assert_eq!(names["models"].as_array().unwrap().len(), 1, "{names}");
}

/// `--check` answers one request where the handler's input has a fixed shape, and says it tried
/// none where it has not (the built-in `tensor` handler), rather than an `ok` that reads as if it
/// had.
#[test]
fn check_says_whether_it_answered_a_request() {
    let (s, fixed, _) = scale_server("");
    let any = archive(
        &s.store,
        "any",
        "1.0",
        &fixtures().join("scale2.pt"),
        std::path::Path::new("tensor"),
        &[],
    );
    let scratch = tempfile::tempdir().unwrap();
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_tchserve"))
        .arg("--check")
        .arg("--model-store")
        .arg(&s.store)
        .args(["--models", &fixed, &any])
        .env("TMPDIR", scratch.path()));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    let line = |mar: &str| {
        report
            .lines()
            .find(|l| l.starts_with("ok ") && l.contains(mar))
            .unwrap_or_else(|| panic!("{mar}: {report}"))
    };
    assert!(!line(&fixed).contains("no request tried"), "{report}");
    assert!(line(&any).contains("no request tried"), "{report}");
    // A name registration refuses fails the check too.
    for name in ["_bad".to_string(), "n".repeat(256)] {
        let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_tchserve"))
            .arg("--check")
            .arg("--model-store")
            .arg(&s.store)
            .args(["--models", &format!("{name}={fixed}")])
            .env("TMPDIR", scratch.path()));
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{report}");
        assert!(report.contains("Invalid model name"), "{report}");
    }
}
