//! Model-store polling end to end: real archives appear, gain versions, break and vanish in the
//! store of a running server, and what serves follows, version policy and rollback included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::http::{Resp, post_json, request};
use common::server::{Server, archive, fixture_handler, fixtures, mlp_archive};
use serde_json::Value;

fn floats(r: &Resp) -> Vec<f64> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {}", r.text()))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Waits (up to 30 s: a poll every second) until `what` holds.
fn eventually(s: &Server, what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holds() {
        assert!(Instant::now() < deadline, "never: {what}\n{}", s.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The versions of `model` that serve, and its default; empty when it is not registered.
fn versions(s: &Server, model: &str) -> (Vec<String>, Option<String>) {
    let r = s.manage("GET", &format!("/models/{model}/all"));
    if r.status == 404 {
        return (Vec::new(), None);
    }
    let list: Vec<Value> = serde_json::from_str(&r.text()).unwrap();
    let mut vs: Vec<String> = list
        .iter()
        .map(|m| m["modelVersion"].as_str().unwrap().to_string())
        .collect();
    vs.sort();
    // Described without a version, a model is its default version.
    let default =
        serde_json::from_str::<Value>(&s.manage("GET", &format!("/models/{model}")).text())
            .ok()
            .and_then(|v| v[0]["modelVersion"].as_str().map(String::from));
    (vs, default)
}

fn scale(s: &Server, version: &str, model: &str) -> String {
    let model_file = if version == "1.0" {
        "scale2.pt"
    } else {
        "scale3.pt"
    };
    archive(
        &s.store,
        model,
        version,
        &fixtures().join(model_file),
        &fixture_handler("vec4.json"),
        &[],
    )
}

#[test]
fn the_store_decides_what_serves() {
    let mut s = Server::new(
        "enable_model_api=true\nmodel_store_poll_interval=1\nmodel_version_policy=latest:1\n\
         model_version_policy.scale=latest:2",
    );
    let v1 = scale(&s, "1.0", "scale");
    s.start(&[]);
    // Served from the start: the first poll runs before the server answers.
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,2,3,4]")),
        [2.0, 4.0, 6.0, 8.0]
    );

    // A new model appears.
    let mlp = mlp_archive(&s);
    eventually(&s, "mlp serves", || versions(&s, "mlp").0 == ["1.0"]);
    let x = serde_json::to_string(&vec![0.5f32; 784]).unwrap();
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/mlp", &x)).len(),
        10
    );

    // A new version takes over as the default; latest:2 keeps both.
    scale(&s, "2.0", "scale");
    eventually(&s, "scale 2.0 is the default", || {
        versions(&s, "scale") == (vec!["1.0".into(), "2.0".into()], Some("2.0".into()))
    });
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,2,3,4]")),
        [3.0, 6.0, 9.0, 12.0]
    );

    // Rollback with set-default holds across polls.
    let r = s.manage("PUT", "/models/scale/1.0/set-default");
    assert_eq!(r.status, 200, "{}", r.text());
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(versions(&s, "scale").1.as_deref(), Some("1.0"));
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,1,1,1]")),
        [2.0; 4]
    );

    // A broken archive (a 3.0 whose model file is not TorchScript) and a file that is no
    // archive at all are reported, and what serves keeps serving.
    let bad_model = s.dir.path().join("bad.pt");
    fs::write(&bad_model, b"not a TorchScript file").unwrap();
    archive(
        &s.store,
        "scale",
        "3.0",
        &bad_model,
        &fixture_handler("vec4.json"),
        &[],
    );
    fs::write(s.store.join("junk.mar"), b"no zip here").unwrap();
    eventually(&s, "the broken archives are reported", || {
        let log = s.log();
        log.contains("cannot load scale-3.0.mar") && log.contains("cannot read junk.mar")
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        versions(&s, "scale"),
        (vec!["1.0".into(), "2.0".into()], Some("1.0".into()))
    );
    // Reported once, not at every poll.
    assert_eq!(
        s.log().matches("cannot load scale-3.0.mar").count(),
        1,
        "{}",
        s.log()
    );
    assert_eq!(
        s.log().matches("cannot read junk.mar").count(),
        1,
        "{}",
        s.log()
    );

    // latest:1 for mlp: a 2.0 replaces 1.0.
    archive(
        &s.store,
        "mlp",
        "2.0",
        &fixtures().join("mlp.pt"),
        &fixture_handler("vec784.json"),
        &[],
    );
    eventually(&s, "mlp 2.0 replaces 1.0", || {
        versions(&s, "mlp") == (vec!["2.0".into()], Some("2.0".into()))
    });
    // Its archive overwritten in place by something unreadable (a copy still running, or
    // damage): 2.0 keeps serving.
    fs::write(s.store.join("mlp-2.0.mar"), b"half a zip").unwrap();
    eventually(&s, "the damaged archive is reported", || {
        s.log().contains("cannot read mlp-2.0.mar")
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        versions(&s, "mlp"),
        (vec!["2.0".into()], Some("2.0".into()))
    );
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/mlp", &x)).len(),
        10
    );

    // Archives vanish: the default moves to the highest version left, and a model with no
    // archive left is gone.
    fs::remove_file(s.store.join(&v1)).unwrap();
    eventually(&s, "scale 1.0 is unloaded", || {
        versions(&s, "scale") == (vec!["2.0".into()], Some("2.0".into()))
    });
    assert_eq!(
        floats(&post_json(&s.inference, "/predictions/scale", "[1,1,1,1]")),
        [3.0; 4]
    );
    fs::remove_file(s.store.join(&mlp)).unwrap();
    fs::remove_file(s.store.join("mlp-2.0.mar")).unwrap();
    eventually(&s, "mlp is unloaded", || versions(&s, "mlp").0.is_empty());
    assert_eq!(post_json(&s.inference, "/predictions/mlp", &x).status, 404);
    s.stop_ok();
}

#[test]
fn a_removed_archive_is_drained_before_it_unloads() {
    let mut s = Server::new("model_store_poll_interval=1");
    let slow = archive(
        &s.store,
        "slow",
        "1.0",
        &fixtures().join("slow.pt"),
        &fixture_handler("vec2.json"),
        &[],
    );
    s.start(&[]);
    let inference = s.inference.clone();
    let in_flight = std::thread::spawn(move || {
        request(
            &inference,
            "POST",
            "/predictions/slow",
            &[("Content-Type", "application/json")],
            b"[20000, 4]",
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(s.store.join(&slow)).unwrap();
    eventually(&s, "slow is unregistered", || {
        s.manage("GET", "/models/slow").status == 404
    });
    let r = in_flight.join().unwrap();
    assert_eq!(floats(&r), [20000.0, 4.0]);
    assert!(s.log().contains("draining and unloading"), "{}", s.log());
}

#[test]
fn polling_settings_are_checked() {
    let mut s = Server::new("model_store_poll_interval=1\nmodel_version_policy=newest");
    let out = s.command().arg("--foreground").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model_version_policy") && err.contains("latest:N"),
        "{err}"
    );
    s.set_config("model_store_poll_interval=1\nmodel_version_policy.scale=latest:0");
    let out = s.command().arg("--foreground").output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model_version_policy.scale"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
