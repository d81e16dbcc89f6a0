//! The container image as its users run it: built from this checkout by deploy/docker/build.sh,
//! started with the `docker run` line of docs/deploy.md and with KServe's runtime exactly as
//! deploy/kserve/runtime.yaml writes it, then stopped with `docker stop`.
//!
//! Needs a Docker engine with BuildKit; scripts/setup.sh installs and starts one where it can
//! (root with apt). Elsewhere these tests skip, saying so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::http::{Resp, request, try_request};
use common::server::{
    archive, fixture_handler, fixtures, free_port, pt2_fixtures, real_archive, text_fixtures,
    vision_fixtures,
};
use common::{clients_venv_bin, repo_root, run, run_ok};
use serde_json::Value;

/// The tag the manifests in deploy/ name.
const IMAGE: &str = "tchserve/tchserve:0.1.0-cpu";
/// The base image scripts/setup.sh makes without a registry.
const BASE_IMAGE: &str = "local/debian:bookworm";

/// Why Docker cannot be used here, or None when it can.
fn docker_missing() -> Option<String> {
    let out = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "no Docker engine: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("no docker command: {e}")),
    }
    let base = run(Command::new("docker").args(["image", "inspect", BASE_IMAGE]));
    (!base.status.success())
        .then(|| format!("no {BASE_IMAGE} base image (scripts/setup.sh makes it)"))
}

/// True when this machine could have had Docker installed by scripts/setup.sh: then a missing
/// engine is a failure, not a reason to skip.
fn setup_could_install() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/usr/bin/apt-get").exists()
}

/// Skips (returning false) with a message where Docker is unavailable and scripts/setup.sh
/// said why (build/docker/unavailable); fails where setup should have made it available.
fn docker_ready(test: &str) -> bool {
    let Some(why) = docker_missing() else {
        return true;
    };
    let marker = repo_root().join("build/docker/unavailable");
    match fs::read_to_string(&marker) {
        Ok(reason) => {
            eprintln!("SKIPPED {test}: {why}; scripts/setup.sh: {}", reason.trim());
            false
        }
        Err(_) if setup_could_install() => {
            panic!("{test}: {why}; run scripts/setup.sh, which sets Docker up on this machine")
        }
        Err(_) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// Builds the image once per test run from the binaries these tests were built with.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_tchserve")).parent().unwrap();
        let out = run_ok(
            Command::new(repo_root().join("deploy/docker/build.sh"))
                .args(["--base-image", BASE_IMAGE, "--tag", IMAGE])
                .env("BIN_DIR", bin_dir),
        );
        eprintln!(
            "{}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
        );
    });
    IMAGE
}

/// A container removed when dropped, whatever the test did.
struct Container(String);

impl Container {
    fn name(&self) -> &str {
        &self.0
    }
    fn logs(&self) -> String {
        let o = run(Command::new("docker").args(["logs", &self.0]));
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
    fn inspect(&self, format: &str) -> String {
        let o = run_ok(Command::new("docker").args(["inspect", "-f", format, &self.0]));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), free_port())
}

