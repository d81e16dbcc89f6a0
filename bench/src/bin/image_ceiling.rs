//! The in-process ceiling of the image_classifier handler: decode, preprocess and forward in a
//! plain loop at a batch size, no server. With `--preprocess-only`, the time to decode and
//! preprocess one image on one core.

use std::time::Instant;

use clap::Parser;
use tch::{CModule, Device, IValue, Tensor};
use tchserve_mar::handler::{self, Input};
use tchserve_runtime::handler::{decode_image, preprocess_image};
use tchserve_runtime::job::{Part, Payload};

#[derive(Debug, Parser)]
struct Args {
    /// The TorchScript file (not needed with --preprocess-only).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// An encoded image.
    #[arg(long)]
    image: std::path::PathBuf,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Only decode and preprocess, on one thread.
    #[arg(long)]
    preprocess_only: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let manifest = handler::builtin("image_classifier")
        .ok_or_else(|| anyhow::anyhow!("no built-in image_classifier"))?;
    let Input::Image { max_pixels, mode } = manifest.input else {
        anyhow::bail!("image_classifier does not take images");
    };
    let payload = Payload {
        parts: vec![Part {
            name: "body".into(),
            content_type: Some("image/jpeg".into()),
            data: std::fs::read(&args.image)?.into(),
            shape: None,
        }],
        ..Payload::default()
    };
    let prepare = || -> anyhow::Result<Tensor> {
        let img = decode_image(&payload, max_pixels).map_err(|e| anyhow::anyhow!("{e}"))?;
        preprocess_image(img, &manifest.preprocess, max_pixels, false, mode)
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    if args.preprocess_only {
        tch::set_num_threads(1);
        for _ in 0..5 {
            let _ = prepare()?;
        }
        let started = Instant::now();
        let mut n = 0u64;
        while started.elapsed().as_secs_f64() < args.duration {
            let _ = prepare()?;
            n += 1;
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0 / n as f64;
        println!(
            "{}",
            serde_json::json!({"images": n, "ms_per_image": (ms * 1000.0).round() / 1000.0})
        );
        return Ok(());
    }
    let model = args
        .model
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--model is required"))?;
    let mut module = CModule::load_on_device(model, Device::Cpu)?;
    module.set_eval();
    let _guard = tch::no_grad_guard();
    let run_batch = || -> anyhow::Result<()> {
        let inputs = (0..args.batch)
            .map(|_| prepare())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = Tensor::cat(&inputs, 0);
        let out = module.forward_is(&[IValue::Tensor(batch)])?;
        if let IValue::Tensor(t) = out {
            let _ = t.softmax(1, tch::Kind::Float).topk(5, 1, true, true);
        }
        Ok(())
    };
    for _ in 0..3 {
        run_batch()?;
    }
    let started = Instant::now();
    let mut batches = 0u64;
    while started.elapsed().as_secs_f64() < args.duration {
        run_batch()?;
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"batch": args.batch, "batches": batches, "images_per_s": (batches as f64 * args.batch as f64 / secs * 10.0).round() / 10.0})
    );
    Ok(())
}
