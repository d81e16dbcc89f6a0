//! Registering archives by URL: which URLs may be fetched, which addresses they may reach, and
//! the download itself.
//!
//! The defences, in the order a request meets them:
//! - the raw URL may not hold `..` in any spelling, nor user information;
//! - the URL is parsed and normalised (WHATWG rules: percent-decoded dots, backslashes, IPv4 in
//!   hex or decimal, IPv6 forms) and the normalised text must match an `allowed_urls` pattern
//!   whole. With no patterns (the default) nothing remote is fetched;
//! - every address the host resolves to, and an address written in the URL, must be public
//!   unless the matching pattern names the host itself: a wildcard never opens loopback,
//!   link-local (the cloud metadata address), private or reserved ranges;
//! - each redirect is checked again the same way, five at most;
//! - the body is capped at `max_archive_size` while it streams, under timeouts, into a hidden
//!   temporary file that is moved into the store only when complete.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use regex::Regex;
use tokio::io::AsyncWriteExt as _;
use url::Url;

use super::ApiError;

/// Most redirects one download follows.
pub const MAX_REDIRECTS: usize = 5;
/// Longest wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence while the body streams.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The ledger of downloaded archives in the model store: which URL each file came from.
const LEDGER: &str = ".downloads.json";

/// Why a URL is not fetched, or its download failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `..` in the URL, in any spelling.
    #[error("Relative path is not allowed in url: {0}")]
    Relative(String),
    /// The URL cannot be parsed, or has a part tchserve refuses.
    #[error("Failed to download archive from: {url}: invalid url: {why}")]
    Invalid {
        /// The URL as given.
        url: String,
        /// Why.
        why: String,
    },
    /// No `allowed_urls` pattern matches.
    #[error(
        "Given URL {0} does not match any allowed URL(s); remote archives are fetched only from \
         URLs that an allowed_urls pattern matches"
    )]
    NotAllowed(String),
    /// The host is or resolves to an address that may not be reached.
    #[error(
        "Failed to download archive from: {url}: {address} is a {kind} address; an \
         allowed_urls pattern must name the host to reach it"
    )]
    Forbidden {
        /// The URL.
        url: String,
        /// The address.
        address: IpAddr,
        /// Which range it is in.
        kind: &'static str,
    },
    /// The archive would land on a name that is taken by something not fetched from this URL.
    #[error("Model file already exists {0}")]
    Exists(String),
    /// The body is larger than `max_archive_size`.
    #[error("Failed to download archive from: {url}: larger than max_archive_size ({max} bytes)")]
    TooLarge {
        /// The URL.
        url: String,
        /// The cap.
        max: u64,
    },
    /// Anything else on the way: DNS, connection, status, timeout, disk.
    #[error("Failed to download archive from: {url}: {why}")]
    Download {
        /// The URL.
        url: String,
        /// Why.
        why: String,
    },
}

impl From<FetchError> for ApiError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Relative(_) | FetchError::NotAllowed(_) => {
                ApiError::model_not_found(e.to_string())
            }
            FetchError::Exists(_) => ApiError::conflict(e.to_string()),
            FetchError::Invalid { .. } | FetchError::Forbidden { .. } => {
                ApiError::bad_request(e.to_string())
            }
            // TorchServe's name for an archive that could not be fetched.
            FetchError::TooLarge { .. } | FetchError::Download { .. } => {
                ApiError::DownloadFailed(e.to_string())
            }
        }
    }
}

/// Whether `url` names a remote archive (rather than a file in the model store).
pub fn is_remote(url: &str) -> bool {
    let lower = url.trim_start().to_ascii_lowercase();
    ["http:", "https:"].iter().any(|s| lower.starts_with(s))
}

/// The range an address that may not be fetched from is in, or `None` for a public address.
pub fn forbidden_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            // An IPv4 address wrapped in IPv6 reaches the IPv4 host.
            if let Some(v4) = v6.to_ipv4_mapped().or_else(|| embedded_v4(v6)) {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else {
                None
            }
        }
    }
}

