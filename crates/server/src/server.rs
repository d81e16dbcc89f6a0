//! Starting and stopping the server: start-up models or snapshot, three listeners, graceful stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::serve::ListenerExt;
use tchserve_backend::Backend;
use tchserve_mar::ModelStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::{KeyFileGuard, Tokens};
use crate::config::{Address, Config};
use crate::core::error::ApiError;
use crate::core::registry::{Origin, Registered};
use crate::core::store_poll::{self, StorePoller};
use crate::core::{Infer, RegisterParams, Registry};
use crate::frontends::{self, AppContext, AppState};
use crate::listener::{self, ConnectionLimits};
use crate::metrics::Metrics;
use crate::scratch::{self, Scratch};
use crate::snapshot::{self, Snapshots};

/// How to run.
#[derive(Debug)]
pub struct Options {
    /// Settings.
    pub config: Config,
    /// What runs the models.
    pub backend: Arc<dyn Backend>,
    /// Write and restore snapshots (off with `--ncs`).
    pub snapshots: bool,
    /// Folder for logs and snapshots.
    pub log_dir: PathBuf,
    /// Where token authorization publishes its keys (TorchServe: `key_file.json` in the
    /// working folder).
    pub key_file: PathBuf,
    /// Where archives are extracted; removed when the server ends.
    pub scratch: Scratch,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model store is unusable.
    #[error("{0}")]
    Store(String),
    /// A model the server was told to start with cannot be loaded.
    #[error("{0}")]
    Models(String),
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
    /// The TLS certificate or key cannot be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Runs the server until `shutdown` completes, then stops gracefully: readiness turns false,
/// listeners stop accepting, in-flight requests finish, queued jobs are answered, workers exit,
/// all within `graceful_shutdown_timeout`, or until `cut_short` completes, whichever is first.
///
/// `ready` is called once the listeners are bound and the start-up models loaded, when the
/// server starts answering.
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
    cut_short: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(),
) -> Result<Stopped, ServerError> {
    let started = Instant::now();
    let config = Arc::new(opts.config);
    match &config.source {
        Some(file) => tracing::info!("configuration read from {}", file.display()),
        None => tracing::info!("no configuration file; defaults and the command line"),
    }
    for note in &config.warnings {
        tracing::warn!("{note}");
    }
    for key in &config.ignored_keys {
        tracing::warn!("{}", crate::config::ignored_key_note(key));
    }
    // Read before any model loads: a wrong path or a key that does not match its certificate
    // should stop the start at once.
    let identity = match (&config.certificate_file, &config.private_key_file) {
        (Some(cert), Some(key)) => Some(crate::tls::Identity::load(cert, key)?),
        _ => None,
    };
    // Looked at before anything else is touched: a start on taken ports fails at once rather
    // than after minutes of loading models. They are bound for good only once the models have
    // loaded, so that until then a connection is refused, which every health check reads as
    // not ready (one that waited in the listen backlog would pass a TCP check).
    let listeners = listeners(&config);
    for (address, _) in &listeners {
        probe_free(address, address.to_string()).await?;
    }
    for (host, port) in [&config.grpc_inference, &config.grpc_management] {
        let address = Address::Tcp(host.clone(), *port);
        probe_free(&address, format!("{host}:{port} (gRPC)")).await?;
    }
    let store = match &config.model_store {
        Some(dir) => Some(ModelStore::open(dir).map_err(|e| ServerError::Store(e.to_string()))?),
        None => None,
    };
    scratch::remove_stale(scratch::temp_root());
    // Dropped last, after the registry and its workers: every way out removes the folder.
    let scratch = opts.scratch;
    let registry = Arc::new(Registry::new(
        Arc::clone(&config),
        store.clone(),
        scratch.path().to_path_buf(),
        opts.backend,
    ));
    // From here on, before the start-up models load: a start that hangs is what an operator
    // most wants to look into.
    report_on_quit(Arc::clone(&registry));
    let metrics = Metrics::new();
    replace_stuck_workers(Arc::clone(&registry), metrics.clone());
    let mut state = AppContext {
        registry: Arc::clone(&registry),
        infer: Infer::new(
            Arc::clone(&registry),
            metrics.clone(),
            config.max_response_size,
        ),
        metrics,
        config: Arc::clone(&config),
        snapshots: opts.snapshots.then(|| {
            Arc::new(Snapshots::new(
                opts.log_dir.join("config"),
                Arc::clone(&registry),
            ))
        }),
        tokens: None,
    };

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
    // The last snapshot wins, then the configuration's model_snapshot, then load_models, as in
    // TorchServe (where a snapshot is a configuration file holding a model_snapshot).
    let from_snapshot = restored.is_some();
    let registrations = match (&restored, &config.model_snapshot) {
        (Some(s), _) => {
            tracing::info!(
                "restoring models from the snapshot (model_snapshot, load_models and --models are ignored)"
            );
            snapshot::registrations(s)
        }
        (None, Some(s)) => {
            tracing::info!(
                "loading the models of model_snapshot (load_models and --models are ignored)"
            );
            snapshot::registrations(s)
        }
        (None, None) => startup_models(&config, store.as_ref())?,
    };
    // Versions of one model are registered in order so the default ends up right; models load
    // in parallel. An archive listed without `name=` is grouped by its url, since its model name
    // is known only once it is open: the defaults are set after loading, below.
    let mut by_model: std::collections::BTreeMap<String, Vec<(usize, RegisterParams)>> =
        Default::default();
    for (i, p) in registrations.into_iter().enumerate() {
        by_model
            .entry(p.model_name.clone().unwrap_or_else(|| p.url.clone()))
            .or_default()
            .push((i, p));
    }
    let loads: Vec<_> = by_model
        .into_values()
        .map(|regs| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let mut failed = Vec::new();
                let mut loaded = Vec::new();
                for (i, p) in regs {
                    let url = p.url.clone();
                    match load_at_start(&registry, p).await {
                        Ok(r) => {
                            // Ready may be fewer than asked for: a restored model whose workers fail stays registered.
                            let ready = r.model.pool.ready_count();
                            tracing::info!(model = %r.model.name, version = %r.model.version, workers = r.workers, ready, "model loaded");
                            loaded.push((i, r.model.name.clone(), r.model.version.clone()));
                        }
                        Err(e) => {
                            // Logged without the URL's query, where a presigned one carries its
                            // signature.
                            let shown = crate::core::fetch::shown_text(&url);
                            let why = crate::core::fetch::shown_text(&e.to_string());
                            tracing::error!(url = %shown, "cannot load model: {why}");
                            failed.push((url.clone(), format!("{shown}: {why}")));
                        }
                    }
                }
                (failed, loaded)
            })
        })
        .collect();
    // A server that starts without a model it was told to serve looks healthy and answers 404:
    // refuse to start instead, naming each model and why.
    // A stop asked for while models load is not left waiting for the listeners: the loads
    // get the grace period to end, then their workers stop.
    let mut shutdown = Box::pin(shutdown);
    let cut_short = Box::pin(cut_short);
    let mut loading = std::pin::pin!(async {
        let mut failed = Vec::new();
        let mut loaded = Vec::new();
        for l in loads {
            match l.await {
                Ok((f, l)) => {
                    failed.extend(f);
                    loaded.extend(l);
                }
                Err(e) => failed.push((String::new(), format!("loading panicked: {e}"))),
            }
        }
        (failed, loaded)
    });
    let (mut failed, mut loaded) = tokio::select! {
        done = &mut loading => done,
        () = &mut shutdown => {
            let stopping = stop_while_starting(&registry, config.graceful_shutdown_timeout, loading);
            return Ok(unless_cut_short(stopping, cut_short).await);
        }
    };
    // Of the versions of a model, the one listed first is its default, as TorchServe registers
    // the list in order (a snapshot names its default itself).
    if !from_snapshot && config.model_snapshot.is_none() {
        loaded.sort();
        let mut seen = std::collections::HashSet::new();
        for (_, name, version) in loaded {
            if seen.insert(name.clone()) {
                // Every version here was just registered: setting a default cannot fail.
                let _ = registry.set_default(&name, &version);
            }
        }
    }
    // With polling on, the store decides what serves: a model whose archive left the store
    // while the server was down must not keep it from starting. Any other failure still does.
    if let (Some(_), Some(store)) = (config.model_store_poll_interval, &store) {
        failed.retain(|(url, why)| {
            let gone = store
                .entry_name(url)
                .is_some_and(|name| !store.root().join(name).exists());
            if gone {
                tracing::warn!("{why}; its archive is no longer in the model store");
            }
            !gone
        });
    }
    let failed: Vec<String> = failed.into_iter().map(|(_, why)| why).collect();
    if !failed.is_empty() {
        let hint = if from_snapshot {
            "fix or restore the archives, or start with --ncs to leave the snapshot out"
        } else {
            "fix the archives or the model list"
        };
        return Err(ServerError::Models(format!(
            "{} start-up model(s) cannot be loaded ({hint}):\n  {}",
            failed.len(),
            failed.join("\n  ")
        )));
    }
    // With polling on, the store's archives serve from the start, as they will after each poll.
    let poller = match (config.model_store_poll_interval, &store) {
        (Some(every), Some(store)) => {
            let poller = Arc::new(StorePoller::new(
                Arc::clone(&registry),
                store.clone(),
                config.version_policy.clone(),
                config.version_policies.clone(),
            ));
            let first = Arc::clone(&poller);
            let mut polling = tokio::task::spawn_blocking(move || {
                // Nothing serves yet but what a snapshot restored: no traffic to wait for.
                store_poll::drain(first.poll_once().unloaded)
            });
            tokio::select! {
                _ = &mut polling => {}
                () = &mut shutdown => {
                    // The poll stops before its next load; the one under way gets the grace.
                    poller.stop();
                    let stopping = stop_while_starting(&registry, config.graceful_shutdown_timeout, polling);
                    return Ok(unless_cut_short(stopping, cut_short).await);
                }
            }
            Some((poller, every))
        }
        (Some(_), None) => {
            tracing::warn!("model_store_poll_interval is set but there is no model store to poll");
            None
        }
        _ => None,
    };
    // A start that registered nothing writes no snapshot: one holding no models would be
    // restored at the next start in place of the models configured for it then (TorchServe's
    // own snapshot named with --ts-config, say).
    let registered = !state.registry.names().is_empty();
    if (!from_snapshot && registered) || poller.is_some() {
        state.save_snapshot().await;
    }

    // Bound only now, and before the key file is written: ports taken while the models loaded
    // fail the start here and touch nothing the server that holds them owns (its key file
    // above all).
    let mut bound = Vec::new();
    for (address, _) in &listeners {
        bound.push(bind(address, identity.as_ref()).await?);
    }
    let mut grpc_bound = Vec::new();
    for (host, port) in [&config.grpc_inference, &config.grpc_management] {
        let listener = tokio::net::TcpListener::bind((host.as_str(), *port))
            .await
            .map_err(|source| ServerError::Bind {
                address: format!("{host}:{port} (gRPC)"),
                source,
            })?;
        grpc_bound.push(listener);
    }
    if config.disable_token_authorization {
        tracing::info!("token authorization is off");
    } else {
        let t = Tokens::create(opts.key_file.clone(), config.token_expiration)?;
        tracing::info!("token authorization is on: keys in {}", t.file().display());
        state.tokens = Some(Arc::new(t));
    }
    let _key_file = state.tokens.clone().map(KeyFileGuard);
    let state = AppState::from(state);
    let open_files = listener::raise_open_files_limit();
    let limits = ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        keep_alive_timeout: config.keep_alive_timeout,
        // A body may stall as long one way as the other.
        write_timeout: config.body_read_timeout,
        max_connections: config
            .max_connections
            .unwrap_or_else(|| listener::default_max_connections(open_files)),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let routers = listeners
        .iter()
        .map(|(_, apis)| frontends::router_for(apis, state.clone()));
    let mut servers: Vec<_> = bound
        .into_iter()
        .zip(routers)
        .map(|(listener, router)| {
            // Only with traces on: even an idle middleware costs a busy server a tenth of
            // its small-model throughput.
            let router = if config.otlp_endpoint.is_some() {
                router.layer(axum::middleware::from_fn(crate::telemetry::trace_requests))
            } else {
                router
            };
            let router = frontends::ignoring_trailing_slash(router);
            listener.serve(router, limits, stop_rx.clone())
        })
        .collect();
    let grpc_identity = identity.as_ref().filter(|_| config.enable_grpc_ssl);
    for (listener, router) in grpc_bound.into_iter().zip(grpc_routers(
        &state,
        grpc_identity,
        limits.header_read_timeout,
    )?) {
        servers.push(tokio::spawn(frontends::grpc::serve(
            listener,
            router,
            limits.max_connections,
            limits.header_read_timeout,
            stop_rx.clone(),
        )));
    }
    let poller = poller.map(|(poller, every)| {
        servers.push(tokio::spawn(poll_store(
            Arc::clone(&poller),
            every,
            state.clone(),
            stop_rx.clone(),
        )));
        poller
    });
    tracing::info!(
        inference = %config.inference_address,
        management = %config.management_address,
        metrics = %if config.enable_metrics_api {
            config.metrics_address.to_string()
        } else {
            "off".into()
        },
        grpc_inference = %format!("{}:{}", config.grpc_inference.0, config.grpc_inference.1),
        grpc_management = %format!("{}:{}", config.grpc_management.0, config.grpc_management.1),
        max_connections = limits.max_connections,
        startup_ms = started.elapsed().as_millis() as u64,
        "tchserve is serving"
    );
    ready();

    shutdown.await;
    let grace = config.graceful_shutdown_timeout;
    let deadline = tokio::time::Instant::now() + grace;
    // Unready before anything else: from here on nothing answers ready, while /ping stays
    // healthy so that liveness probes leave a draining server alone.
    state.infer.begin_stop();
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopping: unready, no new connections; answering the requests in flight and queued"
    );
    let _ = stop_tx.send(true);
    // No request is accepted any more: a batch waiting to fill would only delay the answers.
    registry.close_batches();
    // A poll under way ends before its next load rather than after all of them.
    if let Some(p) = &poller {
        p.stop();
    }
    let aborts: Vec<_> = servers.iter().map(|s| s.abort_handle()).collect();
    // Taken before the workers stop (which empties the registry), to say what a cut cuts.
    let serving = registry.snapshot_entries();
    let draining = async {
        let listeners_done =
            tokio::time::timeout_at(deadline, futures_util::future::join_all(servers))
                .await
                .is_ok();
        if !listeners_done {
            for a in &aborts {
                a.abort();
            }
        }
        let workers_done = stop_workers(&registry, deadline).await;
        if listeners_done && workers_done {
            tracing::info!("stopped");
            Stopped::Drained
        } else {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "graceful_shutdown_timeout passed with work unfinished; cutting it off"
            );
            Stopped::GraceExpired
        }
    };
    let stopped = unless_cut_short(draining, cut_short).await;
    if stopped == Stopped::GraceExpired {
        for a in &aborts {
            a.abort();
        }
        // What was cut: requests still queued and batches still running, in their model
        // versions or, once those stopped, out of them.
        for (name, entry) in serving {
            for (version, m) in entry.versions {
                let queued = m.pool.queue_len();
                if queued > 0 {
                    tracing::warn!(model = %name, version = %version, queued, "requests cut off unanswered");
                }
                for w in m.pool.workers() {
                    if let Some(ran) = w.busy {
                        tracing::warn!(model = %name, version = %version, worker = w.id, ran_ms = ran.as_millis() as u64, "cut off inside a batch");
                    }
                }
            }
        }
        for thread in registry.lingering() {
            tracing::warn!("cut off before it returned: {thread}");
        }
        tracing::info!("stopped, with work cut off");
    }
    Ok(stopped)
}

