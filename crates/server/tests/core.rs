//! The registry, the management API and every inference frontend, in process, against a fake
//! backend: no libtorch, no Python, no sockets. The end-to-end tests in `tests/` run the same
//! routes on the real binary with real models.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tchserve_backend::job::{Job, PredictError, Prediction, RawTensor, Timings};
use tchserve_backend::{
    Backend, LoadError, ModelSpec, QueueFull, WorkerInfo, WorkerState, Workers,
};
use tchserve_mar::handler::DType;
use tchserve_server::Config;
use tchserve_server::core::{Infer, Registry};
use tchserve_server::frontends::v2::tensor::{self, Datatype};
use tchserve_server::frontends::{self, AppContext, AppState};
use tchserve_server::metrics::Metrics;
use tower::ServiceExt as _;

/// Answers every job at once on the caller's thread: a tensor request gets its own input back,
/// any other gets `{"echo": <its body as text>}`; a body of `fail` is a bad input.
#[derive(Debug, Default)]
struct FakeBackend {
    loads: AtomicUsize,
    starts: Arc<Gate>,
}

/// Holds every worker start while closed, as a model that takes long to load would.
#[derive(Debug, Default)]
struct Gate {
    closed: Mutex<bool>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn set(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let closed = self.closed.lock().unwrap();
        drop(self.changed.wait_while(closed, |c| *c).unwrap());
    }
}

#[derive(Debug)]
struct FakeWorkers {
    count: Mutex<usize>,
    starts: Arc<Gate>,
}

impl Backend for FakeBackend {
    fn gpu_count(&self) -> usize {
        0
    }

    fn load(&self, spec: ModelSpec) -> Result<Arc<dyn Workers>, LoadError> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        if spec.handler.name == "text_classifier" {
            return Err(LoadError("the fake backend has no tokenizer".into()));
        }
        Ok(Arc::new(FakeWorkers {
            count: Mutex::new(0),
            starts: Arc::clone(&self.starts),
        }))
    }
}

fn answer(job: Job) {
    let part = job.payload.main_part().cloned();
    let result = match part {
        Some(p) if &p.data[..] == b"fail" => Err(PredictError::BadInput("fake: bad".into())),
        Some(p) if job.payload.want_tensor => {
            let dtype: DType =
                serde_json::from_value(json!(job.payload.dtype.clone().unwrap_or_default()))
                    .unwrap_or(DType::Float32);
            let shape = job
                .payload
                .shape
                .as_deref()
                .unwrap_or("")
                .split(',')
                .filter_map(|d| d.parse().ok())
                .collect();
            Ok(Prediction::Tensor(RawTensor {
                dtype,
                shape,
                data: p.data.to_vec(),
            }))
        }
        Some(p) => Ok(Prediction::Json(
            json!({"echo": String::from_utf8_lossy(&p.data)})
                .to_string()
                .into_bytes(),
        )),
        None => Err(PredictError::BadInput("no body".into())),
    };
    let _ = job.reply.send((result, Timings::default()));
}

impl Workers for FakeWorkers {
    fn submit(&self, job: Job) -> Result<(), QueueFull> {
        if *self.count.lock().unwrap() == 0 {
            return Err(QueueFull);
        }
        answer(job);
        Ok(())
    }
    fn scale(&self, n: usize) {
        *self.count.lock().unwrap() = n;
    }
    fn wait_started(&self, _: Duration) -> usize {
        self.starts.pass();
        self.worker_count()
    }
    fn worker_count(&self) -> usize {
        *self.count.lock().unwrap()
    }
    fn ready_count(&self) -> usize {
        self.worker_count()
    }
    fn workers(&self) -> Vec<WorkerInfo> {
        (0..self.worker_count())
            .map(|id| WorkerInfo {
                id,
                started: SystemTime::now(),
                state: WorkerState::Ready,
                device: "cpu".into(),
                load_ms: Some(5),
                busy: None,
            })
            .collect()
    }
    fn queue_len(&self) -> usize {
        0
    }
    fn remaining_capacity(&self) -> usize {
        100
    }
    fn on_gpu(&self) -> bool {
        false
    }
    fn shutdown(&self, _: Duration) {
        self.scale(0);
    }
}

