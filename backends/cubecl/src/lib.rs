//! normforge on CubeCL: update rules compiled into fused kernels, each launched once over
//! every parameter tensor (their elements back to back: horizontal fusion), per-tensor
//! reductions (LAMB's trust ratio) as phases of partial reduce, combine, apply.
//!
//! Layers (`CubeLayer`) run as a few layer kernels, each a sequence of phases over the same
//! target elements — reductions (a cube per reduced value for long ones, a unit for short
//! ones) and the outputs computed from them; extents are run-time data, so one compiled
//! kernel serves every input shape.
//!
//! Checked on lavapipe against the reference backend: every std layer (forward, backward, f32,
//! f16 and bf16 storage — bf16 held in f32 words there, as WGSL has no bf16: `Held`) and every
//! update rule (those with per-axis reductions or matrix products, AdamP's per-channel
//! projection or Muon's Gram matrices, a stack of same-shaped tensors at a time).

mod compile;
mod dtype;
pub mod emit;
pub mod kernel;
mod layer;
mod optimizer;
mod plan;
mod stack;
mod unfused;

pub use compile::{compile, compile_for, Compiled};
pub use dtype::{Dtype, Held, Precision};
pub use normforge_dsl::Error;
pub use layer::{CubeLayer, Gradients};
pub use optimizer::{CubeOptimizer, Flat};
pub use plan::{indexable, keeping, launched, layout, plan, vectorized, Across, Fold, Launch, Layout, Plan, Source, COOPERATIVE_MIN, KEEP_FROM, MAX_KEPT, MAX_UNROLL, MIN_UNITS, REGISTERS_PER_CUBE, WGSL_LANES};
pub use stack::{stacks, Stacked};

use normforge_dsl::ir::{Entry, Programs};

/// The software Vulkan adapter (lavapipe), for tests and CI.
pub fn cpu_device() -> Result<cubecl::Device, Error> {
    cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::Cpu).map_err(|e| Error(format!("no software Vulkan adapter: {e:?}")))
}

/// The generated source of an entry's kernels for one pass: `step` (or `init`, the state
/// initialiser) for an update rule; `forward`, `backward` (training mode), `forward-eval`,
/// `backward-eval` or `init` for a layer. `dtype` is the storage type of a rule's parameters,
/// their gradients and its state (torch keeps a state in its parameter's dtype; a rule through
/// layer kernels keeps its states in their f32 work arena), or of a layer's input, output and
/// their gradients. All kernels in one text, as `normforge emit`
/// shows them; [`emit_units`] gives each as a translation unit of its own.
pub fn emit(entry: &Entry, pass: &str, dtype: Dtype, lang: emit::Lang) -> Result<String, Error> {
    Ok(emit::joined(&emit_units(entry, pass, dtype, lang)?))
}

/// Every kernel of a pass, in launch order, each a whole translation unit (what a compiler such
/// as NVRTC takes, one module per kernel).
pub fn emit_units(entry: &Entry, pass: &str, dtype: Dtype, lang: emit::Lang) -> Result<Vec<emit::Unit>, Error> {
    match (&entry.programs, pass) {
        // Rules with per-axis reductions run through layer kernels, a stack at a time.
        (Programs::Optimizer { step }, "step") => match compile_for(entry, step, dtype) {
            Ok(c) => emit::program_units(&c, Precision::uniform(dtype), lang),
            Err(e) => emit::plan_units(&Stacked::new(entry, step).map_err(|_| e)?.step, dtype, lang),
        },
        (Programs::Optimizer { .. }, "init") => emit::program_units(&compile(entry, &entry.init)?, Precision::uniform(dtype), lang),
        (Programs::Optimizer { .. }, _) => Err(Error(format!("`{}` is an optimizer: its passes are `step` and `init`, not `{pass}`", entry.name))),
        (Programs::Layer { train, eval, train_backward, eval_backward }, _) => {
            let program = match pass {
                "forward" => train,
                "backward" => train_backward,
                "forward-eval" => eval,
                "backward-eval" => eval_backward,
                "init" => &entry.init,
                _ => {
                    return Err(Error(format!(
                        "`{}` is a {}: its passes are `forward`, `backward`, `forward-eval`, `backward-eval` and `init`, not `{pass}`",
                        entry.name,
                        entry.kind.keyword()
                    )))
                }
            };
            emit::plan_units(&plan(entry, program)?, dtype, lang)
        }
    }
}
