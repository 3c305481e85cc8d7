//! The kernels every update rule becomes: a `#[comptime]` op list interpreted at expansion
//! time, so each program expands to its own straight-line kernel (CubeCL caches it by the
//! program). Values live in a register sequence; hyper-parameters and the step count are read
//! from a small runtime buffer, so changing them never recompiles.
//!
//! Tensors are laid out back to back, each padded to whole cubes, so a cube belongs to one
//! tensor: `blocks` gives each cube its tensor's index, first element and length. A per-tensor
//! reduction is a phase of its own: every cube reduces its elements in shared memory and
//! writes a partial (`Accum`), `combine_kernel` folds each tensor's partials, and the next
//! phase reads the result (`LoadR`).

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
    Identity,
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

/// How a reduction folds two values.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ROp {
    Sum,
    Max,
    Min,
}

/// Arithmetic on registers, the part both kernels' instruction sets share.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Pure {
    /// `scalars[i]`: a hyper-parameter, the step count, a shape query.
    Scalar(usize),
    /// An f32 literal, as bits so the program is `Hash + Eq`.
    Const(u32),
    Unary(UOp, usize),
    Binary(BOp, usize, usize),
    Select(usize, usize, usize),
}

impl Pure {
    /// The same operation on operands renamed by `f`.
    pub fn map(self, mut f: impl FnMut(usize) -> usize) -> Pure {
        match self {
            Pure::Unary(u, a) => Pure::Unary(u, f(a)),
            Pure::Binary(b, x, y) => Pure::Binary(b, f(x), f(y)),
            Pure::Select(c, x, y) => Pure::Select(f(c), f(x), f(y)),
            leaf => leaf,
        }
    }
}

/// The value of `op` over the registers `r`.
#[cube]
fn pure(#[comptime] op: Pure, r: &Sequence<f32>, scalars: &[f32]) -> f32 {
    match op {
        Pure::Scalar(i) => scalars[i],
        Pure::Const(bits) => f32::from_bits(bits),
        Pure::Unary(u, a) => unary(u, r[a]),
        Pure::Binary(b, x, y) => binary(b, r[x], r[y]),
        Pure::Select(c, x, y) => select(r[c] != 0.0, r[x], r[y]),
    }
}

/// One instruction; operands are indices of earlier instructions (each pushes one value).
#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub enum KOp {
    LoadP,
    LoadG,
    LoadState(usize),
    Pure(Pure),
    /// The number of elements of this cube's tensor.
    TensorLen,
    /// Result `j` of an earlier phase's reductions, for this cube's tensor.
    LoadR(usize),
    /// Contribute a value to this phase's `k`-th reduction (padding contributes nothing).
    Accum(usize, usize),
    StoreP(usize),
    StoreState(usize, usize),
}

#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub struct KProgram {
    pub ops: Vec<KOp>,
    /// This phase's reductions: how each folds, and the result slot it fills.
    pub accums: Vec<(ROp, usize)>,
    /// Result slots of the whole rule (the row length of `partial` and `red`).
    pub slots: usize,
    /// Blocks of the padded layout each cube updates, one after another: 1 where the phase
    /// reduces (a partial per block), else [`BLOCKS_PER_CUBE`], so each unit has that many
    /// elements' loads in flight at once.
    pub blocks_per_cube: usize,
    /// Neighbouring elements each unit reads and writes as one vector (dividing
    /// `blocks_per_cube`): [`LANES`] where the phase reduces nothing, else 1; the launch's
    /// vector width.
    pub lanes: usize,
}

/// Blocks per cube of a step phase that reduces nothing.
pub const BLOCKS_PER_CUBE: usize = 4;

/// Elements per vector access of a step phase that reduces nothing: 16 bytes of f32.
pub const LANES: usize = 4;

/// How a step phase that reduces nothing walks the padded layout: blocks per cube and
/// elements per access. Tuning, never meaning; the GPU check compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    pub blocks_per_cube: usize,
    pub lanes: usize,
}

impl StepLayout {
    pub const DEFAULT: StepLayout = StepLayout { blocks_per_cube: BLOCKS_PER_CUBE, lanes: LANES };
    /// The default, the same with one element per access, and one block per cube.
    pub const COMPARED: [StepLayout; 3] =
        [StepLayout::DEFAULT, StepLayout { blocks_per_cube: BLOCKS_PER_CUBE, lanes: 1 }, StepLayout { blocks_per_cube: 1, lanes: 1 }];

    /// This layout, if the padded layout and the kernel allow it: blocks dividing
    /// [`BLOCKS_PER_CUBE`], lanes 1, 2 or 4 dividing the blocks.
    pub fn checked(self) -> Result<Self, String> {
        let StepLayout { blocks_per_cube: b, lanes: l } = self;
        match b > 0 && BLOCKS_PER_CUBE.is_multiple_of(b) && matches!(l, 1 | 2 | 4) && b.is_multiple_of(l) {
            true => Ok(self),
            false => Err(format!("{b} blocks per cube of {l} lanes: blocks must divide {BLOCKS_PER_CUBE}, lanes (1, 2 or 4) the blocks")),
        }
    }

    /// `blocks`x`lanes`, as the GPU check's lines name it.
    pub fn name(self) -> String {
        format!("{}x{}", self.blocks_per_cube, self.lanes)
    }
}

impl KProgram {
    /// A program with no reductions, a block per cube (the unfused baseline's kernels).
    pub fn elementwise(ops: Vec<KOp>) -> Self {
        KProgram { ops, accums: Vec::new(), slots: 0, blocks_per_cube: 1, lanes: 1 }
    }

    /// The same phase walking the layout as `layout` says, if it reduces nothing (one that
    /// reduces keeps a block per cube, an element per unit).
    pub fn laid_out(mut self, layout: StepLayout) -> Self {
        if self.accums.is_empty() {
            (self.blocks_per_cube, self.lanes) = (layout.blocks_per_cube, layout.lanes);
        }
        self
    }

    /// Cubes to launch over `blocks` blocks of the padded layout.
    pub fn cubes(&self, blocks: usize) -> usize {
        blocks.div_ceil(self.blocks_per_cube.max(1))
    }

    /// Where load `k` of `ops` keeps its value among one element's loads.
    pub fn load_slot(&self, k: usize) -> usize {
        self.ops[..k].iter().filter(|op| op.is_load()).count()
    }

    pub fn loads(&self) -> usize {
        self.load_slot(self.ops.len())
    }

    /// Where store `k` of `ops` keeps its value until the vector is written.
    pub fn store_slot(&self, k: usize) -> usize {
        self.ops[..k].iter().filter(|op| matches!(op, KOp::StoreP(_) | KOp::StoreState(..))).count()
    }

    pub fn stores(&self) -> usize {
        self.store_slot(self.ops.len())
    }
}

impl KOp {
    /// Whether it reads an element of `p`, `g` or a state (what a unit loads before it computes).
    pub fn is_load(&self) -> bool {
        matches!(self, KOp::LoadP | KOp::LoadG | KOp::LoadState(_))
    }
}

#[cube]
fn fold(#[comptime] op: ROp, a: f32, b: f32) -> f32 {
    match op {
        ROp::Sum => a + b,
        ROp::Max => f32::max(a, b),
        ROp::Min => f32::min(a, b),
    }
}

#[cube]
fn identity(#[comptime] op: ROp) -> f32 {
    match op {
        ROp::Sum => 0.0,
        ROp::Max => f32::new(-3.4028235e38),
        ROp::Min => f32::new(3.4028235e38),
    }
}

/// Threads per cube, and so the padding unit of every tensor.
pub const BLOCK: usize = 256;

/// A warp: the units that exchange values by shuffles (`LProgram::planes`), 32 on every
/// NVIDIA GPU.
pub const WARP: usize = 32;

/// The most units a cube may have (CUDA's and Vulkan's usual limit).
pub const MAX_UNITS: usize = 1024;

/// f32 values a layer kernel reading vectors reads in one access of its parameters along the
/// row (`LProgram::vector_params`): 16 bytes, a GPU's widest load. The work arena starts every
/// tensor at a multiple of it (`plan::layout`).
pub const PARAM_LANES: usize = 4;

/// Units per cube of `combine_kernel` (one per tensor).
pub const COMBINE_BLOCK: u32 = 64;

/// The padded layout of tensors of `sizes` elements, back to back, each padded to whole blocks
/// of `BLOCK`: per block its tensor, first element and length (`blocks`), per tensor its first
/// block and block count (`ranges`), and the block count — a multiple of [`BLOCKS_PER_CUBE`],
/// the last tensor padded with whole blocks to it, so a step kernel's cube never meets a block
/// past the end (and needs no branch around its loads). Neither table is empty (not every
/// runtime allows an empty binding).
pub fn padded_layout(sizes: &[usize]) -> (Vec<u32>, Vec<u32>, usize) {
    let cubes: usize = sizes.iter().map(|n| n.div_ceil(BLOCK)).sum::<usize>().next_multiple_of(BLOCKS_PER_CUBE);
    let (mut blocks, mut ranges) = (Vec::with_capacity(3 * cubes + 3), Vec::with_capacity(2 * sizes.len() + 2));
    let mut first = 0usize;
    for (t, &n) in sizes.iter().enumerate() {
        let count = n.div_ceil(BLOCK);
        for _ in 0..count {
            blocks.extend([t as u32, (first * BLOCK) as u32, n as u32]);
        }
        ranges.extend([first as u32, count as u32]);
        first += count;
    }
    // Padding blocks: more of the last tensor's padding (its elements past its length).
    while first < cubes {
        let last = blocks[blocks.len() - 3..].to_vec();
        blocks.extend(last);
        first += 1;
    }
    blocks.extend([0, 0, 0]);
    ranges.extend([0, 0]);
    ranges.truncate(2 * sizes.len().max(1));
    (blocks, ranges, cubes)
}

