//! A layer program -> layer kernels. Every reduction is materialized: a phase per reduction,
//! a cube per reduced value (or, for short reductions, a unit) folding the values it covers;
//! the elementwise work feeding it is recomputed inside that fold rather than stored. A single
//! value folded from several axes takes two stages, so that many cubes share it. Outputs of
//! one shape share one elementwise phase. Phases over the same target elements share a kernel
//! (`fuse`): a layer norm's forward is one kernel. Shapes stay symbolic: extents arrive at run
//! time in the `meta` table, so a kernel serves every input shape and group count; only each
//! shape's kind per axis (broadcast, grouped, full) is fixed, to spare the kernels divisions.

use crate::compile::{binary, reduce, unary, Uniforms};
use crate::kernel::{layer_kernel, AxisKind, Buf, LOp, LPhase, LProgram, BLOCK};
use crate::{Dtype, Error};
use cubecl::prelude::*;
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::{Entry, Extent, Op, Program, Shape, Target};
use normforge_dsl::uniform;

/// Where a tensor of the arena comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Input,
    GradOutput,
    Param(u32),
    Buffer(u32),
    /// An update rule's gradient and state, when it runs through layer kernels.
    Grad,
    State(u32),
    /// A value the kernels compute: a reduction, or an output.
    Node(u32),
    /// The first stage of reduction `Node(i)` to a single value: one partial value per index
    /// of one axis, so that many cubes share the work.
    Partial(u32),
}

