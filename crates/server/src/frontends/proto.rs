//! Code generated from `crates/server/proto/`. The modules mirror the protobuf packages, which
//! the generated code relies on to name messages of other packages.

#![allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]

/// `google.rpc`.
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `inference`: the Open Inference Protocol v2.
pub mod inference {
    tonic::include_proto!("inference");
}

/// `org.pytorch.serve.grpc.*`: TorchServe's APIs.
pub mod org {
    /// `org.pytorch`.
    pub mod pytorch {
        /// `org.pytorch.serve`.
        pub mod serve {
            /// `org.pytorch.serve.grpc`.
            pub mod grpc {
                /// `org.pytorch.serve.grpc.inference`.
                pub mod inference {
                    tonic::include_proto!("org.pytorch.serve.grpc.inference");
                }
                /// `org.pytorch.serve.grpc.management`.
                pub mod management {
                    tonic::include_proto!("org.pytorch.serve.grpc.management");
                }
            }
        }
    }
}