/// A directory archive named `name` in `store` whose handler is a manifest inside it.
fn archive_with_manifest(store: &Path, name: &str, manifest: &Value) {
    archive(store, name, "handler.json", "1.0");
    std::fs::write(
        store.join(name).join("handler.json"),
        serde_json::to_vec(manifest).unwrap(),
    )
    .unwrap();
}

/// A directory archive named `name` in `store` with `handler`.
fn archive(store: &Path, name: &str, handler: &str, version: &str) {
    let dir = store.join(name);
    std::fs::create_dir_all(dir.join("MAR-INF")).unwrap();
    std::fs::write(dir.join("model.pt"), b"not a model").unwrap();
    let manifest = json!({
        "createdOn": "01/01/2026 00:00:00",
        "runtime": "python",
        "model": {"modelName": name, "serializedFile": "model.pt", "handler": handler, "modelVersion": version},
        "archiverVersion": "0.12.0",
    });
    std::fs::write(
        dir.join("MAR-INF/MANIFEST.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
}

struct Harness {
    state: AppState,
    backend: Arc<FakeBackend>,
    _store: tempfile::TempDir,
    _scratch: tempfile::TempDir,
}

fn harness() -> Harness {
    harness_with(None)
}

fn harness_with(tokens: Option<Arc<tchserve_server::auth::Tokens>>) -> Harness {
    let store = tempfile::tempdir().unwrap();
    archive(store.path(), "mlp", "tensor", "1.0");
    archive(store.path(), "cls", "image_classifier", "1.0");
    archive(store.path(), "txt", "text_classifier", "1.0");
    let scratch = tempfile::tempdir().unwrap();
    let config = Arc::new(Config {
        model_store: Some(store.path().to_path_buf()),
        enable_model_api: true,
        ..Config::default()
    });
    let backend = Arc::new(FakeBackend::default());
    let registry = Arc::new(Registry::new(
        Arc::clone(&config),
        Some(tchserve_mar::ModelStore::open(store.path()).unwrap()),
        scratch.path().to_path_buf(),
        Arc::clone(&backend) as Arc<dyn Backend>,
    ));
    let metrics = Metrics::new();
    let state = AppState::from(AppContext {
        registry: Arc::clone(&registry),
        infer: Infer::new(registry, metrics.clone(), config.max_request_size),
        metrics,
        config,
        snapshots: None,
        tokens,
    });
    Harness {
        state,
        backend,
        _store: store,
        _scratch: scratch,
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn call(router: axum::Router, method: &str, uri: &str, body: impl Into<Body>) -> Reply {
    call_with(router, method, uri, &[], body).await
}

async fn call_with(
    router: axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, String)],
    body: impl Into<Body>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = router
        .oneshot(req.body(body.into()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

/// POSTs a v2 request with the binary extension: `header` as JSON, then `data`.
async fn post_binary(router: axum::Router, path: &str, header: &Value, data: &[u8]) -> Reply {
    let header = header.to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(data);
    call_with(
        router,
        "POST",
        path,
        &[("inference-header-content-length", header.len().to_string())],
        body,
    )
    .await
}

/// The JSON header and the binary data of a binary-extension answer.
fn split_binary(r: &Reply) -> (Value, &[u8]) {
    let n: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (serde_json::from_slice(&r.body[..n]).unwrap(), &r.body[n..])
}

impl Harness {
    fn management(&self) -> axum::Router {
        frontends::torchserve::management::router(self.state.clone())
    }
    fn inference(&self) -> axum::Router {
        frontends::inference_router(self.state.clone())
    }
    async fn register(&self, url: &str) -> Reply {
        call(
            self.management(),
            "POST",
            &format!("/models?url={url}&initial_workers=1&synchronous=true"),
            Body::empty(),
        )
        .await
    }
}

#[tokio::test]
async fn register_scale_describe_and_unregister() {
    let h = harness();
    let r = h.register("mlp").await;
    assert_eq!(r.status, 200, "{}", r.json());
    assert_eq!(
        r.json()["status"],
        "Model \"mlp\" Version: 1.0 registered with 1 initial workers"
    );
    let r = h.register("mlp").await;
    assert_eq!(r.status, 409, "a second registration conflicts");
    assert_eq!(
        h.backend.loads.load(Ordering::Relaxed),
        1,
        "refused before loading"
    );

    let r = call(
        h.management(),
        "PUT",
        "/models/mlp?min_worker=3&synchronous=true",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json());
    let d = call(h.management(), "GET", "/models/mlp", Body::empty()).await;
    assert_eq!(d.json()[0]["workers"].as_array().unwrap().len(), 3);
    assert_eq!(d.json()[0]["deviceType"], "cpu");

    let r = call(h.management(), "DELETE", "/models/mlp", Body::empty()).await;
    assert_eq!(r.status, 200);
    let r = call(h.management(), "GET", "/models/mlp", Body::empty()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "ModelNotFoundException");
}

#[tokio::test]
async fn registration_errors_are_typed() {
    let h = harness();
    let r = call(
        h.management(),
        "POST",
        "/models?url=mlp&batch_size=100000",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("the request")
    );
    let r = h.register("txt").await;
    assert_eq!(r.status, 400, "the backend refused it");
    assert_eq!(r.json()["type"], "InvalidModelException");
    assert!(r.json()["message"].as_str().unwrap().contains("tokenizer"));
    let r = h.register("missing.mar").await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn torchserve_predictions_and_errors() {
    let h = harness();
    h.register("mlp").await;
    let r = call(h.inference(), "POST", "/predictions/mlp", "[1, 2]").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"echo": "[1, 2]"}));
    let r = call(h.inference(), "POST", "/predictions/mlp", "fail").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "InvalidInputException");
    let r = call(h.inference(), "POST", "/predictions/nope", "[1]").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 404);
    let r = call(h.inference(), "GET", "/ping", Body::empty()).await;
    assert_eq!(r.json()["status"], "Healthy");
}

#[tokio::test]
async fn a_stopping_server_is_unready_but_alive() {
    let h = harness();
    h.register("mlp").await;
    let get = |uri: &'static str| call(h.inference(), "GET", uri, Body::empty());
    assert_eq!(get("/v2/health/ready").await.status, 200);
    h.state.infer.begin_stop();
    // Load balancers stop sending; liveness must not restart a server that is draining.
    assert_eq!(
        get("/v2/health/ready").await.json(),
        json!({"ready": false})
    );
    assert_eq!(get("/v2/health/ready").await.status, 503);
    assert_eq!(get("/v1/models/mlp").await.status, 503);
    assert_eq!(get("/v2/health/live").await.status, 200);
    assert_eq!(get("/ping").await.status, 200);
}

#[tokio::test]
async fn kserve_v1_ready_and_predict() {
    let h = harness();
    h.register("mlp").await;
    let r = call(h.inference(), "GET", "/v1/models/mlp", Body::empty()).await;
    assert_eq!(r.json(), json!({"name": "mlp", "ready": true}));
    let body = json!({"instances": [[1, 2], {"b64": "aGk="}, {"data": "aGk="}, "text"]});
    let r = call(
        h.inference(),
        "POST",
        "/v1/models/mlp:predict",
        body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // `b64` is decoded here; `data` reaches the handler as sent (base64 to an image handler,
    // text to a text one).
    assert_eq!(
        r.json(),
        json!({"predictions": [{"echo": "[1,2]"}, {"echo": "hi"}, {"echo": "aGk="}, {"echo": "text"}]})
    );
    let r = call(
        h.inference(),
        "POST",
        "/v1/models/mlp/versions/1.0:predict",
        json!({"inputs": [[3]]}).to_string(),
    )
    .await;
    // A model of one tensor takes every instance in one request.
    assert_eq!(r.json(), json!({"echo": "{\"instances\":[[3]]}"}));
    for (uri, body, status) in [
        ("/v1/models/nope:predict", json!({"instances": [1]}), 404),
        ("/v1/models/mlp:predict", json!({"instances": 1}), 400),
        ("/v1/models/mlp:predict", json!({"other": 1}), 400),
        (
            "/v1/models/mlp:predict",
            json!({"instances": ["fail"]}),
            400,
        ),
        (
            "/v1/models/mlp/versions/9:predict",
            json!({"instances": [1]}),
            404,
        ),
        // More instances than the model's queue (100) holds, each a request of its own (they
        // are not numbers, which a model of one tensor takes in one request).
        (
            "/v1/models/mlp:predict",
            json!({"instances": vec!["text"; 101]}),
            400,
        ),
    ] {
        let r = call(h.inference(), "POST", uri, body.to_string()).await;
        assert_eq!(r.status, status, "{uri} {body}");
        assert!(r.json()["error"].is_string(), "{uri}: {}", r.json());
    }
    // Numbers are one request, however many.
    let r = call(
        h.inference(),
        "POST",
        "/v1/models/mlp:predict",
        json!({"instances": vec![1; 101]}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call(h.inference(), "GET", "/v1/models/nope", Body::empty()).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn v2_health_metadata_and_repository() {
    let h = harness();
    let r = call(h.inference(), "GET", "/v2/health/live", Body::empty()).await;
    assert_eq!(r.json(), json!({"live": true}));
    let r = call(h.inference(), "GET", "/v2", Body::empty()).await;
    assert!(
        r.json()["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );
    let r = call(h.inference(), "POST", "/v2/repository/index", Body::empty()).await;
    let names: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["cls", "mlp", "txt"],
        "the store's archives, none loaded"
    );
    let r = call(
        h.inference(),
        "POST",
        "/v2/repository/models/mlp/load",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = call(h.inference(), "GET", "/v2/models/mlp/ready", Body::empty()).await;
    assert_eq!(r.json(), json!({"name": "mlp", "ready": true}));
    let r = call(h.inference(), "PUT", "/v2/models/mlp/ready", Body::empty()).await;
    assert_eq!(r.status, 405);
    assert!(
        r.json()["error"].is_string(),
        "a wrong method in the protocol's shape"
    );
    let r = call(h.inference(), "POST", "/v2/repository/index", Body::empty()).await;
    let mlp: Vec<Value> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "mlp")
        .cloned()
        .collect();
    assert_eq!(
        mlp,
        [json!({"name": "mlp", "version": "1.0", "state": "READY", "reason": ""})],
        "a loaded archive is listed once, as loaded"
    );
    let r = call(h.inference(), "GET", "/v2/models/mlp", Body::empty()).await;
    assert_eq!(
        r.json(),
        json!({
            "name": "mlp", "versions": ["1.0"], "platform": "pytorch_torchscript",
            "inputs": [{"name": "input0", "datatype": "FP32", "shape": [-1]}],
            "outputs": [{"name": "output0", "datatype": "FP32", "shape": [-1, -1]}],
        })
    );
    let r = call(
        h.inference(),
        "GET",
        "/v2/models/mlp/versions/1.0",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call(
        h.inference(),
        "POST",
        "/v2/repository/index",
        json!({"ready": true}).to_string(),
    )
    .await;
    assert_eq!(
        r.json(),
        json!([{"name": "mlp", "version": "1.0", "state": "READY", "reason": ""}])
    );
    let r = call(
        h.inference(),
        "POST",
        "/v2/repository/models/mlp/unload",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = call(h.inference(), "GET", "/v2/models/mlp", Body::empty()).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("mlp"));
    let r = call(
        h.inference(),
        "POST",
        "/v2/repository/models/nope/load",
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 404);
    // A body: parameters are refused rather than left out, and a body that is not an object
    // of them is the client's mistake; an empty object loads.
    for (body, status, says) in [
        (
            json!({"parameters": {"config": "{}"}}),
            400,
            "load parameters are not taken",
        ),
        (json!({"parameters": "x"}), 400, "is not a JSON object"),
        (json!([]), 400, "is not a JSON object"),
        (json!({}), 200, ""),
    ] {
        let r = call(
            h.inference(),
            "POST",
            "/v2/repository/models/mlp/load",
            body.to_string(),
        )
        .await;
        assert_eq!(
            r.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(String::from_utf8_lossy(&r.body).contains(says), "{body}");
    }
}

fn v2_input(datatype: &str, shape: Value, data: Value) -> String {
    json!({"id": "req-7", "inputs": [{"name": "input0", "datatype": datatype, "shape": shape, "data": data}]})
        .to_string()
}

#[tokio::test]
async fn v2_infer_json_and_binary() {
    let h = harness();
    h.register("mlp").await;
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/mlp/infer",
        v2_input("FP32", json!([2, 2]), json!([[1.5, 2], [3, 4]])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json(),
        json!({"model_name": "mlp", "model_version": "1.0", "id": "req-7", "outputs": [
            {"name": "output0", "datatype": "FP32", "shape": [2, 2], "data": [1.5, 2.0, 3.0, 4.0]}
        ]})
    );

    // The binary extension both ways.
    let header = json!({
        "inputs": [{"name": "input0", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": true}}],
    });
    let floats: Vec<u8> = [0.25f32, -1.0, 7.5]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let r = post_binary(h.inference(), "/v2/models/mlp/infer", &header, &floats).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (head, data) = split_binary(&r);
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 12);
    assert_eq!(data, &floats[..], "bitwise the same floats");
}

#[tokio::test]
async fn v2_bad_input_is_400_and_names_the_input() {
    let h = harness();
    h.register("mlp").await;
    let cases = [
        (
            v2_input("FP64", json!([1, 2]), json!([1, 2])),
            "datatype FP64",
        ),
        (
            v2_input("FP32", json!([1, 3]), json!([1, 2])),
            "holds 3 elements",
        ),
        (v2_input("FP32", json!([1, 2]), json!(["a", 2])), "FP32"),
        (
            v2_input("NOPE", json!([1, 2]), json!([1, 2])),
            "unknown datatype",
        ),
        (v2_input("FP32", json!([-1, 2]), json!([1, 2])), "negative"),
        // Any name is the one input, as TorchServe takes it; errors name it as sent.
        (
            json!({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1]}]})
                .to_string(),
            "input 'x'",
        ),
        (
            json!({"inputs": [{"name": "input0", "datatype": "FP32", "shape": [1], "data": [1]}],
                   "outputs": [{"name": "y"}]})
            .to_string(),
            "unexpected inference output 'y'",
        ),
        ("{not json".to_string(), "not valid"),
        (
            json!({"inputs": [{"name": "input0", "datatype": "FP32", "shape": [1], "data": [1]}],
                   "outputs": [{"name": "output0"}, {"name": "output0"}]})
            .to_string(),
            "requested 2 times",
        ),
        (
            json!({"inputs": [{"name": "input0", "datatype": "FP32", "shape": [1], "data": [1]}],
                   "outputs": [{"name": "output0", "parameters": {"classification": 3}}]})
            .to_string(),
            "classification",
        ),
        // A shape that claims billions of elements is refused without reserving room for them.
        (
            v2_input("FP32", json!([4000000000u64]), json!([1])),
            "holds 4000000000 elements",
        ),
    ];
    for (body, needle) in cases {
        let r = call(h.inference(), "POST", "/v2/models/mlp/infer", body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        let about_the_request = ["not valid", "'x'", "'y'", "times", "classification"];
        if !about_the_request.iter().any(|n| needle.contains(n)) {
            assert!(msg.contains("input0"), "{msg:?} names the input");
        }
    }
    let r = call_with(
        h.inference(),
        "POST",
        "/v2/models/mlp/infer",
        &[("inference-header-content-length", "999".into())],
        "{}",
    )
    .await;
    assert_eq!(r.status, 400);
    // Data in the JSON and in the binary part: which one is the tensor would be a guess.
    let header = json!({"inputs": [{"name": "input0", "datatype": "FP32", "shape": [1],
        "data": [1.0], "parameters": {"binary_data_size": 4}}]});
    let r = post_binary(
        h.inference(),
        "/v2/models/mlp/infer",
        &header,
        &2f32.to_le_bytes(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(msg.contains("input0") && msg.contains("both"), "{msg}");
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/nope/infer",
        v2_input("FP32", json!([1]), json!([1])),
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn v2_bytes_inputs_reach_the_image_handler_one_by_one() {
    let h = harness();
    h.register("cls").await;
    let r = call(h.inference(), "GET", "/v2/models/cls", Body::empty()).await;
    assert_eq!(r.json()["inputs"][0]["datatype"], "BYTES");
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/cls/infer",
        v2_input("BYTES", json!([2]), json!(["first", "second"])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out = &r.json()["outputs"][0];
    assert_eq!(out["datatype"], "BYTES");
    assert_eq!(out["shape"], json!([2]));
    let answers: Vec<Value> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_str(s.as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(
        answers,
        [json!({"echo": "first"}), json!({"echo": "second"})]
    );
    // An element the handler refuses fails the request, which names the input and the element.
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/cls/infer",
        v2_input("BYTES", json!([3]), json!(["first", "second", "fail"])),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "input 'input0': item 2: fake: bad");

    // Binary BYTES: each element length-prefixed.
    let mut blob = Vec::new();
    for item in [b"one".as_slice(), b"three"] {
        blob.extend((item.len() as u32).to_le_bytes());
        blob.extend_from_slice(item);
    }
    let header = json!({"inputs": [{"name": "input0", "datatype": "BYTES", "shape": [2],
        "parameters": {"binary_data_size": blob.len()}}]});
    let r = post_binary(h.inference(), "/v2/models/cls/infer", &header, &blob).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["outputs"][0]["data"][1],
        json!({"echo": "three"}).to_string()
    );
    // FP32 numbers reach the handler as one raw tensor with its shape (an image handler
    // takes them as the picture preprocessed); other datatypes are refused here.
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/cls/infer",
        v2_input("FP32", json!([1]), json!([1])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.json()["outputs"][0]["data"][0],
        json!({"echo": String::from_utf8_lossy(&1f32.to_le_bytes())}).to_string()
    );
    let r = call(
        h.inference(),
        "POST",
        "/v2/models/cls/infer",
        v2_input("INT64", json!([1]), json!([1])),
    )
    .await;
    assert_eq!(r.status, 400);
    let says = r.json()["error"].as_str().unwrap().to_string();
    assert!(says.contains("BYTES") && says.contains("FP32"), "{says}");
}

#[tokio::test]
async fn v2_every_tensor_datatype_through_json_and_binary() {
    let h = harness();
    let store = h.state.config.model_store.clone().unwrap();
    // (manifest dtype, protocol datatype, two values it holds exactly)
    let cases = [
        ("bool", "BOOL", json!([true, false])),
        ("uint8", "UINT8", json!([0, 255])),
        ("int8", "INT8", json!([-128, 127])),
        ("int16", "INT16", json!([-32768, 32767])),
        ("int32", "INT32", json!([-7, 2147483647])),
        ("int64", "INT64", json!([-9007199254740993i64, 5])),
        ("float16", "FP16", json!([1.5, -0.25])),
        ("bfloat16", "BF16", json!([1.5, -0.25])),
        ("float32", "FP32", json!([0.1, -3.5])),
        ("float64", "FP64", json!([0.1, -1e300])),
    ];
    for (dtype, datatype, values) in cases {
        let name = format!("t_{dtype}");
        archive_with_manifest(
            &store,
            &name,
            &json!({"schema": 1, "name": name, "input": {"tensor": {"dtype": dtype, "shape": [2]}},
                    "model": {"feed": "stacked"}, "output": {"tensor": {}}}),
        );
        let r = h.register(&name).await;
        assert_eq!(r.status, 200, "{dtype}: {}", r.json());
        let md = call(
            h.inference(),
            "GET",
            &format!("/v2/models/{name}"),
            Body::empty(),
        )
        .await;
        assert_eq!(
            md.json()["inputs"][0],
            json!({"name": "input0", "datatype": datatype, "shape": [-1, 2]})
        );
        let path = format!("/v2/models/{name}/infer");
        // Nested JSON in, JSON out.
        let r = call(
            h.inference(),
            "POST",
            &path,
            v2_input(datatype, json!([1, 2]), json!([values.clone()])),
        )
        .await;
        assert_eq!(
            r.status,
            200,
            "{dtype}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let out = &r.json()["outputs"][0];
        assert_eq!(out["datatype"], datatype, "{dtype}");
        assert_eq!(out["shape"], json!([1, 2]), "{dtype}");
        assert_eq!(out["data"], values, "{dtype}: the values come back");
        // Flat data and the binary extension both ways: the same bytes come back.
        let flat: Vec<&Value> = values.as_array().unwrap().iter().collect();
        let bytes = tensor::encode_json(Datatype::parse(datatype).unwrap(), &flat).unwrap();
        let header = json!({
            "inputs": [{"name": "input0", "datatype": datatype, "shape": [1, 2],
                        "parameters": {"binary_data_size": bytes.len()}}],
            "parameters": {"binary_data_output": true},
        });
        let r = post_binary(h.inference(), &path, &header, &bytes).await;
        assert_eq!(r.status, 200, "{dtype}");
        assert_eq!(split_binary(&r).1, &bytes[..], "{dtype}: bitwise the same");
        if datatype == "BOOL" {
            let r = post_binary(h.inference(), &path, &header, &[2, 0]).await;
            assert_eq!(r.status, 400, "a BOOL byte of 2");
        }
        // Another datatype is refused, naming the input and both datatypes.
        let other = if datatype == "INT64" {
            "INT32"
        } else {
            "INT64"
        };
        let r = call(
            h.inference(),
            "POST",
            &path,
            v2_input(other, json!([1, 2]), json!([1, 0])),
        )
        .await;
        assert_eq!(r.status, 400);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains("input0") && msg.contains(other) && msg.contains(datatype),
            "{msg}"
        );
    }
    // Unsigned datatypes no model takes are parsed and refused as a mismatch, not as unknown.
    for datatype in ["UINT16", "UINT32", "UINT64"] {
        let r = call(
            h.inference(),
            "POST",
            "/v2/models/t_int64/infer",
            v2_input(datatype, json!([1, 2]), json!([1, 2])),
        )
        .await;
        assert_eq!(r.status, 400);
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("does not match")
        );
    }
}

#[tokio::test]
async fn keys_guard_the_kserve_routes_in_their_own_shape() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = Arc::new(
        tchserve_server::auth::Tokens::create(
            dir.path().join("key_file.json"),
            Duration::from_secs(600),
        )
        .unwrap(),
    );
    let keys: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("key_file.json")).unwrap()).unwrap();
    let bearer = |scope: &str| format!("Bearer {}", keys[scope]["key"].as_str().unwrap());
    let h = harness_with(Some(tokens));
    let r = call_with(
        h.management(),
        "POST",
        "/models?url=mlp&initial_workers=1",
        &[("authorization", bearer("management"))],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200);
    let body = v2_input("FP32", json!([1, 2]), json!([[1, 2]]));
    for (uri, method) in [
        ("/v2/models/mlp/infer", "POST"),
        ("/v2/models/mlp", "GET"),
        ("/v1/models/mlp", "GET"),
        ("/v2/repository/index", "POST"),
    ] {
        let r = call(h.inference(), method, uri, body.clone()).await;
        assert_eq!(r.status, 400, "{uri} without a key");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("Token Authorization failed"),
            "{uri}: {}",
            r.json()
        );
    }
    let r = call_with(
        h.inference(),
        "POST",
        "/v2/models/mlp/infer",
        &[("authorization", bearer("inference"))],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, 200, "with the inference key");
    // Loading and unloading register and unregister: the inference key is not enough.
    let r = call_with(
        h.inference(),
        "POST",
        "/v2/repository/models/mlp/unload",
        &[("authorization", bearer("inference"))],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = call_with(
        h.inference(),
        "POST",
        "/v2/repository/models/mlp/unload",
        &[("authorization", bearer("management"))],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, 200);
    // Probes need no key.
    for uri in ["/v2/health/live", "/v2", "/ping"] {
        let r = call(h.inference(), "GET", uri, Body::empty()).await;
        assert_eq!(r.status, 200, "{uri}");
    }
}

#[test]
fn a_registration_waiting_for_its_workers_is_listed_as_starting() {
    let h = harness();
    let registry = Arc::clone(&h.state.registry);
    h.backend.starts.set(true);
    let registering = {
        let registry = Arc::clone(&registry);
        std::thread::spawn(move || {
            registry.register(&tchserve_server::core::RegisterParams {
                url: "mlp".into(),
                initial_workers: Some(2),
                synchronous: true,
                ..Default::default()
            })
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while registry.starting().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never listed");
        std::thread::sleep(Duration::from_millis(5));
    }
    // What a hung start waits on is named, though it is not registered yet.
    let starting = registry.starting();
    assert_eq!(starting.len(), 1);
    assert_eq!((&*starting[0].name, &*starting[0].version), ("mlp", "1.0"));
    assert_eq!(starting[0].pool.worker_count(), 2);
    assert!(registry.names().is_empty());
    h.backend.starts.set(false);
    let registered = registering.join().unwrap().unwrap();
    assert_eq!(registered.workers, 2);
    assert!(registry.starting().is_empty());
    assert_eq!(registry.names(), ["mlp"]);
}