/// Runs a graceful stop unless `cut_short` completes first: then what is in flight is not
/// waited for, as after the grace period.
async fn unless_cut_short(
    stopping: impl Future<Output = Stopped>,
    cut_short: impl Future<Output = ()>,
) -> Stopped {
    tokio::select! {
        stopped = stopping => stopped,
        () = cut_short => {
            tracing::warn!("asked again to stop: not waiting for the requests in flight and queued");
            Stopped::GraceExpired
        }
    }
}

/// On each SIGQUIT (`kill -3`, Ctrl-\\), logs every model version's workers and queue and keeps
/// serving: where a JVM operator reads a thread dump to see what a server is stuck on.
fn report_on_quit(registry: Arc<Registry>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut quit) = signal(SignalKind::quit()) else {
        return;
    };
    tokio::spawn(async move {
        while quit.recv().await.is_some() {
            let entries = registry.snapshot_entries();
            tracing::info!(models = entries.len(), "state, as asked by SIGQUIT");
            for (name, entry) in entries {
                for (version, m) in entry.versions {
                    tracing::info!(
                        model = %name,
                        version = %version,
                        queued = m.pool.queue_len(),
                        workers = %describe_workers(m.pool.as_ref()),
                        "state"
                    );
                }
            }
            for thread in registry.lingering() {
                tracing::info!("out of its model version, not returned yet: {thread}");
            }
            // Not listed until their workers have started: what a hung start waits on.
            for s in registry.starting() {
                tracing::info!(
                    model = %s.name,
                    version = %s.version,
                    workers = %describe_workers(s.pool.as_ref()),
                    "registering, waiting for its workers"
                );
            }
        }
    });
}

