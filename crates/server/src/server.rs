//! Starting and stopping the server: start-up models or snapshot, three listeners, graceful stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::serve::ListenerExt;
use tchserve_mar::ModelStore;
use tchserve_runtime::{DevicePolicy, device};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::auth::{KeyFileGuard, Tokens};
use crate::config::{Address, Config};
use crate::listener::{self, ConnectionLimits};
use crate::metrics::Metrics;
use crate::registry::{RegisterParams, Registry};
use crate::scratch::{self, Scratch};
use crate::snapshot::{self, Snapshots};

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Settings.
    pub config: Config,
    /// Write and restore snapshots (off with `--ncs`).
    pub snapshots: bool,
    /// Folder for logs and snapshots.
    pub log_dir: PathBuf,
    /// Where token authorization publishes its keys (TorchServe: `key_file.json` in the
    /// working folder).
    pub key_file: PathBuf,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model store is unusable.
    #[error("{0}")]
    Store(String),
    /// A listener could not bind.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// Token authorization could not publish its keys.
    #[error(
        "{0}; start tchserve from a folder it can write to, or turn token authorization off \
         (--disable-token-auth)"
    )]
    KeyFile(#[from] crate::auth::KeyFileError),
}

/// Runs the server until `shutdown` completes, then stops gracefully: listeners stop accepting,
/// in-flight requests finish, queued jobs are answered, workers exit.
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let started = Instant::now();
    let config = Arc::new(opts.config);
    for key in &config.ignored_keys {
        tracing::warn!("config key {key} is not used by tchserve");
    }
    let cuda = tokio::task::spawn_blocking(|| device::cuda(DevicePolicy::Auto))
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?;
    match &cuda.reason {
        None => tracing::info!(gpus = cuda.devices, "CUDA available"),
        Some(why) => tracing::info!("serving on CPU: {why}"),
    }
    let store = match &config.model_store {
        Some(dir) => Some(ModelStore::open(dir).map_err(|e| ServerError::Store(e.to_string()))?),
        None => None,
    };
    scratch::remove_stale(&std::env::temp_dir());
    // Dropped last, after the registry and its workers: every way out removes the folder.
    let scratch = Scratch::create(scratch::SERVER);
    let registry = Arc::new(Registry::new(
        Arc::clone(&config),
        store.clone(),
        scratch.path().to_path_buf(),
        cuda,
    ));
    let tokens = if config.disable_token_authorization {
        tracing::info!("token authorization is off");
        None
    } else {
        let t = Tokens::create(opts.key_file.clone(), config.token_expiration)?;
        tracing::info!("token authorization is on: keys in {}", t.file().display());
        Some(Arc::new(t))
    };
    let state = AppState {
        registry: Arc::clone(&registry),
        metrics: Metrics::new(),
        config: Arc::clone(&config),
        snapshots: opts.snapshots.then(|| {
            Arc::new(Snapshots::new(
                opts.log_dir.join("config"),
                Arc::clone(&registry),
            ))
        }),
        tokens: tokens.clone(),
    };
    let _key_file = tokens.map(KeyFileGuard);

    let restored = match &state.snapshots {
        Some(s) => match snapshot::read(s.dir()) {
            Ok(s) => s,
            // Starting from the configured models would overwrite it: move it aside first, so
            // what it holds can still be recovered by hand.
            Err(e) => match snapshot::keep_aside(s.dir()) {
                Ok(aside) => {
                    tracing::error!(
                        "the snapshot cannot be read ({e}); kept as {} and starting from the configured models",
                        aside.display()
                    );
                    None
                }
                Err(move_err) => {
                    return Err(ServerError::Store(format!(
                        "the snapshot cannot be read ({e}) nor moved aside ({move_err}); \
                         fix or remove it, or start with --ncs"
                    )));
                }
            },
        },
        None => None,
    };
    let from_snapshot = restored.is_some();
    let registrations = match &restored {
        Some(s) => {
            tracing::info!(
                "restoring models from the snapshot (load_models and --models are ignored)"
            );
            snapshot::registrations(s)
        }
        None => startup_models(&config, store.as_ref()),
    };
    // Versions of one model are registered in order so the default ends up right; models load
    // in parallel.
    let mut by_model: std::collections::BTreeMap<String, Vec<RegisterParams>> = Default::default();
    for p in registrations {
        by_model
            .entry(p.model_name.clone().unwrap_or_else(|| p.url.clone()))
            .or_default()
            .push(p);
    }
    let loads: Vec<_> = by_model
        .into_values()
        .map(|regs| {
            let registry = Arc::clone(&registry);
            tokio::task::spawn_blocking(move || {
                for p in regs {
                    match registry.register(&p) {
                        Ok(r) => tracing::info!(model = %r.model.name, version = %r.model.version, workers = r.workers, "model loaded"),
                        Err(e) => tracing::error!(url = %p.url, "cannot load model: {}", e.message),
                    }
                }
            })
        })
        .collect();
    for l in loads {
        let _ = l.await;
    }
    if !from_snapshot {
        state.save_snapshot().await;
    }

    let open_files = listener::raise_open_files_limit();
    let limits = ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        max_connections: config
            .max_connections
            .unwrap_or_else(|| listener::default_max_connections(open_files)),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for (address, router) in [
        (
            &config.inference_address,
            api::inference::router(state.clone()),
        ),
        (
            &config.management_address,
            api::management::router(state.clone()),
        ),
        (&config.metrics_address, api::metrics::router(state.clone())),
    ] {
        servers.push(listen(address, router, limits, stop_rx.clone()).await?);
    }
    tracing::info!(
        inference = %config.inference_address,
        management = %config.management_address,
        metrics = %config.metrics_address,
        max_connections = limits.max_connections,
        startup_ms = started.elapsed().as_millis() as u64,
        "tchserve is serving"
    );

    shutdown.await;
    tracing::info!("stopping: no new connections; finishing requests in flight");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    let models = registry.drain();
    let _ = tokio::task::spawn_blocking(move || {
        for m in models {
            m.pool.shutdown(Duration::from_secs(5));
        }
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// Registrations for `load_models` / `--models`.
fn startup_models(config: &Config, store: Option<&ModelStore>) -> Vec<RegisterParams> {
    let mut out = Vec::new();
    for item in &config.load_models {
        match ModelStore::expand(store, item) {
            Ok(refs) => out.extend(refs.into_iter().map(|r| startup(r.name, r.url))),
            Err(e) => tracing::error!("load_models {item}: {e}"),
        }
    }
    out
}

fn startup(model_name: Option<String>, url: String) -> RegisterParams {
    RegisterParams {
        url,
        model_name,
        synchronous: true,
        loaded_at_startup: true,
        ..RegisterParams::default()
    }
}

async fn listen(
    address: &Address,
    router: Router,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    let bind_err = |source| ServerError::Bind {
        address: address.to_string(),
        source,
    };
    Ok(match address {
        Address::Tcp(host, port) => {
            let listener = tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(bind_err)?;
            // Small JSON replies must not wait on Nagle's algorithm.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(listener::serve(listener, router, limits, stop))
        }
        Address::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            tokio::spawn(listener::serve(listener, router, limits, stop))
        }
    })
}
