//! A registry layer as a tch module: parameters and buffers in the VarStore under their spec
//! names, forward through [`crate::lower`], gradients from libtorch's autograd.

use crate::shim::{self, LayerKernels};
use crate::lower::{Leaves, Lowering};
use crate::{float_kind, Error};
use normforge_dsl::bind;
use normforge_dsl::ir::{Entry, Kind as EntryKind, Program, Programs, Target};
use std::sync::Arc;
use tch::{nn, Tensor};

pub struct DslLayer {
    entry: Arc<Entry>,
    hparams: Vec<f64>,
    params: Vec<Tensor>,
    buffers: Vec<Tensor>,
    /// Forward and backward as one custom autograd function, instead of libtorch's autograd
    /// over the lowered forward.
    kernels: Option<Arc<dyn LayerKernels>>,
}

impl DslLayer {
    /// Create the parameters and buffers under `path`, sized for inputs shaped like
    /// `sample_shape` (batch dims may be 1), holding their initial values.
    pub fn new(entry: Arc<Entry>, path: &nn::Path, sample_shape: &[i64], overrides: &[(String, f64)]) -> Result<Self, Error> {
        if entry.kind == EntryKind::Optimizer {
            return Err(Error(format!("`{}` is an optimizer, not a layer", entry.name)));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let shape = dims(sample_shape)?;
        let binding = bind::bind_axes(&entry.axes, &shape, "the sample shape").map_err(Error)?;
        let kind = float_kind(path.kind());
        let Programs::Layer { train, eval, .. } = &entry.programs else { unreachable!("checked above") };
        // Checking every program now refuses a shape the layer cannot take (groups that do
        // not divide the channels) when it is built.
        let low = Lowering::new(&[&entry.init, train, eval], &binding, &hparams, 0.0, kind, path.device())?;
        let vals = tch::no_grad(|| low.run(&entry.init, &Leaves::default()))?;
        let mut params = Vec::new();
        for (i, d) in entry.params.iter().enumerate() {
            let init = tch::no_grad(|| low.output(&entry.init, &vals, Target::Param(i as u32), &d.shape))?;
            params.push(path.f_var_copy(&d.name, &init.to_kind(path.kind()))?);
        }
        let mut buffers = Vec::new();
        for (i, d) in entry.buffers.iter().enumerate() {
            let init = tch::no_grad(|| low.output(&entry.init, &vals, Target::Buffer(i as u32), &d.shape))?;
            let mut b = path.zeros_no_train(&d.name, &low.natural(&d.shape)?);
            tch::no_grad(|| b.f_copy_(&init))?;
            buffers.push(b);
        }
        Ok(DslLayer { entry, hparams, params, buffers, kernels: None })
    }

    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn buffers(&self) -> &[Tensor] {
        &self.buffers
    }

    /// The checked forward: shape, dtype and device mismatches are errors. In training mode
    /// the buffers take their new values.
    pub fn try_forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor, Error> {
        let in_kind = x.kind();
        if !matches!(in_kind, tch::Kind::Float | tch::Kind::Double | tch::Kind::Half | tch::Kind::BFloat16) {
            return Err(Error(format!("`{}` takes a floating-point input, got {in_kind:?}", self.entry.name)));
        }
        if let Some(p) = self.params.first().or(self.buffers.first()) {
            if p.device() != x.device() {
                return Err(Error(format!("the input is on {:?}, the layer's parameters on {:?}", x.device(), p.device())));
            }
        }
        let shape = dims(&x.size())?;
        let binding = bind::bind_axes(&self.entry.axes, &shape, "the input").map_err(Error)?;
        for (d, t) in self.entry.params.iter().zip(&self.params).chain(self.entry.buffers.iter().zip(&self.buffers)) {
            let want: Vec<i64> =
                bind::dims_of(&d.shape, &binding, &self.hparams).map_err(Error)?.into_iter().map(|v| v as i64).collect();
            if want != t.size() {
                return Err(Error(format!(
                    "the input has shape {:?}: `{}` needs shape {want:?} for it, but has {:?}",
                    x.size(),
                    d.name,
                    t.size()
                )));
            }
        }
        match &self.kernels {
            None => forward(&self.entry, &self.hparams, x, &self.params, &self.buffers, train),
            Some(k) => {
                let inputs: Vec<&Tensor> = std::iter::once(x).chain(&self.params).chain(&self.buffers).collect();
                shim::custom_function(k.clone(), &inputs, train)
            }
        }
    }

    /// Backpropagate through the DSL's derived backward program — one node on libtorch's
    /// tape that saves the input, parameters and buffers — instead of libtorch's
    /// differentiation of every operation of the forward (which keeps every intermediate).
    pub fn with_derived_backward(self) -> Self {
        let k = Derived { entry: self.entry.clone(), hparams: self.hparams.clone() };
        self.with_kernels(Arc::new(k))
    }

    /// Run forward and backward through `kernels` (a fused implementation), recorded as one
    /// custom autograd function.
    pub fn with_kernels(mut self, kernels: Arc<dyn LayerKernels>) -> Self {
        self.kernels = Some(kernels);
        self
    }

    pub fn hparams(&self) -> &[f64] {
        &self.hparams
    }
}

/// A layer's train or eval program (`DslLayer::new` refuses optimizers).
fn program(entry: &Entry, train: bool) -> &Program {
    match &entry.programs {
        Programs::Layer { train: t, eval, .. } => if train { t } else { eval },
        Programs::Optimizer { .. } => unreachable!("DslLayer::new refuses optimizers"),
    }
}

/// The forward lowered to libtorch operations (differentiable by autograd where grad mode is
/// on); in training the buffers take their new values.
fn forward(entry: &Entry, hparams: &[f64], x: &Tensor, params: &[Tensor], buffers: &[Tensor], train: bool) -> Result<Tensor, Error> {
    let in_kind = x.kind();
    let binding = bind::bind_axes(&entry.axes, &dims(&x.size())?, "the input").map_err(Error)?;
    // Half-precision inputs compute in f32 and return in their own type.
    let kind = float_kind(in_kind);
    let prog = program(entry, train);
    let low = Lowering::new(&[prog], &binding, hparams, 0.0, kind, x.device())?;
    let leaves = Leaves { input: Some(x), params, buffers, ..Leaves::default() };
    let vals = low.run(prog, &leaves)?;
    let y = low.output(prog, &vals, Target::Y, &entry.input_shape())?;
    for (i, (d, buf)) in entry.buffers.iter().zip(buffers).enumerate() {
        if prog.output(Target::Buffer(i as u32)).is_some() {
            let new = low.output(prog, &vals, Target::Buffer(i as u32), &d.shape)?.detach();
            let mut handle = buf.shallow_clone();
            tch::no_grad(|| handle.f_copy_(&new))?;
        }
    }
    Ok(y.to_kind(in_kind))
}

/// A layer's custom-function inputs (or saved tensors), `[x, params.., buffers..]`, split.
pub fn split_inputs<'t>(entry: &Entry, inputs: &'t [Tensor]) -> Result<(&'t Tensor, &'t [Tensor], &'t [Tensor]), Error> {
    let (np, nb) = (entry.params.len(), entry.buffers.len());
    match inputs.split_first() {
        Some((x, rest)) if rest.len() == np + nb => Ok((x, &rest[..np], &rest[np..])),
        _ => Err(Error(format!("`{}` takes 1 + {np} + {nb} tensors, got {}", entry.name, inputs.len()))),
    }
}