/// `9000:Ready 9001:Starting`.
fn describe_workers(pool: &dyn tchserve_backend::Workers) -> String {
    let workers: Vec<String> = pool
        .workers()
        .iter()
        .map(|w| match w.busy {
            Some(ran) => format!(
                "{}:{:?}(in a batch for {} ms)",
                w.id,
                w.state,
                ran.as_millis()
            ),
            None => format!("{}:{:?}", w.id, w.state),
        })
        .collect();
    workers.join(" ")
}

/// How often the workers are checked for one stuck in a batch past its response timeout: the
/// requests queued behind it wait at most this much longer than they would for a free worker.
const STUCK_CHECK: Duration = Duration::from_secs(1);

/// Replaces, for as long as the server runs, every worker stuck in one batch past its
/// response timeout (see [`tchserve_backend::Workers::replace_stuck`]).
fn replace_stuck_workers(registry: Arc<Registry>, metrics: Metrics) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(STUCK_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (name, version, n) in registry.replace_stuck_workers() {
                metrics
                    .workers_replaced
                    .with_label_values(&[&name, &version])
                    .inc_by(n as u64);
            }
        }
    });
}

/// A stop that came while the server started: `starting` (the loads under way) gets the
/// grace period to end, then every worker stops.
async fn stop_while_starting(
    registry: &Registry,
    grace: Duration,
    starting: impl Future,
) -> Stopped {
    tracing::info!(
        grace_s = grace.as_secs(),
        "stopping while the start-up models load"
    );
    let deadline = tokio::time::Instant::now() + grace;
    let loaded = tokio::time::timeout_at(deadline, starting).await.is_ok();
    if loaded && stop_workers(registry, deadline).await {
        tracing::info!("stopped");
        Stopped::Drained
    } else {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "graceful_shutdown_timeout passed with models still loading"
        );
        Stopped::GraceExpired
    }
}

