//! The tch backend on the CPU: DSL layers against libtorch's own `layer_norm`, `batch_norm`
//! and `group_norm` (forward and gradients, f32), DSL optimizers against tch's `nn::Sgd`,
//! `nn::Adam` and `nn::AdamW` over 20 steps, every std layer's autograd gradient against the
//! reference backend's derived one (f64), state save/load, non-finite gradients, bad input.

mod common;

use normforge::reference;
use normforge::tch::nn::{self, ModuleT, OptimizerConfig};
use normforge::tch::{Device, Kind, Tensor};
use normforge::torch::{DslLayer, DslOptimizer, StepReport};
use normforge::RegistryExt;

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let diff = f64::try_from((a - b).abs().max().to_kind(Kind::Double)).unwrap();
    let scale = f64::try_from(b.abs().max().to_kind(Kind::Double)).unwrap().max(1e-30);
    diff / scale
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let e = max_rel(a, b);
    assert!(e < tol, "{what}: max relative difference {e:e} (tolerance {tol:e})");
}

fn set(t: &Tensor, v: &Tensor) {
    let mut h = t.shallow_clone();
    normforge::tch::no_grad(|| h.copy_(v));
}

fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (kind, Device::Cpu))
}

/// Build a DSL layer with random parameters and buffers.
fn dsl_layer(name: &str, hparams: &[(&str, f64)], shape: &[i64], kind: Kind) -> (nn::VarStore, DslLayer) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mut spec = common::registry().layer(name).unwrap();
    for (k, v) in hparams {
        spec = spec.hparam(k, *v);
    }
    let layer = spec.build(&vs.root(), shape).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    for p in layer.params() {
        set(p, &(randn(&p.size(), kind) * 0.3 + 1.0));
    }
    for b in layer.buffers() {
        set(b, &(Tensor::rand(b.size(), (kind, Device::Cpu)) + 0.5));
    }
    (vs, layer)
}

/// Forward and input/parameter gradients of `sum(y * gy)`.
fn grads(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, params: &[Tensor], gy: &Tensor) -> (Tensor, Tensor, Vec<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    for p in params {
        let mut p = p.shallow_clone();
        p.zero_grad();
    }
    let y = f(&x);
    (&y * gy).sum(Kind::Double).backward();
    (y.detach(), x.grad(), params.iter().map(|p| p.grad().copy()).collect())
}

#[test]
fn layer_norm_matches_libtorch() {
    let _seeded = normforge::torch::seeded(1);
    for shape in [[4i64, 7], [3, 16]] {
        let d = shape[1];
        let (_vs, layer) = dsl_layer("layer_norm", &[], &shape, Kind::Float);
        let (w, b) = (layer.params()[0].shallow_clone(), layer.params()[1].shallow_clone());
        let x = randn(&shape, Kind::Float);
        let gy = randn(&shape, Kind::Float);
        let ours = grads(|x| layer.forward_t(x, true), &x, layer.params(), &gy);
        let theirs = grads(|x| x.layer_norm([d], Some(&w), Some(&b), 1e-5, false), &x, layer.params(), &gy);
        assert_close("layer_norm y", &ours.0, &theirs.0, 1e-5);
        assert_close("layer_norm grad x", &ours.1, &theirs.1, 1e-5);
        for (k, (a, b)) in ours.2.iter().zip(&theirs.2).enumerate() {
            assert_close(&format!("layer_norm grad param {k}"), a, b, 1e-5);
        }
    }
}

#[test]
fn group_norm_matches_libtorch() {
    let _seeded = normforge::torch::seeded(2);
    for (shape, groups) in [([4i64, 6, 5], 3i64), ([2, 8, 3], 2)] {
        let (_vs, layer) = dsl_layer("group_norm", &[("groups", groups as f64)], &shape, Kind::Float);
        let (w, b) = (layer.params()[0].shallow_clone(), layer.params()[1].shallow_clone());
        let x = randn(&shape, Kind::Float);
        let gy = randn(&shape, Kind::Float);
        let ours = grads(|x| layer.forward_t(x, true), &x, layer.params(), &gy);
        let theirs = grads(|x| x.group_norm(groups, Some(&w), Some(&b), 1e-5, false), &x, layer.params(), &gy);
        assert_close("group_norm y", &ours.0, &theirs.0, 1e-5);
        assert_close("group_norm grad x", &ours.1, &theirs.1, 1e-5);
        for (k, (a, b)) in ours.2.iter().zip(&theirs.2).enumerate() {
            assert_close(&format!("group_norm grad param {k}"), a, b, 1e-5);
        }
    }
}

#[test]
fn batch_norm_matches_libtorch_with_running_statistics() {
    let _seeded = normforge::torch::seeded(3);
    for train in [true, false] {
        let shape = [5i64, 3, 4];
        let (_vs, layer) = dsl_layer("batch_norm", &[], &shape, Kind::Float);
        let (w, b) = (layer.params()[0].shallow_clone(), layer.params()[1].shallow_clone());
        let rm = layer.buffers()[0].copy();
        let rv = layer.buffers()[1].copy();
        let x = randn(&shape, Kind::Float) * 2.0 + 0.5;
        let gy = randn(&shape, Kind::Float);
        let ours = grads(|x| layer.forward_t(x, train), &x, layer.params(), &gy);
        let theirs = grads(|x| Tensor::batch_norm(x, Some(&w), Some(&b), Some(&rm), Some(&rv), train, 0.1, 1e-5, false), &x, layer.params(), &gy);
        assert_close(&format!("batch_norm y (train={train})"), &ours.0, &theirs.0, 1e-5);
        assert_close(&format!("batch_norm grad x (train={train})"), &ours.1, &theirs.1, 1e-5);
        for (k, (a, b)) in ours.2.iter().zip(&theirs.2).enumerate() {
            assert_close(&format!("batch_norm grad param {k} (train={train})"), a, b, 1e-5);
        }
        assert_close("running_mean", &layer.buffers()[0], &rm, 1e-5);
        assert_close("running_var", &layer.buffers()[1], &rv, 1e-5);
    }
}

