//! IR programs as libtorch operations, so libtorch's autograd differentiates DSL layers.
//!
//! Each node becomes a tensor laid out over the declared axes: one dim per axis, or two
//! (`groups`, `per group`) for an axis some node groups. Broadcasting then is libtorch's own;
//! `Reduce` sums (or takes extremes) over the dims that shrink, with `keepdim`; `Expand` expands.

use crate::Error;
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::uniform;
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

    /// The first dim of axis `a` in this program's layout.
    fn dim_of(&self, a: usize) -> i64 {
        self.split[..a].iter().map(|s| if s.is_some() { 2 } else { 1 }).sum()
    }

    /// `sum(x * y)` over the dims that shrink, as one `einsum`, so a matrix product in the
    /// DSL (`sum(p * swap(p, o, j), over i)`) runs as one and never materializes `x * y`.
    fn contract(&self, x: &Tensor, y: &Tensor, dst: &[i64]) -> Result<Tensor, Error> {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        if dst.len() > LETTERS.len() {
            return Err(Error("too many dims for a contraction".into()));
        }
        let kept = |sizes: &[i64]| -> (String, Vec<i64>) {
            let dims: Vec<usize> = (0..sizes.len()).filter(|&d| sizes[d] != 1).collect();
            (dims.iter().map(|&d| LETTERS[d] as char).collect(), dims.iter().map(|&d| sizes[d]).collect())
        };
        let (sx, dx) = kept(&x.size());
        let (sy, dy) = kept(&y.size());
        let (so, _) = kept(dst);
        let operands = [x.reshape(&dx), y.reshape(&dy)];
        Ok(Tensor::f_einsum(&format!("{sx},{sy}->{so}"), &operands, None::<&[i64]>)
            .map_err(|e| Error(format!("libtorch: {e}")))?
            .reshape(dst))
    }

    /// Every node's value the outputs need (undefined tensors for the rest). A `select` on a
    /// value known before the run (a hyper-parameter, a shape) computes only its branch.
    pub fn run(&self, p: &Program, leaves: &Leaves) -> Result<Vec<Tensor>, Error> {
        let n = p.nodes.len();
        let (known, value) = uniform::on_shapes(p, self.binding, self.hparams, self.step);
        let contracted = contracted_products(p);
        // A contracted sum reads its product's factors, not the product.
        let needed = uniform::needed(p, &known, &value, |i| match p.nodes[i].op {
            Op::Reduce(ReduceOp::Sum, a) if contracted[a as usize] => p.nodes[a as usize].op.args(),
            ref op => op.args(),
        });
        let mut vals: Vec<Tensor> = Vec::with_capacity(n);
        for (i, node) in p.nodes.iter().enumerate() {
            let t = match node.op {
                _ if !needed[i] => Tensor::new(),
                Op::Select(c, x, y) if known[c as usize] => {
                    let pick = if value[c as usize] != 0.0 { x } else { y };
                    vals[pick as usize].expand(self.view(&node.shape), false)
                }
                _ => self.node(p, i, &vals, leaves, &contracted)?,
            };
            vals.push(t);
        }
        Ok(vals)
    }

    /// Node `i` of `p`, from the values of its arguments.
    fn node(&self, p: &Program, i: usize, vals: &[Tensor], leaves: &Leaves, contracted: &[bool]) -> Result<Tensor, Error> {
        let n = &p.nodes[i];
        let v = |i: &NodeId| &vals[*i as usize];
        Ok(match &n.op {
            Op::Const(c) if n.ty == Type::Bool => Tensor::from(*c != 0.0).to_device(self.device),
            Op::Const(c) => self.scalar(*c),
            Op::HParam(i) => self.scalar(self.hparams[*i as usize]),
            op @ (Op::Size(_) | Op::Rank(_)) => self.scalar(bind::query(op, self.binding, self.hparams).unwrap_or_default() as f64),
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
            Op::Reduce(ReduceOp::Sum, a) if contracted[*a as usize] => {
                let Op::Binary(Binary::Mul, x, y) = p.nodes[*a as usize].op else { unreachable!("only products are contracted") };
                self.contract(v(&x), v(&y), &self.view(&n.shape))?
            }
            Op::Swap(a, x, y) => {
                let (x, y) = (*x as usize, *y as usize);
                if self.split[x].is_some() || self.split[y].is_some() {
                    return Err(Error("the tch backend cannot swap an axis that the program groups".into()));
                }
                v(a).transpose(self.dim_of(x), self.dim_of(y))
            }
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
        })
    }

    /// Output `target` of a program run, in the natural shape of `shape`.
    pub fn output(&self, p: &Program, vals: &[Tensor], target: Target, shape: &Shape) -> Result<Tensor, Error> {
        let id = p.output(target).ok_or_else(|| Error(format!("the program has no output {target:?}")))?;
        Ok(vals[id as usize].expand(self.view(shape), false).reshape(self.natural(shape)?))
    }
}

/// The products whose only readers are sums and that are not outputs: `run` computes each
/// inside the sums as a contraction instead of on its own.
fn contracted_products(p: &Program) -> Vec<bool> {
    let n = p.nodes.len();
    let mut only_summed = vec![true; n];
    for node in &p.nodes {
        let summed = matches!(node.op, Op::Reduce(ReduceOp::Sum, _));
        for a in node.op.args() {
            only_summed[a as usize] &= summed;
        }
    }
    for o in &p.outputs {
        only_summed[o.node as usize] = false;
    }
    (0..n)
        .map(|i| {
            only_summed[i]
                && matches!(p.nodes[i].op, Op::Binary(Binary::Mul, x, y)
                    if !p.nodes[x as usize].shape.is_scalar() && !p.nodes[y as usize].shape.is_scalar())
        })
        .collect()
}

/// Whether the tensor `run` gives for `node` may share memory with a tensor the program read
/// (views: broadcasts, swaps, a select's branch, a detach). A value kept across steps must not:
/// the gradient it viewed is zeroed and the parameter overwritten in place.
pub fn may_alias_leaf(p: &Program, node: NodeId) -> bool {
    let mut todo = vec![node];
    while let Some(i) = todo.pop() {
        match p.nodes[i as usize].op {
            Op::Input | Op::Grad | Op::GradOutput | Op::Param(_) | Op::Buffer(_) | Op::State(_) => return true,
            Op::Expand(a) | Op::Swap(a, ..) | Op::Reduce(_, a) | Op::Unary(Unary::StopGradient, a) => todo.push(a),
            Op::Select(_, x, y) => todo.extend([x, y]),
            _ => {}
        }
    }
    false
}
