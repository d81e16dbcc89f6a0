//! What every frontend asks of the server: is it ready, what does a model take and give, and
//! an answer for one request. Frontends translate their wire format to and from these calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tchserve_backend::job::{Job, Payload, Prediction};
use tchserve_mar::handler::{DType, Input, Output};

use super::error::ApiError;
use super::registry::{ModelVersion, Registry};
use crate::metrics::Metrics;

/// The element type of a model's input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// A tensor of numbers.
    Tensor(DType),
    /// Encoded items, one per example: an image file, text, or a JSON answer.
    Bytes,
}

/// A model input's or output's name, element type and shape (-1 where free).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Name.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Shape, the batch first; -1 where any size goes.
    pub shape: Vec<i64>,
}

/// What a model version takes and gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Every registered version.
    pub versions: Vec<String>,
    /// The version described.
    pub version: String,
    /// Its inputs: one, or the named tensors of a `tensors` input.
    pub inputs: Vec<TensorMeta>,
    /// Whether the inputs go by their names (a `tensors` input), rather than one input that
    /// takes any name.
    pub named_inputs: bool,
    /// Its outputs: one, or the named tensors of a handler that answers several.
    pub outputs: Vec<TensorMeta>,
}

/// Name of every model's input in the typed protocols.
pub const INPUT_NAME: &str = "input0";
/// Name of every model's output in the typed protocols.
pub const OUTPUT_NAME: &str = "output0";

/// The inference core: readiness, metadata and predictions over the registry.
#[derive(Debug, Clone)]
pub struct Infer {
    registry: Arc<Registry>,
    metrics: Metrics,
    max_response_size: usize,
    /// Set when the server begins to stop: load balancers must see it unready at once.
    stopping: Arc<AtomicBool>,
}