/// Two identical VarStores; returns them with their variables (sorted by name).
fn twin_stores(shapes: &[&[i64]]) -> (nn::VarStore, nn::VarStore) {
    let a = nn::VarStore::new(Device::Cpu);
    let b = nn::VarStore::new(Device::Cpu);
    for (i, s) in shapes.iter().enumerate() {
        let init = randn(s, Kind::Float);
        let _ = a.root().var_copy(&format!("p{i}"), &init);
        let _ = b.root().var_copy(&format!("p{i}"), &init);
    }
    (a, b)
}

fn sorted_vars(vs: &nn::VarStore) -> Vec<Tensor> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|x, y| x.0.cmp(&y.0));
    v.into_iter().map(|(_, t)| t).collect()
}

/// `loss = sum_i sum(p_i * G_i)` so that every gradient is the given G.
fn loss_with_grads(vars: &[Tensor], gs: &[Tensor]) -> Tensor {
    vars.iter().zip(gs).map(|(p, g)| (p * g).sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b)
}

fn trajectory_matches(name: &str, hparams: &[(&str, f64)], theirs: impl OptimizerConfig) {
    let lr = hparams.iter().find(|(k, _)| *k == "lr").unwrap().1;
    trajectory_follows(name, hparams, |vs| theirs.build(vs, lr).unwrap());
}

/// 20 steps of the DSL rule `name` and of the optimizer `theirs` builds, from the same values
/// with the same gradients.
fn trajectory_follows(name: &str, hparams: &[(&str, f64)], theirs: impl FnOnce(&nn::VarStore) -> nn::Optimizer) {
    let _seeded = normforge::torch::seeded(4);
    let shapes: [&[i64]; 3] = [&[4, 3], &[7], &[2, 3, 5]];
    let (vs_a, vs_b) = twin_stores(&shapes);
    let mut spec = common::registry().optimizer(name).unwrap();
    for (k, v) in hparams {
        spec = spec.hparam(k, *v);
    }
    let mut ours = spec.build(&vs_a).unwrap();
    let mut reference = theirs(&vs_b);
    let (va, vb) = (sorted_vars(&vs_a), sorted_vars(&vs_b));
    for step in 1..=20 {
        let gs: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float)).collect();
        assert!(matches!(ours.backward_step(&loss_with_grads(&va, &gs)).unwrap(), StepReport::Applied { .. }));
        reference.backward_step(&loss_with_grads(&vb, &gs));
        for (i, (a, b)) in va.iter().zip(&vb).enumerate() {
            assert_close(&format!("{name} tensor {i} after step {step}"), a, b, 1e-5);
        }
    }
}

#[test]
fn sgd_matches_tch() {
    trajectory_matches("sgd", &[("lr", 0.05)], nn::Sgd::default());
    trajectory_matches(
        "sgd",
        &[("lr", 0.05), ("momentum", 0.9), ("dampening", 0.1), ("weight_decay", 0.01)],
        nn::Sgd { momentum: 0.9, dampening: 0.1, wd: 0.01, nesterov: false },
    );
    trajectory_matches("sgd", &[("lr", 0.05), ("momentum", 0.9), ("nesterov", 1.0)], nn::Sgd { momentum: 0.9, dampening: 0.0, wd: 0.0, nesterov: true });
}

#[test]
fn adam_matches_tch() {
    trajectory_matches("adam", &[("lr", 0.01)], nn::Adam::default());
    trajectory_matches(
        "adam",
        &[("lr", 0.02), ("beta1", 0.8), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.1)],
        nn::Adam { beta1: 0.8, beta2: 0.99, wd: 0.1, eps: 1e-6, amsgrad: false },
    );
}

#[test]
fn adamw_matches_tch() {
    trajectory_matches("adamw", &[("lr", 0.01)], nn::AdamW::default());
    trajectory_matches(
        "adamw",
        &[("lr", 0.02), ("beta1", 0.85), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.2)],
        nn::AdamW { beta1: 0.85, beta2: 0.99, wd: 0.2, eps: 1e-6, amsgrad: false },
    );
}

