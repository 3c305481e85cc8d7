//! An update rule over many tensors at once: every tensor of a step in one launch per phase
//! (horizontal fusion, as PyTorch's fused AdamW), the tensors back to back on the device, each
//! padded to whole cubes so a cube never straddles two.

use crate::compile::{compile, compile_for, Compiled};
use crate::kernel::{combine_kernel, padded_layout, step_kernel, KProgram, StepLayout, StepSizes, BLOCK, COMBINE_BLOCK};
use crate::plan::{layout, run, Launch, Source};
use crate::stack::{stacks, Stacked};
use crate::dtype::with_type;
use crate::{unfused, Dtype, Error, Held};
use normforge_dsl::bind;
use cubecl::prelude::*;
use cubecl::server::Handle;
use normforge_dsl::ir::{Entry, Kind as EntryKind, Programs, Target};
use std::sync::Arc;

/// CubeCL launches one-dimensional grids of at most this many cubes here.
const MAX_CUBES: usize = 65_535;

/// Parameters and gradients of one step, on the device, in the padded layout.
pub struct Flat {
    p: Handle,
    g: Handle,
    /// Per cube: its tensor's index, first element and length.
    blocks: Handle,
    /// Per tensor: its first cube and how many it has.
    ranges: Handle,
    sizes: Vec<usize>,
    shapes: Vec<Vec<usize>>,
    cubes: usize,
    /// How `p` and `g` hold their values.
    held: Held,
}

impl Flat {
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
    /// Elements in the padded layout.
    fn len(&self) -> usize {
        self.cubes * BLOCK
    }
}

/// The device buffers a rule keeps between steps, for one parameter layout.
struct State {
    sizes: Vec<usize>,
    s: Handle,
    partial: Handle,
}

/// Rules with per-axis reductions (AdamP's per-channel projection) or matrix products run
/// through layer kernels, a stack of same-shaped tensors at a time (`stack`).
struct PerTensor {
    plans: Stacked,
    /// Per tensor, per state.
    states: Vec<Vec<Vec<f32>>>,
}

/// An update rule on a CubeCL device.
pub struct CubeOptimizer {
    per_tensor: Option<PerTensor>,
    entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    step_prog: Compiled,
    /// What one step launches: the rule's phases, or (the baseline) one kernel per operation.
    kernels: Vec<KProgram>,
    /// Extra state slots the baseline keeps its intermediates in.
    temps: usize,
    init_prog: Compiled,
    /// Both programs reading the gradients scaled ([`Compiled::grad_scaled`]), made at the first
    /// step that scales them.
    scaled: Option<(Compiled, Compiled)>,
    client: cubecl::client::Client,
    /// For the per-axis rules' layer kernels.
    launch: Launch,
    state: Option<State>,
    /// What the state is stored in on the device.
    state_dtype: Dtype,
    /// How the device keeps it.
    state_held: Held,
    /// What the parameters and their gradients are stored in, and how the device keeps them.
    param_dtype: Dtype,
    param_held: Held,
    step: u64,
}

