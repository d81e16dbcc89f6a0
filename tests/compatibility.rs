//! What TorchServe users do, done as TorchServe does it: its management test cases, its snapshot
//! configuration, and each documented command run as a new user would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::Command;

use common::http::{assert_error, post_json, request};
use common::run;
use common::server::{
    Server, archive, fixture_handler, fixtures, scale_archive, tiny_image_archive,
};
use serde_json::Value;

fn model_names(s: &Server) -> Vec<String> {
    request(&s.management, "GET", "/models", &[], b"").json()["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap().to_string())
        .collect()
}

/// A tiny PNG photo.
fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::new_rgb8(40, 30)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[test]
fn management_cases_of_torchserve_own_test_collection() {
    let mut s = Server::new("enable_model_api=true");
    let tiny = tiny_image_archive(&s, &[]);
    let scale = scale_archive(&s, "scale");
    s.start(&[]);
    // TorchServe's own handler module names its built-in handler.
    for (name, handler) in [
        ("a", "serve/ts/torch_handler/image_classifier.py:handle"),
        ("b", "ts.torch_handler.image_classifier"),
    ] {
        let r = request(
            &s.management,
            "POST",
            &format!("/models?url={tiny}&model_name={name}&handler={handler}&initial_workers=1"),
            &[],
            b"",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let described = request(&s.management, "GET", &format!("/models/{name}"), &[], b"").json();
        assert_eq!(described[0]["handler"], handler);
        let p = s.infer("POST", &format!("/predictions/{name}"), &[], &png());
        assert_eq!(p.status, 200, "{}", p.text());
        assert_eq!(p.json().as_object().unwrap().len(), 5, "{}", p.text());
    }
    // Other Python handlers keep their refusal.
    assert_error(
        &request(
            &s.management,
            "POST",
            &format!("/models?url={tiny}&model_name=c&handler=my_handler.py:handle"),
            &[],
            b"",
        ),
        400,
        "InvalidModelException",
        "Python code",
    );
    // A trailing slash on any route.
    assert_eq!(
        request(&s.management, "GET", "/models/a/", &[], b"").status,
        200
    );
    assert_eq!(
        request(&s.management, "GET", "/models/", &[], b"").status,
        200
    );
    assert_eq!(s.infer("POST", "/predictions/a/", &[], &png()).status, 200);
    assert_eq!(request(&s.inference, "GET", "/ping/", &[], b"").status, 200);
    let r = request(
        &s.management,
        "DELETE",
        "/models/b/?synchronous=true",
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // startup_timeout is honoured: 0 s is too short for any worker, and nothing registers.
    assert_error(
        &request(
            &s.management,
            "POST",
            &format!(
                "/models?url={scale}&model_name=late&initial_workers=3&synchronous=true&startup_timeout=0"
            ),
            &[],
            b"",
        ),
        500,
        "InternalServerException",
        "Failed to start workers for model late version: 1.0",
    );
    assert!(!model_names(&s).contains(&"late".to_string()));
    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={scale}&model_name=idle&startup_timeout=0"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_python_handler_with_its_manifest_beside_it_serves_in_tchserve() {
    // One archive for both servers: TorchServe runs doubler.py, tchserve the doubler.json packed
    // beside it, whichever archiver packed it.
    let mut s = Server::new("");
    let dir = s.dir.path().join("twin");
    fs::create_dir_all(&dir).unwrap();
    let code = dir.join("doubler.py");
    fs::write(&code, "def handle(data, context):\n    return data\n").unwrap();
    let twin = dir.join("doubler.json");
    fs::copy(fixture_handler("vec4.json"), &twin).unwrap();
    let scale2 = fixtures().join("scale2.pt");
    let real =
        common::server::real_archive(&s.store, "real", &scale2, code.to_str().unwrap(), &[&twin]);
    let ours = archive(
        &s.store,
        "ours",
        "1.0",
        &scale2,
        &code,
        &["--extra-files", twin.to_str().unwrap()],
    );
    // The archiver checks the twin as a manifest, and says what each server runs.
    let pack = |name: &str| {
        run(Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .args(["--model-name", name, "--version", "1.0", "--handler"])
            .arg(&code)
            .arg("--serialized-file")
            .arg(&scale2)
            .arg("--extra-files")
            .arg(&twin)
            .arg("--export-path")
            .arg(&dir))
    };
    let out = pack("said");
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success()
            && said.contains("serves the archive with the manifest beside it, doubler.json"),
        "{said}"
    );
    fs::write(&twin, "{\"schema\": 1, \"input\": {}}").unwrap();
    let out = pack("bad");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("doubler.json"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.start(&["--models", &format!("real={real}"), &format!("ours={ours}")]);
    for name in ["real", "ours"] {
        let r = post_json(
            &s.inference,
            &format!("/predictions/{name}"),
            "[1, 2, 3, 4]",
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.json(), serde_json::json!([2.0, 4.0, 6.0, 8.0]), "{name}");
        // Numbers written as text (a CSV row, sent by `curl -T row.csv`) are read as numbers,
        // not as the raw bytes of four floats.
        let r = s.infer("POST", &format!("/predictions/{name}"), &[], b"1,2,3,4\n");
        assert_eq!(
            r.json(),
            serde_json::json!([2.0, 4.0, 6.0, 8.0]),
            "{name}: {}",
            r.text()
        );
        let r = s.infer(
            "POST",
            &format!("/predictions/{name}"),
            &[("Content-Type", "text/csv")],
            b"1,2,3,4\n5,6,7,8\n",
        );
        assert_eq!(
            r.json(),
            serde_json::json!([[2.0, 4.0, 6.0, 8.0], [10.0, 12.0, 14.0, 16.0]]),
            "{name}: {}",
            r.text()
        );
        let described = s.manage("GET", &format!("/models/{name}")).json();
        assert_eq!(described[0]["handler"], "doubler.py", "{described}");
    }
    // `--check` serves it the same way.
    let out = run(s
        .command()
        .args(["--check", "--models", &format!("real={real}")]));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.lines().any(|l| l.starts_with("ok ")),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn what_a_restart_does_not_take_from_the_configuration_is_said() {
    // The models key's settings apply where a model is first loaded; once a snapshot restores
    // the model as it was registered, an edit of them is named with what was restored.
    let mut s = Server::new("");
    let scale = scale_archive(&s, "scale");
    let config = |batch: u32, workers: u32| {
        format!(
            "load_models=scale={scale}\nmodels={{\"scale\": {{\"1.0\": {{\"batchSize\": {batch}, \
             \"maxBatchDelay\": 5, \"minWorkers\": {workers}, \"minWorker\": 3}}}}}}"
        )
    };
    s.set_config(&config(2, 1));
    s.start(&[]);
    let described = |s: &Server| s.manage("GET", "/models/scale").json()[0].clone();
    assert_eq!(described(&s)["batchSize"], 2);
    // A mistyped setting is warned about.
    assert!(
        s.log()
            .contains("models: scale 1.0: unknown setting \"minWorker\", ignored"),
        "{}",
        s.log()
    );
    assert!(!s.log().contains("restores these models"), "{}", s.log());
    s.stop_ok();
    s.set_config(&config(4, 1));
    s.start(&[]);
    assert_eq!(described(&s)["batchSize"], 2);
    let log = s.log();
    assert!(
        log.contains("restores these models as they were registered")
            && log.contains("scale 1.0: batchSize 4 (restored: 2)")
            && !log.contains("minWorkers 1"),
        "{log}"
    );
    s.stop_ok();

    // TorchServe's own snapshots in the log folder are named, with how to take them over.
    let mut t = Server::new("");
    let scale = scale_archive(&t, "scale");
    let config_dir = t.dir.path().join("logs/config");
    fs::create_dir_all(&config_dir).unwrap();
    let cfg = "20241001130000000-shutdown.cfg";
    fs::write(
        config_dir.join(cfg),
        // A TorchServe snapshot holds the whole configuration: here the test's addresses.
        format!(
            "{}model_snapshot={{\"name\":\"{cfg}\",\"modelCount\":1,\"models\":{{\"scale\":{{\"1.0\":\
             {{\"defaultVersion\":true,\"marName\":\"{scale}\",\"minWorkers\":1,\"maxWorkers\":1,\
             \"batchSize\":1,\"maxBatchDelay\":100,\"responseTimeout\":120}}}}}}}}\n",
            t.config_text()
        ),
    )
    .unwrap();
    t.start(&[]);
    let log = t.log();
    assert!(
        log.contains("holds TorchServe's snapshots")
            && log.contains(&format!("--ts-config logs/config/{cfg}")),
        "{log}"
    );
    assert!(model_names(&t).is_empty());
    t.stop_ok();
    // Named, it is the configuration, and its models are served.
    let named = config_dir.join(cfg);
    t.start(&["--ts-config", named.to_str().unwrap()]);
    assert_eq!(model_names(&t), ["scale"]);
    assert!(
        !t.log().contains("holds TorchServe's snapshots"),
        "{}",
        t.log()
    );
}

#[test]
fn model_snapshot_in_config_properties_defines_the_models() {
    // A model_snapshot line as TorchServe writes it in logs/config/*-snapshot.cfg (Java
    // properties escaping included), and as KServe's model layout defines models. load_models
    // is ignored in its favour.
    let json = r#"{"name":"20261126103000000-snapshot.cfg","modelCount":2,"models":{"scale":{"1.0":{"defaultVersion":true,"marName":"scale-1.0.mar","minWorkers":2,"maxWorkers":4,"batchSize":4,"maxBatchDelay":25,"responseTimeout":30}},"renamed":{"1.0":{"defaultVersion":true,"marName":"other-1.0.mar","minWorkers":1,"maxWorkers":1,"batchSize":1,"maxBatchDelay":100,"responseTimeout":120}}}}"#;
    let escaped = json.replace(':', "\\:").replace('=', "\\=");
    let mut s = Server::new(&format!(
        "model_snapshot={escaped}\nload_models=other-1.0.mar"
    ));
    assert_eq!(scale_archive(&s, "scale"), "scale-1.0.mar");
    assert_eq!(scale_archive(&s, "other"), "other-1.0.mar");
    s.start(&[]);
    let d = request(&s.management, "GET", "/models/scale", &[], b"").json();
    let d = &d[0];
    assert_eq!(
        (
            d["minWorkers"].as_u64(),
            d["maxWorkers"].as_u64(),
            d["batchSize"].as_u64(),
            d["maxBatchDelay"].as_u64(),
            d["responseTimeout"].as_u64()
        ),
        (Some(2), Some(4), Some(4), Some(25), Some(30)),
        "{d}"
    );
    assert_eq!(d["workers"].as_array().unwrap().len(), 2);
    assert_eq!(model_names(&s), ["renamed", "scale"]);
    let r = post_json(&s.inference, "/predictions/renamed", "[1, 2, 3, 4]");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Stops a server started with `--start` in `home`, whatever the test's outcome.
struct StopOnDrop<'a>(&'a std::path::Path);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_tchserve"))
            .current_dir(self.0)
            .arg("--stop")
            .output();
    }
}

#[test]
fn start_stop_and_status_as_documented() {
    let s = Server::new("disable_token_authorization=false");
    let scale = scale_archive(&s, "scale");
    fs::write(
        s.home().join("config.properties"),
        s.config_text() + &format!("load_models=scale={scale} other={scale}\n"),
    )
    .unwrap();
    let tchserve = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tchserve"));
        cmd.current_dir(s.home())
            .env_remove("TS_CONFIG_FILE")
            .env_remove("LOG_LOCATION")
            .env("TMPDIR", s.temp_dir())
            .args(args);
        run(&mut cmd)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let _stop = StopOnDrop(s.home());
    // load_models separated by spaces, as documented for --models; TorchServe's --log-config
    // is accepted.
    let started = tchserve(&["--start", "--ncs", "--log-config", "log4j2.xml"]);
    assert!(started.status.success(), "{}", text(&started));
    let key_file = fs::read(s.home().join("key_file.json")).unwrap();
    let keys: Value = serde_json::from_slice(&key_file).unwrap();
    let auth = format!("Bearer {}", keys["management"]["key"].as_str().unwrap());
    let listed = request(
        &s.management,
        "GET",
        "/models",
        &[("Authorization", &auth)],
        b"",
    );
    let listed_json = listed.json();
    let names: Vec<&str> = listed_json["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other", "scale"], "{}", listed.text());
    let log = fs::read_to_string(s.home().join("logs/tchserve.log")).unwrap();
    assert!(
        log.contains("--log-config is TorchServe's and not used by tchserve"),
        "{log}"
    );

    // A second start on the same ports, from the same folder with another log folder: it must
    // fail, say why, and leave the running server's key file alone.
    let second = tchserve(&["--start", "--ncs", "--log-dir", "logs2"]);
    assert!(!second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("Address already in use"),
        "{}",
        text(&second)
    );
    assert_eq!(fs::read(s.home().join("key_file.json")).unwrap(), key_file);
    // It fails before loading a model: with large ones, the wait would be minutes.
    let second_log = fs::read_to_string(s.home().join("logs2/tchserve.log")).unwrap();
    assert!(!second_log.contains("worker ready"), "{second_log}");

    // --stop and --status look where they are told; nothing there is an error, with the hint.
    let wrong = tchserve(&["--stop", "--log-dir", "logs2"]);
    assert!(!wrong.status.success());
    assert!(text(&wrong).contains("--log-dir"), "{}", text(&wrong));
    let status = tchserve(&["--status"]);
    assert!(status.status.success(), "{}", text(&status));
    let stopped = tchserve(&["--stop"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(!tchserve(&["--status"]).status.success());

    // A model that cannot be loaded fails the start loudly.
    let failed = tchserve(&[
        "--start",
        "--ncs",
        "--models",
        "missing.mar",
        "--disable-token-auth",
    ]);
    assert!(!failed.status.success());
    assert!(
        text(&failed).contains("cannot be loaded") && text(&failed).contains("missing.mar"),
        "{}",
        text(&failed)
    );
}

#[test]
fn settings_survive_a_restart_and_reach_the_handler() {
    let mut s = Server::new(
        "enable_model_api=true\nmodels={\"scale\": {\"1.0\": {\"minWorkers\": 1, \"maxWorkers\": 3}}}",
    );
    let scale = scale_archive(&s, "scale");
    fs::write(s.home().join("top3.yaml"), "handler:\n  top_k: 3\n").unwrap();
    let tiny = tiny_image_archive(
        &s,
        &[
            "--config-file",
            s.home().join("top3.yaml").to_str().unwrap(),
        ],
    );
    // An archive whose manifest names a tensor handler, served with the image handler.
    let plain = archive(
        &s.store,
        "plain",
        "1.0",
        &fixtures().join("tiny_vision.pt"),
        &fixture_handler("vec4.json"),
        &[],
    );
    s.start(&["--models", &format!("scale={scale}")]);
    let d = request(&s.management, "GET", "/models/scale", &[], b"").json();
    assert_eq!(d[0]["maxWorkers"], 3, "the models key's maxWorkers");
    // model-config.yaml's handler section reaches the handler.
    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={tiny}&initial_workers=1"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let p = s.infer("POST", "/predictions/tiny", &[], &png());
    assert_eq!(p.json().as_object().unwrap().len(), 3, "{}", p.text());
    // A handler named at registration is described, snapshotted and restored.
    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={plain}&handler=image_classifier&initial_workers=1"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = request(&s.management, "GET", "/models/plain", &[], b"").json();
    assert_eq!(d[0]["handler"], "image_classifier");
    s.stop_ok();
    s.start(&[]);
    let d = request(&s.management, "GET", "/models/plain", &[], b"").json();
    assert_eq!(d[0]["handler"], "image_classifier");
    let p = s.infer("POST", "/predictions/plain", &[], &png());
    assert_eq!(p.status, 200, "{}", p.text());
    assert_eq!(p.json().as_object().unwrap().len(), 5, "{}", p.text());
}

#[test]
fn token_renewal_names_a_bad_type() {
    let mut s = Server::new("disable_token_authorization=false");
    let scale = scale_archive(&s, "scale");
    s.start(&["--models", &format!("scale={scale}"), "--ncs"]);
    let keys: Value =
        serde_json::from_slice(&fs::read(s.home().join("key_file.json")).unwrap()).unwrap();
    let api = format!("Bearer {}", keys["API"]["key"].as_str().unwrap());
    assert_error(
        &request(
            &s.management,
            "GET",
            "/token?type=foo",
            &[("Authorization", &api)],
            b"",
        ),
        400,
        "InvalidKeyException",
        "unknown key type \"foo\"",
    );
    // Without the API key the answer says nothing about the type, as TorchServe checks the
    // key first.
    for auth in [None, Some("Bearer nope")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        assert_error(
            &request(&s.management, "GET", "/token?type=API", &headers, b""),
            400,
            "InvalidKeyException",
            "Token Authorization failed",
        );
    }
}

/// What a TorchServe user with an eager-mode model has, archived by the real archiver: weights
/// saved by torch.save with the Python model file beside them (named `.pt`, as TorchServe's
/// examples name them), the same weights alone, a whole pickled module, and weights in
/// torch.save's older pickle format. Each is refused at registration, with or without workers,
/// as a 400 that says how to export TorchScript, and `--check` says the same; the server keeps
/// serving.
#[test]
fn files_of_torch_save_are_refused_with_how_to_export_them() {
    let mut s = Server::new("enable_model_api=true");
    let tiny = tiny_image_archive(&s, &[]);
    let dir = s.dir.path().join("eager");
    fs::create_dir_all(&dir).unwrap();
    let model_py = "import torch\n\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n        \
                    super().__init__()\n        self.fc = torch.nn.Linear(4, 3)\n\n    \
                    def forward(self, x):\n        return self.fc(x)\n";
    fs::write(dir.join("model.py"), model_py).unwrap();
    common::run_ok(
        Command::new(common::venv_bin("python"))
            .current_dir(&dir)
            .args([
                "-c",
                "import torch, model\n\
                 net = model.Net().eval()\n\
                 torch.save(net.state_dict(), 'weights.pt')\n\
                 torch.save(net, 'whole.pt')\n\
                 torch.save(net.state_dict(), 'legacy.pt', _use_new_zipfile_serialization=False)\n",
            ]),
    );
    let archived = |name: &str, file: &str, model_file: bool| {
        let mut cmd = Command::new(common::venv_bin("torch-model-archiver"));
        cmd.args(["--model-name", name, "--version", "1.0", "--handler"])
            .arg("base_handler")
            .arg("--serialized-file")
            .arg(dir.join(file))
            .arg("--export-path")
            .arg(&s.store)
            .arg("--force");
        if model_file {
            cmd.arg("--model-file").arg(dir.join("model.py"));
        }
        common::run_ok(&mut cmd);
        format!("{name}.mar")
    };
    let cases = [
        (
            archived("eager", "weights.pt", true),
            "weights.pt was written by torch.save (the weights of an eager-mode archive",
        ),
        (
            archived("weights", "weights.pt", false),
            "weights.pt was written by torch.save (a state_dict or a pickled module)",
        ),
        (
            archived("whole", "whole.pt", false),
            "whole.pt was written by torch.save",
        ),
        (
            archived("legacy", "legacy.pt", false),
            "legacy.pt is a pickle written by torch.save",
        ),
    ];
    // A file libtorch itself refuses: its message, once, without its C++ stack frames.
    fs::write(
        dir.join("junk.pt"),
        b"neither TorchScript nor a pickle\n".repeat(64),
    )
    .unwrap();
    let junk = archived("junk", "junk.pt", false);
    s.start(&["--models", &format!("tiny={tiny}")]);
    for (mar, says) in &cases {
        for workers in [1, 0] {
            let r = request(
                &s.management,
                "POST",
                &format!("/models?url={mar}&initial_workers={workers}&synchronous=true"),
                &[],
                b"",
            );
            assert_error(&r, 400, "InvalidModelException", says);
            assert_error(&r, 400, "InvalidModelException", "torch.jit.script(model)");
        }
    }
    assert_eq!(model_names(&s), ["tiny"]);
    assert_eq!(
        s.infer("POST", "/predictions/tiny", &[], &png()).status,
        200
    );

    let check_temp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tchserve"))
        .arg("--check")
        .arg("--model-store")
        .arg(&s.store)
        .arg("--models")
        .args(cases.iter().map(|(mar, _)| mar))
        .arg(&junk)
        .env("TMPDIR", check_temp.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    for (mar, says) in &cases {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("FAIL") && l.contains(mar.as_str()) && l.contains(says)),
            "{mar}: {report}"
        );
    }
    let refused = report
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains(&junk))
        .unwrap_or_else(|| panic!("{junk}: {report}"));
    assert!(refused.contains("loading junk.pt: "), "{report}");
    assert_eq!(
        refused.matches("PytorchStreamReader").count(),
        1,
        "{report}"
    );
    assert!(!report.contains("frame #"), "{report}");
}
