//! The in-process ceiling: a model's forward in a plain loop, no server. The model is loaded as
//! the server loads it: a TorchScript file, or a `.pt2` package (run, like the server runs it,
//! fitted to its batch range).

use std::time::Instant;

use clap::Parser;
use tch::{Device, IValue, Kind, Tensor};
use tchserve_runtime::model::load_module;

#[derive(Debug, Parser)]
struct Args {
    /// The TorchScript file or `.pt2` package.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Shape of one example, comma-separated.
    #[arg(long, value_delimiter = ',')]
    shape: Vec<i64>,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Intra-op threads (default: all cores).
    #[arg(long)]
    threads: Option<i32>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let dir = args.model.parent().unwrap_or(std::path::Path::new("."));
    let file = args
        .model
        .file_name()
        .and_then(|f| f.to_str())
        .ok_or_else(|| anyhow::anyhow!("--model names no file"))?;
    let module = load_module(dir, file, Device::Cpu)?;
    let _guard = tch::no_grad_guard();
    let dims: Vec<i64> = std::iter::once(args.batch)
        .chain(args.shape.iter().copied())
        .collect();
    let input = [IValue::Tensor(Tensor::rand(
        &dims,
        (Kind::Float, Device::Cpu),
    ))];
    for _ in 0..5 {
        let _ = module.forward_is(&input)?;
    }
    let started = Instant::now();
    let mut batches = 0u64;
    while started.elapsed().as_secs_f64() < args.duration {
        let _ = module.forward_is(&input)?;
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"batch": args.batch, "batches": batches, "examples_per_s": (batches as f64 * args.batch as f64 / secs * 10.0).round() / 10.0, "ms_per_batch": secs * 1000.0 / batches as f64})
    );
    Ok(())
}
