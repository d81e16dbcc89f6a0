//! Snapshots: the registered models, written after every management change and restored at
//! start-up, so nothing registered is lost across a restart.
//!
//! The file holds TorchServe's `model_snapshot` JSON. It is written to a temporary file,
//! synced, and renamed over the old one, so a crash at any moment leaves the last good snapshot.
//! One [`Snapshots`] writes it at a time, always from the registry as it is when the write
//! starts, and a management call answers only once a snapshot that includes its change is on
//! disk: what was acknowledged survives a crash.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use crate::core::registry::{ModelEntry, Origin, RegisterParams, Registry};

/// The snapshot writer of one server.
#[derive(Debug)]
pub struct Snapshots {
    dir: PathBuf,
    registry: Arc<Registry>,
    /// Changes announced so far.
    requested: AtomicU64,
    /// Changes included in the snapshot on disk; held while a snapshot is written.
    written: tokio::sync::Mutex<u64>,
}

impl Snapshots {
    /// A writer of `dir/snapshot.json` for `registry`.
    pub fn new(dir: PathBuf, registry: Arc<Registry>) -> Self {
        Snapshots {
            dir,
            registry,
            requested: AtomicU64::new(0),
            written: tokio::sync::Mutex::new(0),
        }
    }

    /// Records the registry after a change to it; returns once a snapshot that includes the
    /// change is on disk (true), or writing it failed, which is logged (false).
    pub async fn save(&self) -> bool {
        // The change happened before this count, so any snapshot taken after reading a count
        // at least as large includes it.
        let mine = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut written = self.written.lock().await;
        if *written >= mine {
            // A writer that started after this change has already written it.
            return true;
        }
        let upto = self.requested.load(Ordering::SeqCst);
        let value = to_json(&self.registry.snapshot_entries());
        let dir = self.dir.clone();
        match tokio::task::spawn_blocking(move || write(&dir, &value)).await {
            Ok(Ok(())) => {
                *written = upto;
                true
            }
            Ok(Err(e)) => {
                tracing::error!(
                    "writing the snapshot to {}: {e}; the previous snapshot is kept",
                    self.dir.display()
                );
                false
            }
            Err(e) => {
                tracing::error!("writing the snapshot: {e}");
                false
            }
        }
    }

    /// The folder the snapshot lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Moves an unreadable snapshot aside (never overwriting it) and returns where it went.
pub fn keep_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let aside = dir.join(format!("{FILE_NAME}.unreadable-{stamp}"));
    fs::rename(dir.join(FILE_NAME), &aside)?;
    Ok(aside)
}

/// File name of the snapshot inside the snapshot folder.
pub const FILE_NAME: &str = "snapshot.json";

/// The snapshot JSON of the given models.
pub fn to_json(models: &std::collections::BTreeMap<String, ModelEntry>) -> Value {
    let mut out = Map::new();
    let mut count = 0;
    for (name, entry) in models {
        let mut versions = Map::new();
        for (v, m) in &entry.versions {
            let (min, max) = m.min_max();
            let mut version = json!({
                    "defaultVersion": *v == entry.default,
                    "marName": m.mar_name,
                    "minWorkers": min,
                    "maxWorkers": max,
                    "batchSize": m.batch_size,
                    "maxBatchDelay": m.max_batch_delay_ms,
                    "responseTimeout": m.response_timeout_s,
                    "startupTimeout": m.startup_timeout_s,
                "runtimeType": m.runtime.as_str(),
            });
            // tchserve's own key (TorchServe ignores it): a handler named at registration.
            if let Some(h) = &m.handler_override {
                version["handler"] = json!(h);
            }
            versions.insert(v.clone(), version);
            count += 1;
        }
        out.insert(name.clone(), Value::Object(versions));
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({"name": FILE_NAME, "modelCount": count, "created": created, "models": out})
}

/// Writes `value` to `dir/snapshot.json` atomically. On failure (a full disk, say) the old
/// snapshot is untouched and the partial file is removed.
pub fn write(dir: &Path, value: &Value) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let final_path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(value)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &final_path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself is durable only once the folder is synced.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the snapshot in `dir`, if there is one. JSON that is not a snapshot's shape (`null`,
/// `{}`, a model that is not an object of versions, a version without its archive) cannot be
/// read either: restoring from it would quietly serve nothing.
pub fn read(dir: &Path) -> Result<Option<Value>, String> {
    let path: PathBuf = dir.join(FILE_NAME);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|v: Value| check_shape(&v).map(|()| Some(v)))
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Whether `v` has a snapshot's shape: `{"models": {name: {version: {"marName": ..., ...}}}}`.
fn check_shape(v: &Value) -> Result<(), String> {
    let models = v
        .get("models")
        .and_then(Value::as_object)
        .ok_or("not a snapshot: it holds no \"models\" object")?;
    for (name, versions) in models {
        let versions = versions
            .as_object()
            .ok_or_else(|| format!("model {name:?} is not an object of versions"))?;
        for (version, entry) in versions {
            if entry.get("marName").and_then(Value::as_str).is_none() {
                return Err(format!(
                    "model {name:?} version {version:?} names no archive (\"marName\")"
                ));
            }
        }
    }
    Ok(())
}

/// The registrations a snapshot asks for; default versions come last so they win.
pub fn registrations(snapshot: &Value) -> Vec<RegisterParams> {
    let mut out = Vec::new();
    let Some(models) = snapshot.get("models").and_then(Value::as_object) else {
        return out;
    };
    for (name, versions) in models {
        let Some(versions) = versions.as_object() else {
            continue;
        };
        for (version, v) in versions {
            // A setting of the wrong type is left to its default, and said.
            let int = |k: &str| match v.get(k) {
                None | Some(Value::Null) => None,
                Some(n) if n.is_i64() => n.as_i64(),
                Some(other) => {
                    tracing::warn!(
                        "the snapshot's {k} of {name} {version} is {other}, not an integer; \
                         using the default"
                    );
                    None
                }
            };
            out.push(RegisterParams {
                url: v
                    .get("marName")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                model_name: Some(name.clone()),
                runtime: v
                    .get("runtimeType")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                batch_size: int("batchSize"),
                max_batch_delay: int("maxBatchDelay"),
                initial_workers: int("minWorkers"),
                max_workers: int("maxWorkers"),
                response_timeout: int("responseTimeout"),
                startup_timeout: int("startupTimeout"),
                synchronous: true,
                // What a snapshot holds was registered and served: a model whose workers no
                // longer start (libtorch cannot load it, a worker count the memory cannot hold)
                // is restored with its workers failing, as TorchServe restores it, rather than
                // keeping every other model from serving.
                origin: Origin::Snapshot,
                make_default: v
                    .get("defaultVersion")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                handler: v.get("handler").and_then(Value::as_str).map(str::to_owned),
            });
        }
    }
    out.sort_by_key(|p| p.make_default);
    out
}

/// The settings of the configuration's `models` key that a restored snapshot does not apply: one
/// `name version: key value (restored: value)` per difference, for the versions the snapshot
/// holds. The snapshot keeps each model as it was registered and scaled, so an edit of the key
/// after the first start changes nothing, and should be said.
pub fn settings_not_applied(
    snapshot: &Value,
    models: &std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::ModelDefaults>,
    >,
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, versions) in models {
        for (version, set) in versions {
            let Some(restored) = snapshot
                .get("models")
                .and_then(|m| m.get(name))
                .and_then(|v| v.get(version))
            else {
                continue;
            };
            for (key, wanted) in [
                ("minWorkers", set.min_workers),
                ("maxWorkers", set.max_workers),
                ("batchSize", set.batch_size),
                ("maxBatchDelay", set.max_batch_delay),
                ("responseTimeout", set.response_timeout),
                ("startupTimeout", set.startup_timeout),
            ] {
                // A value that is not positive leaves the setting unset, as at registration.
                let Some(wanted) = wanted.filter(|v| *v > 0) else {
                    continue;
                };
                let kept = restored.get(key).and_then(Value::as_i64);
                if kept != Some(wanted) {
                    let kept = kept.map_or_else(|| "unset".to_string(), |k| k.to_string());
                    out.push(format!(
                        "{name} {version}: {key} {wanted} (restored: {kept})"
                    ));
                }
            }
        }
    }
    out
}

