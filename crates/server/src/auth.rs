//! Token authorization, compatible with TorchServe's: three keys written to `key_file.json`,
//! `Authorization: Bearer <key>` on every inference and management request.
//!
//! The inference key opens the inference listener, the management key the management listener,
//! and the API key (which never expires) `GET /token?type=...`, which issues a fresh inference or
//! management key. Keys are 32 characters (24 random bytes, base64url): TorchServe's 8-character
//! keys carry only 48 bits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// Which listener a key opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Predictions on the inference listener.
    Inference,
    /// The management API.
    Management,
}

impl Scope {
    /// The name used in `key_file.json` and in `/token?type=`.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Inference => "inference",
            Scope::Management => "management",
        }
    }

    /// Parses a `/token?type=` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inference" => Some(Scope::Inference),
            "management" => Some(Scope::Management),
            _ => None,
        }
    }
}

/// Why the key file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing the token key file {}: {source}", path.display())]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub source: std::io::Error,
}

#[derive(Clone)]
struct Key {
    value: String,
    expires: DateTime<Utc>,
}

impl Key {
    fn fresh(lifetime: Duration) -> Self {
        Key {
            value: random_key(),
            expires: Utc::now() + lifetime,
        }
    }
}

#[derive(Clone)]
struct Keys {
    inference: Key,
    management: Key,
    api: String,
}

/// The live keys and the file that publishes them.
pub struct Tokens {
    keys: Mutex<Keys>,
    /// Held while a renewal writes the file, so two renewals cannot publish out of order, while
    /// requests checking keys only ever wait for `keys`, which is never held across I/O.
    renewing: Mutex<()>,
    lifetime: Duration,
    file: PathBuf,
}

