//! What copying a batch's requests into one tensor costs, libtorch's `cat` against the plain
//! copy the workers use (`device::cat_batch`), both into ordinary memory, and the plain copy
//! into pinned memory as a GPU worker makes it (where CUDA is present), with optional busy
//! threads in the process standing in for the HTTP threads of a loaded server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use clap::Parser;
use tch::{Device, Kind, Tensor};
use tchserve_runtime::device::{cat_batch, pinned_cat};

#[derive(Debug, Parser)]
struct Args {
    /// Requests per batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Shape of one request's tensor, comma-separated (float32).
    #[arg(long, value_delimiter = ',', default_value = "1,3,224,224")]
    shape: Vec<i64>,
    /// Intra-op threads of the copying thread.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Threads that spin meanwhile, keeping cores busy.
    #[arg(long, default_value_t = 0)]
    busy: usize,
    /// Batches per measurement.
    #[arg(long, default_value_t = 100)]
    batches: u32,
    /// Measurements of each, alternated.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let parts: Vec<Tensor> = (0..args.batch)
        .map(|_| Tensor::rand(&args.shape, (Kind::Float, Device::Cpu)))
        .collect();
    let refs: Vec<&Tensor> = parts.iter().collect();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| -> anyhow::Result<()> {
        for _ in 0..args.busy {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        let ms_per_batch = |f: &dyn Fn() -> anyhow::Result<Tensor>| -> anyhow::Result<f64> {
            let t = Instant::now();
            for _ in 0..args.batches {
                drop(std::hint::black_box(f()?));
            }
            Ok(t.elapsed().as_secs_f64() * 1e3 / f64::from(args.batches))
        };
        // One unmeasured pass each, for the allocators.
        let cat = || Ok(Tensor::f_cat(&refs, 0)?);
        let plain = || Ok(cat_batch(&refs, false)?);
        let pinned = || Ok(pinned_cat(&refs)?);
        for f in [&cat as &dyn Fn() -> _, &plain, &pinned] {
            ms_per_batch(f)?;
        }
        for _ in 0..args.rounds {
            let (cat, plain, pinned) = (
                ms_per_batch(&cat)?,
                ms_per_batch(&plain)?,
                ms_per_batch(&pinned)?,
            );
            println!(
                "{{\"batch\": {}, \"threads\": {}, \"busy\": {}, \"cat_ms\": {cat:.3}, \"plain_ms\": {plain:.3}, \"plain_pinned_ms\": {pinned:.3}}}",
                args.batch, args.threads, args.busy
            );
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })
}
