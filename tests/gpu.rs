//! TorchScript on a GPU worker: PyTorch's answers from the same GPU through the server, batched
//! across concurrent requests, with a bad request failing alone; images preprocessed on the GPU
//! as torchvision does on the host. Skipped where no NVIDIA GPU is present (the CPU paths are
//! covered by every other test), but for the images, which then go through CPU workers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::server::{Server, archive, fixture_handler, gpu_fixtures};
use common::{nvidia_gpu, repo_root, threads_named};

#[test]
fn a_torchscript_model_on_gpu_workers_answers_as_pytorch_on_the_gpu() {
    serve_on_the_gpu(1);
}

#[test]
fn forwards_launched_from_several_threads_answer_the_same() {
    serve_on_the_gpu(2);
}

/// Two GPU workers of one model, whose forwards run on `forward_threads` threads
/// (`gpu_forward_threads`), answer a batch of requests as PyTorch does on the GPU.
fn serve_on_the_gpu(forward_threads: usize) {
    if !nvidia_gpu() {
        eprintln!("skipped: no NVIDIA GPU on this machine");
        return;
    }
    let dir = gpu_fixtures();
    let mut s = Server::new(&format!(
        "enable_model_api=true\ngpu_forward_threads={forward_threads}"
    ));
    let mar = archive(
        &s.store,
        "cnn",
        "1.0",
        &dir.join("cnn.pt"),
        &fixture_handler("vec3072.json"),
        &[],
    );
    s.start(&[]);
    register_two_workers(&s, &mar, "cnn", 8, true);
    // Both workers hand their forwards to the model's forward threads on the GPU.
    assert_eq!(threads_named(s.pid(), "forward-cuda0"), forward_threads);
    // Each GPU worker answers its batches on a thread of its own while it starts the next.
    assert_eq!(threads_named(s.pid(), "A-"), 2);

    let inputs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let expected: Vec<Vec<f64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    // Eight good requests and one of the wrong size, at once: the bad one fails alone.
    let bad = serde_json::json!(vec![0.5; 100]);
    let answers: Vec<(u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .chain(std::iter::once(&bad))
            .map(|x| {
                let s = &s;
                scope.spawn(move || {
                    let body = serde_json::json!({ "data": x }).to_string();
                    let r = s.infer(
                        "POST",
                        "/predictions/cnn",
                        &[("Content-Type", "application/json")],
                        body.as_bytes(),
                    );
                    (r.status, r.text())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (last, good) = answers.split_last().unwrap();
    assert_eq!(last.0, 400, "{}", last.1);
    for ((status, text), want) in good.iter().zip(&expected) {
        assert_eq!(*status, 200, "{text}");
        let got: Vec<f64> = serde_json::from_str(text).unwrap();
        assert_eq!(got.len(), want.len());
        // cuDNN may pick another convolution algorithm in another process: equal to rounding.
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{got:?} against PyTorch's {want:?}"
            );
        }
    }
    assert_batched(&s, "cnn");
}

/// image_classifier's preprocessing in front of a model that returns its input: on a GPU worker
/// the batch goes up as bytes and `ToTensor` and `Normalize` run there, and each request of a
/// batch still gets torchvision's tensor for its image. Where there is no GPU the same requests
/// go through CPU workers, which finish the images on the host.
#[test]
fn images_finished_on_the_gpu_are_torchvisions_tensors() {
    let dir = gpu_fixtures();
    let gpu = nvidia_gpu();
    if !gpu {
        eprintln!("no NVIDIA GPU on this machine: the images go through CPU workers");
    }
    let mut s = Server::new("enable_model_api=true");
    let text = std::fs::read_to_string(repo_root().join("handlers/image_classifier.json")).unwrap();
    let mut handler: serde_json::Value = serde_json::from_str(&text).unwrap();
    handler["postprocess"] = serde_json::json!([]);
    handler["output"] = serde_json::json!({"tensor": {}});
    let handler_file = s.dir.path().join("pixels.json");
    std::fs::write(&handler_file, handler.to_string()).unwrap();
    let mar = archive(
        &s.store,
        "pixels",
        "1.0",
        &dir.join("identity.pt"),
        &handler_file,
        &[],
    );
    s.start(&[]);
    register_two_workers(&s, &mar, "pixels", 4, gpu);

    // Each photo twice, all at once, so that batches mix photos of different sizes.
    let photos: Vec<usize> = (0..4).chain(0..4).collect();
    let answers: Vec<(usize, u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = photos
            .iter()
            .map(|&k| {
                let (s, dir) = (&s, &dir);
                scope.spawn(move || {
                    let png = std::fs::read(dir.join(format!("photo{k}.png"))).unwrap();
                    let r = s.infer("POST", "/predictions/pixels", &[], &png);
                    (k, r.status, r.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, status, body) in answers {
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "photo{k}: {text}");
        let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
        common::assert_tensor_is(
            &got,
            &dir.join(format!("photo{k}.tensor")),
            &format!("photo{k}"),
        );
    }
    assert_batched(&s, "pixels");
}

/// Registers `mar` as `name` with two workers gathering batches of up to `batch`, and checks
/// that they run on GPUs when `on_gpu`, else on the CPU.
fn register_two_workers(s: &Server, mar: &str, name: &str, batch: usize, on_gpu: bool) {
    let r = s.manage(
        "POST",
        &format!(
            "/models?url={mar}&model_name={name}&initial_workers=2&batch_size={batch}\
             &max_batch_delay=200&synchronous=true"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let described: serde_json::Value =
        serde_json::from_slice(&s.manage("GET", &format!("/models/{name}")).body).unwrap();
    let workers = described[0]["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{described}");
    assert!(
        workers
            .iter()
            .all(|w| w["gpu"] == serde_json::json!(on_gpu)),
        "gpu should be {on_gpu}: {described}"
    );
}

/// Asserts that `model`'s requests were answered in batches of more than one.
fn assert_batched(s: &Server, model: &str) {
    let metrics = s.metrics_text();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{model_name=\"{model}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} for {model}"))
    };
    let (examples, batches) = (
        metric("tchserve_batch_size_sum"),
        metric("tchserve_batch_size_count"),
    );
    assert!(
        examples > batches,
        "{examples} examples in {batches} batches: none was batched"
    );
}