/// Waits for `GET /ping` to answer 200 on `addr`.
fn wait_ping(addr: &str, c: &Container) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = try_request(addr, "GET", "/ping", &[], b"", Duration::from_secs(5))
            && r.status == 200
        {
            return;
        }
        assert!(
            c.inspect("{{.State.Running}}") == "true",
            "the container exited:\n{}",
            c.logs()
        );
        assert!(
            Instant::now() < deadline,
            "no answer on {addr}:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A model store readable by the image's user (uid 1000), as a mounted folder must be.
fn shared_dir(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A model store holding the fixtures' MLP as `mlp-1.0.mar`.
fn store_with_mlp(store: &Path) {
    shared_dir(store);
    archive(
        store,
        "mlp",
        "1.0",
        &fixtures().join("mlp.pt"),
        &fixture_handler("vec784.json"),
        &[],
    );
}

/// The first `docker run` command of a document, its continuation lines joined and its
/// spacing made single.
fn run_line_in(file: &str) -> String {
    let doc = fs::read_to_string(repo_root().join(file)).unwrap();
    let start = doc
        .find("docker run ")
        .unwrap_or_else(|| panic!("{file} has no docker run line"));
    let mut line = String::new();
    for l in doc[start..].lines() {
        let l = l.trim();
        match l.strip_suffix('\\') {
            Some(part) => line.push_str(part),
            None => {
                line.push_str(l);
                break;
            }
        }
        line.push(' ');
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The `docker run` line users copy: docs/deploy.md's, which the README repeats.
fn documented_run_line() -> String {
    let line = run_line_in("docs/deploy.md");
    assert_eq!(
        run_line_in("README.md"),
        line,
        "README.md and docs/deploy.md differ"
    );
    line
}

fn bearer(keys: &Value, kind: &str) -> String {
    format!("Bearer {}", keys[kind]["key"].as_str().unwrap())
}

fn floats(r: &Resp) -> Vec<f64> {
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn the_documented_docker_run_serves_and_stops_cleanly() {
    if !docker_ready("the_documented_docker_run_serves_and_stops_cleanly") {
        return;
    }
    let image = image();
    // What the image holds: the binaries and the libraries they load, nothing of Python.
    let out = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--entrypoint",
        "bash",
        image,
        "-c",
        "id -u; ls /opt/tchserve/lib; command -v python3 || echo no-python",
    ]));
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listing.starts_with("1000\n"), "runs as uid 1000: {listing}");
    assert!(
        listing.contains("libtorch_cpu.so") && listing.contains("no-python"),
        "{listing}"
    );
    assert!(
        !listing.contains("libtorch_python") && !listing.contains("libtorch_cuda.so"),
        "{listing}"
    );

    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("model-store");
    store_with_mlp(&store);
    let name = unique("tchserve-test");
    let (http, mgmt, metrics) = (free_port(), free_port(), free_port());
    let line = documented_run_line()
        .replace("--name tchserve", &format!("--name {name}"))
        .replace("127.0.0.1:8080:8080", &format!("127.0.0.1:{http}:8080"))
        .replace("127.0.0.1:8081:8081", &format!("127.0.0.1:{mgmt}:8081"))
        .replace("127.0.0.1:8082:8082", &format!("127.0.0.1:{metrics}:8082"))
        .replace("$PWD/model-store", &store.display().to_string());
    assert!(
        line.contains(&name) && line.contains(&format!(":{http}:8080")),
        "{line}"
    );
    let c = Container(name);
    run_ok(Command::new("bash").args(["-c", &line]));
    let (http, mgmt, metrics) = (
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{mgmt}"),
        format!("127.0.0.1:{metrics}"),
    );
    wait_ping(&http, &c);

    // The keys, read as the documentation reads them.
    let out = run_ok(Command::new("docker").args(["exec", c.name(), "cat", "key_file.json"]));
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (ikey, mkey) = (bearer(&keys, "inference"), bearer(&keys, "management"));
    let x: Vec<f32> = (0..784).map(|i| (i % 7) as f32 / 7.0).collect();
    let body = serde_json::to_vec(&x).unwrap();
    let r = request(
        &http,
        "POST",
        "/predictions/mlp",
        &[("Authorization", &ikey)],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(floats(&r).len(), 10);
    assert_eq!(
        request(&http, "POST", "/predictions/mlp", &[], &body).status,
        400,
        "keys are on"
    );

    // Registered at run time from the mounted store.
    archive(
        &store,
        "slow",
        "1.0",
        &fixtures().join("slow.pt"),
        &fixture_handler("vec2.json"),
        &[],
    );
    let r = request(
        &mgmt,
        "POST",
        "/models?url=slow-1.0.mar&initial_workers=1&synchronous=true",
        &[("Authorization", &mkey)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request(
        &http,
        "POST",
        "/predictions/slow",
        &[("Authorization", &ikey)],
        b"[1, 7]",
    );
    assert_eq!(floats(&r), [1.0, 7.0]);
    // A .pt2 package: its compiled code loads libtorch.so, which the image provides without
    // libtorch's CUDA half.
    let pt2 = pt2_fixtures();
    archive(
        &store,
        "packaged",
        "1.0",
        &pt2.join("mlp.pt2"),
        &fixture_handler("vec784.json"),
        &[],
    );
    let r = request(
        &mgmt,
        "POST",
        "/models?url=packaged-1.0.mar&initial_workers=1&synchronous=true",
        &[("Authorization", &mkey)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let inputs: Vec<Vec<f32>> =
        serde_json::from_slice(&fs::read(pt2.join("inputs.json")).unwrap()).unwrap();
    let expected: Vec<Vec<f64>> =
        serde_json::from_slice(&fs::read(pt2.join("expected.json")).unwrap()).unwrap();
    let r = request(
        &http,
        "POST",
        "/predictions/packaged",
        &[("Authorization", &ikey)],
        &serde_json::to_vec(&inputs[0]).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = floats(&r);
    assert_eq!(got.len(), 10);
    for (g, w) in got.iter().zip(&expected[0]) {
        assert!(
            (g - w).abs() <= 1e-5,
            "{got:?} against PyTorch's {:?}",
            expected[0]
        );
    }
    let maps = run_ok(Command::new("docker").args([
        "exec",
        c.name(),
        "bash",
        "-c",
        "grep -o 'libtorch[a-z_]*\\.so' /proc/1/maps | sort -u",
    ]));
    let maps = String::from_utf8_lossy(&maps.stdout).to_string();
    assert!(
        maps.contains("libtorch.so") && !maps.contains("libtorch_cuda"),
        "{maps}"
    );

    let m = request(&metrics, "GET", "/metrics", &[], b"").text();
    assert!(m.contains("ts_inference_requests_total"), "{m}");

    // Docker's health check runs every 15 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.inspect("{{.State.Health.Status}}") != "healthy" {
        assert!(
            Instant::now() < deadline,
            "never healthy: {}",
            c.inspect("{{json .State.Health}}")
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // docker stop with a request in flight: it is answered and the exit is clean. Docker's
    // grace period is raised so that a slow machine cannot turn the stop into a SIGKILL,
    // which would show as exit code 137, not 0.
    let (addr, key) = (http.clone(), ikey.clone());
    let in_flight = std::thread::spawn(move || {
        request(
            &addr,
            "POST",
            "/predictions/slow",
            &[("Authorization", &key)],
            b"[15000, 3]",
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    run_ok(Command::new("docker").args(["stop", "-t", "60", c.name()]));
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(floats(&r), [15000.0, 3.0]);
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
    assert!(c.logs().contains("stopped"), "{}", c.logs());
}

/// The container's image and args in deploy/kserve/runtime.yaml, read with a YAML parser.
fn runtime_container() -> (String, Vec<String>) {
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
                  rt = [d for d in docs if d['kind'] == 'ClusterServingRuntime'][0]\n\
                  c = rt['spec']['containers'][0]\n\
                  print(json.dumps({'image': c['image'], 'args': c.get('args', [])}))";
    let v = yaml_facts(script, &[repo_root().join("deploy/kserve/runtime.yaml")]);
    (
        v["image"].as_str().unwrap().to_string(),
        strings(&v["args"]),
    )
}

/// What a Python `script` prints as JSON about the YAML `files` it is given.
fn yaml_facts(script: &str, files: &[PathBuf]) -> Value {
    let out = run_ok(
        Command::new(clients_venv_bin("python"))
            .args(["-c", script])
            .args(files),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strings(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// A folder laid out as KServe's storage initializer leaves `/mnt/models` for a TorchServe
/// model: `config/config.properties` as KServe's examples write it, `model-store/*.mar`.
fn kserve_model_dir(root: &Path) -> PathBuf {
    let dir = root.join("models");
    let store = dir.join("model-store");
    shared_dir(&dir);
    shared_dir(&dir.join("config"));
    store_with_mlp(&store);
    fs::rename(store.join("mlp-1.0.mar"), store.join("mlp.mar")).unwrap();
    let labels = root.join("index_to_name.json");
    fs::copy(vision_fixtures().join("imagenet_labels.json"), &labels).unwrap();
    real_archive(
        &store,
        "cls",
        &vision_fixtures().join("efficientnet_lite0.pt"),
        "image_classifier",
        &[&labels],
    );
    let tx = text_fixtures();
    real_archive(
        &store,
        "txt",
        &tx.join("classifier.pt"),
        "text_classifier",
        &[&tx.join("tokenizer.json"), &tx.join("index_to_name.json")],
    );
    let model = |name: &str| {
        format!(
            "\"{name}\":{{\"1.0\":{{\"defaultVersion\":true,\"marName\":\"{name}.mar\",\"minWorkers\":1,\
             \"maxWorkers\":5,\"batchSize\":1,\"maxBatchDelay\":10,\"responseTimeout\":120}}}}"
        )
    };
    // KServe's example puts inference and management on one port (its Python proxy sits in
    // front): the runtime's own arguments must move them apart.
    let config = format!(
        "inference_address=http://0.0.0.0:8085\n\
         management_address=http://0.0.0.0:8085\n\
         metrics_address=http://0.0.0.0:8082\n\
         grpc_inference_port=7070\n\
         grpc_management_port=7071\n\
         enable_metrics_api=true\n\
         metrics_format=prometheus\n\
         number_of_netty_threads=4\n\
         job_queue_size=10\n\
         enable_envvars_config=true\n\
         install_py_dep_per_model=true\n\
         model_store=/mnt/models/model-store\n\
         model_snapshot={{\"name\":\"startup.cfg\",\"modelCount\":3,\"models\":{{{},{},{}}}}}\n",
        model("mlp"),
        model("cls"),
        model("txt")
    );
    fs::write(dir.join("config/config.properties"), config).unwrap();
    for f in fs::read_dir(&store).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(f.unwrap().path(), fs::Permissions::from_mode(0o644)).unwrap();
    }
    dir
}

#[test]
fn the_kserve_runtime_serves_kserve_clients_as_written() {
    if !docker_ready("the_kserve_runtime_serves_kserve_clients_as_written") {
        return;
    }
    let built = image();
    let (image, args) = runtime_container();
    assert_eq!(
        image, built,
        "the runtime names the image this checkout builds"
    );
    let root = tempfile::tempdir().unwrap();
    let models = kserve_model_dir(root.path());
    let (http, grpc) = (free_port(), free_port());
    let c = Container(unique("tchserve-kserve"));
    let mut cmd = Command::new("docker");
    cmd.args(["run", "-d", "--name", c.name()])
        .args([
            "-p",
            &format!("127.0.0.1:{http}:8080"),
            "-p",
            &format!("127.0.0.1:{grpc}:8081"),
        ])
        .arg("-v")
        .arg(format!("{}:/mnt/models:ro", models.display()))
        .arg(&image)
        .args(&args);
    run_ok(&mut cmd);
    let (http, grpc) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{grpc}"));
    wait_ping(&http, &c);
    let out = run(Command::new(clients_venv_bin("python"))
        .arg(repo_root().join("tests/clients/protocols.py"))
        .arg("kserve")
        .args(["--http", &http, "--grpc", &grpc, "--grpc-management", &grpc])
        .arg("--image")
        .arg(vision_fixtures().join("images/cat173.jpg"))
        .args(["--mlp-archive", "mlp.mar"]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}\ncontainer log:\n{}", c.logs());
    assert!(text.contains("checks of kserve"), "{text}");
    eprintln!("{}", text.trim());
    run_ok(Command::new("docker").args(["stop", "-t", "60", c.name()]));
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
}

/// The CPU Deployment's container and its ConfigMap's config.properties, read with a YAML
/// parser: (image, args, config text, where the config and the model store are mounted).
fn kubernetes_container() -> (String, Vec<String>, String, String, String) {
    let script = "import json, sys, yaml\n\
                  d = yaml.safe_load(open(sys.argv[1]))\n\
                  cm = yaml.safe_load(open(sys.argv[2]))\n\
                  c = d['spec']['template']['spec']['containers'][0]\n\
                  mounts = {m['name']: m['mountPath'] for m in c['volumeMounts']}\n\
                  print(json.dumps({'image': c['image'], 'args': c['args'],\n\
                      'config': cm['data']['config.properties'],\n\
                      'config_dir': mounts['config'], 'store': mounts['model-store']}))";
    let dir = repo_root().join("deploy/kubernetes");
    let v = yaml_facts(
        script,
        &[dir.join("deployment.yaml"), dir.join("configmap.yaml")],
    );
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    (
        s("image"),
        strings(&v["args"]),
        s("config"),
        s("config_dir"),
        s("store"),
    )
}

#[test]
fn the_kubernetes_deployment_runs_as_written_on_a_read_only_root() {
    if !docker_ready("the_kubernetes_deployment_runs_as_written_on_a_read_only_root") {
        return;
    }
    let built = image();
    let (image, args, config, config_dir, store_path) = kubernetes_container();
    assert_eq!(image, built);
    let root = tempfile::tempdir().unwrap();
    let (config_host, store) = (root.path().join("config"), root.path().join("store"));
    shared_dir(&config_host);
    store_with_mlp(&store);
    fs::write(config_host.join("config.properties"), &config).unwrap();
    let (http, mgmt, metrics) = (free_port(), free_port(), free_port());
    let c = Container(unique("tchserve-k8s"));
    // As the kubelet runs it: a read-only root with an empty /tmp, the ConfigMap and the
    // model store mounted read-only, uid 1000.
    let mut cmd = Command::new("docker");
    cmd.args([
        "run",
        "-d",
        "--name",
        c.name(),
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--user",
        "1000:1000",
    ])
    .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
    .args(["-p", &format!("127.0.0.1:{http}:8080")])
    .args(["-p", &format!("127.0.0.1:{mgmt}:8081")])
    .args(["-p", &format!("127.0.0.1:{metrics}:8082")])
    .arg("-v")
    .arg(format!("{}:{config_dir}:ro", config_host.display()))
    .arg("-v")
    .arg(format!("{}:{store_path}:ro", store.display()))
    .arg(&image)
    .args(&args);
    run_ok(&mut cmd);
    let (http, mgmt, metrics) = (
        format!("127.0.0.1:{http}"),
        format!("127.0.0.1:{mgmt}"),
        format!("127.0.0.1:{metrics}"),
    );
    wait_ping(&http, &c);
    let ready = request(&http, "GET", "/v2/health/ready", &[], b"");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let x: Vec<f32> = (0..784).map(|i| (i % 5) as f32).collect();
    let r = request(
        &http,
        "POST",
        "/predictions/mlp",
        &[],
        &serde_json::to_vec(&x).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let m = request(&metrics, "GET", "/metrics", &[], b"").text();
    assert!(m.contains("ts_inference_requests_total"), "{m}");
    // Management listens on the pod's loopback only: published or not, it does not answer.
    assert!(
        try_request(&mgmt, "GET", "/models", &[], b"", Duration::from_secs(5)).is_err(),
        "management answered from outside the container"
    );
    run_ok(Command::new("docker").args(["stop", "-t", "60", c.name()]));
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
}