/// `builtins` (the GPU check's second oracle) maps each rule's hyper-parameters onto libtorch's
/// own optimizer: away from every default, the trajectories agree.
#[test]
fn libtorch_builtin_optimizers_follow_the_rules() {
    let cases: [(&str, &[(&str, f64)]); 5] = [
        ("sgd", &[("lr", 0.05), ("momentum", 0.9), ("dampening", 0.1), ("weight_decay", 0.01)]),
        ("sgd", &[("lr", 0.05), ("momentum", 0.8), ("nesterov", 1.0)]),
        ("adam", &[("lr", 0.02), ("beta1", 0.8), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.1)]),
        ("amsgrad", &[("lr", 0.02), ("beta1", 0.85), ("beta2", 0.9), ("eps", 1e-6), ("weight_decay", 0.05)]),
        ("adamw", &[("lr", 0.02), ("beta1", 0.85), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.2)]),
    ];
    for (name, hparams) in cases {
        let entry = common::registry().get(name).unwrap().entry;
        let overrides: Vec<(String, f64)> = hparams.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let resolved = normforge::dsl::hyper::resolve(&entry, &overrides).unwrap();
        trajectory_follows(name, hparams, |vs| normforge::torch::builtins::optimizer(&entry, &resolved, vs).expect("a built-in").unwrap());
    }
    for name in normforge::torch::builtins::OPTIMIZERS {
        assert!(cases.iter().any(|c| c.0 == name), "{name} untested");
    }
    let lion = common::registry().get("lion").unwrap().entry;
    assert!(normforge::torch::builtins::optimizer(&lion, &[], &nn::VarStore::new(Device::Cpu)).is_none());
}

/// Likewise for layers: output, input and parameter gradients, and batch norm's running
/// statistics, with hyper-parameters away from their defaults.
#[test]
fn libtorch_builtin_layers_follow_the_layers() {
    let _seeded = normforge::torch::seeded(8);
    type Case<'a> = (&'a str, &'a [(&'a str, f64)], [i64; 3]);
    let cases: [Case; 5] = [
        ("layer_norm", &[("eps", 1e-2)], [3, 4, 9]),
        ("rms_norm", &[("eps", 1e-2)], [3, 4, 9]),
        ("group_norm", &[("groups", 2.0), ("eps", 1e-2)], [3, 4, 9]),
        ("instance_norm", &[("eps", 1e-2)], [3, 4, 9]),
        ("batch_norm", &[("eps", 1e-2), ("momentum", 0.3)], [3, 4, 9]),
    ];
    for (name, hparams, shape) in cases {
        let entry = common::registry().get(name).unwrap().entry;
        for train in [true, false] {
            let (_vs, layer) = dsl_layer(name, hparams, &shape, Kind::Float);
            let buffers: Vec<Tensor> = layer.buffers().iter().map(Tensor::copy).collect();
            let x = randn(&shape, Kind::Float) * 2.0 + 0.5;
            let gy = randn(&shape, Kind::Float);
            let ours = grads(|x| layer.forward_t(x, train), &x, layer.params(), &gy);
            let builtin = |x: &Tensor| normforge::torch::builtins::layer(&entry, layer.hparams(), x, layer.params(), &buffers, train).expect("a built-in").unwrap();
            let theirs = grads(builtin, &x, layer.params(), &gy);
            let what = format!("{name} (train={train})");
            assert_close(&format!("{what} y"), &ours.0, &theirs.0, 1e-5);
            assert_close(&format!("{what} grad x"), &ours.1, &theirs.1, 1e-4);
            for (k, (a, b)) in ours.2.iter().zip(&theirs.2).enumerate() {
                assert_close(&format!("{what} grad param {k}"), a, b, 1e-4);
            }
            for (a, b) in layer.buffers().iter().zip(&buffers) {
                assert_close(&format!("{what} buffer"), a, b, 1e-5);
            }
        }
    }
    for name in normforge::torch::builtins::LAYERS {
        assert!(cases.iter().any(|c| c.0 == name), "{name} untested");
    }
    let dyt = common::registry().get("dyt").unwrap().entry;
    assert!(normforge::torch::builtins::layer(&dyt, &[], &randn(&[2, 3], Kind::Float), &[], &[], true).is_none());
}