/// Leaves the keys out, so that logging the server's state cannot leak them.
impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("file", &self.file)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Makes fresh keys and writes them to `file` (mode 0600), replacing any old one.
    pub fn create(file: PathBuf, lifetime: Duration) -> Result<Self, KeyFileError> {
        if holds_live_keys(&file) {
            // Most likely another server started from this folder: its keys are about to be
            // replaced in the file, and would then be known to it alone.
            tracing::warn!(
                "{} holds keys that have not expired: if another server started from this \
                 folder still runs, its keys are now only in its memory; start each server \
                 from a folder of its own",
                file.display()
            );
        }
        let keys = Keys {
            inference: Key::fresh(lifetime),
            management: Key::fresh(lifetime),
            api: random_key(),
        };
        write_file(&file, &keys)?;
        Ok(Tokens {
            keys: Mutex::new(keys),
            renewing: Mutex::new(()),
            lifetime,
            file,
        })
    }

    /// The key file's path.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether an `Authorization` header value carries the live, unexpired key for `scope`.
    pub fn allows(&self, scope: Scope, authorization: Option<&str>) -> bool {
        let Some(given) = authorization.and_then(bearer) else {
            return false;
        };
        let keys = self.lock();
        let key = match scope {
            Scope::Inference => &keys.inference,
            Scope::Management => &keys.management,
        };
        Utc::now() < key.expires && same(given, &key.value)
    }

    /// Whether `authorization` carries any live key: the inference, management or API key.
    pub fn holds_any_key(&self, authorization: Option<&str>) -> bool {
        authorization.and_then(bearer).is_some_and(|given| {
            let keys = self.lock();
            let now = Utc::now();
            same(given, &keys.api)
                || (now < keys.inference.expires && same(given, &keys.inference.value))
                || (now < keys.management.expires && same(given, &keys.management.value))
        })
    }

    /// Whether `authorization` carries the API key (the one that renews the others).
    pub fn holds_api_key(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(bearer)
            .is_some_and(|given| same(given, &self.lock().api))
    }

    /// Issues a new key for `scope` when `authorization` carries the API key, rewrites the key
    /// file, and returns the new entry as it appears there. The new key replaces the old one
    /// only once the file says so: a failed write leaves both as they were.
    pub fn renew(&self, scope: Scope, authorization: Option<&str>) -> Result<Value, RenewError> {
        let Some(given) = authorization.and_then(bearer) else {
            return Err(RenewError::Denied);
        };
        let _one_at_a_time = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.lock().clone();
        if !same(given, &next.api) {
            return Err(RenewError::Denied);
        }
        let fresh = Key::fresh(self.lifetime);
        match scope {
            Scope::Inference => next.inference = fresh.clone(),
            Scope::Management => next.management = fresh.clone(),
        }
        write_file(&self.file, &next).map_err(RenewError::File)?;
        *self.lock() = next;
        Ok(json!({ scope.name(): entry(&fresh) }))
    }

    /// Deletes the key file when it still holds this server's keys (at a stop: the keys die with
    /// the server), leaving alone a file another server has written since.
    pub fn remove_file(&self) {
        let ours = std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|doc| doc["API"]["key"].as_str() == Some(self.lock().api.as_str()));
        if !ours {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.file) {
            tracing::warn!("cannot remove {}: {e}", self.file.display());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        // The keys are replaced whole, so a panic elsewhere cannot leave them half-written.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes through a private temp file and a rename, so a reader never sees half a file and the
/// keys are never readable by other users, not even for a moment.
fn write_file(file: &Path, keys: &Keys) -> Result<(), KeyFileError> {
    let mut doc = Map::new();
    doc.insert("management".into(), entry(&keys.management));
    doc.insert("inference".into(), entry(&keys.inference));
    doc.insert("API".into(), json!({ "key": keys.api }));
    let text = serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_default();
    let tmp = file.with_extension(format!("json.{}", uuid::Uuid::new_v4()));
    let written = (|| {
        let mut f = open_private(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|source| KeyFileError {
        path: file.to_path_buf(),
        source,
    })
}

/// Removes the key file when dropped, so that every way out of the server (a graceful stop, a
/// listener that cannot bind) takes its keys with it.
#[derive(Debug)]
pub struct KeyFileGuard(pub std::sync::Arc<Tokens>);

impl Drop for KeyFileGuard {
    fn drop(&mut self) {
        self.0.remove_file();
    }
}

/// Why `/token` refused.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// No API key, or the wrong one.
    #[error("the API key is missing or wrong")]
    Denied,
    /// The new key could not be published.
    #[error(transparent)]
    File(KeyFileError),
}

/// Whether `file` is a key file whose inference or management key has not expired yet.
fn holds_live_keys(file: &Path) -> bool {
    let Some(doc) = std::fs::read_to_string(file)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
    else {
        return false;
    };
    ["inference", "management"].iter().any(|scope| {
        doc[scope]["expiration time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|t| t > Utc::now())
    })
}

fn entry(key: &Key) -> Value {
    json!({
        "key": key.value,
        "expiration time": key.expires.to_rfc3339_opts(SecondsFormat::Micros, true),
    })
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The key in `Bearer <key>`, as TorchServe matches it (`^Bearer\s+(\S+)$`).
fn bearer(header: &str) -> Option<&str> {
    let rest = header.strip_prefix("Bearer")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let key = rest.trim_start();
    (!key.is_empty() && !key.contains(char::is_whitespace)).then_some(key)
}

/// Compares in time that does not depend on where the strings first differ, so response timing
/// cannot reveal a key one character at a time.
fn same(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, &e) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ e);
    }
    diff == 0
}

fn random_key() -> String {
    let mut bytes = [0u8; 24];
    // The operating system's generator; failing to reach it leaves no safe way to make keys.
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut bytes).expect("the operating system's random number generator");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn bearer_follows_torchserve_pattern() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("Bearer \t abc"), Some("abc"));
        assert_eq!(bearer("Bearerabc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer a b"), None);
        assert_eq!(bearer("bearer abc"), None);
        assert_eq!(bearer("Basic abc"), None);
    }

    #[test]
    fn same_compares_whole_strings() {
        assert!(same("abc", "abc"));
        assert!(!same("abd", "abc"));
        assert!(!same("ab", "abc"));
        assert!(!same("abcd", "abc"));
        assert!(!same("", "abc"));
    }

    #[test]
    fn a_key_file_with_unexpired_keys_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key_file.json");
        assert!(!holds_live_keys(&file));
        Tokens::create(file.clone(), Duration::from_secs(60)).unwrap();
        assert!(holds_live_keys(&file));
        Tokens::create(file.clone(), Duration::ZERO).unwrap();
        assert!(!holds_live_keys(&file));
    }

    #[test]
    fn keys_are_published_privately_and_checked_per_scope() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key_file.json");
        let t = Tokens::create(file.clone(), Duration::from_secs(60)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let doc = read(&file);
        let keys: Vec<&str> = ["inference", "management", "API"]
            .iter()
            .map(|k| doc[k]["key"].as_str().unwrap())
            .collect();
        assert!(keys.iter().all(|k| k.len() == 32), "{keys:?}");
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
        assert!(doc["API"].get("expiration time").is_none());
        assert!(
            doc["inference"]["expiration time"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        let bearer = |k: &str| format!("Bearer {k}");
        assert!(t.allows(Scope::Inference, Some(&bearer(keys[0]))));
        assert!(!t.allows(Scope::Management, Some(&bearer(keys[0]))));
        assert!(t.allows(Scope::Management, Some(&bearer(keys[1]))));
        assert!(!t.allows(Scope::Inference, Some(&bearer(keys[2]))));
        assert!(!t.allows(Scope::Inference, None));
        // A file another server has written since is not ours to remove.
        let theirs = std::fs::read_to_string(&file)
            .unwrap()
            .replace(keys[2], "someone-else");
        std::fs::write(&file, &theirs).unwrap();
        t.remove_file();
        assert!(file.exists());
        std::fs::write(&file, serde_json::to_string(&doc).unwrap()).unwrap();
        t.remove_file();
        assert!(!file.exists());
        assert!(
            !format!("{t:?}").contains(keys[0]),
            "Debug leaves the keys out"
        );
    }

    #[test]
    fn expired_keys_are_refused_until_renewed_with_the_api_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key_file.json");
        let t = Tokens::create(file.clone(), Duration::ZERO).unwrap();
        let doc = read(&file);
        let old = format!("Bearer {}", doc["inference"]["key"].as_str().unwrap());
        let api = format!("Bearer {}", doc["API"]["key"].as_str().unwrap());
        assert!(!t.allows(Scope::Inference, Some(&old)), "expired");
        assert!(matches!(
            t.renew(Scope::Inference, Some(&old)),
            Err(RenewError::Denied)
        ));
        let t = Tokens {
            lifetime: Duration::from_secs(60),
            ..t
        };
        // A failed write publishes nothing and changes nothing.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        let stuck = Tokens {
            file: blocked.clone(),
            ..Tokens::create(dir.path().join("other.json"), Duration::from_secs(60)).unwrap()
        };
        let stuck_api = format!("Bearer {}", stuck.lock().api);
        let before = stuck.lock().inference.value.clone();
        assert!(matches!(
            stuck.renew(Scope::Inference, Some(&stuck_api)),
            Err(RenewError::File(_))
        ));
        assert!(stuck.allows(Scope::Inference, Some(&format!("Bearer {before}"))));
        std::fs::remove_file(dir.path().join("other.json")).unwrap();
        std::fs::remove_dir(&blocked).unwrap();
        let fresh = t.renew(Scope::Inference, Some(&api)).unwrap();
        let fresh_key = fresh["inference"]["key"].as_str().unwrap();
        assert_eq!(read(&file)["inference"]["key"], fresh_key);
        assert_eq!(read(&file)["management"], doc["management"], "untouched");
        assert!(t.allows(Scope::Inference, Some(&format!("Bearer {fresh_key}"))));
        assert!(!t.allows(Scope::Inference, Some(&old)));
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temp files left beside the key file");
    }
}
