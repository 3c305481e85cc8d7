//! normforge on CubeCL: update rules compiled into fused kernels, each launched once over
//! every parameter tensor (their elements back to back: horizontal fusion), per-tensor
//! reductions (LAMB's trust ratio) as phases of partial reduce, combine, apply.
//!
//! What exists: update rules whose values vary per element or per tensor, on any CubeCL
//! runtime, checked on lavapipe against the reference backend; their CUDA C++ and WGSL.
//! Not yet: per-axis reductions (AdamP's per-channel projection), layers, other dtypes — see
//! ARCHITECTURE.md.

mod compile;
pub mod emit;
pub mod kernel;
mod optimizer;
mod unfused;

pub use compile::{compile, Compiled};
pub use normforge_dsl::Error;
pub use optimizer::{CubeOptimizer, Flat};

use normforge_dsl::ir::{Entry, Programs};

/// The software Vulkan adapter (lavapipe), for tests and CI.
pub fn cpu_device() -> Result<cubecl::Device, Error> {
    cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::Cpu).map_err(|e| Error(format!("no software Vulkan adapter: {e:?}")))
}

/// The generated source of one of an entry's kernels: `pass` is `step` (or `init`, the state
/// initialiser) for an update rule.
pub fn emit(entry: &Entry, pass: &str, lang: emit::Lang) -> Result<String, Error> {
    let program = match (&entry.programs, pass) {
        (Programs::Optimizer { step }, "step") => step,
        (Programs::Optimizer { .. }, "init") => &entry.init,
        (Programs::Optimizer { .. }, _) => return Err(Error(format!("`{}` is an optimizer: its passes are `step` and `init`, not `{pass}`", entry.name))),
        _ => return Err(Error(format!("`{}`: the CubeCL backend has no layer kernels yet", entry.name))),
    };
    emit::program_source(&compile(entry, program)?, lang)
}
