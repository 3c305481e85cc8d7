//! Methods that change the training loop rather than the update rule, wrapped around any
//! registry optimizer: Lookahead (a second, slow copy of the weights) and SAM (a second
//! forward/backward at perturbed weights).

use crate::optimizer::{DslOptimizer, StepReport};
use crate::Error;
use tch::{Kind, Tensor};

/// Lookahead (Zhang, Lucas, Hinton, Ba. NeurIPS 2019, arXiv:1907.08610): every `k` applied
/// steps of the inner rule, the slow weights move `alpha` of the way to the fast ones, and
/// the fast weights restart from there.
#[derive(Debug)]
pub struct Lookahead {
    pub inner: DslOptimizer,
    k: usize,
    alpha: f64,
    applied: usize,
    slow: Vec<(Tensor, Tensor)>,
}

impl Lookahead {
    pub fn new(inner: DslOptimizer, k: usize, alpha: f64) -> Result<Self, Error> {
        if k == 0 || !(0.0..=1.0).contains(&alpha) {
            return Err(Error(format!("lookahead needs k >= 1 and alpha in [0, 1], got k = {k}, alpha = {alpha}")));
        }
        let slow = inner.variables().into_iter().map(|(_, v)| (v.shallow_clone(), v.detach().copy())).collect();
        Ok(Lookahead { inner, k, alpha, applied: 0, slow })
    }

    pub fn zero_grad(&mut self) {
        self.inner.zero_grad();
    }

    pub fn step(&mut self) -> Result<StepReport, Error> {
        let report = self.inner.step()?;
        if matches!(report, StepReport::Applied { .. }) {
            self.applied += 1;
            if self.applied.is_multiple_of(self.k) {
                tch::no_grad(|| -> Result<(), Error> {
                    for (fast, slow) in &mut self.slow {
                        let new_slow = &*slow + (&*fast - &*slow) * self.alpha;
                        slow.f_copy_(&new_slow)?;
                        fast.f_copy_(&new_slow)?;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(report)
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepReport, Error> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }
}

/// Sharpness-Aware Minimization (Foret, Kleiner, Mobahi, Neyshabur. ICLR 2021,
/// arXiv:2010.01412): take the gradient at `w + rho g / |g|`, then let the inner rule step
/// from `w` with it. Needs the loss as a closure, since it is evaluated twice.
#[derive(Debug)]
pub struct Sam {
    pub inner: DslOptimizer,
    pub rho: f64,
}

impl Sam {
    pub fn new(inner: DslOptimizer, rho: f64) -> Result<Self, Error> {
        if !(rho >= 0.0 && rho.is_finite()) {
            return Err(Error(format!("SAM needs rho >= 0, got {rho}")));
        }
        Ok(Sam { inner, rho })
    }

    /// One SAM step; returns the loss at the unperturbed weights and the inner report.
    pub fn step(&mut self, mut loss_fn: impl FnMut() -> Tensor) -> Result<(f64, StepReport), Error> {
        let vars: Vec<Tensor> = self.inner.variables().into_iter().map(|(_, v)| v).collect();
        self.inner.zero_grad();
        let loss = loss_fn();
        loss.f_backward()?;
        let value = f64::try_from(&loss).map_err(|e| Error(format!("the loss is not a scalar: {e}")))?;
        let grads: Vec<Option<Tensor>> =
            vars.iter().map(|v| if v.grad().defined() { Some(v.grad().detach().copy()) } else { None }).collect();
        let norm = grads
            .iter()
            .flatten()
            .map(|g| f64::try_from(g.to_kind(Kind::Double).square().sum(Kind::Double)).unwrap_or(f64::NAN))
            .sum::<f64>()
            .sqrt();
        if !norm.is_finite() {
            return Ok((value, StepReport::SkippedNonFinite { param: "(SAM perturbation)".into() }));
        }
        let scale = self.rho / (norm + 1e-12);
        let perturbations: Vec<Option<Tensor>> = grads.iter().map(|g| g.as_ref().map(|g| g * scale)).collect();
        let shift = |sign: f64, vars: &[Tensor]| -> Result<(), Error> {
            tch::no_grad(|| {
                for (v, e) in vars.iter().zip(&perturbations) {
                    if let Some(e) = e {
                        let mut h = v.shallow_clone();
                        let _ = h.f_add_(&(e * sign))?;
                    }
                }
                Ok(())
            })
        };
        shift(1.0, &vars)?;
        self.inner.zero_grad();
        let second = loss_fn().f_backward();
        // Back to w before anything else, even if the second pass failed.
        shift(-1.0, &vars)?;
        second?;
        Ok((value, self.inner.step()?))
    }
}
