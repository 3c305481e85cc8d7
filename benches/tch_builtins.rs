//! The tch backend on the CPU against libtorch's built-ins, for each std entry libtorch has
//! (`builtins::LAYERS`, `builtins::OPTIMIZERS`): what the main job pays for writing its norm
//! and its rule in the DSL. A layer is timed forward (training) and forward + backward (the
//! input's and the parameters' gradients); a rule's step over the main job's CNN (14 small
//! tensors, where each operation's dispatch dominates) and over 4 x 1024^2 + 4 x 1024
//! (memory traffic dominates). A layer's backward is timed both ways ours runs: libtorch
//! differentiating the lowered forward (the default), and the DSL's derived backward as one
//! autograd node (`with_derived_backward`). A rule is timed as a user gets it, with the
//! non-finite check, and without it (`skip_nonfinite = false`), since libtorch's optimizers do
//! no such check.
//! Each figure is the fastest of 15 runs (`fastest_ms`), on one libtorch thread.
//! A bench binary: `cargo bench --bench tch_builtins` prints two tables; run by the tests
//! (without `--bench`), it takes each case once at its first shape.

use normforge::tch::nn::{self, ModuleT};
use normforge::tch::{Device, Kind, Tensor};
use normforge::torch::builtins;
use normforge::RegistryExt;

mod common;
use common::fastest_ms;

/// Whether this is a timing run (`cargo bench` passes `--bench`), not the tests' one pass.
fn timing() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn reps() -> usize {
    if timing() {
        15
    } else {
        1
    }
}

/// How many shapes or parameter sets a case takes: the first alone in the tests' pass.
fn cases() -> usize {
    if timing() {
        2
    } else {
        1
    }
}

/// The shapes each layer is timed at: channels last for the per-row norms, NCHW for the rest;
/// the first near the main job's norms (batches of 64, 16 to 64 channels of 16 x 16 to 4 x 4).
fn layer_shapes(name: &str) -> [[i64; 4]; 2] {
    match name {
        "layer_norm" | "rms_norm" => [[64, 16, 16, 32], [16, 32, 32, 1024]],
        _ => [[64, 32, 16, 16], [32, 64, 32, 32]],
    }
}

/// Forward and forward + backward of `f`, in ms.
fn time_layer(x: &Tensor, params: &[Tensor], f: impl Fn(&Tensor) -> Tensor) -> (f64, f64) {
    let gy = Tensor::randn(x.size(), (Kind::Float, Device::Cpu));
    let fwd = fastest_ms(reps(), || {
        let _ = normforge::tch::no_grad(|| f(x));
    });
    let x = x.detach().set_requires_grad(true);
    let mut inputs = vec![x.shallow_clone()];
    inputs.extend(params.iter().map(Tensor::shallow_clone));
    let both = fastest_ms(reps(), || {
        let loss = (f(&x) * &gy).sum(Kind::Float);
        let _ = Tensor::run_backward(&[loss], &inputs, false, false);
    });
    (fwd, both)
}

fn layers(reg: &normforge::Registry) {
    println!("| layer | shape | forward: ours (ms) | libtorch (ms) | ours / libtorch | forward + backward: ours (ms) | derived backward (ms) | libtorch (ms) | ours / libtorch | derived / libtorch |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for name in builtins::LAYERS {
        for shape in layer_shapes(name).into_iter().take(cases()) {
            normforge::tch::manual_seed(0);
            let vs = nn::VarStore::new(Device::Cpu);
            let mut spec = reg.layer(name).expect("a std layer");
            if name == "group_norm" {
                spec = spec.hparam("groups", 8.0);
            }
            let layer = spec.build(&vs.root(), &shape).expect("builds");
            let x = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            let ours = time_layer(&x, layer.params(), |x| layer.forward_t(x, true));
            let vs = nn::VarStore::new(Device::Cpu);
            let derived = spec.build(&vs.root(), &shape).expect("builds").with_derived_backward();
            let (_, derived) = time_layer(&x, derived.params(), |x| derived.forward_t(x, true));
            let theirs = time_layer(&x, layer.params(), |x| {
                builtins::layer(layer.entry(), layer.hparams(), x, layer.params(), layer.buffers(), true).expect("libtorch has it").expect("runs")
            });
            let dims = shape.map(|d| d.to_string()).join("x");
            println!(
                "| {name} | {dims} | {:.2} | {:.2} | {:.2}x | {:.2} | {derived:.2} | {:.2} | {:.2}x | {:.2}x |",
                ours.0,
                theirs.0,
                ours.0 / theirs.0,
                ours.1,
                theirs.1,
                ours.1 / theirs.1,
                derived / theirs.1
            );
        }
    }
}

/// The main job's CNN: three 3x3 convolutions of 16, 32 and 64 channels with their biases,
/// a norm's weight and bias after each, and a linear head to four classes.
const CNN: [&[i64]; 14] = [&[16, 1, 3, 3], &[16], &[16], &[16], &[32, 16, 3, 3], &[32], &[32], &[32], &[64, 32, 3, 3], &[64], &[64], &[64], &[4, 64], &[4]];
const WIDE: [&[i64]; 8] = [&[1024, 1024], &[1024], &[1024, 1024], &[1024], &[1024, 1024], &[1024], &[1024, 1024], &[1024]];

/// A store holding `shapes`, each with a gradient that stays set, so every step reads it.
fn store(shapes: &[&[i64]]) -> nn::VarStore {
    normforge::tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let vars: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| vs.root().var_copy(&format!("p{i:02}"), &Tensor::randn(*s, (Kind::Float, Device::Cpu)))).collect();
    let loss = vars.iter().map(|v| (v * Tensor::randn(v.size(), (Kind::Float, Device::Cpu))).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
    vs
}

fn optimizers(reg: &normforge::Registry) {
    println!("| rule | parameters | ours (ms) | ours unchecked (ms) | libtorch (ms) | ours / libtorch | unchecked / libtorch |");
    println!("|---|---|---|---|---|---|---|");
    for name in builtins::OPTIMIZERS {
        let sets = [("main job's CNN, 14 tensors", &CNN[..]), ("4 x 1024^2 + 4 x 1024", &WIDE[..])];
        for (set, shapes) in sets.into_iter().take(cases()) {
            let spec = reg.optimizer(name).expect("a std rule");
            let vs = store(shapes);
            let mut ours = spec.build(&vs).expect("builds");
            let checked = fastest_ms(reps(), || {
                ours.step().expect("steps");
            });
            ours.skip_nonfinite = false;
            let unchecked = fastest_ms(reps(), || {
                ours.step().expect("steps");
            });
            let vs = store(shapes);
            let mut theirs = builtins::optimizer(&spec.0.entry, &ours.groups()[0].hparams, &vs).expect("libtorch has it").expect("builds");
            let t = fastest_ms(reps(), || theirs.step());
            println!("| {name} | {set} | {checked:.3} | {unchecked:.3} | {t:.3} | {:.2}x | {:.2}x |", checked / t, unchecked / t);
        }
    }
}

fn main() {
    let reg = normforge::builtin_registry().expect("the standard library loads");
    // One thread: two threads on this project's 2-core machines contend with everything else
    // there, and the figures scatter by several times from run to run.
    normforge::tch::set_num_threads(1);
    println!("libtorch threads: {}", normforge::tch::get_num_threads());
    layers(&reg);
    println!();
    optimizers(&reg);
}
