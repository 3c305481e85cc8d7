//! The checked IR: what every backend consumes.
//!
//! An [`Entry`] is one layer, reparam or optimizer. Its computations are [`Program`]s: flat SSA
//! node lists in topological order, so every pass is a loop, never a recursion. Shapes are
//! symbolic: a node's [`Shape`] says, for each axis the entry declared, whether the value
//! varies along it fully, per group, or not at all (broadcast).

use serde::{Deserialize, Serialize};

pub use crate::ast::ItemKind as Kind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    pub name: String,
    pub meta: Meta,
    /// The name of the input tensor (`x` for layers, `w` for reparams, `p` for optimizers).
    pub input: String,
    pub axes: Vec<Axis>,
    pub hparams: Vec<HParam>,
    pub params: Vec<TensorDecl>,
    pub buffers: Vec<TensorDecl>,
    pub states: Vec<TensorDecl>,
    /// Initial values: outputs `Param(i)`, `Buffer(i)` and `State(i)`, each broadcast to its
    /// declared shape. State initialisers may read the parameter (`Input`).
    pub init: Program,
    pub programs: Programs,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Programs {
    /// Layers and reparams: forward per mode (outputs `Y` and `Buffer(i)`), and the derived
    /// backward per mode (input `GradOutput`, outputs `GradInput` and `GradParam(i)`).
    Layer { train: Program, eval: Program, train_backward: Program, eval_backward: Program },
    /// Optimizers: one step (outputs `P` and `State(i)`).
    Optimizer { step: Program },
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Meta {
    pub paper: Option<String>,
    pub doc: Option<String>,
    pub reference: Option<String>,
    pub version: Option<String>,
    pub aliases: Vec<String>,
    /// Other `@key "value"` attributes, in source order.
    pub extra: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Axis {
    /// `None` for the anonymous batch axes `...`.
    pub name: Option<String>,
    pub variadic: bool,
    /// `with j = o`: an axis the input lacks, as long as the input's axis at this index. Twins
    /// follow the input's axes, so a value varying along one is e.g. a Gram matrix `p p^T`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<u32>,
}

impl Axis {
    /// The input's axis this one takes its length from (itself, for the input's own axes).
    pub fn origin(axes: &[Axis], i: usize) -> usize {
        axes[i].twin.map_or(i, |o| o as usize)
    }

    pub fn display_name(&self) -> String {
        match (&self.name, self.variadic) {
            (Some(n), true) => format!("{n}..."),
            (Some(n), false) => n.clone(),
            (None, _) => "...".into(),
        }
    }
}

impl Entry {
    /// The input's shape: every axis of the input, none of its twins.
    pub fn input_shape(&self) -> Shape {
        input_shape(&self.axes)
    }
}

pub fn input_shape(axes: &[Axis]) -> Shape {
    Shape(axes.iter().map(|a| if a.twin.is_some() { Extent::One } else { Extent::Full }).collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HType {
    Float,
    Int,
    Bool,
}

impl HType {
    pub fn name(self) -> &'static str {
        match self {
            HType::Float => "float",
            HType::Int => "int",
            HType::Bool => "bool",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HParam {
    pub name: String,
    pub ty: HType,
    /// Bools are 0 or 1; ints are whole numbers.
    pub default: f64,
    pub range: Option<Range>,
    pub doc: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub lo: f64,
    pub hi: f64,
    pub lo_inclusive: bool,
    pub hi_inclusive: bool,
}

impl Range {
    pub fn contains(&self, v: f64) -> bool {
        let lo_ok = if self.lo_inclusive { v >= self.lo } else { v > self.lo };
        let hi_ok = if self.hi_inclusive { v <= self.hi } else { v < self.hi };
        lo_ok && hi_ok
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}, {}{}",
            if self.lo_inclusive { "[" } else { "(" },
            fmt_f64(self.lo),
            fmt_f64(self.hi),
            if self.hi_inclusive { "]" } else { ")" }
        )
    }
}

/// A parameter, buffer or state tensor and the axes it varies along.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorDecl {
    pub name: String,
    pub shape: Shape,
}

/// How many groups an axis is split into: a literal or an `int` hyper-parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Groups {
    Count(u32),
    HParam(u32),
}

/// How a value varies along one declared axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Extent {
    /// Constant along the axis (broadcast).
    One,
    /// One value per group of consecutive indices.
    Grouped(Groups),
    /// One value per index.
    Full,
}

/// A node's shape: one [`Extent`] per declared axis of the entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shape(pub Vec<Extent>);

impl Shape {
    pub fn scalar(rank: usize) -> Shape {
        Shape(vec![Extent::One; rank])
    }
    pub fn full(rank: usize) -> Shape {
        Shape(vec![Extent::Full; rank])
    }
    pub fn is_scalar(&self) -> bool {
        self.0.iter().all(|e| *e == Extent::One)
    }
    /// The shape of an elementwise result, or `None` if the two cannot broadcast.
    pub fn join(&self, other: &Shape) -> Option<Shape> {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| match (a, b) {
                (Extent::One, x) | (x, Extent::One) => Some(*x),
                (Extent::Full, _) | (_, Extent::Full) => Some(Extent::Full),
                (Extent::Grouped(g), Extent::Grouped(h)) if g == h => Some(*a),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .map(Shape)
    }
    /// Whether `self` can be broadcast to `other` (every extent of `self` is at most as fine).
    pub fn fits_in(&self, other: &Shape) -> bool {
        self.join(other).as_ref() == Some(other)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Type {
    Float,
    Bool,
}

pub type NodeId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Unary {
    Neg,
    Not,
    Sqrt,
    Rsqrt,
    Exp,
    Log,
    Tanh,
    Sigmoid,
    Sign,
    Abs,
    Relu,
    Softplus,
    Recip,
    /// The identity whose derivative is zero: what the backward pass must treat as a constant
    /// (spectral_norm's power iteration, as torch runs it under `no_grad`).
    StopGradient,
}

impl Unary {
    pub fn name(self) -> &'static str {
        match self {
            Unary::Neg => "neg",
            Unary::Not => "not",
            Unary::Sqrt => "sqrt",
            Unary::Rsqrt => "rsqrt",
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Tanh => "tanh",
            Unary::Sigmoid => "sigmoid",
            Unary::Sign => "sign",
            Unary::Abs => "abs",
            Unary::Relu => "relu",
            Unary::Softplus => "softplus",
            Unary::Recip => "recip",
            Unary::StopGradient => "stop_gradient",
        }
    }
    pub fn apply(self, a: f64) -> f64 {
        match self {
            Unary::Neg => -a,
            Unary::Not => f64::from(a == 0.0),
            Unary::Sqrt => a.sqrt(),
            Unary::Rsqrt => 1.0 / a.sqrt(),
            Unary::Exp => a.exp(),
            Unary::Log => a.ln(),
            Unary::Tanh => a.tanh(),
            Unary::Sigmoid => 1.0 / (1.0 + (-a).exp()),
            Unary::Sign => {
                if a > 0.0 {
                    1.0
                } else if a < 0.0 {
                    -1.0
                } else {
                    a // keeps 0 and NaN
                }
            }
            Unary::Abs => a.abs(),
            Unary::Relu => {
                // NaN stays NaN.
                if a > 0.0 || a.is_nan() {
                    a
                } else {
                    0.0
                }
            }
            // log(1 + e^a), without overflow for large a.
            Unary::Softplus => a.max(0.0) + (-a.abs()).exp().ln_1p(),
            Unary::Recip => 1.0 / a,
            Unary::StopGradient => a,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl Binary {
    pub fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
            Binary::Pow => "pow",
            Binary::Min => "min",
            Binary::Max => "max",
            Binary::Lt => "lt",
            Binary::Le => "le",
            Binary::Gt => "gt",
            Binary::Ge => "ge",
            Binary::Eq => "eq",
            Binary::Ne => "ne",
            Binary::And => "and",
            Binary::Or => "or",
        }
    }
    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Pow => a.powf(b),
            // NaN-propagating, like torch.minimum/maximum.
            Binary::Min => if a.is_nan() || b.is_nan() { f64::NAN } else { a.min(b) },
            Binary::Max => if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) },
            Binary::Lt => f64::from(a < b),
            Binary::Le => f64::from(a <= b),
            Binary::Gt => f64::from(a > b),
            Binary::Ge => f64::from(a >= b),
            Binary::Eq => f64::from(a == b),
            Binary::Ne => f64::from(a != b),
            Binary::And => f64::from(a != 0.0 && b != 0.0),
            Binary::Or => f64::from(a != 0.0 || b != 0.0),
        }
    }
    pub fn result_type(self) -> Type {
        match self {
            Binary::Lt | Binary::Le | Binary::Gt | Binary::Ge | Binary::Eq | Binary::Ne | Binary::And | Binary::Or => {
                Type::Bool
            }
            _ => Type::Float,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    Const(f64),
    HParam(u32),
    /// Number of elements per output element of a reduction over the given axes
    /// (`Grouped` counts one group), known only from the run-time input shape.
    Size(Shape),
    /// Number of run-time dims bound to the given axes (variadic axes bind zero or more).
    Rank(Vec<u32>),
    /// The optimizer's step count `t`, 1 on the first step.
    Step,
    Input,
    Grad,
    GradOutput,
    Param(u32),
    Buffer(u32),
    State(u32),
    Unary(Unary, NodeId),
    Binary(Binary, NodeId, NodeId),
    Select(NodeId, NodeId, NodeId),
    /// Reduce the argument down to this node's shape.
    Reduce(ReduceOp, NodeId),
    /// Broadcast the argument up to this node's shape.
    Expand(NodeId),
    /// The argument with two axes of the same length exchanged: `swap(a, o, j)` reads
    /// `a[.., o = j', .., j = o', ..]`, so `sum(p * swap(p, o, j), over i)` is `p p^T`.
    Swap(NodeId, u32, u32),
}

impl Op {
    pub fn args(&self) -> Args {
        match *self {
            Op::Unary(_, a) | Op::Reduce(_, a) | Op::Expand(a) | Op::Swap(a, ..) => Args::of(&[a]),
            Op::Binary(_, a, b) => Args::of(&[a, b]),
            Op::Select(c, a, b) => Args::of(&[c, a, b]),
            _ => Args::of(&[]),
        }
    }
}

/// An op's arguments, in order: three at most, held inline, since the interpreters and
/// planners walk them for every node of a program at every run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Args {
    ids: [NodeId; 3],
    len: u8,
}

impl Args {
    /// `ids`, three at most (no op has more).
    pub fn of(ids: &[NodeId]) -> Args {
        assert!(ids.len() <= 3, "an op has three arguments at most");
        let mut a = Args { ids: [0; 3], len: ids.len() as u8 };
        a.ids[..ids.len()].copy_from_slice(ids);
        a
    }
}

impl std::ops::Deref for Args {
    type Target = [NodeId];
    fn deref(&self) -> &[NodeId] {
        &self.ids[..self.len as usize]
    }
}

impl IntoIterator for Args {
    type Item = NodeId;
    type IntoIter = std::iter::Take<std::array::IntoIter<NodeId, 3>>;
    fn into_iter(self) -> Self::IntoIter {
        self.ids.into_iter().take(self.len as usize)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub shape: Shape,
    pub ty: Type,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// A layer's output.
    Y,
    /// An optimizer's updated parameter.
    P,
    Param(u32),
    Buffer(u32),
    State(u32),
    GradInput,
    GradParam(u32),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub target: Target,
    pub node: NodeId,
}

#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Program {
    pub nodes: Vec<Node>,
    pub outputs: Vec<Output>,
}

impl Program {
    pub fn output(&self, target: Target) -> Option<NodeId> {
        self.outputs.iter().find(|o| o.target == target).map(|o| o.node)
    }
}

/// Floats in the text form: shortest spelling that reads back to the same value.
pub fn fmt_f64(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        if v == 0.0 && v.is_sign_negative() { "-0".into() } else { format!("{}", v as i64) }
    } else {
        let plain = format!("{v}");
        let exp = format!("{v:e}");
        if exp.len() < plain.len() { exp } else { plain }
    }
}
