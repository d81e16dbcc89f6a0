//! Every protocol through its real clients: tritonclient (v2 REST and gRPC), the kserve
//! package (v1 REST, v2 REST and gRPC) and stubs that grpcio-tools makes from the server's
//! TorchServe protos. One server holds an MLP, a pretrained image classifier, a text
//! classifier, a model of two named inputs and one of two named outputs; each answer must equal
//! the TorchServe REST route's, bitwise for tensors (tests/clients/protocols.py).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::Command;

use common::server::{
    Server, archive, fixture_handler, fixtures, mlp_archive, real_archive, text_fixtures,
    vision_fixtures,
};
use common::{clients_venv_bin, repo_root};

fn server() -> (Server, String) {
    server_with("enable_model_api=true")
}

fn server_with(config: &str) -> (Server, String) {
    let mut s = Server::new(config);
    let mlp = mlp_archive(&s);
    let labels = s.dir.path().join("index_to_name.json");
    fs::copy(vision_fixtures().join("imagenet_labels.json"), &labels).unwrap();
    let cls = real_archive(
        &s.store,
        "cls",
        &vision_fixtures().join("efficientnet_lite0.pt"),
        "image_classifier",
        &[&labels],
    );
    let tx = text_fixtures();
    let txt = real_archive(
        &s.store,
        "txt",
        &tx.join("classifier.pt"),
        "text_classifier",
        &[&tx.join("tokenizer.json"), &tx.join("index_to_name.json")],
    );
    let two = archive(
        &s.store,
        "two",
        "1.0",
        &fixtures().join("two_inputs.pt"),
        &fixture_handler("two_inputs.json"),
        &[],
    );
    let pair = archive(
        &s.store,
        "pair",
        "1.0",
        &fixtures().join("pair.pt"),
        &fixture_handler("pair.json"),
        &[],
    );
    s.start(&[
        "--models",
        &format!("mlp={mlp}"),
        &format!("cls={cls}"),
        &format!("txt={txt}"),
        &format!("two={two}"),
        &format!("pair={pair}"),
    ]);
    (s, mlp)
}

fn run_suite((s, mlp): (Server, String), suite: &str) {
    let key_file = s.home().join("key_file.json");
    let image = vision_fixtures().join("images/cat173.jpg");
    let out = Command::new(clients_venv_bin("python"))
        .arg(repo_root().join("tests/clients/protocols.py"))
        .arg(suite)
        .args(["--http", &s.inference])
        .args(["--grpc", &s.grpc_inference])
        .args(["--grpc-management", &s.grpc_management])
        .arg("--image")
        .arg(&image)
        .args(["--mlp-archive", &mlp])
        .arg("--key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{suite}:\n{text}\nserver log:\n{}",
        s.log()
    );
    assert!(text.contains(&format!("checks of {suite}")), "{text}");
    eprintln!("{}", text.trim());
    // Every call is in the access log with the client that made it, gRPC as REST. Access
    // lines are written within 100 ms.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = s.log();
    let logged = |method: &str| {
        log.lines().any(|l| {
            l.contains(&format!("method={method} path=/")) && l.contains("peer=127.0.0.1:")
        })
    };
    assert!(
        logged("gRPC"),
        "{suite}: no gRPC call in the access log:\n{log}"
    );
    if matches!(suite, "triton" | "kserve") {
        assert!(
            logged("POST"),
            "{suite}: no REST call in the access log:\n{log}"
        );
    }
    if suite == "torchserve-grpc" {
        // Its calls whose deadline passed while the model ran, as CANCELLED.
        assert!(
            log.lines().any(|l| l.contains(
                "method=gRPC path=/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions status=1 "
            )),
            "no cancelled call in the access log:\n{log}"
        );
    }
}

#[test]
fn tritonclient_http_and_grpc() {
    run_suite(server(), "triton");
}

#[test]
fn kserve_clients_v1_v2_and_grpc() {
    run_suite(server(), "kserve");
}

#[test]
fn torchserve_grpc_inference_and_management() {
    // A queue deep enough for the 400 messages the suite sends ahead on one stream.
    run_suite(
        server_with("enable_model_api=true\njob_queue_size=1000"),
        "torchserve-grpc",
    );
}

#[test]
fn torchserve_grpc_without_the_model_api() {
    run_suite(server_with(""), "model-api-off");
}

#[test]
fn grpc_calls_carry_their_keys_in_metadata() {
    run_suite(
        server_with("enable_model_api=true\ndisable_token_authorization=false"),
        "auth",
    );
}
