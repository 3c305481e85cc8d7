//! Give the CLI, tests and examples an rpath to libtorch, which tch's own build does not pass
//! on to dependents (torch-sys reports the directory only to crates that depend on it).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