/// What a layer's forward saves for its backward, in the order of [`split_inputs`]: the input
/// and parameters as they are, the buffers as the forward found them (copies: call it before
/// the forward updates them).
pub fn saved_inputs(x: &Tensor, params: &[Tensor], buffers: &[Tensor]) -> Vec<Tensor> {
    std::iter::once(x.shallow_clone()).chain(params.iter().map(Tensor::shallow_clone)).chain(buffers.iter().map(Tensor::copy)).collect()
}

/// A layer's backward result in the order of [`split_inputs`]: the input's gradient, the
/// parameters', none for the buffers.
pub fn input_grads(x: Tensor, params: Vec<Option<Tensor>>, buffers: usize) -> Vec<Option<Tensor>> {
    std::iter::once(Some(x)).chain(params).chain(std::iter::repeat_with(|| None).take(buffers)).collect()
}

/// The DSL's own backward: the forward lowered without a tape, the derived backward program
/// lowered for the gradients.
struct Derived {
    entry: Arc<Entry>,
    hparams: Vec<f64>,
}

impl LayerKernels for Derived {
    fn forward(&self, inputs: &[Tensor], train: bool) -> Result<(Tensor, Vec<Tensor>), Error> {
        let (x, params, buffers) = split_inputs(&self.entry, inputs)?;
        let saved = saved_inputs(x, params, buffers);
        let y = forward(&self.entry, &self.hparams, x, params, buffers, train)?;
        Ok((y, saved))
    }

    fn backward(&self, saved: &[Tensor], grad_y: &Tensor, train: bool) -> Result<Vec<Option<Tensor>>, Error> {
        let (x, params, buffers) = split_inputs(&self.entry, saved)?;
        let Programs::Layer { train_backward, eval_backward, .. } = &self.entry.programs else {
            return Err(Error(format!("`{}` is not a layer", self.entry.name)));
        };
        let prog = if train { train_backward } else { eval_backward };
        let binding = bind::bind_axes(&self.entry.axes, &dims(&x.size())?, "the input").map_err(Error)?;
        let low = Lowering::new(&[prog], &binding, &self.hparams, 0.0, float_kind(x.kind()), x.device())?;
        let leaves = Leaves { input: Some(x), grad_output: Some(grad_y), params, buffers, ..Leaves::default() };
        let vals = low.run(prog, &leaves)?;
        let full = self.entry.input_shape();
        let gx = low.output(prog, &vals, Target::GradInput, &full)?.to_kind(x.kind());
        let mut gparams = Vec::new();
        for (i, (d, p)) in self.entry.params.iter().zip(params).enumerate() {
            let g = match prog.output(Target::GradParam(i as u32)) {
                Some(_) => Some(low.output(prog, &vals, Target::GradParam(i as u32), &d.shape)?.to_kind(p.kind())),
                None => None,
            };
            gparams.push(g);
        }
        Ok(input_grads(gx, gparams, buffers.len()))
    }
}

impl std::fmt::Debug for DslLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DslLayer")
            .field("entry", &self.entry.name)
            .field("hparams", &self.hparams)
            .field("params", &self.params)
            .field("buffers", &self.buffers)
            .field("fused", &self.kernels.is_some())
            .finish()
    }
}

/// `forward_t` must return a tensor: it panics where [`DslLayer::try_forward_t`] returns an
/// error (a shape or dtype the layer was not built for), as tch's own modules do.
impl nn::ModuleT for DslLayer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.try_forward_t(xs, train).unwrap_or_else(|e| panic!("{}: {e}", self.entry.name))
    }
}

fn dims(shape: &[i64]) -> Result<Vec<usize>, Error> {
    shape.iter().map(|&d| usize::try_from(d).map_err(|_| Error(format!("invalid dimension {d} in {shape:?}")))).collect()
}
