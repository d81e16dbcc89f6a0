//! Running the server in the background: PID file, start, stop, status, signals.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Name of the PID file inside the log folder.
pub const PID_FILE: &str = "tchserve.pid";
/// Name of the server's log inside the log folder.
pub const LOG_FILE: &str = "tchserve.log";

/// How long `--start` waits for the server to answer.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `--stop` waits for requests in flight to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(180);

/// The running server's PID file; removed when dropped.
///
/// Its first line is the pid, as TorchServe writes it; the second is the process's start time
/// (clock ticks since boot, from `/proc`), so a pid reused by another process after a crash is
/// never taken for the server; the third is its `graceful_shutdown_timeout` in seconds, which
/// bounds how long `--stop` waits for it, whatever configuration `--stop` itself reads.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// This server's entry in [`notes_dir`], when it could be written.
    note: Option<PathBuf>,
}

impl PidFile {
    /// Writes this process's id, refusing if another live server owns the file.
    pub fn create(dir: &Path, grace: Duration) -> anyhow::Result<Self> {
        let me = std::process::id();
        if let Some(pid) = running_pid(dir).filter(|&p| p != me) {
            bail!(
                "tchserve is already running (pid {pid}); {}",
                stop_hint(dir)
            );
        }
        let path = dir.join(PID_FILE);
        let started = start_time(me).map(|t| t.to_string()).unwrap_or_default();
        fs::write(&path, format!("{me}\n{started}\n{}\n", grace.as_secs()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFile {
            path,
            note: write_note(me, dir),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if read_pid(&self.path).map(|(pid, _)| pid) == Some(std::process::id()) {
            let _ = fs::remove_file(&self.path);
        }
        if let Some(note) = &self.note {
            let _ = fs::remove_file(note);
        }
    }
}

/// Where each running server of this user notes its log folder, so that `--stop` and
/// `--status` run from another folder still find it, as TorchServe's one PID file in the temp
/// folder lets them.
fn notes_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    tchserve_server::scratch::temp_root().join(format!("tchserve-servers-{uid}"))
}

/// Notes `dir` as the log folder of server `pid`; None when that cannot be written, which
/// only costs finding the server from elsewhere.
fn write_note(pid: u32, dir: &Path) -> Option<PathBuf> {
    let notes = notes_dir();
    let made = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&notes);
    if made.is_err() || !private_to_us(&notes) {
        return None;
    }
    let dir = std::path::absolute(dir).ok()?;
    let note = notes.join(pid.to_string());
    fs::write(&note, dir.as_os_str().as_encoded_bytes())
        .is_ok()
        .then_some(note)
}

/// Whether `dir` is a folder of this user's that nobody else may write to: a notes folder
/// someone else made in a shared temp folder could point `--stop` anywhere.
fn private_to_us(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// The live servers noted in [`notes_dir`], as (pid, log folder); notes of servers that are
/// gone are removed.
fn noted_servers() -> Vec<(u32, PathBuf)> {
    let notes = notes_dir();
    if !private_to_us(&notes) {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(notes) else {
        return Vec::new();
    };
    let mut live: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let dir = PathBuf::from(fs::read_to_string(e.path()).ok()?);
            if running_pid(&dir) == Some(pid) {
                Some((pid, dir))
            } else {
                let _ = fs::remove_file(e.path());
                None
            }
        })
        .collect();
    live.sort();
    live
}

/// Whether a server has run with its logs in `dir`: its log, PID file or snapshots are there.
fn had_a_server(dir: &Path) -> bool {
    [LOG_FILE, PID_FILE, "config"]
        .iter()
        .any(|f| dir.join(f).exists())
}

/// Whether servers found elsewhere may stand in for the one of `dir`: only when the user named
/// no log folder and none has run in `dir`. A folder whose own server has stopped is not
/// another's: a second `--stop` there, or a script's stop-before-start, must not stop a server
/// that another deployment runs.
fn may_look_elsewhere(dir: &Path, dir_given: bool) -> bool {
    !dir_given && !had_a_server(dir)
}

/// The server to stop or report: the one logging to `dir`, else, when the user named no log
/// folder and none ever ran in `dir`, the only server of this user running anywhere. Errs when
/// several run elsewhere.
fn find_server(dir: &Path, dir_given: bool) -> anyhow::Result<Option<(u32, PathBuf)>> {
    if let Some(pid) = running_pid(dir) {
        return Ok(Some((pid, dir.to_path_buf())));
    }
    if !may_look_elsewhere(dir, dir_given) {
        return Ok(None);
    }
    match noted_servers().as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => bail!(
            "none in {} but {} tchserve servers are running elsewhere; name one with --log-dir:\n  {}",
            dir.display(),
            many.len(),
            many.iter()
                .map(|(pid, d)| format!("--log-dir {} (pid {pid})", d.display()))
                .collect::<Vec<_>>()
                .join("\n  ")
        ),
    }
}

