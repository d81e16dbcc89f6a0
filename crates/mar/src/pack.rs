//! Writing archives: what torch-model-archiver does, from flags to a finished file.
//!
//! [`PackRequest::plan`] resolves the inputs into a flat list of entries exactly as the real
//! archiver lays them out; [`Plan::write`] writes them to a temporary file beside the output
//! and renames it into place, so a failed run never leaves a partial archive behind.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use walkdir::WalkDir;
use zip::CompressionMethod;
use zip::write::SimpleFileOptions;

use crate::error::{IoContext, MarError, Result};
use crate::handler::{self, HandlerManifest};
use crate::manifest::{MANIFEST_PATH, Manifest, ModelInfo, RuntimeType, is_valid_model_name};

/// The four output layouts of `--archive-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// `default`: a deflated zip named `<model-name>.mar`.
    Default,
    /// `zip-store`: an uncompressed zip named `<model-name>.mar`.
    ZipStore,
    /// `tgz`: `<model-name>.tar.gz` with entries under `<model-name>/`.
    Tgz,
    /// `no-archive`: a directory `<model-name>/`.
    NoArchive,
}

impl ArchiveFormat {
    /// The flag values, in the real archiver's order.
    pub const NAMES: [&str; 4] = ["tgz", "no-archive", "zip-store", "default"];

    /// Parses a flag value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "default" => Some(Self::Default),
            "zip-store" => Some(Self::ZipStore),
            "tgz" => Some(Self::Tgz),
            "no-archive" => Some(Self::NoArchive),
            _ => None,
        }
    }

    /// The suffix appended to the model name for the output path.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Default | Self::ZipStore => ".mar",
            Self::Tgz => ".tar.gz",
            Self::NoArchive => "",
        }
    }
}

/// Reads and checks the handler manifest at `path` (packed as `name`, given by `flag`): its
/// label file, and every file it names, which the archive should hold.
fn manifest_needs(
    flag: &'static str,
    path: &Path,
    name: &str,
) -> Result<(Option<String>, Vec<String>)> {
    let bytes =
        fs::read(path).map_err(|e| input_error(flag, format!("{}: {e}", path.display())))?;
    let manifest = HandlerManifest::parse(name, &bytes)?;
    let files = manifest
        .referenced_files()
        .into_iter()
        .map(str::to_owned)
        .collect();
    Ok((manifest.label_file().map(str::to_owned), files))
}

/// What kind of handler the `--handler` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerKind {
    /// A name built into TorchServe or tchserve; nothing is packed.
    Builtin,
    /// A tchserve handler manifest, validated and packed.
    Manifest,
    /// A Python (or, for the LSP runtime, C++) handler file: packed, but tchserve cannot run it.
    Code,
}

/// The archiver's inputs, one field per flag.
#[derive(Debug, Clone)]
pub struct PackRequest {
    /// `--model-name`.
    pub model_name: String,
    /// `-v/--version`.
    pub version: String,
    /// `--serialized-file`.
    pub serialized_file: Option<PathBuf>,
    /// `--model-file`.
    pub model_file: Option<PathBuf>,
    /// `--handler`.
    pub handler: String,
    /// `--extra-files`, as given (comma-separated, wildcards allowed).
    pub extra_files: Option<String>,
    /// `--runtime`.
    pub runtime: RuntimeType,
    /// `--export-path`.
    pub export_path: PathBuf,
    /// `--archive-format`.
    pub format: ArchiveFormat,
    /// `-f/--force`.
    pub force: bool,
    /// `-r/--requirements-file`.
    pub requirements_file: Option<PathBuf>,
    /// `-c/--config-file`.
    pub config_file: Option<PathBuf>,
}

