//! Prometheus metrics: TorchServe's default metrics under its names, plus histograms of queue
//! time, handler time and batch size, queue depth and workers per model, and the process's CPU
//! and memory.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod host;

/// Every metric the server exports: a handle to one shared [`MetricSet`], cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics(Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;
    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The metrics behind [`Metrics`].
#[derive(Debug)]
pub struct MetricSet {
    registry: Registry,
    /// `ts_inference_requests_total{model_name, model_version, hostname}`.
    pub requests_total: IntCounterVec,
    /// `ts_inference_latency_microseconds`: cumulative end-to-end latency.
    pub latency_us: IntCounterVec,
    /// `ts_queue_latency_microseconds`: cumulative time queued.
    pub queue_latency_us: IntCounterVec,
    /// Seconds queued, per model.
    pub queue_seconds: HistogramVec,
    /// Seconds the worker spent on the request's batch, per model.
    pub handler_seconds: HistogramVec,
    /// Requests per batch, per model.
    pub batch_size: HistogramVec,
    /// Requests waiting, per model.
    pub queue_depth: IntGaugeVec,
    /// Workers, per model and state.
    pub workers: IntGaugeVec,
    /// Requests answered 504 at the model's response timeout, per model.
    pub timeouts: IntCounterVec,
    /// Workers replaced because a batch kept them past the response timeout, per model.
    pub workers_replaced: IntCounterVec,
    /// Snapshots that could not be written: registry changes not kept across a restart.
    pub snapshot_write_failures: prometheus::IntCounter,
    /// `QueueTime`: milliseconds the last request waited for a worker.
    pub queue_time_ms: Gauge,
    /// `WorkerThreadTime`: milliseconds the last batch spent in its worker outside the handler.
    pub worker_thread_time_ms: Gauge,
    /// `WorkerLoadTime{WorkerName}`: milliseconds each worker took to load its model.
    pub worker_load_time_ms: GaugeVec,
    /// `HandlerTime{ModelName}`: milliseconds the handler took on the last batch.
    pub handler_time_ms: GaugeVec,
    /// `PredictionTime{ModelName}`: milliseconds the worker took on the last batch.
    pub prediction_time_ms: GaugeVec,
    /// TorchServe's host metrics: CPU, memory and disk.
    host: host::HostGauges,
    hostname: String,
    /// `status` with this host's labels, by class: counted on every response.
    status_by_class: [IntCounter; 3],
}

