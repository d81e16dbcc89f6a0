//! The libtorch side of tchserve: devices, model loading, handler stages, batching and worker
//! pools. Model code runs only on the worker threads of [`pool::Pool`]; callers hand it
//! [`job::Job`]s and await each job's reply channel.

pub mod aoti;
pub mod batch;
pub mod device;
mod error;
mod forward_thread;
pub mod handler;
mod heap;
pub mod model;
mod openmp;
pub mod pool;
mod shared;
mod torch_backend;
mod worker;

pub use device::{CudaStatus, DevicePolicy};
pub use error::RuntimeError;
pub use shared::{BusyGuard, ThreadBudget};
pub use tchserve_backend::{ModelSpec, Placement, job};
pub use torch_backend::TorchBackend;
pub use worker::{Tried, check as check_model, worker_threads_running};