/// A resolved archive, ready to write.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The model name.
    pub model_name: String,
    /// Entry name -> file it is read from.
    pub files: BTreeMap<String, PathBuf>,
    /// The manifest to write last.
    pub manifest: Manifest,
    /// Where the output goes.
    pub output: PathBuf,
    /// Output layout.
    pub format: ArchiveFormat,
    /// Whether an existing output may be replaced.
    pub force: bool,
    /// The manifest packed beside a Python handler, which tchserve serves the archive with
    /// (see [`crate::handler::twin_manifest_name`]).
    pub twin_manifest: Option<String>,
    /// What the handler flag named.
    pub handler_kind: HandlerKind,
    /// Non-fatal notes for the user (unmatched wildcards and the like).
    pub warnings: Vec<String>,
}

fn input_error(flag: &'static str, reason: impl Into<String>) -> MarError {
    MarError::Input {
        flag,
        reason: reason.into(),
    }
}

fn base_name(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}

impl PackRequest {
    /// Checks every input and lays out the archive; nothing is written.
    pub fn plan(&self) -> Result<Plan> {
        if !is_valid_model_name(&self.model_name) {
            return Err(MarError::InvalidModelName(self.model_name.clone()));
        }
        if self.export_path.exists() && !self.export_path.is_dir() {
            return Err(input_error(
                "--export-path",
                format!(
                    "Given export-path {} is not a directory. Point to a valid export-path directory.",
                    self.export_path.display()
                ),
            ));
        }
        let output =
            self.export_path
                .join(format!("{}{}", self.model_name, self.format.extension()));
        if output.exists() && !self.force {
            return Err(MarError::OutputExists(output));
        }

        let mut files = BTreeMap::new();
        let mut warnings = Vec::new();
        // Same order as the real archiver copies them, so a later file wins a name clash.
        let add_flat = |files: &mut BTreeMap<String, PathBuf>,
                        flag: &'static str,
                        path: &Path|
         -> Result<()> {
            if path.is_dir() {
                return Err(input_error(
                    flag,
                    format!("{} is a folder, not a file", path.display()),
                ));
            }
            if !path.is_file() {
                return Err(input_error(
                    flag,
                    format!("file does not exist: {}", path.display()),
                ));
            }
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.insert(name, path.to_path_buf());
            Ok(())
        };
        if let Some(p) = &self.model_file {
            add_flat(&mut files, "--model-file", p)?;
        }
        if let Some(p) = &self.serialized_file {
            add_flat(&mut files, "--serialized-file", p)?;
        }
        let handler_kind = self.handler_kind();
        let mut manifest_files = Vec::new();
        let mut label_file = None;
        match handler_kind {
            HandlerKind::Builtin if !self.served_builtin() => warnings.push(format!(
                "handler {} is built into TorchServe, and tchserve has no handler of that name: \
                 the archive works in TorchServe only. To serve it with tchserve, use one of \
                 tchserve's built-in handlers ({}) or a handler manifest (.json); see \
                 docs/handlers.md.",
                self.handler,
                builtin_names().join(", ")
            )),
            HandlerKind::Builtin => {}
            HandlerKind::Manifest => {
                let path = Path::new(&self.handler);
                (label_file, manifest_files) =
                    manifest_needs("--handler", path, base_name(&self.handler))?;
                add_flat(&mut files, "--handler", path)?;
            }
            HandlerKind::Code => {
                let path = self.handler_code_path();
                if !Path::new(&path).is_file() && !self.handler.contains(['/', '.', ':']) {
                    if self.runtime == RuntimeType::Lsp {
                        // Under LSP the built-in names are TorchServe's C++ ones.
                        return Err(input_error(
                            "--handler",
                            format!(
                                "with --runtime LSP, --handler is BaseHandler, \
                                 TorchScriptHandler or a compiled handler library, and there \
                                 is no {path}; tchserve's built-in handlers ({}) take the default \
                                 runtime",
                                builtin_names().join(", ")
                            ),
                        ));
                    }
                    // A bare word that is not a file is most likely a built-in's name mistyped.
                    return Err(input_error(
                        "--handler",
                        format!(
                            "{} is not a built-in handler ({}, or TorchServe's base_handler) and \
                             there is no handler file {path}",
                            self.handler,
                            builtin_names().join(", ")
                        ),
                    ));
                }
                add_flat(&mut files, "--handler", Path::new(&path))?;
            }
        }
        if let Some(list) = &self.extra_files {
            // An empty item (`--extra-files ""`, a trailing comma) names nothing, as the real
            // archiver reads it.
            for item in list.split(',').filter(|i| !i.is_empty()) {
                add_extra(item, &mut files, &mut warnings)?;
            }
        }
        // A Python handler's twin manifest, packed among the extra files, is what tchserve
        // serves the archive with: it is checked as a `--handler` manifest would be.
        let twin_manifest = match handler_kind {
            HandlerKind::Code => crate::handler::twin_manifest_name(base_name(&self.handler))
                .filter(|twin| files.contains_key(twin)),
            _ => None,
        };
        if let Some(twin) = &twin_manifest {
            (label_file, manifest_files) = manifest_needs("--extra-files", &files[twin], twin)?;
        }
        if let Some(p) = &self.requirements_file {
            add_flat(&mut files, "--requirements-file", p)?;
        }
        if let Some(p) = &self.config_file {
            add_flat(&mut files, "--config-file", p)?;
            let text = fs::read_to_string(p)
                .map_err(|e| input_error("--config-file", format!("{}: {e}", p.display())))?;
            let config = crate::ModelConfig::parse(&text)
                .map_err(|e| input_error("--config-file", format!("{}: {e}", p.display())))?;
            warnings.extend(
                config
                    .warnings
                    .into_iter()
                    .map(|w| format!("{}: {w}", p.display())),
            );
        }
        // A label file that cannot be read would fail every registration of the archive.
        if let Some((name, path)) = label_file
            .as_deref()
            .and_then(|l| files.get(l).map(|p| (l, p)))
        {
            let text = fs::read_to_string(path)
                .map_err(|e| input_error("--extra-files", format!("{}: {e}", path.display())))?;
            crate::handler::parse_labels(&text).map_err(|why| {
                input_error(
                    "--extra-files",
                    format!(
                        "{} (the handler's label file {name}): {why}",
                        path.display()
                    ),
                )
            })?;
        }
        // A manifest under MAR-INF would be shadowed by the one written last.
        files.remove(MANIFEST_PATH);
        for name in manifest_files
            .iter()
            .filter(|n| !files.contains_key(n.as_str()))
        {
            warnings.push(format!(
                "the handler manifest names {name}, which is not in the archive: add it with \
                 --extra-files (a missing label file means classes are reported by index; a \
                 missing tokenizer fails the registration)"
            ));
        }

        let path_name = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| base_name(&p.to_string_lossy()).to_string())
        };
        let model = ModelInfo {
            model_name: Some(self.model_name.clone()),
            serialized_file: path_name(&self.serialized_file),
            handler: Some(base_name(&self.handler).to_string()),
            model_file: path_name(&self.model_file),
            model_version: Some(self.version.clone()),
            requirements_file: path_name(&self.requirements_file),
            config_file: path_name(&self.config_file),
            description: None,
        };
        Ok(Plan {
            model_name: self.model_name.clone(),
            files,
            manifest: Manifest::new(self.runtime, model),
            output,
            format: self.format,
            force: self.force,
            handler_kind,
            twin_manifest,
            warnings,
        })
    }

    fn handler_kind(&self) -> HandlerKind {
        let h = self.handler.as_str();
        match self.runtime {
            RuntimeType::Lsp if matches!(h, "BaseHandler" | "TorchScriptHandler") => {
                HandlerKind::Builtin
            }
            RuntimeType::Lsp => HandlerKind::Code,
            _ if handler::is_builtin_name(h) => HandlerKind::Builtin,
            _ if h.ends_with(".json") => HandlerKind::Manifest,
            _ => HandlerKind::Code,
        }
    }

    /// Whether a built-in handler name is one tchserve serves (TorchServe has a few more).
    fn served_builtin(&self) -> bool {
        self.runtime != RuntimeType::Lsp && handler::builtin(&self.handler).is_some()
    }

    /// The file a code handler is packed from: `path.py:fn` -> `path.py`; a bare `x` -> `x.py`
    /// (`x.so` for the LSP runtime), as the real archiver does.
    fn handler_code_path(&self) -> String {
        let h = self.handler.as_str();
        let file = h.split_once(':').map_or(h, |(f, _)| f);
        match self.runtime {
            RuntimeType::Lsp => format!("{file}.so"),
            _ if h.contains(".py") => file.to_string(),
            _ => format!("{file}.py"),
        }
    }
}

