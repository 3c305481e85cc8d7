//! normforge on CubeCL: update rules compiled into one fused kernel per step, launched once
//! over every parameter tensor (their elements back to back: horizontal fusion).
//!
//! What exists: elementwise update rules (sgd, adam, adamw, lion, …) on any CubeCL runtime,
//! checked on lavapipe against the reference backend. Not yet: per-tensor reductions (LAMB,
//! AdamP), layers, other dtypes, emitted-source snapshots — see ARCHITECTURE.md.

pub mod emit;
pub mod kernel;
mod unfused;

use cubecl::prelude::*;
use kernel::{step_kernel, BOp, KOp, KProgram, UOp};
use normforge_dsl::ir::{Binary, Entry, Extent, Kind as EntryKind, Op, Program, Programs, Target, Unary};
use std::sync::Arc;

pub use normforge_dsl::Error;

/// An update rule split in two: the values that are the same for every element (functions
/// of hyper-parameters and the step count, like `1 - beta1^t`) are computed once per launch
/// on the host in f64, as PyTorch computes them in Python; the rest is the kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub kernel: KProgram,
    program: Program,
    uniform: Vec<bool>,
    /// The uniform nodes the kernel reads, in the order of its scalar buffer.
    exported: Vec<u32>,
}

impl Compiled {
    /// The kernel's scalar buffer for these hyper-parameters and step count.
    pub fn scalars(&self, hparams: &[f64], t: f64) -> Vec<f32> {
        let mut val = vec![0f64; self.program.nodes.len()];
        for (i, n) in self.program.nodes.iter().enumerate() {
            if !self.uniform[i] {
                continue;
            }
            let v = |id: &u32| val[*id as usize];
            val[i] = match &n.op {
                Op::Const(c) => *c,
                Op::HParam(h) => hparams[*h as usize],
                Op::Step => t,
                Op::Unary(u, a) => u.apply(v(a)),
                Op::Binary(b, x, y) => b.apply(v(x), v(y)),
                Op::Select(c, x, y) => if v(c) != 0.0 { v(x) } else { v(y) },
                Op::Expand(a) => v(a),
                _ => unreachable!("only these ops are uniform"),
            };
        }
        self.exported.iter().map(|&i| val[i as usize] as f32).collect()
    }
}

/// Compile an elementwise program (an optimizer step or state initialiser).
pub fn compile(entry: &Entry, p: &Program) -> Result<Compiled, Error> {
    let unsupported = |what: &str| {
        Error(format!("`{}`: {what} is not supported by the CubeCL backend yet (elementwise update rules only)", entry.name))
    };
    let mut uniform = vec![false; p.nodes.len()];
    for (i, n) in p.nodes.iter().enumerate() {
        uniform[i] = match &n.op {
            Op::Const(_) | Op::HParam(_) | Op::Step => true,
            Op::Unary(..) | Op::Binary(..) | Op::Select(..) | Op::Expand(_) => n.op.args().iter().all(|a| uniform[*a as usize]),
            _ => false,
        };
    }
    let mut ops = Vec::new();
    let mut exported = Vec::new();
    // Register of each node once the kernel has it.
    let mut reg: Vec<Option<usize>> = vec![None; p.nodes.len()];
    let mut fetch = |id: u32, ops: &mut Vec<KOp>, reg: &mut Vec<Option<usize>>| -> usize {
        if let Some(r) = reg[id as usize] {
            return r;
        }
        // A uniform value the kernel needs: one more entry of the scalar buffer.
        exported.push(id);
        ops.push(KOp::Scalar(exported.len() - 1));
        reg[id as usize] = Some(ops.len() - 1);
        ops.len() - 1
    };
    for (i, n) in p.nodes.iter().enumerate() {
        if uniform[i] {
            continue;
        }
        let full = n.shape.0.iter().all(|e| *e == Extent::Full);
        if !full {
            return Err(unsupported("a per-axis reduction"));
        }
        let op = match &n.op {
            Op::Input => KOp::LoadP,
            Op::Grad => KOp::LoadG,
            Op::State(k) => KOp::LoadState(*k as usize),
            Op::Expand(a) => {
                // Broadcasting a scalar to every element is free: each thread reads it.
                let r = fetch(*a, &mut ops, &mut reg);
                reg[i] = Some(r);
                continue;
            }
            Op::Unary(u, a) => KOp::Unary(unary(*u), fetch(*a, &mut ops, &mut reg)),
            Op::Binary(b, x, y) => {
                let (x, y) = (fetch(*x, &mut ops, &mut reg), fetch(*y, &mut ops, &mut reg));
                KOp::Binary(binary(*b), x, y)
            }
            Op::Select(c, x, y) => {
                let (c, x, y) = (fetch(*c, &mut ops, &mut reg), fetch(*x, &mut ops, &mut reg), fetch(*y, &mut ops, &mut reg));
                KOp::Select(c, x, y)
            }
            Op::Reduce(..) | Op::Size(_) | Op::Rank(_) => return Err(unsupported("a per-tensor reduction")),
            Op::Param(_) | Op::Buffer(_) | Op::GradOutput => return Err(unsupported("a layer program")),
            Op::Const(_) | Op::HParam(_) | Op::Step => unreachable!("uniform"),
        };
        ops.push(op);
        reg[i] = Some(ops.len() - 1);
    }
    for o in &p.outputs {
        let v = fetch(o.node, &mut ops, &mut reg);
        ops.push(match o.target {
            Target::P => KOp::StoreP(v),
            Target::State(k) => KOp::StoreState(k as usize, v),
            _ => return Err(unsupported("this output")),
        });
    }
    Ok(Compiled { kernel: KProgram { ops }, program: p.clone(), uniform, exported })
}