impl Source {
    /// Whether the kernels compute it (no caller supplies it).
    pub fn computed(self) -> bool {
        matches!(self, Source::Node(_) | Source::Partial(_))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// In launch order.
    pub kernels: Vec<LProgram>,
    /// The shape table.
    pub shapes: Vec<Shape>,
    /// Per shape-table entry, the axis order loads read it in: `perms[k][a]` is the kernel's
    /// axis that the tensor's axis `a` follows (the identity but where `swap` reads a tensor
    /// transposed).
    pub perms: Vec<Vec<usize>>,
    /// The tensor table: where each comes from, its shape's index, and the buffer it lives in.
    pub tensors: Vec<(Source, usize, Buf)>,
    /// Which tensor holds each output.
    pub outputs: Vec<(Target, usize)>,
    pub(crate) program: Program,
    pub(crate) uniforms: Uniforms,
}

struct Tables {
    shapes: Vec<Shape>,
    perms: Vec<Vec<usize>>,
    tensors: Vec<(Source, usize, Buf)>,
}

impl Tables {
    fn shape(&mut self, s: &Shape) -> usize {
        self.view(s, &(0..s.0.len()).collect::<Vec<_>>())
    }
    /// A shape read in the axis order `perm` (see [`Plan::perms`]).
    fn view(&mut self, s: &Shape, perm: &[usize]) -> usize {
        (0..self.shapes.len()).find(|&k| self.shapes[k] == *s && self.perms[k] == perm).unwrap_or_else(|| {
            self.shapes.push(s.clone());
            self.perms.push(perm.to_vec());
            self.shapes.len() - 1
        })
    }
    fn tensor(&mut self, src: Source, s: &Shape, buf: Buf) -> usize {
        let sh = self.shape(s);
        self.tensors.iter().position(|(x, ..)| *x == src).unwrap_or_else(|| {
            self.tensors.push((src, sh, buf));
            self.tensors.len() - 1
        })
    }
    fn load(&mut self, src: Source, s: &Shape, perm: &[usize]) -> LOp {
        // A rule's parameter and gradient take the input's and the output gradient's places.
        let buf = match src {
            Source::Input => Buf::Input,
            Source::GradOutput | Source::Grad => Buf::GradOutput,
            _ => Buf::Work,
        };
        let t = self.tensor(src, s, buf);
        LOp::Load(t, self.view(s, perm), self.tensors[t].2)
    }
}

pub fn plan(entry: &Entry, p: &Program) -> Result<Plan, Error> {
    plan_stacked(entry, p, 0)
}

/// As [`plan`], for a program whose first `lead` axes index the tensors of a stack: what is
/// one value of each tensor counts as a single value (`single`).
pub(crate) fn plan_stacked(entry: &Entry, p: &Program, lead: usize) -> Result<Plan, Error> {
    let unsupported = |what: &str| Error(format!("`{}`: {what} is not supported in a layer by the CubeCL backend", entry.name));
    let mut uniforms = Uniforms::new(p, |op| matches!(op, Op::Size(_) | Op::Rank(_)));
    // (`Step` is uniform too: `Uniforms` knows it.)
    let n = p.nodes.len();
    let materialized: Vec<bool> = (0..n).map(|i| !uniforms.flags[i] && matches!(p.nodes[i].op, Op::Reduce(..))).collect();
    let mut t = Tables { shapes: Vec::new(), perms: Vec::new(), tensors: Vec::new() };
    let rank = entry.axes.len();
    let mut kernels = Vec::new();

    // The ops computing `roots` from tensors and scalars; returns their registers. A node is
    // computed once per axis order it is needed in: under `swap(a, o, j)`, `a`'s loads read
    // their tensors with `o` and `j` exchanged (a view, no copy).
    let identity: Vec<usize> = (0..rank).collect();
    let build = |roots: &[u32], t: &mut Tables, uniforms: &mut Uniforms| -> Result<(Vec<LOp>, Vec<usize>), Error> {
        let leaf = |i: usize, uniforms: &Uniforms| uniforms.flags[i] || materialized[i];
        // Uniform values are one number in every order.
        let order = |a: u32, perm: &[usize], uniforms: &Uniforms| if uniforms.flags[a as usize] { identity.clone() } else { perm.to_vec() };
        let mut needed: Vec<Vec<Vec<usize>>> = vec![Vec::new(); n];
        let need = |needed: &mut Vec<Vec<Vec<usize>>>, a: u32, perm: Vec<usize>| {
            if !needed[a as usize].contains(&perm) {
                needed[a as usize].push(perm);
            }
        };
        for &r in roots {
            need(&mut needed, r, order(r, &identity, uniforms));
        }
        for i in (0..n).rev() {
            if leaf(i, uniforms) {
                continue;
            }
            for perm in needed[i].clone() {
                match p.nodes[i].op {
                    Op::Swap(a, x, y) => need(&mut needed, a, order(a, &swapped(&perm, x, y), uniforms)),
                    ref op => op.args().into_iter().for_each(|a| need(&mut needed, a, order(a, &perm, uniforms))),
                }
            }
        }
        let mut ops = Vec::new();
        let mut reg: std::collections::HashMap<(u32, Vec<usize>), usize> = Default::default();
        for (i, node) in p.nodes.iter().enumerate() {
            for perm in &needed[i] {
                let at = |a: &u32, q: &[usize]| reg[&(*a, order(*a, q, uniforms))];
                let load = |src: Source, t: &mut Tables| t.load(src, &node.shape, perm);
                let op = if uniforms.flags[i] {
                    LOp::Scalar(uniforms.export(i as u32))
                } else if materialized[i] {
                    load(Source::Node(i as u32), t)
                } else {
                    match &node.op {
                        Op::Input => load(Source::Input, t),
                        Op::GradOutput => load(Source::GradOutput, t),
                        Op::Param(k) => load(Source::Param(*k), t),
                        Op::Buffer(k) => load(Source::Buffer(*k), t),
                        Op::Grad => load(Source::Grad, t),
                        Op::State(k) => load(Source::State(*k), t),
                        Op::Expand(a) => {
                            // Broadcasting is free: a load reads where the element falls.
                            let r = at(a, perm);
                            reg.insert((i as u32, perm.clone()), r);
                            continue;
                        }
                        Op::Swap(a, x, y) => {
                            let r = at(a, &swapped(perm, *x, *y));
                            reg.insert((i as u32, perm.clone()), r);
                            continue;
                        }
                        Op::Unary(u, a) => LOp::Unary(unary(*u), at(a, perm)),
                        Op::Binary(b, x, y) => LOp::Binary(binary(*b), at(x, perm), at(y, perm)),
                        Op::Select(c, x, y) => LOp::Select(at(c, perm), at(x, perm), at(y, perm)),
                        other => return Err(unsupported(&format!("{other:?}"))),
                    }
                };
                ops.push(op);
                reg.insert((i as u32, perm.clone()), ops.len() - 1);
            }
        }
        Ok((ops, roots.iter().map(|r| reg[&(*r, order(*r, &identity, uniforms))]).collect()))
    };

    for (i, node) in p.nodes.iter().enumerate() {
        if !materialized[i] {
            continue;
        }
        let Op::Reduce(r, a) = &node.op else { unreachable!() };
        let (ops, regs) = build(&[*a], &mut t, &mut uniforms)?;
        let out = t.tensor(Source::Node(i as u32), &node.shape, Buf::Work);
        let arg = &p.nodes[*a as usize].shape;
        let domain = t.shape(arg);
        let target = t.shape(&node.shape);
        let reduction = |domain, ops, value, out, target| LProgram {
            rank,
            shapes: 0,
            kinds: Vec::new(),
            target,
            phases: vec![LPhase { domain, ops, reduce: Some((reduce(*r), value, out)), stores: Vec::new() }],
            cooperative: true,
            values_per_cube: 1,
        };
        match two_stage(arg, &node.shape, lead) {
            // Several axes folded: first a partial value per index of one of them, then a
            // fold of those.
            Some(mid) => {
                let part = t.tensor(Source::Partial(i as u32), &mid, Buf::Work);
                let mid_shape = t.shape(&mid);
                kernels.push(reduction(domain, ops, regs[0], part, mid_shape));
                let load = t.load(Source::Partial(i as u32), &mid, &identity);
                kernels.push(reduction(mid_shape, vec![load], 0, out, target));
            }
            None => kernels.push(reduction(domain, ops, regs[0], out, target)),
        }
    }
    // Outputs that are reductions are already in their tensors; the rest, by shape.
    let mut outputs = Vec::new();
    let mut by_shape: Vec<(Shape, Vec<u32>)> = Vec::new();
    for o in &p.outputs {
        let node = &p.nodes[o.node as usize];
        let materialized = materialized[o.node as usize];
        // The output and the input gradient are stored in the storage type; reductions, which
        // may be loaded again, stay f32.
        let io = !materialized && matches!(o.target, Target::Y | Target::GradInput);
        outputs.push((o.target, t.tensor(Source::Node(o.node), &node.shape, if io { Buf::Io } else { Buf::Work })));
        if !materialized {
            match by_shape.iter_mut().find(|(s, _)| *s == node.shape) {
                Some((_, v)) if v.contains(&o.node) => {}
                Some((_, v)) => v.push(o.node),
                None => by_shape.push((node.shape.clone(), vec![o.node])),
            }
        }
    }
    for (shape, nodes) in by_shape {
        // Materialized nodes are loaded, not recomputed: treat the outputs as roots only.
        let (ops, regs) = build(&nodes, &mut t, &mut uniforms)?;
        let target = t.shape(&shape);
        let stores = nodes
            .iter()
            .zip(regs)
            .map(|(&nd, r)| {
                let tensor = t.tensors.iter().position(|(x, ..)| *x == Source::Node(nd)).expect("outputs have tensors");
                (tensor, r, t.tensors[tensor].2 == Buf::Io)
            })
            .collect();
        let phase = LPhase { domain: target, ops, reduce: None, stores };
        kernels.push(LProgram { rank, shapes: 0, kinds: Vec::new(), target, phases: vec![phase], cooperative: false, values_per_cube: 1 });
    }
    let mut kernels = fuse(kernels, &t.shapes, &t.tensors, lead);
    let kinds: Vec<Vec<AxisKind>> = t.shapes.iter().zip(&t.perms).map(|(s, perm)| axis_kinds(s, perm)).collect();
    for k in &mut kernels {
        k.shapes = t.shapes.len();
        k.kinds = kinds.clone();
    }
    Ok(Plan { kernels, shapes: t.shapes, perms: t.perms, tensors: t.tensors, outputs, program: p.clone(), uniforms })
}

/// Whether `s` is a single value of each tensor: broadcast along every axis but the first
/// `lead`, which index the tensors of a stack (`stack`).
fn single(s: &Shape, lead: usize) -> bool {
    s.0[lead..].iter().all(|e| *e == Extent::One)
}

/// The middle shape of a reduction of `arg` to a single value (of each tensor) `out` in two
/// stages, where `arg` spans several axes one of which is full: that axis kept (a partial value
/// per index), the rest reduced, then a fold of the partials. `None` where one stage is all
/// there is to do.
fn two_stage(arg: &Shape, out: &Shape, lead: usize) -> Option<Shape> {
    let spans = arg.0[lead..].iter().filter(|e| **e != Extent::One).count();
    let keep = lead + arg.0[lead..].iter().position(|e| *e == Extent::Full)?;
    (single(out, lead) && spans >= 2).then(|| Shape(out.0.iter().enumerate().map(|(a, e)| if a == keep { Extent::Full } else { e.clone() }).collect()))
}

/// Per kernel axis, the kind of the tensor axis a view in the order `perm` reads there (the
/// order of its entries in `meta`, see [`layout`]).
fn axis_kinds(s: &Shape, perm: &[usize]) -> Vec<AxisKind> {
    let mut kinds = vec![AxisKind::One; perm.len()];
    for (a, &k) in perm.iter().enumerate() {
        kinds[k] = match s.0[a] {
            Extent::One => AxisKind::One,
            Extent::Grouped(_) => AxisKind::Grouped,
            Extent::Full => AxisKind::Full,
        };
    }
    kinds
}

/// The axis order `swap(a, x, y)` reads `a` in, when it is itself read in `perm`.
fn swapped(perm: &[usize], x: u32, y: u32) -> Vec<usize> {
    let mut q = perm.to_vec();
    q.swap(x as usize, y as usize);
    q
}

/// Whether a tensor of shape `fine` splits into the elements of shape `coarse` (per axis:
/// broadcast, the same groups, or every index).
fn refines(fine: &Shape, coarse: &Shape) -> bool {
    fine.0.iter().zip(&coarse.0).all(|(f, c)| match (c, f) {
        (Extent::One, _) | (_, Extent::Full) => true,
        (Extent::Grouped(a), Extent::Grouped(b)) => a == b,
        _ => false,
    })
}

/// Fewer kernels: each (in order) joins an earlier kernel as a further phase where it can — a
/// reduction one with its target, an elementwise kernel one whose target its shape refines —
/// once everything it reads is computed by then; loads of reductions computed in the kernel
/// it joins become register reads. Among several, it joins the one it reads most from (then
/// the last), so a layer norm's output joins its row statistics, not its column sums.
fn fuse(kernels: Vec<LProgram>, shapes: &[Shape], tensors: &[(Source, usize, Buf)], lead: usize) -> Vec<LProgram> {
    let mut out: Vec<LProgram> = Vec::new();
    // Per fused kernel, the tensors its reductions write, in phase order.
    let mut made: Vec<Vec<usize>> = Vec::new();
    for k in kernels {
        let target = k.target;
        for mut phase in k.phases {
            let reads: Vec<usize> = phase.ops.iter().filter_map(|op| if let LOp::Load(t, ..) = op { Some(*t) } else { None }).collect();
            let from = |g: usize| reads.iter().filter(|t| made[g].contains(t)).count();
            // It may not run before a kernel that computes what it reads, nor inside one whose
            // results it reads transposed: those are other cubes' values.
            let transposed = |t: usize| phase.ops.iter().any(|op| matches!(*op, LOp::Load(u, s, _) if u == t && s != tensors[t].1));
            let after = reads
                .iter()
                .filter_map(|&t| made.iter().position(|m| m.contains(&t)).map(|g| g + usize::from(transposed(t))))
                .max()
                .unwrap_or(0);
            // (Elementwise work never joins a kernel of a single value: that is one cube.)
            let fits = |g: &LProgram| match phase.reduce {
                Some(_) => g.target == target,
                None => refines(&shapes[phase.domain], &shapes[g.target]) && (!single(&shapes[g.target], lead) || single(&shapes[phase.domain], lead)),
            };
            let join = (after..out.len()).filter(|&g| fits(&out[g])).max_by_key(|&g| (from(g), g));
            let g = match join {
                Some(g) => g,
                None => {
                    out.push(LProgram { rank: k.rank, shapes: 0, kinds: Vec::new(), target, phases: Vec::new(), cooperative: false, values_per_cube: 1 });
                    made.push(Vec::new());
                    out.len() - 1
                }
            };
            for op in &mut phase.ops {
                // A transposed read (`swap`) is another element's value: it stays a load.
                if let LOp::Load(t, s, _) = *op {
                    if let Some(i) = made[g].iter().position(|&m| m == t && s == tensors[t].1) {
                        *op = LOp::Result(i);
                    }
                }
            }
            if let Some((_, _, t)) = phase.reduce {
                made[g].push(t);
            }
            out[g].phases.push(phase);
        }
    }
    for k in &mut out {
        k.cooperative = k.phases.iter().any(|p| p.domain != k.target);
    }
    out
}

/// Reductions shorter than this fold in one unit each: a cube of mostly idle units and its
/// barriers would cost more than they save.
pub const COOPERATIVE_MIN: usize = 64;

/// How a plan's kernels are launched: tuning, never meaning (every choice computes the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Launch {
    /// Reductions of at least this many elements per value run a cube per value; shorter ones
    /// a unit per value.
    pub cooperative_min: usize,
    /// A cooperative reduction whose values lie side by side in memory (columns: a layer norm's
    /// parameter gradients) gives each cube this many of them, so a warp reads along a row
    /// instead of down a column; a power of two dividing `BLOCK` (1: a value per cube).
    pub columns: usize,
}

