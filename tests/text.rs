//! The text handlers on the pretrained all-MiniLM-L6-v2, against sentence-transformers and
//! PyTorch.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;

use common::cosine;
use common::http::{Resp, request};
use common::server::{Server, archive, real_archive, text_fixtures};
use serde_json::{Value, json};

fn expected() -> Value {
    serde_json::from_slice(&fs::read(text_fixtures().join("expected.json")).unwrap()).unwrap()
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn post_text(s: &Server, model: &str, text: &str) -> Resp {
    s.infer(
        "POST",
        &format!("/predictions/{model}"),
        &[("Content-Type", "text/plain; charset=utf-8")],
        text.as_bytes(),
    )
}

#[test]
fn text_embedding_matches_sentence_transformers() {
    let fx = text_fixtures();
    let want = expected();
    let mut s = Server::new("enable_model_api=true");
    let tok = fx.join("tokenizer.json");
    let mar = archive(
        &s.store,
        "minilm",
        "1.0",
        &fx.join("minilm.pt"),
        &common::repo_root().join("handlers/text_embedding.json"),
        &["--extra-files", tok.to_str().unwrap()],
    );
    s.start(&["--models", &format!("minilm={mar}")]);
    let sentences: Vec<&str> = want["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(sentences.len() >= 20);
    for (i, text) in sentences.iter().enumerate() {
        let r = post_text(&s, "minilm", text);
        assert_eq!(r.status, 200, "{text}: {}", r.text());
        let got = vector(&r.json()["embedding"]);
        let c = cosine(&got, &vector(&want["embeddings"][i]));
        assert!(c >= 0.9999, "{text}: cosine {c}");
    }
    // JSON forms.
    let r = request(
        &s.inference,
        "POST",
        "/predictions/minilm",
        &[("Content-Type", "application/json")],
        json!({"data": sentences[3]}).to_string().as_bytes(),
    );
    assert!(
        cosine(
            &vector(&r.json()["embedding"]),
            &vector(&want["embeddings"][3])
        ) >= 0.9999
    );

    // `curl -d 'I love it'` labels plain text as a form: without a key=value pair it is the
    // text itself, not a form of one empty field.
    let r = request(
        &s.inference,
        "POST",
        "/predictions/minilm",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        sentences[3].as_bytes(),
    );
    assert!(
        cosine(
            &vector(&r.json()["embedding"]),
            &vector(&want["embeddings"][3])
        ) >= 0.9999,
        "{}",
        r.text()
    );

    // Megabytes of text: only what 256 tokens need is tokenized, so the answer comes well within
    // a 2 s response timeout, and it is the answer for that start of the text.
    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={mar}&model_name=minilm_quick&initial_workers=1&response_timeout=2"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let head: String = sentences
        .iter()
        .cycle()
        .take(40)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let huge = format!("{head} {}", "lorem ipsum dolor sit amet ".repeat(225_000));
    assert!(huge.len() > 6_000_000);
    let enough: String = huge
        .split_whitespace()
        .take(257)
        .collect::<Vec<_>>()
        .join(" ");
    let r = post_text(&s, "minilm_quick", &huge);
    assert_eq!(r.status, 200, "{}", r.text());
    let short = post_text(&s, "minilm_quick", &enough);
    assert!(
        cosine(
            &vector(&r.json()["embedding"]),
            &vector(&short.json()["embedding"])
        ) >= 0.99999
    );

    // Batched: padded to the longest sentence with an attention mask, same embeddings.
    let r = request(
        &s.management,
        "POST",
        &format!(
            "/models?url={mar}&model_name=minilm_b8&batch_size=8&max_batch_delay=200&initial_workers=1"
        ),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answers: Vec<Resp> = std::thread::scope(|scope| {
        let hs: Vec<_> = sentences
            .iter()
            .map(|t| scope.spawn(|| post_text(&s, "minilm_b8", t)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in answers.iter().enumerate() {
        assert_eq!(r.status, 200, "{}", r.text());
        let c = cosine(
            &vector(&r.json()["embedding"]),
            &vector(&want["embeddings"][i]),
        );
        assert!(c >= 0.9999, "batched {}: cosine {c}", sentences[i]);
    }
    // Each answer reports the size of the batch it was in.
    let metrics = request(&s.metrics, "GET", "/metrics", &[], b"").text();
    let value = |name: &str| -> f64 {
        let prefix = format!("{name}{{model_name=\"minilm_b8\"");
        metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (sum, count) = (
        value("tchserve_batch_size_sum"),
        value("tchserve_batch_size_count"),
    );
    assert!(sum / count > 1.0, "never batched: {sum} / {count}");
}

#[test]
fn text_classifier_matches_pytorch() {
    let fx = text_fixtures();
    let want = expected();
    let mut s = Server::new("enable_model_api=true");
    let mar = real_archive(
        &s.store,
        "sentiment",
        &fx.join("classifier.pt"),
        "text_classifier",
        &[&fx.join("tokenizer.json"), &fx.join("index_to_name.json")],
    );
    // TorchServe's own text_classifier contract: a torchtext vocabulary, no tokenizer.json.
    fs::write(
        s.dir.path().join("source_vocab.pt"),
        b"torchtext vocabulary",
    )
    .unwrap();
    let legacy = real_archive(
        &s.store,
        "legacy",
        &fx.join("classifier.pt"),
        "text_classifier",
        &[&s.dir.path().join("source_vocab.pt")],
    );
    s.start(&["--models", &format!("sentiment={mar}")]);
    for (i, text) in want["sentences"].as_array().unwrap().iter().enumerate() {
        let r = post_text(&s, "sentiment", text.as_str().unwrap());
        assert_eq!(r.status, 200, "{}", r.text());
        let got = r.json();
        let got = got.as_object().unwrap();
        let exp = want["classes"][i].as_object().unwrap();
        assert_eq!(got.len(), 3);
        // Best first, each probability PyTorch's.
        let best = exp
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(got.keys().next().unwrap(), best, "{text}");
        for (label, p) in exp {
            let g = got[label].as_f64().unwrap();
            assert!(
                (g - p.as_f64().unwrap()).abs() <= 1e-4,
                "{text} {label}: {g} vs {p}"
            );
        }
    }
    // The same text however it comes: as text/plain even when it starts with a quotation mark
    // or a brace, under KServe v1's `data` (TorchServe's own sample request), and wrapped in
    // JSON, the one form that cannot be misread.
    let first = want["sentences"][0].as_str().unwrap();
    for text in [
        format!("\"{first}\" said everyone."),
        format!("{{braces}} and {first}"),
        first.to_string(),
    ] {
        let wrapped = s.infer(
            "POST",
            "/predictions/sentiment",
            &[("Content-Type", "application/json")],
            json!({"data": text}).to_string().as_bytes(),
        );
        assert_eq!(wrapped.status, 200, "{}", wrapped.text());
        let plain = post_text(&s, "sentiment", &text);
        assert_eq!(plain.body, wrapped.body, "{text}: {}", plain.text());
        let v1 = s.infer(
            "POST",
            "/v1/models/sentiment:predict",
            &[("Content-Type", "application/json")],
            json!({"instances": [{"data": text}]})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(v1.status, 200, "{}", v1.text());
        assert_eq!(v1.json()["predictions"][0], wrapped.json(), "{text}");
    }
    // Whitespace or NULs by the thousand before the words do not hide them.
    for padding in [" ", "\0", "\r\n"] {
        let padded = format!("{}{first}", padding.repeat(13_000));
        let r = post_text(&s, "sentiment", &padded);
        assert_eq!(
            r.body,
            post_text(&s, "sentiment", first).body,
            "{padding:?}"
        );
    }

    let r = request(
        &s.management,
        "POST",
        &format!("/models?url={legacy}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["message"].as_str().unwrap().contains("torchtext"),
        "{}",
        r.text()
    );
}
