//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Whether this machine has an NVIDIA GPU and its driver (the tests that need one skip otherwise).
pub fn nvidia_gpu() -> bool {
    ["/proc/driver/nvidia", "/dev/nvidiactl"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// A program from the project's Python environment (made by `scripts/setup.sh`).
pub fn venv_bin(name: &str) -> PathBuf {
    venv_program(".venv", name)
}

/// A program from the protocol clients' Python environment (`scripts/setup.sh` makes it from
/// `scripts/requirements-clients.txt`).
pub fn clients_venv_bin(name: &str) -> PathBuf {
    venv_program(".venv-clients", name)
}

fn venv_program(venv: &str, name: &str) -> PathBuf {
    let p = repo_root().join(venv).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make test` (scripts/setup.sh installs it)",
        p.display()
    );
    p
}

/// Runs a command, returning its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file path below `dir`, relative and sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

pub mod http;
pub mod server;

/// The largest absolute difference between matching elements of two vectors.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The cosine of the angle between two vectors.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The detections of one answer, `[{"<label>": [x1, y1, x2, y2], "score": s}, ...]`, as
/// (label, box, score) in the order given.
pub fn detections(v: &serde_json::Value) -> Vec<(String, Vec<f64>, f64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list of detections: {v}"))
        .iter()
        .map(|d| {
            let o = d.as_object().unwrap();
            let (label, bx) = o.iter().find(|(k, _)| *k != "score").unwrap();
            let bx = bx
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (label.clone(), bx, o["score"].as_f64().unwrap())
        })
        .collect()
}

/// Threads of process `pid` whose name starts with `prefix`.
pub fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

/// Threads of process `pid` named after the worker `id`: a worker's threads and the OpenMP team
/// threads it starts, which take their starter's name.
pub fn worker_threads(pid: u32, id: &str) -> usize {
    threads_named(pid, &format!("W-{id}-"))
}

/// The numbers of a JSON answer's nested lists, in order.
pub fn flat(v: &serde_json::Value, out: &mut Vec<f64>) {
    match v {
        serde_json::Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
        serde_json::Value::Number(n) => out.push(n.as_f64().unwrap()),
        other => panic!("not a number: {other}"),
    }
}

/// Asserts that a JSON answer holds the float32 values of `reference` (raw little-endian, as
/// the fixture scripts write torchvision's tensors), each within 1e-6.
pub fn assert_tensor_is(answer: &serde_json::Value, reference: &Path, ctx: &str) {
    let mut got = Vec::new();
    flat(answer, &mut got);
    let want: Vec<f64> = std::fs::read(reference)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
        .collect();
    assert_eq!(got.len(), want.len(), "{ctx}");
    let worst = max_abs_diff(&got, &want);
    assert!(worst <= 1e-6, "{ctx}: a value differs by {worst}");
}

/// A tmpfs of `kib` KiB mounted on `dir` with the mount `options` (`noexec`, ...), unmounted
/// when dropped; `None` where this process may not mount (not root).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, kib: u64, options: &[&str]) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let options = std::iter::once(format!("size={kib}k"))
            .chain(options.iter().map(|o| o.to_string()))
            .collect::<Vec<_>>()
            .join(",");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
