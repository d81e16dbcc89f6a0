//! The one error type of the archive crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while reading, validating or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum MarError {
    /// A file system operation failed on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory that was being read or written.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file is not a zip, tar.gz or directory archive, or its container is damaged.
    #[error("{}: {reason}", archive.display())]
    Corrupt {
        /// The archive.
        archive: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An entry would land outside the extraction root, or is not a plain file or directory.
    #[error("{}: refusing entry `{entry}`: {reason}", archive.display())]
    UnsafeEntry {
        /// The archive.
        archive: PathBuf,
        /// The entry name as stored (lossily decoded for display).
        entry: String,
        /// Why the entry is refused.
        reason: String,
    },
    /// The archive is larger, has more entries or compresses better than the configured limits allow.
    #[error("{}: {reason}", archive.display())]
    LimitExceeded {
        /// The archive.
        archive: PathBuf,
        /// Which limit was hit, with the numbers.
        reason: String,
    },
    /// `MAR-INF/MANIFEST.json` is missing or malformed.
    #[error("{}: {file}: {reason}", archive.display())]
    Manifest {
        /// The archive.
        archive: PathBuf,
        /// The manifest's path inside the archive.
        file: String,
        /// What is wrong, naming the field.
        reason: String,
    },
    /// A handler manifest does not parse or does not validate.
    #[error("handler manifest {file}: {at}: {reason}")]
    Handler {
        /// The manifest's file name.
        file: String,
        /// Where in the manifest: a stage and field path such as `preprocess[1].center_crop.size`.
        at: String,
        /// What is wrong.
        reason: String,
    },
    /// `model-config.yaml` is not valid YAML or not a mapping.
    #[error("{file}: {reason}")]
    ModelConfig {
        /// The config file's name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// An entry that was asked for is not in the archive.
    #[error("{}: no entry named `{entry}`", archive.display())]
    MissingEntry {
        /// The archive.
        archive: PathBuf,
        /// The entry that was asked for.
        entry: String,
    },
    /// A model name does not match TorchServe's rule.
    #[error(
        "Model name contains special characters.\nThe allowed regular expression filter for model name is: ^[A-Za-z0-9][A-Za-z0-9_\\-.]*$"
    )]
    InvalidModelName(String),
    /// The output of the archiver already exists and overwriting was not asked for.
    #[error(
        "{} already exists.\nPlease specify --force/-f option to overwrite the model archive output file.\nSee -h/--help for more details.",
        .0.display()
    )]
    OutputExists(PathBuf),
    /// An archiver input is missing or unusable; names the flag at fault.
    #[error("{flag}: {reason}")]
    Input {
        /// The command-line flag, such as `--serialized-file`.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A model-store lookup failed.
    #[error("{0}")]
    Store(String),
    /// The archive is well formed but asks for something tchserve cannot serve (a Python
    /// handler, an eager-mode state_dict, a missing model file).
    #[error("{0}")]
    Unservable(String),
}

/// Result alias for this crate.
pub type Result<T, E = MarError> = std::result::Result<T, E>;

/// Attaches a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| MarError::Io {
            path: path.into(),
            source,
        })
    }
}
