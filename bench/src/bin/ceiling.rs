//! The in-process ceiling: a model's forward in a plain loop, no server. The model is loaded as
//! the server loads it: a TorchScript file, or a `.pt2` package (run, like the server runs it,
//! fitted to its batch range). On a GPU each batch is uploaded from host memory and its answer
//! copied back, as a worker does, so the loop pays the same transfers as the server. The forward
//! runs on the loop's own thread, not on the forward thread a GPU model has in the server.
//!
//! One loop does its copy, upload, forward and copy back in turn. A server's workers overlap one
//! batch's host work with another's forward, so on a GPU `--loops N` runs N such loops at once
//! over the one loaded model, each with its own input, and `--resident` keeps the input on the
//! GPU (the forward alone: what no server that must upload its requests can pass).

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
    /// Loops run at once over the one loaded model, each on its own thread with its own input.
    #[arg(long, default_value_t = 1)]
    loops: usize,
    /// On a GPU, upload the input once and time the forward and the answer's copy back alone.
    #[arg(long)]
    resident: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let dev = parse_device(&args.device)?;
    let module = load_model_file(&args.model, dev)?;
    let dims: Vec<i64> = std::iter::once(args.batch)
        .chain(args.shape.iter().copied())
        .collect();
    let step = |host: &Tensor, resident: &Option<Tensor>| -> anyhow::Result<()> {
        let input = if let Some(on_gpu) = resident {
            on_gpu.shallow_clone()
        } else if dev == Device::Cpu {
            host.shallow_clone()
        } else if args.pageable {
            host.f_to_device(dev)?
        } else {
            device::upload(&device::pinned_cat(&[host])?, dev)?
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
    let run = || -> anyhow::Result<(u64, f64)> {
        // Grad mode is per thread: each loop turns autograd off for itself, as a worker does.
        let _guard = tch::no_grad_guard();
        let host = Tensor::rand(&dims, (Kind::Float, Device::Cpu));
        let resident = (args.resident && dev != Device::Cpu)
            .then(|| host.f_to_device(dev))
            .transpose()?;
        for _ in 0..5 {
            step(&host, &resident)?;
        }
        let started = Instant::now();
        let mut batches = 0u64;
        while started.elapsed().as_secs_f64() < args.duration {
            step(&host, &resident)?;
            batches += 1;
        }
        Ok((batches, started.elapsed().as_secs_f64()))
    };
    let results = std::thread::scope(|s| {
        let loops: Vec<_> = (0..args.loops.max(1)).map(|_| s.spawn(run)).collect();
        loops
            .into_iter()
            .map(|l| l.join().expect("a loop panicked"))
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let batches: u64 = results.iter().map(|r| r.0).sum();
    let secs = results.iter().map(|r| r.1).fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({"batch": args.batch, "loops": args.loops.max(1), "resident": args.resident, "batches": batches, "examples_per_s": (batches as f64 * args.batch as f64 / secs * 10.0).round() / 10.0, "ms_per_batch": secs * 1000.0 * args.loops.max(1) as f64 / batches as f64})
    );
    Ok(())
}
