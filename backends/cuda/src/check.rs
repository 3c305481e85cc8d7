//! Correctness on a GPU, shared by the tests and the GPU check binary: a rule on CUDA tensors
//! (fused, or through layer kernels) against the reference backend (f64), and against libtorch's own
//! optimizer where it has one, and against the same rule in libtorch's operations, over several
//! steps; one call of a layer (on any device) against the reference backend, or against itself
//! lowered to libtorch's operations in f64 where the reference would be slow (`LayerOracle`).

use crate::{Arena, CudaOptimizer, Gpu};
use normforge_cubecl::kernel::StepLayout;
use normforge_cubecl::{Launch, Precision};
use normforge_dsl::ir::Entry;
use normforge_tch::DslLayer;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// Which variables (by name and tensor) an optimizer takes.
pub type Select = fn(&str, &Tensor) -> bool;

fn host(t: &Tensor) -> Result<Vec<f64>, String> {
    let v = Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(|e| e.to_string())?;
    Ok(v.into_iter().map(f64::from).collect())
}

fn dims(s: &[usize]) -> Vec<i64> {
    s.iter().map(|&d| d as i64).collect()
}

/// max |got - want| / max |want| of one tensor.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().map(|b| b.abs()).fold(1e-30, f64::max);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale
}

/// max |got - want| / max |want| of two tensors on one device, the difference taken in f64
/// there (no copy to the host).
pub fn max_rel(got: &Tensor, want: &Tensor) -> f64 {
    let d = f64::try_from((got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max()).unwrap_or(f64::NAN);
    d / f64::try_from(want.abs().max().to_kind(Kind::Double)).unwrap_or(f64::NAN).max(1e-30)
}

/// The largest of some errors, NaN if any is (`f64::max` would drop it).
pub fn worst(errors: impl Iterator<Item = f64>) -> f64 {
    errors.fold(0f64, |m, e| if m.is_nan() || e.is_nan() { f64::NAN } else { m.max(e) })
}

/// The overrides the checks build a layer with: groups of 2 channels, where it takes a number
/// of groups (so the test shapes' few channels divide).
pub fn in_groups_of_two(entry: &Entry) -> Vec<(String, f64)> {
    entry.hparams.iter().filter(|h| h.name == "groups").map(|h| (h.name.clone(), 2.0)).collect()
}

/// Whether `entry` steps matrices (it declares twin axes: Muon's products).
pub fn takes_matrices(entry: &Entry) -> bool {
    entry.axes.iter().any(|a| a.twin.is_some())
}

/// The parameters the rule checks step: vectors of one value, of part of a block, of whole
/// blocks, of part of a cube and of several cubes; a rule taking matrices gets tall, wide and
/// square ones, and long rows.
pub fn rule_shapes(entry: &Entry) -> Vec<Vec<usize>> {
    match takes_matrices(entry) {
        true => vec![vec![9, 4], vec![4, 9], vec![7, 7], vec![33, 70], vec![64, 300]],
        false => [1, 7, 256, 1000, 4097, 192].iter().map(|&n| vec![n]).collect(),
    }
}

/// One of the GPU check's training runs through the user's API ([`fused_training`]).
pub struct TrainingCase {
    pub layer: &'static str,
    /// Each rule by name, with the variables it takes.
    pub rules: Vec<(&'static str, Select)>,
    /// The dtype of the model's matrix (the rest is f32).
    pub matrix_kind: Kind,
}

impl TrainingCase {
    /// The rules, as the check names them (`muon+adamw`).
    pub fn rule(&self) -> String {
        self.rules.iter().map(|r| r.0).collect::<Vec<_>>().join("+")
    }

    /// The largest relative error allowed: the 1e-4 in f32; with a bf16 matrix, two
    /// units in the last place of bf16 (a value rounded differently twice), relative to each
    /// variable's largest.
    pub fn bound(&self) -> f64 {
        if self.matrix_kind == Kind::Float { 1e-4 } else { 2f64.powi(-7) }
    }
}

/// The training runs the GPU check holds our kernels to: each kind of state hand-off — a fused
/// rule (AdamW, LAMB's per-tensor reduction), one through layer kernels (AdamP), two rules
/// sharing the model (Muon the matrix, AdamW the rest) —, and a bf16 matrix beside the f32
/// rest: a group of two dtypes (AdamP's layer kernels reading and writing the bf16 matrix in
/// place).
pub fn training_cases() -> Vec<TrainingCase> {
    let every: Select = |_, _| true;
    let (matrix, not_matrix): (Select, Select) = (|_, t| t.dim() == 2, |_, t| t.dim() != 2);
    let case = |layer, rules, matrix_kind| TrainingCase { layer, rules, matrix_kind };
    vec![
        case("batch_norm", vec![("adamw", every)], Kind::Float),
        case("group_norm", vec![("lamb", every)], Kind::Float),
        case("layer_norm", vec![("adamp", every)], Kind::Float),
        case("rms_norm", vec![("muon", matrix), ("adamw", not_matrix)], Kind::Float),
        case("layer_norm", vec![("adamw", every)], Kind::BFloat16),
        case("layer_norm", vec![("adamp", every)], Kind::BFloat16),
    ]
}

/// Run `steps` steps of `entry` on parameters of `shapes` with random gradients, on the GPU
/// (fused phases that reduce nothing walking the layout as `layout` says) and in the
/// reference backend; the largest relative error over the tensors (max |diff| / max
/// |reference|). `Err` for a rule the CUDA path refuses or a failed launch.
pub fn against_reference(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize, layout: StepLayout) -> Result<f64, String> {
    let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &[], Precision::default()).and_then(|o| o.with_layout(layout)).map_err(|e| e.to_string())?;
    let mut oracle = normforge_reference::Optimizer::new(entry.clone(), &[]).map_err(|e| e.0)?;
    let dev = gpu.device();
    let _seeded = normforge_tch::seeded(7);
    let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).set_requires_grad(true)).collect();
    let as_ref = |t: &Tensor| -> Result<normforge_reference::Tensor, String> {
        normforge_reference::Tensor::new(t.size().iter().map(|&d| d as usize).collect(), host(t)?).map_err(|e| e.0)
    };
    let mut want = vars.iter().map(as_ref).collect::<Result<Vec<_>, _>>()?;
    let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
    for _ in 0..steps {
        let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, Device::Cpu))).collect();
        tch::no_grad(|| {
            for (v, g) in vars.iter().zip(&grads) {
                v.grad().copy_(g);
            }
        });
        opt.step(&arena).map_err(|e| e.to_string())?;
        let gs = grads.iter().map(as_ref).collect::<Result<Vec<_>, _>>()?;
        oracle.step(&mut want, &gs).map_err(|e| e.0)?;
    }
    let mut worst = 0f64;
    for (v, w) in vars.iter().zip(&want) {
        worst = worst.max(rel_err(&host(v)?, &w.data));
    }
    Ok(worst)
}

