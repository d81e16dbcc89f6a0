//! Every example end to end: the archives `make` built into model-store/, served by tchserve,
//! queried by each example's own query.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::server::Server;
use common::{repo_root, run_ok};

#[test]
fn every_example_serves_and_answers() {
    let store = repo_root().join("model-store");
    for archive in [
        "digits.mar",
        "resnet18.mar",
        "detector.mar",
        "segmenter.mar",
    ] {
        assert!(
            store.join(archive).exists(),
            "{archive} is missing from model-store/: run `make test`"
        );
    }
    let mut s = Server::new("");
    s.store = store;
    s.start(&["--models", "all"]);
    let query = |example: &str, args: &[&str]| {
        let out = run_ok(
            Command::new(repo_root().join("examples").join(example).join("query.sh"))
                .args(args)
                .env("TCHSERVE_URL", format!("http://{}", s.inference)),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let digits = query("digits", &["40"]);
    let correct: usize = digits
        .lines()
        .last()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(correct >= 36, "digits: {digits}");

    let classes: serde_json::Value = serde_json::from_str(&query("image_classifier", &[])).unwrap();
    assert_eq!(classes.as_object().unwrap().len(), 5, "{classes}");
    assert!(
        classes
            .as_object()
            .unwrap()
            .keys()
            .all(|k| k.starts_with("class_")),
        "{classes}"
    );

    let detections: serde_json::Value =
        serde_json::from_str(&query("object_detector", &[])).unwrap();
    for d in detections.as_array().unwrap() {
        assert!(d["score"].as_f64().unwrap() >= 0.5, "{d}");
        assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
    }

    let segments = query("image_segmenter", &[]);
    assert!(
        segments.starts_with("224 x 224 pixels; classes present: ["),
        "{segments}"
    );
}
