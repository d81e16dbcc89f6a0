//! `tchserve`: TorchServe's command line for the tchserve model server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tchserve_cli::log_writer::BatchedStderr;
use tchserve_cli::{control, startup_check};
use tchserve_runtime::{DevicePolicy, TorchBackend};
use tchserve_server::scratch::{self, Scratch};
use tchserve_server::telemetry::Telemetry;
use tchserve_server::{Config, Options, Stopped};

/// Serves TorchScript models from TorchServe model archives.
#[derive(Debug, Parser)]
#[command(
    name = "tchserve",
    version,
    // As argparse: a flag given twice is no error (wrapper scripts append flags).
    args_override_self = true,
    after_help = "Examples:\n  tchserve --start --model-store model-store --models all\n  tchserve --foreground --model-store model-store --models digits=digits.mar\n  tchserve --stop"
)]
pub struct Args {
    /// Start the server in the background; returns once it serves (listeners bound, models loaded).
    #[arg(long, conflicts_with_all = ["stop", "status", "check"])]
    start: bool,
    /// Stop the running server gracefully and wait for it to exit.
    #[arg(long, conflicts_with_all = ["status", "check"])]
    stop: bool,
    /// Run the server in this terminal (Ctrl-C or SIGTERM stops it gracefully).
    #[arg(long)]
    foreground: bool,
    /// Say whether a server is running.
    #[arg(long)]
    status: bool,
    /// Load every selected archive once through libtorch, report, and exit.
    #[arg(long)]
    check: bool,
    /// Folder holding the model archives (overrides model_store).
    #[arg(long, value_name = "MODEL_STORE")]
    model_store: Option<PathBuf>,
    /// Models to load at start-up: `all`, or `name=archive` / `archive`, separated by spaces or
    /// commas (overrides load_models).
    #[arg(long, value_name = "MODEL_PATH", num_args = 1..)]
    models: Vec<String>,
    /// A config.properties file (TS_CONFIG_FILE takes precedence; default ./config.properties).
    #[arg(long, value_name = "TS_CONFIG")]
    ts_config: Option<PathBuf>,
    /// Neither restore nor write snapshots of the registered models.
    #[arg(long = "no-config-snapshots", visible_alias = "ncs")]
    no_config_snapshots: bool,
    /// Turn token authorization off: no keys are written or asked for.
    #[arg(long = "disable-token-auth", visible_alias = "dt")]
    disable_token_auth: bool,
    /// Allow registering and unregistering models through the management API.
    #[arg(long)]
    enable_model_api: bool,
    /// Set a config.properties key over the file and the TS_ variables (repeatable), e.g.
    /// `--set inference_address=http://0.0.0.0:8080`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Folder for logs, the PID file and snapshots (default: LOG_LOCATION or ./logs).
    #[arg(long, value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// TorchServe's log4j2 configuration: accepted and ignored (tchserve's log level is set
    /// with RUST_LOG).
    #[arg(long, value_name = "LOG_CONFIG")]
    log_config: Option<PathBuf>,
    /// TorchServe's workflow store: accepted and ignored (tchserve has no workflows).
    #[arg(long, value_name = "WORKFLOW_STORE")]
    workflow_store: Option<PathBuf>,
    /// TorchServe's C++ backend log configuration: accepted and ignored.
    #[arg(long, value_name = "CPP_LOG_CONFIG")]
    cpp_log_config: Option<PathBuf>,
    /// TorchServe's plugins folder: accepted and ignored (tchserve has no Java plugins).
    #[arg(long, value_name = "PLUGINS_PATH")]
    plugins_path: Option<PathBuf>,
}