/// Stops every model's workers by `deadline`; false when the queues were not answered and the
/// idle workers gone in time. A worker inside a batch is not waited for (see
/// [`tchserve_backend::Workers::shutdown`]).
async fn stop_workers(registry: &Registry, deadline: tokio::time::Instant) -> bool {
    let models = registry.drain();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // Workers drain what is still queued (nothing, when every listener finished) and exit;
    // a forward that outlives the grace period is not waited for.
    let workers = tokio::task::spawn_blocking(move || {
        for m in models {
            m.pool.shutdown(left);
        }
    });
    tokio::time::timeout(left.max(Duration::from_millis(100)), workers)
        .await
        .is_ok()
}

/// Polls the model store every `every` until the server stops; see [`store_poll`].
async fn poll_store(
    poller: Arc<StorePoller>,
    every: Duration,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // A slow poll (a large model loading) is not followed by a burst of catch-up polls.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // A stop wins over a tick that is due at the same moment.
            biased;
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let p = Arc::clone(&poller);
        let Ok(changes) = tokio::task::spawn_blocking(move || p.poll_once()).await else {
            continue;
        };
        if changes.is_empty() {
            continue;
        }
        state.forget_metrics(&changes.unloaded);
        state.save_snapshot().await;
        // Unloaded versions answer what they have queued before the next poll, and before a
        // stop lets the process exit under them.
        let _ = tokio::task::spawn_blocking(move || store_poll::drain(changes.unloaded)).await;
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every accepted request was answered and every worker exited.
    Drained,
    /// `graceful_shutdown_timeout` passed first, or the stop was cut short; worker threads may
    /// still be running a forward or a load.
    GraceExpired,
}

