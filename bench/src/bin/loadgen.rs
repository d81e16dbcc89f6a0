//! A closed-loop HTTP/1.1 and gRPC load generator for loopback benchmarks.
//!
//! Each of `--concurrency` keep-alive connections sends the same request, waits for the whole
//! response, and sends again, for `--duration` seconds after a warm-up. Prints throughput and
//! latency percentiles as one JSON line. With `--grpc MODEL`, each connection is an HTTP/2
//! channel of its own calling the v2 protocol's `ModelInfer` with the body as its raw input.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use tchserve_bench::http::{check_loopback, post, read_response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Parser)]
struct Args {
    /// Target, host:port (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Request path.
    #[arg(long, default_value = "")]
    path: String,
    /// File whose bytes are the request body.
    #[arg(long)]
    body: std::path::PathBuf,
    /// Content type of the body.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Connections, each with one request in flight.
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Seconds measured.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    duration: f64,
    /// Seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Extra request headers, `Name: value`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Call the v2 gRPC `ModelInfer` of this model instead of POSTing to `--path`.
    #[arg(long)]
    grpc: Option<String>,
    /// With `--grpc`: the input's shape, comma-separated.
    #[arg(long, default_value = "1")]
    shape: String,
    /// With `--grpc`: the input's datatype.
    #[arg(long, default_value = "FP32")]
    datatype: String,
}

/// The v2 protocol's gRPC client.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
mod pb {
    tonic::include_proto!("inference");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check_loopback(&args.addr)?;
    let body = std::fs::read(&args.body).with_context(|| args.body.display().to_string())?;
    let extra: String = args.headers.iter().map(|h| format!("{h}\r\n")).collect();
    let request = post(&args.path, &args.content_type, &extra, &body);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let (latencies, errors) = match &args.grpc {
        Some(model) => rt.block_on(run_grpc(&args, model, body))?,
        None => rt.block_on(run(&args, request))?,
    };
    let mut l = latencies;
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let report = serde_json::json!({
        "concurrency": args.concurrency,
        "requests": l.len(),
        "errors": errors,
        "rps": (l.len() as f64 / args.duration).round(),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": l.last().copied().unwrap_or(0) as f64 / 1000.0,
    });
    println!("{report}");
    Ok(())
}

/// The measured stretch of time, after the warm-up.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn after_warmup(args: &Args) -> Self {
        let start = Instant::now() + Duration::from_secs_f64(args.warmup);
        Window {
            start,
            end: start + Duration::from_secs_f64(args.duration),
        }
    }
}

/// One connection's latencies (microseconds) and errors, of requests sent and answered inside
/// the window.
#[derive(Debug, Default)]
struct Tally {
    latencies: Vec<u32>,
    errors: u64,
}

impl Tally {
    fn record(&mut self, w: Window, sent: Instant, ok: bool) {
        let done = Instant::now();
        if sent >= w.start && done <= w.end {
            if ok {
                self.latencies
                    .push(done.duration_since(sent).as_micros() as u32);
            } else {
                self.errors += 1;
            }
        }
    }
}

/// Every connection's tally, merged.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Tally>>>,
) -> anyhow::Result<(Vec<u32>, u64)> {
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let tally = t.await??;
        all.extend(tally.latencies);
        errors += tally.errors;
    }
    Ok((all, errors))
}

async fn run(args: &Args, request: Vec<u8>) -> anyhow::Result<(Vec<u32>, u64)> {
    let window = Window::after_warmup(args);
    let request = std::sync::Arc::new(request);
    let tasks = (0..args.concurrency)
        .map(|_| {
            let addr = args.addr.clone();
            let request = std::sync::Arc::clone(&request);
            tokio::spawn(async move { connection(&addr, &request, window).await })
        })
        .collect();
    gather(tasks).await
}

async fn run_grpc(args: &Args, model: &str, raw: Vec<u8>) -> anyhow::Result<(Vec<u32>, u64)> {
    let shape = args
        .shape
        .split(',')
        .map(|d| d.trim().parse::<i64>())
        .collect::<Result<Vec<_>, _>>()
        .context("--shape")?;
    let request = pb::ModelInferRequest {
        model_name: model.to_string(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input0".into(),
            datatype: args.datatype.clone(),
            shape,
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    let window = Window::after_warmup(args);
    let tasks = (0..args.concurrency)
        .map(|_| {
            let url = format!("http://{}", args.addr);
            let request = request.clone();
            tokio::spawn(async move {
                let channel = tonic::transport::Endpoint::from_shared(url)?
                    .tcp_nodelay(true)
                    .http2_adaptive_window(true)
                    .connect()
                    .await?;
                let mut client =
                    pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(channel)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX);
                let mut tally = Tally::default();
                while Instant::now() < window.end {
                    let sent = Instant::now();
                    let ok = client.model_infer(request.clone()).await.is_ok();
                    tally.record(window, sent, ok);
                }
                anyhow::Ok(tally)
            })
        })
        .collect();
    gather(tasks).await
}

/// One HTTP/1.1 keep-alive connection's loop.
async fn connection(addr: &str, request: &[u8], window: Window) -> anyhow::Result<Tally> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut tally = Tally::default();
    let mut buf = vec![0u8; 1 << 16];
    while Instant::now() < window.end {
        let sent = Instant::now();
        stream.write_all(request).await?;
        let status = read_response(&mut stream, &mut buf).await?;
        tally.record(window, sent, status == 200);
    }
    Ok(tally)
}