/// The IPv4 address inside an IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) or 6to4
/// (`2002::/16`) address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    let compatible = s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1);
    if compatible || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(last)
    } else if s[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if o[0] == 100 && o[1] & 0xc0 == 64 {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        Some("multicast or reserved")
    } else if ip.is_documentation() || (o[0] == 198 && o[1] & 0xfe == 18) {
        Some("documentation or benchmarking")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol")
    } else {
        None
    }
}

/// Which remote URLs may be fetched: `allowed_urls`, compiled.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    patterns: Vec<(String, Regex)>,
}

impl UrlPolicy {
    /// Compiles `allowed_urls` (case-insensitive, each matching the whole URL).
    pub fn new(patterns: &[String]) -> Result<Self, regex::Error> {
        let patterns = patterns
            .iter()
            .map(|p| Ok((p.clone(), Regex::new(&format!("(?i)^(?:{p})$"))?)))
            .collect::<Result<_, regex::Error>>()?;
        Ok(UrlPolicy { patterns })
    }

    /// Normalises `raw` and checks it against the patterns and, where the host is an address,
    /// the address ranges. Names are resolved and checked when connecting.
    pub fn check(&self, raw: &str) -> Result<Url, FetchError> {
        let invalid = |why: &str| FetchError::Invalid {
            url: raw.to_string(),
            why: why.into(),
        };
        // Before parsing, in every spelling: parsing would resolve it and hide it.
        let lower = raw.to_ascii_lowercase();
        if lower.contains("..")
            || lower.contains("%2e%2e")
            || lower.contains(".%2e")
            || lower.contains("%2e.")
        {
            return Err(FetchError::Relative(raw.to_string()));
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid("it holds spaces or control characters"));
        }
        let url = Url::parse(raw).map_err(|e| invalid(&e.to_string()))?;
        self.check_parsed(&url, raw)?;
        Ok(url)
    }

    /// The checks on a parsed URL: for the first URL and for every redirect.
    fn check_parsed(&self, url: &Url, raw: &str) -> Result<(), FetchError> {
        let invalid = |why: &str| FetchError::Invalid {
            url: raw.to_string(),
            why: why.into(),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("only http and https archives are downloaded"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("user information in a url is not accepted"));
        }
        if url
            .path_segments()
            .is_some_and(|mut s| s.any(|seg| seg == ".." || seg == "."))
        {
            return Err(FetchError::Relative(raw.to_string()));
        }
        let matching: Vec<&str> = self.matching(url).collect();
        if matching.is_empty() {
            return Err(FetchError::NotAllowed(raw.to_string()));
        }
        let host = match url.host() {
            Some(url::Host::Ipv4(v4)) => Host::Address(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => Host::Address(IpAddr::V6(v6)),
            Some(url::Host::Domain(d)) => Host::Name(d.to_ascii_lowercase()),
            None => return Err(invalid("it has no host")),
        };
        // Only a pattern that both matches this URL and spells out its host opens a private
        // address: a pattern naming the host for another port or path does not, nor does the
        // host's name appearing elsewhere in some pattern.
        let named_here = matching.iter().any(|p| names_host(p, url));
        match host {
            Host::Address(address) => {
                if let Some(kind) = forbidden_kind(address)
                    && !named_here
                {
                    return Err(FetchError::Forbidden {
                        url: raw.to_string(),
                        address,
                        kind,
                    });
                }
            }
            // The resolver lets a named host reach private addresses whatever the URL: so a
            // named host must come through a pattern that names it.
            Host::Name(name) if self.host_named(&name) && !named_here => {
                return Err(invalid(&format!(
                    "an allowed_urls pattern names the host {name}, but none that names it \
                     matches this URL; add one that does"
                )));
            }
            Host::Name(_) => {}
        }
        Ok(())
    }

    /// The patterns matching the normalised URL.
    fn matching<'a>(&'a self, url: &'a Url) -> impl Iterator<Item = &'a str> + 'a {
        self.patterns
            .iter()
            .filter(move |(_, re)| re.is_match(url.as_str()))
            .map(|(p, _)| p.as_str())
    }

    /// Whether a pattern names `host` as its host, which is what lets a fetch reach a private
    /// address.
    fn host_named(&self, host: &str) -> bool {
        self.patterns.iter().any(|(p, _)| pattern_names(p, host))
    }
}