/// As [`against_reference`], against libtorch's own optimizer on the same GPU
/// (`normforge_tch::builtins`); `None` for a rule libtorch lacks.
pub fn against_builtin(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize) -> Option<Result<f64, String>> {
    let hparams = normforge_dsl::hyper::resolve(entry, &[]).ok()?;
    let vs = tch::nn::VarStore::new(gpu.device());
    let mut theirs = match normforge_tch::builtins::optimizer(entry, &hparams, &vs)? {
        Ok(o) => o,
        Err(e) => return Some(Err(e.0)),
    };
    Some(beside(gpu, entry, shapes, steps, &vs, &mut |loss| {
        theirs.zero_grad();
        loss.f_backward().map_err(|e| e.to_string())?;
        theirs.step();
        Ok(())
    }))
}

/// As [`against_builtin`], against the same rule in libtorch's operations (`DslOptimizer`) on
/// the same GPU: what the CUDA path runs there for tensors its kernels cannot index (Muon on
/// large matrices), and the kernels' results for the rest.
pub fn against_lowered(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize) -> Result<f64, String> {
    let vs = tch::nn::VarStore::new(gpu.device());
    let mut theirs: Option<normforge_tch::DslOptimizer> = None;
    beside(gpu, entry, shapes, steps, &vs, &mut |loss| {
        // Built at the first step, once `beside` has put the parameters in `vs`.
        if theirs.is_none() {
            theirs = Some(normforge_tch::DslOptimizer::new(entry.clone(), &vs, &[]).map_err(|e| e.0)?);
        }
        let report = theirs.as_mut().expect("built above").backward_step(loss).map_err(|e| e.0)?;
        match report {
            normforge_tch::StepReport::Applied { .. } => Ok(()),
            skipped => Err(format!("libtorch's step was {skipped:?}")),
        }
    })
}

