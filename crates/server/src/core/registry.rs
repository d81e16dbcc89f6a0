//! The model registry: names -> versions -> worker pools, with a default version per model.
//!
//! A model version becomes visible to requests only once its pool exists (and, for a synchronous
//! registration, once its workers are up), so no request ever meets a half-registered model.
//! Registering, scaling and unregistering one model never touches another's pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tchserve_backend::{Backend, ModelSpec, WorkerState, Workers};
use tchserve_mar::{Archive, HandlerManifest, ModelStore, RuntimeType, serving};

use super::error::ApiError;
use super::fetch::{self, Fetched, Fetcher};
use super::settings::{ServingSettings, Sources};
use crate::config::Config;

/// One registered model version.
#[derive(Debug)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// The url it was registered from, as given (describe's `modelUrl`).
    pub url: String,
    /// The archive's name in the model store, which a snapshot keeps so that it still names
    /// the archive once the store is mounted elsewhere; the url for an archive outside a store.
    pub mar_name: String,
    /// Manifest runtime.
    pub runtime: RuntimeType,
    /// Handler name: the registration's override, else the archive's.
    pub handler: String,
    /// The handler the registration named in place of the archive's, kept for snapshots.
    pub handler_override: Option<String>,
    /// The resolved handler manifest (inputs and outputs for metadata).
    pub manifest: HandlerManifest,
    /// Largest batch.
    pub batch_size: usize,
    /// Batch delay in ms.
    pub max_batch_delay_ms: u64,
    /// Response timeout in s.
    pub response_timeout_s: u64,
    /// Startup timeout in s.
    pub startup_timeout_s: u64,
    /// Job queue capacity.
    pub job_queue_size: usize,
    /// `clientTimeoutInMills`: the longest a request may be queued, in ms; 0 for no limit.
    pub client_timeout_ms: u64,
    /// `useJobTicket`: a request is refused unless a worker is free to take it at once.
    pub use_job_ticket: bool,
    /// Whether it was loaded at start-up.
    pub loaded_at_startup: bool,
    /// `cpu` or `gpu`.
    pub device_type: &'static str,
    /// Configured (min, max) workers.
    pub workers: Mutex<(usize, usize)>,
    /// The queue and workers.
    pub pool: Arc<dyn Workers>,
    /// When registered.
    pub registered: SystemTime,
    /// Its metric series, resolved once.
    pub series: crate::metrics::SeriesCache,
    scratch: Option<PathBuf>,
}

