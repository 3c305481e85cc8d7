//! IR programs as libtorch operations, so libtorch's autograd differentiates DSL layers.
//!
//! Each node becomes a tensor laid out over the declared axes: one dim per axis, or two
//! (`groups`, `per group`) for an axis some node groups. Broadcasting then is libtorch's own;
//! `Reduce` sums (or takes extremes) over the dims that shrink, with `keepdim`; `Expand` expands.

use crate::shim::{self, Combine};
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

/// A program run's values, by node.
pub struct Values(Vec<Value>);

impl Values {
    /// Node `i`'s value where it is a tensor.
    fn tensor_of(&self, i: NodeId) -> Option<Tensor> {
        match &self.0[i as usize] {
            Value::Tensor(t, _) => Some(t.shallow_clone()),
            _ => None,
        }
    }
}

enum Value {
    /// With whether this run made its memory and nothing else views it, so that its last
    /// reader may write over it.
    Tensor(Tensor, bool),
    /// One number for the whole run, computed on the host (`uniform`).
    Known(f64),
    /// Not needed by the outputs, or dropped after its last reader.
    Unused,
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

    /// Every node's value the outputs need. A value known before the run (a hyper-parameter,
    /// the step, a shape, arithmetic on those: `uniform`) is computed once on the host in f64
    /// and given to libtorch as a scalar operand, not as a tensor of its own with an operation
    /// per node; a `select` on such a value computes only its branch. A value no later node or
    /// output reads is dropped after its last reader, so libtorch's allocator reuses its memory
    /// within the run, and where nothing records its history for autograd, that reader writes
    /// its result over it (`in_place`).
    pub fn run(&self, p: &Program, leaves: &Leaves) -> Result<Values, Error> {
        let n = p.nodes.len();
        let (known, value) = uniform::on_shapes(p, self.binding, self.hparams, self.step);
        let contracted = contracted_products(p);
        let taped = shim::grad_enabled() && [leaves.input, leaves.grad, leaves.grad_output].into_iter().flatten().chain(leaves.params).chain(leaves.buffers).chain(leaves.states).any(Tensor::requires_grad);
        let fused = fusions(p, &known, &value, taped);
        // A contracted sum reads its product's factors, not the product; a fused node, the
        // arguments of the nodes it computes inside itself.
        let reads = |i: usize| match (&p.nodes[i].op, fused[i]) {
            (_, Some(f)) => f.reads(),
            (&Op::Reduce(ReduceOp::Sum, a), _) if contracted[a as usize] => p.nodes[a as usize].op.args(),
            (op, _) => op.args(),
        };
        let needed = uniform::needed(p, &known, &value, reads);
        let mut last = vec![usize::MAX; n];
        for i in (0..n).filter(|&i| needed[i] && !known[i]) {
            for a in reads(i) {
                last[a as usize] = i;
            }
        }
        for o in &p.outputs {
            last[o.node as usize] = usize::MAX;
        }
        let mut vals = Values(Vec::with_capacity(n));
        // Once autograd records an operation of this run, it may have saved any value for its
        // backward, so from then on nothing is written over.
        let mut recording = false;
        for (i, node) in p.nodes.iter().enumerate() {
            let v = match node.op {
                _ if !needed[i] => Value::Unused,
                _ if known[i] => Value::Known(value[i]),
                Op::Select(c, x, y) if known[c as usize] => {
                    let pick = if value[c as usize] != 0.0 { x } else { y };
                    Value::Tensor(self.tensor(p, &vals, pick).expand(self.view(&node.shape), false), false)
                }
                _ => {
                    let dead = |a: NodeId| !recording && last[a as usize] == i;
                    let (t, fresh) = match fused[i] {
                        Some(f) => (Self::fused(p, &vals, f, dead)?, true),
                        None => self.node(p, i, &vals, leaves, &contracted, dead)?,
                    };
                    Value::Tensor(t, fresh)
                }
            };
            // (A leaf requiring grad is no record: an optimizer's parameter is one.)
            if let (Value::Tensor(t, _), false) = (&v, node.op.args().is_empty()) {
                recording |= t.requires_grad();
            }
            // A view shares its arguments' memory: none of them may be written over now.
            let view = matches!(v, Value::Tensor(_, false));
            vals.0.push(v);
            for a in reads(i) {
                match &mut vals.0[a as usize] {
                    _ if last[a as usize] == i => vals.0[a as usize] = Value::Unused,
                    Value::Tensor(_, own) if view => *own = false,
                    _ => {}
                }
            }
        }
        Ok(vals)
    }

