//! Server configuration: TorchServe's `config.properties` keys, environment overrides, defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::core::bounds;
use crate::core::store_poll::VersionPolicy;

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP host and port.
    Tcp(String, u16),
    /// TCP host and port, speaking TLS (`certificate_file` and `private_key_file`).
    Https(String, u16),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl Address {
    /// Parses `http://host:port`, `https://host:port` or `unix:/path`.
    pub fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Value {
            key: key.into(),
            value: s.into(),
            reason: why.into(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(bad("a unix socket path must be absolute"));
            }
            return Ok(Address::Unix(path.into()));
        }
        let (tls, rest) = match (s.strip_prefix("https://"), s.strip_prefix("http://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => {
                return Err(bad(
                    "expected http://host:port, https://host:port or unix:/path",
                ));
            }
        };
        let rest = rest.trim_end_matches('/');
        // An IPv6 host is bracketed: http://[::1]:8080.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed [ in the host"))?;
                (h, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            },
        };
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| bad("expected a port number, 0 to 65535"))?,
            None if tls => 443,
            None => 80,
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let host = host.to_string();
        Ok(if tls {
            Address::Https(host, port)
        } else {
            Address::Tcp(host, port)
        })
    }

    /// Whether the listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Address::Https(..))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(h, p) if h.contains(':') => write!(f, "http://[{h}]:{p}"),
            Address::Tcp(h, p) => write!(f, "http://{h}:{p}"),
            Address::Https(h, p) if h.contains(':') => write!(f, "https://[{h}]:{p}"),
            Address::Https(h, p) => write!(f, "https://{h}:{p}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key has a value that cannot be used.
    #[error("config key {key}: bad value {value:?}: {reason}")]
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why it is wrong.
        reason: String,
    },
}

/// Per-model settings from the `models` key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelDefaults {
    /// minWorkers.
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub min_workers: Option<i64>,
    /// maxWorkers.
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub max_workers: Option<i64>,
    /// batchSize.
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub batch_size: Option<i64>,
    /// maxBatchDelay (ms).
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub max_batch_delay: Option<i64>,
    /// responseTimeout (s).
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub response_timeout: Option<i64>,
    /// startupTimeout (s).
    #[serde(default, deserialize_with = "number_or_numeric_text")]
    pub startup_timeout: Option<i64>,
    /// defaultVersion.
    pub default_version: Option<bool>,
    /// marName.
    pub mar_name: Option<String>,
}

/// The settings a version takes in the `models` key, as TorchServe names them.
const MODEL_SETTINGS: [&str; 8] = [
    "minWorkers",
    "maxWorkers",
    "batchSize",
    "maxBatchDelay",
    "responseTimeout",
    "startupTimeout",
    "defaultVersion",
    "marName",
];

/// A warning for each setting of the `models` key that nothing reads: a typo (`minWorker`) would
/// otherwise leave the default in place without a word. TorchServe's `parallelLevel` and
/// `runtimeType` are said to be ignored rather than unknown.
fn unknown_model_settings(models: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(models) = models.as_object() else {
        return out;
    };
    for (name, versions) in models {
        let Some(versions) = versions.as_object() else {
            continue;
        };
        for (version, settings) in versions {
            let Some(settings) = settings.as_object() else {
                continue;
            };
            for key in settings.keys() {
                if MODEL_SETTINGS.contains(&key.as_str()) {
                    continue;
                }
                out.push(
                    if ["parallelLevel", "runtimeType"].contains(&key.as_str()) {
                        format!("models: {name} {version}: {key} is TorchServe's and is ignored")
                    } else {
                        format!(
                            "models: {name} {version}: unknown setting {key:?}, ignored (the \
                         settings are {})",
                            MODEL_SETTINGS.join(", ")
                        )
                    },
                );
            }
        }
    }
    out
}

