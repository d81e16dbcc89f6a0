//! The model registry: names -> versions -> worker pools, with a default version per model.
//!
//! A model version becomes visible to requests only once its pool exists (and, for a synchronous
//! registration, once its workers are up), so no request ever meets a half-registered model.
//! Registering, scaling and unregistering one model never touches another's pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tchserve_mar::{Archive, ModelStore, RuntimeType};
use tchserve_runtime::batch::Batcher;
use tchserve_runtime::handler::Pipeline;
use tchserve_runtime::pool::{ModelSpec, Pool, PoolConfig, ThreadBudget};
use tchserve_runtime::{CudaStatus, device, model};

use crate::bounds;
use crate::config::Config;
use crate::error::ApiError;

/// One registered model version.
#[derive(Debug)]
pub struct ModelVersion {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// The url it was registered from (the archive's name in the model store).
    pub url: String,
    /// Manifest runtime.
    pub runtime: RuntimeType,
    /// Handler name: the registration's override, else the archive's.
    pub handler: String,
    /// The handler the registration named in place of the archive's, kept for snapshots.
    pub handler_override: Option<String>,
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
    /// Whether it was loaded at start-up.
    pub loaded_at_startup: bool,
    /// `cpu` or `gpu`.
    pub device_type: &'static str,
    /// Configured (min, max) workers.
    pub workers: Mutex<(usize, usize)>,
    /// The queue and workers.
    pub pool: Arc<Pool>,
    /// When registered.
    pub registered: SystemTime,
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
    /// Loaded from `--models` or a snapshot.
    pub loaded_at_startup: bool,
    /// Make this the default version even if others exist (snapshot restore).
    pub make_default: bool,
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
    /// Some failed to start.
    Failed,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    models: RwLock<BTreeMap<String, ModelEntry>>,
    store: Option<ModelStore>,
    scratch_root: PathBuf,
    budget: Arc<ThreadBudget>,
    cuda: &'static CudaStatus,
    config: Arc<Config>,
}

fn positive(v: Option<i64>) -> Option<i64> {
    v.filter(|v| *v > 0)
}

