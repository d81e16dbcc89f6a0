//! TorchServe's APIs: REST on the inference and management listeners, and gRPC.

pub mod grpc;
pub mod inference;
pub mod management;
