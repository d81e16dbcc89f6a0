//! A prediction request as it travels from a frontend to a worker and back.

use std::time::Instant;

use tchserve_mar::handler::DType;
use tokio::sync::oneshot;

/// One named part of a request: the raw body, or a multipart / form field.
#[derive(Debug, Clone)]
pub struct Part {
    /// Field name (`body` for a raw request body, as TorchServe names it).
    pub name: String,
    /// The part's content type, when known.
    pub content_type: Option<String>,
    /// The bytes, shared with the HTTP layer without a copy.
    pub data: bytes::Bytes,
    /// The sizes of a raw tensor part, comma-separated as `X-Tensor-Shape` gives them, where
    /// the part itself says (a multipart field's header, a typed protocol's input); a part
    /// without one takes the request's header.
    pub shape: Option<String>,
}

/// The request payload handed to a handler.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    /// Body and fields, in request order.
    pub parts: Vec<Part>,
    /// `X-Tensor-Dtype` header, for raw tensor bodies.
    pub dtype: Option<String>,
    /// `X-Tensor-Shape` header, for raw tensor bodies.
    pub shape: Option<String>,
    /// Answer with the output tensor itself where the handler's output is a tensor (the typed
    /// protocols), instead of TorchServe's JSON.
    pub want_tensor: bool,
}

impl Payload {
    /// The part a handler reads: `data` if present, else `body`, else the first part
    /// (TorchServe's handlers read `data` or `body`). Of several fields of one name the last
    /// counts, as TorchServe keeps the last.
    pub fn main_part(&self) -> Option<&Part> {
        let last = |name: &str| self.parts.iter().rev().find(|p| p.name == name);
        last("data")
            .or_else(|| last("body"))
            .or_else(|| self.parts.first())
    }
}

/// A successful prediction.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// A JSON document, as TorchServe's handlers answer.
    Json(Vec<u8>),
    /// The request's rows of the output tensor, for protocols that carry typed tensors.
    Tensor(RawTensor),
    /// The request's rows of each of a model's named output tensors, in the handler's order,
    /// for protocols that carry typed tensors.
    Tensors(Vec<(String, RawTensor)>),
}

/// A tensor as bytes: little-endian, row-major, no padding (BOOL one byte each).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, the request's examples first.
    pub shape: Vec<i64>,
    /// The elements.
    pub data: Vec<u8>,
}

/// Why a prediction failed, by who is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PredictError {
    /// The request cannot be turned into model input (the client's fault: 400).
    #[error("{0}")]
    BadInput(String),
    /// The model or handler failed on valid input (500).
    #[error("{0}")]
    ModelFailed(String),
    /// The model ran out of memory, host or GPU (507, TorchServe's status for it).
    #[error("Out of resources: {0}")]
    OutOfMemory(String),
    /// The worker died while serving the request (500).
    #[error("Worker died.")]
    WorkerDied,
    /// No worker is left to serve the request (503): its model was scaled to none.
    #[error("{0}")]
    Unavailable(String),
    /// The request waited past its response timeout.
    #[error("Prediction timed out after {0} s")]
    Timeout(u64),
    /// The request waited in the queue past the model's `clientTimeoutInMills`, and was not run.
    #[error(
        "The request waited in the queue for longer than the model's clientTimeoutInMills ({0} ms) and was not run"
    )]
    Expired(u64),
}

/// Per-request timings, reported with the reply for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Microseconds spent queued before a worker took the request.
    pub queue_us: u64,
    /// Microseconds the worker spent on the batch holding the request.
    pub handler_us: u64,
    /// Number of requests in that batch.
    pub batch_size: usize,
    /// Of `handler_us`, the part spent turning the batch's requests into model input.
    pub decode_us: u64,
    /// Of `handler_us`, the part spent running the model and writing the answers.
    pub run_us: u64,
}

/// What a worker sends back.
pub type Reply = (Result<Prediction, PredictError>, Timings);

/// A queued request.
#[derive(Debug)]
pub struct Job {
    /// The payload.
    pub payload: Payload,
    /// Where the answer goes; closed when the client has gone.
    pub reply: oneshot::Sender<Reply>,
    /// When it was queued.
    pub enqueued: Instant,
}

impl Job {
    /// A new job and the receiver its answer arrives on.
    pub fn new(payload: Payload) -> (Self, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        (
            Job {
                payload,
                reply: tx,
                enqueued: Instant::now(),
            },
            rx,
        )
    }

    /// Whether anyone still waits for the answer.
    pub fn is_wanted(&self) -> bool {
        !self.reply.is_closed()
    }
}
