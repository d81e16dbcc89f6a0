//! The `.mar` model archive format of TorchServe, as tchserve reads and writes it.
//!
//! - [`Manifest`]: `MAR-INF/MANIFEST.json`, read as TorchServe reads it, written as
//!   torch-model-archiver writes it.
//! - [`ModelConfig`]: the `model-config.yaml` settings.
//! - [`HandlerManifest`]: tchserve's declarative handlers, including the built-in ones.
//! - [`Archive`]: safe reading of zip, tar.gz and directory archives.
//! - [`PackRequest`] and [`Plan`]: writing archives, for `tch-model-archiver`.
//! - [`ModelStore`]: looking archives up in a model store.
//! - [`serving`]: what an archive asks a server to run: its handler and its model file.
//! - [`package`]: the batch sizes and token lengths a `.pt2` package takes, read from it.
//!
//! Nothing here links libtorch, so this crate builds and tests in seconds.

pub mod archive;
mod error;
pub mod handler;
pub mod manifest;
pub mod model_config;
pub mod pack;
pub mod package;
pub mod serving;
pub mod store;

pub use archive::{Archive, Entry, Layout, Limits};
pub use error::{MarError, Result};
pub use handler::HandlerManifest;
pub use manifest::{Manifest, ModelInfo, RuntimeType};
pub use model_config::ModelConfig;
pub use pack::{ArchiveFormat, HandlerKind, PackRequest, Plan};
pub use store::{ModelRef, ModelStore};
