//! Custom autograd functions (the C++ shim in backends/tch): every std layer with its DSL-derived
//! backward recorded as one autograd node gives the outputs, buffers and gradients of libtorch's
//! own differentiation of the lowered forward (f64, train and eval); `loss.backward()` really
//! calls our backward; failures and panics in either half are errors, never aborts; the shim's
//! backward from a given output gradient.

mod common;

use normforge::tch::nn::{self, ModuleT};
use normforge::tch::{Device, Kind, Tensor};
use normforge::torch::shim::{self, LayerKernels};
use normforge::torch::{DslLayer, Error};
use normforge::RegistryExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max().to_kind(Kind::Double)).unwrap()
}

fn set(t: &Tensor, v: &Tensor) {
    let mut h = t.shallow_clone();
    normforge::tch::no_grad(|| h.copy_(v));
}

/// Two copies of one layer with the same random parameters and buffers.
fn twins(reg: &normforge::Registry, name: &str, hparams: &[(&str, f64)], shape: &[i64]) -> (Vec<nn::VarStore>, DslLayer, DslLayer) {
    let mut stores = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..2 {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let mut spec = reg.layer(name).unwrap();
        for (k, v) in hparams {
            spec = spec.hparam(k, *v);
        }
        let layer = spec.build(&vs.root(), shape).unwrap();
        vs.double();
        stores.push(vs);
        layers.push(layer);
    }
    let derived = layers.pop().unwrap().with_derived_backward();
    let taped = layers.pop().unwrap();
    for (i, p) in taped.params().iter().enumerate() {
        let v = Tensor::randn(p.size(), (Kind::Double, Device::Cpu)) * 0.3 + 1.0;
        set(p, &v);
        set(&derived.params()[i], &v);
    }
    for (i, b) in taped.buffers().iter().enumerate() {
        let v = Tensor::rand(b.size(), (Kind::Double, Device::Cpu)) + 0.5;
        set(b, &v);
        set(&derived.buffers()[i], &v);
    }
    (stores, taped, derived)
}

/// Output, input gradient and parameter gradients of `sum(y * gy)`.
fn run(layer: &DslLayer, x: &Tensor, gy: &Tensor, train: bool) -> (Tensor, Tensor, Vec<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    for p in layer.params() {
        p.shallow_clone().zero_grad();
    }
    let y = layer.try_forward_t(&x, train).unwrap();
    (&y * gy).sum(Kind::Double).backward();
    (y.detach(), x.grad(), layer.params().iter().map(|p| p.grad().copy()).collect())
}

#[test]
fn every_std_layer_backpropagates_through_its_derived_backward() {
    let _seeded = normforge::torch::seeded(12);
    let reg = common::registry();
    let layers: Vec<_> = reg.list(None).into_iter().filter(|r| r.entry.kind != normforge::dsl::ir::Kind::Optimizer).collect();
    assert!(layers.len() >= 19, "the std library has {} layers", layers.len());
    for r in layers {
        let (shape, hparams): (Vec<i64>, Vec<(&str, f64)>) = match r.entry.axes.len() {
            2 => (vec![3, 2, 5], vec![]),
            _ => (vec![3, 4, 2, 3], vec![("groups", 2.0)]),
        };
        let hparams: Vec<(&str, f64)> = hparams.into_iter().filter(|(k, _)| r.entry.hparams.iter().any(|h| h.name == *k)).collect();
        for train in [true, false] {
            let (_vs, taped, derived) = twins(&reg, &r.name, &hparams, &shape);
            let x = Tensor::randn(shape.as_slice(), (Kind::Double, Device::Cpu));
            let gy = Tensor::randn(shape.as_slice(), (Kind::Double, Device::Cpu));
            let want = run(&taped, &x, &gy, train);
            let got = run(&derived, &x, &gy, train);
            let what = format!("{} (train={train})", r.name);
            assert!(max_diff(&got.0, &want.0) < 1e-12, "{what}: outputs differ");
            assert!(max_diff(&got.1, &want.1) < 1e-9, "{what}: input gradients differ by {:e}", max_diff(&got.1, &want.1));
            for (k, (g, w)) in got.2.iter().zip(&want.2).enumerate() {
                assert!(max_diff(g, w) < 1e-9, "{what}: gradient of {} differs by {:e}", r.entry.params[k].name, max_diff(g, w));
            }
            for (k, (g, w)) in derived.buffers().iter().zip(taped.buffers()).enumerate() {
                assert!(max_diff(g, w) < 1e-12, "{what}: buffer {} differs", r.entry.buffers[k].name);
            }
        }
    }
}

