//! One model version's serving settings, resolved from every place a user can set them.
//!
//! The sources, first match wins: the registration's parameters (the management API's, or a
//! snapshot's), the archive's `model-config.yaml`, the `models` key of `config.properties`, then
//! `config.properties`' defaults. One exception, as in TorchServe: a valid `minWorkers` and
//! `maxWorkers` pair in `model-config.yaml` beats the request's worker count. Whichever source
//! wins is held to the documented bound of the setting, and an error names the source. The
//! resolution is pure: no archive, backend or clock.

use std::time::Duration;

use tchserve_backend::Placement;
use tchserve_mar::ModelConfig;

use super::bounds;
use super::error::ApiError;
use super::registry::{Origin, RegisterParams};
use crate::config::{Config, ModelDefaults};

/// How a model version is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingSettings {
    /// Largest batch.
    pub batch_size: usize,
    /// Longest wait to fill a batch, ms.
    pub max_batch_delay_ms: u64,
    /// How long a request may wait for its answer, s.
    pub response_timeout_s: u64,
    /// How long a synchronous registration or scale waits for workers, s.
    pub startup_timeout_s: u64,
    /// Job queue capacity.
    pub job_queue_size: usize,
    /// Workers started at registration.
    pub min_workers: usize,
    /// Upper bound reported by describe.
    pub max_workers: usize,
    /// Where the workers run.
    pub placement: Placement,
}

/// Everything the settings are resolved from.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// The registration's parameters.
    pub request: &'a RegisterParams,
    /// The archive's `model-config.yaml` (empty when it has none).
    pub yaml: &'a ModelConfig,
    /// The `models` key's entry for this name and version (empty when none).
    pub models: &'a ModelDefaults,
    /// The server's configuration, for its defaults and bounds.
    pub config: &'a Config,
    /// GPUs the backend can place workers on.
    pub gpus: usize,
}

const API: &str = "the request";
const SNAPSHOT: &str = "the snapshot";
const YAML: &str = "model-config.yaml";
const MODELS: &str = "the models setting";

fn positive(v: Option<i64>) -> Option<i64> {
    v.filter(|v| *v > 0)
}

/// The first value set among `sources`, held to `bound`, or `default` when none is set. A
/// value of the `models` setting or of a snapshot (`model_snapshot`, which KServe's layout
/// writes) past the top of its range is held to it with a warning: the operator's
/// configuration, which TorchServe takes as it is, must not stop a start.
fn first(
    bound: &bounds::Bound,
    sources: &[(Option<i64>, &str)],
    default: u64,
) -> Result<u64, ApiError> {
    match sources.iter().find_map(|(v, src)| v.map(|v| (v, src))) {
        Some((v, &src)) if (src == MODELS || src == SNAPSHOT) && v > *bound.range.end() => {
            let top = *bound.range.end();
            tracing::warn!(
                "{} {v}{} (set by {src}) is above the most tchserve takes; using {top}{}",
                bound.name,
                bound.unit,
                bound.unit
            );
            Ok(top as u64)
        }
        Some((v, src)) => bound
            .check(v)
            .map(|v| v as u64)
            .map_err(|why| ApiError::bad_request(format!("{why} (set by {src})"))),
        None => Ok(default),
    }
}