/// `steps` steps of `entry` on the GPU on parameters of `shapes` in an arena, and of `theirs`
/// on copies of them in `vs` (given `sum(t * g)`, whose gradient is the same `g`), from the
/// same values; the largest relative error between the two after.
fn beside(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shapes: &[Vec<usize>], steps: usize, vs: &tch::nn::VarStore, theirs: &mut dyn FnMut(&Tensor) -> Result<(), String>) -> Result<f64, String> {
    let dev = gpu.device();
    let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &[], Precision::default()).map_err(|e| e.to_string())?;
    let _seeded = normforge_tch::seeded(11);
    let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).set_requires_grad(true)).collect();
    let twins: Vec<Tensor> = vars.iter().enumerate().map(|(i, v)| vs.root().var_copy(&format!("p{i}"), v)).collect();
    let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
    for _ in 0..steps {
        let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev))).collect();
        tch::no_grad(|| {
            for (v, g) in vars.iter().zip(&grads) {
                v.grad().copy_(g);
            }
        });
        let loss = twins.iter().zip(&grads).map(|(t, g)| (t * g).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, dev)), |a, b| a + b);
        theirs(&loss)?;
        opt.step(&arena).map_err(|e| e.to_string())?;
    }
    let mut worst = 0f64;
    for (v, t) in vars.iter().zip(&twins) {
        worst = worst.max(rel_err(&host(v)?, &host(t)?));
    }
    Ok(worst)
}

/// How far apart two sets of values stored in `kind` (bf16 or f16) are, in units in the last
/// place of that kind at the largest magnitude each value has had (`peak`, per value, kept up
/// to date here): a value once rounded differently at that magnitude keeps that absolute
/// difference as it shrinks. The largest distance, and how many values differ at all.
pub fn ulps_apart(a: &[f32], b: &[f32], kind: Kind, peak: &mut [f32]) -> (f64, usize) {
    let (mantissa, min_exp) = match kind {
        Kind::BFloat16 => (7, -133),
        Kind::Half => (10, -24),
        _ => (23, -149),
    };
    let ulp = |x: f32| 2f64.powi(((x as f64).log2().floor() as i32 - mantissa).max(min_exp));
    let (mut worst, mut differ) = (0f64, 0);
    for ((&x, &y), m) in a.iter().zip(b).zip(peak) {
        *m = m.max(x.abs()).max(y.abs()).max(f32::MIN_POSITIVE);
        worst = worst.max((x - y).abs() as f64 / ulp(*m));
        differ += usize::from(x != y);
    }
    (worst, differ)
}

/// AdamW on parameters of `kind` (bf16 or f16: states in it too, everything computed in f32)
/// through the fused kernels, and through torch's fused AdamW kernel on copies, `steps` steps
/// from the same values with the same gradients: per [`ulps_apart`], the largest distance
/// between the two after any step, how many values differed after the steps, and of how many.
pub fn against_fused_adamw(gpu: &Arc<Gpu>, entry: &Arc<Entry>, kind: Kind, shapes: &[Vec<usize>], steps: usize) -> Result<(f64, usize, usize), String> {
    let dtype = crate::plans::dtype_of(kind).ok_or_else(|| format!("{kind:?} is not a parameter dtype"))?;
    let overrides = [("weight_decay".to_string(), 0.1)];
    let hparams = normforge_dsl::hyper::resolve(entry, &overrides).map_err(|e| e.0)?;
    let mut opt = CudaOptimizer::new(gpu.clone(), entry.clone(), &overrides, Precision::uniform(dtype)).map_err(|e| e.to_string())?;
    let dev = gpu.device();
    let _seeded = normforge_tch::seeded(13);
    let mut vars: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).to_kind(kind).set_requires_grad(true)).collect();
    let mut theirs = normforge_tch::builtins::FusedAdamW::new(entry, &hparams, &vars).ok_or("torch's fused kernel is AdamW's")?.map_err(|e| e.0)?;
    let arena = Arena::adopt(&mut vars).map_err(|e| e.0)?;
    let (mut worst, mut differ, mut total) = (0f64, 0, 0);
    let mut peaks: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.0; v.numel()]).collect();
    for _ in 0..steps {
        let grads: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(dims(s), (Kind::Float, dev)).to_kind(kind)).collect();
        tch::no_grad(|| {
            for (v, g) in vars.iter().zip(&grads) {
                v.grad().copy_(g);
            }
        });
        opt.step(&arena).map_err(|e| e.to_string())?;
        theirs.step(&grads).map_err(|e| e.0)?;
        (differ, total) = (0, 0);
        for ((v, t), peak) in vars.iter().zip(&theirs.params).zip(&mut peaks) {
            let f32s = |t: &Tensor| host(t).map(|v| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>());
            let (ulps, n) = ulps_apart(&f32s(v)?, &f32s(t)?, kind, peak);
            worst = worst.max(ulps);
            differ += n;
            total += v.numel();
        }
    }
    Ok((worst, differ, total))
}

