//! `tchserve --check`: open each archive, resolve its handler, load its module, report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use tchserve_mar::{Archive, ModelStore, serving};
use tchserve_runtime::handler::Pipeline;
use tchserve_runtime::{DevicePolicy, device, model};
use tchserve_server::scratch::{self, Scratch};

/// Checks the archives `models` names; true when all load.
pub fn run(model_store: Option<&Path>, models: &[String]) -> anyhow::Result<bool> {
    let cuda = device::cuda(DevicePolicy::Auto);
    let dev = device::device_for_worker(cuda, None, 0);
    println!(
        "device: {dev:?}{}",
        cuda.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let scratch = Scratch::create(scratch::CHECK);
    let mut all_ok = true;
    for (i, (name, path)) in selected(model_store, models)?.into_iter().enumerate() {
        let started = Instant::now();
        match check_one(&path, &scratch.path().join(i.to_string()), dev) {
            Ok((model_name, version, handler)) => println!(
                "ok    {} {version}  handler={handler}  {}  {} ms",
                name.unwrap_or(model_name),
                path.display(),
                started.elapsed().as_millis()
            ),
            Err(e) => {
                all_ok = false;
                println!("FAIL  {}: {}", path.display(), crate::describe(&e));
            }
        }
    }
    Ok(all_ok)
}

/// Archives named by `--models`, as (name given, path).
fn selected(
    model_store: Option<&Path>,
    models: &[String],
) -> anyhow::Result<Vec<(Option<String>, PathBuf)>> {
    let store = model_store.map(ModelStore::open).transpose()?;
    let mut out = Vec::new();
    for item in models
        .iter()
        .flat_map(|m| tchserve_server::config::split_list(m))
    {
        for r in ModelStore::expand(store.as_ref(), &item)? {
            let path = match &store {
                Some(store) => store.resolve(&r.url)?,
                None if Path::new(&r.url).exists() => PathBuf::from(&r.url),
                None => bail!("Model not found at: {} (and no --model-store given)", r.url),
            };
            out.push((r.name, path));
        }
    }
    if out.is_empty() {
        bail!("no models selected: give --models all or --models name=archive.mar");
    }
    Ok(out)
}

fn check_one(
    path: &Path,
    dest: &Path,
    dev: tch::Device,
) -> anyhow::Result<(String, String, String)> {
    let archive = Archive::open(path)?;
    let handler = serving::resolve_handler(&archive, None)?;
    let file = serving::serialized_file(&archive)?;
    if let Some(cfg) = archive.model_config()? {
        for w in cfg.warnings {
            println!("warn  {}: {w}", path.display());
        }
    }
    let dir = archive.unpack(dest)?;
    Pipeline::new(&handler, &dir)?;
    model::load_module(&dir, &file, dev)?;
    Ok((
        archive.model_name(),
        archive.manifest().model.version().to_string(),
        handler.name,
    ))
}
