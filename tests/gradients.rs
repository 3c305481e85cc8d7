//! The derived backward pass of every standard layer against central finite differences,
//! in f64, on several shapes (odd and non-square among them), in train and eval mode.

mod common;

use common::{randomize, rel_err, Rng};
use normforge::reference::{Layer, Tensor};

/// `sum(forward(x) * gy)` for a copy of the layer (training mode updates buffers).
fn loss(layer: &Layer, x: &Tensor, gy: &Tensor, train: bool) -> f64 {
    let mut l = layer.clone();
    let y = l.forward(x, train).unwrap();
    y.data.iter().zip(&gy.data).map(|(a, b)| a * b).sum()
}

const H: f64 = 1e-5;

fn central(f: impl Fn(f64) -> f64, v: f64) -> f64 {
    (f(v + H) - f(v - H)) / (2.0 * H)
}

fn check(name: &str, hparams: &[(&str, f64)], shape: &[usize], train: bool, rng: &mut Rng) {
    check_entry(common::entry(name), hparams, shape, train, rng)
}

fn check_entry(entry: std::sync::Arc<normforge::Entry>, hparams: &[(&str, f64)], shape: &[usize], train: bool, rng: &mut Rng) {
    let name = entry.name.clone();
    let overrides: Vec<(String, f64)> = hparams.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let mut layer = Layer::new(entry, &overrides, shape).unwrap();
    randomize(&mut layer, rng);
    let x = rng.tensor(shape);
    let gy = rng.tensor(shape);
    let grads = layer.backward(&x, &gy, train).unwrap();

    let fd_x: Vec<f64> = (0..x.numel())
        .map(|i| {
            central(
                |v| {
                    let mut xx = x.clone();
                    xx.data[i] = v;
                    loss(&layer, &xx, &gy, train)
                },
                x.data[i],
            )
        })
        .collect();
    let e = rel_err(&grads.input.data, &fd_x);
    assert!(e < 1e-6, "{name} {shape:?} train={train}: input gradient relative error {e:e}");

    for (k, p) in layer.params.iter().enumerate() {
        let fd: Vec<f64> = (0..p.numel())
            .map(|i| {
                central(
                    |v| {
                        let mut l = layer.clone();
                        l.params[k].data[i] = v;
                        loss(&l, &x, &gy, train)
                    },
                    p.data[i],
                )
            })
            .collect();
        let e = rel_err(&grads.params[k].data, &fd);
        let pname = &layer.entry.params[k].name;
        assert!(e < 1e-6, "{name} {shape:?} train={train}: gradient of `{pname}` relative error {e:e}");
    }
}

const ROW_SHAPES: &[&[usize]] = &[&[3, 5], &[2, 3, 7], &[4, 1], &[6]];
const CHANNEL_SHAPES: &[&[usize]] = &[&[4, 6], &[3, 6, 5], &[2, 6, 3, 5]];

#[test]
fn layer_norm() {
    let mut rng = Rng::new(1);
    for s in ROW_SHAPES {
        check("layer_norm", &[], s, true, &mut rng);
    }
}

#[test]
fn rms_norm() {
    let mut rng = Rng::new(2);
    for s in ROW_SHAPES {
        // With one feature, y = x / sqrt(x^2 + eps) is flat to within eps: at the default
        // eps = 1e-8 the true gradient is ~1e-8, below what finite differences resolve in
        // f64. A larger eps keeps the gradient O(1) so the check still means something.
        let eps = if s.last() == Some(&1) { 0.1 } else { 1e-8 };
        check("rms_norm", &[("eps", eps)], s, true, &mut rng);
    }
}

#[test]
fn scale_and_compressed_rms_norms() {
    let mut rng = Rng::new(12);
    for s in ROW_SHAPES {
        // One feature makes both flat but within eps: crms_norm as rms_norm above (a larger eps
        // keeps the gradient O(1)); scale_norm is then g sign(x), whose gradient is zero but
        // where |x| < eps, so it is checked on the wider rows only.
        let one = s.last() == Some(&1);
        if !one {
            check("scale_norm", &[], s, true, &mut rng);
        }
        check("crms_norm", &[("eps", if one { 0.1 } else { 1e-8 })], s, true, &mut rng);
    }
}

