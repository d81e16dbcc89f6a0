//! The in-process ceiling: a model's forward in a plain loop, no server. The model is loaded as
//! the server loads it: a TorchScript file, or a `.pt2` package (run, like the server runs it,
//! fitted to its batch range). On a GPU each batch is uploaded from host memory and its answer
//! copied back, as a worker does, so the loop pays the same transfers as the server. The forward
//! runs on the loop's own thread, not on the forward thread a GPU model has in the server.

use std::time::Instant;

use clap::Parser;
use tch::{Device, IValue, Kind, Tensor};
use tchserve_bench::{load_model_file, parse_device};
use tchserve_runtime::device;

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
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On a GPU, upload from pageable host memory instead of the pinned memory the server uses.
    #[arg(long)]
    pageable: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let dev = parse_device(&args.device)?;
    let module = load_model_file(&args.model, dev)?;
    let _guard = tch::no_grad_guard();
    let dims: Vec<i64> = std::iter::once(args.batch)
        .chain(args.shape.iter().copied())
        .collect();
    let host = Tensor::rand(&dims, (Kind::Float, Device::Cpu));
    let step = || -> anyhow::Result<()> {
        let input = if dev == Device::Cpu {
            host.shallow_clone()
        } else if args.pageable {
            host.f_to_device(dev)?
        } else {
            device::upload(&device::pinned_cat(&[&host])?, dev)?
        };
        match module.forward_on_this_thread(&[IValue::Tensor(input)])? {
            // The answer's copy to the host also waits for the GPU's queued work.
            IValue::Tensor(out) => drop(out.f_to_device(Device::Cpu)?),
            _ => {
                if let Device::Cuda(n) = dev {
                    tch::Cuda::synchronize(n as i64);
                }
            }
        }
        Ok(())
    };
    for _ in 0..5 {
        step()?;
    }
    let started = Instant::now();
    let mut batches = 0u64;
    while started.elapsed().as_secs_f64() < args.duration {
        step()?;
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"batch": args.batch, "batches": batches, "examples_per_s": (batches as f64 * args.batch as f64 / secs * 10.0).round() / 10.0, "ms_per_batch": secs * 1000.0 / batches as f64})
    );
    Ok(())
}