impl Infer {
    /// The core over `registry`, recording into `metrics`.
    pub fn new(registry: Arc<Registry>, metrics: Metrics, max_response_size: usize) -> Self {
        Infer {
            registry,
            metrics,
            max_response_size,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Marks the server as stopping: readiness answers false from now on.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// True when every model's default version has its minimum workers ready: TorchServe's
    /// health, which stays true while the server drains (liveness must not restart it then).
    pub fn server_healthy(&self) -> bool {
        self.registry.snapshot_entries().values().all(|entry| {
            entry
                .versions
                .get(&entry.default)
                .is_none_or(|m| m.pool.ready_count() >= m.min_max().0)
        })
    }

    /// True when healthy and not stopping: whether new requests should come here.
    pub fn server_ready(&self) -> bool {
        !self.stopping.load(Ordering::SeqCst) && self.server_healthy()
    }

    /// True when the version (or the default) has a worker ready to answer.
    pub fn model_ready(&self, name: &str, version: Option<&str>) -> Result<bool, ApiError> {
        let m = self.registry.get(name, version)?;
        Ok(!self.stopping.load(Ordering::SeqCst) && m.pool.ready_count() > 0)
    }

    /// What the version (or the default) takes and gives, from its handler manifest.
    pub fn metadata(&self, name: &str, version: Option<&str>) -> Result<ModelMetadata, ApiError> {
        let m = self.registry.get(name, version)?;
        let versions = self
            .registry
            .describe(name, Some("all"))?
            .iter()
            .map(|v| v.version.clone())
            .collect();
        let (inputs, outputs) = signature(&m);
        Ok(ModelMetadata {
            name: m.name.clone(),
            versions,
            version: m.version.clone(),
            named_inputs: matches!(m.manifest.input, Input::Tensors(_)),
            inputs,
            outputs,
        })
    }

    /// Answers one request with the version (or the default), through its queue and batcher.
    pub async fn infer(
        &self,
        name: &str,
        version: Option<&str>,
        payload: Payload,
    ) -> Result<Prediction, ApiError> {
        self.infer_counted(name, version, version.is_some(), payload)
            .await
    }

    /// As [`Infer::infer`], counted in the metrics as a request that named its version or not
    /// (`named`): the typed protocols resolve the default version first, to check the request
    /// against what it takes, then run that version.
    pub async fn infer_counted(
        &self,
        name: &str,
        version: Option<&str>,
        named: bool,
        payload: Payload,
    ) -> Result<Prediction, ApiError> {
        let started = Instant::now();
        let mv = self.registry.get(name, version)?;
        let series = mv.series.get(&self.metrics, name, &mv.version, named);
        series.requests_total.inc();
        let (prediction, queue_us) = self
            .run(&mv, name, version, named, payload)
            .await
            .inspect_err(|e| count_timeout(series, e))?;
        // Both only for an answered request, from one clock, as TorchServe counts them: the
        // time queued is then never more than the latency.
        series.queue_latency_us.inc_by(queue_us);
        series
            .latency_us
            .inc_by(started.elapsed().as_micros() as u64);
        Ok(prediction)
    }

    /// Answers a request of several items (KServe v1 instances, v2 BYTES elements): each item
    /// is its own job, so the model's batcher batches them like any others, and the request
    /// counts once in the metrics, as one request. The first failure fails them all, naming
    /// its item; the others are dropped (their jobs are then skipped by the workers), as they
    /// are when the client goes away.
    pub async fn infer_items(
        &self,
        name: &str,
        version: Option<&str>,
        named: bool,
        mut payloads: Vec<Payload>,
    ) -> Result<Vec<Prediction>, ApiError> {
        if payloads.len() == 1 {
            let p = payloads.pop().unwrap_or_default();
            return Ok(vec![self.infer_counted(name, version, named, p).await?]);
        }
        let started = Instant::now();
        let mv = self.registry.get(name, version)?;
        let series = mv.series.get(&self.metrics, name, &mv.version, named);
        series.requests_total.inc();
        let n = payloads.len();
        // Items past the queue's capacity could never all be queued at once; refusing them here
        // keeps one request from spawning millions of tasks.
        let capacity = mv.job_queue_size;
        if n > capacity {
            return Err(ApiError::bad_request(format!(
                "the request holds {n} items, more than model {name}'s job queue ({capacity}); \
                 send at most {capacity} per request"
            )));
        }
        // Dropping the set aborts its tasks, which drops their reply channels.
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in payloads.into_iter().enumerate() {
            let (infer, mv) = (self.clone(), Arc::clone(&mv));
            let (name, version) = (name.to_owned(), version.map(str::to_owned));
            set.spawn(crate::telemetry::in_current_trace(async move {
                let answer = infer.run(&mv, &name, version.as_deref(), named, p).await;
                (i, answer)
            }));
        }
        let mut out: Vec<Option<Prediction>> = vec![None; n];
        // The items wait side by side: the request waited as long as its longest-queued item.
        let mut queue_us = 0;
        while let Some(joined) = set.join_next().await {
            let (i, answer) = joined.map_err(|e| ApiError::internal(e.to_string()))?;
            let (prediction, queued) = answer
                .inspect_err(|e| count_timeout(series, e))
                .map_err(|e| e.prefixed(&format!("item {i}: ")))?;
            queue_us = queue_us.max(queued);
            out[i] = Some(prediction);
        }
        series.queue_latency_us.inc_by(queue_us);
        series
            .latency_us
            .inc_by(started.elapsed().as_micros() as u64);
        Ok(out.into_iter().flatten().collect())
    }

    /// Runs one job on `mv` and records its queue and handler times; the request it belongs
    /// to is counted by the caller, which gets the microseconds the job was queued.
    async fn run(
        &self,
        mv: &ModelVersion,
        name: &str,
        version: Option<&str>,
        named: bool,
        payload: Payload,
    ) -> Result<(Prediction, u64), ApiError> {
        let series = mv.series.get(&self.metrics, name, &mv.version, named);
        if mv.pool.worker_count() == 0 {
            let who = match version {
                Some(v) => format!("Model \"{name}\" Version {v}"),
                None => format!("Model \"{name}\""),
            };
            return Err(ApiError::unavailable(format!(
                "{who} has no worker to serve inference request. Please use scale workers API to add workers."
            )));
        }
        let (job, rx) = Job::new(payload);
        let enqueued = job.enqueued;
        if mv.pool.submit(job).is_err() {
            if mv.use_job_ticket {
                return Err(ApiError::unavailable(format!(
                    "Model \"{name}\" has no free worker for the request (its useJobTicket \
                     takes a request only when a worker can start on it at once); try again later"
                )));
            }
            return Err(ApiError::unavailable(format!(
                "Model \"{name}\" has too many requests waiting (job queue of {} is full); try again later",
                mv.job_queue_size
            )));
        }
        let timeout = Duration::from_secs(mv.response_timeout_s);
        let (result, timings) = match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                return Err(ApiError::timeout(format!(
                    "Prediction timed out after {} s",
                    mv.response_timeout_s
                )));
            }
            Ok(Err(_)) => return Err(ApiError::internal("Worker died.")),
            Ok(Ok(reply)) => reply,
        };
        crate::telemetry::record_job(enqueued, &timings);
        series.queue_seconds.observe(timings.queue_us as f64 / 1e6);
        series
            .handler_seconds
            .observe(timings.handler_us as f64 / 1e6);
        if timings.batch_size > 0 {
            series.batch_size.observe(timings.batch_size as f64);
            // TorchServe's gauges hold the last batch's times, in milliseconds.
            let handler_us = timings.decode_us + timings.run_us;
            self.metrics
                .queue_time_ms
                .set(timings.queue_us as f64 / 1e3);
            self.metrics
                .worker_thread_time_ms
                .set(timings.handler_us.saturating_sub(handler_us) as f64 / 1e3);
            series.handler_time_ms.set(handler_us as f64 / 1e3);
            series
                .prediction_time_ms
                .set(timings.handler_us as f64 / 1e3);
        }
        let prediction = result?;
        let size = match &prediction {
            Prediction::Json(body) => body.len(),
            Prediction::Tensor(t) => t.data.len(),
            Prediction::Tensors(ts) => ts.iter().map(|(_, t)| t.data.len()).sum(),
        };
        self.check_response_size(size)?;
        Ok((prediction, timings.queue_us))
    }