    /// Node `i`'s value as a tensor: a value known before the run as a scalar of the run's
    /// kind, broadcast to the node's shape.
    fn tensor(&self, p: &Program, vals: &Values, i: NodeId) -> Tensor {
        let i = i as usize;
        match &vals.0[i] {
            Value::Tensor(t, _) => t.shallow_clone(),
            Value::Known(v) => {
                let t = if p.nodes[i].ty == Type::Bool { Tensor::from(*v != 0.0).to_device(self.device) } else { self.scalar(*v) };
                t.expand(self.view(&p.nodes[i].shape), false)
            }
            Value::Unused => unreachable!("`run` keeps every value until its last reader"),
        }
    }

    /// Node `a`'s tensor, where this node may write its result over it: a float tensor this
    /// run made, that nothing else views and no later node reads, in a run autograd has not
    /// recorded so far (`dead` says both).
    fn in_place(p: &Program, vals: &Values, a: NodeId, dead: &impl Fn(NodeId) -> bool) -> Option<Tensor> {
        match &vals.0[a as usize] {
            Value::Tensor(t, true) if dead(a) && p.nodes[a as usize].ty != Type::Bool => Some(t.shallow_clone()),
            _ => None,
        }
    }

    /// `x b y` where one side is a float tensor and the other a value known before the run,
    /// as one libtorch operation taking the known value as a scalar, where there is one that
    /// computes the same as with that value a tensor (`None` otherwise); over the tensor where
    /// [`Lowering::in_place`] allows.
    fn with_known(p: &Program, vals: &Values, b: Binary, x: NodeId, y: NodeId, dead: &impl Fn(NodeId) -> bool) -> Option<Tensor> {
        let (id, s, flip) = match (&vals.0[x as usize], &vals.0[y as usize]) {
            (Value::Tensor(..), Value::Known(s)) if p.nodes[x as usize].ty != Type::Bool => (x, *s, false),
            (Value::Known(s), Value::Tensor(..)) if p.nodes[y as usize].ty != Type::Bool => (y, *s, true),
            _ => return None,
        };
        if let Some(mut t) = Self::in_place(p, vals, id, dead) {
            match (b, flip) {
                (Binary::Add, _) => return Some(t.g_add_scalar_(s)),
                (Binary::Mul, _) => return Some(t.g_mul_scalar_(s)),
                (Binary::Sub, false) => return Some(t.g_sub_scalar_(s)),
                (Binary::Div, false) => return Some(t.g_div_scalar_(s)),
                _ => {}
            }
        }
        let Value::Tensor(x, _) = &vals.0[id as usize] else { unreachable!("matched above") };
        Some(match (b, flip) {
            (Binary::Add, _) => x + s,
            (Binary::Mul, _) => x * s,
            (Binary::Sub, false) => x - s,
            (Binary::Sub, true) => x.rsub_scalar(s),
            (Binary::Div, false) => x / s,
            (Binary::Pow, false) => x.pow_tensor_scalar(s),
            (Binary::Lt, false) | (Binary::Gt, true) => x.lt(s),
            (Binary::Le, false) | (Binary::Ge, true) => x.le(s),
            (Binary::Gt, false) | (Binary::Lt, true) => x.gt(s),
            (Binary::Ge, false) | (Binary::Le, true) => x.ge(s),
            (Binary::Eq, _) => x.eq(s),
            (Binary::Ne, _) => x.ne(s),
            _ => return None,
        })
    }

    /// Node `a`'s tensor, where an operation with the other operands `others` may write its
    /// result over it: [`Lowering::in_place`] allows, it is as large as each of them, and
    /// none is a tensor autograd differentiates, which would make it record the operation,
    /// whose backward may need the value written over.
    fn in_place_with(p: &Program, vals: &Values, a: NodeId, others: &[NodeId], dead: &impl Fn(NodeId) -> bool) -> Option<Tensor> {
        let t = Self::in_place(p, vals, a, dead)?;
        let fits = |o: &NodeId| match &vals.0[*o as usize] {
            Value::Tensor(o, _) => t.size().iter().zip(o.size()).all(|(a, b)| *a >= b) && !o.requires_grad(),
            _ => false,
        };
        others.iter().all(fits).then_some(t)
    }

