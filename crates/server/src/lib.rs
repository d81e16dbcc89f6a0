//! The tchserve HTTP server: TorchServe's inference, management and metrics APIs over a
//! registry of model versions, each served by a worker pool from `tchserve-runtime`.

pub mod api;
pub mod auth;
pub mod bounds;
pub mod config;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod scratch;
pub mod server;
pub mod snapshot;

pub use config::{Address, Config, ConfigError};
pub use error::ApiError;
pub use server::{Options, ServerError, run};