impl Registry {
    /// An empty registry.
    pub fn new(
        config: Arc<Config>,
        store: Option<ModelStore>,
        scratch_root: PathBuf,
        cuda: &'static CudaStatus,
    ) -> Self {
        Registry {
            models: RwLock::default(),
            store,
            scratch_root,
            budget: ThreadBudget::new(config.cpu_threads),
            cuda,
            config,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
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

    /// Whether `name` is registered with version `v`, and whether `v` is its default.
    pub fn is_default(&self, name: &str, version: &str) -> bool {
        self.read().get(name).is_some_and(|e| e.default == version)
    }

    /// Registers a model version. Blocking: loads the archive and, if synchronous, waits for
    /// the workers; call it off the async threads.
    pub fn register(&self, p: &RegisterParams) -> Result<Registered, ApiError> {
        let invalid = |m: String| ApiError {
            status: axum::http::StatusCode::BAD_REQUEST,
            kind: "InvalidModelException",
            message: m,
        };
        let path = self.resolve_url(&p.url)?;
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
        // Names and versions reach URLs, file names and log lines: keep them to plain characters.
        if !tchserve_mar::manifest::is_valid_model_name(&name) {
            return Err(ApiError::bad_request(format!(
                "Invalid model name {name:?}: a model name has letters, digits, '_', '-' and '.' \
                 only, and starts with a letter or digit"
            )));
        }
        let version = archive.manifest().model.version().to_string();
        if version.is_empty() || version.chars().any(|c| c.is_control() || c == '/') {
            return Err(invalid(format!(
                "Invalid model version {version:?}: a version must not be empty or hold '/' or \
                 control characters"
            )));
        }
        self.check_free(&name, &version)?;

        let mut handler = model::resolve_handler(&archive, p.handler.as_deref())
            .map_err(|e| invalid(e.to_string()))?;
        let serialized = model::serialized_file(&archive).map_err(|e| invalid(e.to_string()))?;
        let yaml = archive
            .model_config()
            .map_err(|e| invalid(e.to_string()))?
            .unwrap_or_default();
        for w in &yaml.warnings {
            tracing::warn!(model = %name, "model-config.yaml: {w}");
        }
        if let Some(settings) = &yaml.handler {
            handler
                .apply_settings(settings)
                .map_err(|e| invalid(format!("model-config.yaml: {e}")))?;
        }
        let defaults = self
            .config
            .models
            .get(&name)
            .and_then(|v| v.get(&version))
            .cloned()
            .unwrap_or_default();

        // The first source that sets a value wins (the API's parameters, model-config.yaml, the
        // `models` key), and whichever wins is held to its documented bound.
        let from = |b: &bounds::Bound, sources: &[(Option<i64>, &str)], default: u64| match sources
            .iter()
            .find_map(|(v, src)| v.map(|v| (v, src)))
        {
            Some((v, src)) => b
                .check(v)
                .map(|v| v as u64)
                .map_err(|why| ApiError::bad_request(format!("{why} (set by {src})"))),
            None => Ok(default),
        };
        const API: &str = "the request";
        const YAML: &str = "model-config.yaml";
        const MODELS: &str = "the models setting";
        let batch_size = from(
            &bounds::BATCH_SIZE,
            &[
                (positive(p.batch_size), API),
                (positive(yaml.batch_size), YAML),
                (positive(defaults.batch_size), MODELS),
            ],
            1,
        )? as usize;
        let max_batch_delay_ms = from(
            &bounds::MAX_BATCH_DELAY,
            &[
                (p.max_batch_delay.filter(|v| *v >= 0), API),
                (positive(yaml.max_batch_delay), YAML),
                (positive(defaults.max_batch_delay), MODELS),
            ],
            100,
        )?;
        let response_timeout_s = from(
            &bounds::RESPONSE_TIMEOUT,
            &[
                (positive(p.response_timeout), API),
                (positive(yaml.response_timeout), YAML),
                (positive(defaults.response_timeout), MODELS),
            ],
            self.config.default_response_timeout.as_secs(),
        )?;
        let startup_timeout_s = from(
            &bounds::STARTUP_TIMEOUT,
            &[
                // 0 is a real value here: do not wait at all (TorchServe's -1 means default).
                (p.startup_timeout.filter(|v| *v >= 0), API),
                (positive(yaml.startup_timeout), YAML),
                (positive(defaults.startup_timeout), MODELS),
            ],
            self.config.default_startup_timeout.as_secs(),
        )?;
        let job_queue_size = from(
            &bounds::JOB_QUEUE_SIZE,
            &[(positive(yaml.job_queue_size), YAML)],
            self.config.job_queue_size as u64,
        )? as usize;
        let mut min_workers = match p.initial_workers {
            Some(n) => n.max(0) as usize,
            None if p.loaded_at_startup => defaults.min_workers.filter(|n| *n > 0).map_or_else(
                || self.config.startup_workers(self.cuda.devices),
                |n| n as usize,
            ),
            None => self.config.default_workers_per_model.unwrap_or(0),
        };
        let max_from_config = defaults.max_workers.filter(|_| p.loaded_at_startup);
        let mut max_workers = p
            .max_workers
            .or(max_from_config)
            .filter(|m| *m >= 0)
            .map_or(min_workers, |m| m as usize)
            .max(min_workers);
        if let (Some(lo), Some(hi)) = (yaml.min_workers, yaml.max_workers)
            && lo > 0
            && hi >= lo
        {
            min_workers = lo as usize;
            max_workers = hi as usize;
        }
        for (n, what) in [
            (min_workers, "initial_workers"),
            (max_workers, "max_workers"),
        ] {
            bounds::workers(what, self.config.max_workers_per_model)
                .check(n as i64)
                .map_err(|why| {
                    ApiError::bad_request(format!(
                        "{why} (max_workers_per_model is {})",
                        self.config.max_workers_per_model
                    ))
                })?;
        }

        let cpu_only = yaml.device_type.as_deref() == Some("cpu");
        let devices = if cpu_only || self.cuda.devices == 0 {
            vec![tch::Device::Cpu]
        } else {
            let ids: Option<Vec<usize>> = yaml.device_ids.as_ref().and_then(|ids| {
                ids.iter()
                    .map(|&i| usize::try_from(i).ok().filter(|i| *i < self.cuda.devices))
                    .collect::<Option<Vec<_>>>()
            });
            let n = ids.as_ref().map_or(self.cuda.devices, Vec::len);
            (0..n.max(1))
                .map(|k| device::device_for_worker(self.cuda, ids.as_deref(), k))
                .collect()
        };
        let device_type = if devices[0] == tch::Device::Cpu {
            "cpu"
        } else {
            "gpu"
        };

        let scratch = self.scratch_root.join(uuid::Uuid::new_v4().to_string());
        let model_dir = archive
            .unpack(&scratch)
            .map_err(|e| invalid(e.to_string()))?;
        let owned_scratch = (model_dir == scratch).then_some(scratch);
        // Fail fast on handlers this build cannot run, rather than in every worker.
        if let Err(e) = Pipeline::new(&handler, &model_dir) {
            if let Some(d) = &owned_scratch {
                let _ = std::fs::remove_dir_all(d);
            }
            return Err(invalid(e.to_string()));
        }

        let pool = Pool::new(
            ModelSpec {
                model_dir,
                serialized_file: serialized,
                handler: handler.clone(),
            },
            PoolConfig {
                model_name: name.clone(),
                version: version.clone(),
                batcher: Batcher {
                    batch_size,
                    max_delay: Duration::from_millis(max_batch_delay_ms),
                },
                job_queue_size,
                response_timeout: Duration::from_secs(response_timeout_s),
                devices,
            },
            Arc::clone(&self.budget),
        );
        let mv = Arc::new(ModelVersion {
            name: name.clone(),
            version: version.clone(),
            url: p.url.clone(),
            runtime,
            handler: p
                .handler
                .clone()
                .or(archive.manifest().model.handler.clone())
                .unwrap_or_default(),
            handler_override: p.handler.clone(),
            batch_size,
            max_batch_delay_ms,
            response_timeout_s,
            startup_timeout_s,
            job_queue_size,
            loaded_at_startup: p.loaded_at_startup,
            device_type,
            workers: Mutex::new((min_workers, max_workers)),
            pool: Arc::clone(&pool),
            registered: SystemTime::now(),
            scratch: owned_scratch,
        });
        pool.scale(min_workers);
        if p.synchronous && min_workers > 0 {
            let ready = pool.wait_started(Duration::from_secs(startup_timeout_s));
            if ready < min_workers {
                let why = pool_failure(&pool).unwrap_or_else(|| {
                    format!(": not ready within startup_timeout ({startup_timeout_s} s)")
                });
                pool.shutdown(Duration::ZERO);
                return Err(ApiError::internal(format!(
                    "Failed to start workers for model {name} version: {version}{why}"
                )));
            }
        }
        let mut models = self.write();
        let entry = models.entry(name.clone()).or_default();
        if entry.versions.contains_key(&version) {
            drop(models);
            pool.shutdown(Duration::ZERO);
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

    fn resolve_url(&self, url: &str) -> Result<PathBuf, ApiError> {
        if url.is_empty() {
            return Err(ApiError::model_not_found("empty url"));
        }
        if url.contains("..") {
            return Err(ApiError::model_not_found(format!(
                "Relative path is not allowed in url: {url}"
            )));
        }
        if url.starts_with("http://") || url.starts_with("https://") || url.starts_with("s3://") {
            return Err(ApiError::bad_request(format!(
                "Failed to download archive from: {url}: tchserve does not download archives; copy it into the model store and register it by name"
            )));
        }
        match &self.store {
            Some(store) => store
                .resolve(url)
                .map_err(|e| ApiError::model_not_found(e.to_string())),
            None if Path::new(url).is_absolute() && Path::new(url).exists() => {
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
        let outcome = if ready >= min {
            ScaleOutcome::Done
        } else if mv
            .pool
            .workers()
            .iter()
            .any(|w| matches!(w.state, tchserve_runtime::pool::WorkerState::Failed(_)))
        {
            ScaleOutcome::Failed
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

    /// Removes every model, for shutdown.
    pub fn drain(&self) -> Vec<Arc<ModelVersion>> {
        std::mem::take(&mut *self.write())
            .into_values()
            .flat_map(|e| e.versions.into_values())
            .collect()
    }
}

fn pool_failure(pool: &Pool) -> Option<String> {
    pool.workers().into_iter().find_map(|w| match w.state {
        tchserve_runtime::pool::WorkerState::Failed(why) => Some(format!(": {why}")),
        _ => None,
    })
}
