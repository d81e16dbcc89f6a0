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
use crate::metrics::Metrics;
use crate::registry::{RegisterParams, Registry};
use crate::snapshot;

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
    /// A listener failed while serving.
    #[error("listener failed: {0}")]
    Serve(std::io::Error),
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
    let scratch = std::env::temp_dir().join(format!("tchserve-{}", std::process::id()));
    remove_stale_scratch(&std::env::temp_dir());
    let _scratch_lock = lock_scratch(&scratch);
    let registry = Arc::new(Registry::new(
        Arc::clone(&config),
        store.clone(),
        scratch.clone(),
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
        snapshot_dir: opts.snapshots.then(|| opts.log_dir.join("config")),
        tokens: tokens.clone(),
    };
    let _key_file = tokens.map(KeyFileGuard);

    let restored = match &state.snapshot_dir {
        Some(dir) => match snapshot::read(dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("ignoring an unreadable snapshot: {e}");
                None
            }
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
        state.save_snapshot();
    }

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
        servers.push(listen(address, router, stop_rx.clone()).await?);
    }
    tracing::info!(
        inference = %config.inference_address,
        management = %config.management_address,
        metrics = %config.metrics_address,
        startup_ms = started.elapsed().as_millis() as u64,
        "tchserve is serving"
    );

    shutdown.await;
    tracing::info!("stopping: no new connections; finishing requests in flight");
    let _ = stop_tx.send(true);
    let mut result = Ok(());
    for s in servers {
        if let Ok(Err(e)) = s.await {
            result = Err(ServerError::Serve(e));
        }
    }
    let models = registry.drain();
    let _ = tokio::task::spawn_blocking(move || {
        for m in models {
            m.pool.shutdown(Duration::from_secs(5));
        }
    })
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    tracing::info!("stopped");
    result
}

/// The lock file inside a scratch folder, held by its server for as long as it runs.
const SCRATCH_LOCK: &str = ".lock";

/// Creates this server's scratch folder and locks it, so that other servers sweeping the temp
/// folder can tell it is in use even when they cannot see this process (another pid namespace,
/// as in containers sharing /tmp).
fn lock_scratch(scratch: &std::path::Path) -> Option<std::fs::File> {
    let lock = std::fs::create_dir_all(scratch)
        .and_then(|()| std::fs::File::create(scratch.join(SCRATCH_LOCK)))
        .and_then(|f| f.try_lock().map(|()| f).map_err(std::io::Error::other));
    match lock {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("cannot lock {}: {e}", scratch.display());
            None
        }
    }
}

/// Removes the extraction folders of tchserve servers that are gone.
///
/// A server killed without a graceful stop (SIGKILL, OOM, power loss) cannot delete its
/// `tchserve-<pid>` folder, and extracted archives are large: without this sweep they pile up
/// in the temp folder until the disk fills. A folder is removed only when it is a real folder
/// of this user, named exactly `tchserve-<pid>` or `tchserve-check-<pid>`, and no live process
/// holds it: nobody holds its lock file, or, without one, its process does not exist.
fn remove_stale_scratch(temp: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(scratch_pid) else {
            continue;
        };
        let path = entry.path();
        if !owned_folder(&path) {
            continue;
        }
        let stale = match std::fs::File::open(path.join(SCRATCH_LOCK)) {
            // The lock is released when its holder exits, however it exits.
            Ok(f) => f.try_lock().is_ok(),
            Err(_) => !process_alive(pid),
        };
        if !stale {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!("removed {} left by a stopped server", path.display()),
            Err(e) => tracing::debug!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// The pid in `tchserve-<pid>` or `tchserve-check-<pid>`, written as the server writes it.
fn scratch_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("tchserve-")?;
    let digits = rest.strip_prefix("check-").unwrap_or(rest);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    canonical.then(|| digits.parse().ok()).flatten()
}

/// Whether `path` is a folder (not a link to one) owned by this process's user.
fn owned_folder(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        m.is_dir() && m.uid() == unsafe { libc::geteuid() }
    })
}

/// Whether a process with this pid exists (one owned by another user counts as alive).
fn process_alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the pid exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
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
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<std::io::Result<()>>, ServerError> {
    let bind_err = |source| ServerError::Bind {
        address: address.to_string(),
        source,
    };
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
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
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        }
        Address::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_scratch_names_count() {
        assert_eq!(scratch_pid("tchserve-123"), Some(123));
        assert_eq!(scratch_pid("tchserve-check-45"), Some(45));
        for name in [
            "tchserve-",
            "tchserve-+12",
            "tchserve-007",
            "tchserve-12a",
            "tchserve-check-",
            "tchserve-99999999999",
            "tchserve",
            "other-12",
        ] {
            assert_eq!(scratch_pid(name), None, "{name}");
        }
    }

    #[test]
    fn a_locked_folder_stays_and_an_unlocked_one_goes() {
        let temp = tempfile::tempdir().unwrap();
        // Pids of live processes, so only the lock decides.
        let me = std::process::id();
        let held = temp.path().join(format!("tchserve-{me}"));
        let _lock = lock_scratch(&held).unwrap();
        let released = temp.path().join("tchserve-1");
        drop(lock_scratch(&released).unwrap());
        let unrelated = temp.path().join("tchserve-notes");
        std::fs::create_dir(&unrelated).unwrap();
        remove_stale_scratch(temp.path());
        assert!(held.exists());
        assert!(!released.exists(), "pid 1 lives, but nobody holds the lock");
        assert!(unrelated.exists());
    }
}