/// A URL's host, as the checks tell them apart.
enum Host {
    Address(IpAddr),
    Name(String),
}

/// Whether `pattern` spells out the URL's host (`http://10\.0\.0\.5:8000/.*` does; `https://.*`
/// does not).
fn names_host(pattern: &str, url: &Url) -> bool {
    url.host_str()
        .is_some_and(|host| pattern_names(pattern, host))
}

/// Whether the host part of `pattern` (between `://` and the port or path) is `host`, written
/// out with no regular-expression operator in it. Anywhere else in a pattern, a host's name
/// (`http://.*/localhost-mirror/.*`) names nothing.
fn pattern_names(pattern: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    pattern_host(pattern).is_some_and(|h| !h.is_empty() && h == host)
}

/// The literal host of a pattern, unescaped and lowercased; None when that part is not literal.
fn pattern_host(pattern: &str) -> Option<String> {
    let (_, rest) = pattern.split_once("://")?;
    // The authority ends where the path, query or fragment begins; a `\/` is escaped but still
    // a slash.
    let authority: String = {
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('/') | None => break,
                    Some(next) => {
                        out.push('\\');
                        out.push(next);
                    }
                },
                '/' | '?' | '#' => break,
                c => out.push(c),
            }
        }
        out
    };
    let host = if let Some(v6) = authority.strip_prefix("\\[") {
        v6.split("\\]").next()?.to_string()
    } else if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next()?.to_string()
    } else {
        authority.split(':').next()?.to_string()
    };
    // Escaped characters are literal; an unescaped operator makes the host a wildcard.
    let mut literal = String::new();
    let mut chars = host.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => literal.push(chars.next()?),
            '*' | '+' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => return None,
            c => literal.push(c),
        }
    }
    Some(literal.to_ascii_lowercase())
}

