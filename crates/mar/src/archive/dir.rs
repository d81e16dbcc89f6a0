//! Directory archives (`--archive-format no-archive`), used in place.

use std::fs;
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use super::{Budget, Entry, Limits, Listing, corrupt, read_capped, unsafe_entry};
use crate::error::{IoContext, Result};
use crate::manifest::MANIFEST_PATH;

/// The folder holding the model: `path` itself, or its only entry when that is a folder
/// without a manifest beside it (TorchServe's rule for directories in the model store).
pub(super) fn model_root(path: &Path) -> Result<PathBuf> {
    if path.join("MAR-INF").exists() {
        return Ok(path.to_path_buf());
    }
    let children: Vec<_> = fs::read_dir(path)
        .at(path)?
        .collect::<Result<_, _>>()
        .at(path)?;
    match children.as_slice() {
        [only] if only.file_type().at(only.path())?.is_dir() => Ok(only.path()),
        _ => Ok(path.to_path_buf()),
    }
}

pub(super) fn list(archive: &Path, root: &Path, limits: &Limits) -> Result<Listing> {
    let mut budget = Budget::new(archive, limits);
    let mut entries = Vec::new();
    let mut manifest = None;
    for item in WalkDir::new(root)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| corrupt(archive, e))?;
        let rel = item.path().strip_prefix(root).unwrap_or(item.path());
        let raw = rel.as_os_str().as_encoded_bytes();
        let name = rel
            .to_str()
            .ok_or_else(|| unsafe_entry(archive, raw, "the name is not valid UTF-8"))?
            .to_string();
        let kind = item.file_type();
        if kind.is_symlink() {
            return Err(unsafe_entry(archive, raw, "symbolic links are not allowed"));
        }
        if !kind.is_file() && !kind.is_dir() {
            return Err(unsafe_entry(
                archive,
                raw,
                "device files, fifos and sockets are not allowed",
            ));
        }
        let size = if kind.is_file() {
            item.metadata().map_err(|e| corrupt(archive, e))?.len()
        } else {
            0
        };
        budget.add(size)?;
        if name == MANIFEST_PATH && kind.is_file() {
            let f = fs::File::open(item.path()).at(item.path())?;
            manifest = Some(read_capped(archive, &name, f, Limits::MAX_METADATA_SIZE)?);
        }
        entries.push(Entry {
            name,
            size,
            compressed_size: size,
            is_dir: kind.is_dir(),
            deflated: false,
        });
    }
    Ok(Listing { entries, manifest })
}