/// A layer whose forward and derived backward hold sums of scaled products and quotients of
/// one shape, which the lowering runs as one `addcmul`, `addcdiv` or `add` each where autograd
/// records nothing (`lower::fusions`): the derived backward against libtorch's differentiation
/// of the forward (taped, where no product or quotient is fused), f64.
#[test]
fn fused_sums_in_a_derived_backward_match_autograd() {
    let _seeded = normforge::torch::seeded(13);
    let reg = common::registry();
    let src = "layer swishy(x[n, d]) {\n    param w[d] = 1\n    let t = tanh(x * w)\n    return x + 0.5 * x * t - x / (1 + x * x) + 0.25 * t\n}\n";
    reg.load_str(src, "swishy.nf").unwrap();
    let shape = [5, 7];
    let (_vs, taped, derived) = twins(&reg, "swishy", &[], &shape);
    let x = Tensor::randn(shape, (Kind::Double, Device::Cpu));
    let gy = Tensor::randn(shape, (Kind::Double, Device::Cpu));
    let want = run(&taped, &x, &gy, true);
    let got = run(&derived, &x, &gy, true);
    assert!(max_diff(&got.0, &want.0) < 1e-12, "outputs differ by {:e}", max_diff(&got.0, &want.0));
    assert!(max_diff(&got.1, &want.1) < 1e-9, "input gradients differ by {:e}", max_diff(&got.1, &want.1));
    assert!(max_diff(&got.2[0], &want.2[0]) < 1e-9, "the weight's gradients differ by {:e}", max_diff(&got.2[0], &want.2[0]));
    // The same forward without autograd (fused) gives what it gives with autograd.
    let eval = normforge::tch::no_grad(|| derived.try_forward_t(&x, true).unwrap());
    assert!(max_diff(&eval, &want.0) < 1e-12, "the forward without autograd differs by {:e}", max_diff(&eval, &want.0));
}

/// An identity whose backward triples the gradient, counting its calls.
struct Tripler {
    backwards: AtomicUsize,
    fail: Option<&'static str>,
    panic_in_backward: bool,
}

impl LayerKernels for Tripler {
    fn forward(&self, inputs: &[Tensor], _train: bool) -> Result<(Tensor, Vec<Tensor>), Error> {
        if self.fail == Some("forward") {
            return Err(Error("forward refused".into()));
        }
        Ok((inputs[0].copy(), vec![]))
    }
    fn backward(&self, saved: &[Tensor], grad_y: &Tensor, _train: bool) -> Result<Vec<Option<Tensor>>, Error> {
        assert!(saved.is_empty());
        self.backwards.fetch_add(1, Ordering::SeqCst);
        if self.panic_in_backward {
            panic!("kernel exploded");
        }
        if self.fail == Some("backward") {
            return Err(Error("backward refused".into()));
        }
        Ok(vec![Some(grad_y * 3.0)])
    }
}

fn tripler(fail: Option<&'static str>, panic_in_backward: bool) -> Arc<Tripler> {
    Arc::new(Tripler { backwards: AtomicUsize::new(0), fail, panic_in_backward })
}