/// Resolves names for downloads, dropping addresses the policy does not let them reach: the
/// check happens on the addresses actually connected to, so a name that resolves differently
/// the second time (DNS rebinding) gains nothing.
#[derive(Debug)]
struct CheckedResolver {
    policy: Arc<UrlPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let named = policy.host_named(&host);
            let (allowed, refused): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|a| named || forbidden_kind(a.ip()).is_none());
            if allowed.is_empty() {
                let why = match refused.first() {
                    Some(a) => format!(
                        "{host} resolves to {}, a {} address; an allowed_urls pattern must name \
                         the host to reach it",
                        a.ip(),
                        forbidden_kind(a.ip()).unwrap_or("forbidden")
                    ),
                    None => format!("{host} has no address"),
                };
                return Err(why.into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// A downloaded archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Its file name in the model store.
    pub name: String,
    /// Downloaded by this call (not found from an earlier download of the same URL).
    pub fresh: bool,
}

/// Downloads archives into the model store.
#[derive(Debug)]
pub struct Fetcher {
    policy: Arc<UrlPolicy>,
    client: reqwest::Client,
    store: PathBuf,
    max_size: u64,
    /// One download per URL at a time: a second registration of the same URL waits for the
    /// first and then finds the file.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Downloads of different URLs finish at once: one ledger update at a time.
    ledger: Mutex<()>,
}

impl Fetcher {
    /// A fetcher for `store`, allowing what `allowed_urls` allows.
    pub fn new(
        store: PathBuf,
        allowed_urls: &[String],
        max_size: u64,
        timeout: Duration,
    ) -> Result<Self, String> {
        let policy = Arc::new(UrlPolicy::new(allowed_urls).map_err(|e| e.to_string())?);
        let redirect_policy = Arc::clone(&policy);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(client_tls()?)
            // A proxy from the environment would move the connection out of the address
            // checks' sight.
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(STALL_TIMEOUT)
            .timeout(timeout)
            .dns_resolver(Arc::new(CheckedResolver {
                policy: Arc::clone(&policy),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                let next = attempt.url().to_string();
                match redirect_policy.check(&next) {
                    Ok(_) => attempt.follow(),
                    Err(e) => attempt.error(format!("redirected to {next}, which is refused: {e}")),
                }
            }))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Fetcher {
            policy,
            client,
            store,
            max_size,
            in_flight: Mutex::new(HashMap::new()),
            ledger: Mutex::new(()),
        })
    }

    /// Checks `raw` and, if it is allowed, downloads it into the model store unless this URL's
    /// archive is already there.
    pub async fn fetch(&self, raw: &str) -> Result<Fetched, FetchError> {
        let url = self.policy.check(raw)?;
        let name = file_name(&url).ok_or_else(|| FetchError::Invalid {
            url: raw.to_string(),
            why: "its path does not end in a file name".into(),
        })?;
        let lock = {
            let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(map.entry(url.to_string()).or_default())
        };
        let _one_at_a_time = lock.lock().await;
        let target = self.store.join(&name);
        if target.exists() {
            return if ledger_get(&self.store, &name).as_deref() == Some(url.as_str()) {
                tracing::info!(url = %shown(&url), file = %name, "archive already downloaded; not fetching it again");
                Ok(Fetched { name, fresh: false })
            } else {
                Err(FetchError::Exists(name))
            };
        }
        self.download(&url, raw, &target).await?;
        let recorded = {
            let _one = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            ledger_put(&self.store, &name, url.as_str())
        };
        if recorded.is_err() {
            // Unrecorded, the file would block its own URL later: it goes.
            let _ = std::fs::remove_file(&target);
        }
        recorded.map_err(|e| FetchError::Download {
            url: raw.to_string(),
            why: format!("cannot record the download: {e}"),
        })?;
        Ok(Fetched { name, fresh: true })
    }

    /// Whether the store's file `name` was downloaded by a fetcher (it is in the ledger).
    pub fn downloaded(&self, name: &str) -> bool {
        ledger_get(&self.store, name).is_some()
    }

    /// Removes an archive this fetcher downloaded, and its ledger entry: a registration that
    /// fails on a fresh download leaves nothing behind.
    pub fn discard(&self, name: &str) {
        let _ = std::fs::remove_file(self.store.join(name));
        let _one = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let mut ledger = ledger_read(&self.store);
        if ledger.remove(name).is_some() {
            let _ = ledger_write(&self.store, &ledger);
        }
    }

    async fn download(&self, url: &Url, raw: &str, target: &Path) -> Result<(), FetchError> {
        let failed = |why: String| FetchError::Download {
            url: raw.to_string(),
            why,
        };
        let started = Instant::now();
        let response = self
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("the server answered {status}")));
        }
        let announced = response.content_length();
        if announced.is_some_and(|n| n > self.max_size) {
            return Err(FetchError::TooLarge {
                url: raw.to_string(),
                max: self.max_size,
            });
        }
        let part = Partial::create(target);
        let mut file = tokio::fs::File::create(&part.path)
            .await
            .map_err(|e| failed(format!("cannot write {}: {e}", part.path.display())))?;
        let mut body = response.bytes_stream();
        let mut got: u64 = 0;
        let mut reported = Instant::now();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| failed(error_chain(&e)))?;
            got += chunk.len() as u64;
            if got > self.max_size {
                return Err(FetchError::TooLarge {
                    url: raw.to_string(),
                    max: self.max_size,
                });
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| failed(format!("cannot write {}: {e}", part.path.display())))?;
            if reported.elapsed() >= Duration::from_secs(5) {
                reported = Instant::now();
                match announced {
                    Some(total) => {
                        tracing::info!(url = %shown(url), "downloading: {got} of {total} bytes")
                    }
                    None => tracing::info!(url = %shown(url), "downloading: {got} bytes"),
                }
            }
        }
        if announced.is_some_and(|n| n != got) {
            return Err(failed(format!(
                "the server announced {} bytes and sent {got}",
                announced.unwrap_or_default()
            )));
        }
        file.sync_all()
            .await
            .map_err(|e| failed(format!("cannot write {}: {e}", part.path.display())))?;
        drop(file);
        part.finish(target).map_err(|e| failed(e.to_string()))?;
        tracing::info!(
            url = %shown(url),
            bytes = got,
            ms = started.elapsed().as_millis() as u64,
            file = %target.display(),
            "archive downloaded"
        );
        Ok(())
    }
}

