//! tar.gz archives: entries sit under `<model-name>/`, whose first component is stripped.
//!
//! A gzip stream has no index, so listing streams through the whole archive once (without
//! keeping contents) and reading a named file streams again up to it.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use tar::EntryType;

use super::{
    Budget, Entry, Limits, Listing, corrupt, entry_name, read_capped, unsafe_entry, write_entry,
};
use crate::error::{IoContext, MarError, Result};
use crate::manifest::MANIFEST_PATH;

/// What to do with each tar member while walking the stream.
enum Visit {
    Continue,
    Stop,
}

/// The most a tar metadata member (a GNU long name, a pax header) may hold. The tar library
/// reads such members whole into memory before the entry they describe, so a gzip of zeros a
/// few megabytes long could otherwise make it allocate gigabytes.
const MAX_TAR_METADATA: u64 = 64 << 10;

/// The most all metadata members of one archive may hold together: skipping one still means
/// decompressing it.
const MAX_TAR_METADATA_TOTAL: u64 = 4 << 20;

/// Walks every member with a safe, normalised name (first component stripped).
/// Long names and pax `path` records name the member after them; other metadata is skipped;
/// links and special files are refused.
fn walk(
    path: &Path,
    mut visit: impl FnMut(&str, bool, u64, &mut dyn Read) -> Result<Visit>,
) -> Result<()> {
    let file = File::open(path).at(path)?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    // Raw: metadata members come to us unread, so their size is checked before they are.
    let members = tar
        .entries()
        .map_err(|e| corrupt(path, format!("damaged tar.gz: {e}")))?
        .raw(true);
    let mut long_name: Option<Vec<u8>> = None;
    let mut metadata_total = 0u64;
    for member in members {
        let mut member =
            member.map_err(|e| corrupt(path, format!("damaged or truncated tar.gz: {e}")))?;
        let kind = member.header().entry_type();
        if kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
        {
            let size = member.size();
            metadata_total = metadata_total.saturating_add(size);
            if size > MAX_TAR_METADATA || metadata_total > MAX_TAR_METADATA_TOTAL {
                return Err(MarError::LimitExceeded {
                    archive: path.to_path_buf(),
                    reason: format!(
                        "a tar metadata member (long name or pax header) of {size} bytes; \
                         at most {MAX_TAR_METADATA} each and {MAX_TAR_METADATA_TOTAL} in all"
                    ),
                });
            }
            let mut data = Vec::with_capacity(size as usize);
            member
                .read_to_end(&mut data)
                .map_err(|e| corrupt(path, format!("damaged or truncated tar.gz: {e}")))?;
            if kind.is_gnu_longname() {
                // NUL-terminated, as GNU tar writes it.
                let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
                data.truncate(end);
                long_name = Some(data);
            } else if kind.is_pax_local_extensions() {
                let pax_path = tar::PaxExtensions::new(&data)
                    .filter_map(std::result::Result::ok)
                    .find(|e| e.key_bytes() == b"path")
                    .map(|e| e.value_bytes().to_vec());
                if let Some(p) = pax_path {
                    long_name = Some(p);
                }
            }
            continue;
        }
        let raw = long_name
            .take()
            .unwrap_or_else(|| member.path_bytes().into_owned());
        let is_dir = match kind {
            EntryType::Regular | EntryType::Continuous => false,
            EntryType::Directory => true,
            EntryType::Symlink | EntryType::Link => {
                return Err(unsafe_entry(path, &raw, "links are not allowed"));
            }
            _ => {
                return Err(unsafe_entry(
                    path,
                    &raw,
                    "device files, fifos and sockets are not allowed",
                ));
            }
        };
        let full = entry_name::normalize(&raw).map_err(|r| unsafe_entry(path, &raw, r))?;
        let name = match full.split_once('/') {
            Some((_, rest)) => rest.to_string(),
            // The model folder itself.
            None if is_dir => continue,
            None => {
                return Err(unsafe_entry(
                    path,
                    &raw,
                    "tar.gz model archives keep every file under one top-level folder",
                ));
            }
        };
        let size = member.size();
        if let Visit::Stop = visit(&name, is_dir, size, &mut member)? {
            break;
        }
    }
    Ok(())
}

pub(super) fn list(path: &Path, limits: &Limits) -> Result<Listing> {
    let compressed = fs::metadata(path).at(path)?.len();
    let mut budget = Budget::new(path, limits);
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    let mut manifest = None;
    walk(path, |name, is_dir, size, data| {
        budget.add(size)?;
        budget.check_ratio("the archive", budget.total, compressed)?;
        if !is_dir && !seen.insert(name.to_string()) {
            return Err(unsafe_entry(
                path,
                name.as_bytes(),
                "the archive holds this name twice",
            ));
        }
        if name == MANIFEST_PATH && !is_dir {
            manifest = Some(read_capped(path, name, data, Limits::MAX_METADATA_SIZE)?);
        }
        entries.push(Entry {
            name: name.to_string(),
            size,
            compressed_size: size,
            is_dir,
            deflated: true,
        });
        Ok(Visit::Continue)
    })?;
    Ok(Listing { entries, manifest })
}

pub(super) fn read_file(path: &Path, wanted: &str) -> Result<Vec<u8>> {
    let mut found = None;
    walk(path, |name, is_dir, _, data| {
        if name == wanted && !is_dir {
            found = Some(read_capped(path, name, data, Limits::MAX_METADATA_SIZE)?);
            return Ok(Visit::Stop);
        }
        Ok(Visit::Continue)
    })?;
    found.ok_or_else(|| MarError::MissingEntry {
        archive: path.to_path_buf(),
        entry: wanted.into(),
    })
}

pub(super) fn extract(path: &Path, dest: &Path, limits: &Limits) -> Result<()> {
    let mut budget = Budget::new(path, limits);
    walk(path, |name, is_dir, size, data| {
        if is_dir {
            let d = dest.join(name);
            fs::create_dir_all(&d).at(d)?;
        } else {
            budget.add(size)?;
            write_entry(path, dest, name, data, size)?;
        }
        Ok(Visit::Continue)
    })
}
