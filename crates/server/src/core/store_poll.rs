//! Model-store polling (TensorFlow Serving's file-system source): with
//! `model_store_poll_interval` set, the archives in the store decide what serves. A new archive,
//! or a new version of a model, is loaded; a version whose archive is gone is drained and
//! unloaded; each model's version policy picks which of its versions serve. An archive that
//! cannot be loaded is reported once (until it changes) and whatever serves keeps serving.
//!
//! Only registrations of store files are the poller's to unload: models registered from other
//! paths are left alone. The deciding is [`plan`], a plain function; [`StorePoller`] feeds it
//! what the store and the registry hold and carries it out.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tchserve_mar::{Archive, ModelStore};

use super::registry::{ModelVersion, Origin, RegisterParams, Registry};

/// Which of a model's versions serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The highest N versions.
    Latest(usize),
    /// Exactly these versions, when their archives are present.
    Specific(BTreeSet<String>),
    /// Every version in the store.
    All,
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

impl VersionPolicy {
    /// Parses `latest:N`, `latest` (one), `all` or `specific:V1,V2`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (kind, arg) = match text.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a.trim())),
            None => (text, None),
        };
        match (kind.to_ascii_lowercase().as_str(), arg) {
            ("latest", None) => Ok(VersionPolicy::Latest(1)),
            ("latest", Some(n)) => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(VersionPolicy::Latest(n)),
                _ => Err(format!(
                    "latest:{n}: the count must be a whole number from 1"
                )),
            },
            ("all", None) => Ok(VersionPolicy::All),
            ("specific", Some(list)) => {
                let versions: BTreeSet<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(String::from)
                    .collect();
                if versions.is_empty() {
                    return Err("specific: needs at least one version".into());
                }
                Ok(VersionPolicy::Specific(versions))
            }
            _ => Err(format!(
                "{text:?} is not a version policy: use latest:N, all or specific:V1,V2"
            )),
        }
    }

    /// The versions of `available` that serve under this policy.
    pub fn select<'a>(&self, available: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        let mut versions: Vec<&str> = available.into_iter().collect();
        versions.sort_by(|a, b| compare_versions(b, a));
        versions.dedup();
        match self {
            VersionPolicy::Latest(n) => versions.into_iter().take(*n).map(String::from).collect(),
            VersionPolicy::Specific(wanted) => versions
                .into_iter()
                .filter(|v| wanted.contains(*v))
                .map(String::from)
                .collect(),
            VersionPolicy::All => versions.into_iter().map(String::from).collect(),
        }
    }
}

/// Orders versions as people number them: `1.10` after `1.9`, numbers before words, and text
/// compared as text where parts are not numbers.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut pa = a.split(['.', '-', '_']);
    let mut pb = b.split(['.', '-', '_']);
    loop {
        match (pa.next(), pb.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// An archive found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its file name in the store.
    pub file: String,
    /// The model and version its manifest names.
    pub name: String,
    /// The version.
    pub version: String,
    /// False when it could not be opened or loaded (and has not changed since).
    pub loadable: bool,
}

/// A registered version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serving {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// The store file it came from, when it came from one: only those are the poller's.
    pub file: Option<String>,
}

/// What the store holds, as one poll read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreView {
    /// The archives whose manifests could be read.
    pub candidates: Vec<Candidate>,
    /// Files present whose manifest cannot be read: being copied in, or damaged.
    pub unreadable: BTreeSet<String>,
}

/// What one poll does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Archives to register: (file, model, version).
    pub load: Vec<(String, String, String)>,
    /// Versions to drain and unregister: (model, version).
    pub unload: Vec<(String, String)>,
}

