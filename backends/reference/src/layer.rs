use crate::eval::{self, AxisBinding, Inputs};
use crate::{Error, Result, Tensor};
use normforge_dsl::ir::{Entry, Kind, Program, Programs, Target};
use std::sync::Arc;

/// A layer (or reparam) instance: hyper-parameter values, parameters and buffers.
#[derive(Clone, Debug)]
pub struct Layer {
    pub entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    pub params: Vec<Tensor>,
    pub buffers: Vec<Tensor>,
    /// The shape the parameters were sized for.
    pub input_shape: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub input: Tensor,
    pub params: Vec<Tensor>,
}

impl Layer {
    /// Instantiate for inputs of `input_shape`; parameters and buffers take their initial values.
    pub fn new(entry: Arc<Entry>, overrides: &[(String, f64)], input_shape: &[usize]) -> Result<Self> {
        if entry.kind == Kind::Optimizer {
            return Err(Error(format!("`{}` is an optimizer, not a layer", entry.name)));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let binding = eval::bind_axes(&entry.axes, input_shape, "the input")?;
        let inputs = Inputs {
            binding: &binding,
            hparams: &hparams,
            step: 0.0,
            input: None,
            grad: None,
            grad_output: None,
            params: &[],
            buffers: &[],
            states: &[],
        };
        if let Programs::Layer { train, eval, .. } = &entry.programs {
            for p in [train, eval] {
                normforge_dsl::bind::check_program(p, &binding, &hparams).map_err(Error)?;
            }
        }
        let vals = eval::run(&entry.init, &inputs)?;
        let make = |decls: &[normforge_dsl::ir::TensorDecl], target: fn(u32) -> Target| -> Result<Vec<Tensor>> {
            decls
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let data = eval::output(&entry.init, &vals, target(i as u32))
                        .ok_or_else(|| Error(format!("no initial value for `{}`", d.name)))?;
                    Tensor::new(eval::dims_of(&d.shape, &binding, &hparams)?, data)
                })
                .collect()
        };
        let params = make(&entry.params, Target::Param)?;
        let buffers = make(&entry.buffers, Target::Buffer)?;
        Ok(Layer { entry, hparams, params, buffers, input_shape: input_shape.to_vec() })
    }

    fn programs(&self, train: bool) -> (&Program, &Program) {
        match &self.entry.programs {
            Programs::Layer { train: t, eval: e, train_backward: tb, eval_backward: eb } => {
                if train { (t, tb) } else { (e, eb) }
            }
            Programs::Optimizer { .. } => unreachable!("Layer::new refuses optimizers"),
        }
    }

    /// Bind `x` to the axes and check it fits the parameters this layer was built for.
    fn bind(&self, x: &Tensor, what: &str) -> Result<AxisBinding> {
        let b = eval::bind_axes(&self.entry.axes, &x.shape, what)?;
        for (d, p) in self.entry.params.iter().zip(&self.params).chain(self.entry.buffers.iter().zip(&self.buffers)) {
            let want = eval::dims_of(&d.shape, &b, &self.hparams)?;
            if want != p.shape {
                return Err(Error(format!(
                    "{what} has shape {:?}: `{}` needs shape {want:?} for it, but has {:?}",
                    x.shape, d.name, p.shape
                )));
            }
        }
        Ok(b)
    }

    fn run(&self, program: &Program, x: &Tensor, gy: Option<&Tensor>, b: &AxisBinding) -> Result<Vec<Vec<f64>>> {
        let params: Vec<&[f64]> = self.params.iter().map(|t| t.data.as_slice()).collect();
        let buffers: Vec<&[f64]> = self.buffers.iter().map(|t| t.data.as_slice()).collect();
        let inputs = Inputs {
            binding: b,
            hparams: &self.hparams,
            step: 0.0,
            input: Some(&x.data),
            grad: None,
            grad_output: gy.map(|g| g.data.as_slice()),
            params: &params,
            buffers: &buffers,
            states: &[],
        };
        eval::run(program, &inputs)
    }

    /// The output for `x`; in training mode the buffers take their updated values.
    pub fn forward(&mut self, x: &Tensor, train: bool) -> Result<Tensor> {
        let b = self.bind(x, "the input")?;
        let entry = Arc::clone(&self.entry);
        let layer: &Layer = self;
        let fwd = layer.programs(train).0;
        let vals = layer.run(fwd, x, None, &b)?;
        let y = eval::output(fwd, &vals, Target::Y).ok_or_else(|| Error("the layer has no output".into()))?;
        let updates: Vec<Option<Vec<f64>>> =
            (0..entry.buffers.len()).map(|i| eval::output(fwd, &vals, Target::Buffer(i as u32))).collect();
        for (buf, v) in self.buffers.iter_mut().zip(updates) {
            if let Some(v) = v {
                buf.data = v;
            }
        }
        Tensor::new(x.shape.clone(), y)
    }

    /// Gradients of `sum(y * gy)` with respect to `x` and every parameter, through the
    /// derived backward program. Buffers are left as they are.
    pub fn backward(&self, x: &Tensor, gy: &Tensor, train: bool) -> Result<Gradients> {
        if gy.shape != x.shape {
            return Err(Error(format!("the output gradient has shape {:?}, the input {:?}", gy.shape, x.shape)));
        }
        let b = self.bind(x, "the input")?;
        let (_, bwd) = self.programs(train);
        let vals = self.run(bwd, x, Some(gy), &b)?;
        let missing = || Error("the backward program lacks an output".into());
        let input = Tensor::new(x.shape.clone(), eval::output(bwd, &vals, Target::GradInput).ok_or_else(missing)?)?;
        let params = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| Tensor::new(p.shape.clone(), eval::output(bwd, &vals, Target::GradParam(i as u32)).ok_or_else(missing)?))
            .collect::<Result<_>>()?;
        Ok(Gradients { input, params })
    }
}
