//! normforge: normalization layers and optimizer update rules written in a small DSL,
//! checked, differentiated and run by pluggable backends.
//!
//! This facade re-exports the crates a user needs and wires the standard library in.
//! See ARCHITECTURE.md for where things live.

/// The CubeCL backend: fused kernels on any CubeCL runtime, and their generated source.
pub use normforge_cubecl as cubecl;
/// The CUDA fast path: our kernels on tch's CUDA tensors (`cuda::fused_layer`,
/// `cuda::FusedOptimizer`; NVRTC and the driver loaded at run time).
pub use normforge_cuda as cuda;
pub use normforge_dsl as dsl;
pub use normforge_reference as reference;
pub use normforge_registry as registry;
/// The libtorch backend: DSL layers as tch modules, DSL optimizers over a VarStore.
pub use normforge_tch as torch;
pub use normforge_tch::RegistryExt;
pub use tch;

pub use normforge_dsl::{Diagnostic, Diagnostics, Entry};
pub use normforge_registry::Registry;

/// A registry with the standard library (and any other linked static plugins) loaded.
pub fn builtin_registry() -> Result<Registry, registry::Error> {
    normforge_std::link();
    Registry::with_builtins()
}

/// The standard library's spec files (name, text), for tools and tests.
pub fn std_sources() -> Vec<(&'static str, &'static str)> {
    normforge_std::link();
    registry::static_sources().into_iter().filter(|s| s.origin.starts_with("std/")).map(|s| (s.origin, s.text)).collect()
}