/// Decides what to load and unload so that each model serves what its policy picks from the
/// loadable archives. A bad archive never takes a working version away: a version whose file
/// is unreadable, or now holds a version that cannot load, keeps serving, and so does a model
/// none of whose archives loads.
pub fn plan(
    store: &StoreView,
    serving: &[Serving],
    policy: &dyn Fn(&str) -> VersionPolicy,
) -> Plan {
    let candidates = &store.candidates;
    let mut names: BTreeSet<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    names.extend(
        serving
            .iter()
            .filter(|s| s.file.is_some())
            .map(|s| s.name.as_str()),
    );
    let mut out = Plan::default();
    for name in names {
        let mine: Vec<&Candidate> = candidates.iter().filter(|c| c.name == name).collect();
        let served: BTreeSet<&str> = serving
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.version.as_str())
            .collect();
        // The first archive (by file name) of a version is the one that counts.
        let mut by_version: BTreeMap<&str, &Candidate> = BTreeMap::new();
        for c in &mine {
            by_version.entry(c.version.as_str()).or_insert(c);
        }
        // Serving versions whose archive is unreadable for now (being copied over, damaged)
        // or was overwritten by a version that cannot load: they stay, and count as present.
        let held: BTreeSet<&str> = serving
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                s.file.as_ref().is_some_and(|file| {
                    store.unreadable.contains(file)
                        || candidates.iter().any(|c| {
                            &c.file == file
                                && c.name == name
                                && c.version != s.version
                                && !c.loadable
                        })
                })
            })
            .map(|s| s.version.as_str())
            .collect();
        // A version that serves has loaded, whatever a later attempt said.
        let mut loadable: Vec<&str> = by_version
            .iter()
            .filter(|(v, c)| c.loadable || served.contains(*v))
            .map(|(v, _)| *v)
            .collect();
        loadable.extend(held.iter().copied());
        let chosen = policy(name).select(loadable);
        for v in &chosen {
            if !served.contains(v.as_str()) {
                let c = by_version[v.as_str()];
                out.load.push((c.file.clone(), name.to_string(), v.clone()));
            }
        }
        let broken_present = mine.iter().any(|c| !c.loadable);
        if chosen.is_empty() && broken_present {
            continue;
        }
        for s in serving.iter().filter(|s| s.name == name) {
            let Some(file) = &s.file else { continue };
            if held.contains(s.version.as_str()) {
                continue;
            }
            let holder = candidates.iter().find(|c| &c.file == file);
            // Registered under a name of its own (model_name=...): not the store's to decide
            // while its archive stays.
            if holder.is_some_and(|h| h.name != name) {
                continue;
            }
            // Its archive still holds it, or is gone, or now holds another version.
            let still_there = holder.is_some_and(|h| h.version == s.version);
            if !chosen.contains(&s.version) || !still_there {
                out.unload.push((name.to_string(), s.version.clone()));
            }
        }
    }
    out
}

/// The size and modification time that say an archive changed.
type Stamp = (u64, Option<SystemTime>);

#[derive(Debug, Clone)]
struct Seen {
    stamp: Stamp,
    /// The manifest's (model, version), or why it cannot be read.
    identity: Result<(String, String), String>,
    /// Set when registering it failed: not retried until the archive changes.
    failed: bool,
}

/// Polls one model store and reconciles the registry with it.
#[derive(Debug)]
pub struct StorePoller {
    registry: Arc<Registry>,
    store: ModelStore,
    default_policy: VersionPolicy,
    policies: BTreeMap<String, VersionPolicy>,
    seen: Mutex<HashMap<String, Seen>>,
    stopping: AtomicBool,
}

/// What a poll changed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Versions registered: (model, version).
    pub loaded: Vec<(String, String)>,
    /// Versions unregistered, with their pools, which the caller drains.
    pub unloaded: Vec<Arc<ModelVersion>>,
}

impl Changes {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty() && self.unloaded.is_empty()
    }
}

impl StorePoller {
    /// A poller of `store` for `registry`.
    pub fn new(
        registry: Arc<Registry>,
        store: ModelStore,
        default_policy: VersionPolicy,
        policies: BTreeMap<String, VersionPolicy>,
    ) -> Self {
        StorePoller {
            registry,
            store,
            default_policy,
            policies,
            seen: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        }
    }

