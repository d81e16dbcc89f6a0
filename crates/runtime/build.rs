//! Links libtorch with an rpath (see `crates/link-libtorch.rs`) and compiles the operators that
//! torchvision's scripted models need (`csrc/vision_ops.cpp`) and the C interface to `.pt2`
//! packages (`csrc/aoti.cpp`), and pinned host memory for GPU uploads (`csrc/host.cpp`).

#[path = "../link-libtorch.rs"]
mod link_libtorch;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=csrc/vision_ops.cpp");
    println!("cargo:rerun-if-changed=csrc/aoti.cpp");
    println!("cargo:rerun-if-changed=csrc/host.cpp");
    let Ok(root) = std::env::var("LIBTORCH") else {
        return;
    };
    let include = std::path::Path::new(&root).join("include");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/vision_ops.cpp")
        .file("csrc/aoti.cpp")
        .file("csrc/host.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        // libtorch's headers would add tens of MB of debug information to every binary.
        .debug(false)
        .compile("tchserve_vision_ops");
}
