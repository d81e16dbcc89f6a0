//! Traces and logs as an operator reads them: spans sent over OTLP/HTTP to a collector running
//! in the test (tests/clients/otlp_receiver.py), the caller's W3C trace context continued and
//! returned, and JSON log lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::request;
use common::server::{Server, mlp_archive};
use common::{clients_venv_bin, repo_root};
use serde_json::Value;

/// A collector on 127.0.0.1, killed when dropped.
struct Collector {
    child: Child,
    port: u16,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Collector {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (port_file, out) = (dir.path().join("port"), dir.path().join("spans.jsonl"));
        let child = Command::new(clients_venv_bin("python"))
            .arg(repo_root().join("tests/clients/otlp_receiver.py"))
            .arg("--port-file")
            .arg(&port_file)
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(p) = fs::read_to_string(&port_file) {
                break p.trim().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "the collector did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Collector {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ns(span: &Value, key: &str) -> i128 {
    span[key].as_i64().unwrap() as i128
}

/// Asserts `child` is the child of `parent` and lies within it (1 ms of slack for clocks read
/// on two threads).
fn within(child: &Value, parent: &Value) {
    assert_eq!(
        child["parent_span_id"], parent["span_id"],
        "{child} under {parent}"
    );
    assert_eq!(child["trace_id"], parent["trace_id"]);
    let slack = 1_000_000;
    assert!(
        ns(child, "start_ns") + slack >= ns(parent, "start_ns"),
        "{child} starts before {parent}"
    );
    assert!(
        ns(child, "end_ns") <= ns(parent, "end_ns") + slack,
        "{child} ends after {parent}"
    );
    assert!(ns(child, "end_ns") >= ns(child, "start_ns"), "{child}");
}

#[test]
fn requests_are_traced_over_otlp_and_continue_the_callers_trace() {
    let collector = Collector::start();
    let mut s = Server::new(&format!(
        "enable_model_api=true\notlp_endpoint=http://127.0.0.1:{}\nlog_format=json",
        collector.port
    ));
    let mlp = mlp_archive(&s);
    s.start(&[]);
    let r = s.manage(
        "POST",
        &format!(
            "/models?url={mlp}&batch_size=4&max_batch_delay=300&initial_workers=1&synchronous=true"
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = serde_json::to_vec(&vec![0.25f32; 784]).unwrap();

    // Four requests of one caller's trace, sent together so that they share a batch.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let answers: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    request(
                        &s.inference,
                        "POST",
                        "/predictions/mlp",
                        &[("traceparent", &traceparent)],
                        &body,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut server_spans = Vec::new();
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        let returned = r
            .header("traceparent")
            .expect("a traceparent in the response");
        let parts: Vec<&str> = returned.split('-').collect();
        assert_eq!(
            (parts[0], parts[1], parts[3]),
            ("00", trace_id, "01"),
            "{returned}"
        );
        assert_ne!(
            parts[2], caller_span,
            "the response names the server's span"
        );
        server_spans.push(parts[2].to_string());
    }
    // Without a caller's context, a trace of its own, still named in the response.
    let r = request(&s.inference, "POST", "/predictions/mlp", &[], &body);
    let own = r.header("traceparent").unwrap().to_string();
    assert!(!own.contains(trace_id), "{own}");
    // A caller that does not sample gets no spans sent, and still an answer.
    let unsampled = format!("00-{}-{caller_span}-00", "1".repeat(32));
    let r = request(
        &s.inference,
        "POST",
        "/predictions/mlp",
        &[("traceparent", &unsampled)],
        &body,
    );
    assert_eq!(r.status, 200);

    // A KServe v1 request of two instances to a model of one tensor: one job of two examples,
    // with its stages, and one reply.
    let v1_trace = "6bf92f3577b34da6a3ce929d0e0e4738";
    let instances = serde_json::json!({"instances": [vec![0.5f32; 784], vec![0.75f32; 784]]});
    let r = request(
        &s.inference,
        "POST",
        "/v1/models/mlp:predict",
        &[("traceparent", &format!("00-{v1_trace}-{caller_span}-01"))],
        instances.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // A gRPC caller's context travels in its metadata (tritonclient's v2 gRPC client).
    let grpc_trace = "5bf92f3577b34da6a3ce929d0e0e4737";
    let script = "import sys, numpy as np, tritonclient.grpc as g\n\
                  c = g.InferenceServerClient(sys.argv[1])\n\
                  h = {'traceparent': sys.argv[2]}\n\
                  x = g.InferInput('input0', [1, 784], 'FP32')\n\
                  x.set_data_from_numpy(np.full((1, 784), 0.25, np.float32))\n\
                  print(c.infer('mlp', [x], headers=h).as_numpy('output0').shape)";
    let out = Command::new(clients_venv_bin("python"))
        .args(["-c", script, &s.grpc_inference])
        .arg(format!("00-{grpc_trace}-{caller_span}-01"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "(1, 10)");

    // The last spans leave when the server stops.
    s.stop_ok();
    let spans = collector.spans();
    let by_id: HashMap<&str, &Value> = spans
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    assert!(spans.iter().all(|s| s["service_name"] == "tchserve"));
    assert!(
        !spans.iter().any(|s| s["trace_id"] == "1".repeat(32)),
        "unsampled spans were sent"
    );
    let mut largest_batch = 0;
    for id in &server_spans {
        let server = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("span {id} not exported: {spans:?}"));
        assert_eq!(server["name"], "POST /predictions/mlp");
        assert_eq!(server["parent_span_id"], caller_span);
        assert_eq!(server["attributes"]["http.response.status_code"], 200);
        let children: Vec<&Value> = spans
            .iter()
            .filter(|c| c["parent_span_id"] == server["span_id"])
            .collect();
        let named = |n: &str| -> &Value {
            let found: Vec<&&Value> = children.iter().filter(|c| c["name"] == n).collect();
            assert_eq!(found.len(), 1, "one {n} under {server}: {children:?}");
            found[0]
        };
        let (queue, batch, reply) = (named("queue"), named("batch"), named("reply"));
        for c in [queue, batch, reply] {
            within(c, server);
        }
        // In order: queued, then batched, then the reply.
        assert!(ns(queue, "end_ns") <= ns(batch, "start_ns") + 1_000_000);
        assert!(ns(batch, "end_ns") <= ns(reply, "start_ns") + 1_000_000);
        let size = batch["attributes"]["batch.size"].as_i64().unwrap();
        largest_batch = largest_batch.max(size);
        let stages: Vec<&Value> = spans
            .iter()
            .filter(|c| c["parent_span_id"] == batch["span_id"])
            .collect();
        let names: Vec<&str> = stages.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 2, "{stages:?}");
        assert!(
            names.contains(&"preprocess") && names.contains(&"forward"),
            "{names:?}"
        );
        for st in stages {
            within(st, batch);
        }
    }
    assert!(
        largest_batch >= 2,
        "the four requests were never batched together"
    );
    let v1: Vec<&Value> = spans.iter().filter(|s| s["trace_id"] == v1_trace).collect();
    let count = |n: &str| v1.iter().filter(|s| s["name"] == n).count();
    assert_eq!(
        (
            count("queue"),
            count("batch"),
            count("forward"),
            count("reply")
        ),
        (1, 1, 1, 1),
        "{v1:?}"
    );
    let grpc: Vec<&Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == grpc_trace)
        .collect();
    let call = grpc
        .iter()
        .find(|s| s["name"] == "inference.GRPCInferenceService/ModelInfer")
        .unwrap_or_else(|| panic!("no gRPC span: {grpc:?}"));
    assert_eq!(call["parent_span_id"], caller_span);
    assert_eq!(call["attributes"]["rpc.system"], "grpc");
    let under: Vec<&str> = grpc
        .iter()
        .filter(|s| s["parent_span_id"] == call["span_id"])
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for stage in ["queue", "batch", "reply"] {
        assert!(
            under.contains(&stage),
            "{stage} under the gRPC call: {under:?}"
        );
    }

    // JSON logs: one object a line, with the level and the message's fields.
    let log = s.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "tchserve is serving"),
        "{log}"
    );
}

#[test]
fn a_bad_otlp_endpoint_is_refused_at_start() {
    let s = Server::new("otlp_endpoint=localhost:4318");
    let out = s.command().arg("--foreground").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("otlp_endpoint"), "{err}");
}