fn unary(u: Unary) -> UOp {
    match u {
        Unary::Neg => UOp::Neg,
        Unary::Not => UOp::Not,
        Unary::Sqrt => UOp::Sqrt,
        Unary::Rsqrt => UOp::Rsqrt,
        Unary::Exp => UOp::Exp,
        Unary::Log => UOp::Log,
        Unary::Tanh => UOp::Tanh,
        Unary::Sigmoid => UOp::Sigmoid,
        Unary::Sign => UOp::Sign,
        Unary::Abs => UOp::Abs,
        Unary::Relu => UOp::Relu,
        Unary::Softplus => UOp::Softplus,
        Unary::Recip => UOp::Recip,
    }
}

fn binary(b: Binary) -> BOp {
    match b {
        Binary::Add => BOp::Add,
        Binary::Sub => BOp::Sub,
        Binary::Mul => BOp::Mul,
        Binary::Div => BOp::Div,
        Binary::Pow => BOp::Pow,
        Binary::Min => BOp::Min,
        Binary::Max => BOp::Max,
        Binary::Lt => BOp::Lt,
        Binary::Le => BOp::Le,
        Binary::Gt => BOp::Gt,
        Binary::Ge => BOp::Ge,
        Binary::Eq => BOp::Eq,
        Binary::Ne => BOp::Ne,
        Binary::And => BOp::And,
        Binary::Or => BOp::Or,
    }
}

/// The software Vulkan adapter (lavapipe), for tests and CI.
pub fn cpu_device() -> Result<cubecl::Device, Error> {
    cubecl::Device::wgpu(cubecl::device::WgpuDeviceKind::Cpu).map_err(|e| Error(format!("no software Vulkan adapter: {e:?}")))
}

const BLOCK: usize = 256;

/// The generated source of one of an entry's kernels: `pass` is `step` (or `init`, the state
/// initialiser) for an update rule.
pub fn emit(entry: &Entry, pass: &str, lang: emit::Lang) -> Result<String, Error> {
    let program = match (&entry.programs, pass) {
        (Programs::Optimizer { step }, "step") => step,
        (Programs::Optimizer { .. }, "init") => &entry.init,
        (Programs::Optimizer { .. }, _) => return Err(Error(format!("`{}` is an optimizer: its passes are `step` and `init`, not `{pass}`", entry.name))),
        _ => return Err(Error(format!("`{}`: the CubeCL backend has no layer kernels yet", entry.name))),
    };
    emit::kernel_source(&compile(entry, program)?.kernel, lang)
}

/// Parameters and gradients of one launch, on the device, back to back.
pub struct Flat {
    p: cubecl::server::Handle,
    g: cubecl::server::Handle,
    sizes: Vec<usize>,
    n: usize,
}

