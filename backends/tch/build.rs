//! Pass libtorch's directory (known to crates depending on torch-sys) to this crate's code,
//! so it can load libtorch_cuda at run time where one exists.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-env=NORMFORGE_LIBTORCH_LIB={dir}");
    }
}
