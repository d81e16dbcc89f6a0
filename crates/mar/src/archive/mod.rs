//! Reading model archives: zip (deflated or stored), tar.gz and plain directories.
//!
//! Opening an archive validates all of it before anything is written: every entry name passes
//! [`entry_name::normalize`], only regular files and directories are accepted, and the entry
//! count, total size and compression ratio are held to [`Limits`]. Listing never holds an entry's
//! contents in memory; only the small manifest and files asked for by name are read.

mod dir;
pub(crate) mod entry_name;
mod tgz;
mod zip;

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, MarError, Result};
use crate::manifest::{MANIFEST_PATH, Manifest, model_name_from_file_name};
use crate::model_config::ModelConfig;

/// Bounds that keep a hostile archive from exhausting disk, memory or time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest total uncompressed size of all entries, in bytes.
    pub max_total_size: u64,
    /// Largest number of entries.
    pub max_entries: usize,
    /// Largest uncompressed/compressed ratio of a zip entry and of the whole archive, checked
    /// once the uncompressed size passes [`Limits::RATIO_FLOOR`].
    pub max_ratio: u64,
}

impl Limits {
    /// Sizes below this are never held to the ratio limit: small text files compress very well.
    pub const RATIO_FLOOR: u64 = 1 << 20;
    /// Largest manifest, handler manifest or config read into memory.
    pub const MAX_METADATA_SIZE: u64 = 4 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_size: 32 << 30,
            max_entries: 100_000,
            // Serialized weights compress by well under 2x and text by about 10x; deflate's
            // ceiling is about 1032x, which only runs of one byte reach.
            max_ratio: 200,
        }
    }
}

/// How an archive is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A zip file (`.mar`, deflated or stored).
    Zip,
    /// A gzip-compressed tar file whose entries sit under `<model-name>/`.
    TarGz,
    /// A plain directory (`--archive-format no-archive`).
    Directory,
}

/// One file or directory in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalised path relative to the archive root.
    pub name: String,
    /// Uncompressed size in bytes (0 for directories).
    pub size: u64,
    /// Stored size in bytes; equal to `size` outside zip archives.
    pub compressed_size: u64,
    /// Whether the entry is a directory.
    pub is_dir: bool,
    /// Whether a zip entry is deflated (false: stored).
    pub deflated: bool,
}

/// A validated model archive.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    layout: Layout,
    /// For directories, the folder that holds `MAR-INF` (TorchServe descends into a lone subfolder).
    root: PathBuf,
    entries: Vec<Entry>,
    manifest: Manifest,
    limits: Limits,
}

impl Archive {
    /// Opens and validates the archive at `path` with the default [`Limits`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_limits(path, Limits::default())
    }

    /// Opens and validates the archive at `path`.
    pub fn open_with_limits(path: impl AsRef<Path>, limits: Limits) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let meta = fs::metadata(&path).at(&path)?;
        let (layout, root, listing) = if meta.is_dir() {
            let root = dir::model_root(&path)?;
            let listing = dir::list(&path, &root, &limits)?;
            (Layout::Directory, root, listing)
        } else {
            if !meta.is_file() {
                return Err(MarError::Corrupt {
                    archive: path,
                    reason: "not a model archive: not a regular file".into(),
                });
            }
            // Non-blocking, so a file swapped for a FIFO after the check cannot hang the caller.
            let mut file = {
                use std::os::unix::fs::OpenOptionsExt as _;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path)
                    .at(&path)?
            };
            if !file.metadata().at(&path)?.is_file() {
                return Err(MarError::Corrupt {
                    archive: path,
                    reason: "not a model archive: not a regular file".into(),
                });
            }
            let mut magic = [0u8; 4];
            let n = read_up_to(&mut file, &mut magic).at(&path)?;
            match &magic[..n] {
                [b'P', b'K', 3, 4] | [b'P', b'K', 5, 6] => {
                    (Layout::Zip, path.clone(), zip::list(&path, &limits)?)
                }
                [0x1f, 0x8b, ..] => (Layout::TarGz, path.clone(), tgz::list(&path, &limits)?),
                _ => {
                    return Err(MarError::Corrupt {
                        archive: path,
                        reason:
                            "not a model archive: expected a zip (.mar), a tar.gz or a directory"
                                .into(),
                    });
                }
            }
        };
        let bytes = listing.manifest.ok_or_else(|| MarError::Manifest {
            archive: path.clone(),
            file: MANIFEST_PATH.into(),
            reason: "missing: every model archive needs a manifest".into(),
        })?;
        let manifest = Manifest::parse(&bytes).map_err(|reason| MarError::Manifest {
            archive: path.clone(),
            file: MANIFEST_PATH.into(),
            reason,
        })?;
        Ok(Archive {
            path,
            layout,
            root,
            entries: listing.entries,
            manifest,
            limits,
        })
    }

    /// Where the archive lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it is stored.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The parsed `MAR-INF/MANIFEST.json`.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Every entry, in archive order, directories included.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether a file with this normalised name is in the archive.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| !e.is_dir && e.name == name)
    }

    /// The model name: the manifest's, else derived from the file name as TorchServe does.
    pub fn model_name(&self) -> String {
        match self.manifest.model.model_name.as_deref() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => model_name_from_file_name(&self.path.to_string_lossy()),
        }
    }

    /// Reads one small file (at most [`Limits::MAX_METADATA_SIZE`] bytes) into memory.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self
            .entries
            .iter()
            .find(|e| !e.is_dir && e.name == name)
            .ok_or_else(|| MarError::MissingEntry {
                archive: self.path.clone(),
                entry: name.into(),
            })?;
        if entry.size > Limits::MAX_METADATA_SIZE {
            return Err(MarError::LimitExceeded {
                archive: self.path.clone(),
                reason: format!(
                    "`{name}` is {} bytes, more than the {} bytes read into memory",
                    entry.size,
                    Limits::MAX_METADATA_SIZE
                ),
            });
        }
        let data = match self.layout {
            Layout::Zip => zip::read_file(&self.path, name, entry.size)?,
            Layout::TarGz => tgz::read_file(&self.path, name)?,
            Layout::Directory => {
                let p = self.root.join(name);
                fs::read(&p).at(p)?
            }
        };
        Ok(data)
    }

    /// The model's `model-config.yaml`, when the manifest names one.
    pub fn model_config(&self) -> Result<Option<ModelConfig>> {
        let Some(file) = self.manifest.model.config_file.as_deref() else {
            return Ok(None);
        };
        let bytes = self.read_file(file)?;
        let text = String::from_utf8(bytes).map_err(|_| MarError::ModelConfig {
            file: file.into(),
            reason: "not valid UTF-8".into(),
        })?;
        ModelConfig::parse(&text)
            .map(Some)
            .map_err(|reason| MarError::ModelConfig {
                file: file.into(),
                reason,
            })
    }

    /// Makes the archive's files available as a directory and returns it.
    ///
    /// Zip and tar.gz archives are extracted into `dest`, which must not exist yet; on failure
    /// `dest` is removed again. A directory archive is used where it is and `dest` is untouched.
    pub fn unpack(&self, dest: &Path) -> Result<PathBuf> {
        if self.layout == Layout::Directory {
            return Ok(self.root.clone());
        }
        fs::create_dir_all(dest.parent().unwrap_or(Path::new("."))).at(dest)?;
        fs::create_dir(dest).at(dest)?;
        let result = match self.layout {
            Layout::Zip => zip::extract(&self.path, dest, &self.limits),
            Layout::TarGz => tgz::extract(&self.path, dest, &self.limits),
            Layout::Directory => unreachable!("handled above"),
        };
        match result {
            Ok(()) => Ok(dest.to_path_buf()),
            Err(e) => {
                let _ = fs::remove_dir_all(dest);
                Err(e)
            }
        }
    }
}