    fn policy(&self, name: &str) -> VersionPolicy {
        self.policies
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.default_policy.clone())
    }

    /// One pass: reads the store, loads what is new, then unloads what is gone. Blocking (it
    /// loads models): run it off the async threads.
    pub fn poll_once(&self) -> Changes {
        let mut changes = Changes::default();
        // A store that cannot be listed (a remount, a network file system's hiccup) says
        // nothing about what it holds: nothing changes until it can be read again.
        let Some(mut store) = self.scan() else {
            return changes;
        };
        let first = plan(&store, &self.serving(), &|name| self.policy(name));
        for (file, name, version) in first.load {
            if self.stopping.load(AtomicOrdering::SeqCst) {
                return changes;
            }
            // Loaded by the server on its own, as start-up models are: their workers come from
            // `models` or default_workers_per_model, not the API's default of none.
            let p = RegisterParams {
                url: file.clone(),
                synchronous: true,
                origin: Origin::Startup,
                ..RegisterParams::default()
            };
            let newest = self.registry.snapshot_entries().get(&name).is_none_or(|e| {
                e.versions
                    .keys()
                    .all(|v| compare_versions(&version, v) == Ordering::Greater)
            });
            match self.registry.register(&p) {
                Ok(r) => {
                    tracing::info!(model = %name, version = %version, archive = %file, workers = r.workers, "model store: loaded");
                    // A new highest version takes over as the default; a rollback made by
                    // set-default stays until another new version arrives.
                    if newest {
                        let _ = self.registry.set_default(&name, &version);
                    }
                    changes.loaded.push((name, version));
                }
                // Registered meanwhile through the management API: it serves, nothing failed.
                Err(e) if e.status() == axum::http::StatusCode::CONFLICT => {}
                Err(e) => {
                    tracing::error!(model = %name, version = %version, archive = %file, "model store: cannot load {file}: {e}; what serves keeps serving");
                    if let Some(s) = self.lock().get_mut(&file) {
                        s.failed = true;
                    }
                    for c in store.candidates.iter_mut().filter(|c| c.file == file) {
                        c.loadable = false;
                    }
                }
            }
        }
        // Decided again on the same reading of the store, with what loaded and what failed,
        // so that a version is retired only once its successor serves (an archive that
        // arrived meanwhile waits for the next poll).
        let second = plan(&store, &self.serving(), &|name| self.policy(name));
        for (name, version) in second.unload {
            self.move_default_off(&name, &version);
            match self.registry.unregister(&name, Some(&version)) {
                Ok(removed) => {
                    tracing::info!(model = %name, version = %version, "model store: archive gone or out of policy; draining and unloading");
                    changes.unloaded.push(removed);
                }
                Err(e) => {
                    tracing::warn!(model = %name, version = %version, "model store: cannot unload: {e}")
                }
            }
        }
        changes
    }

    /// Makes a poll in progress stop before its next load (the server is stopping).
    pub fn stop(&self) {
        self.stopping.store(true, AtomicOrdering::SeqCst);
    }

    /// Before the default version goes, the highest version that stays becomes the default.
    fn move_default_off(&self, name: &str, version: &str) {
        let entries = self.registry.snapshot_entries();
        let Some(entry) = entries.get(name) else {
            return;
        };
        if entry.default != version {
            return;
        }
        if let Some(next) = entry
            .versions
            .keys()
            .filter(|v| v.as_str() != version)
            .max_by(|a, b| compare_versions(a, b))
        {
            let _ = self.registry.set_default(name, next);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serving(&self) -> Vec<Serving> {
        self.registry
            .snapshot_entries()
            .values()
            .flat_map(|e| e.versions.values())
            .map(|v| Serving {
                name: v.name.clone(),
                version: v.version.clone(),
                file: self.store.entry_name(&v.url),
            })
            .collect()
    }

    /// The store's archives, their manifests read once per change; None when the store
    /// cannot be listed.
    fn scan(&self) -> Option<StoreView> {
        let paths = match self.store.all() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    "model store: cannot list {}: {e}; nothing changes until it can",
                    self.store.root().display()
                );
                return None;
            }
        };
        let mut seen = self.lock();
        let mut present = BTreeSet::new();
        let mut view = StoreView::default();
        for path in paths {
            let Some(file) = path.file_name().map(|f| f.to_string_lossy().into_owned()) else {
                continue;
            };
            let stamp = stamp(&path);
            present.insert(file.clone());
            let fresh = seen.get(&file).is_none_or(|s| s.stamp != stamp);
            if fresh {
                let identity = Archive::open(&path)
                    .map(|a| (a.model_name(), a.manifest().model.version().to_string()))
                    .map_err(|e| e.to_string());
                if let Err(e) = &identity {
                    tracing::error!(archive = %file, "model store: cannot read {file}: {e}");
                }
                seen.insert(
                    file.clone(),
                    Seen {
                        stamp,
                        identity,
                        failed: false,
                    },
                );
            }
            let s = &seen[&file];
            match &s.identity {
                Ok((name, version)) => view.candidates.push(Candidate {
                    file,
                    name: name.clone(),
                    version: version.clone(),
                    loadable: !s.failed,
                }),
                Err(_) => {
                    view.unreadable.insert(file);
                }
            }
        }
        seen.retain(|f, _| present.contains(f));
        Some(view)
    }
}

fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    }
}

/// Drains and stops the pools of unloaded versions (queued requests are answered first).
pub fn drain(unloaded: Vec<Arc<ModelVersion>>) {
    for v in unloaded {
        v.pool.shutdown(Duration::from_secs(v.response_timeout_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(file: &str, name: &str, version: &str, loadable: bool) -> Candidate {
        Candidate {
            file: file.into(),
            name: name.into(),
            version: version.into(),
            loadable,
        }
    }

    fn serv(name: &str, version: &str, file: Option<&str>) -> Serving {
        Serving {
            name: name.into(),
            version: version.into(),
            file: file.map(String::from),
        }
    }

    fn view(c: &[Candidate]) -> StoreView {
        StoreView {
            candidates: c.to_vec(),
            unreadable: BTreeSet::new(),
        }
    }

    fn owned(v: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn policies_parse_and_select() {
        let vs = ["1.0", "1.10", "1.9", "2.0", "10"];
        let latest2 = VersionPolicy::parse("latest:2").unwrap();
        assert_eq!(latest2.select(vs), ["10", "2.0"].map(String::from).into());
        assert_eq!(
            VersionPolicy::parse("latest").unwrap(),
            VersionPolicy::Latest(1)
        );
        assert_eq!(VersionPolicy::parse("ALL").unwrap().select(vs).len(), 5);
        let specific = VersionPolicy::parse("specific: 1.9, 3.0").unwrap();
        assert_eq!(specific.select(vs), ["1.9"].map(String::from).into());
        for bad in ["latest:0", "latest:x", "specific:", "newest", "all:2"] {
            assert!(VersionPolicy::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(compare_versions("1.10", "1.9"), Ordering::Greater);
        assert_eq!(compare_versions("2", "1.9.9"), Ordering::Greater);
        assert_eq!(compare_versions("1.0", "1.0.1"), Ordering::Less);
        assert_eq!(compare_versions("1.0", "1.0-rc"), Ordering::Less);
    }

    #[test]
    fn new_archives_and_new_versions_load_and_old_ones_retire() {
        let latest = |_: &str| VersionPolicy::Latest(1);
        // Nothing serves: both models load.
        let c = [
            cand("a.mar", "a", "1.0", true),
            cand("b.mar", "b", "1.0", true),
        ];
        let p = plan(&view(&c), &[], &latest);
        assert_eq!(
            p.load,
            owned(&[("a.mar", "a", "1.0"), ("b.mar", "b", "1.0")])
        );
        assert!(p.unload.is_empty());
        // a 2.0 arrives beside 1.0: it loads; 1.0 leaves once 2.0 serves.
        let c = [
            cand("a.mar", "a", "1.0", true),
            cand("a2.mar", "a", "2.0", true),
        ];
        let s = [serv("a", "1.0", Some("a.mar"))];
        let p = plan(&view(&c), &s, &latest);
        assert_eq!(p.load, owned(&[("a2.mar", "a", "2.0")]));
        assert_eq!(p.unload, pairs(&[("a", "1.0")]));
        let s = [
            serv("a", "1.0", Some("a.mar")),
            serv("a", "2.0", Some("a2.mar")),
        ];
        assert_eq!(plan(&view(&c), &s, &latest).unload, pairs(&[("a", "1.0")]));
        // With latest:2 both stay.
        let p = plan(&view(&c), &s, &|_| VersionPolicy::Latest(2));
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn vanished_archives_unload_but_others_registrations_stay() {
        let latest = |_: &str| VersionPolicy::Latest(1);
        let s = [
            serv("a", "1.0", Some("a.mar")),
            // Registered from a path outside the store: not the poller's.
            serv("x", "1.0", None),
            // Registered under another name from a store archive that is still there.
            serv("a-copy", "1.0", Some("b.mar")),
        ];
        let c = [cand("b.mar", "b", "1.0", true)];
        let p = plan(&view(&c), &s, &latest);
        assert_eq!(p.load, owned(&[("b.mar", "b", "1.0")]));
        assert_eq!(p.unload, pairs(&[("a", "1.0")]));
        // Once its archive goes, the renamed registration goes too.
        let p = plan(&view(&[]), &s, &latest);
        assert_eq!(p.unload, pairs(&[("a", "1.0"), ("a-copy", "1.0")]));
    }

    #[test]
    fn a_broken_archive_never_takes_a_working_version_away() {
        let latest = |_: &str| VersionPolicy::Latest(1);
        // A broken 2.0 beside a working 1.0: 1.0 stays, 2.0 is not retried.
        let c = [
            cand("a.mar", "a", "1.0", true),
            cand("a2.mar", "a", "2.0", false),
        ];
        let s = [serv("a", "1.0", Some("a.mar"))];
        assert_eq!(plan(&view(&c), &s, &latest), Plan::default());
        // The archive of 1.0 overwritten by a broken 2.0: 1.0 keeps serving from memory.
        let c = [cand("a.mar", "a", "2.0", false)];
        assert_eq!(plan(&view(&c), &s, &latest), Plan::default());
        // Overwritten by a good 2.0: it loads, and 1.0 goes.
        let c = [cand("a.mar", "a", "2.0", true)];
        let p = plan(&view(&c), &s, &latest);
        assert_eq!(p.load, owned(&[("a.mar", "a", "2.0")]));
        assert_eq!(p.unload, pairs(&[("a", "1.0")]));
    }

    #[test]
    fn an_archive_being_rewritten_keeps_its_version_serving() {
        let latest = |_: &str| VersionPolicy::Latest(1);
        let s = [serv("a", "1.0", Some("a.mar"))];
        // a.mar half-copied over, its manifest unreadable: 1.0 stays, and counts as the
        // latest, so an older archive beside it does not load in its place.
        let store = StoreView {
            candidates: vec![cand("a0.mar", "a", "0.9", true)],
            unreadable: ["a.mar".to_string()].into(),
        };
        assert_eq!(plan(&store, &s, &latest), Plan::default());
        // A version that serves counts as loadable even if a later attempt on its archive
        // failed (registered meanwhile through the API, say).
        let c = [cand("a.mar", "a", "1.0", false)];
        assert_eq!(plan(&view(&c), &s, &latest), Plan::default());
        // With latest:2, a broken 2.0 beside the serving 1.0 leaves 1.0 alone.
        let c = [
            cand("a.mar", "a", "1.0", true),
            cand("b.mar", "a", "2.0", false),
        ];
        assert_eq!(
            plan(&view(&c), &s, &|_| VersionPolicy::Latest(2)),
            Plan::default()
        );
    }

    #[test]
    fn specific_versions_serve_only_when_present() {
        let pick = |_: &str| VersionPolicy::parse("specific:1.0,3.0").unwrap();
        let c = [
            cand("a1.mar", "a", "1.0", true),
            cand("a2.mar", "a", "2.0", true),
        ];
        let s = [serv("a", "2.0", Some("a2.mar"))];
        let p = plan(&view(&c), &s, &pick);
        assert_eq!(p.load, owned(&[("a1.mar", "a", "1.0")]));
        assert_eq!(p.unload, pairs(&[("a", "2.0")]));
        // Two archives of one version: the first by file name counts.
        let c = [
            cand("a1.mar", "a", "1.0", true),
            cand("a1b.mar", "a", "1.0", true),
        ];
        assert_eq!(
            plan(&view(&c), &[], &pick).load,
            owned(&[("a1.mar", "a", "1.0")])
        );
    }
}
