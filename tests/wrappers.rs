//! Training-loop wrappers around registry optimizers, on a small least-squares problem:
//! Lookahead's slow-weight update and SAM's perturbed gradient, checked step by step against
//! a hand computation, then trained to convergence.

mod common;

use normforge::tch::{nn, Device, Kind, Tensor};
use normforge::torch::{Lookahead, Sam, StepReport};
use normforge::RegistryExt;

/// min_w |A w - b|^2 for a fixed well-conditioned A.
struct Problem {
    a: Tensor,
    b: Tensor,
}

impl Problem {
    fn new() -> Self {
        let _seeded = normforge::torch::seeded(9);
        let a = Tensor::randn([20, 5], (Kind::Double, Device::Cpu)) / 4.0;
        let b = Tensor::randn([20], (Kind::Double, Device::Cpu));
        Problem { a, b }
    }
    fn loss(&self, w: &Tensor) -> Tensor {
        (self.a.matmul(w) - &self.b).square().sum(Kind::Double)
    }
    fn grad(&self, w: &Tensor) -> Tensor {
        self.a.transpose(0, 1).matmul(&(self.a.matmul(w) - &self.b)) * 2.0
    }
    fn best(&self) -> f64 {
        let w = self.a.linalg_lstsq(&self.b.unsqueeze(1), None::<f64>, "gelsd").0.squeeze_dim(1);
        f64::try_from(self.loss(&w)).unwrap()
    }
}

fn store(init: &Tensor) -> (nn::VarStore, Tensor) {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", init);
    vs.double(); // converts the variable in place, so `w` stays its handle
    (vs, w)
}

#[test]
fn lookahead_pulls_fast_weights_back_every_k_steps() {
    let pb = Problem::new();
    let init = Tensor::zeros([5], (Kind::Double, Device::Cpu));
    let reg = common::registry();
    let (vs_a, wa) = store(&init);
    let (vs_b, wb) = store(&init);
    let mut plain = reg.optimizer("adam").unwrap().hparam("lr", 0.05).build(&vs_a).unwrap();
    let mut la = Lookahead::new(reg.optimizer("adam").unwrap().hparam("lr", 0.05).build(&vs_b).unwrap(), 5, 0.5).unwrap();
    for _ in 0..5 {
        plain.backward_step(&pb.loss(&wa)).unwrap();
        la.backward_step(&pb.loss(&wb)).unwrap();
    }
    // After k = 5 steps: slow = init + 0.5 (fast - init), and the fast weights restart there.
    let expected = &init + (&wa - &init) * 0.5;
    assert!(f64::try_from((&wb - &expected).abs().max()).unwrap() < 1e-12);
    for _ in 0..300 {
        la.backward_step(&pb.loss(&wb)).unwrap();
    }
    let got = f64::try_from(pb.loss(&wb)).unwrap();
    assert!(got < pb.best() + 1e-3, "lookahead reached {got}, optimum {}", pb.best());
    assert!(Lookahead::new(reg.optimizer("adam").unwrap().build(&vs_a).unwrap(), 0, 0.5).is_err());
}

#[test]
fn sam_steps_with_the_gradient_at_the_perturbed_point() {
    let pb = Problem::new();
    // Representable in f32, since the VarStore creates its variable in f32 first.
    let _seeded = normforge::torch::seeded(19);
    let init = Tensor::randn([5], (Kind::Float, Device::Cpu)).to_kind(Kind::Double);
    let (vs, w) = store(&init);
    let (lr, rho) = (0.01, 0.05);
    let mut sam = Sam::new(common::registry().optimizer("sgd").unwrap().hparam("lr", lr).build(&vs).unwrap(), rho).unwrap();
    let g0 = pb.grad(&init);
    let norm = f64::try_from(g0.square().sum(Kind::Double).sqrt()).unwrap();
    let g1 = pb.grad(&(&init + &g0 * (rho / norm)));
    let expected = &init - g1 * lr;
    let (loss, report) = sam.step(|| pb.loss(&w)).unwrap();
    assert!(matches!(report, StepReport::Applied { .. }));
    assert!((loss - f64::try_from(pb.loss(&init)).unwrap()).abs() < 1e-12);
    assert!(f64::try_from((&w - &expected).abs().max()).unwrap() < 1e-12);
    for _ in 0..400 {
        sam.step(|| pb.loss(&w)).unwrap();
    }
    let got = f64::try_from(pb.loss(&w)).unwrap();
    assert!(got < pb.best() + 0.05, "SAM reached {got}, optimum {}", pb.best());
    assert!(Sam::new(common::registry().optimizer("sgd").unwrap().build(&vs).unwrap(), -1.0).is_err());
}