#[test]
fn every_std_layer_matches_the_reference_gradient() {
    let _seeded = normforge::torch::seeded(21);
    let mut rng = common::Rng::new(21);
    for r in common::registry().list(None) {
        if r.entry.kind == normforge::dsl::ir::Kind::Optimizer {
            continue;
        }
        let (shape, hparams): (Vec<usize>, Vec<(&str, f64)>) = match r.entry.axes.len() {
            2 => (vec![3, 2, 5], vec![]),
            _ => (vec![3, 4, 2, 3], vec![("groups", 2.0)]),
        };
        let hparams: Vec<(&str, f64)> = hparams.into_iter().filter(|(k, _)| r.entry.hparams.iter().any(|h| h.name == *k)).collect();
        let ishape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        for train in [true, false] {
            let (_vs, layer) = dsl_layer(&r.name, &hparams, &ishape, Kind::Double);
            let overrides: Vec<(String, f64)> = hparams.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            let mut oracle = reference::Layer::new(r.entry.clone(), &overrides, &shape).unwrap();
            for (o, t) in oracle.params.iter_mut().zip(layer.params()).chain(oracle.buffers.iter_mut().zip(layer.buffers())) {
                o.data = Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
            }
            let x = rng.tensor(&shape);
            let gy = rng.tensor(&shape);
            let want = oracle.backward(&x, &gy, train).unwrap();
            let xt = Tensor::from_slice(&x.data).reshape(&ishape);
            let gyt = Tensor::from_slice(&gy.data).reshape(&ishape);
            let got = grads(|x| layer.forward_t(x, train), &xt, layer.params(), &gyt);
            let want_x = Tensor::from_slice(&want.input.data).reshape(&ishape);
            assert_close(&format!("{} grad x (train={train})", r.name), &got.1, &want_x, 1e-9);
            for (k, (g, w)) in got.2.iter().zip(&want.params).enumerate() {
                let w = Tensor::from_slice(&w.data).reshape(g.size());
                assert_close(&format!("{} grad {} (train={train})", r.name, r.entry.params[k].name), g, &w, 1e-9);
            }
        }
    }
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u8>> {
    ts.iter()
        .map(|t| {
            let v = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        })
        .collect()
}

#[test]
fn saved_state_continues_the_trajectory_exactly() {
    let _seeded = normforge::torch::seeded(5);
    let shapes: [&[i64]; 2] = [&[5, 4], &[3]];
    let (vs_a, vs_b) = twin_stores(&shapes);
    let reg = common::registry();
    let mut a = reg.optimizer("adamw").unwrap().hparam("lr", 0.01).build(&vs_a).unwrap();
    let va = sorted_vars(&vs_a);
    let grads_for = |k: i64| -> Vec<Tensor> {
        let _seeded = normforge::torch::seeded(100 + k);
        shapes.iter().map(|s| randn(s, Kind::Float)).collect()
    };
    for k in 0..5 {
        a.backward_step(&loss_with_grads(&va, &grads_for(k))).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("normforge-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("adamw.safetensors");
    a.save(&file).unwrap();
    // A fresh optimizer over a copy of the parameters picks up where `a` left off.
    let vb = sorted_vars(&vs_b);
    for (b, a) in vb.iter().zip(&va) {
        set(b, a);
    }
    let mut b = reg.optimizer("adamw").unwrap().hparam("lr", 0.01).build(&vs_b).unwrap();
    b.load(&file).unwrap();
    assert_eq!(b.state_of("p0").unwrap().0, 5);
    for k in 5..15 {
        let gs = grads_for(k);
        a.backward_step(&loss_with_grads(&va, &gs)).unwrap();
        b.backward_step(&loss_with_grads(&vb, &gs)).unwrap();
    }
    assert_eq!(bits(&va), bits(&vb), "parameters diverged after loading the state");
    // The state's dtype survived the round trip.
    assert_eq!(b.state_of("p0").unwrap().1[0].kind(), Kind::Float);
    // A state of another dtype is refused, and nothing changes.
    let mut c = reg.optimizer("adamw").unwrap().build(&vs_b).unwrap();
    let bad = vec![
        ("p0::step".to_string(), Tensor::from_slice(&[3i64])),
        ("p0::m".to_string(), Tensor::zeros([5, 4], (Kind::Double, Device::Cpu))),
        ("p0::v".to_string(), Tensor::zeros([5, 4], (Kind::Double, Device::Cpu))),
    ];
    let bad_file = dir.join("bad.safetensors");
    Tensor::write_safetensors(&bad, &bad_file).unwrap();
    assert!(c.load(&bad_file).unwrap_err().0.contains("Double"));
    assert!(c.state_of("p0").is_none());
}

#[test]
fn a_per_tensor_state_is_saved_in_its_declared_shape_and_bad_files_change_nothing() {
    // NovoGrad keeps one second moment per tensor (`state v[]`) beside a per-element momentum.
    let _seeded = normforge::torch::seeded(7);
    let shapes: [&[i64]; 2] = [&[3, 4], &[5]];
    let (vs_a, vs_b) = twin_stores(&shapes);
    let reg = common::registry();
    let build = |vs: &nn::VarStore| reg.optimizer("novograd").unwrap().hparam("lr", 0.01).build(vs).unwrap();
    let (va, vb) = (sorted_vars(&vs_a), sorted_vars(&vs_b));
    let grads_for = |k: i64| -> Vec<Tensor> {
        let _seeded = normforge::torch::seeded(200 + k);
        shapes.iter().map(|s| randn(s, Kind::Float)).collect()
    };
    let mut a = build(&vs_a);
    for k in 0..3 {
        a.backward_step(&loss_with_grads(&va, &grads_for(k))).unwrap();
    }
    let dir = std::env::temp_dir().join(format!("normforge-state-novograd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("novograd.safetensors");
    a.save(&file).unwrap();
    let saved: Vec<(String, Tensor)> = Tensor::read_safetensors(&file).unwrap();
    let shape_of = |key: &str| saved.iter().find(|(k, _)| k == key).unwrap().1.size();
    assert_eq!(shape_of("p0::m"), vec![3, 4]);
    assert_eq!(shape_of("p0::v"), Vec::<i64>::new(), "a per-tensor state is one value");
    for (b, a) in vb.iter().zip(&va) {
        set(b, a);
    }
    let mut b = build(&vs_b);
    b.load(&file).unwrap();
    for k in 3..8 {
        let gs = grads_for(k);
        a.backward_step(&loss_with_grads(&va, &gs)).unwrap();
        b.backward_step(&loss_with_grads(&vb, &gs)).unwrap();
    }
    assert_eq!(bits(&va), bits(&vb), "parameters diverged after loading the state");

    // Each broken file is refused with what is wrong, and the optimizer keeps no part of it.
    let good: Vec<(String, Tensor)> = saved.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let with = |key: &str, t: Option<Tensor>| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = good.iter().filter(|(k, _)| k != key).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
        v.extend(t.map(|t| (key.to_string(), t)));
        v
    };
    let cases = [
        (with("p1::m", Some(Tensor::zeros([4], (Kind::Float, Device::Cpu)))), "the state of this parameter [5]"),
        (with("p0::v", Some(Tensor::zeros([3], (Kind::Float, Device::Cpu)))), "the state of this parameter []"),
        (with("p1::step", Some(Tensor::from_slice(&[0i64]))), "`p1::step` is not a step count"),
        (with("p1::v", None), "no tensor `p1::v`"),
        (with("p2::m", Some(Tensor::zeros([1], (Kind::Float, Device::Cpu)))), "`p2::m` belongs to no parameter"),
    ];
    for (i, (tensors, why)) in cases.into_iter().enumerate() {
        let bad = dir.join(format!("bad{i}.safetensors"));
        Tensor::write_safetensors(&tensors, &bad).unwrap();
        let mut c = build(&vs_b);
        let err = c.load(&bad).unwrap_err().0;
        assert!(err.contains(why), "case {i}: {err}");
        assert!(c.state_of("p0").is_none() && c.state_of("p1").is_none(), "case {i}: a refused file left a state");
    }
}

#[test]
fn a_non_finite_gradient_changes_nothing_and_is_reported() {
    let _seeded = normforge::torch::seeded(6);
    let shapes: [&[i64]; 2] = [&[4, 4], &[6]];
    let (vs, _) = twin_stores(&shapes);
    let mut opt: DslOptimizer = common::registry().optimizer("adam").unwrap().hparam("lr", 0.01).build(&vs).unwrap();
    let vars = sorted_vars(&vs);
    for _ in 0..3 {
        let gs: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float)).collect();
        opt.backward_step(&loss_with_grads(&vars, &gs)).unwrap();
    }
    let before_p = bits(&vars);
    let before_s: Vec<Vec<Vec<u8>>> = ["p0", "p1"].iter().map(|n| bits(opt.state_of(n).unwrap().1)).collect();
    let gs: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float)).collect();
    let _ = gs[1].get(2).fill_(f64::NAN);
    let report = opt.backward_step(&loss_with_grads(&vars, &gs)).unwrap();
    assert_eq!(report, StepReport::SkippedNonFinite { param: "p1".into() });
    assert_eq!(bits(&vars), before_p);
    let after_s: Vec<Vec<Vec<u8>>> = ["p0", "p1"].iter().map(|n| bits(opt.state_of(n).unwrap().1)).collect();
    assert_eq!(after_s, before_s);
    assert_eq!(opt.state_of("p0").unwrap().0, 3, "the step count moved");
}

