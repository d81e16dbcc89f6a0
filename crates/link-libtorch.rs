//! Build script shared by every crate that links libtorch.
//!
//! torch-sys tells the linker where libtorch is but gives the final binaries no
//! run-time path to it, so they would need `LD_LIBRARY_PATH`. An rpath to the
//! same directory lets `tchserve` and the test binaries start on their own.
//! `libtorch_cuda.so` is deliberately not linked: it is opened at run time only
//! where a GPU exists (see `tchserve_runtime::device`).

pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&root).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
