//! Helpers shared by the integration tests.
#![allow(dead_code)]

use normforge::reference::{Layer, Tensor};
use std::sync::Arc;

/// A small deterministic generator (xorshift64*), so tests need no RNG crate and
/// every run sees the same "random" inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn tensor(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|_| self.normal()).collect()).unwrap()
    }
}

pub fn registry() -> normforge::Registry {
    normforge::builtin_registry().expect("the standard library loads")
}

pub fn entry(name: &str) -> Arc<normforge::Entry> {
    registry().get(name).unwrap().entry.clone()
}

/// Give every parameter and buffer a random value near its usual scale, so that a test
/// exercises them (default initial values like 1 and 0 hide mistakes).
pub fn randomize(layer: &mut Layer, rng: &mut Rng) {
    for p in &mut layer.params {
        for v in &mut p.data {
            *v = 0.6 + 0.8 * rng.uniform();
        }
    }
    for b in &mut layer.buffers {
        for v in &mut b.data {
            *v = 0.5 + rng.uniform();
        }
    }
}

/// ||a - b|| / ||b|| (2-norms), or ||a - b|| where b is zero.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm == 0.0 { diff } else { diff / norm }
}