    /// `x b y` on two float tensors, over one of them where [`Lowering::in_place_with`] allows.
    fn binary_in_place(p: &Program, vals: &Values, b: Binary, x: NodeId, y: NodeId, dead: &impl Fn(NodeId) -> bool) -> Option<Tensor> {
        let into = |a: NodeId, o: NodeId| Some((Self::in_place_with(p, vals, a, &[o], dead)?, vals.tensor_of(o)?));
        let commutes = matches!(b, Binary::Add | Binary::Mul);
        let (mut t, o) = into(x, y).or_else(|| if commutes && x != y { into(y, x) } else { None })?;
        Some(match b {
            Binary::Add => t.g_add_(&o),
            Binary::Mul => t.g_mul_(&o),
            Binary::Sub => t.g_sub_(&o),
            Binary::Div => t.g_div_(&o),
            _ => return None,
        })
    }

    /// A fused node's value: one libtorch operation (`shim::scaled_combine`), written over the
    /// first of its operands [`Lowering::in_place_with`] allows, so it allocates where its
    /// nodes one at a time would have (where none of its operands may be written over).
    fn fused(p: &Program, vals: &Values, f: Fusion, dead: impl Fn(NodeId) -> bool) -> Result<Tensor, Error> {
        let t = |i: NodeId| vals.tensor_of(i).ok_or_else(|| Error("a fused operand is not a tensor".into()));
        let reads = f.reads();
        let out = (0..reads.len()).find_map(|k| {
            let others: Vec<NodeId> = reads.iter().enumerate().filter(|&(j, _)| j != k).map(|(_, &r)| r).collect();
            Self::in_place_with(p, vals, reads[k], &others, &dead)
        });
        // (`y` is `x` again where the form takes one operand.)
        let (a, x, y) = (t(reads[0])?, t(reads[1])?, t(*reads.last().expect("a and x"))?);
        let combine = match f.form {
            Form::Add(_) => Combine::Add(&x),
            Form::Lerp(_) => Combine::Lerp(&x),
            Form::Mul(..) => Combine::Mul(&x, &y),
            Form::Div(..) => Combine::Div(&x, &y),
        };
        shim::scaled_combine(combine, &a, f.k, out.as_ref())
    }

