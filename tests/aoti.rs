//! `.pt2` packages (torch.export + AOTInductor) served like TorchScript archives: the same
//! handler manifest, PyTorch's eager answers through the server, batches equal to singles, the
//! package's batch range held to, inputs checked, and packages that cannot run refused at
//! registration with a message. The examples' pretrained classifier and trained digits model
//! answer as PyTorch does and as their TorchScript twins in the same server, as does a package
//! of two inputs and two outputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::server::{
    Server, archive, example_build, fixture_handler, pt2_cuda_fixtures, pt2_fixtures, text_fixtures,
};
use common::{cosine, detections, nvidia_gpu, repo_root};

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
    let fixed = archive(
        &s.store,
        "fixed",
        "1.0",
        &dir.join("mlp_b1.pt2"),
        &handler,
        &[],
    );
    // The built-in handler takes float32 tensors of any shape, so only the package checks them.
    let any_shape = archive(
        &s.store,
        "any_shape",
        "1.0",
        &dir.join("mlp.pt2"),
        Path::new("tensor"),
        &[],
    );
    let arm = archive(
        &s.store,
        "arm",
        "1.0",
        &dir.join("arm_labelled.pt2"),
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
    let exported = archive(
        &s.store,
        "exported",
        "1.0",
        &dir.join("exported_program.pt2"),
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

    // The package's compiled code links to libtorch.so; on this CPU-only server that must not
    // bring in libtorch's CUDA half (hundreds of MB of CUDA libraries).
    if !nvidia_gpu() {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.pid())).unwrap();
        assert!(maps.contains("libtorch_cpu.so"));
        assert!(
            !maps.contains("libtorch_cuda"),
            "serving a .pt2 package loaded libtorch_cuda.so: the build makes a libtorch.so front \
             for libtorch_cpu.so (crates/link-libtorch.rs); see its warning"
        );
    }

    // The package was exported for batches of at most 64: a registration that would gather more
    // is refused as the client's error, whether it waits for its workers or not, and leaves
    // nothing registered; so is one request holding more.
    for sync in ["true", "false"] {
        let r = s.manage(
            "POST",
            &format!(
                "/models?url={mar}&model_name=wide&initial_workers=1&batch_size=100&synchronous={sync}"
            ),
        );
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("InvalidModelException"), "{}", r.text());
        assert!(r.text().contains("at most 64 examples"), "{}", r.text());
        assert_eq!(s.manage("GET", "/models/wide").status, 404);
    }
    assert_eq!(s.infer("GET", "/ping", &[], b"").status, 200);
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

    // A package exported for a fixed batch of 1 is run one request at a time, whatever the
    // registration's batch_size, and a request of several examples one example at a time.
    let r = register(
        &s,
        &format!("url={fixed}&model_name=fixed&initial_workers=1&batch_size=8&max_batch_delay=200"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answers: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|x| scope.spawn(|| predict(&s, "fixed", x)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (got, want) in answers.iter().zip(&expected) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5, "{got:?} against PyTorch's {want:?}");
        }
    }
    let metrics = s.metrics_text();
    let sum = metrics
        .lines()
        .find(|l| l.starts_with("tchserve_batch_size_sum{model_name=\"fixed\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(sum, Some(8.0), "the fixed-batch model batched: {metrics}");
    let r = s.infer(
        "POST",
        "/predictions/fixed",
        &[("Content-Type", "application/json")],
        serde_json::json!({ "data": &inputs[..3] })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let three: Vec<Vec<f64>> = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(three.len(), 3);
    for (got, want) in three.iter().zip(&expected) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5, "{got:?} against PyTorch's {want:?}");
        }
    }

    // An input of the wrong shape is refused by the package's own checks, as bad input, before
    // its kernels could read past the end of it.
    let r = register(
        &s,
        &format!("url={any_shape}&model_name=any_shape&initial_workers=1"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.infer(
        "POST",
        "/predictions/any_shape",
        &[("Content-Type", "application/json")],
        serde_json::json!({ "data": vec![0.5; 100] })
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text()
            .contains("unmatched dim value at 1, expected: 784, but got: 100"),
        "{}",
        r.text()
    );
    let good = predict(&s, "any_shape", &inputs[0]);
    for (g, w) in good.iter().zip(&expected[0]) {
        assert!(
            (g - w).abs() <= 1e-5,
            "{good:?} against PyTorch's {:?}",
            expected[0]
        );
    }

    // A package for the other kind of device, and a damaged one, are refused with the reason.
    let r = register(&s, &format!("url={cuda}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text()
            .contains("compiled for cuda and this worker runs on cpu"),
        "{}",
        r.text()
    );
    let r = register(&s, &format!("url={arm}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text().contains(&format!(
            "compiled for linux aarch64 and this machine is linux {}",
            std::env::consts::ARCH
        )),
        "{}",
        r.text()
    );
    let r = register(&s, &format!("url={corrupt}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(r.text().contains("corrupt.pt2"), "{}", r.text());
    // The other kind of .pt2, an exported program, is named for what it is.
    let r = register(&s, &format!("url={exported}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text()
            .contains("holds an exported program (torch.export.save)"),
        "{}",
        r.text()
    );
    // The server still serves.
    predict(&s, "single", &inputs[0]);

    // libtorch unpacks each package into a temp folder of its own, which it removes only when
    // it ends cleanly. Those folders are kept in the server's scratch folder, so what a crash
    // leaves is swept by the next start.
    let temp = s.temp_dir();
    let unpacked = || -> Vec<std::path::PathBuf> {
        walkdir::WalkDir::new(&temp)
            .into_iter()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("aotinductor_"))
            .map(|e| e.path().to_path_buf())
            .collect()
    };
    let held_by = |pid: u32| temp.join(format!("tchserve-{pid}"));
    let before = unpacked();
    let first = held_by(s.pid());
    assert!(
        !before.is_empty(),
        "no package unpacked under {}",
        temp.display()
    );
    assert!(before.iter().all(|p| p.starts_with(&first)), "{before:?}");
    s.kill();
    s.start(&[]);
    predict(&s, "single", &inputs[0]);
    let after = unpacked();
    let second = held_by(s.pid());
    assert!(
        after.iter().all(|p| p.starts_with(&second)),
        "left by the killed server: {after:?}"
    );
}

/// Within 1e-5 of PyTorch's value, relative to it where it is above 1 (logits reach about 10).
fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-5 * want.abs().max(1.0)
}

fn post_json(s: &Server, model: &str, body: &serde_json::Value) -> serde_json::Value {
    let r = s.infer(
        "POST",
        &format!("/predictions/{model}"),
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn classify(s: &Server, model: &str, photo: &[u8]) -> BTreeMap<String, f64> {
    let r = s.infer(
        "POST",
        &format!("/predictions/{model}"),
        &[("Content-Type", "image/jpeg")],
        photo,
    );
    assert_eq!(r.status, 200, "{model}: {}", r.text());
    serde_json::from_slice(&r.body).unwrap()
}

fn best(classes: &BTreeMap<String, f64>) -> &str {
    classes
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(name, _)| name.as_str())
        .unwrap()
}

#[test]
fn the_pt2_examples_answer_as_pytorch_and_as_their_torchscript_twins() {
    let pt2 = example_build("pt2", "efficientnet_lite0.pt2");
    let script = example_build("image_classifier", "efficientnet_lite0.pt");
    let labels = pt2.join("index_to_name.json");
    let labels = ["--extra-files", labels.to_str().unwrap()];
    let mut s = Server::new("enable_model_api=true");
    let digits = archive(
        &s.store,
        "digits_pt2",
        "1.0",
        &pt2.join("digits.pt2"),
        &repo_root().join("examples/digits/digits_handler.json"),
        &[],
    );
    let classifier = archive(
        &s.store,
        "classifier_pt2",
        "1.0",
        &pt2.join("efficientnet_lite0.pt2"),
        Path::new("image_classifier"),
        &labels,
    );
    let twin = archive(
        &s.store,
        "classifier_ts",
        "1.0",
        &script.join("efficientnet_lite0.pt"),
        Path::new("image_classifier"),
        &labels,
    );
    let raw = archive(
        &s.store,
        "logits_pt2",
        "1.0",
        &pt2.join("efficientnet_lite0.pt2"),
        Path::new("tensor"),
        &[],
    );
    s.start(&[]);
    for query in [
        format!("url={digits}&model_name=digits_pt2&initial_workers=1&batch_size=8"),
        format!("url={classifier}&model_name=classifier_pt2&initial_workers=1"),
        format!(
            "url={classifier}&model_name=classifier_pt2_b8&initial_workers=1&batch_size=8&max_batch_delay=500"
        ),
        format!("url={twin}&model_name=classifier_ts&initial_workers=1"),
        format!("url={raw}&model_name=logits_pt2&initial_workers=1"),
    ] {
        let r = register(&s, &query);
        assert_eq!(r.status, 200, "{query}: {}", r.text());
    }
    let eager: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pt2.join("eager.json")).unwrap()).unwrap();

    // The trained digits model on every held-out digit, eight to a request, as PyTorch answers.
    let inputs = eager["digits_inputs"].as_array().unwrap();
    let logits = eager["digits_logits"].as_array().unwrap();
    assert!(inputs.len() > 400);
    for (chunk, want) in inputs.chunks(8).zip(logits.chunks(8)) {
        let got = post_json(&s, "digits_pt2", &serde_json::json!({ "data": chunk }));
        let got: Vec<Vec<f64>> = serde_json::from_value(got).unwrap();
        assert_eq!(got.len(), chunk.len());
        for (g, w) in got.iter().zip(want) {
            let w: Vec<f64> = serde_json::from_value(w.clone()).unwrap();
            assert!(
                g.iter().zip(&w).all(|(a, b)| close(*a, *b)),
                "{g:?} against PyTorch's {w:?}"
            );
        }
    }

    // The pretrained classifier's logits on the preprocessed cat, as PyTorch answers.
    let cat_tensor: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pt2.join("cat_tensor.json")).unwrap()).unwrap();
    let got: Vec<f64> = serde_json::from_value(post_json(
        &s,
        "logits_pt2",
        &serde_json::json!({ "data": cat_tensor }),
    ))
    .unwrap();
    let want: Vec<f64> = serde_json::from_value(eager["cat_logits"].clone()).unwrap();
    assert_eq!(got.len(), 1000);
    let worst = common::max_abs_diff(&got, &want);
    assert!(
        got.iter().zip(&want).all(|(g, w)| close(*g, *w)),
        "largest difference from PyTorch's logits: {worst}"
    );

    // Photos through the image_classifier handler: the package and the TorchScript file of the
    // same model give the same classes and probabilities, one at a time and batched.
    let photos: Vec<Vec<u8>> = ["cat.jpg", "coffee.jpg"]
        .iter()
        .map(|p| std::fs::read(pt2.join(p)).unwrap())
        .collect();
    let mut singles = Vec::new();
    for photo in &photos {
        let from_package = classify(&s, "classifier_pt2", photo);
        let from_script = classify(&s, "classifier_ts", photo);
        assert_eq!(from_package.len(), 5);
        assert_eq!(
            from_package.keys().collect::<Vec<_>>(),
            from_script.keys().collect::<Vec<_>>()
        );
        for (name, p) in &from_package {
            assert!(
                (p - from_script[name]).abs() <= 1e-5,
                "{name}: {p} from the package, {} from TorchScript",
                from_script[name]
            );
        }
        singles.push(from_package);
    }
    assert!(
        ["Egyptian cat", "tabby", "tiger cat"].contains(&best(&singles[0])),
        "{:?}",
        singles[0]
    );
    assert_eq!(best(&singles[1]), "espresso");
    let batched: Vec<BTreeMap<String, f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let photo = &photos[i % 2];
                let s = &s;
                scope.spawn(move || classify(s, "classifier_pt2_b8", photo))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, b) in batched.iter().enumerate() {
        let one = &singles[i % 2];
        assert_eq!(b.keys().collect::<Vec<_>>(), one.keys().collect::<Vec<_>>());
        for (name, p) in b {
            assert!(
                (p - one[name]).abs() <= 1e-5,
                "batched {b:?} against single {one:?}"
            );
        }
    }
    let sum: f64 = s
        .metrics_text()
        .lines()
        .find(|l| l.starts_with("tchserve_batch_size_sum{model_name=\"classifier_pt2_b8\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the batched classifier's batch sizes");
    assert!(sum > 8.0, "the eight photos were not batched");
}

