//! Scratch folders: where a process extracts archives, `$TMPDIR/<prefix>-<pid>`.
//!
//! Extracted archives are large. A folder is removed when its owner ends (however it returns),
//! and a server start sweeps the folders of processes that died without removing theirs (SIGKILL,
//! OOM, power loss), which would otherwise pile up until the disk fills.
//!
//! libtorch keeps temp files of its own (a `.pt2` package unpacks into `aotinductor_*`), which
//! it removes only when it ends cleanly; [`Scratch::hold_libtorch_temp`] puts them in the
//! scratch folder too, so they go with it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The prefix of a server's scratch folder.
pub const SERVER: &str = "tchserve";
/// The prefix of `tchserve --check`'s scratch folder.
pub const CHECK: &str = "tchserve-check";

/// The lock file inside a scratch folder, held by its owner for as long as it runs.
const LOCK: &str = ".lock";

/// The folder libtorch's own temp files go into, inside a scratch folder.
const LIBTORCH: &str = "libtorch";

/// The temp folder as this process found it (`$TMPDIR`, else `/tmp`), before
/// [`Scratch::hold_libtorch_temp`] pointed `TMPDIR` into a scratch folder.
pub fn temp_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(std::env::temp_dir)
}

/// This process's scratch folder, created and locked; removed on drop.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
    /// Held open: the lock lasts as long as the file, and the kernel releases it when the
    /// process ends, however it ends.
    _lock: Option<File>,
}

impl Scratch {
    /// Creates and locks `$TMPDIR/<prefix>-<pid>`. The lock lets other servers sweeping the temp
    /// folder tell it is in use even when they cannot see this process (another pid namespace,
    /// as in containers sharing /tmp).
    pub fn create(prefix: &str) -> Self {
        Self::create_in(temp_root(), prefix)
    }

    fn create_in(temp: &Path, prefix: &str) -> Self {
        let path = claim(temp, &format!("{prefix}-{}", std::process::id()));
        let lock = File::create(path.join(LOCK))
            .and_then(|f| f.try_lock().map(|()| f).map_err(std::io::Error::other));
        let lock = match lock {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot lock {}: {e}", path.display());
                None
            }
        };
        Scratch { path, _lock: lock }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Points `TMPDIR` at a folder inside this one, where libtorch then keeps its own temp
    /// files: they are removed with this folder, and swept with it after a crash, where
    /// libtorch's own clean-up never runs.
    ///
    /// # Safety
    /// No other thread may be running: changing the environment races with any read of it.
    pub unsafe fn hold_libtorch_temp(&self) {
        // Read first: whatever needs the user's temp folder afterwards finds it here.
        let _ = temp_root();
        let dir = self.path.join(LIBTORCH);
        match std::fs::create_dir_all(&dir) {
            // SAFETY: the caller runs alone.
            Ok(()) => unsafe { std::env::set_var("TMPDIR", &dir) },
            Err(e) => tracing::warn!("cannot create {}: {e}", dir.display()),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Makes `temp/<name>` this user's own (mode 0700) and returns it. A folder of that name left
/// by an earlier process of this user is reused; one that is not this user's own (another
/// user's, a link), which whoever made it could still write into, is passed over for
/// `<name>-<n>`, created fresh.
fn claim(temp: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let make = |p: &Path| std::fs::DirBuilder::new().mode(0o700).create(p);
    let first = temp.join(name);
    match make(&first) {
        Ok(()) => return first,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && owned_folder(&first) => {
            if std::fs::set_permissions(&first, std::fs::Permissions::from_mode(0o700)).is_ok() {
                return first;
            }
        }
        Err(_) => {}
    }
    for n in 1..=100 {
        let other = temp.join(format!("{name}-{n}"));
        if make(&other).is_ok() {
            tracing::warn!(
                "{} exists and is not this user's own folder; using {}",
                first.display(),
                other.display()
            );
            return other;
        }
    }
    // Nothing could be created: extraction will fail and say where.
    first
}

/// Removes, from the temp folder `temp`, the scratch folders nobody holds: only real folders of
/// this user, named exactly `<prefix>-<pid>` with one of the prefixes above, whose lock file
/// exists and is free. A folder without a lock file is left alone: it may be one being created.
pub fn remove_stale(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_str().is_some_and(is_scratch_name) {
            continue;
        }
        let path = entry.path();
        if !owned_folder(&path) {
            continue;
        }
        let free = File::open(path.join(LOCK)).is_ok_and(|f| f.try_lock().is_ok());
        if !free {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!("removed {} left by a stopped server", path.display()),
            Err(e) => tracing::debug!("cannot remove {}: {e}", path.display()),
        }
    }
}

/// Whether `name` is `<prefix>-<pid>`, written as [`Scratch::create`] writes it.
fn is_scratch_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(SERVER).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let digits = rest.strip_prefix("check-").unwrap_or(rest);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
        && digits.parse::<u32>().is_ok()
}

/// Whether `path` is a folder (not a link to one) owned by this process's user.
fn owned_folder(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        m.is_dir() && m.uid() == unsafe { libc::geteuid() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_scratch_names_count() {
        assert!(is_scratch_name("tchserve-123"));
        assert!(is_scratch_name("tchserve-check-45"));
        for name in [
            "tchserve-",
            "tchserve-+12",
            "tchserve-007",
            "tchserve-12a",
            "tchserve-check-",
            "tchserve-99999999999",
            "tchserve",
            "tchserve12",
            "other-12",
        ] {
            assert!(!is_scratch_name(name), "{name}");
        }
    }

    #[test]
    fn a_folder_of_the_name_that_is_not_ours_is_passed_over() {
        let temp = tempfile::tempdir().unwrap();
        let elsewhere = temp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let name = format!("{SERVER}-{}", std::process::id());
        std::os::unix::fs::symlink(&elsewhere, temp.path().join(&name)).unwrap();
        let s = Scratch::create_in(temp.path(), SERVER);
        assert_eq!(s.path(), temp.path().join(format!("{name}-1")));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_locked_folder_stays_and_an_unlocked_one_goes() {
        let temp = tempfile::tempdir().unwrap();
        // Pids of live processes, so only the lock decides.
        let held = Scratch::create_in(temp.path(), SERVER);
        // What a killed server leaves: its folder and a lock file nobody holds.
        let released = temp.path().join("tchserve-1");
        std::fs::create_dir(&released).unwrap();
        File::create(released.join(LOCK)).unwrap();
        let unrelated = temp.path().join("tchserve-notes");
        std::fs::create_dir(&unrelated).unwrap();
        remove_stale(temp.path());
        assert!(held.path().exists());
        assert!(!released.exists(), "pid 1 lives, but nobody holds the lock");
        assert!(unrelated.exists());
        let held_path = held.path().to_path_buf();
        drop(held);
        assert!(
            !held_path.exists(),
            "the owner removes its folder when it ends"
        );
    }
}