impl Default for Launch {
    fn default() -> Self {
        Launch { cooperative_min: COOPERATIVE_MIN, columns: 8 }
    }
}

impl Launch {
    /// Every reduction in one unit per value.
    pub fn per_unit() -> Self {
        Launch { cooperative_min: usize::MAX, ..Launch::default() }
    }

    /// Refuse what the kernels cannot run.
    pub fn check(&self) -> Result<(), Error> {
        if !(self.columns.is_power_of_two() && self.columns <= BLOCK) {
            return Err(Error(format!("columns per cube must be a power of two up to {BLOCK}, not {}", self.columns)));
        }
        Ok(())
    }
}

/// The kernel to launch when its longest phase covers `per_value` elements per target element
/// and its target is `last` long along the last axis: cooperative from `cooperative_min`
/// elements on, taking `columns` values per cube where they are neighbours in memory (the
/// target full along the last axis) and there are at least that many.
pub fn launched(k: &LProgram, per_value: usize, last: usize, launch: &Launch) -> LProgram {
    let mut k = k.clone();
    k.cooperative &= per_value >= launch.cooperative_min;
    let neighbours = k.kinds.get(k.target).and_then(|a| a.last()) == Some(&AxisKind::Full);
    k.values_per_cube = if k.cooperative && neighbours && last >= launch.columns { launch.columns } else { 1 };
    k
}