/// Where a step's tensors are and how big: what every runtime launching the step kernels needs.
#[derive(Clone, Copy, Debug)]
pub struct StepSizes {
    /// Elements in the padded layout.
    pub n: usize,
    /// State slots (`s` holds slot k at `k * n`).
    pub slots: usize,
    pub scalars: usize,
    /// Blocks of the padded layout (a cube each only in a phase that reduces).
    pub cubes: usize,
    pub tensors: usize,
    /// Result slots per tensor (the row length of `partial` and `red`).
    pub results: usize,
}

impl StepSizes {
    /// The lengths of `step_kernel`'s buffers, in parameter order, for a phase reading `lanes`
    /// elements per access (the parameter, gradient and state buffers count vectors).
    pub fn step(&self, lanes: usize) -> [usize; 7] {
        let r = self.results.max(1);
        let v = self.n / lanes;
        [v, v, self.slots * v, self.scalars, 3 * self.cubes + 3, self.cubes.max(1) * r, self.tensors.max(1) * r]
    }

    /// The lengths of `combine_kernel`'s buffers, in parameter order.
    pub fn combine(&self) -> [usize; 3] {
        let r = self.results.max(1);
        [self.cubes.max(1) * r, 2 * self.tensors, self.tensors * r]
    }
}

/// Update the cube's `blocks_per_cube` blocks (`BLOCK` elements each) of the flat parameter
/// buffer `p` (all tensors of one launch back to back, each padded to whole blocks; it and the
/// gradient `g` stored as `P`) and of each state (`s` holds state k at `k * len(p) + i`, stored
/// as `S`); everything computed in f32, as torch's fused optimizers do for bf16 and f16
/// parameters, and rounded where it is stored (`round_p`, `round_s`: bf16 held in f32 words,
/// `dtype::Held`). Each unit reads and writes `N` neighbouring elements at once (`prog.lanes`:
/// one 16-byte access per f32 stream rather than four, as torch's own elementwise kernels do),
/// so the buffers' lengths are in vectors of `N`. Launched with `prog.cubes(blocks)` cubes of
/// `BLOCK` units over a `padded_layout`, so every index is in bounds and no cube diverges
/// around a barrier (a phase that reduces takes one block per cube, one element per unit).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::too_many_arguments)]
pub fn step_kernel<P: Float, S: Float, N: Size>(
    p: &mut [Vector<P, N>],
    g: &[Vector<P, N>],
    s: &mut [Vector<S, N>],
    scalars: &[f32],
    blocks: &[u32],
    partial: &mut [f32],
    red: &[f32],
    #[comptime] prog: KProgram,
    #[comptime] round_p: bool,
    #[comptime] round_s: bool,
) {
    let n = p.len();
    let u = UNIT_POS as usize;
    let lanes = comptime! { prog.lanes };
    // Vectors per unit, a cube's width apart.
    let per = comptime! { prog.blocks_per_cube.max(1) / lanes };
    let nl = comptime! { prog.loads() };
    let ns = comptime! { prog.stores() };
    let n_acc = comptime! { prog.accums.len() };
    let slots = comptime! { prog.slots };
    let mut sh = Shared::<[f32]>::new_slice(comptime! { n_acc.max(1) * BLOCK });
    // Every vector's loads first, then its work, under no branch (the layout has whole cubes
    // of blocks): a unit's loads are in flight together.
    let mut ld = Array::<f32>::new(comptime! { (per * nl * lanes).max(1) });
    #[unroll]
    for m in 0..per {
        let i = (CUBE_POS * per + m) * BLOCK + u;
        #[unroll]
        for k in 0..prog.ops.len() {
            let op = comptime! { prog.ops[k].clone() };
            let at = comptime! { (m * nl + prog.load_slot(k)) * lanes };
            match op {
                KOp::LoadP => unpack(p[i], &mut ld, at, lanes),
                KOp::LoadG => unpack(g[i], &mut ld, at, lanes),
                KOp::LoadState(j) => unpack(s[j * n + i], &mut ld, at, lanes),
                _ => {}
            }
        }
    }
    let mut st = Array::<f32>::new(comptime! { (ns * lanes).max(1) });
    #[unroll]
    for m in 0..per {
        let i = (CUBE_POS * per + m) * BLOCK + u;
        // Every lane of a vector is in the same block (lanes divide `BLOCK`).
        let b = (i * lanes) / BLOCK;
        #[unroll]
        for l in 0..lanes {
            let mut r = Sequence::<f32>::new();
            #[unroll]
            for k in 0..prog.ops.len() {
                let op = comptime! { prog.ops[k].clone() };
                let at = comptime! { (m * nl + prog.load_slot(k)) * lanes + l };
                let out = comptime! { prog.store_slot(k) * lanes + l };
                match op {
                    KOp::LoadP => r.push(ld[at]),
                    KOp::LoadG => r.push(ld[at]),
                    KOp::LoadState(_) => r.push(ld[at]),
                    KOp::Pure(op) => {
                        let v = pure(op, &r, scalars);
                        r.push(v);
                    }
                    KOp::TensorLen => r.push(f32::cast_from(blocks[3 * b + 2])),
                    KOp::LoadR(j) => r.push(red[blocks[3 * b] as usize * slots + j]),
                    KOp::Accum(k, a) => {
                        let (op, _) = comptime! { prog.accums[k] };
                        let valid = i * lanes + l - (blocks[3 * b + 1] as usize) < blocks[3 * b + 2] as usize;
                        let v = select(valid, r[a], identity(op));
                        if comptime! { l == 0 } {
                            sh[k * BLOCK + u] = v;
                        } else {
                            sh[k * BLOCK + u] = fold(op, sh[k * BLOCK + u], v);
                        }
                        r.push(r[a]);
                    }
                    KOp::StoreP(a) => {
                        st[out] = stored(r[a], round_p);
                        r.push(r[a]);
                    }
                    KOp::StoreState(_, a) => {
                        st[out] = stored(r[a], round_s);
                        r.push(r[a]);
                    }
                }
            }
        }
        #[unroll]
        for k in 0..prog.ops.len() {
            let op = comptime! { prog.ops[k].clone() };
            let at = comptime! { prog.store_slot(k) * lanes };
            match op {
                KOp::StoreP(_) => p[i] = pack::<P, N>(&st, at, lanes),
                KOp::StoreState(j, _) => s[j * n + i] = pack::<S, N>(&st, at, lanes),
                _ => {}
            }
        }
    }
    let b = CUBE_POS;
    if comptime! { n_acc > 0 } {
        sync_cube();
        // Tree reduction of every accumulator at once; the counter starts from `CUBE_DIM`, not
        // a comptime value (which failed kernel verification in CubeCL 0.11).
        let mut stride = CUBE_DIM / 2;
        while stride > 0 {
            if UNIT_POS < stride {
                #[unroll]
                for k in 0..n_acc {
                    let (op, _) = comptime! { prog.accums[k] };
                    let here = k * BLOCK + u;
                    sh[here] = fold(op, sh[here], sh[here + stride as usize]);
                }
            }
            sync_cube();
            stride /= 2;
        }
        if UNIT_POS == 0 {
            #[unroll]
            for k in 0..n_acc {
                let (_, slot) = comptime! { prog.accums[k] };
                partial[b * slots + slot] = sh[k * BLOCK];
            }
        }
    }
}

/// Fold each tensor's partials into its results: unit `t` handles tensor `t`, whose cubes are
/// `ranges[2t] .. ranges[2t] + ranges[2t + 1]`.
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::needless_range_loop)] // (a comptime list is walked by index in a cube function)
pub fn combine_kernel(partial: &[f32], ranges: &[u32], red: &mut [f32], #[comptime] accums: Vec<(ROp, usize)>, #[comptime] slots: usize) {
    let t = ABSOLUTE_POS;
    if t * 2 < ranges.len() {
        let first = ranges[2 * t] as usize;
        let count = ranges[2 * t + 1] as usize;
        #[unroll]
        for k in 0..accums.len() {
            let (op, slot) = comptime! { accums[k] };
            let mut acc = identity(op);
            for c in first..first + count {
                acc = fold(op, acc, partial[c * slots + slot]);
            }
            red[t * slots + slot] = acc;
        }
    }
}

#[cube]
fn unary(#[comptime] op: UOp, x: f32) -> f32 {
    match op {
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
        UOp::Identity => x,
    }
}

