//! Build script shared by every crate that links libtorch.
//!
//! torch-sys tells the linker where libtorch is but gives the final binaries no
//! run-time path to it, so they would need `LD_LIBRARY_PATH`. An rpath to the
//! same directory lets `tchserve` and the test binaries start on their own.
//! `libtorch_cuda.so` is deliberately not linked: it is opened at run time only
//! where a GPU exists (see `tchserve_runtime::device`).
//!
//! The path is written as DT_RPATH (`--disable-new-dtags`), not DT_RUNPATH: a `.pt2`
//! package's compiled model is opened with `dlopen` and needs `libtorch.so`, and only an
//! RPATH of the executable is searched for the dependencies of a library opened that way.

pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(root) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&root).join("lib");
        println!(
            "cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{}",
            lib.display()
        );
    }
}
