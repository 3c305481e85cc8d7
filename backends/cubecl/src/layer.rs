//! A layer on a CubeCL device: forward (train and eval, buffers updated in training) and the
//! derived backward, each a short sequence of layer kernels over one arena buffer that holds
//! every tensor of the call.

use crate::plan::{layout, plan, run, Launch, Plan, Source};
use crate::{Dtype, Error};
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::{Entry, Kind, Programs, Target};
use std::sync::Arc;

/// Parameter gradients and the input gradient of one backward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    pub input: Vec<f32>,
    pub params: Vec<Vec<f32>>,
}

pub struct CubeLayer {
    entry: Arc<Entry>,
    pub hparams: Vec<f64>,
    /// Train, eval, train backward, eval backward.
    plans: [Plan; 4],
    pub params: Vec<Vec<f32>>,
    pub buffers: Vec<Vec<f32>>,
    /// What the input, output and their gradients are stored in on the device.
    storage: Dtype,
    launch: Launch,
    client: cubecl::client::Client,
}

impl CubeLayer {
    /// Instantiate for inputs of `input_shape`: parameters and buffers take their initial values
    /// (computed by the entry's initialiser on the device).
    pub fn new(entry: Arc<Entry>, overrides: &[(String, f64)], input_shape: &[usize], device: &cubecl::Device) -> Result<Self, Error> {
        if entry.kind == Kind::Optimizer {
            return Err(Error(format!("`{}` is an optimizer, not a layer", entry.name)));
        }
        let hparams = normforge_dsl::hyper::resolve(&entry, overrides)?;
        let Programs::Layer { train, eval, train_backward, eval_backward } = &entry.programs else { unreachable!("checked above") };
        let plans = [plan(&entry, train)?, plan(&entry, eval)?, plan(&entry, train_backward)?, plan(&entry, eval_backward)?];
        let init = plan(&entry, &entry.init)?;
        let mut layer = CubeLayer { entry, hparams, plans, params: Vec::new(), buffers: Vec::new(), storage: Dtype::F32, launch: Launch::for_device(device), client: device.client() };
        let b = layer.bind(input_shape, "the input", false)?;
        let out = layer.execute(&init, &b, None, None)?;
        let take = |target: fn(u32) -> Target, n: usize| -> Result<Vec<Vec<f32>>, Error> {
            (0..n as u32).map(|i| out.iter().find(|(t, _)| *t == target(i)).map(|(_, v)| v.clone()).ok_or_else(|| Error("the initialiser lacks an output".into()))).collect()
        };
        layer.params = take(Target::Param, layer.entry.params.len())?;
        layer.buffers = take(Target::Buffer, layer.entry.buffers.len())?;
        Ok(layer)
    }

    /// Keep the input, output and their gradients in `dtype` on the device (parameters, buffers
    /// and statistics stay f32, and so does all arithmetic). Values cross the API as f32,
    /// rounded to `dtype` on the way in.
    pub fn with_storage(mut self, dtype: Dtype) -> Result<Self, Error> {
        dtype.held_on(&self.client)?;
        self.storage = dtype;
        Ok(self)
    }

    /// Launch the kernels so (`Launch::per_unit()`: every reduction folds in one unit per
    /// value, however long — the baseline the layer benchmark compares the cooperative
    /// reductions with).
    pub fn with_launch(mut self, launch: Launch) -> Result<Self, Error> {
        launch.check()?;
        self.launch = launch;
        Ok(self)
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// Bind a shape to the axes; with `check`, it must fit the parameters and buffers.
    fn bind(&self, shape: &[usize], what: &str, check: bool) -> Result<AxisBinding, Error> {
        let b = bind::bind_axes(&self.entry.axes, shape, what).map_err(Error)?;
        for p in &self.plans {
            bind::check_program(&p.program, &b, &self.hparams).map_err(Error)?;
        }
        if check {
            let decls = self.entry.params.iter().zip(&self.params).chain(self.entry.buffers.iter().zip(&self.buffers));
            for (d, v) in decls {
                let want: usize = bind::dims_of(&d.shape, &b, &self.hparams).map_err(Error)?.iter().product();
                if want != v.len() {
                    return Err(Error(format!("{what} has shape {shape:?}: `{}` needs {want} values for it, but has {}", d.name, v.len())));
                }
            }
        }
        Ok(b)
    }

    fn execute(&self, plan: &Plan, b: &AxisBinding, x: Option<&[f32]>, gy: Option<&[f32]>) -> Result<Vec<(Target, Vec<f32>)>, Error> {
        let data = |src: Source| match src {
            Source::Input => x,
            Source::GradOutput => gy,
            Source::Param(i) => self.params.get(i as usize).map(Vec::as_slice),
            Source::Buffer(i) => self.buffers.get(i as usize).map(Vec::as_slice),
            _ => None,
        };
        run(&self.client, plan, &layout(plan, b, &self.hparams, 0.0, &self.launch)?, self.storage, &self.launch, &data)
    }

    /// The output for `x` (of `shape`); in training mode the buffers take their new values.
    pub fn forward(&mut self, x: &[f32], shape: &[usize], train: bool) -> Result<Vec<f32>, Error> {
        let b = self.bind(shape, "the input", true)?;
        if x.len() != shape.iter().product::<usize>() {
            return Err(Error(format!("the input has {} values, its shape {shape:?} says {}", x.len(), shape.iter().product::<usize>())));
        }
        let out = self.execute(&self.plans[if train { 0 } else { 1 }], &b, Some(x), None)?;
        let mut y = None;
        for (target, v) in out {
            match target {
                Target::Y => y = Some(v),
                Target::Buffer(i) => self.buffers[i as usize] = v,
                _ => {}
            }
        }
        y.ok_or_else(|| Error("the layer has no output".into()))
    }

    /// Gradients of `sum(y * gy)` with respect to `x` and every parameter, through the derived
    /// backward program. Buffers are left as they are.
    pub fn backward(&self, x: &[f32], gy: &[f32], shape: &[usize], train: bool) -> Result<Gradients, Error> {
        let b = self.bind(shape, "the input", true)?;
        let n: usize = shape.iter().product();
        if x.len() != n || gy.len() != n {
            return Err(Error(format!("the input and output gradient need {n} values each, for shape {shape:?}")));
        }
        let out = self.execute(&self.plans[if train { 2 } else { 3 }], &b, Some(x), Some(gy))?;
        let find = |t: Target| out.iter().find(|(x, _)| *x == t).map(|(_, v)| v.clone()).ok_or_else(|| Error("the backward program lacks an output".into()));
        let params = (0..self.params.len() as u32).map(|i| find(Target::GradParam(i))).collect::<Result<_, _>>()?;
        Ok(Gradients { input: find(Target::GradInput)?, params })
    }
}