#[cube]
fn binary(#[comptime] op: BOp, x: f32, y: f32) -> f32 {
    match op {
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
    }
}

/// Where a layer kernel finds a tensor. The input and the output gradient (a rule's parameter
/// and gradient) are buffers of their own, the caller's memory read in place; what the kernels
/// write lives in the `io` arena (outputs in the storage type) or the f32 `work` arena.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Buf {
    Input,
    GradOutput,
    Io,
    Work,
}

/// What a shape is along one axis (`ir::Extent` without its group count), fixed when the plan
/// is made: the kernel skips the index arithmetic it makes trivial — a broadcast axis adds
/// nothing to an offset, a full one needs no division — leaving integer divisions, the costly
/// part of addressing on a GPU, to grouped axes and the reduced extent.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AxisKind {
    One,
    Grouped,
    Full,
}

/// One instruction of a layer kernel; operands are indices of earlier instructions.
#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub enum LOp {
    /// Tensor `t` (its offset is in the tensor table) of shape `s`, read where the current
    /// element of the domain falls in it (broadcast along its single or grouped axes), from
    /// the buffer it lives in.
    Load(usize, usize, Buf),
    /// The `i`-th reduction of an earlier phase of this kernel, for this target element.
    Result(usize),
    Pure(Pure),
}

/// One pass of a layer kernel over the part of its `domain` shape that falls in the kernel's
/// target element: reductions, each folding a register into a tensor (of the target's shape,
/// or as `reach` says), and stores of registers into tensors of the domain's shape — several
/// of each where they do not wait for one another (`plan::merge`), so a row is walked once
/// for all of them.
#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub struct LPhase {
    pub domain: usize,
    pub ops: Vec<LOp>,
    /// `(fold, value register, out tensor)` (always in `work`: f32).
    pub reduces: Vec<(ROp, usize, usize)>,
    /// `(tensor, register, in io)`.
    pub stores: Vec<(usize, usize, bool)>,
    /// Which elements the reductions fold into one value.
    pub reach: Reach,
}

impl LPhase {
    /// Whether the phase walks a unit's positions of its domain a stride apart (a phase
    /// folding finer elements walks each one's run in turn instead).
    pub fn strided(&self) -> bool {
        !matches!(self.reach, Reach::Finer(_))
    }

    /// Per op, the scalar and its truth under which alone the phase uses the op's value, if
    /// there is one: where only a branch of a `select` on a uniform value (AdamP's `nesterov`)
    /// reads a tensor, the kernel loads it only when the scalar takes that branch — one kernel
    /// for either value, and no pass over memory for the branch not taken. (Conservative: an
    /// op needed under several conditions is needed always.)
    pub fn guards(&self) -> Vec<Option<(usize, bool)>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Need {
            Never,
            When(usize, bool),
            Always,
        }
        let join = |a: Need, b: Need| match (a, b) {
            (Need::Never, x) | (x, Need::Never) => x,
            (x, y) if x == y => x,
            _ => Need::Always,
        };
        let mut need = vec![Need::Never; self.ops.len()];
        for &v in self.reduces.iter().map(|r| &r.1).chain(self.stores.iter().map(|s| &s.1)) {
            need[v] = Need::Always;
        }
        for i in (0..self.ops.len()).rev() {
            let n = need[i];
            if n == Need::Never {
                continue;
            }
            let LOp::Pure(op) = self.ops[i] else { continue };
            if let Pure::Select(c, x, y) = op {
                if let LOp::Pure(Pure::Scalar(s)) = self.ops[c] {
                    // Under a branch already guarded, its guard stands (a superset of both).
                    let under = |b: bool| if n == Need::Always { Need::When(s, b) } else { n };
                    need[c] = join(need[c], n);
                    need[x] = join(need[x], under(true));
                    need[y] = join(need[y], under(false));
                    continue;
                }
            }
            op.map(|a| {
                need[a] = join(need[a], n);
                a
            });
        }
        need.into_iter().zip(&self.ops).map(|(n, op)| if let (Need::When(s, b), LOp::Load(..)) = (n, op) { Some((s, b)) } else { None }).collect()
    }
}

/// What one value of a reduction phase folds, relative to the kernel's target element. Column
/// sums run inside a row kernel in either of the two last forms, so that x and dy are read
/// once for both a layer norm's (or an EvoNorm's) input gradient and its parameter gradients;
/// a second kernel folds the partials they leave.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reach {
    /// The domain elements of the target element: one value per target element.
    Element,
    /// The same position across target elements: a column sum in a row kernel. Each unit keeps
    /// a partial per position of a row in registers over the cube's block of rows, stored at
    /// the end as the cube's row of `out`.
    Across,
    /// The domain elements of each element of a finer target, shape `s` (a channel of a
    /// sample inside a group of channels), folded one after another inside the kernel's
    /// target element; `out` has shape `s`.
    Finer(usize),
}

/// A layer kernel over the elements of the `target` shape, running its phases in order for
/// each: a layer norm's forward is one kernel (two row reductions, then the output row), so a
/// row is read from memory once and from cache after. With `cooperative`, one cube per target
/// element (its units stride over each phase's domain; reductions end in a tree in shared
/// memory: long reductions, few values — a row of a layer norm, a channel of a batch norm);
/// without, one unit per target element doing every phase alone (short reductions, many
/// values, and elementwise kernels). A phase reads the reductions of earlier phases from
/// registers (`LOp::Result`), not memory.
#[derive(CubeType, Clone, Debug, Hash, PartialEq, Eq)]
pub struct LProgram {
    /// Declared axes (a variadic axis counts once: its dims are contiguous, so one extent).
    pub rank: usize,
    /// Shapes in the shape table.
    pub shapes: usize,
    /// Per shape-table entry, per kernel axis (in the axis order it is read in), its kind.
    pub kinds: Vec<Vec<AxisKind>>,
    pub target: usize,
    pub phases: Vec<LPhase>,
    /// A cube per target element, or per `values_per_cube` neighbouring ones (launched with
    /// that many fewer cubes than target elements).
    pub cooperative: bool,
    /// With `cooperative`: the neighbouring target elements a cube takes (a power of two
    /// dividing `BLOCK`), so that a warp reads a row across columns, not down one column.
    pub values_per_cube: usize,
    /// Without `cooperative`, in a kernel that reduces nothing: the target elements each unit
    /// takes, a cube's `units` apart (so a warp still reads side by side). Several give each
    /// unit as many independent loads in flight — what an elementwise kernel needs to keep a
    /// GPU's memory busy, bf16 values most (`plan::launched`).
    pub values_per_unit: usize,
    /// With `across` phases: the positions of a row each unit keeps a partial for (so a row
    /// is at most `unroll * BLOCK` long); each cube takes a block of consecutive target
    /// elements, as many as the launched cube count leaves to each. With `kept` loads, the
    /// positions each unit walks in every phase keeping them (each a vector of `vector`
    /// neighbouring positions).
    pub unroll: usize,
    /// Loads `(tensor, shape, buffer)` kept in registers per position between the phases over
    /// the shape `keep` (a layer norm's x, read by its mean, variance and output phases): the
    /// first such phase reads every kept load from memory (`first_keeping`), the later ones
    /// their registers, so a row is read once. Those phases walk their `unroll` positions
    /// unrolled, the registers indexed by constants. Empty: every phase reads memory (see
    /// `plan::keeping`).
    pub kept: Vec<(usize, usize, Buf)>,
    pub keep: usize,
    /// Units per cube: `BLOCK`, or (a cooperative kernel keeping rows too long for `BLOCK`
    /// units' registers) up to `MAX_UNITS`. Part of the kernel, not only of its launch: the
    /// generated code takes it as a constant.
    pub units: usize,
    /// With `kept` loads: the neighbouring positions of a row each unit reads and writes as
    /// one access (1: one at a time), its `unroll` then counting such vectors. A bf16 row read
    /// two bytes a load needs eight times the loads in flight a 16-byte vector does to keep a
    /// GPU's memory busy. Only where `x`, `dy` and `io` are read and written by the keeping
    /// phases alone, along rows whose vectors are whole and aligned (`plan::vectorized`); an
    /// elementwise kernel reading vectors keeps its loads of them, a vector per value a unit
    /// takes (`lanes_of`).
    pub vector: usize,
    /// Reading vectors of a multiple of [`PARAM_LANES`]: the f32 loads along the row (a
    /// layer's gamma and beta) read that many values an access (`lane_params`, `fill_wide`),
    /// not a value per lane. Read per lane, a warp's 32 loads of one lane lie a vector apart
    /// (32 bytes in bf16): eight cache lines an instruction for 128 useful bytes, so the L1
    /// cache, not memory, would bound a bf16 row kernel. Only in cubes of `BLOCK` units, where
    /// every such tensor starts and strides at whole vectors (`plan::vectorized`), and never
    /// in WGSL, which cannot view a buffer as vectors of another width.
    pub vector_params: bool,
    /// A cooperative kernel's reductions fold within each warp by shuffles (no shared memory,
    /// no barrier), then across warps through shared memory: two barriers a reduction, not one
    /// per halving of the cube. CUDA only (`plan::launched`): WGSL has no portable shuffle.
    pub planes: bool,
}