#[test]
fn bad_inputs_are_errors() {
    let _seeded = normforge::torch::seeded(10);
    let (_vs, layer) = dsl_layer("layer_norm", &[], &[2, 8], Kind::Float);
    let e = layer.try_forward_t(&randn(&[2, 7], Kind::Float), true).unwrap_err();
    assert!(e.0.contains("`weight` needs shape [7] for it, but has [8]"), "{e}");
    let e = layer.try_forward_t(&Tensor::zeros([2, 8], (Kind::Int64, Device::Cpu)), true).unwrap_err();
    assert!(e.0.contains("floating-point"), "{e}");
    let e = common::registry().layer("adamw").unwrap_err();
    assert!(e.0.contains("not a layer"), "{e}");
    let vs = nn::VarStore::new(Device::Cpu);
    let e = common::registry().layer("group_norm").unwrap().hparam("groups", 3.0).build(&vs.root(), &[2, 8]).unwrap_err();
    assert!(e.0.contains("cannot be split into 3"), "{e}");
    let e = common::registry().optimizer("adamw").unwrap().hparam("beta1", 1.5).build(&vs).unwrap_err();
    assert!(e.0.contains("outside the range"), "{e}");
}

#[test]
fn parameter_groups_take_their_own_hyper_parameters() {
    let _seeded = normforge::torch::seeded(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let w = (vs.root() / "linear").var_copy("weight", &randn(&[3, 3], Kind::Float));
    let b = (vs.root() / "linear").var_copy("bias", &randn(&[3], Kind::Float));
    let mut opt = common::registry().optimizer("adamw").unwrap().hparam("lr", 0.1).hparam("weight_decay", 0.5).build(&vs).unwrap();
    assert_eq!(opt.split_group(|n| n.ends_with("bias"), &[("weight_decay".into(), 0.0)]).unwrap(), 1);
    // With a zero gradient Adam's update is zero: only decoupled weight decay moves a parameter.
    let (w0, b0) = (w.copy(), b.copy());
    opt.backward_step(&((&w * 0.0).sum(Kind::Float) + (&b * 0.0).sum(Kind::Float))).unwrap();
    assert_close("decayed weight", &w, &(&w0 * (1.0 - 0.1 * 0.5)), 1e-6);
    assert_eq!(bits(&[b.copy()]), bits(&[b0]), "the bias group decayed");
    // A schedule sets the rate of every group, through what a training loop holds.
    let generic: &mut dyn normforge::torch::Optimize = &mut opt;
    generic.set_hparam("lr", 0.0).unwrap();
    assert!(generic.set_hparam("lr", -1.0).is_err());
    // Clipping by global norm scales every gradient by the same factor: the norm of all their
    // values (a matrix's Frobenius norm, here sqrt(304), not its largest singular value).
    opt.max_grad_norm = Some(1e-3);
    let (w1, b1) = (w.copy(), b.copy());
    let m = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0]).reshape([3, 3]);
    let r = opt.backward_step(&((&w * &m).sum(Kind::Float) + (&b * 10.0).sum(Kind::Float))).unwrap();
    let want = (304f64 + 300.0).sqrt();
    assert!(matches!(r, StepReport::Applied { clipped: true, grad_norm: Some(n) } if (n - want).abs() < 1e-5 * want), "{r:?}");
    // At a rate of zero nothing moves, in either group.
    assert_eq!(bits(&[w.copy(), b.copy()]), bits(&[w1, b1]), "a step at lr 0 moved a parameter");
    // Gradients whose squares overflow f32 are finite: their norm too (summed again in f64).
    let r = opt.backward_step(&((&w * 1e30).sum(Kind::Float) + (&b * 1e30).sum(Kind::Float))).unwrap();
    let want = 12f64.sqrt() * f64::from(1e30f32);
    assert!(matches!(r, StepReport::Applied { clipped: true, grad_norm: Some(n) } if (n - want).abs() < 1e-6 * want), "{r:?}");
}

