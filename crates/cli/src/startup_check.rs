//! `tchserve --check`: open each archive, resolve its handler, load its module, report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use tchserve_mar::{Archive, ModelStore, serving};
use tchserve_runtime::{DevicePolicy, ModelSpec, Placement, Tried, device};
use tchserve_server::Config;
use tchserve_server::core::RegisterParams;
use tchserve_server::core::registry::Origin;
use tchserve_server::core::settings::{ServingSettings, Sources};
use tchserve_server::scratch::Scratch;

/// Checks the archives `models` names under the server's configuration `config`, extracting
/// them into `scratch`; true when all load.
pub fn run(
    scratch: &Scratch,
    config: &Config,
    model_store: Option<&Path>,
    models: &[String],
) -> anyhow::Result<bool> {
    let cuda = device::cuda(DevicePolicy::Auto);
    let dev = device::device_for_worker(cuda, None, 0);
    println!(
        "device: {dev:?}{}",
        cuda.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    let mut all_ok = true;
    for (i, (name, path)) in selected(model_store, models)?.into_iter().enumerate() {
        let started = Instant::now();
        match check_one(
            &path,
            name.as_deref(),
            config,
            &scratch.path().join(i.to_string()),
            dev,
        ) {
            Ok((model_name, version, handler, tried)) => println!(
                "ok    {} {version}  handler={handler}  {}  {} ms{}",
                name.unwrap_or(model_name),
                path.display(),
                started.elapsed().as_millis(),
                match tried {
                    Tried::Answered => String::new(),
                    Tried::Refused(why) => format!(
                        "  (loaded; the model failed on a made-up request ({why}), as a model \
                         that checks its input's values may: it is served without a warm-up, so \
                         send it a real request)"
                    ),
                    Tried::Nothing => "  (loaded; no request tried: the handler's input is a \
                                       tensor of free shape, or images fed as a list, so send \
                                       one yourself)"
                        .to_string(),
                }
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
    named: Option<&str>,
    config: &Config,
    dest: &Path,
    dev: tch::Device,
) -> anyhow::Result<(String, String, String, Tried)> {
    let archive = Archive::open(path)?;
    let name = named.map_or_else(|| archive.model_name(), str::to_owned);
    let version = archive.manifest().model.version().to_string();
    tchserve_server::core::registry::check_name_and_version(&name, &version)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut handler = serving::resolve_handler(&archive, None)?;
    let file = serving::serialized_file(&archive)?;
    let yaml = archive.model_config()?.unwrap_or_default();
    for w in &yaml.warnings {
        println!("warn  {}: {w}", path.display());
    }
    if let Some(settings) = &yaml.handler {
        let ignored = handler
            .apply_settings(settings)
            .map_err(|e| anyhow::anyhow!("model-config.yaml: {e}"))?;
        for note in ignored {
            println!("warn  {}: model-config.yaml: {note}", path.display());
        }
    }
    // The settings the server would resolve for this archive at start-up, bounds and all: a
    // package's batch range is held to them, and the warm-up runs at them.
    let models = config.model_defaults(&name, &version);
    let settings = ServingSettings::resolve(Sources {
        request: &RegisterParams {
            origin: Origin::Startup,
            ..RegisterParams::default()
        },
        yaml: &yaml,
        models: &models,
        config,
        gpus: 0,
    })
    .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let model_dir = archive.unpack(dest)?;
    let eager = archive.manifest().model.model_file.is_some();
    serving::check_torchscript(&model_dir.join(&file), eager)?;
    let spec = ModelSpec {
        name,
        version,
        model_dir,
        serialized_file: file,
        handler: handler.clone(),
        batch_size: settings.batch_size,
        max_batch_delay: settings.max_batch_delay(),
        job_queue_size: 1,
        response_timeout: Duration::from_secs(settings.response_timeout_s),
        client_timeout: None,
        use_job_ticket: false,
        placement: Placement::Cpu,
    };
    let answered = tchserve_runtime::check_model(&spec, dev)?;
    Ok((spec.name, spec.version, handler.name, answered))
}