impl LProgram {
    /// Whether a launch gives each target element a cube of its own (else a unit).
    pub fn cube_per_value(&self) -> bool {
        self.cooperative
    }

    pub fn reductions(&self) -> usize {
        self.phases.iter().map(|p| p.reduces.len()).sum()
    }

    /// Reductions folding across target elements (`Reach::Across`).
    pub fn across(&self) -> usize {
        across_before(&self.phases, self.phases.len())
    }

    /// The entries of the shape table the kernel may read: every shape's, then the offsets of
    /// the tensors up to the last it names (the table holds every tensor's).
    pub fn table_len(&self) -> usize {
        let named = self.phases.iter().flat_map(|p| {
            let loads = p.ops.iter().filter_map(|op| if let LOp::Load(t, ..) = op { Some(*t) } else { None });
            loads.chain(p.stores.iter().map(|s| s.0)).chain(p.reduces.iter().map(|r| r.2))
        });
        3 * self.rank * self.shapes + named.max().map_or(0, |t| t + 1)
    }

    /// Whether the kernel reads its shape table once, into registers (`kernel::table`): one
    /// walking rows unrolled (`unroll`) without column partials. Elsewhere each target element
    /// and each element read the entries they need: a kernel folding column partials would
    /// hold every position's addresses at once (ptxas: about 210 registers, not 105, so one
    /// cube per multiprocessor, not two), and in one walking its elements in a loop the
    /// entries held throughout made ptxas spill (a layer norm's column fold at rows of 16384).
    pub fn holds_table(&self) -> bool {
        self.unroll > 0 && self.across() == 0
    }

    /// Whether phase `ph` walks its positions unrolled, keeping the `kept` loads in registers.
    pub fn keeps(&self, ph: usize) -> bool {
        let p = &self.phases[ph];
        !self.kept.is_empty() && p.domain == self.keep && p.strided()
    }

    /// Where phase `ph` finds `load` in the registers of one position: its index among `kept`,
    /// and whether this phase is the first keeping one (so reads memory and fills the register).
    pub fn kept_slot(&self, ph: usize, load: (usize, usize, Buf)) -> Option<(usize, bool)> {
        let c = self.kept.iter().position(|&h| h == load).filter(|_| self.keeps(ph))?;
        Some((c, self.first_keeping() == Some(ph)))
    }

    /// The first phase keeping loads in registers: it fills every kept load's, also those
    /// only later phases read, so that a row's loads are all made in one walk (a layer norm's
    /// backward reads dy first in its second phase: there ptxas, short of registers beside the
    /// column partials, issued each position's load only once the last had arrived).
    pub fn first_keeping(&self) -> Option<usize> {
        (0..self.phases.len()).find(|&q| self.keeps(q))
    }

    /// The kept loads (index among `kept`, load) phase `ph` fills without reading them itself.
    pub fn prefetches(&self, ph: usize) -> Vec<(usize, (usize, usize, Buf))> {
        if self.first_keeping() != Some(ph) {
            return Vec::new();
        }
        self.kept.iter().copied().enumerate().filter(|&(_, (t, s, buf))| !self.phases[ph].ops.contains(&LOp::Load(t, s, buf))).collect()
    }

    /// The same kernel reading a value at a time (a vectorized one's rows misaligned in
    /// memory: a view's tensor starting mid-vector).
    pub fn unvectorized(&self) -> LProgram {
        LProgram { vector: 1, unroll: self.unroll * self.vector.max(1), vector_params: false, ..self.clone() }
    }

    /// Whether phase `ph` runs each vector's lanes one after another (`walk` keeping rows,
    /// `lanes_of` in an elementwise kernel).
    pub fn in_lanes(&self, ph: usize) -> bool {
        self.vector > 1 && (self.keeps(ph) || (!self.cooperative && self.values_per_unit > 1))
    }

    /// The f32 loads phase `ph` reads [`PARAM_LANES`] values an access for its lanes
    /// (`vector_params`): along the row, not kept (`fill` reads those), and under no uniform
    /// branch (whose skipped loads `LPhase::guards` keeps off memory).
    pub fn lane_params(&self, ph: usize) -> Vec<(usize, usize, Buf)> {
        let mut out = Vec::new();
        if !(self.vector_params && self.in_lanes(ph)) {
            return out;
        }
        let p = &self.phases[ph];
        let guards = p.guards();
        for op in &p.ops {
            let &LOp::Load(t, s, Buf::Work) = op else { continue };
            let guarded = p.ops.iter().zip(&guards).any(|(o, g)| o == op && g.is_some());
            let along = self.kinds[s].last() == Some(&AxisKind::Full);
            if along && !guarded && !self.kept.contains(&(t, s, Buf::Work)) && !out.contains(&(t, s, Buf::Work)) {
                out.push((t, s, Buf::Work));
            }
        }
        out
    }

    /// Whether kept load `load` is read [`PARAM_LANES`] values an access (`fill`): an f32 one
    /// along the row, with `vector_params`.
    pub fn kept_wide(&self, (_, s, buf): (usize, usize, Buf)) -> bool {
        self.vector_params && buf == Buf::Work && self.kinds[s].last() == Some(&AxisKind::Full)
    }

    /// Every load read [`PARAM_LANES`] values an access, once for each phase reading it so:
    /// the kept ones (`kept_wide`), then each phase's `lane_params`.
    pub fn wide_loads(&self) -> Vec<(usize, usize, Buf)> {
        let kept = self.kept.iter().copied().filter(|&l| self.kept_wide(l));
        kept.chain((0..self.phases.len()).flat_map(|ph| self.lane_params(ph))).collect()
    }

    /// The neighbouring positions phase `ph` reads as one (`vector` where it keeps loads).
    pub fn lanes(&self, ph: usize) -> usize {
        if self.keeps(ph) {
            self.vector.max(1)
        } else {
            1
        }
    }

    /// Where a vector's values for `io` wait in the register array of kept loads, past them:
    /// a kernel reading vectors writes each store's lanes as one.
    pub fn staged(&self) -> usize {
        self.kept.len() * self.unroll.max(1) * self.vector.max(1)
    }

    /// Where a vector's `lane_params` wait in the register array, past its staged stores.
    pub fn params_at(&self) -> usize {
        let lanes = self.vector.max(1);
        let stores = if lanes > 1 { self.phases.iter().map(|p| p.stores.iter().filter(|s| s.2).count()).max().unwrap_or(0) } else { 0 };
        self.staged() + stores * lanes
    }

    /// The register array a unit keeps its loads in (and, reading vectors, its stores' lanes
    /// and the parameters along the row of the vector at hand).
    pub fn cache_len(&self) -> usize {
        let params = (0..self.phases.len()).map(|ph| self.lane_params(ph).len()).max().unwrap_or(0);
        self.params_at() + params * self.vector.max(1)
    }
}

/// The reductions of `phases[..ph]` folding across target elements: where phase `ph`'s
/// partials start, per position.
pub fn across_before(phases: &[LPhase], ph: usize) -> usize {
    phases[..ph].iter().filter(|p| p.reach == Reach::Across).map(|p| p.reduces.len()).sum()
}