/// Muon's usual set-up: it takes the matrices, AdamW the rest. Given a vector, it refuses
/// with the reason and moves nothing.
#[test]
fn muon_takes_the_matrices_beside_adamw() {
    let _seeded = normforge::torch::seeded(8);
    let vs = nn::VarStore::new(Device::Cpu);
    let w = (vs.root() / "linear").var_copy("weight", &randn(&[5, 3], Kind::Float));
    let b = (vs.root() / "linear").var_copy("bias", &randn(&[5], Kind::Float));
    let reg = common::registry();
    let muon = reg.optimizer("muon").unwrap().hparam("lr", 0.02).hparam("weight_decay", 0.0);
    let mut matrices = muon.build_selected(&vs, |_, t| t.dim() == 2).unwrap();
    let mut rest = reg.optimizer("adamw").unwrap().hparam("lr", 0.01).build_selected(&vs, |_, t| t.dim() != 2).unwrap();
    assert_eq!(matrices.groups()[0].param_names(), ["linear.weight"]);
    assert_eq!(rest.groups()[0].param_names(), ["linear.bias"]);
    let (w0, b0) = (w.copy(), b.copy());
    let x = randn(&[4, 3], Kind::Float);
    let loss = || (x.matmul(&w.tr()) + &b).square().sum(Kind::Float);
    loss().backward();
    // The update Muon applies is orthogonalized: its singular values lie near 1 (the quintic
    // iteration lands in about [0.7, 1.2]), whatever the gradient's were.
    let g = w.grad().copy();
    assert!(matches!(matrices.step().unwrap(), StepReport::Applied { .. }));
    assert!(matches!(rest.step().unwrap(), StepReport::Applied { .. }));
    let update = (&w0 - &w) / (0.02 * (5.0f64 / 3.0).sqrt());
    let gram = update.tr().matmul(&update).to_kind(Kind::Double);
    let sv: Vec<f64> = Vec::<f64>::try_from(Tensor::linalg_eigvalsh(&gram, "L")).unwrap().iter().map(|e| e.sqrt()).collect();
    assert!(sv.iter().all(|s| (0.6..1.3).contains(s)), "singular values of the update {sv:?} (of the gradient: {g:?})");
    assert!(f64::try_from((&b - &b0).abs().sum(Kind::Double)).unwrap() > 0.0, "AdamW moved the bias");
    // A vector is not a matrix: an error naming it, and nothing changed.
    let mut wrong = muon.build(&vs).unwrap();
    loss().backward();
    let before = bits(&[w.copy(), b.copy()]);
    let e = wrong.step().unwrap_err();
    assert!(e.0.contains("linear.bias") && e.0.contains("[o, i]"), "{e}");
    assert_eq!(bits(&[w.copy(), b.copy()]), before);
}

/// Matrix products on libtorch run as `einsum` contractions that drop unit dims: rows and
/// columns of length one, and a 1x1 matrix, against the reference backend (f64, 3 steps).
#[test]
fn muon_on_degenerate_matrices_matches_the_reference() {
    let _seeded = normforge::torch::seeded(9);
    let entry = common::registry().get("muon").unwrap().entry;
    let h = [("lr".to_string(), 0.05)];
    let shapes: [&[i64]; 5] = [&[1, 5], &[5, 1], &[1, 1], &[3, 8], &[8, 3]];
    let mut vs = nn::VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let vars: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| vs.root().var_copy(&format!("p{i}"), &Tensor::randn(*s, (Kind::Double, Device::Cpu)))).collect();
    let to_ref = |t: &Tensor| {
        reference::Tensor::new(t.size().iter().map(|&d| d as usize).collect(), Vec::<f64>::try_from(t.flatten(0, -1)).unwrap()).unwrap()
    };
    let mut want: Vec<reference::Tensor> = vars.iter().map(to_ref).collect();
    let mut ours = DslOptimizer::new(entry.clone(), &vs, &h).unwrap();
    let mut oracle = reference::Optimizer::new(entry, &h).unwrap();
    for _ in 0..3 {
        let gs: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Double, Device::Cpu))).collect();
        let loss = vars.iter().zip(&gs).map(|(v, g)| (v * g).sum(Kind::Double)).fold(Tensor::zeros([], (Kind::Double, Device::Cpu)), |a, b| a + b);
        assert!(matches!(ours.backward_step(&loss).unwrap(), StepReport::Applied { .. }));
        oracle.step(&mut want, &gs.iter().map(to_ref).collect::<Vec<_>>()).unwrap();
        for (k, (v, w)) in vars.iter().zip(&want).enumerate() {
            let got = Vec::<f64>::try_from(v.flatten(0, -1)).unwrap();
            let e = common::rel_err(&got, &w.data);
            assert!(e < 1e-10, "muon {:?}: relative error {e:e} against the reference", shapes[k]);
        }
    }
}