/// The pid and, when recorded, the start time in a PID file.
fn read_pid(path: &Path) -> Option<(u32, Option<u64>)> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let started = lines.next().and_then(|l| l.trim().parse().ok());
    Some((pid, started))
}

/// The grace period a PID file records (its third line), if it records one.
fn recorded_grace(path: &Path) -> Option<Duration> {
    let text = fs::read_to_string(path).ok()?;
    let secs = text.lines().nth(2)?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// Whether `pid` runs: it exists and is not a zombie (a killed server stays one until its parent
/// reaps it, and serves nothing meanwhile).
fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    pid > 0
        && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
        && !matches!(process_state(pid), Some('Z' | 'X'))
}

/// A process's state letter (field 3 of `/proc/<pid>/stat`: `R`, `S`, `Z` ...).
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is the tchserve server that wrote the PID file: the same start time when one
/// was recorded, else a process running this program in the foreground.
fn is_our_server(pid: u32, started: Option<u64>) -> bool {
    if let Some(t) = started {
        return start_time(pid) == Some(t);
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0).map(String::from_utf8_lossy);
    let program = args.next().unwrap_or_default();
    Path::new(program.as_ref())
        .file_name()
        .is_some_and(|n| n == "tchserve")
        && args.any(|a| a == "--foreground" || a == "--start")
}

/// The pid of the server recorded in `dir`, if that server is still alive; a stale file (the
/// server died and its pid went to another process) counts as no server.
pub fn running_pid(dir: &Path) -> Option<u32> {
    let (pid, started) = read_pid(&dir.join(PID_FILE))?;
    (alive(pid) && is_our_server(pid, started)).then_some(pid)
}

/// Catches Ctrl-C, SIGTERM and SIGHUP from now on, and returns what completes on the first of
/// them (stop gracefully) and what completes on another one (stop waiting for the drain).
///
/// SIGHUP (a closed terminal, or a log rotation script's habit) stops gracefully too, as
/// TorchServe's JVM takes it, rather than killing the server with requests in flight.
///
/// The handlers are installed here rather than when the future is first polled: a signal that
/// comes between the listeners answering and the server waiting for it would otherwise kill the
/// process outright. Must be called inside a Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<(
    impl std::future::Future<Output = ()> + Send + 'static,
    impl std::future::Future<Output = ()> + Send + 'static,
)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    // Under `nohup` SIGHUP is ignored on purpose: a handler would undo that.
    let mut hangup = if hangup_ignored() {
        None
    } else {
        Some(signal(SignalKind::hangup())?)
    };
    let (count, counted) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        let mut first: Option<std::time::Instant> = None;
        loop {
            let hangup = async {
                match &mut hangup {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
                () = hangup => {},
            }
            match first {
                None => {
                    first = Some(std::time::Instant::now());
                    let _ = count.send(1);
                }
                Some(at) if at.elapsed() >= ONE_SIGNAL => {
                    let _ = count.send(2);
                    return;
                }
                Some(_) => {}
            }
        }
    });
    let signals = move |n: u8| {
        let mut counted = counted.clone();
        async move {
            if counted.wait_for(|c| *c >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    Ok((signals(1), signals(2)))
}

/// Signals this close together are one: a Ctrl-C reaches both a wrapper script and the server,
/// and the wrapper may pass its own on.
const ONE_SIGNAL: Duration = Duration::from_millis(500);

/// Whether this process was started with SIGHUP ignored (`nohup`).
fn hangup_ignored() -> bool {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only reads the current one into `current`.
    let read = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), current.as_mut_ptr()) };
    // SAFETY: sigaction filled it in when it returned 0; zeroed memory is a valid sigaction.
    read == 0 && unsafe { current.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// The environment variable that tells a server started by `--start` which file descriptor to
/// write `ready` to once it answers.
const READY_FD_ENV: &str = "TCHSERVE_READY_FD";
/// The descriptor number the started server gets for it.
const READY_FD: i32 = 3;

/// Tells the `--start` that launched this server, if any, that it is answering.
pub fn signal_ready() {
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: `start` opened this descriptor for this process and nothing else uses it; the
    // File owns and closes it.
    let mut pipe = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let _ = pipe.write_all(b"ready\n");
}

/// How to stop the server whose log folder is `dir`: `--stop` finds it only by the same folder.
fn stop_hint(dir: &Path) -> String {
    if dir == Path::new("logs") {
        "stop it with `tchserve --stop`".into()
    } else {
        format!("stop it with `tchserve --stop --log-dir {}`", dir.display())
    }
}

/// Refuses, saying how to stop it, when a server whose pid file is in `dir` is running.
pub fn refuse_if_running(dir: &Path) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(dir) {
        bail!(
            "tchserve is already running (pid {pid}); {}",
            stop_hint(dir)
        );
    }
    Ok(())
}

