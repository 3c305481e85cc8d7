//! Generated source without a device: the kernels a rule becomes, as CUDA C++ (what NVRTC
//! compiles on a GPU machine) and WGSL, for `normforge emit` and the snapshot tests.
//!
//! CubeCL builds a kernel definition against a device's properties; here they describe a
//! generic CUDA-class device (32-wide warps, 1024 threads per cube, every scalar type), so
//! the text is the same on every machine and needs no driver.

use crate::kernel::{combine_kernel, layer_kernel, step_kernel, KProgram, LProgram, Reach, BLOCK, COMBINE_BLOCK};
use crate::dtype::with_type;
use crate::{Compiled, Dtype, Error, Fold, Plan, Precision};
use cubecl::ir::{DeviceIdentity, DeviceProperties, HardwareProperties, MemoryDeviceProperties, TargetProperties};
use cubecl::prelude::*;
use cubecl::Compiler;
use cubecl::profile::TimingMethod;
use std::sync::Arc;

/// A language the generated kernels can be printed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Cuda,
    Wgsl,
}

impl std::str::FromStr for Lang {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cuda" => Ok(Lang::Cuda),
            "wgsl" => Ok(Lang::Wgsl),
            _ => Err(Error(format!("unknown target `{s}`: expected `cuda` or `wgsl`"))),
        }
    }
}

fn properties() -> DeviceProperties {
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: 1024,
        max_shared_memory_size: 48 * 1024,
        max_cube_count: (u32::MAX, 65_535, 65_535),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: None,
        num_cpu_cores: None,
        last_level_cache_size: None,
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        max_vector_size: 4,
        cube_mma_reserved_shared_memory: 0,
    };
    let identity = DeviceIdentity { name: "normforge emit".into(), fingerprint: "emit".into(), physical: None };
    let mut props = DeviceProperties::new(Default::default(), MemoryDeviceProperties::new(1 << 30, 32), hardware, TimingMethod::System, identity);
    cubecl_cpp::register_supported_types(&mut props);
    props
}

/// A buffer argument that is never bound: a definition needs one per parameter.
fn unbound(len: usize) -> BufferArg {
    let service = cubecl_common::device::ServiceId::of::<()>(cubecl::device::DeviceId::new(0, 0));
    let stream = cubecl_environment::stream::StreamId { value: 0 };
    let handle = cubecl::server::Handle::new(service, stream, (len * 4) as u64);
    // SAFETY: the argument only shapes the definition; nothing is launched with it.
    unsafe { BufferArg::from_raw_parts(handle, len) }
}

/// A kernel's generated text and the dynamic shared memory (bytes) a launch must give it: the
/// CUDA code declares its shared arrays `extern __shared__`, sized at launch.
pub struct Source {
    pub text: String,
    pub shared_bytes: usize,
}

fn source_of(kernel: &impl cubecl::CubeKernel, lang: Lang) -> Result<Source, Error> {
    let def = cubecl::define_kernel(kernel).map_err(|e| Error(format!("defining the kernel: {e:?}")))?;
    let out = match lang {
        Lang::Cuda => {
            let mut c = cubecl_cpp::shared::CppCompiler::<cubecl_cpp::target::Cuda>::default();
            c.compile(def, &Default::default()).map(|k| Source { shared_bytes: k.shared_memory_size, text: k.source })
        }
        Lang::Wgsl => cubecl::wgpu::WgslCompiler.compile(def, &Default::default()).map(|k| Source { text: k.to_string(), shared_bytes: 0 }),
    };
    out.map_err(|e| Error(format!("generating {lang:?}: {e:?}")))
}

fn step_source<P: Float, S: Float>(props: &Arc<DeviceProperties>, phase: &KProgram, lang: Lang) -> Result<Source, Error> {
    let b = || unbound(1);
    let kernel = step_kernel::create_dummy_kernel::<P, S>(
        props.clone(),
        Arc::new(TargetProperties::default()),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(BLOCK as u32),
        phase.lanes,
        b(),
        b(),
        b(),
        b(),
        b(),
        b(),
        b(),
        phase.clone(),
        false,
        false,
    );
    source_of(&kernel, lang)
}

fn layer_source<F: Float>(props: &Arc<DeviceProperties>, prog: &LProgram, lang: Lang) -> Result<Source, Error> {
    let b = || unbound(1);
    let kernel = layer_kernel::create_dummy_kernel::<F>(
        props.clone(),
        Arc::new(TargetProperties::default()),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(prog.units as u32),
        prog.vector.max(1),
        b(),
        b(),
        b(),
        b(),
        b(),
        b(),
        prog.clone(),
        false,
    );
    source_of(&kernel, lang)
}