/// The gRPC inference listener's services (TorchServe's and the v2 protocol's) and the gRPC
/// management listener's, each behind its key.
fn grpc_routers(
    state: &AppState,
    identity: Option<&crate::tls::Identity>,
    handshake_timeout: Duration,
) -> Result<[frontends::grpc::TracedRouter; 2], ServerError> {
    use crate::auth::Scope;
    use frontends::grpc::require_key;
    use tonic::service::interceptor::InterceptedService;
    let tokens = state.tokens.clone();
    // Large tensors travel in one message: let HTTP/2's flow-control windows grow to fit them
    // rather than stall every 64 KiB.
    let builder = || -> Result<tonic::transport::Server, ServerError> {
        let server = tonic::transport::Server::builder()
            .http2_adaptive_window(Some(true))
            .max_frame_size(Some(1 << 20))
            .max_concurrent_streams(Some(256))
            // A peer that vanished (its machine gone, a cable pulled) holds a connection until
            // a ping goes unanswered.
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        let Some(id) = identity else {
            return Ok(server);
        };
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &id.cert_pem,
                &id.key_pem,
            ))
            .timeout(handshake_timeout);
        server
            .tls_config(tls)
            .map_err(|e| ServerError::Tls(crate::tls::TlsError::Grpc(e.to_string())))
    };
    let tracing_on = state.config.otlp_endpoint.is_some();
    let traced = || tower::util::option_layer(tracing_on.then_some(crate::telemetry::TraceLayer));
    let inference = builder()?
        .layer(traced())
        .layer(frontends::grpc::AccessLayer)
        .add_service(InterceptedService::new(
            frontends::torchserve::grpc::inference_service(state.clone()),
            require_key(tokens.clone(), Scope::Inference),
        ))
        // Health is open, as /ping is; the v2 service checks keys per call, since its
        // repository calls take the management key.
        .add_service(frontends::v2::grpc::service(state.clone()))
        .add_service(frontends::v2::grpc::torchserve_named_service(state.clone()));
    let management = builder()?
        .layer(traced())
        .layer(frontends::grpc::AccessLayer)
        .add_service(InterceptedService::new(
            frontends::torchserve::grpc::management_service(state.clone()),
            require_key(tokens, Scope::Management),
        ));
    Ok([inference, management])
}