/// One training or evaluation call of a layer, forward and backward, as some implementation ran
/// it: tensors on any device, of any float kind.
pub struct LayerCall<'a> {
    pub x: &'a Tensor,
    /// The output gradient backpropagated (the gradients are those of `sum(y * gy)`).
    pub gy: &'a Tensor,
    pub train: bool,
    pub params: &'a [Tensor],
    /// The buffers as the call found them, and as it left them.
    pub buffers_before: &'a [Tensor],
    pub buffers_after: &'a [Tensor],
    pub y: &'a Tensor,
    pub grad_x: &'a Tensor,
    /// One per parameter (an undefined tensor where it got none).
    pub grad_params: &'a [Tensor],
}

/// The largest relative errors (max |diff| / max |reference|) of a layer call against the
/// reference backend (f64) given the same hyper-parameters, parameters and buffers: of its
/// output and updated buffers, and of its gradients.
pub fn layer_against_reference(entry: &Arc<Entry>, hparams: &[f64], call: &LayerCall) -> Result<(f64, f64), String> {
    let shape = |t: &Tensor| t.size().iter().map(|&d| d as usize).collect::<Vec<_>>();
    let overrides: Vec<(String, f64)> = entry.hparams.iter().map(|h| h.name.clone()).zip(hparams.iter().copied()).collect();
    let mut oracle = normforge_reference::Layer::new(entry.clone(), &overrides, &shape(call.x)).map_err(|e| e.0)?;
    for (mine, theirs) in [(&mut oracle.params, call.params), (&mut oracle.buffers, call.buffers_before)] {
        if mine.len() != theirs.len() {
            return Err(format!("{} tensors given, the reference has {}", theirs.len(), mine.len()));
        }
        for (m, t) in mine.iter_mut().zip(theirs) {
            if m.shape != shape(t) {
                return Err(format!("a tensor of shape {:?} given for one of {:?}", shape(t), m.shape));
            }
            m.data = host(t)?;
        }
    }
    let as_ref = |t: &Tensor| normforge_reference::Tensor::new(shape(t), host(t)?).map_err(|e| e.0);
    let (x, gy) = (as_ref(call.x)?, as_ref(call.gy)?);
    // The backward first: it reads the buffers as the call found them; the forward updates them.
    let grads = oracle.backward(&x, &gy, call.train).map_err(|e| e.0)?;
    let y = oracle.forward(&x, call.train).map_err(|e| e.0)?;
    let err = |got: &Tensor, want: &normforge_reference::Tensor| -> Result<f64, String> {
        let got = host(got)?;
        match got.len() == want.data.len() {
            true => Ok(rel_err(&got, &want.data)),
            false => Err(format!("{} values where the reference has {}", got.len(), want.data.len())),
        }
    };
    let mut forward = err(call.y, &y)?;
    for (got, want) in call.buffers_after.iter().zip(&oracle.buffers) {
        forward = forward.max(err(got, want)?);
    }
    let mut backward = err(call.grad_x, &grads.input)?;
    for (got, want) in call.grad_params.iter().zip(&grads.params) {
        if got.defined() {
            backward = backward.max(err(got, want)?);
        }
    }
    Ok((forward, backward))
}

/// A few training steps of a small model through the user's API, from the same start on the
/// same batches: its norm layer and optimizer on libtorch's operations (`DslLayer`,
/// `DslOptimizer`), uninterrupted, and on our kernels (`fused_layer`, `FusedOptimizer`), each
/// with two parameter groups (the norm's parameters without weight decay, where the rule has
/// it) and gradient clipping. Our runs also save their optimizers' state halfway and go on
/// with fresh optimizers that loaded it — of the same kind, and of the other kind both ways
/// (fused -> libtorch, libtorch -> fused) — so that either resumes from the other's file. The
/// largest relative error of any variable after (parameters and buffers) against the
/// uninterrupted libtorch run. Then a step whose gradients are NaN, which every run must skip,
/// changing nothing. The model also holds a parameter the loss never reads, which no optimizer
/// may step, and one it reads from the third batch on, whose steps count from then (and whose
/// saved step count differs from its group's). Each of `rules` updates the variables its selector takes (Muon the matrix,
/// AdamW the rest), with an optimizer of its own. The model's matrix is stored as
/// `matrix_kind` (f32, or bf16 or f16 beside the f32 rest: a group of two dtypes, its states
/// saved in each parameter's).
pub fn fused_training(gpu: &Arc<Gpu>, layer: &Arc<Entry>, rules: &[(Arc<Entry>, Select)], steps: usize, matrix_kind: Kind) -> Result<f64, String> {
    training_runs(gpu.device(), Some(gpu), layer, rules, steps, matrix_kind)
}