/// Starts `tchserve --foreground` with the same arguments in the background and waits until
/// that very process says it answers (its listeners bound, its models loaded). A server that
/// exits instead, because its ports are taken or a model cannot load, is reported with its log.
pub fn start(dir: &Path) -> anyhow::Result<()> {
    refuse_if_running(dir)?;
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
    let (mut ready, ready_writer) = std::io::pipe().context("making a pipe")?;
    let writer_fd = std::os::fd::AsRawFd::as_raw_fd(&ready_writer);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--foreground")
        .args(&args)
        .env(READY_FD_ENV, READY_FD.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if !args.iter().any(|a| a == "--log-dir") {
        cmd.arg("--log-dir").arg(dir);
    }
    // SAFETY: setsid, dup2, close_range and fcntl are async-signal-safe system calls. The
    // child gets a session of its own, so neither Ctrl-C nor the hangup of this terminal
    // reaches the server later, and the pipe's write end as READY_FD, without the close-on-exec
    // flag. Every other file the caller let it inherit is closed at exec: a server holding the
    // write end of its caller's pipe (`$(tchserve --start)`, a CI runner's) would keep that
    // caller waiting until the server stops.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setsid() < 0 || libc::dup2(writer_fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let first = (READY_FD + 1) as libc::c_uint;
            if libc::syscall(
                libc::SYS_close_range,
                first,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                // Kernels before 5.11: mark them one by one, up to the process's limit.
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                    limit.rlim_cur.min(1 << 20) as libc::c_int
                } else {
                    4096
                };
                for fd in first as libc::c_int..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the server")?;
    // Only the server holds the write end now: end of file means it exited.
    drop(ready_writer);
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = ready.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + START_TIMEOUT;
    while !said.is_finished() {
        if Instant::now() > deadline {
            bail!(
                "the server (pid {}) did not finish starting within {} s and goes on starting; \
                 see {}, and {}",
                child.id(),
                START_TIMEOUT.as_secs(),
                log_path.display(),
                stop_hint(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = said.join().unwrap_or_default();
    if text.starts_with("ready") {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited right after starting ({status}); its log says:\n{}",
                log_tail(&log_path, log_start)
            );
        }
        println!(
            "tchserve is running (pid {}); logs in {}",
            child.id(),
            log_path.display()
        );
        return Ok(());
    }
    let status = child.wait()?;
    bail!(
        "the server exited during start-up ({status}); its log says:\n{}",
        log_tail(&log_path, log_start)
    )
}

/// The last lines the server wrote to its log from offset `from`. Only the end is read: the
/// log of a long-running host may be gigabytes.
fn log_tail(path: &Path, from: u64) -> String {
    use std::io::{Seek, SeekFrom};
    const END: u64 = 64 * 1024;
    let Ok(mut file) = fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    // A file shorter than where the server began writing was rolled over since: all of it is
    // the server's.
    let from = if len < from { 0 } else { from };
    let mut text = Vec::new();
    if file
        .seek(SeekFrom::Start(from.max(len.saturating_sub(END))))
        .is_ok()
    {
        let _ = file.take(END).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("(nothing: {} could not be written?)", path.display());
    }
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn not_running(dir: &Path, dir_given: bool, died: Option<u32>) -> String {
    if let Some(pid) = died {
        // The folder is the right one: its server went without stopping.
        return format!(
            "tchserve is not running: the server that wrote {} (pid {pid}) ended without being \
             stopped (killed, or it crashed); its log is {}",
            dir.join(PID_FILE).display(),
            dir.join(LOG_FILE).display()
        );
    }
    if !dir_given && had_a_server(dir) {
        format!(
            "tchserve is not running (no live server in {}); servers started from other \
             folders are left alone: name one with --log-dir",
            dir.join(PID_FILE).display()
        )
    } else if dir_given {
        format!(
            "tchserve is not running (no live server in {}); give --stop and --status the \
             --log-dir or LOG_LOCATION the server was started with, or neither to find the one \
             server running",
            dir.join(PID_FILE).display()
        )
    } else {
        format!(
            "tchserve is not running (no live server in {}, nor anywhere else for this user)",
            dir.join(PID_FILE).display()
        )
    }
}

/// Stops the server gracefully and waits for it to exit (at most `grace` and a margin for the
/// exit itself, or 180 s when the grace is not known); false when none was running.
///
/// Without a log folder named (`dir_given` false), a server started from another folder is
/// found too when it is the only one this user runs.
pub fn stop(dir: &Path, grace: Option<Duration>, dir_given: bool) -> anyhow::Result<bool> {
    let Some((pid, found_in)) = find_server(dir, dir_given)? else {
        let died = read_pid(&dir.join(PID_FILE)).map(|(pid, _)| pid);
        if died.is_some() {
            // Left by a server that died: it names no live server.
            let _ = fs::remove_file(dir.join(PID_FILE));
        }
        println!("{}", not_running(dir, dir_given, died));
        return Ok(false);
    };
    if found_in != dir {
        println!(
            "stopping the tchserve started with its logs in {} (pid {pid})",
            found_in.display()
        );
    }
    // The grace the server was started with, as its PID file records it; else this folder's
    // configuration, which is the server's only when it was found here.
    let grace = recorded_grace(&found_in.join(PID_FILE)).or(grace.filter(|_| found_in == dir));
    // SAFETY: plain kill(2) on a pid that `running_pid` has just confirmed is our server.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
        bail!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let wait = grace.map_or(STOP_TIMEOUT, |g| g + Duration::from_secs(30));
    let deadline = Instant::now() + wait;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!(
                "tchserve (pid {pid}) is still finishing requests after {} s",
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("tchserve has stopped");
    Ok(true)
}

/// Prints whether a server runs; true when it runs.
pub fn status(dir: &Path, dir_given: bool) -> anyhow::Result<bool> {
    if let Some(pid) = running_pid(dir) {
        println!("tchserve is running (pid {pid})");
        if !dir_given {
            for (other, d) in noted_servers().iter().filter(|(p, _)| *p != pid) {
                println!(
                    "another tchserve is running (pid {other}); logs in {}, so --log-dir {} \
                     names it",
                    d.display(),
                    d.display()
                );
            }
        }
        return Ok(true);
    }
    let elsewhere = if dir_given {
        Vec::new()
    } else {
        noted_servers()
    };
    // Only where --stop would stop it: the one server running elsewhere.
    let stands_in = may_look_elsewhere(dir, dir_given) && elsewhere.len() == 1;
    if elsewhere.len() > 1 && may_look_elsewhere(dir, dir_given) {
        println!(
            "tchserve is not running in {}; {} servers run elsewhere: name one with --log-dir",
            dir.display(),
            elsewhere.len()
        );
    } else if !stands_in {
        let died = read_pid(&dir.join(PID_FILE)).map(|(pid, _)| pid);
        println!("{}", not_running(dir, dir_given, died));
    }
    for (pid, d) in &elsewhere {
        println!(
            "tchserve is running (pid {pid}); logs in {}, so --log-dir {} names it",
            d.display(),
            d.display()
        );
    }
    Ok(stands_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_records_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let file = PidFile::create(dir.path(), Duration::from_secs(75)).unwrap();
        assert_eq!(
            recorded_grace(&dir.path().join(PID_FILE)),
            Some(Duration::from_secs(75))
        );
        assert_eq!(running_pid(dir.path()), Some(std::process::id()));
        drop(file);
        assert!(!dir.path().join(PID_FILE).exists());
    }

    #[test]
    fn a_reused_pid_is_not_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = other.id();
        // A PID file left by a crash, whose pid now belongs to another program: with the
        // start time recorded by a server, or without (a file from elsewhere).
        let stale_start = start_time(pid).unwrap() + 1;
        for text in [format!("{pid}\n{stale_start}\n"), format!("{pid}\n")] {
            fs::write(dir.path().join(PID_FILE), text).unwrap();
            assert_eq!(running_pid(dir.path()), None);
        }
        // The same pid with its own start time is the process that wrote the file.
        fs::write(
            dir.path().join(PID_FILE),
            format!("{pid}\n{}\n", start_time(pid).unwrap()),
        )
        .unwrap();
        assert_eq!(running_pid(dir.path()), Some(pid));
        other.kill().unwrap();
        // Killed but not reaped yet, it is a zombie: no longer running.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while process_state(pid) != Some('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(process_state(pid), Some('Z'));
        assert_eq!(running_pid(dir.path()), None, "a zombie is no server");
        other.wait().unwrap();
        assert_eq!(running_pid(dir.path()), None, "a dead pid is no server");
    }
}