/// The error and its causes in one line: reqwest's own message alone rarely says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `text` as the log shows it: every `http(s)://` URL in it without its query and fragment,
/// where presigned URLs carry their signatures and key ids, however the URL is spelled there
/// (an HTTP client's error spells it parsed: host lowercased, default port dropped).
pub(crate) fn shown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["http://", "https://"]
        .iter()
        .filter_map(|scheme| rest.find(scheme))
        .min()
    {
        out.push_str(&rest[..at]);
        let url = &rest[at..];
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .unwrap_or(url.len());
        match url[..end].find(['?', '#']) {
            Some(q) => {
                out.push_str(&url[..q]);
                out.push_str("?…");
            }
            None => out.push_str(&url[..end]),
        }
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

/// `url` as the log shows it: without its query and fragment, where presigned URLs carry their
/// signatures and key ids.
fn shown(url: &Url) -> String {
    let mut bare = url.clone();
    bare.set_query(None);
    bare.set_fragment(None);
    let mut out = bare.to_string();
    if url.query().is_some() || url.fragment().is_some() {
        out.push_str("?…");
    }
    out
}

/// The archive's name in the store: the URL path's last segment, decoded, if it is a plain
/// file name.
fn file_name(url: &Url) -> Option<String> {
    let last = url.path_segments()?.next_back()?;
    let name = percent_decode(last)?;
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control);
    plain.then_some(name)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A download in progress: a hidden file beside its target, removed unless finished.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Partial {
    fn create(target: &Path) -> Self {
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(format!(".{name}.{}.part", uuid::Uuid::new_v4()));
        Partial { path, done: false }
    }

    /// Moves the finished file to `target`, refusing to replace one that appeared meanwhile.
    fn finish(mut self, target: &Path) -> std::io::Result<()> {
        match std::fs::hard_link(&self.path, target) {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
            // A file system without hard links: a rename is the next best.
            Err(_) => std::fs::rename(&self.path, target)?,
        }
        self.done = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn ledger_read(store: &Path) -> serde_json::Map<String, serde_json::Value> {
    std::fs::read(store.join(LEDGER))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn ledger_get(store: &Path, name: &str) -> Option<String> {
    ledger_read(store)
        .get(name)
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

fn ledger_put(store: &Path, name: &str, url: &str) -> std::io::Result<()> {
    let mut ledger = ledger_read(store);
    ledger.insert(name.to_string(), url.into());
    ledger_write(store, &ledger)
}

fn ledger_write(
    store: &Path,
    ledger: &serde_json::Map<String, serde_json::Value>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = store.join(format!("{LEDGER}.{}.tmp", uuid::Uuid::new_v4()));
    // Its URLs may carry signatures: readable by the server's user alone.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(&serde_json::to_vec_pretty(ledger).unwrap_or_default())?;
    std::fs::rename(&tmp, store.join(LEDGER))
}

/// TLS for the server's own HTTP clients: rustls with the ring provider and the web's root
/// certificates (the platform's store is not read, so a container needs no CA bundle).
pub(crate) fn client_tls() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(patterns: &[&str]) -> UrlPolicy {
        UrlPolicy::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>())
            .expect("patterns")
    }

    #[test]
    fn logs_show_urls_without_their_signatures() {
        let signed = Url::parse(
            "https://bucket.example.com/m.mar?X-Amz-Signature=secret&X-Amz-Credential=AKIA#frag",
        )
        .unwrap();
        assert_eq!(shown(&signed), "https://bucket.example.com/m.mar?…");
        let plain = Url::parse("https://example.com/m.mar").unwrap();
        assert_eq!(shown(&plain), "https://example.com/m.mar");
        assert_eq!(
            shown_text("https://h.example/m.mar?X-Amz-Signature=secret"),
            "https://h.example/m.mar?…"
        );
        assert_eq!(shown_text("m.mar"), "m.mar");
        // In an error's words, as an HTTP client spells the URL, and a redirect's target.
        assert_eq!(
            shown_text(
                "error sending request for url (https://bucket.example/m.mar?Sig=secret): \
                 redirected to http://other.example/x?token=1, refused"
            ),
            "error sending request for url (https://bucket.example/m.mar?…): redirected to \
             http://other.example/x?…, refused"
        );
    }

    #[test]
    fn nothing_remote_by_default() {
        let p = policy(&[]);
        assert!(matches!(
            p.check("https://example.com/m.mar"),
            Err(FetchError::NotAllowed(_))
        ));
    }

    #[test]
    fn dots_in_every_spelling_are_refused_before_parsing() {
        let p = policy(&["https://example\\.com/models/.*"]);
        for url in [
            "https://example.com/models/../secret.mar",
            "https://example.com/models/%2e%2e/secret.mar",
            "https://example.com/models/%2E%2E/secret.mar",
            "https://example.com/models/.%2e/secret.mar",
            "https://example.com/models/%2e./secret.mar",
            "https://example.com/models\\..\\secret.mar",
        ] {
            assert!(
                matches!(p.check(url), Err(FetchError::Relative(_))),
                "{url}"
            );
        }
        assert!(p.check("https://example.com/models/m.mar").is_ok());
    }

    #[test]
    fn the_normalised_url_is_what_must_match() {
        let p = policy(&["https://models\\.example\\.com/.*"]);
        // Userinfo that makes the host look allowed.
        assert!(
            p.check("https://models.example.com@evil.test/m.mar")
                .is_err()
        );
        assert!(matches!(
            p.check("https://user:pw@models.example.com/m.mar"),
            Err(FetchError::Invalid { .. })
        ));
        // Backslashes turn into slashes, the host into lower case.
        assert!(p.check("https://MODELS.example.com\\m.mar").is_ok());
        assert!(matches!(
            p.check("https://evil.test\\@models.example.com/m.mar"),
            Err(FetchError::NotAllowed(_)) | Err(FetchError::Invalid { .. })
        ));
        assert!(matches!(
            p.check("file:///etc/passwd"),
            Err(FetchError::Invalid { .. })
        ));
    }

    #[test]
    fn wildcards_do_not_open_private_addresses() {
        let p = policy(&["https?://.*"]);
        for url in [
            "http://127.0.0.1/m.mar",
            "http://2130706433/m.mar",
            "http://0x7f.1/m.mar",
            "http://0177.0.0.1/m.mar",
            "http://169.254.169.254/latest/meta-data/m.mar",
            "http://[::1]/m.mar",
            "http://[::ffff:127.0.0.1]/m.mar",
            "http://[::ffff:a9fe:a9fe]/m.mar",
            "http://[fe80::1]/m.mar",
            "http://[fd00:ec2::254]/m.mar",
            "http://10.1.2.3/m.mar",
            "http://192.168.0.1/m.mar",
            "http://172.16.0.1/m.mar",
            "http://100.100.100.200/m.mar",
            "http://0.0.0.0/m.mar",
            "http://[64:ff9b::7f00:1]/m.mar",
            "http://[2002:7f00:1::]/m.mar",
        ] {
            assert!(
                matches!(p.check(url), Err(FetchError::Forbidden { .. })),
                "{url}: {:?}",
                p.check(url)
            );
        }
        assert!(p.check("http://93.184.215.14/m.mar").is_ok());
        assert!(
            p.check("http://[2606:2800:21f:cb07:6820:80da:af6b:8b2c]/m.mar")
                .is_ok()
        );
    }

    #[test]
    fn a_pattern_that_names_the_host_opens_it() {
        let p = policy(&[
            "http://127\\.0\\.0\\.1:8000/.*",
            "http://models\\.internal/.*",
        ]);
        assert!(p.check("http://127.0.0.1:8000/m.mar").is_ok());
        assert!(matches!(
            p.check("http://127.0.0.1:9000/m.mar"),
            Err(FetchError::NotAllowed(_))
        ));
        assert!(p.host_named("models.internal"));
        assert!(!p.host_named("other.internal"));
        assert!(!policy(&["https?://.*"]).host_named("localhost"));
    }

    #[test]
    fn only_a_pattern_that_matches_and_names_the_host_opens_it() {
        // A host named for one port is not opened on another by a wildcard pattern.
        let p = policy(&["http://localhost:8000/.*", "http://.*:9000/.*"]);
        assert!(p.check("http://localhost:8000/m.mar").is_ok());
        assert!(matches!(
            p.check("http://localhost:9000/m.mar"),
            Err(FetchError::Invalid { .. })
        ));
        let p = policy(&["http://127\\.0\\.0\\.1:8000/.*", "http://.*:9000/.*"]);
        assert!(matches!(
            p.check("http://127.0.0.1:9000/m.mar"),
            Err(FetchError::Forbidden { .. })
        ));
        // A host's name elsewhere in a pattern names nothing.
        let p = policy(&["http://.*:9000/localhost-mirror/.*", "https://.*/models/.*"]);
        assert!(!p.host_named("localhost"));
        assert!(!p.host_named("models"));
        // The order of the patterns does not matter: any that matches and names the host.
        let p = policy(&["http://.*/.*", "http://10\\.0\\.0\\.5/.*"]);
        assert!(p.check("http://10.0.0.5/m.mar").is_ok());
        // Hosts written out: escaped or not, with a port, IPv6 in brackets; wildcards are not.
        assert_eq!(
            pattern_host("https://models\\.internal:443/.*").as_deref(),
            Some("models.internal")
        );
        assert_eq!(
            pattern_host("http://Models.Internal/.*").as_deref(),
            Some("models.internal")
        );
        assert_eq!(
            pattern_host("http://\\[::1\\]:8000/.*").as_deref(),
            Some("::1")
        );
        assert_eq!(pattern_host("http://.*\\.internal/.*"), None);
        assert_eq!(pattern_host("http://(a|b)\\.internal/.*"), None);
        assert_eq!(pattern_host("models.internal"), None);
    }

    #[test]
    fn file_names_are_plain() {
        let name = |u: &str| file_name(&Url::parse(u).expect("url"));
        assert_eq!(name("https://h/a/b/m.mar").as_deref(), Some("m.mar"));
        assert_eq!(
            name("https://h/a/m%20v2.mar?x=1").as_deref(),
            Some("m v2.mar")
        );
        assert_eq!(name("https://h/a/"), None);
        assert_eq!(name("https://h/a/.hidden"), None);
        assert_eq!(name("https://h/a/x%2Fy.mar"), None);
        assert_eq!(name("https://h/a/x%5Cy.mar"), None);
    }
}