/// [`fused_training`] with `fast` the GPU whose kernels a run marked fused uses; with none,
/// every run is on libtorch's operations on `dev` — the harness itself, on a CPU, where the
/// interrupted runs must match the uninterrupted one exactly.
pub fn training_runs(dev: Device, fast: Option<&Arc<Gpu>>, layer: &Arc<Entry>, rules: &[(Arc<Entry>, Select)], steps: usize, matrix_kind: Kind) -> Result<f64, String> {
    use normforge_tch::{DslOptimizer, Optimize, Spec, StepReport};
    let (n, c, s) = (8i64, 8i64, 12i64);
    let _seeded = normforge_tch::seeded(5);
    let batches: Vec<(Tensor, Tensor)> = (0..steps).map(|_| (Tensor::randn([n, c, s], (Kind::Float, dev)), Tensor::randn([n, c, s], (Kind::Float, dev)))).collect();
    let layer_hparams = in_groups_of_two(layer);
    let file = |i: usize| std::env::temp_dir().join(format!("normforge-check-{}-{}-{i}.safetensors", std::process::id(), layer.name));
    // Layer and first optimizer fused or not; then, if it is interrupted, whether the optimizer
    // that resumes is fused.
    let run = |fused: bool, resumed: Option<bool>| -> Result<Vec<(String, Tensor)>, String> {
        let _seeded = normforge_tch::seeded(3);
        let vs = tch::nn::VarStore::new(dev);
        let mut w = vs.root().randn("w", &[c, c], 0.0, 0.5);
        if matrix_kind != Kind::Float {
            tch::no_grad(|| w.set_data(&w.to_kind(matrix_kind)));
        }
        // Never in the loss: no optimizer may step it (weight decay would move it).
        let _unused = vs.root().randn("unused", &[c], 0.0, 0.5);
        // In the loss from the third batch on: its first step comes late, counted from one.
        let late = vs.root().randn("late", &[c], 0.0, 0.5);
        let spec = Spec { entry: layer.clone(), hparams: layer_hparams.clone() };
        // The layer sees channels second (`x[n, c, s...]`) or last (`x[..., d]`).
        let channels_last = !(layer.axes.len() == 3 && layer.axes[2].variadic);
        let sample = if channels_last { [n, s, c] } else { [n, c, s] };
        let mut norm = spec.build_layer(&(vs.root() / "norm"), &sample).map_err(|e| e.0)?;
        let overrides = [("lr".to_string(), 1e-2)];
        let zero_decay = [("weight_decay".to_string(), 0.0)];
        if let (true, Some(gpu)) = (fused, fast) {
            norm = crate::fused_layer(norm, gpu).map_err(|e| e.0)?;
        }
        let optimizers = |fused: bool| -> Result<Vec<Box<dyn Optimize>>, String> {
            let mut out = Vec::new();
            for (rule, select) in rules {
                let mut opt: Box<dyn Optimize> = match (fused, fast) {
                    (true, Some(gpu)) => Box::new(crate::FusedOptimizer::selected(gpu.clone(), rule.clone(), &vs, &overrides, select).map_err(|e| e.0)?),
                    _ => Box::new(DslOptimizer::selected(rule.clone(), &vs, &overrides, select).map_err(|e| e.0)?),
                };
                if rule.hparams.iter().any(|h| h.name == "weight_decay") {
                    opt.split_group(&|name| name.starts_with("norm"), &zero_decay).map_err(|e| e.0)?;
                }
                opt.clip_grad_norm(Some(1.0));
                out.push(opt);
            }
            Ok(out)
        };
        let mut opts = optimizers(fused)?;
        // Every optimizer's gradients cleared, one backpropagation, every optimizer's step.
        let step = |opts: &mut Vec<Box<dyn Optimize>>, loss: &Tensor| -> Result<Vec<StepReport>, String> {
            opts.iter_mut().for_each(|o| o.zero_grad());
            loss.f_backward().map_err(|e| e.to_string())?;
            opts.iter_mut().map(|o| o.step().map_err(|e| e.0)).collect()
        };
        let loss = |x: &Tensor, target: &Tensor, late_on: bool| -> Result<Tensor, String> {
            let h = w.to_kind(Kind::Float).matmul(x);
            let y = match channels_last {
                true => norm.try_forward_t(&h.transpose(1, 2), true).map_err(|e| e.0)?.transpose(1, 2),
                false => norm.try_forward_t(&h, true).map_err(|e| e.0)?,
            };
            // Added after the norm: a shift per channel ahead of a batch norm would not change
            // its output, so its gradient would be rounding noise, which Adam's step blows up
            // to moves of the learning rate in whatever direction the noise takes.
            let y = if late_on { y + late.view([1, c, 1]) } else { y };
            Ok((y - target).square().mean(Kind::Float))
        };
        for (i, (x, target)) in batches.iter().enumerate() {
            if let (true, Some(resumed_fused)) = (i == steps / 2, resumed) {
                for (k, opt) in opts.iter().enumerate() {
                    opt.save(&file(k)).map_err(|e| format!("saving: {}", e.0))?;
                }
                opts = optimizers(resumed_fused)?;
                for (k, opt) in opts.iter_mut().enumerate() {
                    opt.load(&file(k)).map_err(|e| format!("loading: {}", e.0))?;
                }
            }
            for report in step(&mut opts, &loss(x, target, i >= 2)?)? {
                if !matches!(report, StepReport::Applied { .. }) {
                    return Err(format!("a finite step was not applied: {report:?}"));
                }
            }
        }
        if w.kind() != matrix_kind {
            return Err(format!("the matrix became {:?}", w.kind()));
        }
        let mut after: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.detach().copy())).collect();
        after.sort_by(|a, b| a.0.cmp(&b.0));
        // A NaN in the target: every gradient NaN, the layer's buffers untouched by it.
        let (x, target) = &batches[0];
        let nan = target.copy();
        let _ = tch::no_grad(|| nan.get(0).get(0).get(0).fill_(f64::NAN));
        for report in step(&mut opts, &loss(x, &nan, true)?)? {
            if !matches!(report, StepReport::SkippedNonFinite { .. }) {
                return Err(format!("a step with NaN gradients was {report:?}"));
            }
        }
        // Nothing but the forward's buffers changed (the layer ran once more, in training).
        for (k, v) in vs.variables() {
            let before = &after.iter().find(|(name, _)| *name == k).expect("the same variables").1;
            if v.requires_grad() && !v.equal(before) {
                return Err(format!("`{k}` changed in a skipped step"));
            }
        }
        Ok(after)
    };
    let theirs = run(false, None)?;
    let mut worst = 0f64;
    for (fused, resumed) in [(true, None), (true, Some(true)), (true, Some(false)), (false, Some(true))] {
        let ours = run(fused, resumed)?;
        for ((name, a), (_, b)) in ours.iter().zip(&theirs) {
            let e = rel_err(&host(a)?, &host(b)?);
            if !e.is_finite() {
                return Err(format!("`{name}` (fused {fused}, resumed {resumed:?}): not finite"));
            }
            worst = worst.max(e);
        }
    }
    for k in 0..rules.len() {
        let _ = std::fs::remove_file(file(k));
    }
    Ok(worst)
}

