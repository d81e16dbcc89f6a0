//! The image handlers on real photos and torchvision models, against PyTorch's own numbers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;

use base64::Engine as _;
use common::http::{Resp, request};
use common::server::{Server, archive, real_archive, vision_fixtures};
use common::{detections, worker_threads};
use serde_json::{Value, json};

const PHOTOS: [&str; 18] = [
    "chelsea.jpg",
    "chelsea.png",
    "astronaut.jpg",
    "astronaut.png",
    "coffee.jpg",
    "coffee.png",
    "odd_grey.png",
    "odd_rgba.png",
    "odd_palette.png",
    "odd_cat.webp",
    "odd_cat.bmp",
    "odd_cat.gif",
    "odd_cat.tiff",
    "framed.gif",
    "cat173.jpg",
    "cat173.png",
    "cat999.jpg",
    "cat999.png",
];

/// The pretrained ResNet-18 behind the built-in image_classifier, archived by the real archiver
/// as `resnet.mar`.
fn resnet_archive(s: &Server) -> String {
    let fx = vision_fixtures();
    real_archive(
        &s.store,
        "resnet",
        &fx.join("resnet18.pt"),
        "image_classifier",
        &[&fx.join("index_to_name.json")],
    )
}

fn expected() -> Value {
    serde_json::from_slice(&fs::read(vision_fixtures().join("expected.json")).unwrap()).unwrap()
}

fn post_image(s: &Server, model: &str, file: &str) -> Resp {
    let bytes = fs::read(vision_fixtures().join("images").join(file)).unwrap();
    s.infer("POST", &format!("/predictions/{model}"), &[], &bytes)
}

/// A copy of a built-in handler with its fields changed, written to `dir/<file>`.
fn changed_handler(
    dir: &Path,
    builtin: &str,
    file: &str,
    change: impl FnOnce(&mut Value),
) -> std::path::PathBuf {
    let text = fs::read_to_string(
        common::repo_root()
            .join("handlers")
            .join(format!("{builtin}.json")),
    )
    .unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    change(&mut v);
    let path = dir.join(file);
    fs::write(&path, v.to_string()).unwrap();
    path
}

fn assert_top(got: &Value, want: &Value, ctx: &str) {
    let got: Vec<(String, f64)> = got
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: {got}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    let want: Vec<(String, f64)> = want
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(
        got.iter().map(|g| &g.0).collect::<Vec<_>>(),
        want.iter().map(|w| &w.0).collect::<Vec<_>>(),
        "{ctx}: labels"
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g.1 - w.1).abs() <= 1e-3,
            "{ctx}: {} {} vs {}",
            g.0,
            g.1,
            w.1
        );
    }
}

