//! `tchserve`: the model server's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use tchserve_mar::{Archive, ModelStore};
use tchserve_runtime::{DevicePolicy, device, model};

/// Serves TorchScript models from TorchServe-style model archives.
#[derive(Debug, Parser)]
#[command(name = "tchserve", version)]
struct Args {
    /// Open every selected archive, resolve its handler and load its TorchScript module,
    /// then report and exit (non-zero when any fails).
    #[arg(long)]
    check: bool,

    /// Folder holding the model archives.
    #[arg(long, value_name = "MODEL_STORE")]
    model_store: Option<PathBuf>,

    /// Models to use: `all`, or archives as `name=file` or `file`, relative to the model store
    /// or absolute; separated by spaces or commas.
    #[arg(long, value_name = "MODEL_PATH", num_args = 1..)]
    models: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.check {
        eprintln!("tchserve: nothing to do; try --check (see --help)");
        return ExitCode::from(2);
    }
    match check(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Archives named by `--models`, as (name given, path).
fn selected(args: &Args) -> anyhow::Result<Vec<(Option<String>, PathBuf)>> {
    let store = args
        .model_store
        .as_ref()
        .map(ModelStore::open)
        .transpose()?;
    let mut out = Vec::new();
    for item in args
        .models
        .iter()
        .flat_map(|m| m.split(','))
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        if item.eq_ignore_ascii_case("all") {
            let store = store.as_ref().context("--models all needs --model-store")?;
            out.extend(store.all()?.into_iter().map(|p| (None, p)));
            continue;
        }
        let (name, url) = match item.split_once('=') {
            Some((n, u)) => (Some(n.to_string()), u),
            None => (None, item),
        };
        let path = match &store {
            Some(store) => store.resolve(url)?,
            None if Path::new(url).exists() => PathBuf::from(url),
            None => bail!("Model not found at: {url} (and no --model-store given)"),
        };
        out.push((name, path));
    }
    if out.is_empty() {
        bail!("no models selected: give --models all or --models name=archive.mar");
    }
    Ok(out)
}

fn check(args: &Args) -> anyhow::Result<bool> {
    let cuda = device::cuda(DevicePolicy::Auto);
    let dev = device::device_for_worker(cuda, None, 0);
    println!(
        "device: {dev:?}{}",
        cuda.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let scratch = std::env::temp_dir().join(format!("tchserve-check-{}", std::process::id()));
    let mut all_ok = true;
    for (name, path) in selected(args)? {
        let started = Instant::now();
        match check_one(&path, &scratch, dev) {
            Ok((model_name, version, handler)) => println!(
                "ok    {} {version}  handler={handler}  {}  {} ms",
                name.unwrap_or(model_name),
                path.display(),
                started.elapsed().as_millis()
            ),
            Err(e) => {
                all_ok = false;
                println!("FAIL  {}: {e:#}", path.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(all_ok)
}

fn check_one(
    path: &Path,
    scratch: &Path,
    dev: tch::Device,
) -> anyhow::Result<(String, String, String)> {
    let archive = Archive::open(path)?;
    let handler = model::resolve_handler(&archive, None)?;
    let file = model::serialized_file(&archive)?;
    if let Some(cfg) = archive.model_config()? {
        for w in cfg.warnings {
            println!("warn  {}: {w}", path.display());
        }
    }
    let dest = scratch.join(uuid_like(path));
    let dir = archive.unpack(&dest)?;
    model::load_module(&dir, &file, dev)?;
    Ok((
        archive.model_name(),
        archive.manifest().model.version().to_string(),
        handler.name,
    ))
}

/// A scratch folder name unique per archive within one run.
fn uuid_like(path: &Path) -> String {
    path.to_string_lossy().replace(['/', '.'], "_")
}
