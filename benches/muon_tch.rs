//! Muon on libtorch: the DSL rule through `DslOptimizer` (its Gram matrices lowered to
//! `einsum`, only the taken branch run) against the same step written directly in libtorch
//! operations, as `torch.optim.Muon`'s single-tensor loop issues them (lerp, norm, five times
//! three matrix products; tch's `addmm` lacks torch's `alpha`/`beta`, so the scalings are
//! separate multiplies) — in f32 here, where torch's runs the iteration in bf16.
//! A bench binary: `cargo bench --bench muon_tch`. Prints one table row per shape.

use normforge::tch::{nn, Device, Kind, Tensor};
use normforge::RegistryExt;

mod common;
use common::median_ms;

/// One Muon step in libtorch operations (defaults: momentum 0.95, Nesterov, lr 1e-3, weight
/// decay 0.1, eps 1e-7, five steps of (3.4445, -4.775, 2.0315)).
fn direct_step(p: &Tensor, g: &Tensor, buf: &mut Tensor) {
    let (lr, wd, mu) = (1e-3, 0.1, 0.95);
    *buf = buf.lerp(g, 1.0 - mu);
    let update = g.lerp(&*buf, mu);
    let mut x = &update / update.norm().clamp_min(1e-7);
    let tall = p.size()[0] > p.size()[1];
    if tall {
        x = x.tr();
    }
    for _ in 0..5 {
        let a = x.matmul(&x.tr());
        let b = &a * -4.775 + a.matmul(&a) * 2.0315;
        x = &x * 3.4445 + b.matmul(&x);
    }
    if tall {
        x = x.tr();
    }
    let (rows, cols) = (p.size()[0] as f64, p.size()[1] as f64);
    let scale = (rows / cols).max(1.0).sqrt();
    normforge::tch::no_grad(|| {
        let _ = p.shallow_clone().g_mul_scalar_(1.0 - lr * wd);
        let _ = p.shallow_clone().g_add_(&(x * (-lr * scale)));
    });
}

fn main() {
    let reg = normforge::builtin_registry().expect("the standard library loads");
    println!("| shape | normforge (ms) | libtorch ops (ms) | normforge / libtorch |");
    println!("|---|---|---|---|");
    for shape in [[256i64, 256], [1024, 1024], [2048, 512], [512, 2048]] {
        normforge::tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::randn(shape, (Kind::Float, Device::Cpu)));
        let g = Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let mut opt = reg.optimizer("muon").expect("muon").build(&vs).expect("builds");
        // The gradient stays set: every step reads the same one.
        (&w * &g).sum(Kind::Float).backward();
        let ours = median_ms(7, || {
            opt.step().expect("step");
        });
        let p = w.detach().copy();
        let mut buf = Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let theirs = median_ms(7, || direct_step(&p, &g, &mut buf));
        println!("| {}x{} | {ours:.1} | {theirs:.1} | {:.2}x |", shape[0], shape[1], ours / theirs);
    }
}