/// A layer lowered to libtorch's operations in f64 on the device of its input, its output and
/// gradients (autograd's) in training from given values: the oracle for a layer at shapes
/// where the reference backend (f64 on the CPU) would take minutes — the GPU check's timed
/// kernels, held to it where they are timed.
pub struct LayerOracle {
    /// Its parameters and buffers, drawn in f32 so a layer of f32 parameters takes them exactly.
    values: Vec<Tensor>,
    /// y, dx, then each parameter's gradient.
    want: Vec<Tensor>,
}

impl LayerOracle {
    /// The oracle for layers of `spec` on inputs of `shape`, from `x` and the output gradient `gy`
    /// (any float dtype: taken exactly in f64), its parameters and buffers drawn at random.
    pub fn new(spec: &normforge_tch::LayerSpec, shape: &[i64], x: &Tensor, gy: &Tensor) -> Result<Self, String> {
        let _seeded = normforge_tch::seeded(17);
        let mut vs = tch::nn::VarStore::new(x.device());
        let oracle = spec.build(&vs.root(), shape).map_err(|e| e.0)?;
        vs.double();
        let values: Vec<Tensor> = oracle.params().iter().chain(oracle.buffers()).map(|t| Tensor::rand(t.size(), (Kind::Float, x.device())) * 0.5 + 0.75).collect();
        Self::set(&oracle, &values);
        let want = Self::run(&oracle, &x.to_kind(Kind::Double), &gy.to_kind(Kind::Double))?;
        Ok(LayerOracle { values, want })
    }

    /// `layer`'s parameters, then its buffers, to `values` (in their own dtype).
    fn set(layer: &DslLayer, values: &[Tensor]) {
        tch::no_grad(|| layer.params().iter().chain(layer.buffers()).zip(values).for_each(|(t, v)| t.shallow_clone().copy_(v)));
    }