const MODEL_LABELS: [&str; 3] = ["model_name", "model_version", "hostname"];
/// TorchServe's labels of its host-level metrics (`Level` is always `Host`).
const HOST_LABELS: [&str; 2] = ["Level", "Hostname"];
/// TorchServe's labels of its per-model gauges (`Level` is always `Model`).
const MODEL_GAUGE_LABELS: [&str; 3] = ["ModelName", "Level", "Hostname"];

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &["model_name", "model_version"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let float_gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let time_buckets =
            prometheus::exponential_buckets(0.000_05, 2.0, 18).expect("valid buckets");
        let hostname = hostname();
        let status = [
            counter(
                "Requests2XX",
                "Responses with a 2xx status.",
                &["Level", "Hostname"],
            ),
            counter(
                "Requests4XX",
                "Responses with a 4xx status.",
                &["Level", "Hostname"],
            ),
            counter(
                "Requests5XX",
                "Responses with any other status.",
                &["Level", "Hostname"],
            ),
        ];
        // `Requests2XX` and the others are labelled by `Level` and `Hostname`, which never change.
        let status_by_class = status.map(|c| c.with_label_values(&["Host", &hostname]));
        let host_gauge = |name: &str, help: &str| {
            float_gauge(name, help, &HOST_LABELS).with_label_values(&["Host", &hostname])
        };
        let queue_time_ms = host_gauge(
            "QueueTime",
            "Milliseconds the last request waited for a worker.",
        );
        let worker_thread_time_ms = host_gauge(
            "WorkerThreadTime",
            "Milliseconds the last batch spent in its worker outside the handler.",
        );
        let host = host::HostGauges::new(
            &|name, help| float_gauge(name, help, &HOST_LABELS),
            &hostname,
        );
        let m = MetricSet {
            requests_total: counter(
                "ts_inference_requests_total",
                "Inference requests received.",
                &MODEL_LABELS,
            ),
            latency_us: counter(
                "ts_inference_latency_microseconds",
                "Cumulative end-to-end inference latency in microseconds.",
                &MODEL_LABELS,
            ),
            queue_latency_us: counter(
                "ts_queue_latency_microseconds",
                "Cumulative time inference requests spent queued, in microseconds.",
                &MODEL_LABELS,
            ),
            queue_seconds: histogram(
                "tchserve_queue_seconds",
                "Time a request waited for a worker.",
                time_buckets.clone(),
            ),
            handler_seconds: histogram(
                "tchserve_handler_seconds",
                "Time a worker spent on the batch holding a request.",
                time_buckets,
            ),
            batch_size: histogram(
                "tchserve_batch_size",
                "Size of the batch each request ran in (as gathered by its worker), observed once per request: _count counts requests, not batches.",
                vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0],
            ),
            queue_depth: gauge(
                "tchserve_queue_depth",
                "Requests waiting for a worker.",
                &["model_name", "model_version"],
            ),
            workers: gauge(
                "tchserve_workers",
                "Workers by state.",
                &["model_name", "model_version", "state"],
            ),
            timeouts: counter(
                "tchserve_timeouts_total",
                "Requests answered 504 when the model's response timeout passed.",
                &["model_name", "model_version"],
            ),
            workers_replaced: counter(
                "tchserve_workers_replaced_total",
                "Workers replaced because one batch kept them past the response timeout.",
                &["model_name", "model_version"],
            ),
            snapshot_write_failures: {
                let c = prometheus::IntCounter::new(
                    "tchserve_snapshot_write_failures_total",
                    "Registry changes whose snapshot could not be written: they are not kept across a restart until a later write succeeds.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric");
                c
            },
            queue_time_ms,
            worker_thread_time_ms,
            worker_load_time_ms: float_gauge(
                "WorkerLoadTime",
                "Milliseconds each worker took to load its model.",
                &["WorkerName", "Level", "Hostname"],
            ),
            handler_time_ms: float_gauge(
                "HandlerTime",
                "Milliseconds the handler took on the last batch (decoding, the model, the answers).",
                &MODEL_GAUGE_LABELS,
            ),
            prediction_time_ms: float_gauge(
                "PredictionTime",
                "Milliseconds the worker took on the last batch.",
                &MODEL_GAUGE_LABELS,
            ),
            host,
            hostname,
            status_by_class,
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        Metrics(Arc::new(m))
    }
}

impl MetricSet {
    /// The hostname label value.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Sets `WorkerLoadTime` to exactly these workers, as (worker name, milliseconds): workers
    /// scaled away leave no series behind.
    pub fn set_worker_load_times(&self, workers: &[(String, u64)]) {
        self.worker_load_time_ms.reset();
        for (name, ms) in workers {
            self.worker_load_time_ms
                .with_label_values(&[name, "Host", &self.hostname])
                .set(*ms as f64);
        }
    }

