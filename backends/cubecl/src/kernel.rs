//! The one kernel every elementwise update rule becomes: a `#[comptime]` op list interpreted
//! at expansion time, so each program expands to its own straight-line kernel (CubeCL caches
//! it by the program). Values live in a register sequence; hyper-parameters and the step
//! count are read from a small runtime buffer, so changing them never recompiles.

use cubecl::prelude::*;

/// Elementwise unary operations (booleans are 0.0 / 1.0).
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum UOp {
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
}

#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum BOp {
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

/// One instruction; operands are indices of earlier instructions (each pushes one value).
#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub enum KOp {
    LoadP,
    LoadG,
    LoadState(usize),
    /// `scalars[i]`: a hyper-parameter, or the step count after them.
    Scalar(usize),
    /// An f32 literal, as bits so the program is `Hash + Eq`.
    Const(u32),
    Unary(UOp, usize),
    Binary(BOp, usize, usize),
    Select(usize, usize, usize),
    StoreP(usize),
    StoreState(usize, usize),
}

#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub struct KProgram {
    pub ops: Vec<KOp>,
}

/// Update element `ABSOLUTE_POS` of the flat parameter buffer `p` (all tensors of one launch
/// back to back) and of each state (`s` holds state k at `k * len(p) + i`).
#[cube(launch_unchecked, create_dummy_kernel)]
pub fn step_kernel(p: &mut [f32], g: &[f32], s: &mut [f32], scalars: &[f32], #[comptime] prog: KProgram) {
    let i = ABSOLUTE_POS;
    let n = p.len();
    if i < n {
        let mut r = Sequence::<f32>::new();
        #[unroll]
        for k in 0..prog.ops.len() {
            let op = comptime! { prog.ops[k].clone() };
            match op {
                KOp::LoadP => r.push(p[i]),
                KOp::LoadG => r.push(g[i]),
                KOp::LoadState(j) => r.push(s[j * n + i]),
                KOp::Scalar(j) => r.push(scalars[j]),
                KOp::Const(bits) => r.push(f32::from_bits(bits)),
                KOp::Unary(u, a) => {
                    let x = r[a];
                    let v = match u {
                        UOp::Neg => -x,
                        UOp::Not => 1.0 - x,
                        UOp::Sqrt => f32::sqrt(x),
                        UOp::Rsqrt => 1.0 / f32::sqrt(x),
                        UOp::Exp => f32::exp(x),
                        UOp::Log => f32::ln(x),
                        UOp::Tanh => f32::tanh(x),
                        UOp::Sigmoid => 1.0 / (1.0 + f32::exp(-x)),
                        UOp::Sign => select(x > 0.0, 1.0, select(x < 0.0, -1.0, x)),
                        UOp::Abs => f32::abs(x),
                        UOp::Relu => f32::max(x, 0.0),
                        UOp::Softplus => f32::max(x, 0.0) + f32::ln(1.0 + f32::exp(-f32::abs(x))),
                        UOp::Recip => 1.0 / x,
                    };
                    r.push(v);
                }
                KOp::Binary(b, a, c) => {
                    let x = r[a];
                    let y = r[c];
                    let v = match b {
                        BOp::Add => x + y,
                        BOp::Sub => x - y,
                        BOp::Mul => x * y,
                        BOp::Div => x / y,
                        BOp::Pow => f32::powf(x, y),
                        BOp::Min => f32::min(x, y),
                        BOp::Max => f32::max(x, y),
                        BOp::Lt => select(x < y, 1.0, 0.0),
                        BOp::Le => select(x <= y, 1.0, 0.0),
                        BOp::Gt => select(x > y, 1.0, 0.0),
                        BOp::Ge => select(x >= y, 1.0, 0.0),
                        BOp::Eq => select(x == y, 1.0, 0.0),
                        BOp::Ne => select(x != y, 1.0, 0.0),
                        BOp::And => x * y,
                        BOp::Or => f32::max(x, y),
                    };
                    r.push(v);
                }
                KOp::Select(c, a, b) => {
                    let v = select(r[c] != 0.0, r[a], r[b]);
                    r.push(v);
                }
                KOp::StoreP(a) => {
                    p[i] = r[a];
                    r.push(r[a]);
                }
                KOp::StoreState(j, a) => {
                    s[j * n + i] = r[a];
                    r.push(r[a]);
                }
            }
        }
    }
}