/// A plan bound to one call's shapes: what any runtime needs to run it. The input and the
/// output gradient are their own buffers; what the kernels write and the rest they read live in
/// two arenas, `io` (storage type) and `work` (f32), at `offsets`.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Per shape: extents, elements per value and strides per axis; then each tensor's offset.
    pub meta: Vec<u32>,
    /// Elements of each shape of the shape table.
    pub sizes: Vec<usize>,
    /// Each tensor's offset in its buffer.
    pub offsets: Vec<usize>,
    pub io_len: usize,
    pub work_len: usize,
    /// The kernels' scalar buffer (uniform values: hyper-parameters, sizes).
    pub scalars: Vec<f32>,
    /// In order: the kernel variant to launch and its grid (`BLOCK` units per cube).
    pub launches: Vec<(LProgram, (u32, u32, u32))>,
}

impl Layout {
    /// Elements of tensor `t` of the plan.
    pub fn len(&self, plan: &Plan, t: usize) -> usize {
        self.sizes[plan.tensors[t].1]
    }

    /// Exchange where each state is read and where its new value is written, so that a caller
    /// keeping the `work` arena from one step to the next finds the new state where the next
    /// step reads it, on alternate steps, with nothing copied. All or nothing: false (and no
    /// change) where some state and its output do not both live in `work` with one length.
    pub fn swap_states(&mut self, plan: &Plan) -> bool {
        let pairs: Vec<Option<(usize, usize)>> = plan
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(t, &(src, ..))| if let Source::State(i) = src { Some((t, i)) } else { None })
            .map(|(t, i)| {
                let out = plan.outputs.iter().find(|(target, _)| *target == Target::State(i))?.1;
                let work = |t: usize| plan.tensors[t].2 == Buf::Work;
                (work(t) && work(out) && out != t && self.len(plan, t) == self.len(plan, out)).then_some((t, out))
            })
            .collect();
        if pairs.iter().any(Option::is_none) {
            return false;
        }
        // The tensors' offsets end the table.
        let base = self.meta.len() - self.offsets.len();
        for (a, b) in pairs.into_iter().flatten() {
            self.offsets.swap(a, b);
            self.meta.swap(base + a, base + b);
        }
        true
    }
}