    /// Refuses a response over `max_response_size`, as TorchServe refuses one: each
    /// prediction is held to it, and so is the whole answer a frontend writes of several (KServe
    /// v1's instances) or in a longer form (v2's JSON numbers).
    pub fn check_response_size(&self, size: usize) -> Result<(), ApiError> {
        if size > self.max_response_size {
            return Err(ApiError::internal(format!(
                "the response of {size} bytes exceeds max_response_size ({})",
                self.max_response_size
            )));
        }
        Ok(())
    }
}

/// Counts a request answered 504, once however many of its items timed out.
fn count_timeout(series: &crate::metrics::ModelSeries, e: &ApiError) {
    if matches!(e, ApiError::Timeout(_)) {
        series.timeouts.inc();
    }
}

/// A version's input and output as the typed protocols describe them.
pub fn signature(m: &ModelVersion) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    let tensor = |name: &str, dtype: DType, shape: &Option<Vec<i64>>| TensorMeta {
        name: name.into(),
        datatype: DataType::Tensor(dtype),
        shape: match shape {
            Some(s) => std::iter::once(-1).chain(s.iter().copied()).collect(),
            None => vec![-1],
        },
    };
    let inputs = match &m.manifest.input {
        Input::Tensor { dtype, shape } => vec![tensor(INPUT_NAME, *dtype, shape)],
        Input::Tensors(list) => list
            .iter()
            .map(|i| tensor(&i.name, i.dtype, &i.shape))
            .collect(),
        Input::Image { .. } | Input::Text { .. } => vec![TensorMeta {
            name: INPUT_NAME.into(),
            datatype: DataType::Bytes,
            shape: vec![-1],
        }],
    };
    // The model decides its outputs' types: as its workers have seen them, else float, what
    // regressors and classifiers give, until a worker has run it.
    let seen = |name: &str, index: usize| {
        let (dtype, dims) = m
            .pool
            .output_signature(index)
            .unwrap_or((DType::Float32, vec![-1]));
        TensorMeta {
            name: name.into(),
            datatype: DataType::Tensor(dtype),
            shape: std::iter::once(-1).chain(dims).collect(),
        }
    };
    // Images and texts are answered per element, as the TorchServe route answers them: JSON.
    let bytes_in = matches!(m.manifest.input, Input::Image { .. } | Input::Text { .. });
    let outputs = match &m.manifest.output {
        _ if bytes_in => vec![TensorMeta {
            name: OUTPUT_NAME.into(),
            datatype: DataType::Bytes,
            shape: vec![-1],
        }],
        Output::Tensor {} => vec![seen(OUTPUT_NAME, 0)],
        Output::Tensors(names) => names
            .iter()
            .enumerate()
            .map(|(i, name)| seen(name, i))
            .collect(),
        _ => vec![TensorMeta {
            name: OUTPUT_NAME.into(),
            datatype: DataType::Bytes,
            shape: vec![-1],
        }],
    };
    (inputs, outputs)
}