/// The newest of TorchServe's own snapshots in `dir` (`<timestamp>-startup.cfg`,
/// `-snapshot.cfg` or `-shutdown.cfg`, whose names sort by time), which a server upgraded in
/// place finds in its log folder.
pub fn newest_torchserve_snapshot(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "cfg")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_of_another_shape_is_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        for (text, says) in [
            ("null", "holds no \"models\" object"),
            ("{}", "holds no \"models\" object"),
            (r#"{"models": []}"#, "holds no \"models\" object"),
            (
                r#"{"models": {"m": "x"}}"#,
                "model \"m\" is not an object of versions",
            ),
            (r#"{"models": {"m": {"1.0": {}}}}"#, "names no archive"),
        ] {
            fs::write(dir.path().join(FILE_NAME), text).unwrap();
            let e = read(dir.path()).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        fs::write(dir.path().join(FILE_NAME), r#"{"models": {}}"#).unwrap();
        assert!(read(dir.path()).unwrap().is_some());
    }

    #[test]
    fn atomic_write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let v = json!({"models": {"a": {"1.0": {"marName": "a.mar", "minWorkers": 2, "defaultVersion": true}, "2.0": {"marName": "a2.mar", "defaultVersion": false}}}});
        write(dir.path(), &v).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(v.clone()));
        let regs = registrations(&v);
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1].url, "a.mar");
        assert!(regs[1].make_default && !regs[0].make_default);
        assert_eq!(regs[1].initial_workers, Some(2));
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn settings_the_snapshot_keeps_are_named() {
        let snap = json!({"models": {"a": {"1.0": {"marName": "a.mar", "minWorkers": 1, "batchSize": 8}}}});
        let set = |min, batch| crate::config::ModelDefaults {
            min_workers: min,
            batch_size: batch,
            ..Default::default()
        };
        let models = |d| [("a".to_string(), [("1.0".to_string(), d)].into())].into();
        assert!(settings_not_applied(&snap, &models(set(Some(1), Some(8)))).is_empty());
        assert!(settings_not_applied(&snap, &models(set(None, Some(-1)))).is_empty());
        assert_eq!(
            settings_not_applied(&snap, &models(set(Some(2), Some(16)))),
            [
                "a 1.0: minWorkers 2 (restored: 1)",
                "a 1.0: batchSize 16 (restored: 8)"
            ]
        );
        // A version the snapshot does not hold is not restored, so nothing overrides it.
        let other = [(
            "a".to_string(),
            [("2.0".to_string(), set(Some(2), None))].into(),
        )]
        .into();
        assert!(settings_not_applied(&snap, &other).is_empty());
    }

    #[test]
    fn the_newest_torchserve_snapshot_is_found_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_torchserve_snapshot(dir.path()), None);
        for name in [
            "20241001120000000-startup.cfg",
            "20241001130000000-shutdown.cfg",
            "20240901120000000-snapshot.cfg",
            "snapshot.json",
            "notes.cfg",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        assert_eq!(
            newest_torchserve_snapshot(dir.path()),
            Some(dir.path().join("20241001130000000-shutdown.cfg"))
        );
    }
}