/// Registers a start-up model, downloading it into the model store first when it is a URL, as
/// TorchServe downloads the URLs of `load_models` and `--models` (checked by `allowed_urls`).
async fn load_at_start(
    registry: &Arc<Registry>,
    mut p: RegisterParams,
) -> Result<Registered, ApiError> {
    let mut fresh_download = None;
    if crate::core::fetch::is_remote(&p.url) {
        let fetched = registry.fetch_archive(&p.url).await?;
        p.url = fetched.name.clone();
        fresh_download = fetched.fresh.then_some(fetched.name);
    }
    let owner = Arc::clone(registry);
    let registered = tokio::task::spawn_blocking(move || owner.register(&p))
        .await
        .map_err(|e| ApiError::internal(format!("loading panicked: {e}")))
        .and_then(|r| r);
    if registered.is_err()
        && let Some(name) = fresh_download
    {
        registry.discard_download(&name);
    }
    registered
}

/// Registrations for `load_models` / `--models`.
fn startup_models(
    config: &Config,
    store: Option<&ModelStore>,
) -> Result<Vec<RegisterParams>, ServerError> {
    let mut out = Vec::new();
    for item in &config.load_models {
        let refs = ModelStore::expand(store, item)
            .map_err(|e| ServerError::Models(format!("load_models {item}: {e}")))?;
        if refs.is_empty()
            && let Some(store) = store
        {
            // Healthy and serving nothing: say so, where an empty volume is the likely cause.
            tracing::warn!(
                "load_models={item}: the model store {} holds no archive; serving no model",
                store.root().display()
            );
        }
        out.extend(refs.into_iter().map(|r| startup(r.name, r.url)));
    }
    Ok(out)
}