/// tchserve's built-in handler names.
fn builtin_names() -> Vec<&'static str> {
    handler::BUILTIN_HANDLERS.iter().map(|(n, _)| *n).collect()
}

/// Adds one `--extra-files` item: a file goes to the root; a directory's contents are merged
/// into the root with subdirectories kept, skipping `__MACOSX`, `__pycache__` and hidden folders.
fn add_extra(
    item: &str,
    files: &mut BTreeMap<String, PathBuf>,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let is_pattern =
        item.contains('*') || item.contains('?') || (item.contains('[') && item.contains(']'));
    if !is_pattern && !Path::new(item).exists() {
        return Err(input_error(
            "--extra-files",
            format!("File does not exist: {item}"),
        ));
    }
    let options = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    };
    let matches: Vec<PathBuf> = match glob::glob_with(item.trim(), options) {
        Ok(paths) => paths.filter_map(|p| p.ok()).collect(),
        Err(e) => {
            return Err(input_error(
                "--extra-files",
                format!("bad pattern {item}: {e}"),
            ));
        }
    };
    if is_pattern && matches.is_empty() {
        warnings.push(format!(
            "Given wildcard pattern did not match any file: {item}"
        ));
    }
    for path in matches {
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.insert(name, path);
        } else if path.is_dir() {
            let walker = WalkDir::new(&path)
                .min_depth(1)
                .follow_links(true)
                .sort_by_file_name();
            let walker = walker.into_iter().filter_entry(|e| {
                !(e.file_type().is_dir() && e.depth() >= 1 && {
                    let n = e.file_name().to_string_lossy();
                    n == "__MACOSX" || n == "__pycache__" || n.starts_with('.')
                })
            });
            for entry in walker {
                let entry = entry.map_err(|e| input_error("--extra-files", e.to_string()))?;
                if entry.file_type().is_file() {
                    let rel = entry.path().strip_prefix(&path).unwrap_or(entry.path());
                    let name = rel.to_str().ok_or_else(|| {
                        input_error(
                            "--extra-files",
                            format!("file name is not valid UTF-8: {}", rel.display()),
                        )
                    })?;
                    files.insert(name.to_string(), entry.path().to_path_buf());
                }
            }
        } else {
            return Err(input_error(
                "--extra-files",
                format!("Invalid extra file given {}", path.display()),
            ));
        }
    }
    Ok(())
}