impl ServingSettings {
    /// Resolves the settings; an out-of-bounds value is a 400 that names the setting and its
    /// source.
    pub fn resolve(s: Sources<'_>) -> Result<Self, ApiError> {
        let (p, yaml, models, config) = (s.request, s.yaml, s.models, s.config);
        // A snapshot's values are the operator's, not a client's.
        let api = if p.origin == Origin::Snapshot {
            SNAPSHOT
        } else {
            API
        };
        let batch_size = first(
            &bounds::BATCH_SIZE,
            &[
                (positive(p.batch_size), api),
                // TorchServe reads any yaml batchSize under 1 as 1, which then wins.
                (yaml.batch_size.map(|v| v.max(1)), YAML),
                (positive(models.batch_size), MODELS),
            ],
            1,
        )? as usize;
        let max_batch_delay_ms = first(
            &bounds::MAX_BATCH_DELAY,
            &[
                (p.max_batch_delay.filter(|v| *v >= 0), api),
                (positive(yaml.max_batch_delay), YAML),
                (positive(models.max_batch_delay), MODELS),
            ],
            100,
        )?;
        let response_timeout_s = first(
            &bounds::RESPONSE_TIMEOUT,
            &[
                (positive(p.response_timeout), api),
                (positive(yaml.response_timeout), YAML),
                (positive(models.response_timeout), MODELS),
            ],
            config.default_response_timeout.as_secs(),
        )?;
        let startup_timeout_s = first(
            &bounds::STARTUP_TIMEOUT,
            &[
                // 0 is a real value here: do not wait at all (TorchServe's -1 means default).
                (p.startup_timeout.filter(|v| *v >= 0), api),
                (positive(yaml.startup_timeout), YAML),
                (positive(models.startup_timeout), MODELS),
            ],
            config.default_startup_timeout.as_secs(),
        )?;
        let job_queue_size = first(
            &bounds::JOB_QUEUE_SIZE,
            &[(positive(yaml.job_queue_size), YAML)],
            config.job_queue_size as u64,
        )? as usize;

        let mut min_workers = match p.initial_workers {
            Some(n) => n.max(0) as usize,
            None if p.origin != Origin::Api => positive(models.min_workers)
                .map_or_else(|| config.startup_workers(s.gpus), |n| n as usize),
            None => config.default_workers_per_model.unwrap_or(0),
        };
        let cap = config.max_workers_per_model as i64;
        let max_from_config = models
            .max_workers
            .filter(|_| p.origin != Origin::Api)
            .map(|m| {
                if m > cap {
                    tracing::warn!(
                        "maxWorkers {m} (set by {MODELS}) is above max_workers_per_model; \
                         using {cap}"
                    );
                }
                m.min(cap)
            });
        let mut max_workers = p
            .max_workers
            .or(max_from_config)
            .filter(|m| *m >= 0)
            .map_or(min_workers, |m| m as usize)
            .max(min_workers);
        // TorchServe reads a yaml minWorkers under 1 as 1: `minWorkers: 0, maxWorkers: 4`
        // starts one worker. A snapshot's counts are the ones the model was scaled to: they
        // win, as in TorchServe's restore.
        if let (Some(lo), Some(hi)) = (yaml.min_workers.map(|v| v.max(1)), yaml.max_workers)
            && hi >= lo
            && p.origin != Origin::Snapshot
        {
            min_workers = lo as usize;
            max_workers = hi as usize;
        }
        if p.origin == Origin::Snapshot {
            let cap = config.max_workers_per_model;
            if max_workers > cap || min_workers > cap {
                tracing::warn!(
                    "worker counts {min_workers} and {max_workers} (set by {SNAPSHOT}) are \
                     above max_workers_per_model; using at most {cap}"
                );
            }
            min_workers = min_workers.min(cap);
            max_workers = max_workers.min(cap);
        }
        for (n, what) in [
            (min_workers, "initial_workers"),
            (max_workers, "max_workers"),
        ] {
            bounds::workers(what, config.max_workers_per_model)
                .check(n as i64)
                .map_err(|why| {
                    ApiError::bad_request(format!(
                        "{why} (max_workers_per_model is {})",
                        config.max_workers_per_model
                    ))
                })?;
        }

        let cpu_only = yaml.device_type.as_deref() == Some("cpu");
        let placement = if cpu_only || s.gpus == 0 {
            Placement::Cpu
        } else {
            // Ids that name no GPU here are dropped as a whole, as TorchServe falls back to all.
            let ids = yaml.device_ids.as_ref().and_then(|ids| {
                ids.iter()
                    .map(|&i| usize::try_from(i).ok().filter(|i| *i < s.gpus))
                    .collect::<Option<Vec<_>>>()
            });
            Placement::Gpu { ids }
        };
        Ok(ServingSettings {
            batch_size,
            max_batch_delay_ms,
            response_timeout_s,
            startup_timeout_s,
            job_queue_size,
            min_workers,
            max_workers,
            placement,
        })
    }

