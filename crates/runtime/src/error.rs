//! Errors of the runtime crate.

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The archive itself is unusable.
    #[error(transparent)]
    Archive(#[from] tchserve_mar::MarError),
    /// The archive's handler cannot run in tchserve.
    #[error("{0}")]
    UnsupportedHandler(String),
    /// The archive has no TorchScript file tchserve can load.
    #[error("{0}")]
    NoModel(String),
    /// libtorch refused the model.
    #[error("loading {file}: {source}")]
    Torch {
        /// The serialized file.
        file: String,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// A `.pt2` package could not be loaded.
    #[error("loading {file}: {message}")]
    Package {
        /// The package file.
        file: String,
        /// Why.
        message: String,
    },
    /// The thread that runs a GPU model's forwards could not be started.
    #[error("starting the forward thread for {file}: {source}")]
    Thread {
        /// The serialized file.
        file: String,
        /// Why the thread did not start.
        source: std::io::Error,
    },
}