    /// Drops the series of a model version that is no longer registered and, with
    /// `model_gone`, those of the model itself: a server that sees many versions come and go
    /// (model-store polling) would otherwise export every one of them for ever.
    pub fn forget(&self, name: &str, version: &str, model_gone: bool) {
        let host = self.hostname.as_str();
        let counters = [
            &self.requests_total,
            &self.latency_us,
            &self.queue_latency_us,
        ];
        // Absent series (a version never asked for by name) are no error worth a word.
        for c in counters {
            let _ = c.remove_label_values(&[name, version, host]);
        }
        for h in [&self.queue_seconds, &self.handler_seconds, &self.batch_size] {
            let _ = h.remove_label_values(&[name, version]);
        }
        let _ = self.queue_depth.remove_label_values(&[name, version]);
        for c in [&self.timeouts, &self.workers_replaced] {
            let _ = c.remove_label_values(&[name, version]);
        }
        for state in ["ready", "not_ready"] {
            let _ = self.workers.remove_label_values(&[name, version, state]);
        }
        if model_gone {
            for c in counters {
                let _ = c.remove_label_values(&[name, "default", host]);
            }
            for g in [&self.handler_time_ms, &self.prediction_time_ms] {
                let _ = g.remove_label_values(&[name, "Model", host]);
            }
        }
    }

    /// Samples the host's CPU, memory and root file system into TorchServe's host metrics.
    pub fn sample_host(&self) {
        self.host.sample();
    }

