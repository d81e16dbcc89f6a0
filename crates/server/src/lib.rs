//! The tchserve server: a protocol-neutral [`core`] (registry, settings, inference) behind thin
//! [`frontends`] (TorchServe's REST APIs, KServe v1, the Open Inference Protocol v2), served on
//! the listeners of [`listener`]. Models run in a [`tchserve_backend::Backend`] given to
//! [`run`]; this crate never touches libtorch.

pub mod auth;
pub mod config;
pub mod core;
pub mod frontends;
pub mod listener;
pub mod metrics;
pub mod scratch;
pub mod server;
pub mod snapshot;
pub mod telemetry;
pub mod tls;

pub use crate::core::ApiError;
pub use config::{Address, Config, ConfigError};
pub use server::{Options, ServerError, Stopped, run};