#[test]
fn dyt() {
    let mut rng = Rng::new(3);
    for s in ROW_SHAPES {
        check("dyt", &[], s, true, &mut rng);
    }
}

#[test]
fn batch_norm() {
    let mut rng = Rng::new(4);
    for s in CHANNEL_SHAPES {
        for train in [true, false] {
            check("batch_norm", &[], s, train, &mut rng);
        }
    }
}

#[test]
fn group_norm() {
    let mut rng = Rng::new(5);
    for s in CHANNEL_SHAPES {
        for groups in [1.0, 3.0, 6.0] {
            check("group_norm", &[("groups", groups)], s, true, &mut rng);
        }
    }
    check("group_norm", &[("groups", 2.0)], &[5, 4, 7], true, &mut rng);
}

#[test]
fn evonorm_b0() {
    let mut rng = Rng::new(6);
    for s in CHANNEL_SHAPES {
        for train in [true, false] {
            check("evonorm_b0", &[], s, train, &mut rng);
        }
    }
}

#[test]
fn evonorm_s0() {
    let mut rng = Rng::new(7);
    for s in CHANNEL_SHAPES {
        for groups in [2.0, 3.0] {
            check("evonorm_s0", &[("groups", groups)], s, true, &mut rng);
        }
    }
}

#[test]
fn evonorm_b1_b2() {
    let mut rng = Rng::new(10);
    for name in ["evonorm_b1", "evonorm_b2"] {
        for s in CHANNEL_SHAPES {
            for train in [true, false] {
                check(name, &[], s, train, &mut rng);
            }
        }
    }
}

#[test]
fn evonorm_s1_s2() {
    let mut rng = Rng::new(11);
    for name in ["evonorm_s1", "evonorm_s2"] {
        for s in CHANNEL_SHAPES {
            for groups in [2.0, 3.0] {
                check(name, &[("groups", groups)], s, true, &mut rng);
            }
        }
    }
}

#[test]
fn batch_channel_norm() {
    let mut rng = Rng::new(14);
    for s in CHANNEL_SHAPES {
        for groups in [2.0, 3.0] {
            for train in [true, false] {
                check("batch_channel_norm", &[("groups", groups)], s, train, &mut rng);
            }
        }
    }
}

#[test]
fn instance_norm() {
    let mut rng = Rng::new(9);
    for s in [&[2usize, 3, 5][..], &[3, 4, 2, 3], &[2, 2, 7, 1]] {
        check("instance_norm", &[], s, true, &mut rng);
    }
}

#[test]
fn every_std_layer_is_covered() {
    let covered = [
        "layer_norm", "rms_norm", "dyt", "batch_norm", "group_norm", "evonorm_b0", "evonorm_s0", "instance_norm", "evonorm_b1",
        "evonorm_b2", "evonorm_s1", "evonorm_s2", "weight_norm", "weight_standardization", "fix_norm", "scale_norm", "crms_norm",
        "spectral_norm", "batch_channel_norm",
    ];
    for r in common::registry().list(None) {
        if r.entry.kind != normforge::dsl::ir::Kind::Optimizer {
            assert!(covered.contains(&r.entry.name.as_str()), "no gradient test for `{}`", r.entry.name);
        }
    }
}

/// Reparams share the layer machinery: weight normalization and weight standardization are
/// differentiated like any layer.
#[test]
fn reparams() {
    let mut rng = Rng::new(8);
    for name in ["weight_norm", "weight_standardization", "fix_norm"] {
        for s in [&[4usize, 3][..], &[3, 2, 5], &[5, 1, 3, 3]] {
            check(name, &[], s, true, &mut rng);
        }
    }
}

/// Spectral normalization in eval mode, where u and v are buffers: the derived backward against
/// finite differences. In training the power iteration is not differentiated (stop_gradient, as
/// torch's no_grad), so finite differences of the forward would measure something else; that
/// gradient is checked against torch in tests/reference_fixtures.rs.
#[test]
fn spectral_norm_eval() {
    let mut rng = Rng::new(13);
    for s in [&[4usize, 3][..], &[3, 2, 5], &[5, 1, 3, 3]] {
        check("spectral_norm", &[], s, false, &mut rng);
    }
}
