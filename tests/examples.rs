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
        "efficientnet_lite0.mar",
        "detector.mar",
        "segmenter.mar",
        "minilm.mar",
        "sentiment.mar",
        "digits_pt2.mar",
        "efficientnet_lite0_pt2.mar",
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

    // A pretrained classifier with real names: the cat is a cat, the coffee an espresso.
    let best = |example: &str, photo: &str| {
        let classes: serde_json::Value = serde_json::from_str(&query(example, &[photo])).unwrap();
        assert_eq!(classes.as_object().unwrap().len(), 5, "{classes}");
        classes.as_object().unwrap().keys().next().unwrap().clone()
    };
    // The same classifier compiled into a .pt2 package agrees.
    for example in ["image_classifier", "pt2"] {
        let cat = best(example, "cat");
        assert!(
            ["Egyptian cat", "tabby", "tiger cat"].contains(&cat.as_str()),
            "{example}: {cat}"
        );
        assert_eq!(best(example, "coffee"), "espresso", "{example}");
    }

    let detections: serde_json::Value =
        serde_json::from_str(&query("object_detector", &[])).unwrap();
    for d in detections.as_array().unwrap() {
        assert!(d["score"].as_f64().unwrap() >= 0.5, "{d}");
        assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
        // Named by COCO's categories, not numbered.
        let label = d
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "score")
            .unwrap();
        assert!(label.parse::<u32>().is_err(), "{d}");
    }

    let similar = query("text_embedding", &[]);
    assert!(similar.starts_with("384 dimensions"), "{similar}");
    let scores: Vec<f64> = similar
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    // The two sentences about music are closer to each other than to the stock market.
    assert!(scores[0] > scores[1] && scores[0] > scores[2], "{similar}");

    let sentiment: serde_json::Value =
        serde_json::from_str(&query("text_classifier", &["What a lovely day."])).unwrap();
    let labels: Vec<&str> = sentiment
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(labels.len(), 3, "{sentiment}");
    let total: f64 = sentiment
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-4, "{sentiment}");

    let segments = query("image_segmenter", &[]);
    let voc: Vec<String> = serde_json::from_slice(
        &std::fs::read(repo_root().join("build/examples/image_segmenter/voc_labels.json")).unwrap(),
    )
    .unwrap();
    let mut lines = segments.lines();
    assert_eq!(lines.next(), Some("224 x 224 pixels"), "{segments}");
    let mut share = 0.0;
    for l in lines {
        let (pct, name) = l.trim().split_once("%  ").unwrap();
        share += pct.parse::<f64>().unwrap();
        assert!(voc.iter().any(|v| v == name), "{l}");
    }
    assert!((share - 100.0).abs() < 0.5, "{segments}");
}