impl Plan {
    /// Total bytes of the files to pack, for progress reporting.
    pub fn total_size(&self) -> u64 {
        self.files
            .values()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Writes the archive; `progress` is called with the number of bytes just packed.
    pub fn write(&self, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let parent = self.output.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).at(parent)?;
        let staging = parent.join(format!(
            ".{}.partial-{}",
            self.model_name,
            std::process::id()
        ));
        let _ = remove_path(&staging);
        let result = match self.format {
            ArchiveFormat::Default | ArchiveFormat::ZipStore => self.write_zip(&staging, progress),
            ArchiveFormat::Tgz => self.write_tgz(&staging, progress),
            ArchiveFormat::NoArchive => self.write_dir(&staging, progress),
        };
        let result = result.and_then(|()| self.commit(&staging));
        if result.is_err() {
            let _ = remove_path(&staging);
        }
        result
    }

    /// Moves the finished staging output into place, replacing an old one only under `force`.
    fn commit(&self, staging: &Path) -> Result<()> {
        if self.output.exists() {
            if !self.force {
                return Err(MarError::OutputExists(self.output.clone()));
            }
            if self.output.is_dir() {
                // A directory cannot be renamed over another: move the old one aside first.
                let old = staging.with_extension("old");
                fs::rename(&self.output, &old).at(&self.output)?;
                fs::rename(staging, &self.output).at(&self.output)?;
                return remove_path(&old).at(old);
            }
        }
        fs::rename(staging, &self.output).at(&self.output)
    }