/// What a format-specific lister found.
struct Listing {
    entries: Vec<Entry>,
    manifest: Option<Vec<u8>>,
}

/// Running totals checked against [`Limits`] while listing or extracting.
struct Budget<'a> {
    archive: &'a Path,
    limits: &'a Limits,
    entries: usize,
    total: u64,
}

impl<'a> Budget<'a> {
    fn new(archive: &'a Path, limits: &'a Limits) -> Self {
        Budget {
            archive,
            limits,
            entries: 0,
            total: 0,
        }
    }

    fn add(&mut self, size: u64) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.exceeded(format!(
                "more than {} entries; raise the entry limit if this archive is trusted",
                self.limits.max_entries
            )));
        }
        self.total = self.total.saturating_add(size);
        if self.total > self.limits.max_total_size {
            return Err(self.exceeded(format!(
                "uncompressed contents exceed the {} byte limit (possible zip bomb)",
                self.limits.max_total_size
            )));
        }
        Ok(())
    }

    fn check_ratio(&self, what: &str, uncompressed: u64, compressed: u64) -> Result<()> {
        if uncompressed > Limits::RATIO_FLOOR
            && uncompressed / compressed.max(1) > self.limits.max_ratio
        {
            return Err(self.exceeded(format!(
                "{what} expands {uncompressed} bytes from {compressed}, a ratio over {} (possible zip bomb)",
                self.limits.max_ratio
            )));
        }
        Ok(())
    }

    fn exceeded(&self, reason: String) -> MarError {
        MarError::LimitExceeded {
            archive: self.archive.to_path_buf(),
            reason,
        }
    }
}

fn unsafe_entry(archive: &Path, raw: &[u8], reason: impl Into<String>) -> MarError {
    MarError::UnsafeEntry {
        archive: archive.to_path_buf(),
        entry: String::from_utf8_lossy(raw).into_owned(),
        reason: reason.into(),
    }
}

fn corrupt(archive: &Path, reason: impl std::fmt::Display) -> MarError {
    MarError::Corrupt {
        archive: archive.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a whole entry into memory, refusing one larger than `max` bytes.
fn read_capped(archive: &Path, name: &str, r: impl Read, max: u64) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    r.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| corrupt(archive, format!("reading `{name}`: {e}")))?;
    if data.len() as u64 > max {
        return Err(MarError::LimitExceeded {
            archive: archive.to_path_buf(),
            reason: format!("`{name}` is larger than the {max} bytes read into memory"),
        });
    }
    Ok(data)
}

/// Writes one entry below `dest`, creating parents; never follows or replaces an existing path.
fn write_entry(
    archive: &Path,
    dest: &Path,
    name: &str,
    mut data: impl Read,
    declared: u64,
) -> Result<()> {
    let target = dest.join(name);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    let mut out = File::options()
        .write(true)
        .create_new(true)
        .open(&target)
        .at(&target)?;
    // A forged header can declare a small size over a stream that inflates far more.
    let written = io::copy(&mut (&mut data).take(declared + 1), &mut out)
        .map_err(|e| corrupt(archive, format!("extracting `{name}`: {e}")))?;
    if written != declared {
        return Err(MarError::LimitExceeded {
            archive: archive.to_path_buf(),
            reason: format!(
                "`{name}` holds {} bytes where its header declares {declared} (forged sizes, possible zip bomb)",
                if written > declared {
                    format!("more than {written}")
                } else {
                    written.to_string()
                }
            ),
        });
    }
    Ok(())
}
