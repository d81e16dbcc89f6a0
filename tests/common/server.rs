//! Running the real `tchserve` binary for tests: fixtures, archives, config, start and stop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::http::{Resp, request};
use super::{repo_root, run_ok, venv_bin};

/// Runs a fixture script once into `target/<name>`, unless its output from the same script is
/// already there (`done` holds the script's text, so a changed script makes its output again).
fn made_by(script: &str, name: &str) -> PathBuf {
    let dir = repo_root().join("target").join(name);
    let source = repo_root().join("tests/fixtures").join(script);
    let text = fs::read(&source).unwrap();
    if fs::read(dir.join("done")).ok().as_ref() != Some(&text) {
        let tmp = repo_root().join(format!("target/{name}.{}", std::process::id()));
        run_ok(Command::new(venv_bin("python")).arg(&source).arg(&tmp));
        fs::write(tmp.join("done"), &text).unwrap();
        // An outdated copy goes; another test binary may have won the race, and either new
        // copy is complete.
        let old = repo_root().join(format!("target/{name}.old.{}", std::process::id()));
        if fs::rename(&dir, &old).is_ok() {
            let _ = fs::remove_dir_all(&old);
        }
        if fs::rename(&tmp, &dir).is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
    }
    dir
}

/// Models made by `tests/fixtures/make_models.py`, built once.
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_models.py", "test-fixtures"))
}

/// Photos, torchvision models and PyTorch's answers from `tests/fixtures/make_vision.py`.
pub fn vision_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_vision.py", "test-fixtures-vision"))
}

/// AOTInductor packages and PyTorch's answers from `tests/fixtures/make_pt2.py`, built once
/// (compiling the package takes about half a minute).
pub fn pt2_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_pt2.py", "test-fixtures-pt2"))
}

/// A CUDA AOTInductor package from `tests/fixtures/make_pt2_cuda.py`: only on a GPU machine.
pub fn pt2_cuda_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_pt2_cuda.py", "test-fixtures-pt2-cuda"))
}

/// A TorchScript model and PyTorch's answers on the GPU from `tests/fixtures/make_gpu.py`: only
/// on a GPU machine.
pub fn gpu_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_gpu.py", "test-fixtures-gpu"))
}

/// The digits example's build output (made by `make test` through examples/digits/build.sh).
pub fn digits_build() -> PathBuf {
    let dir = repo_root().join("build/examples/digits");
    assert!(
        dir.join("digits.pt").exists(),
        "{} is missing: run `make test`",
        dir.display()
    );
    dir
}

/// An example's build output (made by `make test` through examples/<name>/build.sh), checked
/// for `file`.
pub fn example_build(name: &str, file: &str) -> PathBuf {
    let dir = repo_root().join("build/examples").join(name);
    assert!(
        dir.join(file).exists(),
        "{} is missing: run `make test`",
        dir.join(file).display()
    );
    dir
}

/// Archives `serialized` with our archiver into `store` as `<name>.mar` (or `file_name`).
pub fn archive(
    store: &Path,
    name: &str,
    version: &str,
    serialized: &Path,
    handler: &Path,
    extra: &[&str],
) -> String {
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .args(["--model-name", name, "--version", version, "--handler"])
            .arg(handler)
            .arg("--serialized-file")
            .arg(serialized)
            .arg("--export-path")
            .arg(out.path())
            .args(extra),
    );
    let file = format!("{name}-{version}.mar");
    fs::rename(out.path().join(format!("{name}.mar")), store.join(&file)).unwrap();
    file
}