    fn write_zip(&self, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let file = File::create(dest).at(dest)?;
        let mut zip = zip::ZipWriter::new(BufWriter::new(file));
        let method = if self.format == ArchiveFormat::ZipStore {
            CompressionMethod::Stored
        } else {
            CompressionMethod::Deflated
        };
        let zip_err = |e: zip::result::ZipError| MarError::Io {
            path: dest.to_path_buf(),
            source: io::Error::other(e),
        };
        for (name, src) in &self.files {
            let meta = fs::metadata(src).at(src)?;
            let options = SimpleFileOptions::default()
                .compression_method(method)
                .unix_permissions(entry_mode(&meta))
                .large_file(meta.len() >= u32::MAX as u64);
            zip.start_file(name.as_str(), options).map_err(zip_err)?;
            copy_with_progress(src, &mut zip, progress)?;
        }
        let options = SimpleFileOptions::default()
            .compression_method(method)
            .unix_permissions(0o644);
        zip.start_file(MANIFEST_PATH, options).map_err(zip_err)?;
        zip.write_all(self.manifest.to_json().as_bytes()).at(dest)?;
        let out = zip.finish().map_err(zip_err)?;
        finish_file(out.into_inner().map_err(|e| e.into_error()).at(dest)?, dest)
    }

    fn write_tgz(&self, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        let file = File::create(dest).at(dest)?;
        let gz =
            flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let prefix = &self.model_name;
        for (name, src) in &self.files {
            let meta = fs::metadata(src).at(src)?;
            let mut header = tar::Header::new_gnu();
            header.set_size(meta.len());
            header.set_mode(entry_mode(&meta));
            header.set_mtime(mtime(&meta));
            header.set_entry_type(tar::EntryType::Regular);
            let reader = ProgressReader {
                inner: File::open(src).at(src)?,
                progress: &mut *progress,
            };
            tar.append_data(&mut header, format!("{prefix}/{name}"), reader)
                .at(src)?;
        }
        let manifest = self.manifest.to_json();
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(
            &mut header,
            format!("{prefix}/{MANIFEST_PATH}"),
            manifest.as_bytes(),
        )
        .at(dest)?;
        let gz = tar.into_inner().at(dest)?;
        let out = gz.finish().at(dest)?;
        finish_file(out.into_inner().map_err(|e| e.into_error()).at(dest)?, dest)
    }

    fn write_dir(&self, dest: &Path, progress: &mut dyn FnMut(u64)) -> Result<()> {
        fs::create_dir(dest).at(dest)?;
        for (name, src) in &self.files {
            let target = dest.join(name);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            let mut out = File::create(&target).at(&target)?;
            copy_with_progress(src, &mut out, progress)?;
            let mode = entry_mode(&fs::metadata(src).at(src)?);
            fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .at(&target)?;
            finish_file(out, &target)?;
        }
        let manifest = dest.join(MANIFEST_PATH);
        fs::create_dir_all(dest.join("MAR-INF")).at(dest)?;
        fs::write(&manifest, self.manifest.to_json()).at(manifest)
    }
}

/// An entry's permissions: 0755 when the source has any execute bit (a script, a shared
/// library), else 0644. Keeping the executable bit matters to what runs from the archive;
/// keeping the rest (a private 0600, say) would only make files unreadable to the server's user.
fn entry_mode(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

fn finish_file(file: File, path: &Path) -> Result<()> {
    file.sync_all().at(path)
}

fn mtime(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

fn copy_with_progress(
    src: &Path,
    out: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut reader = ProgressReader {
        inner: File::open(src).at(src)?,
        progress,
    };
    io::copy(&mut reader, out).at(src)?;
    Ok(())
}

struct ProgressReader<'a, R> {
    inner: R,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn remove_path(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