#[test]
fn buffers_and_parameters_are_saved_with_the_var_store() {
    let _seeded = normforge::torch::seeded(8);
    let reg = common::registry();
    let vs = nn::VarStore::new(Device::Cpu);
    let layer = reg.layer("batch_norm").unwrap().build(&(vs.root() / "bn"), &[4, 3]).unwrap();
    for _ in 0..3 {
        let _ = layer.forward_t(&randn(&[4, 3], Kind::Float), true);
    }
    let names: Vec<String> = {
        let mut v: Vec<String> = vs.variables().into_keys().collect();
        v.sort();
        v
    };
    assert_eq!(names, ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]);
    let file = std::env::temp_dir().join(format!("normforge-vs-{}.safetensors", std::process::id()));
    vs.save(&file).unwrap();
    let mut fresh = nn::VarStore::new(Device::Cpu);
    let loaded = reg.layer("batch_norm").unwrap().build(&(fresh.root() / "bn"), &[4, 3]).unwrap();
    fresh.load(&file).unwrap();
    assert_eq!(bits(loaded.buffers()), bits(layer.buffers()));
    // Running statistics moved away from their initial values, and were restored.
    assert!(f64::try_from(loaded.buffers()[0].abs().sum(Kind::Double)).unwrap() > 0.0);
}

#[test]
fn loading_cuda_is_harmless_without_a_gpu() {
    // On a CPU-only machine libtorch_cuda cannot load; this must report false, not fail.
    let available = normforge::torch::load_cuda();
    assert_eq!(available, normforge::tch::Cuda::is_available());
}

const ADAMW_AWAY: [(&str, f64); 5] = [("lr", 0.02), ("beta1", 0.85), ("beta2", 0.99), ("eps", 1e-6), ("weight_decay", 0.2)];

/// torch's fused AdamW with [`ADAMW_AWAY`], from copies of `init`.
fn fused_adamw(init: &[Tensor]) -> normforge::torch::builtins::FusedAdamW {
    let entry = common::registry().get("adamw").unwrap().entry;
    let overrides: Vec<(String, f64)> = ADAMW_AWAY.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let resolved = normforge::dsl::hyper::resolve(&entry, &overrides).unwrap();
    normforge::torch::builtins::FusedAdamW::new(&entry, &resolved, init).expect("adamw has one").unwrap()
}

/// The oracle's binding (`builtins::fused_adamw`, the shim's argument order, the step count):
/// in f32, torch's fused kernel takes the rule's trajectory.
#[test]
fn torchs_fused_adamw_takes_the_adamw_rules_steps() {
    let _seeded = normforge::torch::seeded(7);
    let shapes: [&[i64]; 3] = [&[4, 3], &[7], &[2, 3, 5]];
    let (vs, _) = twin_stores(&shapes);
    let vars = sorted_vars(&vs);
    let mut torch = fused_adamw(&vars);
    let mut spec = common::registry().optimizer("adamw").unwrap();
    for (k, v) in ADAMW_AWAY {
        spec = spec.hparam(k, v);
    }
    let mut ours = spec.build(&vs).unwrap();
    for step in 1..=20 {
        let gs: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float)).collect();
        ours.backward_step(&loss_with_grads(&vars, &gs)).unwrap();
        torch.step(&gs).unwrap();
        for (i, (a, b)) in vars.iter().zip(&torch.params).enumerate() {
            assert_close(&format!("tensor {i} after step {step}"), a, b, 1e-5);
        }
    }
}

