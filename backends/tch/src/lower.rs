//! IR programs as libtorch operations, so libtorch's autograd differentiates DSL layers.
//!
//! Each node becomes a tensor laid out over the declared axes: one dim per axis, or two
//! (`groups`, `per group`) for an axis some node groups. Broadcasting then is libtorch's own;
//! `Reduce` sums (or takes extremes) over the dims that shrink, with `keepdim`; `Expand` expands.

use crate::Error;
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::*;
use tch::{Device, Kind, Tensor};

/// The tensors a program reads, each in its natural shape (its declared axes' dims).
#[derive(Default)]
pub struct Leaves<'a> {
    pub input: Option<&'a Tensor>,
    pub grad: Option<&'a Tensor>,
    pub grad_output: Option<&'a Tensor>,
    pub params: &'a [Tensor],
    pub buffers: &'a [Tensor],
    pub states: &'a [Tensor],
}

pub struct Lowering<'a> {
    pub binding: &'a AxisBinding,
    pub hparams: &'a [f64],
    pub step: f64,
    pub kind: Kind,
    pub device: Device,
    /// Per axis, the grouping used by some node of the program, if any.
    split: Vec<Option<Groups>>,
}

impl<'a> Lowering<'a> {
    /// Prepare to run `programs` (which must agree on how each axis is grouped).
    pub fn new(
        programs: &[&Program],
        binding: &'a AxisBinding,
        hparams: &'a [f64],
        step: f64,
        kind: Kind,
        device: Device,
    ) -> Result<Self, Error> {
        let rank = binding.extents.len();
        let mut split: Vec<Option<Groups>> = vec![None; rank];
        for p in programs {
            for n in &p.nodes {
                bind::extents(&n.shape, binding, hparams).map_err(Error)?;
                let shapes = std::iter::once(&n.shape).chain(match &n.op {
                    Op::Size(s) => Some(s),
                    _ => None,
                });
                for s in shapes {
                    for (a, e) in s.0.iter().enumerate() {
                        if let Extent::Grouped(g) = e {
                            match split[a] {
                                None => split[a] = Some(*g),
                                Some(h) if h == *g => {}
                                Some(_) => {
                                    return Err(Error(
                                        "the tch backend cannot group one axis in two different ways in one program".into(),
                                    ))
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Lowering { binding, hparams, step, kind, device, split })
    }

    /// The dims a value of `shape` has in this program's layout.
    pub fn view(&self, shape: &Shape) -> Vec<i64> {
        let mut v = Vec::new();
        for (a, e) in shape.0.iter().enumerate() {
            let n = self.binding.extents[a] as i64;
            match self.split[a] {
                None => v.push(if *e == Extent::One { 1 } else { n }),
                Some(g) => {
                    let groups = bind::group_count(g, self.hparams) as i64;
                    match e {
                        Extent::Full => v.extend([groups, n / groups]),
                        Extent::Grouped(_) => v.extend([groups, 1]),
                        Extent::One => v.extend([1, 1]),
                    }
                }
            }
        }
        v
    }

    /// The natural dims of a tensor declared with `shape`.
    pub fn natural(&self, shape: &Shape) -> Result<Vec<i64>, Error> {
        Ok(bind::dims_of(shape, self.binding, self.hparams).map_err(Error)?.into_iter().map(|d| d as i64).collect())
    }

    fn scalar(&self, v: f64) -> Tensor {
        Tensor::scalar_tensor(v, (self.kind, self.device))
    }

    fn leaf(&self, t: Option<&Tensor>, shape: &Shape, what: &str) -> Result<Tensor, Error> {
        let t = t.ok_or_else(|| Error(format!("this program reads {what}, which was not supplied")))?;
        let view = self.view(shape);
        if t.numel() as i64 != view.iter().product::<i64>() {
            return Err(Error(format!("{what} has shape {:?}, which does not fit {view:?}", t.size())));
        }
        Ok(t.to_kind(self.kind).reshape(&view))
    }

    /// Every node's value.
    pub fn run(&self, p: &Program, leaves: &Leaves) -> Result<Vec<Tensor>, Error> {
        let mut vals: Vec<Tensor> = Vec::with_capacity(p.nodes.len());
        for n in &p.nodes {
            let v = |i: &NodeId| &vals[*i as usize];
            let t = match &n.op {
                Op::Const(c) if n.ty == Type::Bool => Tensor::from(*c != 0.0).to_device(self.device),
                Op::Const(c) => self.scalar(*c),
                Op::HParam(i) => self.scalar(self.hparams[*i as usize]),
                Op::Size(s) => self.scalar(bind::size(s, self.binding, self.hparams) as f64),
                Op::Rank(axes) => self.scalar(axes.iter().map(|&a| self.binding.dims[a as usize].len()).sum::<usize>() as f64),
                Op::Step => self.scalar(self.step),
                Op::Input => self.leaf(leaves.input, &n.shape, "the input")?,
                Op::Grad => self.leaf(leaves.grad, &n.shape, "the gradient")?,
                Op::GradOutput => self.leaf(leaves.grad_output, &n.shape, "the output gradient")?,
                Op::Param(i) => self.leaf(leaves.params.get(*i as usize), &n.shape, "a parameter")?,
                Op::Buffer(i) => self.leaf(leaves.buffers.get(*i as usize), &n.shape, "a buffer")?,
                Op::State(i) => self.leaf(leaves.states.get(*i as usize), &n.shape, "a state tensor")?,
                Op::Unary(u, a) => {
                    let a = v(a);
                    match u {
                        Unary::Neg => a.neg(),
                        Unary::Not => a.logical_not(),
                        Unary::Sqrt => a.sqrt(),
                        Unary::Rsqrt => a.rsqrt(),
                        Unary::Exp => a.exp(),
                        Unary::Log => a.log(),
                        Unary::Tanh => a.tanh(),
                        Unary::Sigmoid => a.sigmoid(),
                        Unary::Sign => a.sign(),
                        Unary::Abs => a.abs(),
                        Unary::Relu => a.relu(),
                        Unary::Softplus => a.softplus(),
                        Unary::Recip => a.reciprocal(),
                        Unary::StopGradient => a.detach(),
                    }
                }
                Op::Binary(b, x, y) => {
                    let (x, y) = (v(x), v(y));
                    match b {
                        Binary::Add => x + y,
                        Binary::Sub => x - y,
                        Binary::Mul => x * y,
                        Binary::Div => x / y,
                        Binary::Pow => x.pow(y),
                        Binary::Min => x.minimum(y),
                        Binary::Max => x.maximum(y),
                        Binary::Lt => x.lt_tensor(y),
                        Binary::Le => x.le_tensor(y),
                        Binary::Gt => x.gt_tensor(y),
                        Binary::Ge => x.ge_tensor(y),
                        Binary::Eq => x.eq_tensor(y),
                        Binary::Ne => x.ne_tensor(y),
                        Binary::And => x.logical_and(y),
                        Binary::Or => x.logical_or(y),
                    }
                }
                Op::Select(c, x, y) => v(x).where_self(v(c), v(y)),
                Op::Reduce(r, a) => {
                    let src = v(a);
                    let dst = self.view(&n.shape);
                    let from = src.size();
                    let dims: Vec<i64> =
                        (0..dst.len()).filter(|&d| dst[d] == 1 && from.get(d).is_some_and(|&s| s != 1)).map(|d| d as i64).collect();
                    if dims.is_empty() {
                        src.shallow_clone()
                    } else {
                        match r {
                            ReduceOp::Sum => src.sum_dim_intlist(dims.as_slice(), true, None::<Kind>),
                            ReduceOp::Max => src.amax(dims.as_slice(), true),
                            ReduceOp::Min => src.amin(dims.as_slice(), true),
                        }
                    }
                }
                Op::Expand(a) => v(a).expand(self.view(&n.shape), false),
            };
            vals.push(t);
        }
        Ok(vals)
    }

    /// Output `target` of a program run, in the natural shape of `shape`.
    pub fn output(&self, p: &Program, vals: &[Tensor], target: Target, shape: &Shape) -> Result<Tensor, Error> {
        let id = p.output(target).ok_or_else(|| Error(format!("the program has no output {target:?}")))?;
        Ok(vals[id as usize].expand(self.view(shape), false).reshape(self.natural(shape)?))
    }
}