impl Drop for ModelVersion {
    fn drop(&mut self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl ModelVersion {
    /// Configured (min, max) workers.
    pub fn min_max(&self) -> (usize, usize) {
        *self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// All versions of one model.
#[derive(Debug, Clone, Default)]
pub struct ModelEntry {
    /// Versions by name.
    pub versions: BTreeMap<String, Arc<ModelVersion>>,
    /// The default version.
    pub default: String,
}

/// Registration parameters (the management API's, or a start-up model's).
#[derive(Debug, Clone, Default)]
pub struct RegisterParams {
    /// Archive name in the model store, or a local path.
    pub url: String,
    /// Overrides the manifest's model name.
    pub model_name: Option<String>,
    /// Overrides the manifest's handler.
    pub handler: Option<String>,
    /// Overrides the manifest's runtime.
    pub runtime: Option<String>,
    /// `batch_size`.
    pub batch_size: Option<i64>,
    /// `max_batch_delay`, ms.
    pub max_batch_delay: Option<i64>,
    /// `initial_workers`.
    pub initial_workers: Option<i64>,
    /// `max_workers` (from snapshots).
    pub max_workers: Option<i64>,
    /// `response_timeout`, s.
    pub response_timeout: Option<i64>,
    /// `startup_timeout`, s.
    pub startup_timeout: Option<i64>,
    /// Wait for the workers before answering.
    pub synchronous: bool,
    /// Who asks for the registration.
    pub origin: Origin,
    /// Make this the default version even if others exist (snapshot restore).
    pub make_default: bool,
}

/// Who registers a model, which decides where its settings come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// The management API (REST or gRPC).
    #[default]
    Api,
    /// The server itself: `--models`, `load_models`, or the model store's poller. Worker counts
    /// not given come from the `models` key or the start-up defaults, and a path outside a
    /// model store may be named.
    Startup,
    /// A snapshot (the last one, or `model_snapshot`): its settings are the ones that were in
    /// force, so they beat the archive's `model-config.yaml`; and what was registered stays
    /// registered even if its workers fail to start, retrying, rather than keeping the server
    /// from starting.
    Snapshot,
}

/// What a registration did.
#[derive(Debug)]
pub struct Registered {
    /// The new version.
    pub model: Arc<ModelVersion>,
    /// Workers asked for.
    pub workers: usize,
}

/// Outcome of a synchronous scale.
#[derive(Debug, PartialEq, Eq)]
pub enum ScaleOutcome {
    /// Every worker asked for is ready.
    Done,
    /// Some are still starting.
    InProgress,
    /// Some failed to start; the text is a failed worker's reason, led by `": "`.
    Failed(String),
}

/// The longest model name or version taken: a file name's limit, and far under the 64 KiB a
/// request's head may take, so that every route can name the model.
pub const MAX_NAME_LEN: usize = 255;

/// Refuses a model name or version that registration does not take. Names and versions reach
/// URLs, file names and log lines: they are kept to plain characters, and short enough for a
/// request line to name them.
pub fn check_name_and_version(name: &str, version: &str) -> Result<(), ApiError> {
    if !tchserve_mar::manifest::is_valid_model_name(name) {
        return Err(ApiError::bad_request(format!(
            "Invalid model name {:?}: a model name has letters, digits, '_', '-' and '.' only, \
             and starts with a letter or digit",
            short(name)
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "Invalid model name {:?}: a model name has at most {MAX_NAME_LEN} characters ({} \
             here)",
            short(name),
            name.len()
        )));
    }
    if version.is_empty()
        || version.len() > MAX_NAME_LEN
        || version.chars().any(|c| c.is_control() || c == '/')
    {
        return Err(ApiError::invalid_model(format!(
            "Invalid model version {:?}: a version must not be empty, longer than \
             {MAX_NAME_LEN} bytes, or hold '/' or control characters",
            short(version)
        )));
    }
    Ok(())
}

/// At most 64 characters of `s`, for messages about names too long to repeat whole.
fn short(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    models: RwLock<BTreeMap<String, ModelEntry>>,
    store: Option<ModelStore>,
    scratch_root: PathBuf,
    backend: Arc<dyn Backend>,
    config: Arc<Config>,
    /// Downloads archives registered by URL into the store; `Err` says why it cannot.
    fetcher: Result<Fetcher, String>,
    /// Versions whose registration waits for their workers to start, not yet listed in
    /// `models`: what a hung start is waiting on.
    starting: Mutex<Vec<Starting>>,
}

/// A version whose registration waits for its workers, as [`Registry::starting`] lists it.
#[derive(Debug, Clone)]
pub struct Starting {
    /// The model's name.
    pub name: String,
    /// The version.
    pub version: String,
    /// Its workers.
    pub pool: Arc<dyn Workers>,
}

/// Lists a version in [`Registry::starting`] for as long as it lives.
struct Listed<'a>(&'a Registry, Arc<dyn Workers>);

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        lock(&self.0.starting).retain(|s| !Arc::ptr_eq(&s.pool, &self.1));
    }
}

impl Registry {
    /// An empty registry whose models `backend` serves.
    pub fn new(
        config: Arc<Config>,
        store: Option<ModelStore>,
        scratch_root: PathBuf,
        backend: Arc<dyn Backend>,
    ) -> Self {
        let fetcher = match &store {
            Some(store) => Fetcher::new(
                store.root().to_path_buf(),
                &config.allowed_urls,
                config.max_archive_size,
                config.archive_download_timeout,
            ),
            None => Err("Model store has not been configured.".into()),
        };
        Registry {
            models: RwLock::default(),
            store,
            scratch_root,
            backend,
            config,
            fetcher,
            starting: Mutex::default(),
        }
    }

    /// Versions whose registration waits for their workers to start.
    pub fn starting(&self) -> Vec<Starting> {
        lock(&self.starting).clone()
    }

    /// Worker threads out of their version and still inside a batch (see
    /// [`tchserve_backend::Backend::lingering`]).
    pub fn lingering(&self) -> Vec<tchserve_backend::Lingering> {
        self.backend.lingering()
    }

