//! Pass libtorch's directory (known to crates depending on torch-sys) to this crate's code, so
//! it can load libtorch_cuda at run time where one exists, and build the C++ shim
//! (`cpp/shim.cpp`: custom autograd functions, torch's current CUDA stream) against the
//! same libtorch headers (no CUDA headers needed).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report libtorch's directory (DEP_TCH_LIBTORCH_LIB)")
    };
    println!("cargo:rustc-env=NORMFORGE_LIBTORCH_LIB={lib}");
    let lib = PathBuf::from(lib);
    let root = lib.parent().expect("libtorch's lib directory has a parent");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={}", std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("cpp/shim.cpp");
    build.compile("normforge_tch_shim");
}