    /// Counts a response by status class.
    pub fn count_status(&self, status: u16) {
        let class = match status {
            200..=299 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.status_by_class[class].inc();
    }

    /// The text exposition of every metric, optionally only those whose names are listed.
    /// TorchServe's own metrics are written as TorchServe writes them (see
    /// [`write_torchserve_style`]); the others in the usual form.
    pub fn render(&self, names: &[String]) -> String {
        let mut out = Vec::new();
        for mut family in self
            .registry
            .gather()
            .into_iter()
            .filter(|f| names.is_empty() || names.iter().any(|n| n == f.name()))
        {
            if family.name() == "process_cpu_seconds_total" {
                precise_cpu_seconds(&mut family);
            }
            match TORCHSERVE_LABEL_ORDER
                .iter()
                .find(|(n, _)| *n == family.name())
            {
                Some((_, order)) => write_torchserve_style(&family, order, &mut out),
                None => {
                    let _ = TextEncoder::new().encode(std::slice::from_ref(&family), &mut out);
                }
            }
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// TorchServe's metrics and the order its metric definitions give their labels.
const TORCHSERVE_LABEL_ORDER: [(&str, &[&str]); 18] = [
    ("Requests2XX", &HOST_LABELS),
    ("Requests4XX", &HOST_LABELS),
    ("Requests5XX", &HOST_LABELS),
    ("ts_inference_requests_total", &MODEL_LABELS),
    ("ts_inference_latency_microseconds", &MODEL_LABELS),
    ("ts_queue_latency_microseconds", &MODEL_LABELS),
    ("QueueTime", &HOST_LABELS),
    ("WorkerThreadTime", &HOST_LABELS),
    ("WorkerLoadTime", &["WorkerName", "Level", "Hostname"]),
    ("CPUUtilization", &HOST_LABELS),
    ("MemoryUsed", &HOST_LABELS),
    ("MemoryAvailable", &HOST_LABELS),
    ("MemoryUtilization", &HOST_LABELS),
    ("DiskUsage", &HOST_LABELS),
    ("DiskUtilization", &HOST_LABELS),
    ("DiskAvailable", &HOST_LABELS),
    ("HandlerTime", &MODEL_GAUGE_LABELS),
    ("PredictionTime", &MODEL_GAUGE_LABELS),
];

/// Replaces the process collector's CPU time, which it keeps in whole seconds (an integer
/// counter), with the exact time from `/proc/self/stat`: in whole seconds a lightly loaded
/// server's `rate()` reads 0 most of the time.
fn precise_cpu_seconds(family: &mut prometheus::proto::MetricFamily) {
    let Some(seconds) = host::process_cpu_seconds() else {
        return;
    };
    for m in family.mut_metric().iter_mut() {
        let mut counter = prometheus::proto::Counter::default();
        counter.set_value(seconds);
        m.set_counter(counter);
    }
}

/// Writes a counter or gauge family as TorchServe's Prometheus client (simpleclient 0.9) does:
/// labels in their declared order with a trailing comma, values as floats
/// (`Requests2XX{Level="Host",Hostname="h",} 3.0`). Scrapers read either form; checks written
/// against TorchServe's output (its own test suite matches that line with a regex) need this one.
fn write_torchserve_style(
    family: &prometheus::proto::MetricFamily,
    order: &[&str],
    out: &mut Vec<u8>,
) {
    use prometheus::proto::MetricType;
    use std::io::Write as _;
    let kind = match family.get_field_type() {
        MetricType::COUNTER => "counter",
        MetricType::GAUGE => "gauge",
        _ => "untyped",
    };
    let name = family.name();
    let help = family.help().replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for m in family.get_metric() {
        let value = match family.get_field_type() {
            MetricType::GAUGE => m.get_gauge().get_value(),
            _ => m.get_counter().get_value(),
        };
        let _ = write!(out, "{name}{{");
        for label in order {
            if let Some(pair) = m.get_label().iter().find(|p| p.name() == *label) {
                let v = pair
                    .value()
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{label}=\"{v}\",");
            }
        }
        // Debug writes a whole float with its ".0", as Java does.
        let _ = writeln!(out, "}} {value:?}");
    }
}

/// One model version's series, with their labels resolved: a request then counts without
/// hashing label values.
#[derive(Debug, Clone)]
pub struct ModelSeries {
    /// `ts_inference_requests_total`.
    pub requests_total: IntCounter,
    /// `ts_inference_latency_microseconds`.
    pub latency_us: IntCounter,
    /// `ts_queue_latency_microseconds`.
    pub queue_latency_us: IntCounter,
    /// `tchserve_queue_seconds`.
    pub queue_seconds: Histogram,
    /// `tchserve_handler_seconds`.
    pub handler_seconds: Histogram,
    /// `tchserve_batch_size`.
    pub batch_size: Histogram,
    /// `tchserve_timeouts_total`.
    pub timeouts: IntCounter,
    /// `HandlerTime`, labelled by model name only, as TorchServe labels it.
    pub handler_time_ms: Gauge,
    /// `PredictionTime`, likewise.
    pub prediction_time_ms: Gauge,
}

/// A model version's [`ModelSeries`], made on first use. TorchServe labels the counters of a
/// request that named no version `model_version="default"`, so a version has two sets.
#[derive(Debug, Default)]
pub struct SeriesCache {
    as_default: OnceLock<ModelSeries>,
    as_named: OnceLock<ModelSeries>,
}

impl SeriesCache {
    /// The series for a request to `name` `version`, which named its version or not.
    pub fn get(&self, metrics: &MetricSet, name: &str, version: &str, named: bool) -> &ModelSeries {
        let (cell, label) = if named {
            (&self.as_named, version)
        } else {
            (&self.as_default, "default")
        };
        cell.get_or_init(|| {
            let counters = [name, label, metrics.hostname()];
            let histograms = [name, version];
            ModelSeries {
                requests_total: metrics.requests_total.with_label_values(&counters),
                latency_us: metrics.latency_us.with_label_values(&counters),
                queue_latency_us: metrics.queue_latency_us.with_label_values(&counters),
                queue_seconds: metrics.queue_seconds.with_label_values(&histograms),
                handler_seconds: metrics.handler_seconds.with_label_values(&histograms),
                batch_size: metrics.batch_size.with_label_values(&histograms),
                timeouts: metrics.timeouts.with_label_values(&histograms),
                handler_time_ms: metrics.handler_time_ms.with_label_values(&[
                    name,
                    "Model",
                    metrics.hostname(),
                ]),
                prediction_time_ms: metrics.prediction_time_ms.with_label_values(&[
                    name,
                    "Model",
                    metrics.hostname(),
                ]),
            }
        })
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Resident memory of this process in bytes (Linux), for describe output.
pub fn process_rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        // SAFETY: sysconf has no preconditions.
        .map_or(0, |pages| {
            pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64
        })
}