    /// Node `i` of `p`, from the values of its arguments (`dead`: whether `i` is the last to
    /// read one); `i` is not known before the run. With whether the tensor is new memory (not
    /// a view of an argument's).
    fn node(&self, p: &Program, i: usize, vals: &Values, leaves: &Leaves, contracted: &[bool], dead: impl Fn(NodeId) -> bool) -> Result<(Tensor, bool), Error> {
        let n = &p.nodes[i];
        let v = |i: &NodeId| self.tensor(p, vals, *i);
        let fresh = |t: Tensor| Ok((t, true));
        let view = |t: Tensor| Ok((t, false));
        match &n.op {
            Op::Const(_) | Op::HParam(_) | Op::Size(_) | Op::Rank(_) | Op::Step => unreachable!("known before the run"),
            Op::Input => view(self.leaf(leaves.input, &n.shape, "the input")?),
            Op::Grad => view(self.leaf(leaves.grad, &n.shape, "the gradient")?),
            Op::GradOutput => view(self.leaf(leaves.grad_output, &n.shape, "the output gradient")?),
            Op::Param(i) => view(self.leaf(leaves.params.get(*i as usize), &n.shape, "a parameter")?),
            Op::Buffer(i) => view(self.leaf(leaves.buffers.get(*i as usize), &n.shape, "a buffer")?),
            Op::State(i) => view(self.leaf(leaves.states.get(*i as usize), &n.shape, "a state tensor")?),
            Op::Unary(Unary::StopGradient, a) => view(v(a).detach()),
            Op::Unary(u, a) => {
                if let Some(mut t) = Self::in_place(p, vals, *a, &dead) {
                    let done = match u {
                        Unary::Neg => Some(t.neg_()),
                        Unary::Sqrt => Some(t.sqrt_()),
                        Unary::Rsqrt => Some(t.rsqrt_()),
                        Unary::Exp => Some(t.exp_()),
                        Unary::Log => Some(t.log_()),
                        Unary::Tanh => Some(t.tanh_()),
                        Unary::Sigmoid => Some(t.sigmoid_()),
                        Unary::Sign => Some(t.sign_()),
                        Unary::Abs => Some(t.abs_()),
                        Unary::Relu => Some(t.relu_()),
                        Unary::Recip => Some(t.reciprocal_()),
                        _ => None,
                    };
                    if let Some(t) = done {
                        return fresh(t);
                    }
                }
                let a = v(a);
                fresh(match u {
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
                    Unary::StopGradient => unreachable!("matched above"),
                })
            }
            Op::Binary(b, x, y) => {
                if let Some(t) = Self::with_known(p, vals, *b, *x, *y, &dead).or_else(|| Self::binary_in_place(p, vals, *b, *x, *y, &dead)) {
                    return fresh(t);
                }
                let (x, y) = (&v(x), &v(y));
                fresh(match b {
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
                })
            }
            Op::Select(c, x, y) => fresh(v(x).where_self(&v(c), &v(y))),
            // einsum may return a view of an operand.
            Op::Reduce(ReduceOp::Sum, a) if contracted[*a as usize] => {
                let Op::Binary(Binary::Mul, x, y) = p.nodes[*a as usize].op else { unreachable!("only products are contracted") };
                view(self.contract(&v(&x), &v(&y), &self.view(&n.shape))?)
            }
            Op::Swap(a, x, y) => {
                let (x, y) = (*x as usize, *y as usize);
                if self.split[x].is_some() || self.split[y].is_some() {
                    return Err(Error("the tch backend cannot swap an axis that the program groups".into()));
                }
                view(v(a).transpose(self.dim_of(x), self.dim_of(y)))
            }
            Op::Reduce(r, a) => {
                let src = v(a);
                let dst = self.view(&n.shape);
                let from = src.size();
                let dims: Vec<i64> =
                    (0..dst.len()).filter(|&d| dst[d] == 1 && from.get(d).is_some_and(|&s| s != 1)).map(|d| d as i64).collect();
                if dims.is_empty() {
                    view(src)
                } else {
                    fresh(match r {
                        ReduceOp::Sum => src.sum_dim_intlist(dims.as_slice(), true, None::<Kind>),
                        ReduceOp::Max => src.amax(dims.as_slice(), true),
                        ReduceOp::Min => src.amin(dims.as_slice(), true),
                    })
                }
            }
            Op::Expand(a) => view(v(a).expand(self.view(&n.shape), false)),
        }
    }

    /// Output `target` of a program run, in the natural shape of `shape`.
    pub fn output(&self, p: &Program, vals: &Values, target: Target, shape: &Shape) -> Result<Tensor, Error> {
        let id = p.output(target).ok_or_else(|| Error(format!("the program has no output {target:?}")))?;
        Ok(self.tensor(p, vals, id).expand(self.view(shape), false).reshape(self.natural(shape)?))
    }
}

/// A node computed as `a + k f` in one libtorch operation (`shim::scaled_combine`), with
/// the nodes between it and `f`'s operands computed inside it, never on their own: each pass
/// over a tensor and each allocation saved counts on the CPU, where an update rule's step or a
/// layer is memory-bound (`benches/tch_builtins.rs`). An Adam step's `v = b2 v + (1 - b2) g g`
/// is an `addcmul`, its `m = lerp(m, g, 1 - b1)` a `lerp`, and `p - c m / d` an `addcdiv`.
#[derive(Clone, Copy, Debug)]
struct Fusion {
    a: NodeId,
    form: Form,
    /// Known before the run: the product of the scalar factors.
    k: f64,
}

#[derive(Clone, Copy, Debug)]
enum Form {
    Add(NodeId),
    Mul(NodeId, NodeId),
    Div(NodeId, NodeId),
    /// `x - a`.
    Lerp(NodeId),
}

impl Fusion {
    /// What the fused node reads: `a` first.
    fn reads(&self) -> Args {
        match self.form {
            Form::Add(x) | Form::Lerp(x) => Args::of(&[self.a, x]),
            Form::Mul(x, y) | Form::Div(x, y) => Args::of(&[self.a, x, y]),
        }
    }
}