/// An integer written as a number or as text (`"4"`), as TorchServe's JSON reader takes both.
fn number_or_numeric_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Int {
        Number(i64),
        Float(f64),
        Text(String),
    }
    match <Option<Int> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(Int::Number(n)) => Ok(Some(n)),
        // Gson's getAsInt reads 2.0 as 2.
        Some(Int::Float(f)) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(Some(f as i64)),
        Some(Int::Float(f)) => Err(serde::de::Error::custom(format!(
            "expected an integer, found {f}"
        ))),
        Some(Int::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("expected an integer, found {t:?}"))),
    }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inference listener.
    pub inference_address: Address,
    /// Management listener.
    pub management_address: Address,
    /// Metrics listener.
    pub metrics_address: Address,
    /// The model store.
    pub model_store: Option<PathBuf>,
    /// Models to load at start-up (`load_models` / `--models`).
    pub load_models: Vec<String>,
    /// `models`: per model, per version settings.
    pub models: BTreeMap<String, BTreeMap<String, ModelDefaults>>,
    /// `model_snapshot`: the models to start with, in TorchServe's snapshot JSON (as its
    /// snapshot files and KServe's model layout write it); takes precedence over `load_models`.
    pub model_snapshot: Option<serde_json::Value>,
    /// `default_workers_per_model`; `None` when unset.
    pub default_workers_per_model: Option<usize>,
    /// `job_queue_size`.
    pub job_queue_size: usize,
    /// `max_request_size` in bytes.
    pub max_request_size: usize,
    /// `max_response_size` in bytes.
    pub max_response_size: usize,
    /// `default_response_timeout`.
    pub default_response_timeout: Duration,
    /// `default_startup_timeout`.
    pub default_startup_timeout: Duration,
    /// `enable_model_api`.
    pub enable_model_api: bool,
    /// `metrics_mode` (`prometheus`, `log` or `legacy`); metrics are served in every mode.
    pub metrics_mode: String,
    /// `cpu_threads`: intra-op threads shared by all workers (tchserve's own key).
    pub cpu_threads: usize,
    /// `gpu_forward_threads`: threads that launch each model's forwards on each GPU (tchserve's
    /// own key, 1 to 16).
    pub gpu_forward_threads: usize,
    /// `disable_token_authorization`.
    pub disable_token_authorization: bool,
    /// `token_expiration_min`: how long inference and management keys live.
    pub token_expiration: Duration,
    /// `max_workers_per_model`: the most workers one model version may have (tchserve's own
    /// key; registration and scaling above it are refused).
    pub max_workers_per_model: usize,
    /// `header_read_timeout`: once a request has begun, its head must arrive within this.
    pub header_read_timeout: Duration,
    /// `body_read_timeout`: a request's body must arrive within this of its head.
    pub body_read_timeout: Duration,
    /// `keep_alive_timeout`: an idle connection is closed after this without a request.
    pub keep_alive_timeout: Duration,
    /// `max_connections`: open connections per listener; `None` derives it from the process's
    /// limit on open files.
    pub max_connections: Option<usize>,
    /// `grpc_inference_address` and `grpc_inference_port`: TorchServe's and the v2 gRPC
    /// inference services.
    pub grpc_inference: (String, u16),
    /// `grpc_management_address` and `grpc_management_port`: TorchServe's gRPC management.
    pub grpc_management: (String, u16),
    /// `certificate_file`: the PEM certificate chain of the https and gRPC TLS listeners.
    pub certificate_file: Option<PathBuf>,
    /// `private_key_file`: the PEM private key that goes with `certificate_file`.
    pub private_key_file: Option<PathBuf>,
    /// `enable_grpc_ssl`: the gRPC listeners speak TLS with the same certificate.
    pub enable_grpc_ssl: bool,
    /// `allowed_urls`: regular expressions a remote archive URL must match whole. Empty (the
    /// default) allows the model store only.
    pub allowed_urls: Vec<String>,
    /// `max_archive_size`: the largest archive a URL registration downloads, bytes.
    pub max_archive_size: u64,
    /// `archive_download_timeout`: the longest a URL registration's download may take.
    pub archive_download_timeout: Duration,
    /// `graceful_shutdown_timeout`: how long a stop waits for requests in flight and queued.
    pub graceful_shutdown_timeout: Duration,
    /// `log_max_bytes`: the size at which the log file `--start` writes rolls over (0: never).
    pub log_max_bytes: u64,
    /// `log_max_files`: how many rolled-over log files are kept.
    pub log_max_files: usize,
    /// `model_store_poll_interval`: how often the model store is read for new, changed and
    /// removed archives; off when unset.
    pub model_store_poll_interval: Option<Duration>,
    /// `model_version_policy`: which versions of each model serve when the store is polled.
    pub version_policy: VersionPolicy,
    /// `model_version_policy.<model>`: the same for one model.
    pub version_policies: BTreeMap<String, VersionPolicy>,
    /// `otlp_endpoint`: the OTLP/HTTP collector traces go to (its base URL); off when unset.
    pub otlp_endpoint: Option<String>,
    /// `log_format`: `json` for one JSON object per log line, else text.
    pub json_logs: bool,
    /// `number_of_gpu`: the most GPUs to use (the first ones); 0 serves on the CPU only.
    pub number_of_gpu: Option<usize>,
    /// `enable_metrics_api`: whether the metrics listener is served.
    pub enable_metrics_api: bool,
    /// `disable_system_metrics`: leave out the host's CPU, memory and disk metrics.
    pub disable_system_metrics: bool,
    /// `cors_allowed_origin`, `cors_allowed_methods`, `cors_allowed_headers`: the CORS headers
    /// every response carries, each only when set.
    pub cors: Cors,
    /// The file the settings were read from, if any.
    pub source: Option<PathBuf>,
    /// Keys that were present but are not used by tchserve.
    pub ignored_keys: Vec<String>,
    /// What the start says as warnings: values past a bound that were held to it, and values
    /// read as TorchServe reads them where it would be easy to misread.
    pub warnings: Vec<String>,
}

/// The CORS response headers, as TorchServe's `cors_allowed_*` keys set them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cors {
    /// `Access-Control-Allow-Origin`.
    pub origin: Option<String>,
    /// `Access-Control-Allow-Methods`.
    pub methods: Option<String>,
    /// `Access-Control-Allow-Headers`.
    pub headers: Option<String>,
}

impl Cors {
    /// Whether any CORS header is configured.
    pub fn is_on(&self) -> bool {
        self.origin.is_some() || self.methods.is_some() || self.headers.is_some()
    }
}

/// The environment variable that overrides `key`: `TS_<KEY>`, but for the one key TorchServe
/// names otherwise.
fn env_var(key: &str) -> String {
    match key {
        "token_expiration_min" => "TS_TOKEN_EXPIRATION_TIME_MIN".into(),
        _ => format!("TS_{}", key.to_ascii_uppercase()),
    }
}

/// Keys that may be overridden by `TS_<KEY>` when `enable_envvars_config=true`.
const ENV_KEYS: [&str; 43] = [
    "number_of_gpu",
    "enable_metrics_api",
    "disable_system_metrics",
    "cors_allowed_origin",
    "cors_allowed_methods",
    "cors_allowed_headers",
    "grpc_inference_address",
    "grpc_inference_port",
    "grpc_management_address",
    "grpc_management_port",
    "inference_address",
    "management_address",
    "metrics_address",
    "model_store",
    "load_models",
    "models",
    "default_workers_per_model",
    "job_queue_size",
    "max_request_size",
    "max_response_size",
    "default_response_timeout",
    "default_startup_timeout",
    "enable_model_api",
    "metrics_mode",
    "cpu_threads",
    "gpu_forward_threads",
    "disable_token_authorization",
    "token_expiration_min",
    "max_workers_per_model",
    "header_read_timeout",
    "body_read_timeout",
    "keep_alive_timeout",
    "max_connections",
    "certificate_file",
    "private_key_file",
    "enable_grpc_ssl",
    "max_archive_size",
    "archive_download_timeout",
    "graceful_shutdown_timeout",
    "model_store_poll_interval",
    "model_version_policy",
    "otlp_endpoint",
    "log_format",
];

/// Keys TorchServe knows that tchserve reads but does not act on, which are not worth a warning.
/// What the log says of a key that is present and not used: why, for TorchServe's keys, and a
/// hint of a typo for any other.
pub fn ignored_key_note(key: &str) -> String {
    let why = match key {
        "unregister_model_timeout" => {
            "an unregistration answers once the queue is drained (within the model's \
             response_timeout, and 5 s more for a forward in progress)"
        }
        "decode_input_request"
        | "default_service_handler"
        | "install_py_dep_per_model"
        | "blacklist_env_vars"
        | "ipex_enable"
        | "ipex_gpu_enable"
        | "cpu_launcher_enable"
        | "cpu_launcher_args"
        | "cpp_log_config" => "there is no Python or C++ backend process",
        "initial_worker_port" | "initial_distribution_port" => "there are no worker processes",
        "limit_max_image_pixels" => "set max_pixels in the image handler's manifest instead",
        "workflow_store" => "workflows are not served",
        "metrics_config" | "metrics_mode" | "model_metrics_auto_detect" | "system_metrics_cmd" => {
            "TorchServe's default metrics are always served, on /metrics"
        }
        "ts_header_key_sequence_id"
        | "ts_header_key_sequence_start"
        | "ts_header_key_sequence_end" => "stateful (sequence) models are not served",
        "debug" | "model_server_home" | "prefer_direct_buffer" => "it has no counterpart here",
        "ts_open_inference_protocol" => {
            "the v2 protocol is always served, its gRPC service under TorchServe's name too"
        }
        "use_native_io" | "io_ratio" => "it tunes the Java frontend's Netty",
        "plugins_path" => "Java plugins are not loaded",
        "python" => "there is no Python backend process",
        "metric_time_interval" => "the host's metrics are read when /metrics is scraped",
        k if k.starts_with("grpc_") && k.contains("_max_connection_age") => {
            "gRPC connections are not aged out"
        }
        _ => {
            return format!(
                "config key {key} is not one tchserve or TorchServe reads: is it mistyped? \
                 (docs/configuration.md lists the keys)"
            );
        }
    };
    format!("config key {key} is TorchServe's and not used by tchserve: {why}")
}