impl Args {
    /// TorchServe flags given that tchserve does not act on.
    fn ignored_flags(&self) -> Vec<&'static str> {
        [
            ("--log-config", self.log_config.is_some()),
            ("--workflow-store", self.workflow_store.is_some()),
            ("--cpp-log-config", self.cpp_log_config.is_some()),
            ("--plugins-path", self.plugins_path.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }
}

/// Set once the log is JSON: the last words go there as JSON too.
static JSON_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check || args.status || args.stop {
        // These print and exit: piped into `head`, they end quietly when the reader does, as
        // command-line tools do, rather than panic on a closed pipe. The server keeps Rust's
        // default, under which a client gone away is an error on its socket.
        // SAFETY: no thread has started yet; restoring a signal's default action is sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = if args.check {
        let scratch = Scratch::create(scratch::CHECK);
        // SAFETY: nothing has started a thread yet (the CUDA probe may, later).
        unsafe { scratch.hold_libtorch_temp() };
        // The server's own configuration decides the settings, as at a start; one that cannot
        // be read fails the check, as it would fail the start.
        // The configuration's model store and start-up models are checked where no flag names
        // others (the flags have replaced the file's keys already), as --start would load them.
        load_config(&args).and_then(|config| {
            startup_check::run(
                &scratch,
                &config,
                config.model_store.as_deref(),
                &config.load_models,
            )
        })
    } else if args.stop {
        // The configuration's grace period, when it can be read, bounds the wait.
        let grace = load_config(&args).ok().map(|c| c.graceful_shutdown_timeout);
        control::stop(&log_dir(&args), grace, log_dir_given(&args))
    } else if args.status {
        control::status(&log_dir(&args), log_dir_given(&args))
    } else if args.start && !args.foreground {
        // The configuration is checked here, so a bad key fails before anything starts, and
        // what the server will only log is said where the user is looking.
        // A second --start is refused before the configuration's notes, which would read as
        // if this one were starting.
        control::refuse_if_running(&log_dir(&args))
            .and_then(|()| load_config(&args))
            .and_then(|config| {
                note_ignored_models(&args, &config);
                if std::process::id() == 1 {
                    // A container's main process: the server started in the background ends
                    // when this process returns, and the container with it.
                    eprintln!(
                        "tchserve: warning: --start runs as process 1 (a container's main \
                         process): the container ends when it returns; use --foreground"
                    );
                }
                for note in &config.warnings {
                    eprintln!("tchserve: warning: {note}");
                }
                for key in &config.ignored_keys {
                    eprintln!(
                        "tchserve: warning: {}",
                        tchserve_server::config::ignored_key_note(key)
                    );
                }
                control::start(&log_dir(&args))
            })
            .map(|()| true)
    } else if args.foreground || args.start {
        if let Ok(config) = load_config(&args) {
            note_ignored_models(&args, &config);
        }
        foreground(&args).map(|()| true)
    } else {
        eprintln!(
            "tchserve: nothing to do; use --start, --foreground, --stop, --status or --check (see --help)"
        );
        return ExitCode::from(2);
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let json = JSON_LOG.load(std::sync::atomic::Ordering::Relaxed);
            if json && tracing::enabled!(tracing::Level::ERROR) {
                // A log read as JSON lines takes the reason as one of them.
                tracing::error!("{}", tchserve_cli::describe(&e));
            } else if json {
                // A RUST_LOG naming only other crates would filter the line above out.
                use std::io::Write;
                let line = serde_json::json!({
                    "level": "ERROR",
                    "fields": {"message": tchserve_cli::describe(&e)},
                    "target": "tchserve",
                });
                let _ = writeln!(std::io::stderr(), "{line}");
            } else {
                // Not eprintln!: where stderr is the log on a full disk, a panic would replace
                // the reason with exit status 101.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "tchserve: {}",
                    tchserve_cli::describe(&e)
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// Says so when the models the user listed (`--models`, or `load_models` or `model_snapshot` in
/// the configuration) will not be loaded because the last snapshot is restored instead: the
/// server logs it, but someone adding a model to their list reads the terminal.
///
/// Also says which settings of the `models` key the snapshot overrides, and when the log folder
/// holds TorchServe's own snapshots, which are not restored by themselves.
fn note_ignored_models(args: &Args, config: &Config) {
    if args.no_config_snapshots {
        return;
    }
    let dir = log_dir(args).join("config");
    let snapshot = match tchserve_server::snapshot::read(&dir) {
        Ok(Some(snapshot)) => snapshot,
        Ok(None) => {
            note_torchserve_snapshots(args, &dir);
            return;
        }
        // The registry it held is not restored: said here, where a restart script's operator
        // looks, as well as in the log.
        Err(e) => {
            eprintln!(
                "tchserve: note: the snapshot cannot be read ({e}); the models registered \
                 before are not restored: the file is kept aside as \
                 snapshot.json.unreadable-<time> in {}, and the server starts from the \
                 configured models",
                dir.display()
            );
            return;
        }
    };
    let listed = if !args.models.is_empty() {
        Some("--models")
    } else if config.model_snapshot.is_some() {
        Some("model_snapshot")
    } else if !config.load_models.is_empty() {
        Some("load_models")
    } else {
        None
    };
    if let Some(listed) = listed {
        eprintln!(
            "tchserve: note: restoring the models registered before, from the snapshot in {}; \
             {listed} is not loaded (--ncs loads {listed} alone, and register a model with the \
             management API to add it to the snapshot)",
            dir.display()
        );
    }
    let kept = tchserve_server::snapshot::settings_not_applied(&snapshot, &config.models);
    if !kept.is_empty() {
        eprintln!(
            "tchserve: note: the snapshot in {} restores these models as they were registered \
             and scaled, not as the models key now sets them: {}. Scale workers with PUT \
             /models/NAME?min_worker=N, register the version again for its batch and timeout \
             settings, or start with --ncs to take the configuration alone",
            dir.display(),
            kept.join("; ")
        );
    }
}

/// Says so when the log folder holds TorchServe's snapshots and no snapshot of tchserve's: a
/// TorchServe started there would restore the newest, and tchserve takes it only when named.
fn note_torchserve_snapshots(args: &Args, dir: &Path) {
    let named = args.ts_config.is_some()
        || std::env::var_os("TS_CONFIG_FILE").is_some_and(|f| !f.is_empty());
    if named {
        return;
    }
    if let Some(cfg) = tchserve_server::snapshot::newest_torchserve_snapshot(dir) {
        eprintln!(
            "tchserve: note: {} holds TorchServe's snapshots, which tchserve does not restore by \
             itself; to serve the models TorchServe had registered, start once with --ts-config \
             {} (its settings and model_snapshot are then the configuration), after which \
             tchserve keeps them in its own snapshot",
            dir.display(),
            cfg.display()
        );
    }
}

fn log_dir(args: &Args) -> PathBuf {
    args.log_dir
        .clone()
        .or_else(|| std::env::var_os("LOG_LOCATION").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("logs"))
}

/// Whether the user named the log folder (`--log-dir` or LOG_LOCATION) rather than taking
/// `./logs`.
fn log_dir_given(args: &Args) -> bool {
    args.log_dir.is_some() || std::env::var_os("LOG_LOCATION").is_some()
}

/// The configuration, located and overridden as TorchServe does: TS_CONFIG_FILE, else
/// --ts-config, else ./config.properties, else defaults; then the command-line flags.
fn load_config(args: &Args) -> anyhow::Result<Config> {
    let env = |k: &str| std::env::var(k).ok();
    let file = std::env::var_os("TS_CONFIG_FILE")
        .filter(|f| !f.is_empty())
        .map(PathBuf::from)
        .or_else(|| args.ts_config.clone())
        .or_else(|| {
            Path::new("config.properties")
                .exists()
                .then(|| PathBuf::from("config.properties"))
        });
    let mut props = match &file {
        Some(f) => tchserve_server::config::read_properties(f)?,
        None => Default::default(),
    };
    // The flags replace the file's keys, and the TS_ variables (where enable_envvars_config
    // lets them in) replace the flags, in TorchServe's order: a deployment's
    // TS_DISABLE_TOKEN_AUTHORIZATION=false keeps tokens on whatever a script passes.
    if let Some(store) = &args.model_store {
        let Some(store) = store.to_str() else {
            bail!("--model-store {}: not a UTF-8 path", store.display());
        };
        props.insert("model_store".into(), store.into());
    }
    if !args.models.is_empty() {
        props.insert("load_models".into(), args.models.join(","));
    }
    if args.enable_model_api {
        props.insert("enable_model_api".into(), "true".into());
    }
    if args.disable_token_auth {
        props.insert("disable_token_authorization".into(), "true".into());
    }
    let mut overrides = std::collections::BTreeMap::new();
    for item in &args.set {
        let Some((key, value)) = item.split_once('=') else {
            bail!("--set {item}: expected KEY=VALUE");
        };
        overrides.insert(key.trim().to_string(), value.trim().to_string());
    }
    let mut cfg = Config::layered(&props, &overrides, &env)?;
    cfg.source = file;
    if let Some(store) = &cfg.model_store
        && !store.is_dir()
    {
        let named_by = if args.model_store.as_ref() == Some(store) {
            "--model-store"
        } else {
            "config key model_store:"
        };
        bail!("{named_by} {}: not a directory", store.display());
    }
    Ok(cfg)
}

/// Writes the waiting log lines when dropped.
struct FlushOnDrop(BatchedStderr);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}

fn foreground(args: &Args) -> anyhow::Result<()> {
    let config = load_config(args)?;
    let dir = log_dir(args);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch::create(scratch::SERVER);
    // SAFETY: nothing has started a thread yet; the log writer and the runtime come below.
    unsafe { scratch.hold_libtorch_temp() };
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let log = BatchedStderr::start();
    // Under --start, stderr is the log file: it rolls over rather than fill the disk (where the
    // snapshot is written too).
    if config.log_max_bytes > 0 {
        log.roll_over(
            &dir.join(control::LOG_FILE),
            config.log_max_bytes,
            config.log_max_files,
        );
    }
    // Every way out of here writes what waits: a return, an error, a panic.
    let _flush = FlushOnDrop(log.clone());
    let previous_hook = std::panic::take_hook();
    let on_panic = log.clone();
    std::panic::set_hook(Box::new(move |info| {
        on_panic.flush();
        previous_hook(info);
    }));
    if config.json_logs {
        JSON_LOG.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter())
            .with_writer(log.clone())
            .init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(log.clone())
            .with_ansi(ansi)
            .init();
        // Access lines carry no colours and, without traces, are written outside any span: the
        // sink then writes the very text the formatter would. A filter on span or field values
        // (`access[{status=500}]`) can only be applied to the event itself, so it keeps it.
        let filters_on_values = std::env::var("RUST_LOG").is_ok_and(|f| f.contains('['));
        if !ansi && config.otlp_endpoint.is_none() && !filters_on_values {
            tchserve_server::frontends::set_access_sink(log.access_sink());
        }
    }
    for flag in args.ignored_flags() {
        tracing::warn!("{flag} is TorchServe's and not used by tchserve; ignoring it");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    // Caught from here on: a stop sent while the server starts is kept, not fatal. The PID
    // file comes after, so whoever reads it to send a stop finds the signal caught.
    let (shutdown, cut_short) = {
        let _in_runtime = runtime.enter();
        control::shutdown_signal()?
    };
    let pid_file = control::PidFile::create(&dir, config.graceful_shutdown_timeout)?;
    let telemetry = match &config.otlp_endpoint {
        Some(endpoint) => Some(Telemetry::start(endpoint, runtime.handle().clone())?),
        None => None,
    };
    let started = Instant::now();
    // The GPU probe may load libtorch's CUDA half: before the listeners, off the async threads.
    let backend = TorchBackend::new(
        DevicePolicy::from_number_of_gpu(config.number_of_gpu),
        config.cpu_threads,
    )
    .with_gpu_forward_threads(config.gpu_forward_threads);
    match &backend.cuda().reason {
        None => tracing::info!(gpus = backend.cuda().devices, "CUDA available"),
        Some(why) => tracing::info!("serving on CPU: {why}"),
    }
    let stopped = runtime.block_on(tchserve_server::run(
        Options {
            config,
            backend: std::sync::Arc::new(backend),
            snapshots: !args.no_config_snapshots,
            log_dir: dir,
            key_file: PathBuf::from("key_file.json"),
            scratch,
        },
        shutdown,
        cut_short,
        control::signal_ready,
    ));
    // The last spans go out while the runtime that sends them still runs.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    let stopped = stopped?;
    let running = tchserve_runtime::worker_threads_running();
    if stopped == Stopped::Drained && running > 0 {
        tracing::warn!(
            threads = running,
            "a worker taken out of its model version is still inside a forward; exiting without waiting for it"
        );
    }
    if stopped == Stopped::GraceExpired || running > 0 {
        // A worker may still be inside a forward or a load: running libtorch's static
        // destructors under it could crash the exit, so leave without them.
        use std::io::Write;
        log.flush();
        let _ = std::io::stderr().flush();
        drop(pid_file);
        // SAFETY: _exit ends the process at once; nothing after this point needs to run.
        unsafe { libc::_exit(0) };
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    tracing::debug!(uptime_s = started.elapsed().as_secs(), "exit");
    Ok(())
}
