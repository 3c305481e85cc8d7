//! libtorch's own implementation of a standard entry, where it has one: a second oracle beside
//! the reference backend, for the GPU check (our CUDA kernels against torch's) and the tests on
//! the CPU (which also prove these mappings: names, argument order, hyper-parameters).

use crate::Error;
use normforge_dsl::Entry;
use tch::nn::{self, OptimizerConfig};
use tch::Tensor;

/// The hyper-parameter `name` of `entry` among `hparams` (resolved values, declaration order).
fn hparam(entry: &Entry, hparams: &[f64], name: &str) -> Result<f64, Error> {
    entry.hparams.iter().position(|h| h.name == name).and_then(|i| hparams.get(i).copied()).ok_or_else(|| Error(format!("`{}` lacks `{name}`", entry.name)))
}

/// The std layers libtorch has built in.
pub const LAYERS: [&str; 5] = ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"];
/// The std rules libtorch's C++ optimizers implement.
pub const OPTIMIZERS: [&str; 4] = ["sgd", "adam", "amsgrad", "adamw"];

/// libtorch's built-in for std layer `entry` on `x`, with the layer's parameters and buffers
/// (batch norm updates the buffers in place in training, as the layer does); `None` where
/// libtorch has no such layer.
pub fn layer(entry: &Entry, hparams: &[f64], x: &Tensor, params: &[Tensor], buffers: &[Tensor], train: bool) -> Option<Result<Tensor, Error>> {
    let h = |name| hparam(entry, hparams, name);
    let p = |i: usize| params.get(i).ok_or_else(|| Error(format!("`{}` lacks parameter {i}", entry.name)));
    let b = |i: usize| buffers.get(i).ok_or_else(|| Error(format!("`{}` lacks buffer {i}", entry.name)));
    let last = x.size().last().copied().unwrap_or(1);
    let out = match entry.name.as_str() {
        "layer_norm" => (|| Ok(x.f_layer_norm([last], Some(p(0)?), Some(p(1)?), h("eps")?, true)?))(),
        "rms_norm" => (|| Ok(x.f_rms_norm([last], Some(p(0)?), h("eps")?)?))(),
        "group_norm" => (|| Ok(x.f_group_norm(h("groups")? as i64, Some(p(0)?), Some(p(1)?), h("eps")?, true)?))(),
        "instance_norm" => (|| Ok(x.f_instance_norm(Some(p(0)?), Some(p(1)?), None::<&Tensor>, None::<&Tensor>, true, 0.0, h("eps")?, true)?))(),
        "batch_norm" => (|| {
            let (rm, rv) = (b(0)?, b(1)?);
            Ok(x.f_batch_norm(Some(p(0)?), Some(p(1)?), Some(rm), Some(rv), train, h("momentum")?, h("eps")?, true)?)
        })(),
        _ => return None,
    };
    debug_assert!(LAYERS.contains(&entry.name.as_str()));
    Some(out)
}

/// libtorch's own optimizer for std rule `entry` (its C++ `torch::optim`), built over `vs` with
/// these hyper-parameters; `None` where libtorch has none.
pub fn optimizer(entry: &Entry, hparams: &[f64], vs: &nn::VarStore) -> Option<Result<nn::Optimizer, Error>> {
    let h = |name| hparam(entry, hparams, name);
    let build = || -> Result<nn::Optimizer, Error> {
        let lr = h("lr")?;
        Ok(match entry.name.as_str() {
            "sgd" => nn::Sgd { momentum: h("momentum")?, dampening: h("dampening")?, wd: h("weight_decay")?, nesterov: h("nesterov")? != 0.0 }.build(vs, lr)?,
            "adam" | "amsgrad" => {
                nn::Adam { beta1: h("beta1")?, beta2: h("beta2")?, wd: h("weight_decay")?, eps: h("eps")?, amsgrad: entry.name == "amsgrad" }.build(vs, lr)?
            }
            "adamw" => nn::AdamW { beta1: h("beta1")?, beta2: h("beta2")?, wd: h("weight_decay")?, eps: h("eps")?, amsgrad: false }.build(vs, lr)?,
            _ => unreachable!("filtered below"),
        })
    };
    OPTIMIZERS.contains(&entry.name.as_str()).then(build)
}

/// torch's fused AdamW (`torch.optim.AdamW(fused=True)`'s kernel, through `shim::fused_adamw`)
/// over its own copies of some parameters, with their moments in the parameters' kind and
/// their step counts, as torch.optim keeps them: the oracle for bf16 and f16 parameters, which
/// torch's fused optimizers compute in f32 and libtorch's C++ ones in the parameters' dtype.
pub struct FusedAdamW {
    pub params: Vec<Tensor>,
    exp_avgs: Vec<Tensor>,
    exp_avg_sqs: Vec<Tensor>,
    steps: Vec<Tensor>,
    h: crate::shim::AdamW,
}

impl FusedAdamW {
    /// For std rule `adamw` with these hyper-parameters (resolved values), from copies of
    /// `init`; `None` for any other rule.
    pub fn new(entry: &Entry, hparams: &[f64], init: &[Tensor]) -> Option<Result<FusedAdamW, Error>> {
        let h = |name| hparam(entry, hparams, name);
        let build = || -> Result<FusedAdamW, Error> {
            let h = crate::shim::AdamW { lr: h("lr")?, beta1: h("beta1")?, beta2: h("beta2")?, weight_decay: h("weight_decay")?, eps: h("eps")? };
            let zeros = || init.iter().map(Tensor::zeros_like).collect();
            let steps = init.iter().map(|t| Tensor::zeros([], (tch::Kind::Float, t.device()))).collect();
            Ok(FusedAdamW { params: init.iter().map(|t| t.detach().copy()).collect(), exp_avgs: zeros(), exp_avg_sqs: zeros(), steps, h })
        };
        (entry.name == "adamw").then(build)
    }

    /// One step with these gradients (one per parameter, of its kind).
    pub fn step(&mut self, grads: &[Tensor]) -> Result<(), Error> {
        // (torch.optim counts the step up before it calls the kernel.)
        tch::no_grad(|| self.steps.iter_mut().for_each(|s| _ = s.g_add_scalar_(1.0)));
        crate::shim::fused_adamw(&self.params, grads, &self.exp_avgs, &self.exp_avg_sqs, &self.steps, self.h)
    }
}