#[test]
fn image_classifier_matches_torchvision() {
    let fx = vision_fixtures();
    let want = expected();
    let mut s = Server::new("enable_model_api=true");
    // An archive from the real archiver with the built-in handler, served unchanged.
    let resnet = resnet_archive(&s);
    // The same preprocessing in front of a model that returns its input shows the tensor.
    let pre = changed_handler(s.dir.path(), "image_classifier", "preprocessed.json", |v| {
        v["postprocess"] = json!([]);
        v["output"] = json!({"tensor": {}});
    });
    let identity = archive(
        &s.store,
        "identity",
        "1.0",
        &fx.join("identity.pt"),
        &pre,
        &[],
    );
    s.start(&[
        "--models",
        &format!("resnet={resnet}"),
        &format!("identity={identity}"),
    ]);

    for file in PHOTOS {
        let r = post_image(&s, "identity", file);
        assert_eq!(r.status, 200, "{file}: {}", r.text());
        // Pixel for pixel: PIL's JPEG decoder and resampling, reproduced.
        common::assert_tensor_is(
            &r.json(),
            &fx.join("images").join(format!("{file}.tensor")),
            file,
        );

        let r = post_image(&s, "resnet", file);
        assert_eq!(r.status, 200, "{file}: {}", r.text());
        assert_top(&r.json(), &want[file]["top5"], file);
    }

    // The other ways a client sends an image: base64 text, base64 in JSON, a multipart field.
    let jpg = fs::read(fx.join("images/chelsea.jpg")).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&jpg);
    let top = &want["chelsea.jpg"]["top5"];
    let r = s.infer(
        "POST",
        "/predictions/resnet",
        &[("Content-Type", "text/plain")],
        b64.as_bytes(),
    );
    assert_top(&r.json(), top, "base64 text");
    let r = s.infer(
        "POST",
        "/predictions/resnet",
        &[("Content-Type", "application/json")],
        json!({"data": b64}).to_string().as_bytes(),
    );
    assert_top(&r.json(), top, "base64 in JSON");
    let mut form = b"--B\r\nContent-Disposition: form-data; name=\"data\"; filename=\"c.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".to_vec();
    form.extend_from_slice(&jpg);
    form.extend_from_slice(b"\r\n--B--\r\n");
    let r = s.infer(
        "POST",
        "/predictions/resnet",
        &[("Content-Type", "multipart/form-data; boundary=B")],
        &form,
    );
    assert_top(&r.json(), top, "multipart");

    // Batched: several images at once give the answers they get alone.
    assert_eq!(
        s.manage("PUT", "/models/resnet?min_worker=1&synchronous=true")
            .status,
        200
    );
    let r = request(
        &s.management,
        "POST",
        &format!(
            "/models?url={resnet}&model_name=resnet_b4&batch_size=4&max_batch_delay=200&initial_workers=1"
        ),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answers: Vec<(String, Resp)> = std::thread::scope(|scope| {
        let hs: Vec<_> = PHOTOS[..8]
            .iter()
            .map(|f| scope.spawn(|| (f.to_string(), post_image(&s, "resnet_b4", f))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (file, r) in answers {
        assert_eq!(r.status, 200, "{file}: {}", r.text());
        assert_top(
            &r.json(),
            &want[file.as_str()]["top5"],
            &format!("batched {file}"),
        );
    }
}

#[test]
fn workers_sharing_one_model_answer_concurrent_requests_as_one() {
    let want = expected();
    let mut s = Server::new("enable_model_api=true");
    let resnet = resnet_archive(&s);
    s.start(&[]);
    // Four workers, one copy of the weights: each request in flight runs the same module on
    // a thread of its own.
    let r = s.manage(
        "POST",
        &format!("/models?url={resnet}&initial_workers=4&synchronous=true"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = s.manage("GET", "/models/resnet").json();
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 4, "{d}");
    std::thread::scope(|scope| {
        for round in 0..4 {
            let (s, want) = (&s, &want);
            scope.spawn(move || {
                for file in PHOTOS.iter().cycle().skip(round * 3).take(PHOTOS.len()) {
                    let r = post_image(s, "resnet", file);
                    assert_eq!(r.status, 200, "{file}: {}", r.text());
                    assert_top(&r.json(), &want[file]["top5"], file);
                }
            });
        }
    });
}

#[test]
fn a_waiting_worker_ends_its_openmp_team_for_one_at_work() {
    // Once the process holds more OpenMP team threads than cores, GNU OpenMP sleeps at every
    // barrier instead of spinning: a second ResNet-18 that had served one request and gone idle
    // cost the first 30% of its throughput. With the intra-op threads left at the number of
    // cores, one team fits and two do not.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("one core: no worker starts an OpenMP team");
        return;
    }
    let mut s = Server::new("enable_model_api=true");
    let resnet = resnet_archive(&s);
    s.start(&["--models", &format!("resnet={resnet}")]);
    let r = s.manage(
        "POST",
        &format!("/models?url={resnet}&model_name=resnet2&initial_workers=1&synchronous=true"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let worker = |model: &str| {
        let d = s.manage("GET", &format!("/models/{model}")).json();
        d[0]["workers"][0]["id"].as_str().unwrap().to_string()
    };
    let (first, second) = (worker("resnet"), worker("resnet2"));
    let predict = |model: &str| {
        let r = post_image(&s, model, "cat173.jpg");
        assert_eq!(r.status, 200, "{}", r.text());
    };
    predict("resnet");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let held = worker_threads(s.pid(), &first);
    assert!(
        held >= 2,
        "the first model's worker started no team ({held} threads)"
    );
    // The second model's team does not fit beside the first's: the idle first one gives way.
    predict("resnet2");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut now = worker_threads(s.pid(), &first);
    while now != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        now = worker_threads(s.pid(), &first);
    }
    assert_eq!(now, 1, "{held} threads while it held a team, {now} after");
    let second_held = worker_threads(s.pid(), &second);
    assert!(
        second_held >= 2,
        "the model at work lost its team ({second_held} threads)"
    );
    // And the first one starts a team again when its turn comes.
    predict("resnet");
}

#[test]
fn custom_manifest_in_the_archive() {
    let fx = vision_fixtures();
    let mut s = Server::new("");
    let handler = changed_handler(s.dir.path(), "image_classifier", "my_handler.json", |v| {
        v["preprocess"][1] = json!({"center_crop": {"size": 200}});
        v["preprocess"][3] =
            json!({"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}});
        v["output"]["classes"]["top_k"] = json!(3);
    });
    let mar = archive(
        &s.store,
        "custom",
        "1.0",
        &fx.join("resnet18.pt"),
        &handler,
        &[
            "--extra-files",
            fx.join("index_to_name.json").to_str().unwrap(),
        ],
    );
    s.start(&["--models", &format!("custom={mar}")]);
    let r = post_image(&s, "custom", "chelsea.png");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_top(
        &r.json(),
        &expected()["chelsea.png"]["custom_top3"],
        "custom manifest",
    );
}

#[test]
fn bad_images_are_400_and_the_server_keeps_serving() {
    let fx = vision_fixtures();
    let mut s = Server::new("");
    let small = changed_handler(s.dir.path(), "image_classifier", "small.json", |v| {
        v["input"]["image"]["max_pixels"] = json!(10_000);
    });
    let mar = archive(
        &s.store,
        "small",
        "1.0",
        &fx.join("resnet18.pt"),
        &small,
        &[],
    );
    let resnet = real_archive(
        &s.store,
        "resnet",
        &fx.join("resnet18.pt"),
        "image_classifier",
        &[],
    );
    s.start(&[
        "--models",
        &format!("small={mar}"),
        &format!("resnet={resnet}"),
    ]);
    let r = post_image(&s, "small", "chelsea.jpg");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("more than the 10000 allowed"),
        "{}",
        r.text()
    );
    let r = s.infer(
        "POST",
        "/predictions/resnet",
        &[("Content-Type", "image/jpeg")],
        b"\xff\xd8\xff\xe0 definitely not a whole jpeg",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("cannot decode the image"),
        "{}",
        r.text()
    );
    let r = s.infer(
        "POST",
        "/predictions/resnet",
        &[("Content-Type", "application/octet-stream")],
        &[0u8, 1, 2, 3, 200, 100],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Without index_to_name.json, labels are class indices, as in TorchServe.
    let r = post_image(&s, "resnet", "coffee.png");
    assert_eq!(r.status, 200, "{}", r.text());
    let labels: Vec<String> = r.json().as_object().unwrap().keys().cloned().collect();
    assert_eq!(labels[0], "238", "{}", r.text());
}

#[test]
fn object_detector_and_image_segmenter_match_pytorch() {
    let fx = vision_fixtures();
    let want = expected();
    let mut s = Server::new("");
    let detector = real_archive(
        &s.store,
        "detector",
        &fx.join("detector.pt"),
        "object_detector",
        &[],
    );
    let segmenter = real_archive(
        &s.store,
        "segmenter",
        &fx.join("segmenter.pt"),
        "image_segmenter",
        &[],
    );
    let low = changed_handler(s.dir.path(), "object_detector", "low.json", |v| {
        v["output"]["detections"]["threshold"] = json!(0.0);
    });
    let detector_all = archive(
        &s.store,
        "detector_all",
        "1.0",
        &fx.join("detector.pt"),
        &low,
        &[],
    );
    s.start(&[
        "--models",
        &format!("detector={detector}"),
        &format!("segmenter={segmenter}"),
        &format!("detector_all={detector_all}"),
    ]);

    let dets = &want["coffee.png"]["detections"];
    let scores: Vec<f64> = dets["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The built-in threshold of 0.5 keeps exactly PyTorch's detections over 0.5.
    let r = post_image(&s, "detector", "coffee.png");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json().as_array().unwrap().len(),
        scores.iter().filter(|s| **s >= 0.5).count()
    );
    // With no threshold, every detection with its label, box and score. Random weights give many
    // equal scores, whose relative order libtorch's sort leaves open, so both sides are compared
    // sorted.
    let r = post_image(&s, "detector_all", "coffee.png");
    let mut served = detections(&r.json());
    assert_eq!(served.len(), scores.len(), "{}", r.text());
    let mut pytorch: Vec<(String, Vec<f64>, f64)> = (0..scores.len())
        .map(|i| {
            let bx = dets["boxes"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            (
                dets["labels"][i].as_i64().unwrap().to_string(),
                bx,
                scores[i],
            )
        })
        .collect();
    let order = |a: &(String, Vec<f64>, f64), b: &(String, Vec<f64>, f64)| {
        a.0.cmp(&b.0).then(
            a.1.iter()
                .zip(&b.1)
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(std::cmp::Ordering::Equal),
        )
    };
    served.sort_by(order);
    pytorch.sort_by(order);
    for (i, (g, w)) in served.iter().zip(&pytorch).enumerate() {
        assert_eq!(g.0, w.0, "detection {i}: label");
        // Pixels, in float32 through a deep network: the server's forward runs on as many
        // intra-op threads as its budget gives at that moment (one while the segmenter beside
        // it is busy, both cores alone), and each count rounds its sums in its own order, which
        // moved a box of 56 px by 0.0011 px once. A preprocessing or operator drift moves boxes
        // by whole pixels.
        for k in 0..4 {
            assert!(
                (g.1[k] - w.1[k]).abs() <= 1e-3 + 1e-4 * w.1[k].abs(),
                "detection {i} box {k}: {} vs {}",
                g.1[k],
                w.1[k]
            );
        }
        assert!(
            (g.2 - w.2).abs() <= 1e-5,
            "detection {i}: score {} vs {}",
            g.2,
            w.2
        );
    }

    let r = post_image(&s, "segmenter", "seg256.png");
    assert_eq!(r.status, 200, "{}", r.text());
    let (mut got, mut exp) = (Vec::new(), Vec::new());
    common::flat(&r.json(), &mut got);
    common::flat(&want["seg256.png"]["segmentation"], &mut exp);
    assert_eq!(got.len(), 224 * 224 * 2);
    assert_eq!(got.len(), exp.len());
    // Each pixel is [class, score], the class a float of an integral value (`10.0`), as
    // TorchServe's handler writes the map it casts to the scores' dtype.
    let pixel = &r.json()[0][0];
    assert!(pixel[0].is_f64() && pixel[1].is_f64(), "{pixel}");
    assert!(r.text().starts_with("[[["), "{}", &r.text()[..40]);
    let class = r.text()[3..].split(',').next().unwrap().to_string();
    assert!(class.ends_with(".0"), "{class}");
    for (i, (a, b)) in got.iter().zip(&exp).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4,
            "pixel {} field {}: {a} vs {b}",
            i / 2,
            i % 2
        );
    }
}

#[test]
fn a_pretrained_classifier_names_what_is_in_the_photo() {
    let fx = vision_fixtures();
    let want = expected();
    let mut s = Server::new("");
    // Real weights, real class names, the real archiver and TorchServe's built-in handler.
    let labels = s.dir.path().join("index_to_name.json");
    fs::copy(fx.join("imagenet_labels.json"), &labels).unwrap();
    let mar = real_archive(
        &s.store,
        "efficientnet",
        &fx.join("efficientnet_lite0.pt"),
        "image_classifier",
        &[&labels],
    );
    s.start(&["--models", &format!("efficientnet={mar}")]);
    let cats = ["Egyptian cat", "tabby", "tiger cat"];
    for file in PHOTOS {
        let r = post_image(&s, "efficientnet", file);
        assert_eq!(r.status, 200, "{file}: {}", r.text());
        let got = r.json();
        // PyTorch's five classes, each probability within 1e-3 (in fact equal).
        assert_top(&got, &want[file]["pretrained_top5"], file);
        let top = got.as_object().unwrap().keys().next().unwrap();
        if file.starts_with("chelsea") || file.starts_with("odd_") {
            assert!(cats.contains(&top.as_str()), "{file}: {got}");
        }
        if file.starts_with("coffee") {
            assert_eq!(top, "espresso", "{file}: {got}");
        }
    }
}

#[test]
fn grey_images_match_pil_in_mode_l() {
    let fx = vision_fixtures();
    let mut s = Server::new("");
    let grey = |file: &str, preprocess: Value| {
        let path = s.dir.path().join(file);
        let manifest = json!({"schema": 1, "name": "grey", "input": {"image": {"mode": "L"}},
            "preprocess": preprocess, "model": {"feed": "stacked"}, "output": {"tensor": {}}});
        fs::write(&path, manifest.to_string()).unwrap();
        path
    };
    let mnist_like = grey(
        "mnist_like.json",
        json!([{"resize": {"size": 64}}, {"center_crop": {"size": 56}}, {"to_tensor": {}},
               {"normalize": {"mean": [0.1307], "std": [0.3081]}}]),
    );
    let luma = grey(
        "luma.json",
        json!([{"center_crop": {"size": 200}}, {"to_tensor": {}}]),
    );
    let identity = fx.join("identity.pt");
    let a = archive(&s.store, "mnist_like", "1.0", &identity, &mnist_like, &[]);
    let b = archive(&s.store, "luma", "1.0", &identity, &luma, &[]);
    s.start(&["--models", &format!("mnist_like={a}"), &format!("luma={b}")]);
    for (model, file, side) in [
        ("mnist_like", "odd_grey.png", 56),
        ("luma", "chelsea.png", 200),
    ] {
        let r = post_image(&s, model, file);
        assert_eq!(r.status, 200, "{file}: {}", r.text());
        let v = r.json();
        // One channel of side x side.
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{file}: channels");
        assert_eq!(rows[0].as_array().unwrap().len(), side, "{file}: height");
        assert_eq!(rows[0][0].as_array().unwrap().len(), side, "{file}: width");
        common::assert_tensor_is(
            &v,
            &fx.join("images").join(format!("grey_{file}.tensor")),
            file,
        );
    }
}