impl CubeOptimizer {
    pub fn new(entry: Arc<Entry>, overrides: &[(String, f64)], device: &cubecl::Device) -> Result<Self, Error> {
        if entry.kind != EntryKind::Optimizer {
            return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Optimizer { step } = &entry.programs else { unreachable!("checked above") };
        let init_prog = compile(&entry, &entry.init)?;
        let (step_prog, per_tensor) = match compile(&entry, step) {
            Ok(c) => (c, None),
            Err(e) => match Stacked::new(&entry, step) {
                Ok(plans) => (init_prog.clone(), Some(PerTensor { plans, states: Vec::new() })),
                _ => return Err(e),
            },
        };
        let kernels = step_prog.phases.clone();
        Ok(CubeOptimizer { per_tensor, entry, hparams, step_prog, kernels, temps: 0, init_prog, scaled: None, client: device.client(), launch: Launch::for_device(device), state: None, state_dtype: Dtype::F32, state_held: Held::Native(Dtype::F32), param_dtype: Dtype::F32, param_held: Held::Native(Dtype::F32), step: 0 })
    }

    /// The same rule launched one kernel per operation, intermediates through memory: the
    /// baseline that shows what fusion buys. Elementwise rules only.
    pub fn unfused(entry: Arc<Entry>, overrides: &[(String, f64)], device: &cubecl::Device) -> Result<Self, Error> {
        let mut opt = Self::new(entry, overrides, device)?;
        if opt.kernels.len() != 1 || !opt.kernels[0].accums.is_empty() {
            return Err(Error(format!("`{}` has reductions: the unfused baseline covers elementwise rules", opt.entry.name)));
        }
        (opt.kernels, opt.temps) = unfused::split(&opt.kernels[0], opt.entry.states.len());
        Ok(opt)
    }

    /// Kernel launches per step (a rule's phases and their combines, or the baseline's); per
    /// stack of same-shaped tensors for a rule that runs through layer kernels ([`Self::fused`] is
    /// false).
    pub fn launches_per_step(&self) -> usize {
        if let Some(pt) = &self.per_tensor {
            return pt.plans.step.kernels.len();
        }
        self.kernels.iter().map(|k| if k.accums.is_empty() { 1 } else { 2 }).sum()
    }

    /// Keep the state (moments, momentum buffers…) in `dtype`; it is computed in f32 and rounded
    /// where it is stored. Set it before the first step.
    pub fn with_state_dtype(mut self, dtype: Dtype) -> Result<Self, Error> {
        self.state_held = dtype.held_on(&self.client)?;
        if self.state.is_some() || self.per_tensor.as_ref().is_some_and(|p| !p.states.is_empty()) {
            return Err(Error("the state dtype is chosen before the first step".into()));
        }
        // A rule of several phases reads its f32 states back in later phases; narrower ones it
        // computes again (`compile_for`). The unfused baseline has one phase: nothing to redo.
        if let (Programs::Optimizer { step }, None, 0) = (&self.entry.programs, &self.per_tensor, self.temps) {
            self.step_prog = compile_for(&self.entry, step, dtype)?;
            self.kernels = self.step_prog.phases.clone();
        }
        self.state_dtype = dtype;
        Ok(self)
    }

    /// Store the parameters and their gradients in `dtype` (as torch's fused optimizers take
    /// bf16 or f16 parameters): each is loaded as f32, and the new parameter rounded where it
    /// is stored. The values `step` takes are rounded to `dtype` first, as storing them would.
    /// Set it before the first step.
    pub fn with_param_dtype(mut self, dtype: Dtype) -> Result<Self, Error> {
        if self.state.is_some() || self.per_tensor.as_ref().is_some_and(|p| !p.states.is_empty()) {
            return Err(Error("the parameters' dtype is chosen before the first step".into()));
        }
        self.param_held = dtype.held_on(&self.client)?;
        self.param_dtype = dtype;
        Ok(self)
    }

    /// The step phases that reduce nothing walking the layout as `layout` says (default
    /// [`StepLayout::DEFAULT`]): tuning, never meaning. Set it last before the first step
    /// (the state dtype compiles the rule again).
    pub fn with_layout(mut self, layout: StepLayout) -> Result<Self, Error> {
        let layout = layout.checked().map_err(Error)?;
        if self.state.is_some() {
            return Err(Error("the step layout is chosen before the first step".into()));
        }
        if self.temps > 0 {
            return Err(Error("the unfused baseline has a kernel per operation, an element per unit".into()));
        }
        for prog in [&mut self.step_prog, &mut self.init_prog] {
            prog.phases = prog.phases.drain(..).map(|p| p.laid_out(layout)).collect();
        }
        self.kernels = self.step_prog.phases.clone();
        Ok(self)
    }

    /// Whether every tensor of a step goes through the same launches (false for rules with
    /// per-axis reductions or matrix products, which run a stack of same-shaped tensors at a
    /// time).
    pub fn fused(&self) -> bool {
        self.per_tensor.is_none()
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<(), Error> {
        normforge_dsl::hyper::set(&self.entry, &mut self.hparams, name, v)
    }

    /// Copy parameters and gradients to the device in the padded layout, as 1-D tensors.
    pub fn upload(&self, params: &[Vec<f32>], grads: &[Vec<f32>]) -> Result<Flat, Error> {
        let shapes: Vec<Vec<usize>> = params.iter().map(|p| vec![p.len()]).collect();
        self.upload_shaped(params, grads, shapes)
    }

    /// As [`Self::upload`], with each tensor's shape (rules may ask for `rank` or axis sizes).
    pub fn upload_shaped(&self, params: &[Vec<f32>], grads: &[Vec<f32>], shapes: Vec<Vec<usize>>) -> Result<Flat, Error> {
        let sizes: Vec<usize> = params.iter().map(Vec::len).collect();
        if grads.len() != params.len() || grads.iter().zip(&sizes).any(|(g, &n)| g.len() != n) {
            return Err(Error("every parameter needs a gradient of its own size".into()));
        }
        if shapes.len() != sizes.len() || shapes.iter().zip(&sizes).any(|(s, &n)| s.iter().product::<usize>() != n) {
            return Err(Error("every parameter needs a shape with as many elements as it has".into()));
        }
        // Shapes the rule cannot bind are refused here, before anything runs.
        self.step_prog.host_values(&self.entry, &self.hparams, &shapes)?;
        let (blocks, ranges, cubes) = padded_layout(&sizes);
        if cubes > MAX_CUBES {
            return Err(Error(format!("{} elements exceed one launch of this backend ({} padded)", sizes.iter().sum::<usize>(), MAX_CUBES * BLOCK)));
        }
        let (mut p, mut g) = (vec![0f32; cubes * BLOCK], vec![0f32; cubes * BLOCK]);
        let mut start = 0;
        for (pt, gt) in params.iter().zip(grads) {
            p[start..start + pt.len()].copy_from_slice(pt);
            g[start..start + gt.len()].copy_from_slice(gt);
            start += pt.len().div_ceil(BLOCK) * BLOCK;
        }
        let held = self.param_held;
        let up = |v: &[f32]| self.client.create_from_slice(&held.encode(v));
        let blocks = self.client.create_from_slice(u32::as_bytes(&blocks));
        let ranges = self.client.create_from_slice(u32::as_bytes(&ranges));
        Ok(Flat { p: up(&p), g: up(&g), blocks, ranges, sizes, shapes, cubes, held })
    }

    /// The parameters, back from the device, one vector per tensor.
    pub fn download(&self, flat: &Flat) -> Result<Vec<Vec<f32>>, Error> {
        let bytes = self.client.read_one(flat.p.clone()).map_err(|e| Error(format!("reading back the parameters: {e:?}")))?;
        let out = flat.held.decode(&bytes);
        let mut first = 0;
        Ok(flat
            .sizes
            .iter()
            .map(|&len| {
                let t = out[first * BLOCK..first * BLOCK + len].to_vec();
                first += len.div_ceil(BLOCK);
                t
            })
            .collect())
    }

    fn state_for(&mut self, flat: &Flat, slots: usize) -> Result<bool, Error> {
        match &self.state {
            Some(st) if st.sizes != flat.sizes => Err(Error(format!("the parameters changed sizes: {:?} -> {:?}", st.sizes, flat.sizes))),
            Some(_) => Ok(false),
            None => {
                // A binding past the adapter's limit is not an error the launch reports: it
                // just does not run. Refuse it here.
                let limit = self.client.properties().memory.max_page_size;
                if (slots * flat.len() * 4) as u64 > limit {
                    return Err(Error(format!(
                        "{} state values of {} tensors exceed this adapter's largest buffer ({limit} bytes)",
                        slots * flat.len(),
                        flat.sizes.len()
                    )));
                }
                let r = self.step_prog.slots().max(1);
                let zeros = |k: usize| self.client.create_from_slice(f32::as_bytes(&vec![0f32; k]));
                let s = self.client.create_from_slice(&self.state_held.encode(&vec![0f32; slots * flat.len()]));
                let partial = zeros(flat.cubes.max(1) * r);
                self.state = Some(State { sizes: flat.sizes.clone(), s, partial });
                Ok(true)
            }
        }
    }

    fn launch(&self, kernel: &KProgram, scalars: &Handle, n_scalars: usize, red: &Handle, flat: &Flat, slots: usize) {
        let st = self.state.as_ref().expect("state exists before a launch");
        let tensors = flat.sizes.len();
        let sizes = StepSizes { n: flat.len(), slots, scalars: n_scalars, cubes: flat.cubes, tensors, results: kernel.slots };
        let [np, ng, ns, nsc, nbl, npa, nre] = sizes.step(kernel.lanes);
        // SAFETY: the grid has a cube of BLOCK units per `blocks_per_cube` entries of `blocks`
        // (whose count it divides), so every element index is below `n`; states are addressed
        // as `j * n + i` with `j < slots`, partials and results by cube and tensor index times
        // `r`; the lengths passed are the buffers'.
        unsafe {
            let (cc, cd) = (CubeCount::Static(kernel.cubes(flat.cubes) as u32, 1, 1), CubeDim::new_1d(BLOCK as u32));
            let (p, g, s, sc, bl, pa, re) = (
                BufferArg::from_raw_parts(flat.p.clone(), np),
                BufferArg::from_raw_parts(flat.g.clone(), ng),
                BufferArg::from_raw_parts(st.s.clone(), ns),
                BufferArg::from_raw_parts(scalars.clone(), nsc),
                BufferArg::from_raw_parts(flat.blocks.clone(), nbl),
                BufferArg::from_raw_parts(st.partial.clone(), npa),
                BufferArg::from_raw_parts(red.clone(), nre),
            );
            let c = &self.client;
            let ((param, round_p), (state, round_s)) = (flat.held.kernel_type(), self.state_held.kernel_type());
            with_type!(param, P => with_type!(state, S => step_kernel::launch_unchecked::<P, S>(c, cc, cd, kernel.lanes, p, g, s, sc, bl, pa, re, kernel.clone(), round_p, round_s)));
            if !kernel.accums.is_empty() {
                let [npa, nra, nre] = sizes.combine();
                combine_kernel::launch_unchecked(
                    &self.client,
                    CubeCount::Static(tensors.div_ceil(COMBINE_BLOCK as usize) as u32, 1, 1),
                    CubeDim::new_1d(COMBINE_BLOCK),
                    BufferArg::from_raw_parts(st.partial.clone(), npa),
                    BufferArg::from_raw_parts(flat.ranges.clone(), nra),
                    BufferArg::from_raw_parts(red.clone(), nre),
                    kernel.accums.clone(),
                    kernel.slots.max(1),
                );
            }
        }
    }

    /// Launch a program's kernels with its scalars for step `t`.
    fn run(&self, prog: &Compiled, kernels: &[KProgram], flat: &Flat, slots: usize, t: u64, grad_scale: f64) -> Result<(), Error> {
        let scalars = prog.scalars(&self.hparams, t as f64, grad_scale);
        let sc = self.client.create_from_slice(f32::as_bytes(&scalars));
        let red = self.client.create_from_slice(f32::as_bytes(&prog.host_values(&self.entry, &self.hparams, &flat.shapes)?));
        for k in kernels {
            self.launch(k, &sc, scalars.len(), &red, flat, slots);
        }
        Ok(())
    }

    /// One step on parameters already on the device; launches only (see [`Self::sync`]).
    pub fn step_flat(&mut self, flat: &Flat) -> Result<(), Error> {
        self.step_flat_scaled(flat, 1.0)
    }

    /// [`Self::step_flat`] with every gradient read as `grad_scale` times its value (a clipped
    /// step): the gradients themselves are left as they are.
    pub fn step_flat_scaled(&mut self, flat: &Flat, grad_scale: f64) -> Result<(), Error> {
        if self.per_tensor.is_some() {
            return Err(Error(format!("`{}` runs through layer kernels: use `step` or `step_shaped`", self.entry.name)));
        }
        if flat.held != self.param_held {
            return Err(Error(format!("the parameters were uploaded as {:?}, this optimizer takes {:?} (`with_param_dtype`)", flat.held, self.param_held)));
        }
        if flat.cubes == 0 {
            return Ok(());
        }
        let scaled = grad_scale != 1.0;
        if scaled && self.temps > 0 {
            return Err(Error("the unfused baseline reads its gradients as they are".into()));
        }
        let slots = (self.entry.states.len() + self.temps).max(1);
        let fresh = self.state_for(flat, slots)?;
        if scaled && self.scaled.is_none() {
            self.scaled = Some((self.step_prog.grad_scaled(), self.init_prog.grad_scaled()));
        }
        let (step_prog, init_prog, kernels) = match &self.scaled {
            Some((step, init)) if scaled => (step, init, &step.phases),
            _ => (&self.step_prog, &self.init_prog, &self.kernels),
        };
        if fresh {
            self.run(init_prog, &init_prog.phases, flat, slots, self.step, grad_scale)?;
        }
        self.run(step_prog, kernels, flat, slots, self.step + 1, grad_scale)?;
        self.step += 1;
        Ok(())
    }

    /// Wait for every launch so far.
    pub fn sync(&self) -> Result<(), Error> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| Error(format!("device: {e:?}")))
    }

