//! Faults from outside the request path: the process killed with SIGKILL in the middle of
//! management calls, and a disk that fills up under the snapshot. What was acknowledged must
//! survive; what was not may go either way but never half. Real binary, loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::Tmpfs;
use common::http::{post_json, request, try_request};
use common::server::{Server, scale_archive};
use serde_json::{Value, json};

/// A small deterministic generator, seeded from the clock and printed, so a failing run can be
/// replayed with `FAULTS_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("FAULTS_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    }
}

/// What a client knows about one model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Absent,
    /// Registered, with this many workers if the last acknowledged call said so.
    Present(Option<u64>),
    /// A call was in flight at the kill: either state is right.
    Unknown,
}

/// The registry as the restarted server reports it: name to minWorkers.
fn listing(s: &Server) -> BTreeMap<String, u64> {
    let listed = request(&s.management, "GET", "/models?limit=1000", &[], b"").json();
    listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["modelName"].as_str().unwrap().to_string();
            let d = request(&s.management, "GET", &format!("/models/{name}"), &[], b"");
            assert_eq!(
                d.status,
                200,
                "{name} is listed but cannot be described: {}",
                d.text()
            );
            let d = d.json();
            let min = d[0]["minWorkers"].as_u64().unwrap_or_else(|| panic!("{d}"));
            (name, min)
        })
        .collect()
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let mut rng = Rng::new();
    let mut s = Server::new("enable_model_api=true");
    let scale = scale_archive(&s, "scale");
    s.start(&[]);
    let names: Vec<String> = (0..12).map(|k| format!("m{k}")).collect();
    let mut known: BTreeMap<String, Known> =
        names.iter().map(|n| (n.clone(), Known::Absent)).collect();
    let mut acknowledged = 0;
    for round in 0..20 {
        let stop = Arc::new(AtomicBool::new(false));
        // Three clients, each with its own names, call without pause until the kill.
        let clients: Vec<_> = (0..3)
            .map(|c| {
                let mine: Vec<(String, Known)> = known
                    .iter()
                    .filter(|(n, _)| n[1..].parse::<usize>().unwrap() % 3 == c)
                    .map(|(n, k)| (n.clone(), *k))
                    .collect();
                let (management, scale, stop) =
                    (s.management.clone(), scale.clone(), Arc::clone(&stop));
                let mut seed = rng.below(u64::MAX);
                std::thread::spawn(move || {
                    let mut mine: BTreeMap<String, Known> = mine.into_iter().collect();
                    let names: Vec<String> = mine.keys().cloned().collect();
                    let mut acked = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let name = &names[(seed >> 33) as usize % names.len()];
                        let workers = (seed >> 40) % 3;
                        let (method, path, then) = match mine[name] {
                            Known::Absent | Known::Unknown => (
                                "POST",
                                format!("/models?url={scale}&model_name={name}&initial_workers=0"),
                                Known::Present(Some(0)),
                            ),
                            Known::Present(_) if seed >> 60 < 6 => {
                                ("DELETE", format!("/models/{name}"), Known::Absent)
                            }
                            Known::Present(_) => (
                                "PUT",
                                format!("/models/{name}?min_worker={workers}&synchronous=true"),
                                Known::Present(Some(workers)),
                            ),
                        };
                        let r = try_request(
                            &management,
                            method,
                            &path,
                            &[],
                            b"",
                            Duration::from_secs(30),
                        );
                        let state = match &r {
                            Ok(r) if r.status == 200 => {
                                acked += 1;
                                then
                            }
                            // Settled by the next call: register says 409, delete says 404.
                            Ok(r) if r.status == 409 => Known::Present(None),
                            Ok(r) if r.status == 404 => Known::Absent,
                            Ok(r) if !stop.load(Ordering::Relaxed) => {
                                panic!("{method} {path}: {} {}", r.status, r.text())
                            }
                            _ => Known::Unknown,
                        };
                        mine.insert(name.clone(), state);
                    }
                    (mine, acked)
                })
            })
            .collect();
        let delay = 100 + rng.below(1400);
        std::thread::sleep(Duration::from_millis(delay));
        stop.store(true, Ordering::Relaxed);
        s.kill();
        for c in clients {
            let (mine, acked) = c.join().unwrap();
            known.extend(mine);
            acknowledged += acked;
        }

        s.start(&[]);
        let present = listing(&s);
        for (name, state) in known.iter_mut() {
            match *state {
                Known::Absent => assert!(
                    !present.contains_key(name),
                    "round {round}: {name} was unregistered, or never acknowledged, and is back"
                ),
                Known::Present(workers) => {
                    let got = present.get(name).unwrap_or_else(|| {
                        panic!("round {round}: {name} was acknowledged and is gone")
                    });
                    if let Some(w) = workers {
                        assert_eq!(*got, w, "round {round}: {name}'s acknowledged workers");
                    }
                }
                Known::Unknown => {}
            }
            // The next round starts from what the server holds now.
            *state = match present.get(name) {
                Some(w) => Known::Present(Some(*w)),
                None => Known::Absent,
            };
        }
        // Nothing half-done: every model listed answers, and the snapshot parses.
        // No snapshot is written before the first registration: nothing can be listed then.
        let snapshot: Value = match std::fs::read(s.home().join("logs/config/snapshot.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => json!({"models": {}}),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            snapshot["models"].as_object().map(|m| m.len()),
            Some(present.len()),
            "{snapshot}"
        );
        for (name, workers) in &present {
            if *workers > 0 {
                let r = post_json(
                    &s.inference,
                    &format!("/predictions/{name}"),
                    "[1, 2, 3, 4]",
                );
                assert_eq!(r.status, 200, "round {round}: {name}: {}", r.text());
            }
        }
    }
    eprintln!("{acknowledged} calls acknowledged over 20 rounds");
    assert!(
        acknowledged >= 40,
        "only {acknowledged} calls were acknowledged in 20 rounds"
    );
    s.stop_ok();
}