/// Bind a plan to shapes, its kernels launched as `launch` says.
pub fn layout(plan: &Plan, b: &AxisBinding, hparams: &[f64], step: f64, launch: &Launch) -> Result<Layout, Error> {
    launch.check()?;
    let rank = b.extents.len();
    let mut meta: Vec<u32> = Vec::new();
    let mut sizes = Vec::new();
    let too_big = || Error("a tensor of this layer call exceeds 2^32 values".into());
    for (s, perm) in plan.shapes.iter().zip(&plan.perms) {
        let outer = bind::extents(s, b, hparams).map_err(Error)?;
        let inner: Vec<usize> = outer.iter().zip(&b.extents).map(|(&o, &e)| if o == 0 { 0 } else { e / o }).collect();
        let mut stride = vec![0usize; rank];
        let mut acc = 1;
        for a in (0..rank).rev() {
            stride[a] = acc;
            acc *= outer[a];
        }
        sizes.push(acc);
        // Read in `perm`'s order: the kernel's axis `perm[a]` walks the tensor's axis `a`.
        let mut from = vec![0usize; rank];
        for (a, &k) in perm.iter().enumerate() {
            from[k] = a;
        }
        for table in [&outer, &inner, &stride] {
            for &a in &from {
                meta.push(u32::try_from(table[a]).map_err(|_| too_big())?);
            }
        }
    }
    let (mut io_len, mut work_len) = (0usize, 0usize);
    let mut offsets = Vec::new();
    for &(_, shape, buf) in &plan.tensors {
        let mut own = 0;
        let end = match buf {
            Buf::Io => &mut io_len,
            Buf::Work => &mut work_len,
            Buf::Input | Buf::GradOutput => &mut own,
        };
        offsets.push(*end);
        meta.push(u32::try_from(*end).map_err(|_| too_big())?);
        *end += sizes[shape];
    }
    u32::try_from(sizes.iter().fold(io_len.max(work_len), |a, &b| a.max(b))).map_err(|_| too_big())?;
    let query = |op: &Op| match op {
        Op::Size(s) => bind::size(s, b, hparams) as f64,
        Op::Rank(axes) => axes.iter().map(|&a| b.dims[a as usize].len()).sum::<usize>() as f64,
        _ => unreachable!("only shape queries"),
    };
    let scalars = plan.uniforms.values(&plan.program, hparams, step, &query);
    let (p, flags) = (&plan.program, &plan.uniforms.flags);
    let needed = uniform::needed(p, flags, &uniform::values(p, flags, hparams, step, &query), |i| p.nodes[i].op.args());
    let mut launches = Vec::new();
    for k in &plan.kernels {
        let count = sizes[k.target];
        // A kernel whose every result only a branch not taken reads (known from this call's
        // hyper-parameters and shapes: Muon's wide or tall form) is not launched; what reads
        // it still runs the select, which drops the (zero) value.
        let used = |ph: &LPhase| !ph.stores.is_empty() || ph.reduce.is_some_and(|(_, _, t)| matches!(plan.tensors[t].0, Source::Node(i) | Source::Partial(i) if needed[i as usize]));
        if count == 0 || !k.phases.iter().any(used) {
            continue;
        }
        let per_value = k.phases.iter().map(|p| sizes[p.domain] / count).max().unwrap_or(1);
        let last = if rank == 0 { 1 } else { meta[3 * rank * k.target + rank - 1] as usize };
        let k = launched(k, per_value, last, launch);
        let cubes = if k.cube_per_value() { count.div_ceil(k.values_per_cube) } else { count.div_ceil(BLOCK) };
        let x = cubes.min(65_535);
        let y = cubes.div_ceil(x);
        launches.push((k, (x as u32, y as u32, 1)));
    }
    Ok(Layout { meta, sizes, offsets, io_len, work_len, scalars, launches })
}

