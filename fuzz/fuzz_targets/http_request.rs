//! Whole requests through the real routers, in process, against a backend that echoes: the
//! Open Inference Protocol's JSON and binary-extension parser, KServe v1's instances, and
//! TorchServe's raw, form and multipart bodies. Whatever the bytes, the answer is a success or a
//! client error with a JSON body: never a 500, never a panic.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::Request;
use libfuzzer_sys::fuzz_target;
use tchserve_backend::job::{Job, PredictError, Prediction, RawTensor, Timings};
use tchserve_backend::{
    Backend, LoadError, ModelSpec, QueueFull, WorkerInfo, WorkerState, Workers,
};
use tchserve_mar::handler::DType;
use tchserve_server::Config;
use tchserve_server::core::{Infer, Registry};
use tchserve_server::frontends::{self, AppState};
use tchserve_server::metrics::Metrics;
use tower::ServiceExt as _;

#[derive(Debug)]
struct Echo;

#[derive(Debug)]
struct EchoWorkers(Mutex<usize>);

impl Backend for Echo {
    fn gpu_count(&self) -> usize {
        0
    }
    fn load(&self, _: ModelSpec) -> Result<Arc<dyn Workers>, LoadError> {
        Ok(Arc::new(EchoWorkers(Mutex::new(0))))
    }
}

impl Workers for EchoWorkers {
    fn submit(&self, job: Job) -> Result<(), QueueFull> {
        let result = match job.payload.main_part() {
            None => Err(PredictError::BadInput("no body".into())),
            Some(p) if job.payload.want_tensor => Ok(Prediction::Tensor(RawTensor {
                dtype: DType::Uint8,
                shape: vec![1, p.data.len() as i64],
                data: p.data.to_vec(),
            })),
            Some(p) => Ok(Prediction::Json(
                serde_json::json!({ "len": p.data.len() })
                    .to_string()
                    .into_bytes(),
            )),
        };
        let _ = job.reply.send((result, Timings::default()));
        Ok(())
    }
    fn scale(&self, n: usize) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = n;
    }
    fn wait_started(&self, _: Duration) -> usize {
        self.worker_count()
    }
    fn worker_count(&self) -> usize {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
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
            })
            .collect()
    }
    fn queue_len(&self) -> usize {
        0
    }
    fn remaining_capacity(&self) -> usize {
        1000
    }
    fn on_gpu(&self) -> bool {
        false
    }
    fn shutdown(&self, _: Duration) {
        self.scale(0);
    }
}

struct World {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// One server for the whole run: a `tensor` model and an image classifier, one worker each.
fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let store = tempfile::tempdir().expect("temp dir");
        for (name, handler) in [("mlp", "tensor"), ("cls", "image_classifier")] {
            let dir = store.path().join(name);
            std::fs::create_dir_all(dir.join("MAR-INF")).expect("archive dir");
            std::fs::write(dir.join("model.pt"), b"not a model").expect("model");
            let manifest = serde_json::json!({
                "runtime": "python",
                "model": {"modelName": name, "serializedFile": "model.pt", "handler": handler,
                          "modelVersion": "1.0"},
                "archiverVersion": "0.12.0",
            });
            std::fs::write(dir.join("MAR-INF/MANIFEST.json"), manifest.to_string())
                .expect("manifest");
        }
        let scratch = tempfile::tempdir().expect("temp dir");
        let config = Arc::new(Config {
            model_store: Some(store.path().to_path_buf()),
            max_request_size: 1 << 20,
            ..Config::default()
        });
        let registry = Arc::new(Registry::new(
            Arc::clone(&config),
            Some(tchserve_mar::ModelStore::open(store.path()).expect("store")),
            scratch.path().to_path_buf(),
            Arc::new(Echo) as Arc<dyn Backend>,
        ));
        for name in ["mlp", "cls"] {
            registry
                .register(&tchserve_server::core::RegisterParams {
                    url: name.into(),
                    initial_workers: Some(1),
                    synchronous: true,
                    ..Default::default()
                })
                .expect("register");
        }
        let metrics = Metrics::new();
        let state = AppState {
            registry: Arc::clone(&registry),
            infer: Infer::new(registry, metrics.clone(), config.max_request_size),
            metrics,
            config,
            snapshots: None,
            tokens: None,
        };
        World {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            router: frontends::inference_router(state),
            _dirs: (store, scratch),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    // [route, content type, binary header length (2 bytes), body...]
    let [route, ctype, h0, h1, body @ ..] = data else {
        return;
    };
    let uri = match route % 6 {
        0 => "/v2/models/mlp/infer",
        1 => "/v2/models/cls/versions/1.0/infer",
        2 => "/v1/models/mlp:predict",
        3 => "/predictions/mlp",
        4 => "/predictions/cls/1.0",
        _ => "/v2/repository/index",
    };
    let content_type = match ctype % 6 {
        0 => "application/json",
        1 => "application/octet-stream",
        2 => "multipart/form-data; boundary=XyZ",
        3 => "application/x-www-form-urlencoded",
        4 => "text/plain; charset=utf-8",
        _ => "multipart/form-data",
    };
    let mut request = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", content_type);
    let binary_len = u16::from_le_bytes([*h0, *h1]);
    if binary_len != u16::MAX {
        request = request.header("inference-header-content-length", binary_len.to_string());
    }
    let request = request.body(Body::from(body.to_vec())).expect("request");
    let w = world();
    let (status, bytes) = w.runtime.block_on(async {
        let response = w.router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, bytes)
    });
    assert!(
        !status.is_server_error(),
        "{uri} answered {status}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if !status.is_success() {
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("errors are JSON");
    }
});