pub fn fixture_handler(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// A port nothing listens on, taken below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` comes from the same range it draws client sockets'
/// local ports from, so between this call and the server's bind, a connection made by a test
/// running beside this one could take it. Ports below the range are never given to clients;
/// a per-process counter keeps the tests of one binary apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).min(16_384);
    if span < 1_000 {
        return kernel_port();
    }
    let start = std::process::id() * 97 % span;
    for _ in 0..span {
        let port = (low - span + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    kernel_port()
}

fn kernel_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn port_of(address: &str) -> &str {
    address.rsplit(':').next().unwrap_or_default()
}

/// A running `tchserve --foreground`, stopped (SIGTERM) when dropped.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub store: PathBuf,
    pub inference: String,
    pub management: String,
    pub metrics: String,
    /// The gRPC inference listener (TorchServe's and the v2 services), `127.0.0.1:port`.
    pub grpc_inference: String,
    /// The gRPC management listener.
    pub grpc_management: String,
    extra_config: String,
    /// Whether the config names `store` as `model_store` (true unless `without_store_config`).
    store_in_config: bool,
    child: Option<Child>,
}

impl Server {
    /// A server home with an empty model store; call `start` to run it.
    pub fn new(extra_config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        fs::create_dir(&store).unwrap();
        fs::create_dir(dir.path().join("tmp")).unwrap();
        let (i, m, x) = (free_port(), free_port(), free_port());
        let (gi, gm) = (free_port(), free_port());
        Server {
            store,
            inference: format!("127.0.0.1:{i}"),
            management: format!("127.0.0.1:{m}"),
            metrics: format!("127.0.0.1:{x}"),
            grpc_inference: format!("127.0.0.1:{gi}"),
            grpc_management: format!("127.0.0.1:{gm}"),
            extra_config: extra_config.to_string(),
            store_in_config: true,
            dir,
            child: None,
        }
    }

    /// Replaces the extra configuration (for settings that name the server's own ports).
    pub fn set_config(&mut self, extra: &str) {
        self.extra_config = extra.to_string();
    }

    /// Leaves `model_store` out of the config: a server with no model store (the folder
    /// `store` is still made, for archives named by path).
    pub fn without_store_config(&mut self) {
        self.store_in_config = false;
    }

    pub fn config_text(&self) -> String {
        let url = |a: &str| {
            if a.starts_with("unix:") {
                a.to_string()
            } else {
                format!("http://{a}")
            }
        };
        format!(
            // Token authorization is tested on its own; the extra config can turn it back on.
            "inference_address={}\nmanagement_address={}\nmetrics_address={}\n{}\
             grpc_inference_port={}\ngrpc_management_port={}\n\
             disable_token_authorization=true\n{}\n",
            url(&self.inference),
            url(&self.management),
            url(&self.metrics),
            if self.store_in_config {
                format!("model_store={}\n", self.store.display())
            } else {
                String::new()
            },
            port_of(&self.grpc_inference),
            port_of(&self.grpc_management),
            self.extra_config
        )
    }

    pub fn command(&self) -> Command {
        fs::write(
            self.dir.path().join("config.properties"),
            self.config_text(),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tchserve"));
        cmd.current_dir(self.dir.path())
            .env_remove("TS_CONFIG_FILE")
            // Extracted archives land under the test's own folder, which is removed even when
            // the server is killed.
            .env("TMPDIR", self.temp_dir())
            .env("RUST_LOG", "info");
        cmd
    }

    /// Starts in the foreground (as a child) with extra arguments and waits for /ping.
    pub fn start(&mut self, args: &[&str]) -> &mut Self {
        // Between a stop and a restart, another program on the machine may take one of the
        // freed ports: then the restart moves to fresh ports.
        for attempt in 0.. {
            self.spawn(args);
            match self.try_wait_ready() {
                Ok(()) => break,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {
                    self.inference = format!("127.0.0.1:{}", free_port());
                    self.management = format!("127.0.0.1:{}", free_port());
                    self.metrics = format!("127.0.0.1:{}", free_port());
                    self.grpc_inference = format!("127.0.0.1:{}", free_port());
                    self.grpc_management = format!("127.0.0.1:{}", free_port());
                }
                Err(log) => panic!("{log}"),
            }
        }
        self
    }

    /// Starts in the foreground (as a child) with extra arguments and returns at once.
    pub fn spawn(&mut self, args: &[&str]) {
        let log = fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = self
            .command()
            .arg("--foreground")
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn wait_ready(&mut self) {
        if let Err(log) = self.try_wait_ready() {
            panic!("{log}");
        }
    }

    /// Waits until the inference listener accepts; the server's log when it exited instead.
    fn try_wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!("tchserve exited ({status}):\n{}", self.log()));
            }
            // A bound port accepts connections before the server answers them (the key file is
            // written in between): ready is an answer, not a connection.
            if std::net::TcpStream::connect(&self.inference).is_ok()
                && super::http::try_request(
                    &self.inference,
                    "GET",
                    "/ping",
                    &[],
                    b"",
                    Duration::from_secs(5),
                )
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("tchserve did not start:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's working folder.
    pub fn home(&self) -> &Path {
        self.dir.path()
    }

    /// The server's temp folder (TMPDIR), inside the test's folder.
    pub fn temp_dir(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for a graceful exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// Sends SIGTERM and asserts the server exited cleanly, showing its log when not.
    #[track_caller]
    pub fn stop_ok(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "tchserve stopped with {status}:\n{}",
            self.log()
        );
    }

    /// Sends SIGTERM and returns at once; `wait` reaps the server.
    pub fn signal_stop(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Waits for the server to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().unwrap()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn infer(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(&self.inference, method, path, headers, body)
    }

    pub fn manage(&self, method: &str, path: &str) -> Resp {
        request(&self.management, method, path, &[], b"")
    }

    pub fn metrics_text(&self) -> String {
        request(&self.metrics, "GET", "/metrics", &[], b"").text()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Archives with the real torch-model-archiver into `store` as `<name>.mar`.
pub fn real_archive(
    store: &Path,
    name: &str,
    serialized: &Path,
    handler: &str,
    extra: &[&Path],
) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(venv_bin("torch-model-archiver"));
    cmd.env("TMPDIR", tmp.path())
        .args([
            "--model-name",
            name,
            "--version",
            "1.0",
            "--handler",
            handler,
            "--serialized-file",
        ])
        .arg(serialized)
        .arg("--export-path")
        .arg(store)
        .arg("--force");
    if !extra.is_empty() {
        let list: Vec<String> = extra.iter().map(|p| p.display().to_string()).collect();
        cmd.arg("--extra-files").arg(list.join(","));
    }
    run_ok(&mut cmd);
    format!("{name}.mar")
}

/// The MiniLM text models and PyTorch's answers from `tests/fixtures/make_text.py`.
pub fn text_fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| made_by("make_text.py", "test-fixtures-text"))
}

/// A 10-class image classifier behind the built-in image_classifier handler, as `tiny.mar` in
/// the server's store, with `extra` archiver arguments.
pub fn tiny_image_archive(s: &Server, extra: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_tch-model-archiver"))
            .args(["--model-name", "tiny", "--version", "1.0"])
            .args(["--handler", "image_classifier", "--serialized-file"])
            .arg(fixtures().join("tiny_vision.pt"))
            .arg("--export-path")
            .arg(out.path())
            .args(extra),
    );
    fs::rename(out.path().join("tiny.mar"), s.store.join("tiny.mar")).unwrap();
    "tiny.mar".into()
}

/// The `scale` model (x * 2 on [4] floats) archived as `<name>` 1.0 in the server's store.
pub fn scale_archive(s: &Server, name: &str) -> String {
    archive(
        &s.store,
        name,
        "1.0",
        &fixtures().join("scale2.pt"),
        &fixture_handler("vec4.json"),
        &[],
    )
}

/// The fixtures' 784-128-10 MLP behind a float32 [784] tensor handler, archived in the store as
/// `mlp`.
pub fn mlp_archive(s: &Server) -> String {
    archive(
        &s.store,
        "mlp",
        "1.0",
        &fixtures().join("mlp.pt"),
        &fixture_handler("vec784.json"),
        &[],
    )
}