fn host(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

/// bf16 and f16 parameters, computed in f32 and stored in their dtype with their moments, as
/// torch's fused AdamW does: the CubeCL step kernels (lavapipe; bf16 held in f32 words,
/// rounded at every store) and the libtorch path (`DslOptimizer`, what the CUDA path runs for
/// rules its kernels cannot fuse) against torch's fused kernel on the CPU, over 10 steps. A
/// value rounded differently in some step (the f32 arithmetic's order differs, and with it the
/// CPU's vector width: torch's tail elements run another code path) is one unit in the last
/// place apart, at the largest magnitude it has had (it keeps that absolute difference as it
/// shrinks: `check::ulps_apart`); it can happen again at any later step, so after step k a value
/// is at most k units apart (the moments' own roundings move an update by far less than one
/// unit of the parameter). What tells a formula off, or arithmetic in bf16, from rounding is how
/// many values differ at all: at most 1% here, nearly every one otherwise.
#[test]
fn half_precision_parameters_step_as_torchs_fused_adamw_does() {
    use normforge::cubecl::{cpu_device, CubeOptimizer, Dtype};
    let device = cpu_device().unwrap();
    let shapes: [&[i64]; 3] = [&[40, 30], &[300], &[3, 7]];
    let overrides: Vec<(String, f64)> = ADAMW_AWAY.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    for (kind, dtype) in [(Kind::BFloat16, Dtype::BF16), (Kind::Half, Dtype::F16)] {
        let _seeded = normforge::torch::seeded(11);
        let init: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float).to_kind(kind)).collect();
        let mut torch = fused_adamw(&init);
        let entry = common::registry().get("adamw").unwrap().entry;
        let mut kernels = CubeOptimizer::new(entry, &overrides, &device).unwrap().with_param_dtype(dtype).unwrap().with_state_dtype(dtype).unwrap();
        let mut kernel_p: Vec<Vec<f32>> = init.iter().map(host).collect();
        let dims: Vec<Vec<usize>> = shapes.iter().map(|s| s.iter().map(|&d| d as usize).collect()).collect();
        let mut vs = nn::VarStore::new(Device::Cpu);
        for (i, t) in init.iter().enumerate() {
            let _ = vs.root().var_copy(&format!("p{i}"), t);
        }
        match kind {
            Kind::BFloat16 => vs.bfloat16(),
            _ => vs.half(),
        }
        let vars = sorted_vars(&vs);
        let mut spec = common::registry().optimizer("adamw").unwrap();
        for (k, v) in ADAMW_AWAY {
            spec = spec.hparam(k, v);
        }
        let mut lowered = spec.build(&vs).unwrap();
        let (mut worst, mut differ, mut total) = (0f64, 0, 0);
        // Per path, per tensor, the largest magnitude each value has had (`ulps_apart`).
        let mut peaks: Vec<Vec<Vec<f32>>> = (0..2).map(|_| kernel_p.iter().map(|p| vec![0.0; p.len()]).collect()).collect();
        for step in 1..=10 {
            let gs: Vec<Tensor> = shapes.iter().map(|s| randn(s, Kind::Float).to_kind(kind)).collect();
            torch.step(&gs).unwrap();
            kernels.step_shaped(&mut kernel_p, &gs.iter().map(host).collect::<Vec<_>>(), dims.clone()).unwrap();
            lowered.backward_step(&loss_with_grads(&vars, &gs)).unwrap();
            for (i, theirs) in torch.params.iter().enumerate() {
                assert_eq!(vars[i].kind(), kind);
                let theirs = host(theirs);
                for (j, (what, ours)) in [("step kernels", kernel_p[i].clone()), ("libtorch path", host(&vars[i]))].into_iter().enumerate() {
                    // Stored in `kind`: every value is one of its values.
                    assert_eq!(host(&Tensor::from_slice(&ours).to_kind(kind)), ours, "{kind:?} {what}: tensor {i} holds values {kind:?} cannot");
                    let (ulps, n) = normforge::cuda::check::ulps_apart(&ours, &theirs, kind, &mut peaks[j][i]);
                    assert!(ulps <= step as f64, "{kind:?} {what}: tensor {i} after step {step}: {ulps} units in the last place from torch's");
                    worst = worst.max(ulps);
                    differ += n;
                    total += ours.len();
                }
            }
        }
        eprintln!("{kind:?}: {differ} of {total} values differ from torch's, by {worst:.2} units in the last place at most");
        assert!(differ * 100 <= total, "{kind:?}: {differ} of {total} values differ from torch's");
    }
}

/// The lowering writes a result over a value its node reads last only where nothing else views
/// that value's memory: here `stop_gradient(a)` views `a`, and `a + 1` reads it last. Written
/// over `a`, the sum would show through the view, and the step would leave `p` where it was
/// instead of moving it by `-lr`.
#[test]
fn a_value_something_views_is_not_written_over() {
    let reg = common::registry();
    let src = "optimizer viewed(p[...]; lr: float = 0.5) {\n    let a = p * 2\n    let c = stop_gradient(a)\n    let d = a + 1\n    p = p + lr * (c - d)\n}\n";
    reg.load_str(src, "viewed.nf").unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.5]));
    let mut opt = reg.optimizer("viewed").unwrap().build(&vs).unwrap();
    opt.backward_step(&w.sum(Kind::Float)).unwrap();
    assert_eq!(Vec::<f32>::try_from(&w).unwrap(), [0.5, -2.5, 3.0]);
}

/// A fused `a + k x y` (`lower::fusions`) writes its result over an operand the run made and
/// reads no more (`u` here: `r` is a state, `g` the gradient), and over nothing a later node or
/// an output reads: were `u` written over while the state `s` keeps it, `s` would hold the new
/// `r`. The gradient of `sum(w * w)` is `2 w`, so `u = 4 w` and `r = 1 + lr 4 w 2 w`.
#[test]
fn a_fused_step_writes_over_what_it_alone_reads() {
    let reg = common::registry();
    let body = "    state r = 1\n    let u = g * 2\n    r = r + lr * u * g\n    p = p - r\n";
    let alone = format!("optimizer fused_alone(p[...]; lr: float = 0.5) {{\n{body}}}\n");
    let kept = format!("optimizer fused_kept(p[...]; lr: float = 0.5) {{\n    state s = 0\n{body}    s = u\n}}\n");
    reg.load_str(&alone, "fused_alone.nf").unwrap();
    reg.load_str(&kept, "fused_kept.nf").unwrap();
    let init = [1.0f32, -2.0, 3.5];
    let r: Vec<f32> = init.iter().map(|w| 1.0 + 0.5 * (4.0 * w) * (2.0 * w)).collect();
    for name in ["fused_alone", "fused_kept"] {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&init));
        let mut opt = reg.optimizer(name).unwrap().build(&vs).unwrap();
        opt.backward_step(&(&w * &w).sum(Kind::Float)).unwrap();
        let p: Vec<f32> = init.iter().zip(&r).map(|(w, r)| w - r).collect();
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), p, "{name}");
        let (_, states) = opt.state_of("w").expect("stepped");
        let host = |t: &Tensor| Vec::<f32>::try_from(t).unwrap();
        match states {
            [s, rr] => {
                assert_eq!(host(rr), r, "{name}: r");
                assert_eq!(host(s), init.iter().map(|w| 4.0 * w).collect::<Vec<_>>(), "{name}: s");
            }
            [rr] => assert_eq!(host(rr), r, "{name}: r"),
            _ => panic!("{name}: {} states", states.len()),
        }
    }
}