/// Fills the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    for _ in 0..4096 {
        if f.write_all(&[0]).is_err() {
            break;
        }
    }
    let _ = f.flush();
    path
}

#[test]
fn a_full_disk_fails_the_snapshot_write_and_keeps_the_last_one() {
    let mut s = Server::new("enable_model_api=true");
    let config = s.home().join("logs/config");
    let Some(_tmpfs) = Tmpfs::mount(&config, 256, &[]) else {
        eprintln!("skipped: mounting a tmpfs needs root here");
        return;
    };
    let scale = scale_archive(&s, "scale");
    s.start(&[]);
    let register = |name: &str| {
        request(
            &s.management,
            "POST",
            &format!("/models?url={scale}&model_name={name}&initial_workers=1"),
            &[],
            b"",
        )
    };
    assert_eq!(register("before").status, 200);
    let snapshot = config.join("snapshot.json");
    let good = std::fs::read(&snapshot).unwrap();
    assert!(String::from_utf8_lossy(&good).contains("\"before\""));

    let filler = fill(&config);
    // The change itself succeeds; only its record on disk fails, and says so.
    let r = register("during");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        good,
        "the last snapshot changed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&config)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "snapshot.json" && n != "filler")
        .collect();
    assert!(leftovers.is_empty(), "partial files left: {leftovers:?}");
    assert!(
        s.log().contains("the previous snapshot is kept"),
        "{}",
        s.log()
    );
    // And an alert can say so.
    assert!(
        s.metrics_text()
            .contains("tchserve_snapshot_write_failures_total 1"),
        "{}",
        s.metrics_text()
    );
    for name in ["before", "during"] {
        let r = post_json(
            &s.inference,
            &format!("/predictions/{name}"),
            "[1, 2, 3, 4]",
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }

    // Space again: the next change writes a snapshot holding everything.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(register("after").status, 200);
    let text = std::fs::read_to_string(&snapshot).unwrap();
    for name in ["before", "during", "after"] {
        assert!(
            text.contains(&format!("\"{name}\"")),
            "{name} missing: {text}"
        );
    }
    s.stop_ok();
}
