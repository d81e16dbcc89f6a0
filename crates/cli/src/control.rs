//! Running the server in the background: PID file, start, stop, status, signals.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tchserve_server::{Address, Config};

/// Name of the PID file inside the log folder.
pub const PID_FILE: &str = "tchserve.pid";
/// Name of the server's log inside the log folder.
pub const LOG_FILE: &str = "tchserve.log";

/// How long `--start` waits for the server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `--stop` waits for requests in flight to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(180);

/// The running server's PID file; removed when dropped.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id, refusing if another live server owns the file.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        if let Some(pid) = running_pid(dir).filter(|&p| p != std::process::id()) {
            bail!("tchserve is already running (pid {pid}); stop it with `tchserve --stop`");
        }
        let path = dir.join(PID_FILE);
        fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.0) == Some(std::process::id()) {
            let _ = fs::remove_file(&self.0);
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    pid > 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// The pid of the server recorded in `dir`, if it is still alive.
pub fn running_pid(dir: &Path) -> Option<u32> {
    read_pid(&dir.join(PID_FILE)).filter(|&p| alive(p))
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Starts `tchserve --foreground` with the same arguments in the background and waits until it
/// answers `/ping`.
pub fn start(dir: &Path, config: &Config) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(dir) {
        bail!("tchserve is already running (pid {pid}); stop it with `tchserve --stop`");
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join(LOG_FILE);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--start")
        .collect();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--foreground")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if !args.iter().any(|a| a == "--log-dir") {
        cmd.arg("--log-dir").arg(dir);
    }
    // Its own process group: Ctrl-C in this terminal must not reach the server later.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the server")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited during start-up ({status}); its log says:\n{}",
                log_tail(&log_path, log_start)
            );
        }
        if ping(&config.inference_address).is_some() {
            println!(
                "tchserve is running (pid {}); logs in {}",
                child.id(),
                log_path.display()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the server did not answer /ping within {} s; see {}",
                START_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_tail(path: &Path, from: u64) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Stops the server gracefully and waits for it to exit.
pub fn stop(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(dir) else {
        let _ = fs::remove_file(dir.join(PID_FILE));
        println!("tchserve is not running");
        return Ok(());
    };
    // SAFETY: plain kill(2) on a pid read from our own PID file.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!(
                "tchserve (pid {pid}) is still finishing requests after {} s",
                STOP_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("tchserve has stopped");
    Ok(())
}

/// Prints whether a server runs and whether it is healthy; true when it runs.
pub fn status(dir: &Path) -> anyhow::Result<bool> {
    match running_pid(dir) {
        Some(pid) => {
            println!("tchserve is running (pid {pid})");
            Ok(true)
        }
        None => {
            println!("tchserve is not running");
            Ok(false)
        }
    }
}

/// `GET /ping`: the status code, or `None` when nothing answers.
pub fn ping(address: &Address) -> Option<u16> {
    let request = "GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut response = Vec::new();
    let timeout = Some(Duration::from_secs(2));
    match address {
        Address::Tcp(host, port) => {
            let host = if host == "0.0.0.0" {
                "127.0.0.1"
            } else if host == "::" {
                "::1"
            } else {
                host
            };
            let mut s = std::net::TcpStream::connect((host, *port)).ok()?;
            s.set_read_timeout(timeout).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            s.read_to_end(&mut response).ok()?;
        }
        Address::Unix(path) => {
            let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
            s.set_read_timeout(timeout).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            s.read_to_end(&mut response).ok()?;
        }
    }
    let head = String::from_utf8_lossy(&response[..response.len().min(32)]).into_owned();
    head.split_whitespace().nth(1)?.parse().ok()
}