    /// One step over every tensor, copying to the device and back. The tensors must keep their
    /// sizes from one step to the next (the state is laid out for them).
    pub fn step(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>]) -> Result<(), Error> {
        let shapes = params.iter().map(|p| vec![p.len()]).collect();
        self.step_shaped(params, grads, shapes)
    }

    /// As [`Self::step`], with each tensor's shape.
    pub fn step_shaped(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], shapes: Vec<Vec<usize>>) -> Result<(), Error> {
        self.step_shaped_scaled(params, grads, shapes, 1.0)
    }

    /// As [`Self::step_shaped`], every gradient read as `grad_scale` times its value
    /// ([`Self::step_flat_scaled`]).
    pub fn step_shaped_scaled(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], shapes: Vec<Vec<usize>>, grad_scale: f64) -> Result<(), Error> {
        if self.per_tensor.is_some() {
            return self.step_per_tensor(params, grads, &shapes, grad_scale);
        }
        let flat = self.upload_shaped(params, grads, shapes)?;
        self.step_flat_scaled(&flat, grad_scale)?;
        if flat.cubes > 0 {
            for (t, new) in params.iter_mut().zip(self.download(&flat)?) {
                t.copy_from_slice(&new);
            }
        }
        Ok(())
    }

    fn step_per_tensor(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], shapes: &[Vec<usize>], grad_scale: f64) -> Result<(), Error> {
        if grads.len() != params.len() || shapes.len() != params.len() {
            return Err(Error("every parameter needs a gradient and a shape".into()));
        }
        let pt = self.per_tensor.as_ref().expect("per-tensor rule");
        // The values as the parameters' storage holds them (the fused path rounds them where it
        // uploads them).
        let stored = |v: &[Vec<f32>]| -> Vec<Vec<f32>> {
            let mut v = v.to_vec();
            v.iter_mut().for_each(|t| self.param_dtype.round(t));
            v
        };
        let (params_in, mut grads) = (stored(params), stored(grads));
        // Scaled in f32, as the fused kernels scale them where they load them.
        if grad_scale != 1.0 {
            grads.iter_mut().flatten().for_each(|g| *g *= grad_scale as f32);
        }
        let (params_in, grads) = (params_in.as_slice(), grads.as_slice());
        // Everything is checked and computed before anything is written back.
        for (k, ((p, g), s)) in params.iter().zip(grads).zip(shapes).enumerate() {
            if g.len() != p.len() || s.iter().product::<usize>() != p.len() {
                return Err(Error(format!("parameter {k}: its gradient and shape must have {} values", p.len())));
            }
            bind::bind_axes(&self.entry.axes, s, &format!("parameter {k}")).map_err(Error)?;
        }
        // Same-shaped neighbours run as one stack.
        let runs = stacks(shapes, |_| true);
        let mut bindings = Vec::new();
        for r in &runs {
            bindings.push(pt.plans.bind(r.len(), &shapes[r.start], &self.hparams, &format!("parameters {}..{}", r.start, r.end))?);
        }
        let resized = pt.states.len() != params.len() || pt.states.iter().zip(params.iter()).any(|(st, p)| st.iter().any(|v| v.len() != p.len()));
        if !pt.states.is_empty() && resized {
            return Err(Error("the parameters changed sizes since the first step".into()));
        }
        let n_states = self.entry.states.len();
        // A stack's output, cut back into its tensors.
        let split = |r: &std::ops::Range<usize>, v: Vec<f32>| -> Vec<Vec<f32>> {
            let mut at = 0;
            r.clone()
                .map(|k| {
                    at += params[k].len();
                    v[at - params[k].len()..at].to_vec()
                })
                .collect()
        };
        let mut states = pt.states.clone();
        if states.is_empty() {
            states = vec![Vec::new(); params.len()];
            for (r, b) in runs.iter().zip(&bindings) {
                let p = concat(r, |k| &params_in[k]);
                let data = |src: Source| if src == Source::Input { Some(p.as_slice()) } else { None };
                let lay = layout(&pt.plans.init, b, &self.hparams, 0.0, &self.launch)?;
                let out = run(&self.client, &pt.plans.init, &lay, self.param_dtype, &self.launch, &data)?;
                for i in 0..n_states as u32 {
                    for (k, v) in r.clone().zip(split(r, pick(&out, Target::State(i))?)) {
                        states[k].push(v);
                    }
                }
            }
        }
        let t = (self.step + 1) as f64;
        let mut new_params = vec![Vec::new(); params.len()];
        for (r, b) in runs.iter().zip(&bindings) {
            let (p, g) = (concat(r, |k| &params_in[k]), concat(r, |k| &grads[k]));
            let st: Vec<Vec<f32>> = (0..n_states).map(|i| concat(r, |k| &states[k][i])).collect();
            let data = |src: Source| match src {
                Source::Input => Some(p.as_slice()),
                Source::Grad => Some(g.as_slice()),
                Source::State(i) => st.get(i as usize).map(Vec::as_slice),
                _ => None,
            };
            // Odd steps read each state where the last step wrote it, as the CUDA path does with
            // its arena kept between steps (here the host places the values either way, so a
            // rule whose states cannot swap simply does not).
            let mut lay = layout(&pt.plans.step, b, &self.hparams, t, &self.launch)?;
            if self.step % 2 == 1 {
                lay.swap_states(&pt.plans.step);
            }
            let out = run(&self.client, &pt.plans.step, &lay, self.param_dtype, &self.launch, &data)?;
            for (k, mut v) in r.clone().zip(split(r, pick(&out, Target::P)?)) {
                self.param_dtype.round(&mut v);
                new_params[k] = v;
            }
            #[allow(clippy::needless_range_loop)] // (`i` also names the state's target)
            for i in 0..n_states {
                for (k, mut v) in r.clone().zip(split(r, pick(&out, Target::State(i as u32))?)) {
                    // Stored in the state dtype, as the fused kernels store it.
                    self.state_dtype.round(&mut v);
                    states[k][i] = v;
                }
            }
        }
        for (p, v) in params.iter_mut().zip(new_params) {
            *p = v;
        }
        self.per_tensor.as_mut().expect("per-tensor rule").states = states;
        self.step += 1;
        Ok(())
    }
}

/// The tensors of a stack, one after another.
fn concat<'a>(r: &std::ops::Range<usize>, each: impl Fn(usize) -> &'a [f32]) -> Vec<f32> {
    r.clone().flat_map(|k| each(k).iter().copied()).collect()
}

fn pick(out: &[(Target, Vec<f32>)], t: Target) -> Result<Vec<f32>, Error> {
    out.iter().find(|(x, _)| *x == t).map(|(_, v)| v.clone()).ok_or_else(|| Error(format!("the program lacks the output {t:?}")))
}