/// `x` and `dy` are the input and the output gradient (a rule's parameter and gradient) in the
/// storage type `F`, read in place; `io` holds the outputs in `F`; `work` holds parameters,
/// buffers and reductions in f32; all arithmetic is f32. `meta` holds, per shape
/// `k` (at `3 * rank * k`): per axis its extent in that shape (`outer`: 1, the group count, or
/// the axis length), the axis elements per value (`inner`), and the row-major stride; then
/// each tensor's offset in its buffer (0 for `x` and `dy`).
#[cube(launch_unchecked, create_dummy_kernel)]
#[allow(clippy::manual_div_ceil)] // (`div_ceil` is not a cube function)
pub fn layer_kernel<F: Float, N: Size>(
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    meta: &[u32],
    scalars: &[f32],
    #[comptime] prog: LProgram,
    #[comptime] round_bf16: bool,
) {
    let rank = comptime! { prog.rank };
    let tbase = comptime! { 3 * prog.rank * prog.shapes };
    let tgt = comptime! { 3 * prog.rank * prog.target };
    let tgt_shape = comptime! { prog.target };
    let coop = comptime! { prog.cooperative };
    let per_cube = comptime! { prog.values_per_cube };
    let across = comptime! { prog.across() };
    let unroll = comptime! { prog.unroll.max(1) };
    // Registers per kept load or partial: a unit's positions (vectors), times their lanes.
    let lanes = comptime! { prog.vector.max(1) };
    let slots = comptime! { unroll * lanes };
    let tab = table(meta, comptime! { prog.table_len() });
    let mut count = 1usize;
    #[unroll]
    for a in 0..rank {
        count *= tab[tgt + a] as usize;
    }
    // The target element: this unit's, or (cooperative) one of this cube's `per_cube`
    // neighbours, which the cube's units share out in lanes: unit `u` serves value `u %
    // per_cube` in lane `u / per_cube`, so the units of a warp read side by side. With
    // `across` phases, a cube takes a block of `rows` consecutive target elements in turn.
    let mut o0 = ABSOLUTE_POS;
    let mut first = 0usize;
    let mut step = 1usize;
    if comptime! { coop } {
        o0 = CUBE_POS * per_cube + UNIT_POS as usize % per_cube;
        first = UNIT_POS as usize / per_cube;
        step = CUBE_DIM as usize / per_cube;
    }
    // The target elements a unit takes in turn, `apart` from one another.
    let mut rows = 1usize;
    let mut apart = 1usize;
    if comptime! { across > 0 } {
        rows = (count + CUBE_COUNT - 1) / CUBE_COUNT;
        o0 = CUBE_POS * rows;
    }
    let per_unit = comptime! { prog.values_per_unit.max(1) };
    if comptime! { per_unit > 1 } {
        rows = per_unit;
        apart = CUBE_DIM as usize;
        o0 = CUBE_POS * CUBE_DIM as usize * per_unit + UNIT_POS as usize;
    }
    if comptime! { per_unit > 1 && prog.vector > 1 } {
        // Reading vectors, a unit takes its `per_unit` of them at once (`lanes_of`).
        rows = 1usize;
    }
    // Per `across` reduction, this unit's partial for positions `first + m * step` of a row.
    let mut part = Array::<f32>::new(comptime! { (across * slots).max(1) });
    // Per kept load, its value at those positions of the current row.
    let mut cache = Array::<f32>::new(comptime! { prog.cache_len().max(1) });
    #[unroll]
    for ph in 0..prog.phases.len() {
        if comptime! { prog.phases[ph].reach == Reach::Across } {
            let ka = comptime! { across_before(&prog.phases, ph) };
            #[unroll]
            for m in 0..slots {
                identities(&mut part, comptime! { prog.phases[ph].reduces.clone() }, comptime! { ka * slots + m }, slots);
            }
        }
    }
    let mut sh = Shared::<[f32]>::new_slice(comptime! { prog.units });
    let mut row = 0usize;
    while row < rows {
        // (A kernel not holding the table reads it again for each target element.)
        let own = table(meta, comptime! { if prog.holds_table() { 0 } else { prog.table_len() } });
        let tab = if comptime! { prog.holds_table() } { &tab } else { &own };
        let mut o = o0 + row * apart;
        let active = o < count;
        if comptime! { per_unit > 1 } {
            // A unit past the end addresses the first element, and stores nothing: its loads
            // need no branch, so the compiler may issue all of them before the first store.
            o = select(active, o, 0usize);
        }
        let oi = target_index(o, tab, prog.clone());
        // The reductions of earlier phases, for this target element.
        let mut res = Sequence::<f32>::new();
        #[unroll]
        for ph in 0..prog.phases.len() {
            let dom = comptime! { prog.phases[ph].domain };
            let mut loops = 0usize;
            if active {
                loops = domain_len(tab, prog.clone(), dom, tgt_shape);
            }
            let reach = comptime! { prog.phases[ph].reach };
            let nr = comptime! { prog.phases[ph].reduces.len() };
            if comptime! { reach == Reach::Across } {
                let ka = comptime! { across_before(&prog.phases, ph) };
                walk::<F, N>(first, step, loops, &oi, &res, &mut part, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, comptime! { Some(ka) }, round_bf16);
            } else if comptime! { matches!(reach, Reach::Finer(_)) } {
                // The finer elements inside this one, each a run of `len` consecutive domain
                // elements (its own axes are the inner ones: see `plan`), one after another.
                let fs = comptime! { if let Reach::Finer(f) = reach { f } else { unreachable!() } };
                let len = domain_len(tab, prog.clone(), dom, fs);
                let mut subs = 0usize;
                if active {
                    subs = loops / len;
                }
                let mut sub = 0usize;
                while sub < subs {
                    let start = sub * len;
                    let mut acc = Array::<f32>::new(comptime! { nr.max(1) });
                    identities(&mut acc, comptime! { prog.phases[ph].reduces.clone() }, 0usize, 1usize);
                    let mut j = start + first;
                    while j < start + len {
                        element::<F, N>(j, &oi, &res, &mut acc, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, 0usize, 1usize, comptime! { None::<usize> }, comptime! { None::<usize> }, true, round_bf16);
                        j += step;
                    }
                    // The finer element's place: where its first domain element falls.
                    let idx = domain_index(start, &oi, tab, prog.clone(), ph);
                    let fb = comptime! { 3 * prog.rank * fs };
                    let mut at = 0usize;
                    #[unroll]
                    for q in 0..rank {
                        let a = comptime! { rank - 1 - q };
                        at += offset_along(idx[q], tab, comptime! { fb + rank + a }, comptime! { fb + 2 * rank + a }, comptime! { prog.kinds[fs][a] });
                    }
                    #[unroll]
                    for k in 0..nr {
                        let (op, _, t) = comptime! { prog.phases[ph].reduces[k] };
                        let v = tree(&mut sh, acc[k], op, 1usize, comptime! { prog.planes });
                        if UNIT_POS == 0 {
                            work[meta[tbase + t] as usize + at] = v;
                        }
                    }
                    sub += 1;
                }
            } else if comptime! { per_unit > 1 && prog.vector > 1 } {
                lanes_of::<F, N>(o0, count, &res, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, round_bf16);
            } else if comptime! { per_unit > 1 } {
                // An elementwise kernel's phase (`plan::launched`): the target element itself.
                let mut none = Array::<f32>::new(1usize);
                element::<F, N>(0usize, &oi, &res, &mut none, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, 0usize, 1usize, comptime! { None::<usize> }, comptime! { None::<usize> }, active, round_bf16);
            } else {
                let mut acc = Array::<f32>::new(comptime! { nr.max(1) });
                identities(&mut acc, comptime! { prog.phases[ph].reduces.clone() }, 0usize, 1usize);
                if comptime! { prog.keeps(ph) } {
                    walk::<F, N>(first, step, loops, &oi, &res, &mut acc, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, comptime! { None::<usize> }, round_bf16);
                } else {
                    let mut j = first;
                    while j < loops {
                        element::<F, N>(j, &oi, &res, &mut acc, &mut cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, 0usize, 1usize, comptime! { None::<usize> }, comptime! { None::<usize> }, true, round_bf16);
                        j += step;
                    }
                }
                #[unroll]
                for k in 0..nr {
                    let (op, _, t) = comptime! { prog.phases[ph].reduces[k] };
                    let mut v = acc[k];
                    if comptime! { coop } {
                        // Every unit takes part (the barriers are outside any branch); cubes past
                        // the last value fold identities and store nothing.
                        v = tree(&mut sh, v, op, per_cube, comptime! { prog.planes });
                    }
                    // One unit writes it: the value's first lane (cooperative), else each its own.
                    let mut writes = active;
                    if comptime! { coop } {
                        writes = active && (UNIT_POS as usize) < per_cube;
                    }
                    if writes {
                        // (The offset read where it is used: read at the start, it held a
                        // register through the loop, and a column fold spilled.)
                        work[meta[tbase + t] as usize + o] = v;
                    }
                    res.push(v);
                }
            }
        }
        row += 1;
    }
    // Each `across` phase's partials of this cube's block: row `CUBE_POS` of its out tensor,
    // a row as long as the positions of one target element (cubes without rows store
    // identities).
    #[unroll]
    for ph in 0..prog.phases.len() {
        if comptime! { prog.phases[ph].reach == Reach::Across } {
            let ka = comptime! { across_before(&prog.phases, ph) };
            let positions = domain_len(&tab, prog.clone(), comptime! { prog.phases[ph].domain }, tgt_shape);
            #[unroll]
            for k in 0..prog.phases[ph].reduces.len() {
                let (_, _, t) = comptime! { prog.phases[ph].reduces[k] };
                let base = meta[tbase + t] as usize + CUBE_POS * positions;
                #[unroll]
                for m in 0..slots {
                    // (A unit's vector `m / lanes`, lane `m % lanes`.)
                    let j = if comptime! { lanes > 1 } { (first + comptime! { m / lanes } * step) * lanes + comptime! { m % lanes } } else { first + m * step };
                    if j < positions {
                        work[base + j] = part[(ka + k) * slots + m];
                    }
                }
            }
        }
    }
}

/// The first `len` entries of the shape table, each read once, unconditionally, at the start:
/// the compiler then keeps in registers those the kernel uses, rather than reading an entry
/// again for each position under the branch that uses it (where no read dominates another,
/// none can stand for the rest).
#[cube]
#[allow(clippy::needless_range_loop)] // (an unrolled range is what a cube function walks)
fn table(meta: &[u32], #[comptime] len: usize) -> Sequence<u32> {
    let mut tab = Sequence::<u32>::new();
    #[unroll]
    for i in 0..len {
        tab.push(meta[i]);
    }
    tab
}