#[test]
fn a_cuda_package_runs_on_a_gpu_worker_and_a_cpu_one_is_refused_there() {
    if !nvidia_gpu() {
        eprintln!("skipped: no NVIDIA GPU on this machine");
        return;
    }
    let dir = pt2_cuda_fixtures();
    let mut s = Server::new("enable_model_api=true");
    let handler = fixture_handler("vec784.json");
    let gpu = archive(
        &s.store,
        "gpu",
        "1.0",
        &dir.join("mlp_cuda.pt2"),
        &handler,
        &[],
    );
    let cpu = archive(
        &s.store,
        "cpu",
        "1.0",
        &pt2_fixtures().join("mlp.pt2"),
        &handler,
        &[],
    );
    s.start(&[]);
    let r = register(
        &s,
        &format!("url={gpu}&model_name=gpu&initial_workers=1&batch_size=8&max_batch_delay=200"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let described = s.manage("GET", "/models/gpu").text();
    assert!(
        described.contains(r#""deviceType":"gpu""#) || described.contains(r#""deviceType": "gpu""#),
        "not on a GPU: {described}"
    );
    let inputs: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let expected: Vec<Vec<f64>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let answers: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|x| scope.spawn(|| predict(&s, "gpu", x)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (got, want) in answers.iter().zip(&expected) {
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5, "{got:?} against PyTorch's {want:?}");
        }
    }
    // A CPU package cannot run on the GPU worker this machine gives it.
    let r = register(&s, &format!("url={cpu}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text()
            .contains("compiled for cpu and this worker runs on cuda"),
        "{}",
        r.text()
    );
}

/// Every number in two JSON answers, in order.
fn numbers(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        serde_json::Value::Array(items) => items.iter().for_each(|i| numbers(i, out)),
        serde_json::Value::Object(map) => map.values().for_each(|i| numbers(i, out)),
        _ => {}
    }
}

/// The same answer within 1e-5 for every number (and the same keys and shape).
fn same_answer(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    numbers(a, &mut x);
    numbers(b, &mut y);
    assert_eq!(x.len(), y.len(), "{what}: {a} against {b}");
    let worst = common::max_abs_diff(&x, &y);
    assert!(worst <= 1e-5, "{what}: differs by up to {worst}");
    if let (Some(p), Some(q)) = (a.as_object(), b.as_object()) {
        assert_eq!(
            p.keys().collect::<Vec<_>>(),
            q.keys().collect::<Vec<_>>(),
            "{what}"
        );
    }
}

#[test]
fn the_built_in_handlers_run_pt2_models_as_they_run_torchscript() {
    let text = text_fixtures();
    let pt2 = pt2_fixtures();
    let photo = std::fs::read(example_build("pt2", "cat.jpg").join("cat.jpg")).unwrap();
    let handlers = repo_root().join("handlers");
    let tokenizer = text.join("tokenizer.json");
    let labels = text.join("index_to_name.json");
    let text_extra = [
        "--extra-files",
        &format!("{},{}", tokenizer.display(), labels.display()),
    ];
    let mut s = Server::new("enable_model_api=true");
    let mut pairs = Vec::new();
    for (name, dir, file, handler, extra) in [
        (
            "minilm",
            text,
            "minilm",
            "text_embedding.json",
            &text_extra[..],
        ),
        (
            "classifier",
            text,
            "classifier",
            "text_classifier.json",
            &text_extra[..],
        ),
        (
            "segmenter",
            pt2,
            "segmenter",
            "image_segmenter.json",
            &[][..],
        ),
    ] {
        for ext in ["pt2", "pt"] {
            let model = format!("{name}_{ext}");
            let mar = archive(
                &s.store,
                &model,
                "1.0",
                &dir.join(format!("{file}.{ext}")),
                &handlers.join(handler),
                extra,
            );
            pairs.push((model, mar));
        }
    }
    let int32_text = archive(
        &s.store,
        "int32_text",
        "1.0",
        &pt2.join("text_int32.pt2"),
        &handlers.join("text_embedding.json"),
        &text_extra,
    );
    s.start(&[]);
    for (model, mar) in &pairs {
        let r = register(
            &s,
            &format!("url={mar}&model_name={model}&initial_workers=1"),
        );
        assert_eq!(r.status, 200, "{model}: {}", r.text());
    }

    // Text in, through the tokenizer: sentence embeddings and class probabilities, the package's
    // as its TorchScript twin's, and the embeddings as sentence-transformers' own.
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(text.join("expected.json")).unwrap()).unwrap();
    let post_text = |model: &str, sentence: &str| -> serde_json::Value {
        let r = s.infer(
            "POST",
            &format!("/predictions/{model}"),
            &[("Content-Type", "text/plain; charset=utf-8")],
            sentence.as_bytes(),
        );
        assert_eq!(r.status, 200, "{model} on {sentence:?}: {}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    };
    let sentences = want["sentences"].as_array().unwrap();
    assert!(sentences.len() >= 20);
    for (i, sentence) in sentences.iter().enumerate() {
        let sentence = sentence.as_str().unwrap();
        let embedding = post_text("minilm_pt2", sentence);
        same_answer(&embedding, &post_text("minilm_pt", sentence), sentence);
        let mut got = Vec::new();
        numbers(&embedding, &mut got);
        let mut reference = Vec::new();
        numbers(&want["embeddings"][i], &mut reference);
        let c = cosine(&got, &reference);
        assert!(
            c >= 0.9999,
            "{sentence}: cosine {c} to sentence-transformers"
        );
        same_answer(
            &post_text("classifier_pt2", sentence),
            &post_text("classifier_pt", sentence),
            sentence,
        );
    }

    // A model returning a dict, as torchvision's segmenters do: the handler takes its "out".
    let segment = |model: &str| -> serde_json::Value {
        let r = s.infer(
            "POST",
            &format!("/predictions/{model}"),
            &[("Content-Type", "image/jpeg")],
            &photo,
        );
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    };
    same_answer(
        &segment("segmenter_pt2"),
        &segment("segmenter_pt"),
        "segmenter",
    );

    // A text package exported for int32 ids is refused when registered, not at every request.
    let r = register(&s, &format!("url={int32_text}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(r.text().contains("int64 token ids"), "{}", r.text());
    assert_eq!(s.manage("GET", "/models/int32_text").status, 404);
}

/// Every number within 1e-5 of the other, relative to it where it is above 1.
fn near(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

fn same_detections(got: &[(String, Vec<f64>, f64)], want: &[(String, Vec<f64>, f64)], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} against {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, w.0, "{what}: label");
        assert!(
            g.1.iter().zip(&w.1).all(|(p, q)| near(*p, *q)) && near(g.2, w.2),
            "{what}: {g:?} against {w:?}"
        );
    }
}

#[test]
fn the_object_detector_handler_runs_a_pt2_detector_as_pytorch() {
    let dir = pt2_fixtures();
    let handlers = repo_root().join("handlers");
    let labels = dir.join("detector/index_to_name.json");
    let extra = ["--extra-files", labels.to_str().unwrap()];
    let mut s = Server::new("enable_model_api=true");
    let detector = |name: &str, file: &str, handler: &str| {
        archive(
            &s.store,
            name,
            "1.0",
            &dir.join(file),
            &handlers.join(handler),
            &extra,
        )
    };
    let single = detector("single", "detector.pt2", "object_detector.json");
    let pair = detector("pair", "detector_pair.pt2", "object_detector.json");
    let script = detector("script", "detector.pt", "object_detector.json");
    let mlp = detector("mlp_detector", "mlp.pt2", "object_detector.json");
    let classifier = detector(
        "detector_classifier",
        "detector.pt2",
        "image_classifier.json",
    );
    s.start(&[]);
    for (mar, batching) in [
        (&single, "&batch_size=8&max_batch_delay=300"),
        (&pair, "&batch_size=8&max_batch_delay=300"),
        (&script, ""),
    ] {
        let r = register(&s, &format!("url={mar}&initial_workers=1{batching}"));
        assert_eq!(r.status, 200, "{mar}: {}", r.text());
    }

    // PyTorch eager's detections scoring at least the handler's 0.5, named by index_to_name.json.
    let names: BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&labels).unwrap()).unwrap();
    let eager: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("detector_expected.json")).unwrap())
            .unwrap();
    let scenes = ["scene_a.png", "scene_b.png"];
    let photos: Vec<Vec<u8>> = scenes
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    let mut want = Vec::new();
    for found in eager.as_array().unwrap() {
        let scores = found["scores"].as_array().unwrap();
        let kept: Vec<_> = (0..scores.len())
            .filter_map(|i| {
                let score = scores[i].as_f64().unwrap();
                assert!(
                    (score - 0.5).abs() > 1e-4,
                    "a score of {score} is too close to the threshold to test"
                );
                (score >= 0.5).then(|| {
                    let label = found["labels"][i].as_i64().unwrap().to_string();
                    let bx = found["boxes"][i]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    (names[&label].clone(), bx, score)
                })
            })
            .collect();
        assert!(
            !kept.is_empty() && kept.len() < scores.len(),
            "the threshold keeps some detections and drops others"
        );
        want.push(kept);
    }
    let detect = |model: &str, photo: &[u8]| {
        let r = s.infer(
            "POST",
            &format!("/predictions/{model}"),
            &[("Content-Type", "image/png")],
            photo,
        );
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        detections(&r.json())
    };
    for model in ["single", "pair", "script"] {
        for (i, photo) in photos.iter().enumerate() {
            same_detections(
                &detect(model, photo),
                &want[i],
                &format!("{model} on {}", scenes[i]),
            );
        }
    }

    // Seven pictures of two sizes at once: batched, the pair package runs them two by two, the
    // last forward padded, and each answer is the one it gives alone. A picture smaller than the
    // packages were exported for, sent with them, is refused alone.
    let tiny = std::fs::read(dir.join("scene_tiny.png")).unwrap();
    for model in ["single", "pair"] {
        let (burst, refused) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..7)
                .map(|i| {
                    let photo = &photos[i % 2];
                    let detect = &detect;
                    scope.spawn(move || detect(model, photo))
                })
                .collect();
            let refused = scope.spawn(|| {
                s.infer(
                    "POST",
                    &format!("/predictions/{model}"),
                    &[("Content-Type", "image/png")],
                    &tiny,
                )
            });
            let burst: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (burst, refused.join().unwrap())
        });
        for (i, got) in burst.iter().enumerate() {
            same_detections(
                got,
                &want[i % 2],
                &format!("{model} in a burst, picture {i}"),
            );
        }
        assert_eq!(refused.status, 400, "{model}: {}", refused.text());
        assert!(
            refused.text().contains("too small"),
            "{model}: {}",
            refused.text()
        );
    }
    let metrics = s.metrics_text();
    // Each request records the size of the batch it ran in.
    let batch_sizes = |model: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("tchserve_batch_size_sum{{model_name=\"{model}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no batch sizes for {model}: {metrics}"))
    };
    // 10 requests each: the pair package took the burst's in batches, the one exported for a
    // single picture ran each request alone.
    assert!(
        batch_sizes("pair") > 10.0,
        "the pair package did not batch: {metrics}"
    );
    assert_eq!(batch_sizes("single"), 10.0, "{metrics}");

    // A package and a handler that disagree on taking a list are refused, saying why.
    let r = register(&s, &format!("url={mlp}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(r.text().contains("list[Tensor]"), "{}", r.text());
    let r = register(&s, &format!("url={classifier}&initial_workers=1"));
    assert_ne!(r.status, 200);
    assert!(
        r.text().contains("\\\"feed\\\": \\\"list\\\""),
        "{}",
        r.text()
    );
}

#[test]
fn text_packages_of_a_fixed_or_bounded_length_are_fitted_or_refused() {
    let text = text_fixtures();
    let pt2 = pt2_fixtures();
    let tokenizer = text.join("tokenizer.json");
    let extra = ["--extra-files", tokenizer.to_str().unwrap()];
    let mut s = Server::new("enable_model_api=true");
    // text_embedding, keeping at most `max_length` tokens of a text.
    let handler = |max_length: u32| {
        let path = s.dir.path().join(format!("embedding_{max_length}.json"));
        let mut manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(repo_root().join("handlers/text_embedding.json")).unwrap(),
        )
        .unwrap();
        manifest["input"]["text"]["max_length"] = max_length.into();
        std::fs::write(&path, manifest.to_string()).unwrap();
        path
    };
    let (h16, h32) = (handler(16), handler(32));
    let mar = |name: &str, file: &str, handler: &Path| {
        archive(&s.store, name, "1.0", &pt2.join(file), handler, &extra)
    };
    let fixed = mar("fixed", "tokens_fixed16.pt2", &h16);
    let script = mar("script", "tokens.pt", &h16);
    let fixed_long = mar("fixed_long", "tokens_fixed16.pt2", &h32);
    let bounded_long = mar("bounded_long", "tokens_max16.pt2", &h32);
    let bounded = mar("bounded", "tokens_max16.pt2", &h16);
    s.start(&[]);
    for m in [&fixed, &script, &bounded] {
        let r = register(
            &s,
            &format!("url={m}&initial_workers=1&batch_size=4&max_batch_delay=50"),
        );
        assert_eq!(r.status, 200, "{m}: {}", r.text());
    }
    // A package exported for 16 tokens exactly gets every batch padded to 16, masked: the
    // TorchScript twin's answer, for texts of any length up to 16 tokens.
    for sentence in [
        "Hi",
        "a short one",
        "a longer sentence than the others, with words",
    ] {
        let post = |model: &str| -> serde_json::Value {
            let r = s.infer(
                "POST",
                &format!("/predictions/{model}"),
                &[("Content-Type", "text/plain")],
                sentence.as_bytes(),
            );
            assert_eq!(r.status, 200, "{model} on {sentence:?}: {}", r.text());
            serde_json::from_slice(&r.body).unwrap()
        };
        same_answer(&post("fixed"), &post("script"), sentence);
        same_answer(&post("bounded"), &post("script"), sentence);
    }
    // A handler keeping more tokens than the package takes is refused at registration, saying
    // what to change, rather than answering longer texts with errors.
    for (m, takes) in [(&fixed_long, "exactly 16"), (&bounded_long, "at most 16")] {
        let r = register(&s, &format!("url={m}&initial_workers=1"));
        assert_eq!(r.status, 500, "{m}: {}", r.text());
        assert!(
            r.text()
                .contains(&format!("the package takes {takes} tokens per text"))
                && r.text().contains("max_length to 16 or less"),
            "{m}: {}",
            r.text()
        );
    }

    // `tchserve --check` runs what a registration runs: it passes the archives that register
    // and refuses, with the same reason, those that do not, a batch size past its bound
    // included.
    let yaml = s.dir.path().join("wide.yaml");
    std::fs::write(&yaml, "batchSize: 5000\n").unwrap();
    let wide = archive(
        &s.store,
        "wide",
        "1.0",
        &pt2.join("tokens.pt"),
        &h16,
        &[
            "--extra-files",
            tokenizer.to_str().unwrap(),
            "--config-file",
            yaml.to_str().unwrap(),
        ],
    );
    let r = register(&s, &format!("url={wide}&initial_workers=1"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("batch_size 5000 is out of range"),
        "{}",
        r.text()
    );
    let check_temp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tchserve"))
        .arg("--check")
        .arg("--model-store")
        .arg(&s.store)
        .arg("--models")
        .args([&fixed, &script, &fixed_long, &bounded_long, &wide])
        .env("TMPDIR", check_temp.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    for m in [&fixed, &script] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("ok ") && l.contains(m.as_str())),
            "{m}: {report}"
        );
    }
    for m in [&fixed_long, &bounded_long] {
        assert!(
            report.lines().any(|l| l.starts_with("FAIL ")
                && l.contains(m.as_str())
                && l.contains("max_length to 16 or less")),
            "{m}: {report}"
        );
    }
    assert!(
        report.lines().any(|l| l.starts_with("FAIL ")
            && l.contains(wide.as_str())
            && l.contains("batch_size 5000 is out of range")),
        "{report}"
    );
    // Nothing it or libtorch unpacked stays behind.
    let left: Vec<_> = std::fs::read_dir(check_temp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A package of two inputs and two outputs answers as its TorchScript twin: one example
/// (padded up to the two the package takes), several, requests batched together, and the
/// Open Inference Protocol's typed outputs.
#[test]
fn a_pt2_package_of_two_inputs_and_two_outputs_answers_as_its_torchscript_twin() {
    let pt2 = pt2_fixtures();
    let mut s = Server::new("enable_model_api=true");
    s.start(&[]);
    for ext in ["pt2", "pt"] {
        let name = format!("two_way_{ext}");
        let mar = archive(
            &s.store,
            &name,
            "1.0",
            &pt2.join(format!("two_way.{ext}")),
            &fixture_handler("two_way.json"),
            &[],
        );
        let r = register(
            &s,
            &format!("url={mar}&initial_workers=1&batch_size=4&max_batch_delay=200"),
        );
        assert_eq!(r.status, 200, "{ext}: {}", r.text());
    }
    // A handler of one input for it is refused at registration, saying why.
    let one = archive(
        &s.store,
        "two_way_one",
        "1.0",
        &pt2.join("two_way.pt2"),
        &repo_root().join("handlers/tensor.json"),
        &[],
    );
    let r = register(&s, &format!("url={one}&initial_workers=1"));
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(
        r.text()
            .contains("the package's forward takes 2 tensors and the handler gives it 1"),
        "{}",
        r.text()
    );
    let ask = |model: &str, body: &str| {
        let r = s.infer(
            "POST",
            &format!("/predictions/{model}"),
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{model} {body}: {}", r.text());
        r.json()
    };
    let one = r#"{"ids": [1, 2, 3], "dense": [0.5, 0.25]}"#;
    let want = serde_json::json!({"scaled": [3.0, 1.5], "positive": 3});
    let several = r#"{"instances": [{"ids": [0, 0, 0], "dense": [1, 1]},
                                    {"ids": [1, 0, 4], "dense": [2, -1]},
                                    {"ids": [2, 2, 2], "dense": [0.5, 0.5]}]}"#;
    let want_several = serde_json::json!({"predictions": [
        {"scaled": [0.0, 0.0], "positive": 0},
        {"scaled": [10.0, -5.0], "positive": 2},
        {"scaled": [3.0, 3.0], "positive": 3}
    ]});
    for model in ["two_way_pt2", "two_way_pt"] {
        same_answer(&ask(model, one), &want, model);
        same_answer(&ask(model, several), &want_several, model);
    }
    // Requests batched together get their own rows, as each alone.
    let answers: Vec<serde_json::Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let ask = &ask;
                scope.spawn(move || {
                    ask(
                        "two_way_pt2",
                        &format!(r#"{{"ids": [{i}, 1, 0], "dense": [1, {i}]}}"#),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, got) in answers.iter().enumerate() {
        let (n, p) = (i as f64 + 1.0, if i > 0 { 2 } else { 1 });
        same_answer(
            got,
            &serde_json::json!({"scaled": [n, n * i as f64], "positive": p}),
            &format!("batched request {i}"),
        );
    }
    let r = s.infer(
        "POST",
        "/v2/models/two_way_pt2/infer",
        &[("Content-Type", "application/json")],
        serde_json::json!({"inputs": [
            {"name": "dense", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]},
            {"name": "ids", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}
        ]})
        .to_string()
        .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["outputs"],
        serde_json::json!([
            {"name": "scaled", "datatype": "FP32", "shape": [1, 2], "data": [3.0, 1.5]},
            {"name": "positive", "datatype": "INT64", "shape": [1], "data": [3]}
        ])
    );
}

/// Packages registered at once all load: libtorch reads every package's JSON files into one
/// shared object, which two loads at once corrupted (`basic_string::_M_create`, seen when a
/// restart restored several packages together).
#[test]
fn packages_registered_at_once_all_load() {
    let pt2 = pt2_fixtures();
    let mut s = Server::new("enable_model_api=true");
    s.start(&[]);
    let names: Vec<String> = (0..8).map(|i| format!("at_once_{i}")).collect();
    let mars: Vec<String> = names
        .iter()
        .map(|name| {
            archive(
                &s.store,
                name,
                "1.0",
                &pt2.join(if name.ends_with(['0', '2', '4', '6']) {
                    "mlp.pt2"
                } else {
                    "segmenter.pt2"
                }),
                &repo_root().join("handlers/tensor.json"),
                &[],
            )
        })
        .collect();
    let answers: Vec<common::http::Resp> = std::thread::scope(|scope| {
        let handles: Vec<_> = mars
            .iter()
            .map(|mar| {
                let s = &s;
                scope.spawn(move || register(s, &format!("url={mar}&initial_workers=2")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, r) in names.iter().zip(answers) {
        assert_eq!(r.status, 200, "{name}: {}\n{}", r.text(), s.log());
    }
}

/// A package's compiled model is a shared library unpacked under TMPDIR, which cannot load from
/// a folder mounted `noexec` (Docker's `--tmpfs` by default): the registration's error says so.
#[test]
fn a_package_unpacked_where_code_may_not_run_says_why() {
    let mut s = Server::new("enable_model_api=true");
    let Some(_noexec) = common::Tmpfs::mount(&s.temp_dir(), 1 << 20, &["noexec"]) else {
        eprintln!("skipped: mounting a tmpfs needs root here");
        return;
    };
    let mar = archive(
        &s.store,
        "mlp",
        "1.0",
        &pt2_fixtures().join("mlp.pt2"),
        &fixture_handler("vec784.json"),
        &[],
    );
    s.start(&[]);
    let r = register(&s, &format!("url={mar}&initial_workers=1"));
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("noexec"), "{}", r.text());
}