#[test]
fn backward_runs_our_callback_and_releases_it_with_the_graph() {
    let k = tripler(None, false);
    let x = Tensor::from_slice(&[1.0f64, -2.0, 0.5]).set_requires_grad(true);
    let y = shim::custom_function(k.clone(), &[&x], true).unwrap();
    assert_eq!(Arc::strong_count(&k), 2, "the graph holds the kernels until it is freed");
    assert_eq!(Vec::<f64>::try_from(&y).unwrap(), vec![1.0, -2.0, 0.5]);
    (&y * Tensor::from_slice(&[1.0f64, 2.0, 4.0])).sum(Kind::Double).backward();
    assert_eq!(k.backwards.load(Ordering::SeqCst), 1);
    assert_eq!(Vec::<f64>::try_from(x.grad()).unwrap(), vec![3.0, 6.0, 12.0]);
    drop(y);
    assert_eq!(Arc::strong_count(&k), 1, "freeing the graph drops the kernels");
}

#[test]
fn failures_in_either_half_are_errors() {
    let x = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
    let e = shim::custom_function(tripler(Some("forward"), false), &[&x], true).unwrap_err();
    assert!(e.0.contains("forward refused"), "{e}");

    for (k, want) in [(tripler(Some("backward"), false), "backward refused"), (tripler(None, true), "kernel exploded")] {
        let y = shim::custom_function(k.clone(), &[&x], true).unwrap();
        let e = y.sum(Kind::Double).f_backward().unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(k.backwards.load(Ordering::SeqCst), 1);
    }
}

#[test]
fn a_layer_with_kernels_checks_its_input_first() {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let layer = common::registry().layer("layer_norm").unwrap().build(&vs.root(), &[2, 4]).unwrap().with_derived_backward();
    vs.double();
    let e = layer.try_forward_t(&Tensor::zeros([2, 5], (Kind::Double, Device::Cpu)), true).unwrap_err();
    assert!(e.0.contains("needs shape"), "{e}");
    let y = layer.forward_t(&Tensor::ones([2, 4], (Kind::Double, Device::Cpu)), true);
    assert_eq!(y.size(), vec![2, 4]);
}

#[test]
fn a_cleared_gradient_is_replaced_not_added_to() {
    // What the GPU check does before each timed forward + backward, as the peers' benchmarks
    // set `grad = None`: without it every run after the first adds into the input's gradient,
    // three more passes over the input.
    let x = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    for _ in 0..2 {
        (&x * 2.0).sum(Kind::Float).backward();
    }
    assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![4.0; 3]);
    shim::clear_grad(&mut x.shallow_clone()).unwrap();
    assert!(!x.grad().defined());
    (&x * 3.0).sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![3.0; 3]);
}

#[test]
fn the_cuda_stream_is_unavailable_without_cuda() {
    if normforge::torch::load_cuda() {
        eprintln!("skipped: CUDA is available here (the GPU check script covers the stream)");
        return;
    }
    assert_eq!(shim::current_cuda_stream(0), None);
}

#[test]
fn a_pinned_upload_without_cuda_is_an_error_not_an_abort() {
    if normforge::torch::load_cuda() {
        eprintln!("skipped: CUDA is available here (the GPU check uploads through it)");
        return;
    }
    let e = shim::upload_pinned(&[1, 2, 3], 0).unwrap_err();
    assert!(!e.0.is_empty());
}

#[test]
fn backward_with_a_given_output_gradient() {
    let x = Tensor::from_slice(&[1.0f64, 2.0, 3.0]).set_requires_grad(true);
    let y = x.square();
    shim::backward_with_grad(&y, &Tensor::from_slice(&[1.0f64, 10.0, 100.0])).unwrap();
    assert_eq!(Vec::<f64>::try_from(x.grad()).unwrap(), vec![2.0, 40.0, 600.0]);
    let e = shim::backward_with_grad(&x.square(), &Tensor::from_slice(&[1.0f64])).unwrap_err();
    assert!(e.0.contains("shape") || e.0.contains("size") || e.0.contains("Mismatch"), "{e}");
}