/// Phase `ph` at a unit's `unroll` positions of a row `loops` long (`first` on, `step` apart),
/// unrolled: folded into `acc`, at `partials` (the phase's first `Reach::Across` partial) per
/// position, else at 0. The positions are read under no branch, so that their loads are in
/// flight together (past the row's end, the first again: `within`), but in a cube of more than
/// `BLOCK` units, whose units have too few registers to hold them all at once. In a kernel
/// reading vectors (`LProgram::vector`) a position is a vector of neighbours: the first keeping
/// phase reads each kept load's as one access, and a phase's stores into `io` are gathered
/// over its lanes (in `cache`, past the kept loads) and written as one.
#[cube]
#[allow(clippy::too_many_arguments)]
fn walk<F: Float, N: Size>(
    first: usize,
    step: usize,
    loops: usize,
    oi: &Sequence<usize>,
    res: &Sequence<f32>,
    acc: &mut Array<f32>,
    cache: &mut Array<f32>,
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    meta: &[u32],
    tab: &Sequence<u32>,
    scalars: &[f32],
    #[comptime] prog: LProgram,
    #[comptime] ph: usize,
    #[comptime] partials: Option<usize>,
    #[comptime] round_bf16: bool,
) {
    let unroll = comptime! { prog.unroll.max(1) };
    let unbranched = comptime! { prog.units <= BLOCK };
    let lanes = comptime! { prog.lanes(ph) };
    // Registers per kept load or partial: a unit's positions, times the lanes of each.
    let slots = comptime! { unroll * prog.vector.max(1) };
    if loops > 0 {
        let vectors = if comptime! { lanes > 1 } { loops / lanes } else { loops };
        #[unroll]
        for m in 0..unroll {
            let v = first + m * step;
            let counts = v < vectors;
            let (slot, stride) = comptime! { partials.map_or((0, 1), |ka| (ka * slots + m * lanes, slots)) };
            let at = comptime! { prog.keeps(ph).then_some(m * lanes) };
            if counts || comptime! { unbranched } {
                if comptime! { lanes > 1 } {
                    let j = within(v, vectors) * lanes;
                    let idx = domain_index(j, oi, tab, prog.clone(), ph);
                    if comptime! { prog.first_keeping() == Some(ph) } {
                        fill::<F, N>(&idx, cache, x, dy, io, work, tab, prog.clone(), comptime! { m * lanes });
                    }
                    fill_params(&idx, cache, work, tab, prog.clone(), ph);
                    #[unroll]
                    for l in 0..lanes {
                        element::<F, N>(j + l, oi, res, acc, cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, comptime! { if partials.is_some() { slot + l } else { slot } }, stride, comptime! { at.map(|a| a + l) }, comptime! { Some(l) }, counts, round_bf16);
                    }
                    if counts {
                        store_staged::<F, N>(&idx, cache, io, tab, prog.clone(), ph);
                    }
                } else {
                    element::<F, N>(within(v, vectors), oi, res, acc, cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, slot, stride, at, comptime! { None::<usize> }, counts, round_bf16);
                }
            }
        }
    }
}

/// Target element `o`, per axis (last axis first); the outermost axis it spans takes what is
/// left whole (below its extent wherever the element is used).
#[cube]
fn target_index(o: usize, tab: &Sequence<u32>, #[comptime] prog: LProgram) -> Sequence<usize> {
    let rank = comptime! { prog.rank };
    let tgt = comptime! { 3 * prog.rank * prog.target };
    let mut oi = Sequence::<usize>::new();
    let mut rem = o;
    #[unroll]
    for k in 0..rank {
        let a = comptime! { rank - 1 - k };
        if comptime! { prog.kinds[prog.target][a] == AxisKind::One } {
            oi.push(0usize);
        } else if comptime! { prog.kinds[prog.target][..a].iter().all(|k| *k == AxisKind::One) } {
            oi.push(rem);
        } else {
            let e = tab[tgt + a] as usize;
            oi.push(rem % e);
            rem /= e;
        }
    }
    oi
}

/// Every kept load's vector at `idx` (its first lane's place), its lanes into `cache` at `at`
/// of each load's registers. f32 parameters (in `work`) along the row are read
/// [`PARAM_LANES`] values an access (`LProgram::vector_params`), else a value per lane; one for
/// all where they are broadcast along the row (a DyT's alpha).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fill<F: Float, N: Size>(
    idx: &Sequence<usize>,
    cache: &mut Array<f32>,
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    tab: &Sequence<u32>,
    #[comptime] prog: LProgram,
    #[comptime] at: usize,
) {
    let lanes = comptime! { prog.vector };
    let slots = comptime! { prog.unroll.max(1) * lanes };
    #[unroll]
    for c in 0..prog.kept.len() {
        let (t, s, buf) = comptime! { prog.kept[c] };
        let off = offset(idx, tab, prog.clone(), t, s);
        let base = comptime! { c * slots + at };
        if comptime! { prog.kept_wide((t, s, buf)) } {
            fill_wide(work, off, cache, base, lanes);
        } else if comptime! { buf == Buf::Work } {
            let along = comptime! { prog.kinds[s][prog.rank - 1] != AxisKind::One };
            #[unroll]
            for l in 0..lanes {
                let from = if comptime! { along } { off + l } else { off };
                cache[base + l] = work[from];
            }
        } else {
            unpack::<F, N>(fetch::<F, N>(off / lanes, x, dy, io, buf), cache, base, lanes);
        }
    }
}

/// Phase `ph`'s f32 loads along the row (`LProgram::lane_params`) for the vector whose first
/// lane is at `idx`, into `cache` from `LProgram::params_at`, where its lanes' `element` find
/// them.
#[cube]
fn fill_params(idx: &Sequence<usize>, cache: &mut Array<f32>, work: &mut [f32], tab: &Sequence<u32>, #[comptime] prog: LProgram, #[comptime] ph: usize) {
    let lanes = comptime! { prog.vector };
    let at = comptime! { prog.params_at() };
    #[unroll]
    for q in 0..prog.lane_params(ph).len() {
        let (t, s, _) = comptime! { prog.lane_params(ph)[q] };
        fill_wide(work, offset(idx, tab, prog.clone(), t, s), cache, comptime! { at + q * lanes }, lanes);
    }
}

/// `lanes` values of `work` from `off` (a multiple of [`PARAM_LANES`]) into `cache` from `at`,
/// [`PARAM_LANES`] an access: `work` viewed as vectors (a reinterpreting cast in CUDA C++).
#[cube]
fn fill_wide(work: &mut [f32], off: usize, cache: &mut Array<f32>, #[comptime] at: usize, #[comptime] lanes: usize) {
    let wide = work.as_vectorized().with_vector_size::<Const<PARAM_LANES>>();
    #[unroll]
    for h in 0..comptime! { lanes / PARAM_LANES } {
        unpack::<f32, Const<PARAM_LANES>>(wide[off / PARAM_LANES + h], cache, comptime! { at + h * PARAM_LANES }, PARAM_LANES);
    }
}

/// Phase `ph`'s stores into `io` of a vector whose first lane is at `idx`, each a vector of
/// the values its lanes staged in `cache` (`LProgram::staged`).
#[cube]
fn store_staged<F: Float, N: Size>(idx: &Sequence<usize>, cache: &mut Array<f32>, io: &mut [Vector<F, N>], tab: &Sequence<u32>, #[comptime] prog: LProgram, #[comptime] ph: usize) {
    let lanes = comptime! { prog.vector };
    let in_io = comptime! { prog.phases[ph].stores.iter().filter(|s| s.2).count() };
    #[unroll]
    for k in 0..in_io {
        let t = comptime! { prog.phases[ph].stores.iter().filter(|s| s.2).nth(k).unwrap().0 };
        let off = offset(idx, tab, prog.clone(), t, comptime! { prog.phases[ph].domain });
        let mut vec = Vector::<F, N>::empty();
        #[unroll]
        for l in 0..lanes {
            vec.insert(l, F::cast_from(cache[comptime! { prog.staged() + k * lanes + l }]));
        }
        io[off / lanes] = vec;
    }
}