fn startup(model_name: Option<String>, url: String) -> RegisterParams {
    RegisterParams {
        url,
        model_name,
        synchronous: true,
        origin: Origin::Startup,
        ..RegisterParams::default()
    }
}

/// The REST listeners to bind, each with the APIs it serves. APIs given the same address share
/// one listener, as TorchServe serves inference and management (and metrics) together when
/// their addresses are equal; a port of 0 asks the system for a fresh port each time, so such
/// addresses are never merged. As in TorchServe, a listener shared by inference and management
/// serves the metrics too (where the metrics API is on), besides the metrics' own address:
/// KServe's TorchServe configuration scrapes them there.
fn listeners(config: &Config) -> Vec<(Address, Vec<frontends::Api>)> {
    use frontends::Api;
    let mut apis = vec![
        (&config.inference_address, Api::Inference),
        (&config.management_address, Api::Management),
    ];
    if config.enable_metrics_api {
        apis.push((&config.metrics_address, Api::Metrics));
    }
    let mut out: Vec<(Address, Vec<Api>)> = Vec::new();
    for (address, api) in apis {
        let fresh_port = matches!(address, Address::Tcp(_, 0) | Address::Https(_, 0));
        match out.iter_mut().find(|(a, _)| a == address && !fresh_port) {
            Some((_, served)) => served.push(api),
            None => out.push((address.clone(), vec![api])),
        }
    }
    if config.enable_metrics_api {
        for (_, served) in &mut out {
            if served.contains(&Api::Inference)
                && served.contains(&Api::Management)
                && !served.contains(&Api::Metrics)
            {
                served.push(Api::Metrics);
            }
        }
    }
    out
}