/// Per node, how `run` fuses it, if it does: a sum or a difference of a float tensor `a` and a
/// term `k f` whose nodes nothing else reads, `k` the scalar factors known before the run
/// (`value`), `f` a tensor, a product or a quotient of two, or `x - a`. The nodes a fused node
/// computes inside itself are not fused themselves: each has one reader, in the same fused
/// node, so no other fused node reads what one computes inside itself. Only where every operand
/// has the node's shape: libtorch's kernels of three operands lose their vector loop where two
/// are broadcast (a layer's `x w + b` ran slower as an `addcmul`). Where autograd records
/// the run (`taped`), no products or quotients: libtorch's backward of `addcmul` and `addcdiv`
/// scales by their factor whatever it is, and so takes twice the operations of a product's.
fn fusions(p: &Program, known: &[bool], value: &[f64], taped: bool) -> Vec<Option<Fusion>> {
    let n = p.nodes.len();
    let mut readers = vec![0u32; n];
    for node in &p.nodes {
        for a in node.op.args() {
            readers[a as usize] += 1;
        }
    }
    for o in &p.outputs {
        readers[o.node as usize] += 2;
    }
    let tensor = |i: NodeId| !known[i as usize] && p.nodes[i as usize].ty == Type::Float;
    // Computed inside its one reader.
    let inner = |i: NodeId| readers[i as usize] == 1 && tensor(i);
    // `u` as `k v`: the scalar factors and negations computed inside the fused node taken out.
    let peel = |mut u: NodeId, absorbed: &mut Vec<NodeId>| -> (f64, NodeId) {
        let mut k = 1.0;
        while inner(u) {
            let (s, v) = match p.nodes[u as usize].op {
                Op::Binary(Binary::Mul, x, y) if known[x as usize] && tensor(y) => (value[x as usize], y),
                Op::Binary(Binary::Mul, x, y) if tensor(x) && known[y as usize] => (value[y as usize], x),
                Op::Binary(Binary::Div, x, y) if tensor(x) && known[y as usize] => (1.0 / value[y as usize], x),
                Op::Unary(Unary::Neg, x) if tensor(x) => (-1.0, x),
                _ => break,
            };
            k *= s;
            absorbed.push(u);
            u = v;
        }
        (k, u)
    };
    // `t` as `k f` beside `a`, with the nodes it computes inside itself, or None where it is no
    // such term (or one with nothing to fuse: `a + t` as it is).
    let term = |t: NodeId, a: NodeId, absorbed: &mut Vec<NodeId>| -> Option<(f64, Form)> {
        let (k, t) = peel(t, absorbed);
        let scaled = !absorbed.is_empty();
        if !inner(t) {
            return (scaled && tensor(t)).then_some((k, Form::Add(t)));
        }
        match p.nodes[t as usize].op {
            Op::Binary(b @ (Binary::Mul | Binary::Div), x, y) if tensor(x) && tensor(y) && !taped => {
                absorbed.push(t);
                let ((kx, x), (ky, y)) = (peel(x, absorbed), peel(y, absorbed));
                Some(if b == Binary::Mul { (k * kx * ky, Form::Mul(x, y)) } else { (k * kx / ky, Form::Div(x, y)) })
            }
            Op::Binary(Binary::Sub, x, b) if b == a && tensor(x) && scaled => {
                absorbed.push(t);
                Some((k, Form::Lerp(x)))
            }
            _ => scaled.then_some((k, Form::Add(t))),
        }
    };
    let mut fused: Vec<Option<Fusion>> = vec![None; n];
    let mut inside = vec![false; n];
    for i in (0..n).rev() {
        let (sign, sides): (f64, &[(NodeId, NodeId)]) = match p.nodes[i].op {
            _ if inside[i] || !tensor(i as NodeId) => continue,
            Op::Binary(Binary::Add, x, y) => (1.0, &[(x, y), (y, x)]),
            Op::Binary(Binary::Sub, x, y) => (-1.0, &[(x, y)]),
            _ => continue,
        };
        for &(a, t) in sides {
            let mut absorbed = Vec::new();
            if !tensor(a) {
                continue;
            }
            let Some((k, form)) = term(t, a, &mut absorbed) else { continue };
            let f = Fusion { a, form, k: sign * k };
            if f.reads().iter().all(|&r| p.nodes[r as usize].shape == p.nodes[i].shape) {
                for &j in &absorbed {
                    inside[j as usize] = true;
                }
                fused[i] = Some(f);
                break;
            }
        }
    }
    fused
}