/// An elementwise kernel's phase `ph` over a unit's `unroll` vectors of target elements, the
/// first vector `o0`, the rest a cube apart (of `count / vector`; past the end, the first
/// again, read and not stored): the kept loads of every vector read first, one access each
/// (the first phase), then each lane's work, each store into `io` written as one vector.
#[cube]
#[allow(clippy::too_many_arguments)]
fn lanes_of<F: Float, N: Size>(
    o0: usize,
    count: usize,
    res: &Sequence<f32>,
    cache: &mut Array<f32>,
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    meta: &[u32],
    tab: &Sequence<u32>,
    scalars: &[f32],
    #[comptime] prog: LProgram,
    #[comptime] ph: usize,
    #[comptime] round_bf16: bool,
) {
    let (rank, lanes, unroll) = comptime! { (prog.rank, prog.vector, prog.unroll.max(1)) };
    let vectors = count / lanes;
    let mut firsts = Sequence::<Sequence<usize>>::new();
    #[unroll]
    for m in 0..unroll {
        let o = o0 + m * CUBE_DIM as usize;
        let oi = target_index(select(o < vectors, o, 0usize) * lanes, tab, prog.clone());
        if comptime! { prog.first_keeping() == Some(ph) } {
            let idx = domain_index(0usize, &oi, tab, prog.clone(), ph);
            fill::<F, N>(&idx, cache, x, dy, io, work, tab, prog.clone(), comptime! { m * lanes });
        }
        firsts.push(oi);
    }
    let mut none = Array::<f32>::new(1usize);
    #[unroll]
    for m in 0..unroll {
        let active = (o0 + m * CUBE_DIM as usize) < vectors;
        let oi = firsts.index(m);
        if comptime! { !prog.lane_params(ph).is_empty() } {
            fill_params(&domain_index(0usize, oi, tab, prog.clone(), ph), cache, work, tab, prog.clone(), ph);
        }
        #[unroll]
        for l in 0..lanes {
            // The lane's element: the next along the last axis (`oi` holds it first).
            let mut lane = Sequence::<usize>::new();
            #[unroll]
            for k in 0..rank {
                if comptime! { k == 0 } {
                    lane.push(oi[k] + l);
                } else {
                    lane.push(oi[k]);
                }
            }
            element::<F, N>(0usize, &lane, res, &mut none, cache, x, dy, io, work, meta, tab, scalars, prog.clone(), ph, 0usize, 1usize, comptime! { Some(m * lanes + l) }, comptime! { Some(l) }, active, round_bf16);
        }
        if active {
            let idx = domain_index(0usize, oi, tab, prog.clone(), ph);
            store_staged::<F, N>(&idx, cache, io, tab, prog.clone(), ph);
        }
    }
}

/// Where a unit reads position `j` of a row of `loops` positions (at least one): `j`, or past
/// the row's end the first position, read but not counted.
#[cube]
fn within(j: usize, loops: usize) -> usize {
    select(j < loops, j, 0usize)
}

/// Start each of `reduces` from its fold's identity, at `acc[slot + k * stride]` (where
/// `element` folds reduction `k`).
#[cube]
fn identities(acc: &mut Array<f32>, #[comptime] reduces: Vec<(ROp, usize, usize)>, #[comptime] slot: usize, #[comptime] stride: usize) {
    #[unroll]
    for k in 0..reduces.len() {
        let (op, _, _) = comptime! { reduces[k] };
        acc[comptime! { slot + k * stride }] = identity(op);
    }
}

/// Fold each unit's `v` over the cube, lanes apart: the units `u` with the same `u % lanes`
/// fold together; every unit gets its lane's value. In shared memory, halving the cube at each
/// barrier (strides stay multiples of `lanes`); or (`planes`, lanes within a warp) by
/// shuffles in each warp, then the warps' folds through shared memory. Every unit must call
/// it (it holds barriers, and a shuffle needs its whole warp), and `sh` is free again after.
#[cube]
fn tree(sh: &mut Shared<[f32]>, v: f32, #[comptime] op: ROp, #[comptime] lanes: usize, #[comptime] planes: bool) -> f32 {
    if comptime! { planes && lanes <= WARP } {
        tree_in_warps(sh, v, op, lanes)
    } else {
        tree_in_shared(sh, v, op, lanes)
    }
}

/// [`tree`] by shuffles: within a warp, the units of a lane fold by exchanging values across
/// the other bits of their position, each ending with its warp's fold; each warp's then stands
/// in shared memory, and every unit folds those of its lane.
#[cube]
fn tree_in_warps(sh: &mut Shared<[f32]>, v: f32, #[comptime] op: ROp, #[comptime] lanes: usize) -> f32 {
    let u = UNIT_POS as usize;
    let mut mine = v;
    #[unroll]
    for s in 0..comptime! { (WARP / lanes).trailing_zeros() } {
        mine = fold(op, mine, plane_shuffle_xor(mine, comptime! { (WARP as u32 / 2) >> s }));
    }
    if u % WARP < lanes {
        sh[u / WARP * lanes + u % WARP] = mine;
    }
    sync_cube();
    let lane = u % lanes;
    let mut out = sh[lane];
    let mut w = 1usize;
    while w < CUBE_DIM as usize / WARP {
        out = fold(op, out, sh[w * lanes + lane]);
        w += 1;
    }
    // Everyone has read the result before the next reduction reuses `sh`.
    sync_cube();
    out
}