    /// y, dx and the parameters' gradients of `layer` in training, from fresh gradients.
    fn run(layer: &DslLayer, x: &Tensor, gy: &Tensor) -> Result<Vec<Tensor>, String> {
        let x = x.detach().set_requires_grad(true);
        for v in layer.params() {
            normforge_tch::shim::clear_grad(&mut v.shallow_clone()).map_err(|e| e.0)?;
        }
        let y = layer.try_forward_t(&x, true).map_err(|e| e.0)?;
        normforge_tch::shim::backward_with_grad(&y, gy).map_err(|e| e.0)?;
        Ok([y.detach(), x.grad()].into_iter().chain(layer.params().iter().map(Tensor::grad)).collect())
    }

    /// `layer` (the same entry, its parameters and buffers set to the oracle's) from `x` and
    /// `gy`: the largest relative error (max |diff| / max |oracle|) of its output, and of its
    /// gradients.
    pub fn errors(&self, layer: &DslLayer, x: &Tensor, gy: &Tensor) -> Result<(f64, f64), String> {
        Self::set(layer, &self.values);
        let got = Self::run(layer, x, gy)?;
        let each: Vec<f64> = got.iter().zip(&self.want).map(|(a, b)| if a.defined() && b.defined() { max_rel(a, b) } else { f64::NAN }).collect();
        Ok((worst(each[..1].iter().copied()), worst(each[1..].iter().copied())))
    }
}

/// The largest relative errors of our kernels' output (and buffers) and gradients against one
/// oracle.
pub struct LayerErrors {
    pub against: &'static str,
    pub forward: f64,
    pub backward: f64,
}

/// The input shape the GPU check runs layer `entry` at in [`layer_against_torch`]: a row of
/// 1000 for a layer over features, 30 x 30 positions of 8 channels for one over images.
pub fn layer_shape(entry: &Entry) -> Vec<i64> {
    if entry.axes.len() == 2 { vec![8, 3, 1000] } else { vec![4, 8, 30, 30] }
}

/// Layer `entry` (in groups of 2, where it takes a number of groups) through our kernels on
/// `gpu`, inside autograd (`CudaLayerKernels`), against the same layer lowered to libtorch's
/// ops on the same device (its autograd giving the gradients), against the reference backend
/// (f64), and against libtorch's built-in where it has one: the largest relative errors, over
/// training and evaluation.
pub fn layer_against_torch(gpu: &Arc<Gpu>, entry: &Arc<Entry>, shape: &[i64]) -> Result<Vec<LayerErrors>, String> {
    let dev = gpu.device();
    let name = entry.name.as_str();
    let spec = normforge_tch::Spec { entry: entry.clone(), hparams: in_groups_of_two(entry) };
    let build = |vs: &tch::nn::VarStore| -> Result<DslLayer, String> { spec.build_layer(&vs.root(), shape).map_err(|e| e.0) };
    let (vs_a, vs_b) = (tch::nn::VarStore::new(dev), tch::nn::VarStore::new(dev));
    let theirs = build(&vs_a)?;
    let ours = build(&vs_b)?;
    let ours = crate::fused_layer(ours, gpu).map_err(|e| e.0)?;
    let _seeded = normforge_tch::seeded(3);
    tch::no_grad(|| {
        for (a, b) in theirs.params().iter().zip(ours.params()).chain(theirs.buffers().iter().zip(ours.buffers())) {
            let v = Tensor::rand(a.size(), (Kind::Float, dev)) * 0.5 + 0.75;
            a.shallow_clone().copy_(&v);
            b.shallow_clone().copy_(&v);
        }
    });
    // Output, buffers after the call (forward); input and parameter gradients (backward).
    let run = |f: &dyn Fn(&Tensor) -> Result<Tensor, String>, params: &[Tensor], buffers: &[Tensor], x: &Tensor, gy: &Tensor| -> Result<(Vec<Tensor>, Vec<Tensor>), String> {
        let xi = x.detach().set_requires_grad(true);
        for p in params {
            p.shallow_clone().zero_grad();
        }
        let y = f(&xi)?;
        (&y * gy).sum(Kind::Float).f_backward().map_err(|e| e.to_string())?;
        let mut fwd = vec![y.detach()];
        fwd.extend(buffers.iter().map(Tensor::copy));
        let mut bwd = vec![xi.grad()];
        bwd.extend(params.iter().map(|p| p.grad().copy()));
        Ok((fwd, bwd))
    };
    let worst_of = |a: &[Tensor], b: &[Tensor]| worst(a.iter().zip(b).filter(|(a, b)| a.defined() && b.defined()).map(|(a, b)| max_rel(a, b)));
    let mut errs = vec![LayerErrors { against: "lowered", forward: 0.0, backward: 0.0 }, LayerErrors { against: "reference", forward: 0.0, backward: 0.0 }];
    for train in [true, false] {
        let x = Tensor::randn(shape, (Kind::Float, dev)) * 2.0 + 0.3;
        let gy = Tensor::randn(shape, (Kind::Float, dev));
        // The built-in updates copies of the buffers as they were before our call.
        let before: Vec<Tensor> = ours.buffers().iter().map(Tensor::copy).collect();
        let o = run(&|x| ours.try_forward_t(x, train).map_err(|e| e.0), ours.params(), ours.buffers(), &x, &gy)?;
        let t = run(&|x| theirs.try_forward_t(x, train).map_err(|e| e.0), theirs.params(), theirs.buffers(), &x, &gy)?;
        errs[0].forward = errs[0].forward.max(worst_of(&o.0, &t.0));
        errs[0].backward = errs[0].backward.max(worst_of(&o.1, &t.1));
        // And against the reference backend (f64, on the CPU), from the same values.
        let call = LayerCall {
            x: &x,
            gy: &gy,
            train,
            params: ours.params(),
            buffers_before: &before,
            buffers_after: &o.0[1..],
            y: &o.0[0],
            grad_x: &o.1[0],
            grad_params: &o.1[1..],
        };
        let (f, b) = layer_against_reference(entry, ours.hparams(), &call)?;
        errs[1].forward = errs[1].forward.max(f);
        errs[1].backward = errs[1].backward.max(b);
        let builtin = |x: &Tensor| normforge_tch::builtins::layer(entry, ours.hparams(), x, ours.params(), &before, train).map(|r| r.map_err(|e| e.0));
        if normforge_tch::builtins::LAYERS.contains(&name) {
            let b = run(&|x| builtin(x).unwrap_or_else(|| Err("no built-in".into())), ours.params(), &before, &x, &gy)?;
            if errs.len() == 2 {
                errs.push(LayerErrors { against: "torch", forward: 0.0, backward: 0.0 });
            }
            errs[2].forward = errs[2].forward.max(worst_of(&o.0, &b.0));
            errs[2].backward = errs[2].backward.max(worst_of(&o.1, &b.1));
        }
    }
    Ok(errs)
}