    /// Downloads a remote archive into the model store (see [`super::fetch`]).
    pub async fn fetch_archive(&self, url: &str) -> Result<Fetched, ApiError> {
        match &self.fetcher {
            Ok(f) => Ok(f.fetch(url).await?),
            Err(why) => Err(ApiError::bad_request(format!(
                "Failed to download archive from: {url}: {why}"
            ))),
        }
    }

    /// Removes an archive [`Registry::fetch_archive`] just downloaded.
    pub fn discard_download(&self, name: &str) {
        if let Ok(f) = &self.fetcher {
            f.discard(name);
        }
    }

    /// Removes the archive `removed` was registered from when it was downloaded and no version
    /// still registered uses it, as TorchServe deletes a download on unregister: the same URL
    /// registered later is fetched again, so a new archive published there is the one served.
    pub fn forget_download(&self, removed: &ModelVersion) {
        let Ok(fetcher) = &self.fetcher else {
            return;
        };
        let in_use = self
            .read()
            .values()
            .any(|e| e.versions.values().any(|m| m.mar_name == removed.mar_name));
        if !in_use && fetcher.downloaded(&removed.mar_name) {
            fetcher.discard(&removed.mar_name);
            tracing::info!(file = %removed.mar_name, "downloaded archive removed from the model store");
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The registered models' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// A version of a model, or its default version.
    pub fn get(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelVersion>, ApiError> {
        let models = self.read();
        let entry = models
            .get(name)
            .ok_or_else(|| ApiError::model_not_found(format!("Model not found: {name}")))?;
        let v = version.unwrap_or(&entry.default);
        entry.versions.get(v).cloned().ok_or_else(|| {
            ApiError::version_not_found(format!(
                "Model version: {v} does not exist for model: {name}"
            ))
        })
    }

    /// Every model, copied out of the lock.
    pub fn snapshot_entries(&self) -> BTreeMap<String, ModelEntry> {
        self.read().clone()
    }

    /// Versions to describe: one, the default, or `all`.
    pub fn describe(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Vec<Arc<ModelVersion>>, ApiError> {
        if version == Some("all") {
            let models = self.read();
            let entry = models
                .get(name)
                .ok_or_else(|| ApiError::model_not_found(format!("Model not found: {name}")))?;
            return Ok(entry.versions.values().cloned().collect());
        }
        Ok(vec![self.get(name, version)?])
    }

    /// Registers a model version. Blocking: loads the archive and, if synchronous, waits for
    /// the workers; call it off the async threads.
    pub fn register(&self, p: &RegisterParams) -> Result<Registered, ApiError> {
        // A client learns the archive's name in the store, not where the store is on the host.
        let store_root = self
            .store
            .as_ref()
            .map(|s| format!("{}/", s.root().display()));
        let invalid = |m: String| {
            ApiError::invalid_model(match &store_root {
                Some(root) => m.replace(root.as_str(), ""),
                None => m,
            })
        };
        let path = self.resolve_url(&p.url, p.origin != Origin::Api)?;
        let archive = Archive::open(&path).map_err(|e| invalid(e.to_string()))?;
        let runtime = match p.runtime.as_deref() {
            Some(r) => RuntimeType::parse(r)
                .ok_or_else(|| ApiError::bad_request(format!("Invalid RuntimeType value: {r}")))?,
            None => archive.manifest().runtime,
        };
        let name = p
            .model_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| archive.model_name());
        let version = archive.manifest().model.version().to_string();
        check_name_and_version(&name, &version)?;
        self.check_free(&name, &version)?;
        // One refused registration's load at a time: a client retrying with a startup_timeout
        // shorter than the load would otherwise start a load in the background at each try.
        let key = format!("{name}:{version}");
        if self
            .backend
            .lingering()
            .iter()
            .any(|l| l.version == key && l.busy.is_none())
        {
            return Err(ApiError::unavailable(format!(
                "Model {name} version {version} is still loading for a registration that was \
                 refused (its startup_timeout passed); try again once that load ends"
            )));
        }

        let mut handler = serving::resolve_handler(&archive, p.handler.as_deref())
            .map_err(|e| invalid(e.to_string()))?;
        let serialized = serving::serialized_file(&archive).map_err(|e| invalid(e.to_string()))?;
        let yaml = archive
            .model_config()
            .map_err(|e| invalid(e.to_string()))?
            .unwrap_or_default();
        for w in &yaml.warnings {
            tracing::warn!(model = %name, "model-config.yaml: {w}");
        }
        if let Some(settings) = &yaml.handler {
            let ignored = handler
                .apply_settings(settings)
                .map_err(|e| invalid(format!("model-config.yaml: {e}")))?;
            for note in ignored {
                tracing::warn!(model = %name, "model-config.yaml: {note}");
            }
        }
        let models = self.config.model_defaults(&name, &version);
        let settings = ServingSettings::resolve(Sources {
            request: p,
            yaml: &yaml,
            models: &models,
            config: &self.config,
            gpus: self.backend.gpu_count(),
        })?;

        // TorchServe's `clientTimeoutInMills`: a positive value limits the time in the queue.
        let client_timeout_ms = yaml
            .client_timeout_ms
            .filter(|ms| *ms > 0)
            .map_or(0, |ms| ms as u64);
        let use_job_ticket = yaml.use_job_ticket.unwrap_or(false);

        let scratch = self.scratch_root.join(uuid::Uuid::new_v4().to_string());
        let model_dir = archive
            .unpack(&scratch)
            .map_err(|e| invalid(e.to_string()))?;
        let owned_scratch = (model_dir == scratch).then_some(scratch);
        // What can be told from the files alone is refused before any worker loads them, so
        // that an asynchronous registration is refused too rather than left failing. What a
        // snapshot restores stays registered instead, its workers retrying (see `Origin`).
        let eager = archive.manifest().model.model_file.is_some();
        let model_file = model_dir.join(&serialized);
        let refused = (p.origin != Origin::Snapshot)
            .then(|| {
                serving::check_torchscript(&model_file, eager)
                    .map_err(|e| e.to_string())
                    .err()
                    .or_else(|| {
                        tchserve_mar::package::refuses_batch_size(&model_file, settings.batch_size)
                    })
            })
            .flatten();
        if let Some(why) = refused {
            if let Some(dir) = &owned_scratch {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(invalid(why));
        }
        let loaded = self.backend.load(ModelSpec {
            name: name.clone(),
            version: version.clone(),
            model_dir,
            serialized_file: serialized,
            handler: handler.clone(),
            batch_size: settings.batch_size,
            max_batch_delay: settings.max_batch_delay(),
            job_queue_size: settings.job_queue_size,
            response_timeout: Duration::from_secs(settings.response_timeout_s),
            placement: settings.placement.clone(),
            client_timeout: (client_timeout_ms > 0)
                .then(|| Duration::from_millis(client_timeout_ms)),
            use_job_ticket,
        });
        let pool = match loaded {
            Ok(pool) => pool,
            Err(e) => {
                if let Some(d) = &owned_scratch {
                    let _ = std::fs::remove_dir_all(d);
                }
                return Err(invalid(e.to_string()));
            }
        };
        let (min_workers, max_workers) = (settings.min_workers, settings.max_workers);
        let startup_timeout_s = settings.startup_timeout_s;
        let mv = Arc::new(ModelVersion {
            name: name.clone(),
            version: version.clone(),
            url: p.url.clone(),
            mar_name: self
                .store
                .as_ref()
                .and_then(|s| s.entry_name(&p.url))
                .unwrap_or_else(|| p.url.clone()),
            runtime,
            handler: p
                .handler
                .clone()
                .or(archive.manifest().model.handler.clone())
                .unwrap_or_default(),
            handler_override: p.handler.clone(),
            manifest: handler,
            batch_size: settings.batch_size,
            max_batch_delay_ms: settings.max_batch_delay_ms,
            response_timeout_s: settings.response_timeout_s,
            startup_timeout_s,
            job_queue_size: settings.job_queue_size,
            client_timeout_ms,
            use_job_ticket,
            // As TorchServe, which counts a model restored from a snapshot as registered by
            // the API.
            loaded_at_startup: p.origin == Origin::Startup,
            device_type: if pool.on_gpu() { "gpu" } else { "cpu" },
            workers: Mutex::new((min_workers, max_workers)),
            pool: Arc::clone(&pool),
            registered: SystemTime::now(),
            series: Default::default(),
            scratch: owned_scratch,
        });
        pool.scale(min_workers);
        if p.synchronous && min_workers > 0 {
            lock(&self.starting).push(Starting {
                name: name.clone(),
                version: version.clone(),
                pool: Arc::clone(&pool),
            });
            let _listed = Listed(self, Arc::clone(&pool));
            let ready = pool.wait_started(Duration::from_secs(startup_timeout_s));
            if ready < min_workers {
                let failure = pool_failure(pool.as_ref());
                if p.origin != Origin::Snapshot {
                    let why = failure.unwrap_or_else(|| {
                        format!(": not ready within startup_timeout ({startup_timeout_s} s)")
                    });
                    // Not waited for: a load may take much longer than the timeout the caller
                    // asked for. A worker still loading stops once its load ends.
                    pool.discard();
                    tracing::warn!(
                        model = %name,
                        version = %version,
                        "registration refused{why}; its workers are discarded"
                    );
                    return Err(ApiError::internal(format!(
                        "Failed to start workers for model {name} version: {version}{why}"
                    )));
                }
                match failure {
                    Some(why) => tracing::error!(
                        model = %name,
                        version = %version,
                        "registered, but its workers do not start{why}; they keep retrying: fix \
                         the archive or unregister the model"
                    ),
                    // Slow, not broken (a startup_timeout of 0 waits for nothing): the workers
                    // serve once they are up.
                    None => tracing::info!(
                        model = %name,
                        version = %version,
                        "registered; its workers are still starting after startup_timeout \
                         ({startup_timeout_s} s)"
                    ),
                }
            }
        }
        let mut models = self.write();
        let entry = models.entry(name.clone()).or_default();
        if entry.versions.contains_key(&version) {
            drop(models);
            pool.discard();
            return Err(ApiError::conflict(format!(
                "Model version {version} is already registered for model {name}"
            )));
        }
        entry.versions.insert(version.clone(), Arc::clone(&mv));
        if entry.versions.len() == 1 || p.make_default {
            entry.default = version;
        }
        Ok(Registered {
            model: mv,
            workers: min_workers,
        })
    }

    fn check_free(&self, name: &str, version: &str) -> Result<(), ApiError> {
        if self
            .read()
            .get(name)
            .is_some_and(|e| e.versions.contains_key(version))
        {
            return Err(ApiError::conflict(format!(
                "Model version {version} is already registered for model {name}"
            )));
        }
        Ok(())
    }

    /// The archive `url` names. Without a model store only the operator's own start-up list
    /// (`--models`, a snapshot) may name a path: the management API then reads no file at all,
    /// so that it cannot load, or tell the existence of, anything on the host.
    fn resolve_url(&self, url: &str, at_startup: bool) -> Result<PathBuf, ApiError> {
        if url.is_empty() {
            return Err(ApiError::model_not_found("empty url"));
        }
        if url.contains("..") {
            return Err(ApiError::model_not_found(format!(
                "Relative path is not allowed in url: {url}"
            )));
        }
        // Remote archives are fetched into the store before they reach here.
        if url.starts_with("s3://") {
            return Err(ApiError::bad_request(format!(
                "Failed to download archive from: {url}: s3:// URLs are not supported; \
                 download the archive into the model store, or serve it over https"
            )));
        }
        if fetch::is_remote(url) {
            return Err(ApiError::bad_request(format!(
                "Failed to download archive from: {url}: a URL is downloaded before it is \
                 registered"
            )));
        }
        match &self.store {
            Some(store) => store
                .resolve(url)
                .map_err(|e| ApiError::model_not_found(e.to_string())),
            None if at_startup && Path::new(url).is_absolute() && Path::new(url).exists() => {
                Ok(PathBuf::from(url))
            }
            None => Err(ApiError::model_not_found(
                "Model store has not been configured.",
            )),
        }
    }

    /// Sets a model version's workers to `min` (keeping `max` for describe).
    pub fn scale(
        &self,
        name: &str,
        version: Option<&str>,
        min: usize,
        max: usize,
        sync: bool,
    ) -> Result<(Arc<ModelVersion>, ScaleOutcome), ApiError> {
        let mv = self.get(name, version)?;
        *mv.workers.lock().unwrap_or_else(|p| p.into_inner()) = (min, max);
        mv.pool.scale(min);
        if !sync {
            return Ok((mv, ScaleOutcome::InProgress));
        }
        let ready = mv
            .pool
            .wait_started(Duration::from_secs(mv.startup_timeout_s));
        // Unregistered meanwhile, the version has no workers to wait for, nor to report.
        let still_registered = self
            .get(name, Some(&mv.version))
            .is_ok_and(|now| Arc::ptr_eq(&now, &mv));
        if !still_registered {
            return Err(ApiError::version_not_found(format!(
                "Model version {} of model {name} was unregistered while its workers were scaled",
                mv.version
            )));
        }
        let outcome = if ready >= min {
            ScaleOutcome::Done
        } else if let Some(why) = pool_failure(mv.pool.as_ref()) {
            ScaleOutcome::Failed(why)
        } else {
            ScaleOutcome::InProgress
        };
        Ok((mv, outcome))
    }

    /// Makes `version` the default of `name`.
    pub fn set_default(&self, name: &str, version: &str) -> Result<(), ApiError> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| ApiError::model_not_found(format!("Model not found: {name}")))?;
        if !entry.versions.contains_key(version) {
            return Err(ApiError::version_not_found(format!(
                "Model version {version} does not exist for model {name}"
            )));
        }
        entry.default = version.to_string();
        Ok(())
    }

    /// Removes a version (the default when none is named) and returns it; the caller shuts its
    /// pool down.
    pub fn unregister(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, ApiError> {
        let mut models = self.write();
        let entry = models
            .get_mut(name)
            .ok_or_else(|| ApiError::model_not_found(format!("Model not found: {name}")))?;
        let v = version.unwrap_or(&entry.default).to_string();
        if !entry.versions.contains_key(&v) {
            return Err(ApiError::version_not_found(format!(
                "Model version: {v} does not exist for model: {name}"
            )));
        }
        if v == entry.default && entry.versions.len() > 1 {
            return Err(ApiError::forbidden_version(format!(
                "Cannot remove default version for model {name}"
            )));
        }
        let removed = entry.versions.remove(&v).expect("checked above");
        if entry.versions.is_empty() {
            models.remove(name);
        }
        Ok(removed)
    }

    /// Removes every version of `name` and returns them; the caller shuts their pools down.
    pub fn unregister_all(&self, name: &str) -> Result<Vec<Arc<ModelVersion>>, ApiError> {
        self.write()
            .remove(name)
            .map(|e| e.versions.into_values().collect())
            .ok_or_else(|| ApiError::model_not_found(format!("Model not found: {name}")))
    }

    /// The model store, when one is configured.
    pub fn store(&self) -> Option<&ModelStore> {
        self.store.as_ref()
    }

    /// Tells every model version's workers that no more requests will come (see
    /// [`tchserve_backend::Workers::close_batches`]).
    pub fn close_batches(&self) {
        for entry in self.read().values() {
            for m in entry.versions.values() {
                m.pool.close_batches();
            }
        }
    }

    /// Replaces every worker stuck in one batch past its response timeout (see
    /// [`tchserve_backend::Workers::replace_stuck`]).
    /// Gives the model versions where any were replaced, and how many.
    pub fn replace_stuck_workers(&self) -> Vec<(String, String, usize)> {
        let mut replaced = Vec::new();
        for entry in self.read().values() {
            for m in entry.versions.values() {
                let n = m.pool.replace_stuck();
                if n > 0 {
                    replaced.push((m.name.clone(), m.version.clone(), n));
                }
            }
        }
        replaced
    }

    /// Removes every model, for shutdown.
    pub fn drain(&self) -> Vec<Arc<ModelVersion>> {
        std::mem::take(&mut *self.write())
            .into_values()
            .flat_map(|e| e.versions.into_values())
            .collect()
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves the list as good as it was.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a worker failed to start, if one did. A worker reported failed while inside a batch
/// started well; it is stuck, which the scale asked for has nothing to do with.
fn pool_failure(pool: &dyn Workers) -> Option<String> {
    pool.workers().into_iter().find_map(|w| match w.state {
        WorkerState::Failed(why) if w.busy.is_none() => Some(format!(": {why}")),
        _ => None,
    })
}
