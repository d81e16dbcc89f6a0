//! The libtorch side of tchserve: devices, model loading and handler execution.

pub mod device;
mod error;
pub mod model;

pub use device::{CudaStatus, DevicePolicy};
pub use error::RuntimeError;