const QUIET_KEYS: [&str; 13] = [
    // Written by TorchServe into its snapshot files, which may be started from.
    "tsConfigFile",
    "version",
    "enable_envvars_config",
    "use_env_allowed_urls",
    // Only named with `keystore`, which is refused with a way to convert it.
    "keystore_pass",
    "keystore_type",
    // KServe's routes are always served, whatever envelope TorchServe was told to expect.
    "service_envelope",
    "number_of_netty_threads",
    "netty_client_threads",
    "async_logging",
    "vmargs",
    // In KServe's sample config.properties for TorchServe: metrics are Prometheus text anyway,
    // and NUM_WORKERS is read by KServe's Python wrapper, which tchserve replaces.
    "metrics_format",
    "NUM_WORKERS",
];

impl Default for Config {
    fn default() -> Self {
        Config {
            inference_address: Address::Tcp("127.0.0.1".into(), 8080),
            management_address: Address::Tcp("127.0.0.1".into(), 8081),
            metrics_address: Address::Tcp("127.0.0.1".into(), 8082),
            model_store: None,
            load_models: Vec::new(),
            models: BTreeMap::new(),
            model_snapshot: None,
            default_workers_per_model: None,
            job_queue_size: 100,
            max_request_size: 6_553_500,
            max_response_size: 6_553_500,
            default_response_timeout: Duration::from_secs(120),
            default_startup_timeout: Duration::from_secs(120),
            enable_model_api: false,
            metrics_mode: "prometheus".into(),
            cpu_threads: std::thread::available_parallelism().map_or(1, usize::from),
            gpu_forward_threads: 1,
            disable_token_authorization: false,
            token_expiration: Duration::from_secs(60 * 60),
            max_workers_per_model: bounds::DEFAULT_MAX_WORKERS,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(60),
            max_connections: None,
            // 127.0.0.1, not every interface: TorchServe's fix for CVE-2024-35199.
            grpc_inference: ("127.0.0.1".into(), 7070),
            grpc_management: ("127.0.0.1".into(), 7071),
            certificate_file: None,
            private_key_file: None,
            enable_grpc_ssl: false,
            allowed_urls: Vec::new(),
            max_archive_size: 2 << 30,
            archive_download_timeout: Duration::from_secs(1200),
            graceful_shutdown_timeout: Duration::from_secs(30),
            // log4j's rollover in TorchServe: 100 MB, 5 files.
            log_max_bytes: 100 * 1024 * 1024,
            log_max_files: 5,
            model_store_poll_interval: None,
            version_policy: VersionPolicy::default(),
            version_policies: BTreeMap::new(),
            otlp_endpoint: None,
            json_logs: false,
            number_of_gpu: None,
            enable_metrics_api: true,
            disable_system_metrics: false,
            cors: Cors::default(),
            source: None,
            ignored_keys: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Parses Java `.properties` text as `java.util.Properties` reads it: `key=value`,
/// `key: value` or `key value`; `#`/`!` comments; `\` line continuations; `\t`, `\n`, `\r`,
/// `\f` and `\uXXXX` escapes. The last of duplicate keys wins.
pub fn parse_properties(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut logical = String::new();
    let mut pending = false;
    // Java ends a line at \n, \r or \r\n.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for line in text.lines() {
        let trimmed = line.trim_start_matches(is_properties_space);
        if !pending && (trimmed.is_empty() || trimmed.starts_with(['#', '!'])) {
            continue;
        }
        let continued = trimmed.chars().rev().take_while(|&c| c == '\\').count() % 2 == 1;
        logical.push_str(if continued {
            &trimmed[..trimmed.len() - 1]
        } else {
            trimmed
        });
        pending = continued;
        if !continued {
            let (key, value) = key_and_value(&std::mem::take(&mut logical));
            out.insert(key, value);
        }
    }
    // A continuation on the last line continues into nothing; the line still counts.
    if pending {
        let (key, value) = key_and_value(&logical);
        out.insert(key, value);
    }
    out
}

/// The whitespace `.properties` skips: space, tab and form feed.
fn is_properties_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\u{c}')
}

/// Splits a logical line: the key ends at the first unescaped `=`, `:` or whitespace, and the
/// value starts after that separator and the whitespace around it.
fn key_and_value(line: &str) -> (String, String) {
    let mut key_end = line.len();
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '=' || c == ':' || is_properties_space(c) {
            key_end = i;
            break;
        }
    }
    let mut rest = line[key_end..].trim_start_matches(is_properties_space);
    if let Some(after) = rest.strip_prefix(['=', ':']) {
        rest = after.trim_start_matches(is_properties_space);
    }
    (unescape(&line[..key_end]), unescape(rest))
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => match hex4(&mut chars) {
                // A UTF-16 surrogate pair, as Java writes characters outside the BMP.
                Some(high @ 0xD800..=0xDBFF) => {
                    let mut ahead = chars.clone();
                    let low = (ahead.next() == Some('\\') && ahead.next() == Some('u'))
                        .then(|| hex4(&mut ahead))
                        .flatten()
                        .filter(|low| (0xDC00..=0xDFFF).contains(low));
                    match low {
                        Some(low) => {
                            chars = ahead;
                            let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                            out.extend(char::from_u32(c));
                        }
                        None => out.push(char::REPLACEMENT_CHARACTER),
                    }
                }
                Some(code) => out.push(char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)),
                // Java refuses a malformed \u escape; keeping the text shows the user what was
                // written when the value is then refused.
                None => out.push_str("\\u"),
            },
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The four hex digits of a `\uXXXX` escape, consumed only when all four are there.
fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    let digits: String = chars.clone().take(4).collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    chars.nth(3);
    u32::from_str_radix(&digits, 16).ok()
}

/// Reads and parses a `config.properties` file: UTF-8, or ISO-8859-1 (what Java reads
/// `.properties` files as) when it is not valid UTF-8.
pub fn read_properties(path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => e.into_bytes().iter().map(|&b| char::from(b)).collect(),
    };
    Ok(parse_properties(&text))
}

impl Config {
    /// Builds the configuration from properties (already read) and the environment.
    pub fn from_properties(
        props: &BTreeMap<String, String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::layered(props, &BTreeMap::new(), env)
    }