/// One kernel's source: a whole translation unit (its own preamble), the comment that
/// introduces it when units are shown together, and the dynamic shared memory it needs.
pub struct Unit {
    pub comment: String,
    pub source: String,
    pub shared_bytes: usize,
}

impl Unit {
    fn new(comment: String, s: Source) -> Unit {
        Unit { comment, source: s.text, shared_bytes: s.shared_bytes }
    }
}

/// Units shown as one text, each under its comment, as `normforge emit` prints them.
pub fn joined(units: &[Unit]) -> String {
    let mut out = String::new();
    for u in units {
        out.push_str(&u.comment);
        out.push_str(&u.source);
        out.push('\n');
    }
    out
}

/// Every kernel a program launches, in launch order: its phases, each followed by the combine
/// of its reductions, for parameters and states stored as `types` says.
pub fn program_units(prog: &Compiled, types: Precision, lang: Lang) -> Result<Vec<Unit>, Error> {
    let props = Arc::new(properties());
    let target = Arc::new(TargetProperties::default());
    let count = prog.phases.len();
    let mut units = Vec::new();
    for (k, phase) in prog.phases.iter().enumerate() {
        let comment = if count > 1 { format!("// phase {} of {count}\n", k + 1) } else { String::new() };
        let source = with_type!(types.param, P => with_type!(types.state, S => step_source::<P, S>(&props, phase, lang)?));
        units.push(Unit::new(comment, source));
        if phase.accums.is_empty() {
            continue;
        }
        let kernel = combine_kernel::create_dummy_kernel(
            props.clone(),
            target.clone(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(COMBINE_BLOCK),
            unbound(1),
            unbound(1),
            unbound(1),
            phase.accums.clone(),
            phase.slots.max(1),
        );
        units.push(Unit::new(format!("// combine of phase {}'s reductions\n", k + 1), source_of(&kernel, lang)?));
    }
    Ok(units)
}

/// Every kernel of a layer program, in launch order, under a comment saying what each computes.
/// `io` is the storage type of the input, output and their gradients.
pub fn plan_units(plan: &Plan, io: Dtype, lang: Lang) -> Result<Vec<Unit>, Error> {
    let props = Arc::new(properties());
    let mut units = Vec::new();
    let describe = |prog: &LProgram| -> String {
        let what: Vec<String> = prog
            .phases
            .iter()
            .map(|p| {
                let mut parts: Vec<String> = p.reduces.iter().map(|(op, _, _)| format!("{op:?}")).collect();
                if !parts.is_empty() {
                    let reach = match p.reach {
                        Reach::Element => "",
                        Reach::Across => " across rows",
                        Reach::Finer(_) => " per finer element",
                    };
                    let plural = if parts.len() > 1 { "s" } else { "" };
                    parts = vec![format!("{} reduction{plural}{reach}", parts.join(" + "))];
                }
                if !p.stores.is_empty() {
                    parts.push(format!("elementwise, {} output(s)", p.stores.len()));
                }
                parts.join(" and ")
            })
            .collect();
        what.join(", then ")
    };
    for (k, prog) in plan.kernels.iter().enumerate() {
        units.push(Unit::new(format!("// kernel {} of {}: {}\n", k + 1, plan.kernels.len(), describe(prog)), layer_kernel_source(&props, prog, io, lang)?));
    }
    // What runs instead for rows that fit: shown as launched for rows of 4096 values.
    if let Some(a) = &plan.across {
        for (k, prog) in a.kernels.iter().enumerate() {
            let prog = if k == a.row { a.row_kernel(4096) } else { prog.clone() };
            let rows = if matches!(a.how, Fold::Registers { .. }) { " (rows of 4096)" } else { "" };
            let head = format!("// with column sums inside the row kernel{rows}: kernel {} of {}: {}\n", k + 1, a.kernels.len(), describe(&prog));
            units.push(Unit::new(head, layer_kernel_source(&props, &prog, io, lang)?));
        }
    }
    Ok(units)
}

/// One layer kernel as a translation unit (a launched variant: see `plan::launched`).
pub fn layer_unit(prog: &LProgram, io: Dtype, lang: Lang) -> Result<Unit, Error> {
    Ok(Unit::new(String::new(), layer_kernel_source(&Arc::new(properties()), prog, io, lang)?))
}

fn layer_kernel_source(props: &Arc<DeviceProperties>, prog: &LProgram, io: Dtype, lang: Lang) -> Result<Source, Error> {
    with_type!(io, F => layer_source::<F>(props, prog, lang))
}
