//! The reference backend against implementations nobody here wrote. The fixtures in
//! `tests/fixtures` were produced by `tools/fixtures/make_fixtures.py` from the packages
//! named in each file's `reference` field (e.g. `torch==2.11.0 torch.optim.AdamW`); every
//! failure message repeats that field. All comparisons are in f64, relative error < 1e-6.
//! Update rules are also run through libtorch (`DslOptimizer`) against the same fixtures.

mod common;

use common::rel_err;
use normforge::reference::{Layer, Optimizer, StepOutcome, Tensor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

const TOL: f64 = 1e-6;

#[derive(Deserialize)]
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl Array {
    fn tensor(&self) -> Tensor {
        Tensor::new(self.shape.clone(), self.data.clone()).unwrap()
    }
}

#[derive(Deserialize)]
struct LayerFile {
    entry: String,
    reference: String,
    cases: Vec<LayerCase>,
}

#[derive(Deserialize)]
struct LayerCase {
    hyper: BTreeMap<String, f64>,
    train: bool,
    x: Array,
    params: BTreeMap<String, Array>,
    buffers: BTreeMap<String, Array>,
    y: Array,
    buffers_out: BTreeMap<String, Array>,
    grad_y: Array,
    grad_x: Array,
    grad_params: BTreeMap<String, Array>,
}

#[derive(Deserialize)]
struct OptFile {
    entry: String,
    reference: String,
    cases: Vec<OptCase>,
}

#[derive(Deserialize)]
struct OptCase {
    hyper: BTreeMap<String, f64>,
    steps: usize,
    tensors: Vec<OptTensor>,
}

#[derive(Deserialize)]
struct OptTensor {
    shape: Vec<usize>,
    p0: Vec<f64>,
    grads: Vec<Vec<f64>>,
    p: Vec<Vec<f64>>,
}

fn read<T: for<'de> Deserialize<'de>>(kind: &str, entry: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{kind}/{entry}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn overrides(h: &BTreeMap<String, f64>) -> Vec<(String, f64)> {
    h.iter().map(|(k, v)| (k.clone(), *v)).collect()
}

fn close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    assert!(e < TOL, "{what}: relative error {e:e}\n got {got:?}\nwant {want:?}");
}

/// `source` is the package and version the fixture must come from.
fn check_layer(entry: &str, source: &str) {
    let f: LayerFile = read("layers", entry);
    assert_eq!(f.entry, entry);
    assert!(f.reference.starts_with(source), "{entry}: fixture from {}, expected {source}", f.reference);
    assert!(!f.cases.is_empty());
    let reg = common::registry();
    let e = reg.get(entry).unwrap().entry.clone();
    let mut shapes = std::collections::BTreeSet::new();
    for (k, c) in f.cases.iter().enumerate() {
        let ctx = format!("{entry} case {k} ({}, train={}, x {:?})", f.reference, c.train, c.x.shape);
        shapes.insert(c.x.shape.clone());
        let mut layer = Layer::new(e.clone(), &overrides(&c.hyper), &c.x.shape).unwrap_or_else(|err| panic!("{ctx}: {err}"));
        for (decl, p) in e.params.iter().zip(layer.params.iter_mut()) {
            let a = c.params.get(&decl.name).unwrap_or_else(|| panic!("{ctx}: fixture lacks param {}", decl.name));
            *p = a.tensor();
        }
        for (decl, b) in e.buffers.iter().zip(layer.buffers.iter_mut()) {
            let a = c.buffers.get(&decl.name).unwrap_or_else(|| panic!("{ctx}: fixture lacks buffer {}", decl.name));
            *b = a.tensor();
        }
        let x = c.x.tensor();
        let grads = layer.backward(&x, &c.grad_y.tensor(), c.train).unwrap();
        let y = layer.forward(&x, c.train).unwrap();
        close(&format!("{ctx}: y"), &y.data, &c.y.data);
        for (decl, b) in e.buffers.iter().zip(&layer.buffers) {
            let want = c.buffers_out.get(&decl.name).or_else(|| c.buffers.get(&decl.name)).unwrap();
            close(&format!("{ctx}: buffer {}", decl.name), &b.data, &want.data);
        }
        close(&format!("{ctx}: grad x"), &grads.input.data, &c.grad_x.data);
        for (decl, g) in e.params.iter().zip(&grads.params) {
            let want = c.grad_params.get(&decl.name).unwrap_or_else(|| panic!("{ctx}: fixture lacks grad {}", decl.name));
            close(&format!("{ctx}: grad {}", decl.name), &g.data, &want.data);
        }
    }
    assert!(shapes.len() >= 3, "{entry}: fixtures cover only {} shapes", shapes.len());
}

fn check_optimizer(entry: &str, source: &str) {
    let f: OptFile = read("optimizers", entry);
    assert_eq!(f.entry, entry);
    assert!(f.reference.starts_with(source), "{entry}: fixture from {}, expected {source}", f.reference);
    let reg = common::registry();
    let e = reg.get(entry).unwrap().entry.clone();
    for (k, c) in f.cases.iter().enumerate() {
        let ctx = format!("{entry} case {k} ({}, {:?})", f.reference, c.hyper);
        assert!(c.steps >= 5, "{ctx}: only {} steps", c.steps);
        let mut opt = Optimizer::new(e.clone(), &overrides(&c.hyper)).unwrap_or_else(|err| panic!("{ctx}: {err}"));
        let mut params: Vec<Tensor> = c.tensors.iter().map(|t| Tensor::new(t.shape.clone(), t.p0.clone()).unwrap()).collect();
        for step in 0..c.steps {
            let grads: Vec<Tensor> =
                c.tensors.iter().map(|t| Tensor::new(t.shape.clone(), t.grads[step].clone()).unwrap()).collect();
            assert_eq!(opt.step(&mut params, &grads).unwrap(), StepOutcome::Applied);
            for (i, (p, t)) in params.iter().zip(&c.tensors).enumerate() {
                close(&format!("{ctx}: tensor {i} {:?} after step {}", t.shape, step + 1), &p.data, &t.p[step]);
            }
        }
        check_optimizer_on_tch(&e, c, &ctx);
    }
}

/// One fixture case through libtorch: the rule lowered to libtorch operations on f64 variables,
/// gradients set by `loss.backward()` of `sum(p * g)`.
fn check_optimizer_on_tch(e: &std::sync::Arc<normforge::Entry>, c: &OptCase, ctx: &str) {
    use normforge::tch::{nn::VarStore, Device, Kind, Tensor as T};
    let dims = |t: &OptTensor| t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(Kind::Double);
    let vars: Vec<T> =
        c.tensors.iter().enumerate().map(|(i, t)| vs.root().var_copy(&format!("p{i:02}"), &T::from_slice(&t.p0).reshape(dims(t)))).collect();
    let mut opt = normforge::torch::DslOptimizer::new(e.clone(), &vs, &overrides(&c.hyper)).unwrap_or_else(|err| panic!("{ctx} on tch: {err}"));
    for step in 0..c.steps {
        let loss = vars
            .iter()
            .zip(&c.tensors)
            .map(|(v, t)| (v * T::from_slice(&t.grads[step]).reshape(dims(t))).sum(Kind::Double))
            .fold(T::zeros([], (Kind::Double, Device::Cpu)), |a, b| a + b);
        let report = opt.backward_step(&loss).unwrap_or_else(|err| panic!("{ctx} on tch: {err}"));
        assert!(matches!(report, normforge::torch::StepReport::Applied { .. }), "{ctx} on tch: {report:?}");
        for (i, (v, t)) in vars.iter().zip(&c.tensors).enumerate() {
            let got = Vec::<f64>::try_from(v.flatten(0, -1)).unwrap();
            close(&format!("{ctx} on tch: tensor {i} {:?} after step {}", t.shape, step + 1), &got, &t.p[step]);
        }
    }
}

#[test]
fn layer_norm_matches_torch() {
    check_layer("layer_norm", "torch==2.11.0");
}

#[test]
fn rms_norm_matches_torch() {
    check_layer("rms_norm", "torch==2.11.0");
}

#[test]
fn batch_norm_matches_torch() {
    check_layer("batch_norm", "torch==2.11.0");
}

#[test]
fn group_norm_matches_torch() {
    check_layer("group_norm", "torch==2.11.0");
}

#[test]
fn evonorm_b0_matches_timm() {
    check_layer("evonorm_b0", "timm==1.0.31");
}

#[test]
fn evonorm_s0_matches_timm() {
    check_layer("evonorm_s0", "timm==1.0.31");
}

#[test]
fn evonorm_b1_matches_timm() {
    check_layer("evonorm_b1", "timm==1.0.31");
}

#[test]
fn evonorm_b2_matches_timm() {
    check_layer("evonorm_b2", "timm==1.0.31");
}

#[test]
fn evonorm_s1_matches_timm() {
    check_layer("evonorm_s1", "timm==1.0.31");
}

#[test]
fn evonorm_s2_matches_timm() {
    check_layer("evonorm_s2", "timm==1.0.31");
}

#[test]
fn weight_norm_matches_torch() {
    check_layer("weight_norm", "torch==2.11.0");
}

#[test]
fn weight_standardization_matches_timm() {
    check_layer("weight_standardization", "timm==1.0.31");
}

#[test]
fn novograd_matches_pytorch_optimizer() {
    check_optimizer("novograd", "pytorch-optimizer==4.1.0");
}

#[test]
fn dyt_matches_x_transformers() {
    check_layer("dyt", "x-transformers==2.31.10");
}

#[test]
fn sgd_matches_torch() {
    check_optimizer("sgd", "torch==2.11.0");
}

#[test]
fn adam_matches_torch() {
    check_optimizer("adam", "torch==2.11.0");
}

#[test]
fn adamw_matches_torch() {
    check_optimizer("adamw", "torch==2.11.0");
}

#[test]
fn lion_matches_lion_pytorch() {
    check_optimizer("lion", "lion-pytorch==0.2.5");
}

#[test]
fn lamb_matches_pytorch_optimizer() {
    check_optimizer("lamb", "pytorch-optimizer==4.1.0");
}

#[test]
fn adamp_matches_official_code() {
    check_optimizer("adamp", "adamp==0.3.0");
}

#[test]
fn instance_norm_matches_torch() {
    check_layer("instance_norm", "torch==2.11.0");
}

#[test]
fn amsgrad_matches_torch() {
    check_optimizer("amsgrad", "torch==2.11.0");
}

#[test]
fn radam_matches_torch() {
    check_optimizer("radam", "torch==2.11.0");
}

#[test]
fn adabelief_matches_pytorch_optimizer() {
    check_optimizer("adabelief", "pytorch-optimizer==4.1.0");
}

#[test]
fn grams_matches_pytorch_optimizer() {
    check_optimizer("grams", "pytorch-optimizer==4.1.0");
}

#[test]
fn ademamix_matches_pytorch_optimizer() {
    check_optimizer("ademamix", "pytorch-optimizer==4.1.0");
}

#[test]
fn sgdp_matches_official_code() {
    check_optimizer("sgdp", "adamp==0.3.0");
}

/// Every standard entry has a fixture test above.
#[test]
fn every_std_entry_is_checked_against_a_reference() {
    let src = include_str!("reference_fixtures.rs");
    for r in common::registry().list(None) {
        let call = if r.entry.kind == normforge::dsl::ir::Kind::Optimizer { "check_optimizer" } else { "check_layer" };
        assert!(src.contains(&format!("{call}(\"{}\"", r.name)), "no fixture test for `{}`", r.name);
    }
}

#[test]
fn lars_matches_pytorch_optimizer() {
    check_optimizer("lars", "pytorch-optimizer==4.1.0");
}

#[test]
fn adan_matches_pytorch_optimizer() {
    check_optimizer("adan", "pytorch-optimizer==4.1.0");
}

#[test]
fn scale_norm_matches_torch() {
    check_layer("scale_norm", "torch==2.11.0");
}

#[test]
fn crms_norm_matches_torch_rms_norm_of_the_decompressed_vector() {
    check_layer("crms_norm", "torch==2.11.0");
}

#[test]
fn fix_norm_matches_torch() {
    check_layer("fix_norm", "torch==2.11.0");
}

#[test]
fn diffgrad_matches_pytorch_optimizer() {
    check_optimizer("diffgrad", "pytorch-optimizer==4.1.0");
}

#[test]
fn spectral_norm_matches_torch() {
    check_layer("spectral_norm", "torch==2.11.0");
}

#[test]
fn batch_channel_norm_matches_torch() {
    check_layer("batch_channel_norm", "torch==2.11.0");
}

#[test]
fn muon_matches_torch() {
    check_optimizer("muon", "torch==2.11.0");
}

/// Every entry of the standard library has a fixture from a reference implementation.
#[test]
fn every_std_entry_has_a_fixture() {
    for r in common::registry().list(None) {
        let kind = if r.entry.kind == normforge::dsl::ir::Kind::Optimizer { "optimizers" } else { "layers" };
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{kind}/{}.json", r.name));
        assert!(path.exists(), "no fixture for `{}` ({})", r.name, path.display());
    }
}
