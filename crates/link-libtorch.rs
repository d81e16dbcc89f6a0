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
//!
//! The wheel's `libtorch.so` is only a front for `libtorch_cpu.so` and `libtorch_cuda.so`, so
//! opening it would load libtorch's CUDA half and the CUDA libraries (about 275 MB of RSS) on a
//! machine without a GPU. The first rpath entry is therefore a folder holding a front of the
//! same name for `libtorch_cpu.so` alone, made here; a CUDA package still finds libtorch's
//! CUDA symbols, which `tchserve_runtime::device` opens globally on a GPU machine. Without a C
//! compiler the folder stays empty and the wheel's own front is used.

pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CC");
    let Ok(root) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = std::path::Path::new(&root).join("lib");
    let mut rpath = lib.display().to_string();
    if let Some(front) = cpu_front(&lib) {
        rpath = format!("{}:{rpath}", front.display());
    }
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{rpath}");
}

/// Makes `libtorch.so`, a front for `libtorch_cpu.so` alone, in a folder of its own.
fn cpu_front(lib: &std::path::Path) -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(std::env::var_os("OUT_DIR")?).join("torch-cpu-front");
    std::fs::create_dir_all(&dir).ok()?;
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let made = std::process::Command::new(&compiler)
        .args(["-shared", "-x", "c", "/dev/null", "-o"])
        .arg(dir.join("libtorch.so"))
        .args(["-Wl,-soname,libtorch.so", "-Wl,--no-as-needed"])
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-l:libtorch_cpu.so", "-l:libc10.so"])
        .output();
    let why = match made {
        Ok(out) if out.status.success() => return Some(dir),
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .trim()
            .replace('\n', "; "),
        Err(e) => format!("{compiler}: {e}"),
    };
    println!(
        "cargo:warning=the libtorch_cpu front for .pt2 packages was not made, so they will load \
         libtorch's CUDA half too: {why}"
    );
    None
}
