//! The protocol-neutral core every frontend calls: the registry of model versions, their
//! serving settings, readiness, metadata and inference, and the error kinds with their one
//! mapping to HTTP and gRPC status.

pub mod bounds;
pub mod error;
pub mod fetch;
pub mod infer;
pub mod registry;
pub mod settings;
pub mod store_poll;

pub use error::{ApiError, GrpcCode};
pub use infer::{DataType, Infer, ModelMetadata, TensorMeta};
pub use registry::{RegisterParams, Registry};
pub use settings::ServingSettings;
