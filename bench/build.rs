//! The rpath to libtorch every binary here needs, and a gRPC client for the v2 protocol (for
//! `loadgen --grpc`), from the server's `.proto` file.

#[path = "../crates/link-libtorch.rs"]
mod libtorch;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    libtorch::main();
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC after this.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    println!("cargo:rerun-if-changed=../crates/server/proto/inference_v2.proto");
    tonic_prost_build::configure()
        .build_server(false)
        // Each call sends the same input: a clone of it must not copy the tensor.
        .bytes(".")
        .compile_protos(
            &["../crates/server/proto/inference_v2.proto"],
            &["../crates/server/proto"],
        )?;
    Ok(())
}