/// The products whose only readers are sums and that are not outputs, of factors of different
/// shapes (a matrix product: the product is larger than either factor): `run` computes each
/// inside the sums as a contraction (`einsum`) instead of on its own. A product of factors of
/// one shape is no larger than they are, and `einsum` would copy both into its own layout first
/// where the sum keeps a dim after one it folds (a batch norm's sums over `n` and `s`); where it
/// would not (a norm's sum of squares over its row), a large RMS norm's forward gains but every
/// layer's backward under autograd loses, most of all at small sizes (`benches/tch_builtins.rs`,
/// BENCHMARKS.md).
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
                    if !p.nodes[x as usize].shape.is_scalar() && !p.nodes[y as usize].shape.is_scalar()
                        && p.nodes[x as usize].shape != p.nodes[y as usize].shape)
        })
        .collect()
}

/// Whether the tensor `run` gives for `node` may share memory with a tensor the program read
/// that is written in place later (views: broadcasts, swaps, a select's branch, a detach). A
/// value kept across steps must not: the gradient it viewed is zeroed and the parameter
/// overwritten in place. A state is never written in place, so a state kept as it was (SGD's
/// buffer without momentum) is that tensor itself, not a copy.
pub fn may_alias_leaf(p: &Program, node: NodeId) -> bool {
    let mut todo = vec![node];
    while let Some(i) = todo.pop() {
        match p.nodes[i as usize].op {
            Op::Input | Op::Grad | Op::GradOutput | Op::Param(_) | Op::Buffer(_) => return true,
            Op::Expand(a) | Op::Swap(a, ..) | Op::Reduce(_, a) | Op::Unary(Unary::StopGradient, a) => todo.push(a),
            Op::Select(_, x, y) => todo.extend([x, y]),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW's step (default hyper-parameters, the first step) in three fused operations
    /// beside the products and quotients of its own: the moments by `lerp` and `addcmul`, the
    /// update by `addcdiv`, each with the scalar factors the DSL writes around them taken in.
    #[test]
    fn adamw_step_fuses_its_moments_and_its_update() {
        let entry = &normforge_dsl::compile(include_str!("../../../plugins/std/nf/adamw.nf")).expect("adamw.nf compiles")[0];
        let Programs::Optimizer { step: p } = &entry.programs else { panic!("adamw is an optimizer") };
        let binding = bind::bind_axes(&entry.axes, &[4, 3], "p").expect("binds");
        let hparams: Vec<f64> = entry.hparams.iter().map(|h| h.default).collect();
        let (known, value) = uniform::on_shapes(p, &binding, &hparams, 1.0);
        let op = |i: NodeId| &p.nodes[i as usize].op;
        let out = |t: Target| p.output(t).expect("an output");
        let fused = fusions(p, &known, &value, false);
        assert_eq!(fused.iter().flatten().count(), 3, "{fused:?}");
        let at = |t: Target| fused[out(t) as usize].unwrap_or_else(|| panic!("{t:?} is not fused: {fused:?}"));
        let close = |k: f64, want: f64| (k - want).abs() < 1e-12 * want.abs();
        // m + (1 - beta1) (g - m)
        let lerp = at(Target::State(0));
        assert!(matches!(op(lerp.a), Op::State(0)) && matches!(lerp.form, Form::Lerp(g) if *op(g) == Op::Grad), "{lerp:?}");
        assert!(close(lerp.k, 0.1), "{lerp:?}");
        // beta2 v + (1 - beta2) g g
        let addcmul = at(Target::State(1));
        assert!(matches!(op(addcmul.a), Op::Binary(Binary::Mul, ..)), "{addcmul:?}");
        assert!(matches!(addcmul.form, Form::Mul(x, y) if *op(x) == Op::Grad && *op(y) == Op::Grad), "{addcmul:?}");
        assert!(close(addcmul.k, 1e-3), "{addcmul:?}");
        // p (1 - lr wd) - lr / (1 - beta1^t) m / denom, m the new first moment
        let addcdiv = at(Target::P);
        assert!(matches!(addcdiv.form, Form::Div(m, _) if m == out(Target::State(0))), "{addcdiv:?}");
        assert!(close(addcdiv.k, -1e-3 / 0.1), "{addcdiv:?}");
    }
}