/// A listener bound to its address, not yet answering.
enum Bound {
    Tcp(tokio::net::TcpListener),
    Tls(tokio::net::TcpListener, tokio_rustls::TlsAcceptor),
    Unix(tokio::net::UnixListener),
}

/// Fails as [`bind`] would when `address` (named `shown` in the error) is taken, and holds
/// nothing.
async fn probe_free(address: &Address, shown: String) -> Result<(), ServerError> {
    let free = match address {
        Address::Tcp(host, port) | Address::Https(host, port) => {
            tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map(drop)
        }
        Address::Unix(path) => unanswered(path),
    };
    free.map_err(|source| ServerError::Bind {
        address: shown,
        source,
    })
}

/// Refuses a Unix socket someone answers on: it belongs to a running server.
fn unanswered(path: &std::path::Path) -> std::io::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is listening on this socket",
        )),
        Err(_) => Ok(()),
    }
}

async fn bind(
    address: &Address,
    identity: Option<&crate::tls::Identity>,
) -> Result<Bound, ServerError> {
    let bind_err = |source| ServerError::Bind {
        address: address.to_string(),
        source,
    };
    Ok(match address {
        Address::Tcp(host, port) => Bound::Tcp(
            tokio::net::TcpListener::bind((host.as_str(), *port))
                .await
                .map_err(bind_err)?,
        ),
        Address::Https(host, port) => {
            // The configuration refuses https without both files, so this holds.
            let identity = identity.ok_or_else(|| {
                ServerError::Store("https needs certificate_file and private_key_file".into())
            })?;
            Bound::Tls(
                tokio::net::TcpListener::bind((host.as_str(), *port))
                    .await
                    .map_err(bind_err)?,
                identity.http_acceptor()?,
            )
        }
        Address::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                // One nobody answers on was left by a server that died, and goes.
                unanswered(path).map_err(bind_err)?;
                let _ = std::fs::remove_file(path);
            }
            Bound::Unix(tokio::net::UnixListener::bind(path).map_err(bind_err)?)
        }
    })
}

impl Bound {
    /// Starts answering on the listener until `stop` turns true.
    fn serve(
        self,
        router: Router,
        limits: ConnectionLimits,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        match self {
            Bound::Tcp(listener) => {
                // Small JSON replies must not wait on Nagle's algorithm.
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(listener::serve(listener, router, limits, stop))
            }
            Bound::Tls(listener, acceptor) => {
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(listener::serve_tls(
                    listener, acceptor, router, limits, stop,
                ))
            }
            Bound::Unix(listener) => tokio::spawn(listener::serve(listener, router, limits, stop)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use frontends::Api;

    #[test]
    fn apis_on_one_address_share_a_listener_but_fresh_ports_never_do() {
        let at = |port| Address::Tcp("127.0.0.1".into(), port);
        let config = |i, m, x, metrics_on| Config {
            inference_address: at(i),
            management_address: at(m),
            metrics_address: at(x),
            enable_metrics_api: metrics_on,
            ..Config::default()
        };
        assert_eq!(
            listeners(&config(1, 2, 3, true)),
            vec![
                (at(1), vec![Api::Inference]),
                (at(2), vec![Api::Management]),
                (at(3), vec![Api::Metrics])
            ]
        );
        assert_eq!(
            listeners(&config(1, 1, 3, true)),
            vec![
                (at(1), vec![Api::Inference, Api::Management, Api::Metrics]),
                (at(3), vec![Api::Metrics])
            ]
        );
        assert_eq!(
            listeners(&config(1, 2, 2, true)),
            vec![
                (at(1), vec![Api::Inference]),
                (at(2), vec![Api::Management, Api::Metrics])
            ]
        );
        assert_eq!(
            listeners(&config(1, 1, 1, false)),
            vec![(at(1), vec![Api::Inference, Api::Management])]
        );
        assert_eq!(listeners(&config(0, 0, 0, true)).len(), 3);
    }
}
