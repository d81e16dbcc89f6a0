//! What a worker thread spends per request, in process, without HTTP: a request body decoded
//! by the handler, then batches run through the model and answered, as a worker does. Its
//! figures move less than a server's on a shared machine, so two builds' worker paths can be
//! compared with it; `bench/per_request.sh` measures the whole server. On a GPU
//! (`--device cuda`) the batch time holds what a GPU worker adds: the copy into pinned memory,
//! the upload, and the wait for the answer.

use std::time::{Duration, Instant};

use clap::Parser;
use tchserve_bench::{load_model_file, parse_device};
use tchserve_mar::handler::HandlerManifest;
use tchserve_runtime::handler::Pipeline;
use tchserve_runtime::job::{Part, Payload};

#[derive(Debug, Parser)]
struct Args {
    /// The TorchScript file or `.pt2` package.
    #[arg(long)]
    model: std::path::PathBuf,
    /// The handler manifest.
    #[arg(long)]
    handler: std::path::PathBuf,
    /// One request's body.
    #[arg(long)]
    body: std::path::PathBuf,
    /// The body's content type.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Requests per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seconds measured, after one second of warm-up.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Run this many measured batches (after ten unmeasured ones) instead of for `duration`:
    /// a fixed amount of work, for counting instructions (`valgrind --tool=callgrind`).
    #[arg(long)]
    batches: Option<u64>,
    /// Intra-op threads: a worker in the server has the cores shared among the busy workers, one
    /// for a model whose forward takes under a millisecond on the CPU.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let manifest = HandlerManifest::parse(
        &args.handler.display().to_string(),
        &std::fs::read(&args.handler)?,
    )?;
    let device = parse_device(&args.device)?;
    let module = load_model_file(&args.model, device)?;
    let mut pipeline = Pipeline::new(
        &manifest,
        args.model.parent().unwrap_or(std::path::Path::new(".")),
    )?;
    // As a worker sets it up: an image handler's last steps run on the GPU.
    pipeline.finish_images_on(device);
    let payload = Payload {
        parts: vec![Part {
            name: "body".into(),
            content_type: Some(args.content_type.clone()),
            data: std::fs::read(&args.body)?.into(),
            shape: None,
        }],
        ..Payload::default()
    };
    let (mut decoding, mut running, mut requests) = (Duration::ZERO, Duration::ZERO, 0u64);
    let mut step = |measure: bool| -> anyhow::Result<()> {
        let t0 = Instant::now();
        let decoded = (0..args.batch)
            .map(|_| pipeline.decode(&payload))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("decoding: {e:?}"))?;
        let t1 = Instant::now();
        let inputs: Vec<_> = decoded.iter().collect();
        let answers = pipeline
            .run_batch(&module, device, &inputs)
            .map_err(|e| anyhow::anyhow!("running: {e:?}"))?;
        std::hint::black_box(answers);
        if measure {
            decoding += t1 - t0;
            running += t1.elapsed();
            requests += args.batch as u64;
        }
        Ok(())
    };
    if let Some(batches) = args.batches {
        for _ in 0..10 {
            step(false)?;
        }
        for _ in 0..batches {
            step(true)?;
        }
    } else {
        let warm = Instant::now();
        while warm.elapsed() < Duration::from_secs(1) {
            step(false)?;
        }
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < args.duration {
            step(true)?;
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e6 / requests as f64;
    println!(
        "{{\"requests\": {requests}, \"batch\": {}, \"decode_us\": {:.2}, \"batch_us\": {:.2}, \"total_us\": {:.2}}}",
        args.batch,
        per(decoding),
        per(running),
        per(decoding + running)
    );
    Ok(())
}