    /// The batch delay as a duration.
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::default()
    }

    fn resolve(
        request: &RegisterParams,
        yaml: &ModelConfig,
        models: &ModelDefaults,
        gpus: usize,
    ) -> Result<ServingSettings, ApiError> {
        ServingSettings::resolve(Sources {
            request,
            yaml,
            models,
            config: &config(),
            gpus,
        })
    }

    #[test]
    fn defaults_come_from_the_configuration() {
        let s = resolve(
            &RegisterParams::default(),
            &ModelConfig::default(),
            &ModelDefaults::default(),
            0,
        )
        .unwrap();
        let c = config();
        assert_eq!(s.batch_size, 1);
        assert_eq!(s.max_batch_delay_ms, 100);
        assert_eq!(s.response_timeout_s, c.default_response_timeout.as_secs());
        assert_eq!(s.startup_timeout_s, c.default_startup_timeout.as_secs());
        assert_eq!(s.job_queue_size, c.job_queue_size);
        assert_eq!((s.min_workers, s.max_workers), (0, 0));
        assert_eq!(s.placement, Placement::Cpu);
    }

    #[test]
    fn the_request_beats_the_yaml_which_beats_the_models_key() {
        let yaml = ModelConfig {
            batch_size: Some(4),
            max_batch_delay: Some(7),
            response_timeout: Some(9),
            ..ModelConfig::default()
        };
        let models = ModelDefaults {
            batch_size: Some(2),
            max_batch_delay: Some(3),
            response_timeout: Some(5),
            startup_timeout: Some(11),
            ..ModelDefaults::default()
        };
        let request = RegisterParams {
            batch_size: Some(8),
            ..RegisterParams::default()
        };
        let s = resolve(&request, &yaml, &models, 0).unwrap();
        assert_eq!(s.batch_size, 8, "the request");
        assert_eq!(s.max_batch_delay_ms, 7, "model-config.yaml");
        assert_eq!(s.response_timeout_s, 9, "model-config.yaml");
        assert_eq!(s.startup_timeout_s, 11, "the models key");
        // A request's 0 delay is a real value; a yaml 0 is unset.
        let request = RegisterParams {
            max_batch_delay: Some(0),
            ..RegisterParams::default()
        };
        assert_eq!(
            resolve(&request, &yaml, &models, 0)
                .unwrap()
                .max_batch_delay_ms,
            0
        );
    }

    #[test]
    fn out_of_bounds_values_name_their_source() {
        let yaml = ModelConfig {
            batch_size: Some(100_000),
            ..ModelConfig::default()
        };
        let e = resolve(
            &RegisterParams::default(),
            &yaml,
            &ModelDefaults::default(),
            0,
        )
        .unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
        assert!(e.message().contains("model-config.yaml"), "{e}");
        let request = RegisterParams {
            initial_workers: Some(100_000),
            ..RegisterParams::default()
        };
        let e = resolve(
            &request,
            &ModelConfig::default(),
            &ModelDefaults::default(),
            0,
        )
        .unwrap_err();
        assert!(e.message().contains("max_workers_per_model"), "{e}");
    }

    #[test]
    fn workers_at_start_up_and_from_the_yaml() {
        let startup = RegisterParams {
            origin: Origin::Startup,
            ..RegisterParams::default()
        };
        let s = resolve(
            &startup,
            &ModelConfig::default(),
            &ModelDefaults::default(),
            0,
        )
        .unwrap();
        assert_eq!(s.min_workers, config().startup_workers(0));
        let models = ModelDefaults {
            min_workers: Some(3),
            max_workers: Some(6),
            ..ModelDefaults::default()
        };
        let s = resolve(&startup, &ModelConfig::default(), &models, 0).unwrap();
        assert_eq!((s.min_workers, s.max_workers), (3, 6));
        let yaml = ModelConfig {
            min_workers: Some(2),
            max_workers: Some(4),
            ..ModelConfig::default()
        };
        let s = resolve(&RegisterParams::default(), &yaml, &models, 0).unwrap();
        assert_eq!((s.min_workers, s.max_workers), (2, 4));
        // A yaml minimum under 1 is 1, as TorchServe reads it; a maximum under it voids both.
        for (lo, hi, want) in [(0, 4, (1, 4)), (-3, 2, (1, 2)), (0, 0, (0, 0))] {
            let yaml = ModelConfig {
                min_workers: Some(lo),
                max_workers: Some(hi),
                ..ModelConfig::default()
            };
            let s = resolve(&RegisterParams::default(), &yaml, &models, 0).unwrap();
            assert_eq!((s.min_workers, s.max_workers), want, "{lo}, {hi}");
        }
        // So is a yaml batch size, which then wins over the `models` key.
        let yaml = ModelConfig {
            batch_size: Some(0),
            ..ModelConfig::default()
        };
        let models = ModelDefaults {
            batch_size: Some(8),
            ..ModelDefaults::default()
        };
        let s = resolve(&RegisterParams::default(), &yaml, &models, 0).unwrap();
        assert_eq!(s.batch_size, 1);
    }

    #[test]
    fn placement_follows_the_yaml_and_the_gpus_present() {
        let none = RegisterParams::default();
        let models = ModelDefaults::default();
        let gpu_ids = |ids: Vec<i64>| ModelConfig {
            device_ids: Some(ids),
            ..ModelConfig::default()
        };
        let place =
            |yaml: &ModelConfig, gpus| resolve(&none, yaml, &models, gpus).unwrap().placement;
        assert_eq!(
            place(&ModelConfig::default(), 2),
            Placement::Gpu { ids: None }
        );
        assert_eq!(
            place(&gpu_ids(vec![1]), 2),
            Placement::Gpu { ids: Some(vec![1]) }
        );
        assert_eq!(place(&gpu_ids(vec![5]), 2), Placement::Gpu { ids: None });
        assert_eq!(place(&gpu_ids(vec![1]), 0), Placement::Cpu);
        let cpu = ModelConfig {
            device_type: Some("cpu".into()),
            ..ModelConfig::default()
        };
        assert_eq!(place(&cpu, 2), Placement::Cpu);
    }

    #[test]
    fn the_models_setting_past_a_bound_is_held_to_it_and_a_request_is_refused() {
        // TorchServe's own example config asks for these; its start must not fail.
        let models = ModelDefaults {
            min_workers: Some(2),
            max_workers: Some(1000),
            batch_size: Some(2000),
            response_timeout: Some(1_000_000),
            ..ModelDefaults::default()
        };
        let startup = RegisterParams {
            origin: Origin::Startup,
            ..RegisterParams::default()
        };
        let s = resolve(&startup, &ModelConfig::default(), &models, 0).unwrap();
        assert_eq!(s.batch_size, 1024);
        assert_eq!(s.response_timeout_s, 86_400);
        assert_eq!(
            (s.min_workers, s.max_workers),
            (2, config().max_workers_per_model)
        );
        // The same values asked for by a client are still answered with the bound.
        let asked = RegisterParams {
            batch_size: Some(2000),
            ..RegisterParams::default()
        };
        let e = resolve(
            &asked,
            &ModelConfig::default(),
            &ModelDefaults::default(),
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("from 1 to 1024"), "{e}");
        // A snapshot's values (model_snapshot, as KServe's layout writes it) are the operator's.
        let restored = RegisterParams {
            batch_size: Some(2000),
            initial_workers: Some(500),
            origin: Origin::Snapshot,
            ..RegisterParams::default()
        };
        let s = resolve(
            &restored,
            &ModelConfig::default(),
            &ModelDefaults::default(),
            0,
        )
        .unwrap();
        assert_eq!(s.batch_size, 1024);
        assert_eq!(s.min_workers, config().max_workers_per_model);
    }
}
