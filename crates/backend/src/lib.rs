//! The contract between the tchserve server and a model runtime.
//!
//! The server's registry knows model versions, settings and archives; a [`Backend`] turns one
//! model version into [`Workers`] that take [`job::Job`]s and answer them. Nothing here links
//! libtorch, so the server builds and tests against a fake backend in seconds, and
//! `tchserve-runtime` provides the real one.

pub mod base64;
pub mod job;
pub mod json;

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tchserve_mar::HandlerManifest;

use crate::job::Job;

/// Where a model version's workers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On the CPU.
    Cpu,
    /// On GPUs, round robin: over `ids` when given, else over every GPU.
    Gpu {
        /// The GPUs to use, each below the backend's [`Backend::gpu_count`].
        ids: Option<Vec<usize>>,
    },
}

/// Everything a backend needs to serve one model version.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Model name, for logs and thread names.
    pub name: String,
    /// Model version, for logs and thread names.
    pub version: String,
    /// Folder holding the unpacked archive.
    pub model_dir: PathBuf,
    /// The serialized model inside it.
    pub serialized_file: String,
    /// The resolved handler.
    pub handler: HandlerManifest,
    /// Largest batch a worker gathers.
    pub batch_size: usize,
    /// How long a worker waits to fill a batch.
    pub max_batch_delay: Duration,
    /// Capacity of the job queue; a full queue refuses new requests.
    pub job_queue_size: usize,
    /// How long a request may wait for its answer.
    pub response_timeout: Duration,
    /// How long a request may wait in the queue before it is answered, unrun, as expired
    /// (`clientTimeoutInMills`); `None`: as long as `response_timeout` allows.
    pub client_timeout: Option<Duration>,
    /// Take a request only when a worker is free to start on it at once, refusing it
    /// otherwise (`useJobTicket`), instead of queueing it.
    pub use_job_ticket: bool,
    /// Where the workers run.
    pub placement: Placement,
}

/// Life stage of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerState {
    /// Loading the model and warming it up.
    Starting,
    /// Serving.
    Ready,
    /// Loading failed, the worker crashed and is being restarted, or it is stuck in one batch
    /// past the response timeout; the text says why.
    Failed(String),
    /// Stopped (scaled down or shut down).
    Stopped,
}

/// A worker, as describe reports it.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    /// Worker id, unique in the process.
    pub id: usize,
    /// When it started.
    pub started: SystemTime,
    /// Its state.
    pub state: WorkerState,
    /// Its device, as a label (`cpu`, `cuda:0`).
    pub device: String,
    /// Milliseconds its last model load took, once it has loaded.
    pub load_ms: Option<u64>,
    /// How long the batch in hand has run; `None` between batches.
    pub busy: Option<Duration>,
}

/// A worker thread taken out of its model version (replaced when stuck, scaled away,
/// unregistered, or discarded by a refused registration) that has not returned yet.
#[derive(Debug, Clone)]
pub struct Lingering {
    /// `name:version`.
    pub version: String,
    /// Worker id.
    pub id: usize,
    /// How long its batch has run; `None` while it is still loading its model.
    pub busy: Option<Duration>,
}

impl std::fmt::Display for Lingering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.busy {
            Some(ran) => write!(
                f,
                "{} worker {}, {} s into its batch",
                self.version,
                self.id,
                ran.as_secs()
            ),
            None => write!(f, "{} worker {}, loading", self.version, self.id),
        }
    }
}

impl WorkerInfo {
    /// Whether it runs on a GPU.
    pub fn on_gpu(&self) -> bool {
        self.device != "cpu"
    }
}

/// An output tensor's element type and per-example shape, -1 where the size varied.
pub type OutputSignature = (tchserve_mar::handler::DType, Vec<i64>);

/// Why a backend cannot serve a model version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// A job was refused: the model version's queue is full (or its workers are gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the job queue is full")]
pub struct QueueFull;

/// A model runtime: turns model versions into workers.
pub trait Backend: Send + Sync + Debug {
    /// Number of GPUs workers may be placed on (0 on CPU-only machines).
    fn gpu_count(&self) -> usize;

    /// Prepares `spec`'s workers, none started yet; fails at once when its handler cannot run
    /// here. Blocking: call it off the async threads.
    fn load(&self, spec: ModelSpec) -> Result<Arc<dyn Workers>, LoadError>;

    /// Worker threads taken out of their model version that have not returned yet: what a
    /// thread dump would show.
    fn lingering(&self) -> Vec<Lingering> {
        Vec::new()
    }
}

/// One model version's queue and workers.
pub trait Workers: Send + Sync + Debug {
    /// Queues a job; refuses it when the queue is full or closed (the job's reply channel
    /// then closes unanswered).
    fn submit(&self, job: Job) -> Result<(), QueueFull>;

    /// Starts or stops workers until there are `n`; stopped workers finish their batch.
    fn scale(&self, n: usize);

    /// Waits until no worker is starting, or `timeout` passes; returns the number ready.
    fn wait_started(&self, timeout: Duration) -> usize;

    /// Workers in any state but stopped.
    fn worker_count(&self) -> usize;

    /// Workers ready to serve.
    fn ready_count(&self) -> usize;

    /// Every worker, described.
    fn workers(&self) -> Vec<WorkerInfo>;

    /// Requests waiting in the queue.
    fn queue_len(&self) -> usize;

    /// Free places in the queue.
    fn remaining_capacity(&self) -> usize;

    /// Whether the workers run on GPUs.
    fn on_gpu(&self) -> bool;

    /// The element type and per-example shape of the model's output tensor (`index` of a
    /// handler's several), as its workers have seen it (a dimension that varied is -1); `None`
    /// until one ran the model.
    fn output_signature(&self, index: usize) -> Option<OutputSignature> {
        let _ = index;
        None
    }

    /// Replaces each worker stuck in one batch for longer than the response timeout; returns
    /// how many were replaced.
    fn replace_stuck(&self) -> usize {
        0
    }

    /// Says that no more requests will come (the server is stopping): batches stop waiting to
    /// fill, so what is in flight is answered without waiting out the batch delay.
    fn close_batches(&self) {}

    /// Stops every worker once the queue is empty (or `drain` has passed) and waits for those
    /// between batches; one inside a batch ends when the batch returns.
    fn shutdown(&self, drain: Duration);

    /// Stops every worker at once, without waiting for any: for a version whose registration
    /// was refused. A worker still loading ends when its load does.
    fn discard(&self) {
        self.scale(0);
    }
}
