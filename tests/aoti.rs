//! `.pt2` packages (torch.export + AOTInductor) served like TorchScript archives: the same
//! handler manifest, PyTorch's eager answers through the server, batches equal to singles, the
//! package's batch bound held to, and packages that cannot run refused at registration with a
//! message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::server::{Server, archive, fixture_handler, pt2_fixtures};

fn register(s: &Server, query: &str) -> common::http::Resp {
    s.manage("POST", &format!("/models?{query}&synchronous=true"))
}

fn predict(s: &Server, model: &str, example: &serde_json::Value) -> Vec<f64> {
    let body = serde_json::json!({ "data": example }).to_string();
    let r = s.infer(
        "POST",
        &format!("/predictions/{model}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

#[test]
fn a_pt2_package_answers_as_pytorch_and_bad_ones_are_refused() {
    let dir = pt2_fixtures();
    let mut s = Server::new("enable_model_api=true");
    let handler = fixture_handler("vec784.json");
    let mar = archive(&s.store, "mlp", "1.0", &dir.join("mlp.pt2"), &handler, &[]);
    let cuda = archive(
        &s.store,
        "cuda",
        "1.0",
        &dir.join("cuda_labelled.pt2"),
        &handler,
        &[],
    );
    let corrupt = archive(
        &s.store,
        "corrupt",
        "1.0",
        &dir.join("corrupt.pt2"),
        &handler,
        &[],
    );
    s.start(&[]);

    let r = register(
        &s,
        &format!("url={mar}&model_name=single&initial_workers=1"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = register(
        &s,
        &format!("url={mar}&model_name=batched&initial_workers=1&batch_size=8&max_batch_delay=200"),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let inputs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let expected: Vec<Vec<f64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let singles: Vec<Vec<f64>> = inputs.iter().map(|x| predict(&s, "single", x)).collect();
    for (got, want) in singles.iter().zip(&expected) {
        assert_eq!(got.len(), 10);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5, "{got:?} against PyTorch's {want:?}");
        }
    }

    // Eight at once gather into one batch of the package's dynamic size.
    let batched: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|x| scope.spawn(|| predict(&s, "batched", x)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (b, one) in batched.iter().zip(&singles) {
        for (x, y) in b.iter().zip(one) {
            assert!(
                (x - y).abs() <= 1e-5,
                "batched {b:?} against single {one:?}"
            );
        }
    }
    // Each request records the size of its batch: a sum above 8 means some ran together.
    let metrics = s.metrics_text();
    let sum: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tchserve_batch_size_sum{model_name=\"batched\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the batched model's batch sizes");
    assert!(sum > 8.0, "the eight requests were not batched: {metrics}");

    // The package was exported for batches of at most 64: a registration that would gather more
    // is refused, and so is one request holding more.
    let r = register(
        &s,
        &format!("url={mar}&model_name=wide&initial_workers=1&batch_size=100"),
    );
    assert_ne!(r.status, 200);
    assert!(r.text().contains("at most 64 examples"), "{}", r.text());
    let many: Vec<&serde_json::Value> = inputs.iter().cycle().take(65).collect();
    let r = s.infer(
        "POST",
        "/predictions/single",
        &[("Content-Type", "application/json")],
        serde_json::json!({ "data": many }).to_string().as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("at most 64 examples"), "{}", r.text());
    let r = s.infer(
        "POST",
        "/predictions/single",
        &[("Content-Type", "application/json")],
        serde_json::json!({ "data": &many[..64] })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // A package for the other kind of device, and a damaged one, are refused with the reason.
    let r = register(&s, &format!("url={cuda}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text()
            .contains("compiled for cuda and this worker runs on cpu"),
        "{}",
        r.text()
    );
    let r = register(&s, &format!("url={corrupt}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(r.text().contains("corrupt.pt2"), "{}", r.text());
    // The server still serves.
    predict(&s, "single", &inputs[0]);
}