/// The launches of a layer's kernels the GPU check times and holds to the oracle at the timed
/// shapes (tuning, never meaning), the default first.
pub fn layer_launches() -> [(&'static str, Launch); 12] {
    let default = Launch::default();
    [
        ("default", default),
        ("rows64", Launch { rows_per_cube: 64, ..default }),
        ("rows16_many_waves", Launch { max_cubes: 65_535, ..default }),
        ("column_kernel", Launch { rows_per_cube: 0, ..default }),
        ("column_kernel_columns1", Launch { rows_per_cube: 0, columns: 1, ..default }),
        ("nothing_kept", Launch { keep_from: 0, ..default }),
        ("kept_in_cubes_of_256", Launch { max_units: normforge_cubecl::kernel::BLOCK, ..default }),
        ("one_value_per_unit", Launch { values_per_unit: 1, ..default }),
        // 16 bytes per unit in flight for bf16 as for f32 (four 4-byte values).
        ("eight_values_per_unit", Launch { values_per_unit: 8, ..default }),
        // Kept rows read and written a value per access, not 16 bytes.
        ("one_value_per_access", Launch { vector_bytes: 0, ..default }),
        // Rows read 16 bytes an access, their f32 parameters a value per lane.
        ("parameters_per_lane", Launch { vector_params: false, ..default }),
        // Reductions folded in shared memory, a barrier per halving of the cube, not by
        // shuffles within each warp.
        ("folds_in_shared_memory", Launch { planes: false, ..default }),
    ]
}

/// A layer the GPU check times, as it builds it: EvoNorm in 32 groups (of 8 channels at the
/// timed 256, as gpu_peers.py's group norm), the rest with their defaults.
pub fn timed_layer(entry: Arc<Entry>) -> normforge_tch::LayerSpec {
    let grouped = entry.name == "evonorm_s0";
    let spec = normforge_tch::LayerSpec(normforge_tch::Spec { entry, hparams: Vec::new() });
    if grouped {
        spec.hparam("groups", 32.0)
    } else {
        spec
    }
}

/// A layer of `spec` under `path` for inputs of `shape`, its kernels ours on `gpu`, launched as
/// `launch`.
pub fn with_launch(gpu: &Arc<Gpu>, spec: &normforge_tch::LayerSpec, path: &tch::nn::Path, shape: &[i64], launch: Launch) -> Result<DslLayer, String> {
    let layer = spec.build(path, shape).map_err(|e| e.0)?;
    crate::fused_layer_launched(layer, gpu, launch).map_err(|e| e.0)
}
