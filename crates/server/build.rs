//! Generates the gRPC services from `proto/`. `protoc` comes from the protoc-bin-vendored crate,
//! so a fresh machine needs nothing installed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC after this.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        // Tensor bytes stay in the buffer they arrived in, instead of a copy per field.
        .bytes(".")
        .compile_protos(
            &[
                "proto/inference_v2.proto",
                "proto/torchserve_inference.proto",
                "proto/torchserve_management.proto",
            ]
            .map(std::path::PathBuf::from),
            &[std::path::PathBuf::from("proto"), include],
        )?;
    Ok(())
}
