use crate::eval::{self, Inputs};
use crate::{Error, Result, Tensor};
use normforge_dsl::ir::{Entry, Kind, Program, Programs, Target};
use std::sync::Arc;

/// Per-parameter optimizer state.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    pub step: u64,
    pub states: Vec<Tensor>,
}

/// An update rule driving a list of parameter tensors; state is created on first use.
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    pub slots: Vec<Option<Slot>>,
    /// Skip the whole step (parameters and state untouched) if any gradient is not finite.
    pub skip_nonfinite: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    /// A gradient held NaN or infinity; nothing changed.
    SkippedNonFinite { tensor: usize },
}

impl Optimizer {
    pub fn new(entry: Arc<Entry>, overrides: &[(String, f64)]) -> Result<Self> {
        if entry.kind != Kind::Optimizer {
            return Err(Error(format!("`{}` is a {}, not an optimizer", entry.name, entry.kind.keyword())));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        Ok(Optimizer { entry, hparams, slots: vec![], skip_nonfinite: true })
    }

    pub fn set_hparam(&mut self, name: &str, v: f64) -> Result<()> {
        normforge_dsl::hyper::set(&self.entry, &mut self.hparams, name, v)
    }

    fn step_program(&self) -> &Program {
        match &self.entry.programs {
            Programs::Optimizer { step } => step,
            Programs::Layer { .. } => unreachable!("Optimizer::new refuses layers"),
        }
    }

    /// One update of every parameter. All or nothing: on any error nothing is changed.
    pub fn step(&mut self, params: &mut [Tensor], grads: &[Tensor]) -> Result<StepOutcome> {
        if params.len() != grads.len() {
            return Err(Error(format!("{} parameters but {} gradients", params.len(), grads.len())));
        }
        if self.slots.len() > params.len() {
            return Err(Error(format!("this optimizer was stepping {} parameters, now given {}", self.slots.len(), params.len())));
        }
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.shape != g.shape {
                return Err(Error(format!("parameter {i} has shape {:?} but its gradient {:?}", p.shape, g.shape)));
            }
        }
        if self.skip_nonfinite {
            if let Some(i) = grads.iter().position(|g| !g.all_finite()) {
                return Ok(StepOutcome::SkippedNonFinite { tensor: i });
            }
        }
        let mut new_params = Vec::with_capacity(params.len());
        let mut new_slots = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let binding = eval::bind_axes(&self.entry.axes, &normforge_dsl::bind::param_view(&self.entry, &p.shape), &format!("parameter {i}"))?;
            let slot = match self.slots.get(i).cloned().flatten() {
                Some(s) => {
                    if s.states.iter().zip(&self.entry.states).any(|(t, d)| {
                        eval::dims_of(&d.shape, &binding, &self.hparams).map_or(true, |dims| dims != t.shape)
                    }) {
                        return Err(Error(format!("parameter {i} changed shape to {:?} since its state was created", p.shape)));
                    }
                    s
                }
                None => self.init_slot(p, &binding)?,
            };
            let states: Vec<&[f64]> = slot.states.iter().map(|t| t.data.as_slice()).collect();
            let step = slot.step + 1;
            let inputs = Inputs {
                binding: &binding,
                hparams: &self.hparams,
                step: step as f64,
                input: Some(&p.data),
                grad: Some(&g.data),
                grad_output: None,
                params: &[],
                buffers: &[],
                states: &states,
            };
            let prog = self.step_program();
            let vals = eval::run(prog, &inputs)?;
            let np = eval::output(prog, &vals, Target::P).ok_or_else(|| Error("the step has no parameter output".into()))?;
            let states = slot
                .states
                .iter()
                .enumerate()
                .map(|(k, t)| {
                    let data = eval::output(prog, &vals, Target::State(k as u32)).unwrap_or_else(|| t.data.clone());
                    Tensor { shape: t.shape.clone(), data }
                })
                .collect();
            new_params.push(np);
            new_slots.push(Slot { step, states });
        }
        for (p, np) in params.iter_mut().zip(new_params) {
            p.data = np;
        }
        self.slots = new_slots.into_iter().map(Some).collect();
        Ok(StepOutcome::Applied)
    }

    fn init_slot(&self, p: &Tensor, binding: &eval::AxisBinding) -> Result<Slot> {
        let inputs = Inputs {
            binding,
            hparams: &self.hparams,
            step: 0.0,
            input: Some(&p.data),
            grad: None,
            grad_output: None,
            params: &[],
            buffers: &[],
            states: &[],
        };
        let vals = eval::run(&self.entry.init, &inputs)?;
        let states = self
            .entry
            .states
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let data = eval::output(&self.entry.init, &vals, Target::State(k as u32))
                    .ok_or_else(|| Error(format!("no initial value for state `{}`", d.name)))?;
                Tensor::new(eval::dims_of(&d.shape, binding, &self.hparams)?, data)
            })
            .collect::<Result<_>>()?;
        Ok(Slot { step: 0, states })
    }
}