/// [`tree`] in shared memory, halving the cube at each barrier.
#[cube]
fn tree_in_shared(sh: &mut Shared<[f32]>, v: f32, #[comptime] op: ROp, #[comptime] lanes: usize) -> f32 {
    let u = UNIT_POS as usize;
    sh[u] = v;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride >= lanes {
        if u < stride {
            sh[u] = fold(op, sh[u], sh[u + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let out = sh[u % lanes];
    // Everyone has read the result before the next reduction reuses `sh`.
    sync_cube();
    out
}

/// The elements of shape `domain` that fall in one element of shape `target` (shape-table
/// indices; `target` coarser).
#[cube]
fn domain_len(tab: &Sequence<u32>, #[comptime] prog: LProgram, #[comptime] domain: usize, #[comptime] target: usize) -> usize {
    let rank = comptime! { prog.rank };
    let tgt = comptime! { 3 * prog.rank * target };
    let dom = comptime! { 3 * prog.rank * domain };
    let mut loops = 1usize;
    #[unroll]
    for a in 0..rank {
        let (dk, tk) = comptime! { (prog.kinds[domain][a], prog.kinds[target][a]) };
        if comptime! { tk == AxisKind::One } {
            loops *= tab[dom + a] as usize;
        } else if comptime! { spreads(dk, tk) } {
            loops *= (tab[dom + a] / tab[tgt + a]) as usize;
        }
    }
    loops
}

/// Where domain element `j` of phase `ph` within the target element at `oi` lies, per axis
/// (last first): the index along full axes, the first input index of its group along grouped
/// ones, 0 along broadcast ones.
#[cube]
fn domain_index(j: usize, oi: &Sequence<usize>, tab: &Sequence<u32>, #[comptime] prog: LProgram, #[comptime] ph: usize) -> Sequence<usize> {
    let rank = comptime! { prog.rank };
    let tgt = comptime! { 3 * prog.rank * prog.target };
    let dom = comptime! { 3 * prog.rank * prog.phases[ph].domain };
    // Axes along which one target element covers several domain elements.
    let spread = comptime! { (0..prog.rank).filter(|&a| spreads(prog.kinds[prog.phases[ph].domain][a], prog.kinds[prog.target][a])).count() };
    let mut idx = Sequence::<usize>::new();
    let mut jr = j;
    #[unroll]
    for k in 0..rank {
        let a = comptime! { rank - 1 - k };
        let (dk, tk) = comptime! { (prog.kinds[prog.phases[ph].domain][a], prog.kinds[prog.target][a]) };
        if comptime! { dk == AxisKind::One } {
            // (One along the domain: one along the target too.)
            idx.push(0usize);
        } else if comptime! { !spreads(dk, tk) } {
            // Full along both: the same index.
            idx.push(oi[k]);
        } else {
            let mut per = tab[dom + a] as usize;
            if comptime! { tk != AxisKind::One } {
                per /= tab[tgt + a] as usize;
            }
            // The only axis a value spreads along (a row, a column) takes `j` whole.
            let mut ja = jr;
            if comptime! { spread > 1 } {
                ja = jr % per;
                jr /= per;
            }
            let at = oi[k] * per + ja;
            if comptime! { dk == AxisKind::Full } {
                idx.push(at);
            } else {
                idx.push(at * tab[dom + rank + a] as usize);
            }
        }
    }
    idx
}

/// Domain element `j` of phase `ph` within the target element at `oi` (per axis, last
/// first): its ops run, its stores made, the phase's reduction `k` folded into `acc[slot + k *
/// stride]`. `res` holds the reductions of earlier phases; `at`, in a keeping phase, is which
/// of the unit's positions `j` is, its kept loads at `cache[c * slots + at]`; unless it
/// `counts`, it is read but neither folded nor stored (a position past a row's end, read at
/// `within`). As `lane` of a vector (`walk`), its kept loads are already in `cache`, and its
/// values for `io` go there too, after them (`LProgram::staged`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn element<F: Float, N: Size>(
    j: usize,
    oi: &Sequence<usize>,
    res: &Sequence<f32>,
    acc: &mut Array<f32>,
    cache: &mut Array<f32>,
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    meta: &[u32],
    held: &Sequence<u32>,
    scalars: &[f32],
    #[comptime] prog: LProgram,
    #[comptime] ph: usize,
    #[comptime] slot: usize,
    #[comptime] stride: usize,
    #[comptime] at: Option<usize>,
    #[comptime] lane: Option<usize>,
    counts: bool,
    #[comptime] round_bf16: bool,
) {
    let slots = comptime! { prog.unroll.max(1) * prog.vector.max(1) };
    // The shape table the kernel holds in registers, else its entries read here.
    let own = table(meta, comptime! { if prog.holds_table() { 0 } else { prog.table_len() } });
    let tab = if comptime! { prog.holds_table() } { held } else { &own };
    let idx = domain_index(j, oi, tab, prog.clone(), ph);
    if comptime! { at.is_some() && lane.is_none() } {
        #[unroll]
        for q in 0..prog.prefetches(ph).len() {
            let (c, (t, s, buf)) = comptime! { prog.prefetches(ph)[q] };
            cache[comptime! { c * slots + at.unwrap() }] = gather::<F, N>(&idx, x, dy, io, work, tab, prog.clone(), t, s, buf);
        }
    }
    let mut r = Sequence::<f32>::new();
    #[unroll]
    for k in 0..prog.phases[ph].ops.len() {
        let op = comptime! { prog.phases[ph].ops[k].clone() };
        match op {
            LOp::Load(t, s, buf) => {
                // Read for the vector's lanes at once (`fill_params`): its register.
                let wide = comptime! { lane.and_then(|l| prog.lane_params(ph).iter().position(|&p| p == (t, s, buf)).map(|q| prog.params_at() + q * prog.vector + l)) };
                // (register, whether this phase fills it here)
                let kept = comptime! { at.and_then(|m| prog.kept_slot(ph, (t, s, buf)).map(|(c, fills)| (c * slots + m, fills && lane.is_none()))) };
                // (A kept load fills registers later phases read: never skipped.)
                let guard = comptime! { if kept.is_some() { None } else { prog.phases[ph].guards()[k] } };
                if comptime! { wide.is_some() } {
                    r.push(cache[comptime! { wide.unwrap() }]);
                } else if comptime! { kept.is_some_and(|(_, fills)| !fills) } {
                    r.push(cache[comptime! { kept.unwrap().0 }]);
                } else if comptime! { guard.is_some() } {
                    // Read only where the branch using it is taken (a uniform branch).
                    let (sc, want) = comptime! { guard.unwrap() };
                    let mut take = scalars[sc] != 0.0;
                    if comptime! { !want } {
                        take = !take;
                    }
                    let mut v = 0f32;
                    if take {
                        v = gather::<F, N>(&idx, x, dy, io, work, tab, prog.clone(), t, s, buf);
                    }
                    r.push(v);
                } else {
                    let v = gather::<F, N>(&idx, x, dy, io, work, tab, prog.clone(), t, s, buf);
                    if comptime! { kept.is_some() } {
                        cache[comptime! { kept.unwrap().0 }] = v;
                    }
                    r.push(v);
                }
            }
            LOp::Result(i) => r.push(res[i]),
            LOp::Pure(op) => {
                let v = pure(op, &r, scalars);
                r.push(v);
            }
        }
    }
    #[unroll]
    for k in 0..prog.phases[ph].reduces.len() {
        let (op, v, _) = comptime! { prog.phases[ph].reduces[k] };
        let at = comptime! { slot + k * stride };
        acc[at] = select(counts, fold(op, acc[at], r[v]), acc[at]);
    }
    if counts {
        #[unroll]
        for k in 0..prog.phases[ph].stores.len() {
            let (t, v, in_io) = comptime! { prog.phases[ph].stores[k] };
            if comptime! { in_io && lane.is_some() } {
                // This store's place among the phase's stores into `io`, for `walk` to write.
                let n = comptime! { prog.phases[ph].stores[..k].iter().filter(|s| s.2).count() };
                cache[comptime! { prog.staged() + n * prog.vector + lane.unwrap() }] = stored(r[v], round_bf16);
            } else {
                // This element's place in a tensor of the domain's shape.
                let off = offset(&idx, tab, prog.clone(), t, comptime! { prog.phases[ph].domain });
                if comptime! { in_io } {
                    io[off] = Vector::new(F::cast_from(stored(r[v], round_bf16)));
                } else {
                    work[off] = r[v];
                }
            }
        }
    }
}

/// Where domain element `idx` falls in tensor `t` read through shape `s`: its offset in its
/// buffer.
#[cube]
fn offset(idx: &Sequence<usize>, tab: &Sequence<u32>, #[comptime] prog: LProgram, #[comptime] t: usize, #[comptime] s: usize) -> usize {
    let rank = comptime! { prog.rank };
    let tbase = comptime! { 3 * prog.rank * prog.shapes };
    let sb = comptime! { 3 * prog.rank * s };
    let mut off = tab[tbase + t] as usize;
    #[unroll]
    for q in 0..rank {
        let a = comptime! { rank - 1 - q };
        off += offset_along(idx[q], tab, comptime! { sb + rank + a }, comptime! { sb + 2 * rank + a }, comptime! { prog.kinds[s][a] });
    }
    off
}

/// Tensor `t`'s value (read through shape `s`) where domain element `idx` falls, in f32.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gather<F: Float, N: Size>(
    idx: &Sequence<usize>,
    x: &[Vector<F, N>],
    dy: &[Vector<F, N>],
    io: &mut [Vector<F, N>],
    work: &mut [f32],
    tab: &Sequence<u32>,
    #[comptime] prog: LProgram,
    #[comptime] t: usize,
    #[comptime] s: usize,
    #[comptime] buf: Buf,
) -> f32 {
    read::<F, N>(offset(idx, tab, prog, t, s), x, dy, io, work, buf)
}

/// The value at `off` of the buffer `buf`, in f32. (`x`, `dy` and `io` are read a value at a
/// time only in kernels reading one value per vector: `LProgram::vector`.)
#[cube]
#[allow(unused_assignments)] // (one branch is expanded, the initial value never)
fn read<F: Float, N: Size>(off: usize, x: &[Vector<F, N>], dy: &[Vector<F, N>], io: &mut [Vector<F, N>], work: &mut [f32], #[comptime] buf: Buf) -> f32 {
    let mut v = 0f32;
    if comptime! { buf == Buf::Input } {
        v = f32::cast_from(x[off].extract(0usize));
    } else if comptime! { buf == Buf::GradOutput } {
        v = f32::cast_from(dy[off].extract(0usize));
    } else if comptime! { buf == Buf::Io } {
        v = f32::cast_from(io[off].extract(0usize));
    } else {
        v = work[off];
    }
    v
}

/// The vector at `off` (in vectors) of the buffer `buf` (not `work`, which holds f32 values).
#[cube]
#[allow(unused_assignments)] // (one branch is expanded, the initial value never)
fn fetch<F: Float, N: Size>(off: usize, x: &[Vector<F, N>], dy: &[Vector<F, N>], io: &mut [Vector<F, N>], #[comptime] buf: Buf) -> Vector<F, N> {
    let mut v = Vector::<F, N>::empty();
    if comptime! { buf == Buf::Input } {
        v = x[off];
    } else if comptime! { buf == Buf::GradOutput } {
        v = dy[off];
    } else {
        v = io[off];
    }
    v
}

/// Whether a target element of kind `target` along an axis covers more than one element of a
/// domain of kind `domain` there (at run time it may still cover one: a group of one).
pub fn spreads(domain: AxisKind, target: AxisKind) -> bool {
    domain != AxisKind::One && !(domain == AxisKind::Full && target == AxisKind::Full)
}

/// How far along one axis of a shape the domain index `i` lies (`tab[inner]`, `tab[stride]`:
/// the shape's elements per value and stride there): nothing where the shape is broadcast, `i`
/// strides where it is full, else its group's.
#[cube]
fn offset_along(i: usize, tab: &Sequence<u32>, #[comptime] inner: usize, #[comptime] stride: usize, #[comptime] kind: AxisKind) -> usize {
    let mut off = 0usize;
    if comptime! { kind == AxisKind::Full } {
        off = i * tab[stride] as usize;
    } else if comptime! { kind == AxisKind::Grouped } {
        off = i / tab[inner] as usize * tab[stride] as usize;
    }
    off
}

/// A value as storage keeps it: itself, or (bf16 held in f32 words, see `dtype::Held`) rounded
/// to the nearest bf16, ties to even, as a conversion to bf16 would. NaN stays NaN.
#[cube]
#[allow(clippy::eq_op)] // (`v != v`: NaN, in a cube function)
fn stored(v: f32, #[comptime] round_bf16: bool) -> f32 {
    if comptime! { round_bf16 } {
        let bits = u32::reinterpret(v);
        let rounded = f32::reinterpret((bits + 0x7FFFu32 + ((bits >> 16u32) & 1u32)) & 0xFFFF_0000u32);
        select(v != v, v, rounded)
    } else {
        v
    }
}

/// The lanes of `v`, as f32, into `ld` from `at` on.
#[cube]
fn unpack<E: Float, N: Size>(v: Vector<E, N>, ld: &mut Array<f32>, #[comptime] at: usize, #[comptime] lanes: usize) {
    #[unroll]
    for l in 0..lanes {
        ld[at + l] = f32::cast_from(v.extract(l));
    }
}

/// A vector of the values of `st` from `at` on, converted to `E`.
#[cube]
fn pack<E: Float, N: Size>(st: &Array<f32>, #[comptime] at: usize, #[comptime] lanes: usize) -> Vector<E, N> {
    let mut v = Vector::<E, N>::empty();
    #[unroll]
    for l in 0..lanes {
        v.insert(l, E::cast_from(st[at + l]));
    }
    v
}