impl Flat {
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

/// An elementwise update rule as one fused multi-tensor kernel (or, for comparison, as one
/// kernel per operation: [`CubeOptimizer::unfused`]).
pub struct CubeOptimizer {
    entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    step_prog: Compiled,
    /// What one step launches, in order, and the extra state slots they need.
    kernels: Vec<KProgram>,
    temps: usize,
    init_prog: Compiled,
    client: cubecl::client::Client,
    /// The state tensors, on the device, for the parameter layout of the first step.
    state: Option<(cubecl::server::Handle, Vec<usize>)>,
    step: u64,
}

impl CubeOptimizer {
    pub fn new(entry: Arc<Entry>, overrides: &[(String, f64)], device: &cubecl::Device) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!("checked above") };
        let step_prog = compile(&entry, step)?;
        let init_prog = compile(&entry, &entry.init)?;
        let kernels = vec![step_prog.kernel.clone()];
        Ok(CubeOptimizer { entry, hparams, step_prog, kernels, temps: 0, init_prog, client: device.client(), state: None, step: 0 })
    }

    /// The same rule launched one kernel per operation, intermediates through memory: the
    /// baseline that shows what fusion buys.
    pub fn unfused(entry: Arc<Entry>, overrides: &[(String, f64)], device: &cubecl::Device) -> Result<Self, Error> {
        let mut opt = Self::new(entry, overrides, device)?;
        (opt.kernels, opt.temps) = unfused::split(&opt.step_prog.kernel, opt.entry.states.len());
        Ok(opt)
    }

    /// Kernel launches per step.
    pub fn launches_per_step(&self) -> usize {
        self.kernels.len()
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        let i = self.entry.hparams.iter().position(|h| h.name == name).ok_or_else(|| Error(format!("no hyper-parameter `{name}`")))?;
        self.hparams[i] = normforge_dsl::hyper::check_value(&self.entry, i, v)?;
        Ok(())
    }

    fn launch(&self, kernel: &KProgram, scalars: &[f32], flat: &Flat, s: &cubecl::server::Handle, slots: usize) {
        let n = flat.n;
        let sc = self.client.create_from_slice(f32::as_bytes(scalars));
        let blocks = n.div_ceil(BLOCK) as u32;
        // SAFETY: every index the kernel touches is below `n` (guarded) or in `s`, which holds
        // `slots * n` values, and the program addresses only its own slots; the buffers are
        // the lengths passed.
        unsafe {
            step_kernel::launch_unchecked(
                &self.client,
                CubeCount::Static(blocks, 1, 1),
                CubeDim::new_1d(BLOCK as u32),
                BufferArg::from_raw_parts(flat.p.clone(), n),
                BufferArg::from_raw_parts(flat.g.clone(), n),
                BufferArg::from_raw_parts(s.clone(), slots * n),
                BufferArg::from_raw_parts(sc, scalars.len()),
                kernel.clone(),
            );
        }
    }

    /// The scalar buffer of a program for the current step; never empty, since a zero-length
    /// binding is not allowed everywhere.
    fn scalars(&self, prog: &Compiled) -> Vec<f32> {
        let mut scalars = prog.scalars(&self.hparams, self.step as f64);
        scalars.push(0.0);
        scalars
    }

    /// Copy parameters and gradients to the device, back to back.
    pub fn upload(&self, params: &[Vec<f32>], grads: &[Vec<f32>]) -> Result<Flat, Error> {
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        if grads.len() != params.len() || grads.iter().zip(&sizes).any(|(g, &n)| g.len() != n) {
            return Err(Error("every parameter needs a gradient of its own size".into()));
        }
        let n: usize = sizes.iter().sum();
        if n.div_ceil(BLOCK) > 65_535 {
            return Err(Error(format!("{n} elements exceed one launch of this backend (16.7M)")));
        }
        let flat_p: Vec<f32> = params.iter().flatten().copied().collect();
        let flat_g: Vec<f32> = grads.iter().flatten().copied().collect();
        let p = self.client.create_from_slice(f32::as_bytes(&flat_p));
        let g = self.client.create_from_slice(f32::as_bytes(&flat_g));
        Ok(Flat { p, g, sizes, n })
    }

    /// The parameters, back from the device, one vector per tensor.
    pub fn download(&self, flat: &Flat) -> Result<Vec<Vec<f32>>, Error> {
        let bytes = self.client.read_one(flat.p.clone()).map_err(|e| Error(format!("reading back the parameters: {e:?}")))?;
        let out = f32::from_bytes(&bytes);
        let mut k = 0;
        Ok(flat
            .sizes
            .iter()
            .map(|&len| {
                k += len;
                out[k - len..k].to_vec()
            })
            .collect())
    }

    /// One step on parameters already on the device; launches only (see [`Self::sync`]).
    pub fn step_flat(&mut self, flat: &Flat) -> Result<(), Error> {
        if flat.n == 0 {
            return Ok(());
        }
        let slots = self.entry.states.len() + self.temps;
        // A binding past the adapter's limit is not an error the launch reports: it just
        // does not run. Refuse it here.
        let limit = self.client.properties().memory.max_page_size;
        if (slots.max(1) * flat.n * 4) as u64 > limit {
            return Err(Error(format!(
                "{} state values of {} tensors exceed this adapter's largest buffer ({limit} bytes)",
                slots * flat.n,
                flat.sizes.len()
            )));
        }
        let fresh = match &self.state {
            Some((_, s)) if *s != flat.sizes => return Err(Error(format!("the parameters changed sizes: {s:?} -> {:?}", flat.sizes))),
            Some(_) => false,
            None => true,
        };
        if fresh {
            let zeros = vec![0f32; slots.max(1) * flat.n];
            let s = self.client.create_from_slice(f32::as_bytes(&zeros));
            self.launch(&self.init_prog.kernel, &self.scalars(&self.init_prog), flat, &s, slots.max(1));
            self.state = Some((s, flat.sizes.clone()));
        }
        self.step += 1;
        let s = self.state.as_ref().map(|(h, _)| h.clone()).expect("state exists");
        let scalars = self.scalars(&self.step_prog);
        for k in &self.kernels {
            self.launch(k, &scalars, flat, &s, slots.max(1));
        }
        Ok(())
    }

    /// Wait for every launch so far.
    pub fn sync(&self) -> Result<(), Error> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| Error(format!("device: {e:?}")))
    }

    /// One step over every tensor, in a single launch, copying to the device and back. The
    /// tensors must keep their sizes from one step to the next (the state is laid out for them).
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>]) -> Result<(), Error> {
        let flat = self.upload(params, grads)?;
        self.step_flat(&flat)?;
        if flat.n > 0 {
            for (t, new) in params.iter_mut().zip(self.download(&flat)?) {
                t.copy_from_slice(&new);
            }
        }
        Ok(())
    }
}
