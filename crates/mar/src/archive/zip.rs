//! Zip archives (`.mar`): the central directory is read without inflating anything.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use super::{
    Budget, Entry, Limits, Listing, corrupt, entry_name, read_capped, unsafe_entry, write_entry,
};
use crate::error::{IoContext, Result};
use crate::manifest::MANIFEST_PATH;

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

fn open(path: &Path) -> Result<ZipArchive<File>> {
    let file = File::open(path).at(path)?;
    ZipArchive::new(file).map_err(|e| corrupt(path, format!("damaged or truncated zip: {e}")))
}

pub(super) fn list(path: &Path, limits: &Limits) -> Result<Listing> {
    let mut zip = open(path)?;
    // The zip reader keeps one entry per name, so a second copy would otherwise be read in place
    // of the first without a word; the loop below can only see names that survived.
    if zip.has_duplicate_names() {
        return Err(corrupt(
            path,
            "the archive holds the same entry name twice".to_string(),
        ));
    }
    let mut budget = Budget::new(path, limits);
    if zip.len() > limits.max_entries {
        budget.entries = zip.len() - 1;
        budget.add(0)?;
    }
    let mut entries = Vec::with_capacity(zip.len());
    let mut seen = HashSet::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| corrupt(path, format!("entry {i}: {e}")))?;
        let raw = f.name_raw().to_vec();
        let name = entry_name::normalize(&raw).map_err(|r| unsafe_entry(path, &raw, r))?;
        let is_dir = f.is_dir();
        match f.unix_mode().map(|m| m & S_IFMT) {
            None | Some(0) | Some(S_IFREG) | Some(S_IFDIR) => {}
            Some(S_IFLNK) => {
                return Err(unsafe_entry(path, &raw, "symbolic links are not allowed"));
            }
            Some(_) => {
                return Err(unsafe_entry(
                    path,
                    &raw,
                    "device files, fifos and sockets are not allowed",
                ));
            }
        }
        if f.encrypted() {
            return Err(unsafe_entry(
                path,
                &raw,
                "encrypted entries are not supported",
            ));
        }
        let deflated = match f.compression() {
            CompressionMethod::Stored => false,
            CompressionMethod::Deflated => true,
            other => {
                return Err(unsafe_entry(
                    path,
                    &raw,
                    format!("compression method {other:?} is not supported (use deflate or store)"),
                ));
            }
        };
        if !seen.insert(name.clone()) {
            return Err(unsafe_entry(
                path,
                &raw,
                "the archive holds this name twice",
            ));
        }
        budget.add(f.size())?;
        budget.check_ratio(&format!("`{name}`"), f.size(), f.compressed_size())?;
        entries.push(Entry {
            name,
            size: if is_dir { 0 } else { f.size() },
            compressed_size: f.compressed_size(),
            is_dir,
            deflated,
        });
    }
    // Entries each just under the ratio floor add up: the whole archive is held to the ratio
    // too, as a tar.gz is.
    let archive_size = fs::metadata(path).at(path)?.len();
    budget.check_ratio("the archive", budget.total, archive_size)?;
    let manifest = match entries
        .iter()
        .find(|e| e.name == MANIFEST_PATH && !e.is_dir)
    {
        Some(e) => Some(read_file(path, MANIFEST_PATH, e.size)?),
        None => None,
    };
    Ok(Listing { entries, manifest })
}

pub(super) fn read_file(path: &Path, name: &str, size: u64) -> Result<Vec<u8>> {
    let mut zip = open(path)?;
    let index = find(&mut zip, name).ok_or_else(|| crate::MarError::MissingEntry {
        archive: path.to_path_buf(),
        entry: name.into(),
    })?;
    let f = zip
        .by_index(index)
        .map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
    let data = read_capped(path, name, f, size.min(Limits::MAX_METADATA_SIZE))?;
    if data.len() as u64 != size {
        return Err(corrupt(
            path,
            format!("`{name}` does not match its declared size"),
        ));
    }
    Ok(data)
}

/// Index of the entry whose normalised name is `name` (stored names may carry `./`).
fn find(zip: &mut ZipArchive<File>, name: &str) -> Option<usize> {
    if let Some(i) = zip.index_for_name(name) {
        return Some(i);
    }
    (0..zip.len()).find(|&i| {
        zip.by_index_raw(i)
            .ok()
            .and_then(|f| entry_name::normalize(f.name_raw()).ok())
            .is_some_and(|n| n == name)
    })
}

pub(super) fn extract(path: &Path, dest: &Path, limits: &Limits) -> Result<()> {
    let mut zip = open(path)?;
    // The zip reader keeps one entry per name, so a second copy would otherwise be read in place
    // of the first without a word; the loop below can only see names that survived.
    if zip.has_duplicate_names() {
        return Err(corrupt(
            path,
            "the archive holds the same entry name twice".to_string(),
        ));
    }
    let mut budget = Budget::new(path, limits);
    for i in 0..zip.len() {
        let f = zip
            .by_index(i)
            .map_err(|e| corrupt(path, format!("entry {i}: {e}")))?;
        let raw = f.name_raw().to_vec();
        let name = entry_name::normalize(&raw).map_err(|r| unsafe_entry(path, &raw, r))?;
        if f.is_dir() {
            let d = dest.join(&name);
            fs::create_dir_all(&d).at(d)?;
            continue;
        }
        let declared = f.size();
        budget.add(declared)?;
        write_entry(path, dest, &name, f, declared)?;
    }
    Ok(())
}