/// Run a plan bound to one call's shapes (`lay`) on the device: `data` gives the tensors it
/// reads (the rest it computes); `io` is the storage type of the input, output and their
/// gradients. Every output comes back, by target, in f32.
pub(crate) fn run<'a>(client: &cubecl::client::Client, plan: &Plan, lay: &Layout, io: Dtype, data: &dyn Fn(Source) -> Option<&'a [f32]>) -> Result<Vec<(Target, Vec<f32>)>, Error> {
    let held = io.held_on(client)?;
    // The input and the output gradient as buffers of their own; two arenas: `io` in the
    // storage type, `work` in f32.
    let (mut x, mut dy) = (Vec::new(), Vec::new());
    let (mut io_arena, mut work) = (vec![0f32; lay.io_len], vec![0f32; lay.work_len]);
    for (t, &(src, _, buf)) in plan.tensors.iter().enumerate() {
        let (off, len) = (lay.offsets[t], lay.len(plan, t));
        match data(src) {
            Some(d) if d.len() != len => return Err(Error(format!("{src:?} has {} values, the layer expects {len}", d.len()))),
            Some(d) => match buf {
                Buf::Input => x = d.to_vec(),
                Buf::GradOutput => dy = d.to_vec(),
                Buf::Io => io_arena[off..off + len].copy_from_slice(d),
                Buf::Work => work[off..off + len].copy_from_slice(d),
            },
            None if src.computed() => {}
            None => return Err(Error(format!("{src:?} is missing"))),
        }
    }
    // Never an empty binding: not every runtime allows one.
    for buffer in [&mut x, &mut dy, &mut io_arena, &mut work] {
        if buffer.is_empty() {
            buffer.push(0.0);
        }
    }
    // A binding past the adapter's limit does not run: refuse it here.
    let limit = client.properties().memory.max_page_size;
    let storage = x.len().max(dy.len()).max(io_arena.len());
    if (storage * held.size()).max(work.len() * 4) as u64 > limit {
        return Err(Error(format!("this call needs more than the adapter's largest buffer ({limit} bytes)")));
    }
    let (meta, scalars) = (&lay.meta, &lay.scalars);
    let x_h = client.create_from_slice(&held.encode(&x));
    let dy_h = client.create_from_slice(&held.encode(&dy));
    let io_h = client.create_from_slice(&held.encode(&io_arena));
    let work_h = client.create_from_slice(f32::as_bytes(&work));
    let meta_h = client.create_from_slice(u32::as_bytes(meta));
    let sc = client.create_from_slice(f32::as_bytes(scalars));
    for (k, (gx, gy, _)) in &lay.launches {
        let (cc, cd) = (CubeCount::Static(*gx, *gy, 1), CubeDim::new_1d(BLOCK as u32));
        let (ty, round) = held.kernel_type();
        // SAFETY: units (or cubes) past the target's size do nothing; every offset is a
        // tensor's offset plus an index below its size (the meta table is built from the same
        // shapes), so inside its buffer, whose length is passed.
        unsafe {
            let arg = |h: &cubecl::server::Handle, len: usize| BufferArg::from_raw_parts(h.clone(), len);
            macro_rules! launch {
                ($f:ty) => {
                    layer_kernel::launch_unchecked::<$f>(
                        client,
                        cc,
                        cd,
                        arg(&x_h, x.len()),
                        arg(&dy_h, dy.len()),
                        arg(&io_h, io_arena.len()),
                        arg(&work_h, work.len()),
                        arg(&meta_h, meta.len()),
                        arg(&sc, scalars.len()),
                        k.clone(),
                        round,
                    )
                };
            }
            match ty {
                Dtype::F32 => launch!(f32),
                Dtype::F16 => launch!(half::f16),
                Dtype::BF16 => launch!(half::bf16),
            }
        }
    }
    let read = |h: cubecl::server::Handle| client.read_one(h).map_err(|e| Error(format!("reading back: {e:?}")));
    let (io_out, work_out) = (held.decode(&read(io_h)?), f32::from_bytes(&read(work_h)?).to_vec());
    Ok(plan
        .outputs
        .iter()
        .map(|&(target, t)| {
            let (off, len) = (lay.offsets[t], lay.len(plan, t));
            let arena = if plan.tensors[t].2 == Buf::Io { &io_out } else { &work_out };
            (target, arena[off..off + len].to_vec())
        })
        .collect())
}