    /// Builds the configuration from a file's properties (or none), the environment's `TS_`
    /// variables where the file allows them, and then `overrides` (the command line's), which
    /// win over both.
    pub fn layered(
        props: &BTreeMap<String, String>,
        overrides: &BTreeMap<String, String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut props = props.clone();
        // Whether TS_ variables apply is itself set by keys the command line may set.
        for key in ["enable_envvars_config", "use_env_allowed_urls"] {
            if let Some(v) = overrides.get(key) {
                props.insert(key.into(), v.clone());
            }
        }
        // Read as TorchServe reads them (Boolean.parseBoolean); blanks after the value, which
        // TorchServe reads as false, are refused rather than read as true.
        let gate = |key: &str| -> Result<bool, ConfigError> {
            let Some(v) = props.get(key) else {
                return Ok(false);
            };
            if v.trim_end().len() != v.len() {
                return Err(ConfigError::Value {
                    key: key.into(),
                    value: v.trim().into(),
                    reason: "blanks after the value, with which TorchServe reads it as false: \
                             remove them"
                        .into(),
                });
            }
            Ok(v.trim().eq_ignore_ascii_case("true"))
        };
        let envvars = gate("enable_envvars_config")?;
        let env_allowed_urls = gate("use_env_allowed_urls")?;
        // Keys whose value came from the environment: a bad one names its variable.
        let mut from_env = std::collections::BTreeSet::new();
        if envvars {
            for key in ENV_KEYS {
                if let Some(v) = env(&env_var(key)) {
                    props.insert(key.to_string(), v);
                    from_env.insert(key.to_string());
                }
            }
        }
        // TorchServe reads TS_ALLOWED_URLS only when told to, so a stray environment variable
        // cannot widen what may be downloaded.
        if env_allowed_urls && let Some(v) = env("TS_ALLOWED_URLS") {
            props.insert("allowed_urls".into(), v);
        }
        props.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
        from_env.retain(|k| !overrides.contains_key(k));
        let mut cfg = Config::default();
        for (name, raw) in &props {
            let key = if from_env.contains(name) {
                format!("{name} (from {})", env_var(name))
            } else {
                name.clone()
            };
            let key = &key;
            let untrimmed = substitute_env(key, raw, env)?;
            let value = untrimmed.trim();
            let bad = |reason: &str| ConfigError::Value {
                key: key.clone(),
                value: value.to_string(),
                reason: reason.into(),
            };
            let int = || {
                value
                    .parse::<u64>()
                    .map_err(|_| bad("expected a non-negative integer"))
            };
            let bounded = |b: &bounds::Bound| {
                let v = value
                    .parse::<i64>()
                    .map_err(|_| bad("expected an integer"))?;
                b.check(v).map(|v| v as u64).map_err(|why| bad(&why))
            };
            let boolean = || {
                // Java keeps the blanks after a value, and TorchServe reads "true " as false:
                // reading it as true would turn token authorization off where TorchServe keeps
                // it on.
                if untrimmed.trim_end().len() != untrimmed.len() {
                    return Err(bad(
                        "blanks after the value, with which TorchServe reads it as false: \
                         remove them",
                    ));
                }
                match value.to_ascii_lowercase().as_str() {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => Err(bad("expected true or false")),
                }
            };
            // A value past the top of its range is held to it, with a warning: TorchServe takes
            // any integer, and its configurations must still start.
            let mut capped = |b: &bounds::Bound| -> Result<u64, ConfigError> {
                let v = value
                    .parse::<i64>()
                    .map_err(|_| bad("expected an integer"))?;
                if v > *b.range.end() {
                    cfg.warnings.push(format!(
                        "{key} {v}{} is above the most tchserve takes; using {}{}",
                        b.unit,
                        b.range.end(),
                        b.unit
                    ));
                    return Ok(*b.range.end() as u64);
                }
                b.check(v).map(|v| v as u64).map_err(|why| bad(&why))
            };
            match name.as_str() {
                "inference_address" => cfg.inference_address = Address::parse(key, value)?,
                "management_address" => cfg.management_address = Address::parse(key, value)?,
                "metrics_address" => cfg.metrics_address = Address::parse(key, value)?,
                "model_store" => cfg.model_store = Some(PathBuf::from(value)),
                "load_models" => cfg.load_models = split_list(value),
                "model_snapshot" => {
                    let v: serde_json::Value = serde_json::from_str(value)
                        .map_err(|e| bad(&format!("not valid JSON: {e}")))?;
                    if !v.get("models").is_some_and(serde_json::Value::is_object) {
                        return Err(bad("expected a JSON object with a \"models\" object"));
                    }
                    cfg.model_snapshot = Some(v);
                }
                "models" => {
                    // TorchServe's Gson reads single-quoted JSON too.
                    let json = if value.contains('"') {
                        value.to_string()
                    } else {
                        value.replace('\'', "\"")
                    };
                    let parsed: serde_json::Value = serde_json::from_str(&json)
                        .map_err(|e| bad(&format!("not valid models JSON: {e}")))?;
                    cfg.warnings.extend(unknown_model_settings(&parsed));
                    cfg.models = serde_json::from_value(parsed)
                        .map_err(|e| bad(&format!("not valid models JSON: {e}")))?;
                }
                "default_workers_per_model" => {
                    cfg.default_workers_per_model = Some(int()? as usize).filter(|n| *n > 0);
                }
                "job_queue_size" => {
                    cfg.job_queue_size = bounded(&bounds::JOB_QUEUE_SIZE)? as usize;
                }
                "max_request_size" => cfg.max_request_size = int()? as usize,
                "max_response_size" => cfg.max_response_size = int()? as usize,
                "default_response_timeout" => {
                    let s = capped(&bounds::RESPONSE_TIMEOUT)?;
                    cfg.default_response_timeout = Duration::from_secs(s);
                }
                "default_startup_timeout" => {
                    let s = capped(&bounds::STARTUP_TIMEOUT)?;
                    cfg.default_startup_timeout = Duration::from_secs(s);
                }
                "max_workers_per_model" => {
                    let b = bounds::Bound {
                        name: "max_workers_per_model",
                        range: 1..=bounds::MAX_WORKERS_CEILING,
                        unit: "",
                    };
                    cfg.max_workers_per_model = bounded(&b)? as usize;
                }
                "header_read_timeout" | "body_read_timeout" | "keep_alive_timeout" => {
                    let b = bounds::Bound {
                        name: "timeout",
                        range: 1..=3600,
                        unit: " s",
                    };
                    let d = Duration::from_secs(bounded(&b)?);
                    match name.as_str() {
                        "header_read_timeout" => cfg.header_read_timeout = d,
                        "body_read_timeout" => cfg.body_read_timeout = d,
                        _ => cfg.keep_alive_timeout = d,
                    }
                }
                "max_connections" => {
                    let b = bounds::Bound {
                        name: "max_connections",
                        range: 1..=1_000_000,
                        unit: "",
                    };
                    cfg.max_connections = Some(bounded(&b)? as usize);
                }
                "grpc_inference_address" | "grpc_management_address" => {
                    if value.is_empty() || value.contains(['/', ' ']) {
                        return Err(bad("expected a host name or IP address"));
                    }
                    let host = value
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string();
                    match name.as_str() {
                        "grpc_inference_address" => cfg.grpc_inference.0 = host,
                        _ => cfg.grpc_management.0 = host,
                    }
                }
                "grpc_inference_port" | "grpc_management_port" => {
                    let port = value
                        .parse::<u16>()
                        .map_err(|_| bad("expected a port number, 0 to 65535"))?;
                    match name.as_str() {
                        "grpc_inference_port" => cfg.grpc_inference.1 = port,
                        _ => cfg.grpc_management.1 = port,
                    }
                }
                "enable_model_api" => cfg.enable_model_api = boolean()?,
                "disable_token_authorization" => cfg.disable_token_authorization = boolean()?,
                "token_expiration_min" => {
                    cfg.token_expiration = value
                        .parse::<f64>()
                        .ok()
                        // Keys must expire within a representable date; a century is plenty.
                        .filter(|m| m.is_finite() && *m > 0.0 && *m <= 100.0 * 525_960.0)
                        .and_then(|m| Duration::try_from_secs_f64(m * 60.0).ok())
                        .ok_or_else(|| {
                            bad("expected a positive number of minutes, at most a century")
                        })?;
                }
                // TorchServe reads it in any case, and an unknown mode as log.
                "metrics_mode" => match value.to_ascii_lowercase().as_str() {
                    m @ ("prometheus" | "log" | "legacy") => cfg.metrics_mode = m.to_string(),
                    _ => {
                        cfg.warnings.push(format!(
                            "{key} {value:?} is not prometheus, log or legacy: read as log, as \
                             TorchServe reads it (metrics are served on /metrics in every mode)"
                        ));
                        cfg.metrics_mode = "log".into();
                    }
                },
                "cpu_threads" => cfg.cpu_threads = (int()? as usize).max(1),
                "gpu_forward_threads" => {
                    let b = bounds::Bound {
                        name: "gpu_forward_threads",
                        range: 1..=16,
                        unit: "",
                    };
                    cfg.gpu_forward_threads = bounded(&b)? as usize;
                }
                "certificate_file" => cfg.certificate_file = Some(PathBuf::from(value)),
                "private_key_file" => cfg.private_key_file = Some(PathBuf::from(value)),
                "enable_grpc_ssl" => cfg.enable_grpc_ssl = boolean()?,
                "keystore" => {
                    return Err(bad(
                        "Java keystores are not read; convert it to PEM files and set \
                         certificate_file and private_key_file: openssl pkcs12 -in KEYSTORE \
                         -nokeys -out cert.pem && openssl pkcs12 -in KEYSTORE -nocerts -nodes \
                         -out key.pem",
                    ));
                }
                "allowed_urls" => {
                    let list: Vec<String> = value
                        .split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned)
                        .collect();
                    for pattern in &list {
                        if let Err(e) = regex::Regex::new(pattern) {
                            return Err(bad(&format!(
                                "{pattern:?} is not a regular expression: {e}"
                            )));
                        }
                    }
                    cfg.allowed_urls = list;
                }
                "max_archive_size" => cfg.max_archive_size = int()?.max(1),
                "archive_download_timeout" => {
                    let b = bounds::Bound {
                        name: "archive_download_timeout",
                        range: 1..=86_400,
                        unit: " s",
                    };
                    cfg.archive_download_timeout = Duration::from_secs(bounded(&b)?);
                }
                "log_max_bytes" => cfg.log_max_bytes = int()?,
                "log_max_files" => {
                    let b = bounds::Bound {
                        name: "log_max_files",
                        range: 1..=1000,
                        unit: "",
                    };
                    cfg.log_max_files = bounded(&b)? as usize;
                }
                "graceful_shutdown_timeout" => {
                    let b = bounds::Bound {
                        name: "graceful_shutdown_timeout",
                        range: 0..=3_600,
                        unit: " s",
                    };
                    cfg.graceful_shutdown_timeout = Duration::from_secs(bounded(&b)?);
                }
                "model_store_poll_interval" => {
                    let b = bounds::Bound {
                        name: "model_store_poll_interval",
                        range: 0..=86_400,
                        unit: " s",
                    };
                    let s = bounded(&b)?;
                    cfg.model_store_poll_interval = (s > 0).then(|| Duration::from_secs(s));
                }
                "model_version_policy" => {
                    cfg.version_policy = VersionPolicy::parse(value).map_err(|e| bad(&e))?;
                }
                "otlp_endpoint" => {
                    let url = url::Url::parse(value).map_err(|e| bad(&e.to_string()))?;
                    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                        return Err(bad("an http:// or https:// URL is needed"));
                    }
                    cfg.otlp_endpoint = Some(value.to_string());
                }
                "log_format" => {
                    cfg.json_logs = match value.to_ascii_lowercase().as_str() {
                        "json" => true,
                        "text" => false,
                        _ => return Err(bad("use json or text")),
                    };
                }
                "number_of_gpu" => cfg.number_of_gpu = Some(int()? as usize),
                "enable_metrics_api" => cfg.enable_metrics_api = boolean()?,
                "disable_system_metrics" => cfg.disable_system_metrics = boolean()?,
                "cors_allowed_origin" | "cors_allowed_methods" | "cors_allowed_headers" => {
                    // Checked here, so that every response can carry it.
                    if axum::http::HeaderValue::from_str(value).is_err() {
                        return Err(bad("not a valid HTTP header value"));
                    }
                    let v = (!value.is_empty()).then(|| value.to_string());
                    match name.as_str() {
                        "cors_allowed_origin" => cfg.cors.origin = v,
                        "cors_allowed_methods" => cfg.cors.methods = v,
                        _ => cfg.cors.headers = v,
                    }
                }
                k if k.starts_with("model_version_policy.") => {
                    let model = &k["model_version_policy.".len()..];
                    let policy = VersionPolicy::parse(value).map_err(|e| bad(&e))?;
                    cfg.version_policies.insert(model.to_string(), policy);
                }
                k if QUIET_KEYS.contains(&k) => {}
                _ => cfg.ignored_keys.push(name.clone()),
            }
        }
        cfg.check_tls()?;
        cfg.check_workers()?;
        Ok(cfg)
    }

    /// TLS listeners need both halves of the identity: say which is missing at start.
    fn check_tls(&self) -> Result<(), ConfigError> {
        let tls_key = [
            ("inference_address", &self.inference_address),
            ("management_address", &self.management_address),
            ("metrics_address", &self.metrics_address),
        ]
        .into_iter()
        .find(|(_, a)| a.is_tls())
        .map(|(k, _)| k)
        .or(self.enable_grpc_ssl.then_some("enable_grpc_ssl"));
        let Some(key) = tls_key else {
            return Ok(());
        };
        for (name, file) in [
            ("certificate_file", &self.certificate_file),
            ("private_key_file", &self.private_key_file),
        ] {
            if file.is_none() {
                return Err(ConfigError::Value {
                    key: key.into(),
                    value: if key == "enable_grpc_ssl" {
                        "true".into()
                    } else {
                        "https://...".into()
                    },
                    reason: format!(
                        "TLS needs {name} (PEM); tchserve makes no self-signed certificate"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Worker counts above `max_workers_per_model` would be refused model by model at start;
    /// say so once, naming the key that asks for them.
    fn check_workers(&self) -> Result<(), ConfigError> {
        let max = self.max_workers_per_model;
        let too_many = |key: String, value: String| ConfigError::Value {
            key,
            value,
            reason: format!("more workers than max_workers_per_model ({max})"),
        };
        if let Some(n) = self.default_workers_per_model.filter(|n| *n > max) {
            return Err(too_many("default_workers_per_model".into(), n.to_string()));
        }
        for (model, versions) in &self.models {
            for (version, d) in versions {
                // maxWorkers starts nothing: past the cap it is held to it (see
                // core::settings), as TorchServe starts only minWorkers.
                if let Some(n) = d.min_workers.filter(|n| *n > 0 && *n as u64 > max as u64) {
                    return Err(too_many(
                        format!("models ({model} {version} minWorkers)"),
                        n.to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads a `config.properties` file.
    pub fn from_file(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        Self::from_properties(&read_properties(path)?, env)
    }

    /// The `models` key's entry for one model version (empty when it has none).
    pub fn model_defaults(&self, name: &str, version: &str) -> ModelDefaults {
        self.models
            .get(name)
            .and_then(|v| v.get(version))
            .cloned()
            .unwrap_or_default()
    }

    /// Workers for a model loaded at start-up when nothing else says: the configured default,
    /// else the number of GPUs, else 1 (workers share the CPU thread budget, so more CPU
    /// workers add queueing parallelism but not compute).
    pub fn startup_workers(&self, gpus: usize) -> usize {
        self.default_workers_per_model
            .unwrap_or(if gpus > 0 { gpus } else { 1 })
    }
}

/// Replaces `$$NAME$$` with the environment variable NAME, as TorchServe does.
fn substitute_env(
    key: &str,
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$$") {
        let Some(len) = rest[start + 2..].find("$$") else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        let v = env(name).ok_or_else(|| ConfigError::Value {
            key: key.into(),
            value: value.into(),
            reason: format!("environment variable {name} is not set"),
        })?;
        out.push_str(&rest[..start]);
        out.push_str(&v);
        rest = &rest[start + 4 + len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Splits a list separated by commas or spaces (as `--models` and `load_models` take it),
/// dropping blanks.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parses_properties_syntax() {
        let p =
            parse_properties("# c\n! c\na=1\nb : two words\nc=x\\\n  y\nd=tab\\tend\n  e = 5 \n");
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "two words");
        assert_eq!(p["c"], "xy");
        assert_eq!(p["d"], "tab\tend");
        assert_eq!(p["e"], "5 ");
        // Java's other forms: whitespace as the separator, a separator escaped into the key,
        // \u escapes, and a continuation on the last line.
        let p = parse_properties(
            "inference_address http://127.0.0.1:1\nx\\:y = 1\nt=\\u0039\\u0030\nbad=\\u00zz\nlast=a\\",
        );
        assert_eq!(p["inference_address"], "http://127.0.0.1:1");
        assert_eq!(p["x:y"], "1");
        assert_eq!(p["t"], "90");
        assert_eq!(p["bad"], "\\u00zz");
        assert_eq!(p["last"], "a");
        assert_eq!(p.len(), 5, "{p:?}");
        // Four hex digits exactly, surrogate pairs joined, and \r alone ends a line.
        let p = parse_properties("a=\\u+12a\rb=\\uD83D\\uDE00\r\nc=\\u00e9");
        assert_eq!(p["a"], "\\u+12a");
        assert_eq!(p["b"], "\u{1F600}");
        assert_eq!(p["c"], "\u{e9}");
    }

    #[test]
    fn a_file_that_is_not_utf8_is_read_as_latin1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.properties");
        std::fs::write(&path, b"# caf\xe9\njob_queue_size=7\nname=caf\xe9\n").unwrap();
        let p = read_properties(&path).unwrap();
        assert_eq!(
            (p["job_queue_size"].as_str(), p["name"].as_str()),
            ("7", "caf\u{e9}")
        );
    }

    #[test]
    fn torchserve_configs_past_a_bound_start_and_blanks_after_a_boolean_are_refused() {
        let cfg = Config::from_properties(
            &parse_properties(
                "default_response_timeout=300000\n\
                 models={\"a\": {\"1.0\": {\"minWorkers\": 1, \"maxWorkers\": 1000}}}\n",
            ),
            &no_env,
        )
        .unwrap();
        assert_eq!(cfg.default_response_timeout, Duration::from_secs(86_400));
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
        assert!(
            cfg.warnings[0].contains("using 86400 s"),
            "{:?}",
            cfg.warnings
        );
        // Java keeps the blank, and TorchServe reads "true " as false: keys stay on there.
        for key in ["enable_envvars_config", "use_env_allowed_urls"] {
            let mut props = BTreeMap::new();
            props.insert(key.to_string(), "true ".to_string());
            let e = Config::from_properties(&props, &no_env).unwrap_err();
            assert!(e.to_string().contains("reads it as false"), "{key}: {e}");
        }
        let mut props = BTreeMap::new();
        props.insert(
            "disable_token_authorization".to_string(),
            "true ".to_string(),
        );
        let e = Config::from_properties(&props, &no_env).unwrap_err();
        assert!(e.to_string().contains("reads it as false"), "{e}");
    }

    #[test]
    fn reads_torchserve_keys() {
        let text = "inference_address=http://0.0.0.0:9080\nmanagement_address=unix:/tmp/m.sock\n\
                    model_store=/s\nload_models=a.mar, b=b.mar c.mar\njob_queue_size=7\nenable_model_api=true\n\
                    default_response_timeout=9\nmodels={\"a\": {\"1.0\": {\"batchSize\": 4, \"maxBatchDelay\": 20}}}\n\
                    number_of_netty_threads=4\nsomething_new=1\nmetrics_format=prometheus\nNUM_WORKERS=1\n";
        let cfg = Config::from_properties(&parse_properties(text), &no_env).unwrap();
        assert_eq!(cfg.inference_address, Address::Tcp("0.0.0.0".into(), 9080));
        assert_eq!(cfg.management_address, Address::Unix("/tmp/m.sock".into()));
        assert_eq!(cfg.metrics_address, Address::Tcp("127.0.0.1".into(), 8082));
        assert_eq!(cfg.load_models, ["a.mar", "b=b.mar", "c.mar"]);
        assert_eq!(cfg.job_queue_size, 7);
        assert!(cfg.enable_model_api);
        assert_eq!(cfg.default_response_timeout, Duration::from_secs(9));
        assert_eq!(cfg.models["a"]["1.0"].batch_size, Some(4));
        // Numbers written as text are numbers, as TorchServe reads them.
        let texty = Config::from_properties(
            &parse_properties("models={\"a\": {\"1.0\": {\"batchSize\": \"8\"}}}\n"),
            &no_env,
        )
        .unwrap();
        assert_eq!(texty.models["a"]["1.0"].batch_size, Some(8));
        // As TorchServe's Gson reads them: single quotes, and 2.0 for 2.
        let lenient = Config::from_properties(
            &parse_properties("models={'a': {'1.0': {'batchSize': 2.0, 'minWorkers': 1}}}\n"),
            &no_env,
        )
        .unwrap();
        assert_eq!(lenient.models["a"]["1.0"].batch_size, Some(2));
        assert_eq!(lenient.models["a"]["1.0"].min_workers, Some(1));
        let e = Config::from_properties(
            &parse_properties("models={\"a\": {\"1.0\": {\"batchSize\": \"many\"}}}\n"),
            &no_env,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("expected an integer, found \"many\""),
            "{e}"
        );
        assert_eq!(cfg.ignored_keys, ["something_new"]);
        assert!(lenient.warnings.is_empty(), "{:?}", lenient.warnings);
        // A mistyped setting is warned about, naming the model, the version and the key.
        let typo = Config::from_properties(
            &parse_properties(
                "models={\"a\": {\"1.0\": {\"minWorker\": 2, \"batchSize\": 4, \"parallelLevel\": 2}}}\n",
            ),
            &no_env,
        )
        .unwrap();
        assert_eq!(typo.models["a"]["1.0"].batch_size, Some(4));
        assert_eq!(typo.warnings.len(), 2, "{:?}", typo.warnings);
        assert!(
            typo.warnings[0].starts_with("models: a 1.0: unknown setting \"minWorker\", ignored"),
            "{:?}",
            typo.warnings
        );
        assert_eq!(
            typo.warnings[1],
            "models: a 1.0: parallelLevel is TorchServe's and is ignored"
        );
    }

    #[test]
    fn model_snapshot_as_torchserve_writes_it() {
        // A line of a TorchServe snapshot file: Java's properties escape ':' and '='.
        let text = r#"model_snapshot={\"name\"\:\"20261126-snapshot.cfg\",\"modelCount\"\:1,\"models\"\:{\"digits\"\:{\"1.0\"\:{\"defaultVersion\"\:true,\"marName\"\:\"digits.mar\",\"minWorkers\"\:2,\"maxWorkers\"\:3,\"batchSize\"\:4,\"maxBatchDelay\"\:50,\"responseTimeout\"\:30}}}}"#;
        let cfg = Config::from_properties(&parse_properties(text), &no_env).unwrap();
        let snap = cfg.model_snapshot.unwrap();
        assert_eq!(snap["models"]["digits"]["1.0"]["marName"], "digits.mar");
        assert_eq!(snap["models"]["digits"]["1.0"]["minWorkers"], 2);
        assert!(cfg.ignored_keys.is_empty());
        for bad in ["{", "{\"name\": \"x\"}"] {
            let e = Config::from_properties(
                &parse_properties(&format!("model_snapshot={bad}\n")),
                &no_env,
            )
            .unwrap_err();
            assert!(e.to_string().contains("model_snapshot"), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::from_properties(&parse_properties("job_queue_size=lots\n"), &no_env)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config key job_queue_size: bad value \"lots\""),
            "{e}"
        );
        let e = Config::from_properties(&parse_properties("inference_address=ftp://x\n"), &no_env)
            .unwrap_err();
        assert!(e.to_string().contains("inference_address"), "{e}");
        let e = Config::from_properties(
            &parse_properties("inference_address=http://127.0.0.1:99999\n"),
            &no_env,
        )
        .unwrap_err();
        assert!(e.to_string().contains("expected a port number"), "{e}");
        let e = Config::from_properties(&parse_properties("model_store=$$NOPE$$\n"), &no_env)
            .unwrap_err();
        assert!(e.to_string().contains("NOPE is not set"), "{e}");
    }

    #[test]
    fn gpu_forward_threads_is_one_unless_set_within_its_bounds() {
        let cfg = Config::from_properties(&parse_properties(""), &no_env).unwrap();
        assert_eq!(cfg.gpu_forward_threads, 1);
        let cfg =
            Config::from_properties(&parse_properties("gpu_forward_threads=4\n"), &no_env).unwrap();
        assert_eq!(cfg.gpu_forward_threads, 4);
        for bad in ["0", "17", "-1", "two"] {
            let e = Config::from_properties(
                &parse_properties(&format!("gpu_forward_threads={bad}\n")),
                &no_env,
            )
            .unwrap_err();
            assert!(e.to_string().contains("gpu_forward_threads"), "{e}");
        }
    }

    #[test]
    fn token_settings() {
        let cfg = Config::from_properties(&parse_properties(""), &no_env).unwrap();
        assert!(
            !cfg.disable_token_authorization,
            "on by default, as TorchServe's"
        );
        assert_eq!(cfg.token_expiration, Duration::from_secs(3600));
        let cfg = Config::from_properties(
            &parse_properties("disable_token_authorization=true\ntoken_expiration_min=0.5\n"),
            &no_env,
        )
        .unwrap();
        assert!(cfg.disable_token_authorization);
        assert_eq!(cfg.token_expiration, Duration::from_secs(30));
        for bad in ["0", "-1", "soon", "NaN", "99999999999999"] {
            let e = Config::from_properties(
                &parse_properties(&format!("token_expiration_min={bad}\n")),
                &no_env,
            )
            .unwrap_err();
            assert!(e.to_string().contains("token_expiration_min"), "{e}");
        }
    }

    #[test]
    fn environment_overrides_only_when_enabled() {
        let env = |k: &str| (k == "TS_JOB_QUEUE_SIZE").then(|| "42".to_string());
        let off = Config::from_properties(&parse_properties("job_queue_size=5\n"), &env).unwrap();
        assert_eq!(off.job_queue_size, 5);
        let on = Config::from_properties(
            &parse_properties("job_queue_size=5\nenable_envvars_config=true\n"),
            &env,
        )
        .unwrap();
        assert_eq!(on.job_queue_size, 42);
        // A bad value names the variable it came from.
        let env = |k: &str| (k == "TS_JOB_QUEUE_SIZE").then(|| "abc".to_string());
        let e = Config::from_properties(&parse_properties("enable_envvars_config=true\n"), &env)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config key job_queue_size (from TS_JOB_QUEUE_SIZE): bad value"),
            "{e}"
        );
    }

    #[test]
    fn an_unused_key_says_why_or_that_it_may_be_mistyped() {
        assert_eq!(
            ignored_key_note("workflow_store"),
            "config key workflow_store is TorchServe's and not used by tchserve: workflows are \
             not served"
        );
        assert!(ignored_key_note("grpc_inference_max_connection_age_ms").contains("not aged out"));
        assert!(ignored_key_note("jbo_queue_size").contains("is it mistyped?"));
    }

    #[test]
    fn the_token_lifetime_comes_from_torchserve_s_variable() {
        let env = |k: &str| (k == "TS_TOKEN_EXPIRATION_TIME_MIN").then(|| "5".to_string());
        let cfg = Config::from_properties(&parse_properties("enable_envvars_config=true\n"), &env)
            .unwrap();
        assert_eq!(cfg.token_expiration, Duration::from_secs(300));
    }

    #[test]
    fn gpus_metrics_and_cors_keys() {
        let cfg = Config::from_properties(
            &parse_properties(
                "number_of_gpu=0\nenable_metrics_api=false\ncors_allowed_origin=*\n\
                 cors_allowed_methods=GET, POST\nmetrics_address=http://127.0.0.1:8080\n",
            ),
            &no_env,
        )
        .unwrap();
        assert_eq!(cfg.number_of_gpu, Some(0));
        assert!(!cfg.enable_metrics_api);
        assert_eq!(
            cfg.cors,
            Cors {
                origin: Some("*".into()),
                methods: Some("GET, POST".into()),
                headers: None
            }
        );
        assert!(cfg.ignored_keys.is_empty(), "{:?}", cfg.ignored_keys);
        let defaults = Config::from_properties(&BTreeMap::new(), &no_env).unwrap();
        assert!(defaults.enable_metrics_api && !defaults.cors.is_on());
        assert_eq!(defaults.number_of_gpu, None);
        for text in [
            "default_workers_per_model=100000\n",
            "models={\"m\": {\"1.0\": {\"minWorkers\": 5000}}}\n",
        ] {
            let e = Config::from_properties(&parse_properties(text), &no_env).unwrap_err();
            assert!(
                e.to_string()
                    .contains("more workers than max_workers_per_model (128)"),
                "{e}"
            );
        }
        let e =
            Config::from_properties(&parse_properties("cors_allowed_origin=a\u{1}b\n"), &no_env)
                .unwrap_err();
        assert!(e.to_string().contains("cors_allowed_origin"), "{e}");
    }

    #[test]
    fn command_line_overrides_win_over_file_and_environment() {
        let env = |k: &str| (k == "TS_JOB_QUEUE_SIZE").then(|| "42".to_string());
        // KServe's layout puts two listeners on one port; the runtime moves them apart.
        let file = parse_properties(
            "job_queue_size=5\nenable_envvars_config=true\n\
             inference_address=http://0.0.0.0:8085\nmanagement_address=http://0.0.0.0:8085\n",
        );
        let overrides: BTreeMap<String, String> = [
            ("job_queue_size", "7"),
            ("inference_address", "http://0.0.0.0:8080"),
            ("graceful_shutdown_timeout", "5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::layered(&file, &overrides, &env).unwrap();
        assert_eq!(c.job_queue_size, 7);
        assert_eq!(c.inference_address.to_string(), "http://0.0.0.0:8080");
        assert_eq!(c.management_address.to_string(), "http://0.0.0.0:8085");
        assert_eq!(c.graceful_shutdown_timeout, Duration::from_secs(5));
        // Turning the environment off from the command line takes TS_ away.
        let off: BTreeMap<String, String> =
            [("enable_envvars_config".to_string(), "false".to_string())].into();
        assert_eq!(
            Config::layered(&file, &off, &env).unwrap().job_queue_size,
            5
        );
        assert_eq!(
            Config::default().graceful_shutdown_timeout,
            Duration::from_secs(30)
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("k", "http://[::1]:8080").unwrap(),
            Address::Tcp("::1".into(), 8080)
        );
        assert_eq!(
            Address::parse("k", "http://localhost:1")
                .unwrap()
                .to_string(),
            "http://localhost:1"
        );
        assert!(Address::parse("k", "unix:relative").is_err());
        assert_eq!(
            Address::parse("k", "https://[::1]").unwrap().to_string(),
            "https://[::1]:443"
        );
        assert!(Address::parse("k", "https://:8443").is_err());
        assert!(Address::parse("k", "ftp://x:1").is_err());
    }

    #[test]
    fn tls_needs_both_files_and_no_keystore() {
        let props = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let e = Config::from_properties(
            &props(&[("inference_address", "https://127.0.0.1:8443")]),
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("certificate_file"), "{e}");
        let e = Config::from_properties(
            &props(&[("enable_grpc_ssl", "true"), ("certificate_file", "/c.pem")]),
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("private_key_file"), "{e}");
        let ok = Config::from_properties(
            &props(&[
                ("management_address", "https://127.0.0.1:8444"),
                ("certificate_file", "/c.pem"),
                ("private_key_file", "/k.pem"),
            ]),
            &no_env,
        )
        .unwrap();
        assert!(ok.management_address.is_tls());
        let e = Config::from_properties(&props(&[("keystore", "ks.p12")]), &no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("openssl pkcs12"), "{e}");
    }

    #[test]
    fn allowed_urls_from_the_environment_only_when_asked() {
        let env = |k: &str| (k == "TS_ALLOWED_URLS").then(|| "https://.*".to_string());
        let base: BTreeMap<String, String> = [(
            "allowed_urls".to_string(),
            "https://models\\.example\\.com/.*".to_string(),
        )]
        .into();
        let cfg = Config::from_properties(&base, &env).unwrap();
        assert_eq!(cfg.allowed_urls, ["https://models\\.example\\.com/.*"]);
        let mut asked = base.clone();
        asked.insert("use_env_allowed_urls".into(), "true".into());
        let cfg = Config::from_properties(&asked, &env).unwrap();
        assert_eq!(cfg.allowed_urls, ["https://.*"]);
        let bad: BTreeMap<String, String> = [("allowed_urls".to_string(), "(".to_string())].into();
        assert!(Config::from_properties(&bad, &no_env).is_err());
    }
}
