//! A layer program -> layer kernels. Every reduction is materialized: a phase per reduction,
//! a cube per reduced value (or, for short reductions, a unit) folding the values it covers;
//! the elementwise work feeding it is recomputed inside that fold rather than stored. A single
//! value folded from several axes takes two stages, so that many cubes share it. Outputs of
//! one shape share one elementwise phase. Phases over the same target elements share a kernel
//! (`fuse`): a layer norm's forward is one kernel. Shapes stay symbolic: extents arrive at run
//! time in the `meta` table, so a kernel serves every input shape and group count; only each
//! shape's kind per axis (broadcast, grouped, full) is fixed, to spare the kernels divisions.

use crate::compile::{binary, reduce, unary, Uniforms};
use crate::kernel::{layer_kernel, spreads, AxisKind, Buf, LOp, LPhase, LProgram, Pure, Reach, BLOCK, MAX_UNITS, PARAM_LANES};
use crate::dtype::with_type;
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
    /// The first stage of the column reduction into tensor `t` when it runs inside a row
    /// kernel ([`Across`]): per cube of that kernel, a partial value per column
    /// (`Fold::Registers`), or one per finer element (`Fold::Finer`).
    Blocked(u32),
}

impl Source {
    /// Whether the kernels compute it (no caller supplies it).
    pub fn computed(self) -> bool {
        matches!(self, Source::Node(_) | Source::Partial(_) | Source::Blocked(_))
    }

    /// Whether a layer's caller hands it over with every call: a parameter or a buffer, which
    /// [`layout`] places first in the work arena, side by side.
    pub fn handed(self) -> bool {
        matches!(self, Source::Param(_) | Source::Buffer(_))
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
    /// The kernels again, with a column reduction folded inside a row kernel, where the
    /// program has one that can: what runs for rows that fit ([`layout`] decides).
    pub across: Option<Across>,
    pub(crate) program: Program,
    pub(crate) uniforms: Uniforms,
}

impl Plan {
    /// Whether the rule's new parameter is written over the old one (see `in_place`): the
    /// parameter is then the only tensor in the `io` arena, at its start.
    pub fn in_place(&self) -> bool {
        self.outputs.iter().any(|&(target, t)| target == Target::P && self.tensors[t].0 == Source::Input)
    }
}

/// A plan's kernels with a column reduction's phases moved into a row kernel (a layer norm's
/// or an EvoNorm's parameter gradients computed where its input gradient is, so x and dy are
/// read once for both), then a kernel folding the partials they leave.
#[derive(Clone, Debug, PartialEq)]
pub struct Across {
    /// In launch order.
    pub kernels: Vec<LProgram>,
    /// Which of them is the row kernel.
    pub row: usize,
    pub how: Fold,
}

impl Across {
    /// The row kernel as launched, a cube per block of rows (or per row element): under
    /// `Fold::Registers`, each unit keeping partials for its positions of rows `positions` long.
    pub fn row_kernel(&self, positions: usize) -> LProgram {
        let unroll = if matches!(self.how, Fold::Registers { .. }) { positions.div_ceil(BLOCK).next_power_of_two() } else { 0 };
        LProgram { cooperative: true, values_per_cube: 1, unroll, ..self.kernels[self.row].clone() }
    }
}

/// How a row kernel folds column sums (`kernel::Reach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    /// `Reach::Across`: partials in the shape-table entry `shape`, the column sums' shape
    /// (`columns`: a row's positions) but full along `axis` (the rows), where at run time it
    /// is as long as the row kernel has cubes.
    Registers { shape: usize, axis: usize, columns: usize },
    /// `Reach::Finer`: partials of shape `finer` (per channel of a sample), each folding
    /// elements of shape `domain`.
    Finer { finer: usize, domain: usize },
}

/// The longest row an `across` phase keeps partials for: this many positions per unit (so
/// as many registers per column reduction).
pub const MAX_UNROLL: usize = 32;

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

/// Ops built for some roots, the roots' registers, and the nodes computed in the kernel's own
/// axis order.
type Built = (Vec<LOp>, Vec<usize>, Vec<u32>);

pub fn plan(entry: &Entry, p: &Program) -> Result<Plan, Error> {
    plan_stacked(entry, p, 0)
}

/// As [`plan`], for a program whose first `lead` axes index the tensors of a stack: what is
/// one value of each tensor counts as a single value (`single`).
pub(crate) fn plan_stacked(entry: &Entry, p: &Program, lead: usize) -> Result<Plan, Error> {
    let unsupported = |what: &str| Error(format!("`{}`: {what} is not supported in a layer by the CubeCL backend", entry.name));
    let mut uniforms = Uniforms::new(p, uniform::is_shape_query);
    // (`Step` is uniform too: `Uniforms` knows it.)
    let n = p.nodes.len();
    let materialized: Vec<bool> = (0..n).map(|i| !uniforms.flags[i] && matches!(p.nodes[i].op, Op::Reduce(..))).collect();
    let mut t = Tables { shapes: Vec::new(), perms: Vec::new(), tensors: Vec::new() };
    let rank = entry.axes.len();
    let mut kernels = Vec::new();

    // The ops computing `roots` from tensors and scalars; returns their registers, and which
    // nodes they computed in the kernel's own axis order. A node is computed once per axis
    // order it is needed in: under `swap(a, o, j)`, `a`'s loads read their tensors with `o`
    // and `j` exchanged (a view, no copy). Nodes `stored` by an earlier kernel are loaded.
    let identity: Vec<usize> = (0..rank).collect();
    let build = |roots: &[u32], stored: &[bool], t: &mut Tables, uniforms: &mut Uniforms| -> Result<Built, Error> {
        let loaded = |i: usize| materialized[i] || stored[i];
        let leaf = |i: usize, uniforms: &Uniforms| uniforms.flags[i] || loaded(i);
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
                    LOp::Pure(Pure::Scalar(uniforms.export(i as u32)))
                } else if loaded(i) {
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
                        Op::Unary(u, a) => LOp::Pure(Pure::Unary(unary(*u), at(a, perm))),
                        Op::Binary(b, x, y) => LOp::Pure(Pure::Binary(binary(*b), at(x, perm), at(y, perm))),
                        Op::Select(c, x, y) => LOp::Pure(Pure::Select(at(c, perm), at(x, perm), at(y, perm))),
                        other => return Err(unsupported(&format!("{other:?}"))),
                    }
                };
                ops.push(op);
                reg.insert((i as u32, perm.clone()), ops.len() - 1);
            }
        }
        let own = (0..n as u32).filter(|&i| !leaf(i as usize, uniforms) && needed[i as usize].contains(&identity)).collect();
        Ok((ops, roots.iter().map(|r| reg[&(*r, order(*r, &identity, uniforms))]).collect(), own))
    };
    // A stacked rule's new states, each stored by the first reduction phase that computes it
    // over its elements (that phase reads the old state and the gradient anyway), and loaded
    // by the update, which then need not read them again: LAMB's `compile_for`, for rules
    // through layer kernels. (f32 states only: the work arena's; a narrower state dtype is
    // rounded after the step, from the same values.)
    let new_states: Vec<u32> = if lead > 0 { p.outputs.iter().filter(|o| matches!(o.target, Target::State(_)) && !uniforms.flags[o.node as usize] && !materialized[o.node as usize]).map(|o| o.node).collect() } else { Vec::new() };
    // Per node stored so, the first kernel's target and domain (shape-table entries) of the
    // reduction storing it.
    let mut host: Vec<Option<(usize, usize)>> = vec![None; n];

    for (i, node) in p.nodes.iter().enumerate() {
        if !materialized[i] {
            continue;
        }
        let Op::Reduce(r, a) = &node.op else { unreachable!() };
        let arg = &p.nodes[*a as usize].shape;
        let mid = two_stage(arg, &node.shape, lead);
        let domain = t.shape(arg);
        let target = t.shape(&node.shape);
        let first = mid.as_ref().map_or(target, |m| t.shape(m));
        // A reduction that may share the storing one's walk (`fuse`, `merge`: same kernel
        // target, same domain) computes the state again, for nothing (the ops are shared);
        // any other loads it.
        let loaded: Vec<bool> = host.iter().map(|h| h.is_some_and(|h| h != (first, domain))).collect();
        let (mut ops, mut regs, own) = build(&[*a], &loaded, &mut t, &mut uniforms)?;
        let hosted: Vec<u32> = new_states.iter().copied().filter(|&s| host[s as usize].is_none() && own.contains(&s) && p.nodes[s as usize].shape == *arg).collect();
        let mut stores = Vec::new();
        if !hosted.is_empty() {
            let roots: Vec<u32> = std::iter::once(*a).chain(hosted.iter().copied()).collect();
            (ops, regs, _) = build(&roots, &loaded, &mut t, &mut uniforms)?;
            for (k, &s) in hosted.iter().enumerate() {
                stores.push((t.tensor(Source::Node(s), arg, Buf::Work), regs[k + 1], false));
                host[s as usize] = Some((first, domain));
            }
        }
        let out = t.tensor(Source::Node(i as u32), &node.shape, Buf::Work);
        let reduction = |domain, ops, value, out, target, stores| LProgram {
            rank,
            shapes: 0,
            kinds: Vec::new(),
            target,
            phases: vec![LPhase { domain, ops, reduces: vec![(reduce(*r), value, out)], stores, reach: Reach::Element }],
            cooperative: true,
            values_per_cube: 1,
            values_per_unit: 1,
            unroll: 0,
            kept: Vec::new(),
            keep: 0,
            units: BLOCK,
            vector: 1,
            vector_params: false,
            planes: false,
        };
        match mid {
            // Several axes folded: first a partial value per index of one of them, then a
            // fold of those.
            Some(mid) => {
                let part = t.tensor(Source::Partial(i as u32), &mid, Buf::Work);
                kernels.push(reduction(domain, ops, regs[0], part, first, stores));
                let load = t.load(Source::Partial(i as u32), &mid, &identity);
                kernels.push(reduction(first, vec![load], 0, out, target, Vec::new()));
            }
            None => kernels.push(reduction(domain, ops, regs[0], out, target, stores)),
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
        if !materialized && host[o.node as usize].is_none() {
            match by_shape.iter_mut().find(|(s, _)| *s == node.shape) {
                Some((_, v)) if v.contains(&o.node) => {}
                Some((_, v)) => v.push(o.node),
                None => by_shape.push((node.shape.clone(), vec![o.node])),
            }
        }
    }
    let stored: Vec<bool> = host.iter().map(Option::is_some).collect();
    for (shape, nodes) in by_shape {
        // Materialized nodes are loaded, not recomputed: treat the outputs as roots only.
        let (ops, regs, _) = build(&nodes, &stored, &mut t, &mut uniforms)?;
        let target = t.shape(&shape);
        let stores = nodes
            .iter()
            .zip(regs)
            .map(|(&nd, r)| {
                let tensor = t.tensors.iter().position(|(x, ..)| *x == Source::Node(nd)).expect("outputs have tensors");
                (tensor, r, t.tensors[tensor].2 == Buf::Io)
            })
            .collect();
        let phase = LPhase { domain: target, ops, reduces: Vec::new(), stores, reach: Reach::Element };
        kernels.push(LProgram { rank, shapes: 0, kinds: Vec::new(), target, phases: vec![phase], cooperative: false, values_per_cube: 1, values_per_unit: 1, unroll: 0, kept: Vec::new(), keep: 0, units: BLOCK, vector: 1, vector_params: false, planes: false });
    }
    let mut kernels = fuse(kernels, &t.shapes, &t.tensors, lead);
    if lead > 0 {
        in_place(&mut kernels, &mut t, &mut outputs);
    }
    let mut across = if lead == 0 { across(&kernels, &mut t) } else { None };
    kernels.iter_mut().chain(across.iter_mut().flat_map(|a| a.kernels.iter_mut())).for_each(merge);
    let kinds: Vec<Vec<AxisKind>> = t.shapes.iter().zip(&t.perms).map(|(s, perm)| axis_kinds(s, perm)).collect();
    for k in kernels.iter_mut().chain(across.iter_mut().flat_map(|a| a.kernels.iter_mut())) {
        k.shapes = t.shapes.len();
        k.kinds = kinds.clone();
    }
    Ok(Plan { kernels, shapes: t.shapes, perms: t.perms, tensors: t.tensors, outputs, across, program: p.clone(), uniforms })
}

/// A rule's new parameter written over the old one rather than into the work arena (from
/// which a caller would copy it back: a read and a write of every parameter more per step),
/// where that is safe: the kernel storing it is the last to read the parameter, and reads it
/// only in phases over the parameter's own elements (elementwise, or the last phase of a
/// Muon's matrix kernel), each cube or unit its own elements, in their own places, before it
/// stores them. The parameter then lives in the `io` arena, alone there, so the CUDA path
/// passes the parameter itself as that arena.
fn in_place(kernels: &mut [LProgram], t: &mut Tables, outputs: &mut [(Target, usize)]) {
    let Some(input) = t.tensors.iter().position(|&(src, ..)| src == Source::Input) else { return };
    let Some(out) = outputs.iter().position(|&(target, _)| target == Target::P) else { return };
    let p_new = outputs[out].1;
    if !matches!(t.tensors[p_new], (Source::Node(_), _, Buf::Work)) || t.tensors.iter().any(|&(.., buf)| buf == Buf::Io) {
        return;
    }
    let loads = |k: &LProgram, x: usize| k.phases.iter().flat_map(|ph| &ph.ops).filter(|op| matches!(op, LOp::Load(t, ..) if *t == x)).count();
    let stores = |k: &LProgram| k.phases.iter().any(|ph| ph.stores.iter().any(|&(x, ..)| x == p_new));
    let Some(last) = kernels.iter().position(stores) else { return };
    let later = &kernels[last + 1..];
    if kernels.iter().filter(|k| stores(k)).count() != 1 || later.iter().any(|k| loads(k, input) + loads(k, p_new) > 0) {
        return;
    }
    // Read over the parameter's own shape only, in its own axis order.
    let k = &kernels[last];
    let full = t.tensors[input].1;
    let own = |s: usize| t.shapes[s] == t.shapes[full] && t.perms[s].iter().enumerate().all(|(a, &b)| a == b);
    let reads_own = |ph: &LPhase| ph.ops.iter().all(|op| !matches!(op, LOp::Load(x, s, _) if *x == input && !(own(*s) && own(ph.domain))));
    if !own(k.target) || !k.phases.iter().all(reads_own) || k.kept.iter().any(|&(x, ..)| x == input) {
        return;
    }
    t.tensors[input].2 = Buf::Io;
    for k in kernels.iter_mut() {
        for ph in &mut k.phases {
            for op in &mut ph.ops {
                if let LOp::Load(x, _, buf) = op {
                    if *x == input {
                        *buf = Buf::Io;
                    }
                }
            }
            for st in &mut ph.stores {
                if st.0 == p_new {
                    *st = (input, st.1, true);
                }
            }
        }
    }
    outputs[out].1 = input;
    // The work arena keeps one value, not a parameter's worth, for the output's old tensor.
    let one = Shape(vec![Extent::One; t.shapes[full].0.len()]);
    t.tensors[p_new].1 = t.shape(&one);
}

/// The first column reduction whose phases can run inside a row kernel: its reads ready when
/// the row kernel runs (those the row kernel computes become registers), its results read by
/// nothing from the column kernel to the row kernel, and its shapes of one of two forms:
/// - `Fold::Registers`: the row kernel's target spans one full axis (rows), along which the
///   column kernel's domains are full and its target broadcast (and no axis before it spans),
///   and which the column target matches along every other axis — so a position in a row is a
///   column (a layer norm);
/// - `Fold::Finer`: the column sums fold, per row element, over a finer shape — the domain
///   along the row target's axes, the column target's along the rest — whose elements are
///   runs of consecutive domain elements of a row element (an EvoNorm's sums per channel of a
///   sample, inside a group of channels).
fn across(kernels: &[LProgram], t: &mut Tables) -> Option<Across> {
    let made_by = |tensor: usize| kernels.iter().position(|k| outs(k).contains(&tensor));
    let loads = |k: &LProgram| -> Vec<(usize, usize)> { k.phases.iter().flat_map(|p| &p.ops).filter_map(|op| if let LOp::Load(u, s, _) = *op { Some((u, s)) } else { None }).collect() };
    let in_order = |s: usize| t.perms[s].iter().enumerate().all(|(a, &k)| a == k);
    for (c, kc) in kernels.iter().enumerate() {
        if kc.phases.is_empty() || kc.phases.iter().any(|p| p.reduces.is_empty() || !p.stores.is_empty() || p.ops.iter().any(|op| matches!(op, LOp::Result(_)))) {
            continue;
        }
        let t2 = t.shapes[kc.target].clone();
        for (r, kr) in kernels.iter().enumerate() {
            if r == c || !kr.cooperative || !in_order(kc.target) || !in_order(kr.target) || kc.phases.iter().any(|p| !in_order(p.domain)) {
                continue;
            }
            let ready = loads(kc).iter().all(|&(u, s)| s == t.tensors[u].1 && made_by(u).is_none_or(|g| g <= r));
            let unread = kernels[c + 1..=r.max(c)].iter().all(|k| loads(k).iter().all(|(u, _)| !outs(kc).contains(u)));
            if !(ready && unread) {
                continue;
            }
            let t1 = t.shapes[kr.target].clone();
            let rank = t1.0.len();
            let domains: Vec<&Shape> = kc.phases.iter().map(|p| &t.shapes[p.domain]).collect();
            let spans: Vec<usize> = (0..rank).filter(|&a| t1.0[a] != Extent::One).collect();
            // The partials' shape and reach, in one of the two forms.
            let (partial, reach, how) = match spans[..] {
                [a0] if t1.0[a0] == Extent::Full
                    && t2.0[..=a0].iter().all(|e| *e == Extent::One)
                    && domains.iter().all(|d| d.0[a0] == Extent::Full && (0..rank).all(|a| a == a0 || d.0[a] == t2.0[a])) =>
                {
                    let mut blocked = t2.clone();
                    blocked.0[a0] = Extent::Full;
                    t.shapes.push(blocked);
                    t.perms.push((0..rank).collect());
                    let shape = t.shapes.len() - 1;
                    (shape, Reach::Across, Fold::Registers { shape, axis: a0, columns: kc.target })
                }
                _ => {
                    let d = domains[0].clone();
                    let finer = Shape((0..rank).map(|a| if t1.0[a] != Extent::One { d.0[a] } else { t2.0[a] }).collect());
                    // Axes a finer element spans inside a row element, then those it folds.
                    let outer: Vec<usize> = (0..rank).filter(|&a| finer.0[a] != Extent::One && spreads(kind(&finer.0[a]), kind(&t1.0[a]))).collect();
                    let inner: Vec<usize> = (0..rank).filter(|&a| finer.0[a] == Extent::One && d.0[a] != Extent::One).collect();
                    let fits = domains.iter().all(|x| **x == d)
                        && refines(&d, &finer)
                        && refines(&finer, &t1)
                        && refines(&finer, &t2)
                        && !inner.is_empty()
                        && outer.iter().all(|&a| finer.0[a] == Extent::Full && inner.iter().all(|&b| a < b));
                    if !fits {
                        continue;
                    }
                    let shape = t.shape(&finer);
                    (shape, Reach::Finer(shape), Fold::Finer { finer: shape, domain: kc.phases[0].domain })
                }
            };
            let mut kernels = kernels.to_vec();
            let kc = kernels.remove(c);
            let row = if c < r { r - 1 } else { r };
            // The row kernel's reductions, in the order it keeps them in registers.
            let made = outs(&kernels[row]);
            let mut fold = LProgram { phases: Vec::new(), cooperative: true, values_per_cube: 1, unroll: 0, kept: Vec::new(), ..kc.clone() };
            for mut p in kc.phases {
                for op in &mut p.ops {
                    if let LOp::Load(u, ..) = *op {
                        if let Some(i) = made.iter().position(|&m| m == u) {
                            *op = LOp::Result(i);
                        }
                    }
                }
                for (f, _, out) in &mut p.reduces {
                    t.tensors.push((Source::Blocked(*out as u32), partial, Buf::Work));
                    let partials = t.tensors.len() - 1;
                    fold.phases.push(LPhase { domain: partial, ops: vec![LOp::Load(partials, partial, Buf::Work)], reduces: vec![(*f, 0, *out)], stores: Vec::new(), reach: Reach::Element });
                    *out = partials;
                }
                p.reach = reach;
                kernels[row].phases.push(p);
            }
            kernels.insert(row + 1, fold);
            return Some(Across { kernels, row, how });
        }
    }
    None
}

/// The tensors `k`'s reductions write, in order.
fn outs(k: &LProgram) -> Vec<usize> {
    k.phases.iter().flat_map(|p| p.reduces.iter().map(|r| r.2)).collect()
}

/// Fewer passes over a row: each phase of a kernel joins the one before where both walk the
/// same domain with the same reach and it needs nothing the other computes (none of its
/// reductions, none of its stores), its ops appended (those already there shared), so their
/// loop runs once — a DyT's row kernel folds alpha's gradient as it writes the input
/// gradient, an EvoNorm's sums per channel are three accumulators of one walk.
fn merge(k: &mut LProgram) {
    let mut phases: Vec<LPhase> = Vec::new();
    // Reductions of earlier phases kept in registers (`LOp::Result` numbers them).
    let (mut kept, mut before) = (0, 0);
    for q in std::mem::take(&mut k.phases) {
        let element = |p: &LPhase| if p.reach == Reach::Element { p.reduces.len() } else { 0 };
        let joins = phases.last().is_some_and(|p| {
            let written: Vec<usize> = p.reduces.iter().map(|r| r.2).chain(p.stores.iter().map(|s| s.0)).collect();
            p.domain == q.domain
                && p.reach == q.reach
                && q.ops.iter().all(|op| match *op {
                    LOp::Result(i) => i < before,
                    LOp::Load(t, ..) => !written.contains(&t),
                    _ => true,
                })
        });
        if !joins {
            before = kept;
            kept += element(&q);
            phases.push(q);
            continue;
        }
        kept += element(&q);
        let p = phases.last_mut().expect("joins an earlier phase");
        let mut at = Vec::with_capacity(q.ops.len());
        for op in q.ops {
            let op = match op {
                LOp::Pure(p) => LOp::Pure(p.map(|a| at[a])),
                other => other,
            };
            at.push(p.ops.iter().position(|o| *o == op).unwrap_or_else(|| {
                p.ops.push(op);
                p.ops.len() - 1
            }));
        }
        p.reduces.extend(q.reduces.into_iter().map(|(f, v, t)| (f, at[v], t)));
        p.stores.extend(q.stores.into_iter().map(|(t, v, io)| (t, at[v], io)));
    }
    k.phases = phases;
}

fn kind(e: &Extent) -> AxisKind {
    match e {
        Extent::One => AxisKind::One,
        Extent::Grouped(_) => AxisKind::Grouped,
        Extent::Full => AxisKind::Full,
    }
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
    (single(out, lead) && spans >= 2).then(|| Shape(out.0.iter().enumerate().map(|(a, e)| if a == keep { Extent::Full } else { *e }).collect()))
}

/// Per kernel axis, the kind of the tensor axis a view in the order `perm` reads there (the
/// order of its entries in `meta`, see [`layout`]).
fn axis_kinds(s: &Shape, perm: &[usize]) -> Vec<AxisKind> {
    let mut kinds = vec![AxisKind::One; perm.len()];
    for (a, &k) in perm.iter().enumerate() {
        kinds[k] = kind(&s.0[a]);
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
    // Per fused kernel, the tensors its reductions write, in phase order; and those its phases
    // store, with the domain they store them over.
    let mut made: Vec<Vec<usize>> = Vec::new();
    let mut stored: Vec<Vec<(usize, usize)>> = Vec::new();
    for k in kernels {
        let target = k.target;
        for mut phase in k.phases {
            let reads: Vec<usize> = phase.ops.iter().filter_map(|op| if let LOp::Load(t, ..) = op { Some(*t) } else { None }).collect();
            let from = |g: usize| reads.iter().filter(|t| made[g].contains(t)).count();
            // It may not run before a kernel that computes what it reads, nor inside one whose
            // results it reads transposed: those are other cubes' values.
            let transposed = |t: usize| phase.ops.iter().any(|op| matches!(*op, LOp::Load(u, s, _) if u == t && s != tensors[t].1));
            // A stored value is read in a later kernel, or in its own kernel by a phase walking
            // the same domain, whose units then read what they stored themselves.
            let own_walk = |t: usize, d: usize| d == phase.domain && phase.ops.iter().all(|op| !matches!(*op, LOp::Load(u, s, _) if u == t && s != phase.domain));
            let after = reads
                .iter()
                .filter_map(|&t| made.iter().position(|m| m.contains(&t)).map(|g| g + usize::from(transposed(t))))
                .chain(reads.iter().filter_map(|&t| stored.iter().enumerate().find_map(|(g, st)| st.iter().find(|&&(u, _)| u == t).map(|&(_, d)| g + usize::from(!own_walk(t, d))))))
                .max()
                .unwrap_or(0);
            // (Elementwise work never joins a kernel of a single value: that is one cube.)
            let fits = |g: &LProgram| match phase.reduces.first() {
                Some(_) => g.target == target,
                None => refines(&shapes[phase.domain], &shapes[g.target]) && (!single(&shapes[g.target], lead) || single(&shapes[phase.domain], lead)),
            };
            let join = (after..out.len()).filter(|&g| fits(&out[g])).max_by_key(|&g| (from(g), g));
            let g = match join {
                Some(g) => g,
                None => {
                    out.push(LProgram { rank: k.rank, shapes: 0, kinds: Vec::new(), target, phases: Vec::new(), cooperative: false, values_per_cube: 1, values_per_unit: 1, unroll: 0, kept: Vec::new(), keep: 0, units: BLOCK, vector: 1, vector_params: false, planes: false });
                    made.push(Vec::new());
                    stored.push(Vec::new());
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
            made[g].extend(phase.reduces.iter().map(|r| r.2));
            stored[g].extend(phase.stores.iter().map(|st| (st.0, phase.domain)));
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
    /// Where a plan can fold its column sums inside its row kernel ([`Across`]), each cube of
    /// that kernel takes at least this many rows (the fewer, the more partials to fold after);
    /// 0: the column sums read the input again in a kernel of their own.
    pub rows_per_cube: usize,
    /// At most this many cubes for such a row kernel, each taking more rows if need be (0: no
    /// limit): on a GPU, as many as it runs at once, so that they end together.
    pub max_cubes: usize,
    /// A cube's loads read again by later phases stay in registers where each value folds at
    /// least this many elements (0: never), see [`keeping`]. Each length of row (in a cube of
    /// `BLOCK` units rounded up to a power of two positions per unit) is then a kernel of its
    /// own, unrolled; shorter rows are re-read from a GPU's L1 cache anyway.
    pub keep_from: usize,
    /// The largest cube (in units, `BLOCK` to `MAX_UNITS`) a kernel may take to keep a row
    /// too long for `BLOCK` units' registers; longer rows are read again.
    pub max_units: usize,
    /// The smallest cube (in units, a power of two from [`MIN_UNITS`] to `BLOCK`) a
    /// cooperative kernel takes for values shorter than `BLOCK` elements (see [`launched`]);
    /// `BLOCK`: a cube of `BLOCK` units whatever the length.
    pub min_units: usize,
    /// The target elements each unit of an elementwise kernel takes (see
    /// `LProgram::values_per_unit`); a power of two up to [`MAX_UNROLL`].
    pub values_per_unit: usize,
    /// The bytes a kernel keeping rows (or an elementwise one) reads or writes along the last
    /// axis as one access where it may (`vectorized`): 16, a GPU's widest load; 0 or a value's
    /// size: one at a time. A power of two up to [`MAX_VECTOR_BYTES`].
    pub vector_bytes: usize,
    /// Such a kernel reads its f32 parameters along the row four values an access, not a value
    /// per lane (`LProgram::vector_params`). CUDA only: WGSL cannot view a buffer as vectors.
    pub vector_params: bool,
    /// A cooperative kernel's reductions fold within each warp by shuffles
    /// (`LProgram::planes`). CUDA only: `run` on CubeCL's runtimes clears it.
    pub planes: bool,
}

impl Default for Launch {
    fn default() -> Self {
        Launch { cooperative_min: COOPERATIVE_MIN, columns: 8, rows_per_cube: 16, max_cubes: 0, keep_from: KEEP_FROM, max_units: MAX_UNITS, min_units: MIN_UNITS, values_per_unit: 4, vector_bytes: MAX_VECTOR_BYTES, vector_params: true, planes: true }
    }
}

/// A warp: the fewest units a cube takes ([`Launch::min_units`]).
pub const MIN_UNITS: usize = 32;

/// A GPU's widest load (`ld.global.v4.u32`), the most [`Launch::vector_bytes`] may ask.
pub const MAX_VECTOR_BYTES: usize = 16;

/// The widest vector WGSL has (`vec4`): what CubeCL's own runtimes read at once.
pub const WGSL_LANES: usize = 4;

/// The default [`Launch::keep_from`].
pub const KEEP_FROM: usize = 1024;

/// Registers per unit a kernel may give its kept loads and its column partials together.
pub const MAX_KEPT: usize = 64;

/// `k` (a launched variant) keeping the loads that several of its phases read — a layer norm's
/// x in its mean, variance and output phases, x and dy in its backward — in registers between
/// those phases, so each is read from memory once per element instead of once per phase.
/// `positions(d)`: the elements of shape `d` per target element at this call's shapes. The
/// phases over the shape most of them walk keep, the input and output gradient first, then the
/// loads read most often, as many as fit in [`MAX_KEPT`] registers beside the column partials
/// (fewer in a cube of more than `BLOCK` units: [`kept_room`]), where each unit walks at most
/// [`MAX_UNROLL`] positions. Unchanged where nothing qualifies.
pub fn keeping(k: LProgram, positions: &dyn Fn(usize) -> usize, launch: &Launch) -> LProgram {
    if launch.keep_from == 0 || !k.cooperative {
        return k;
    }
    let walking = |d: usize| k.phases.iter().filter(move |p| p.domain == d && p.strided());
    let Some(domain) = k.phases.iter().map(|p| p.domain).filter(|&d| d != k.target).max_by_key(|&d| walking(d).count()) else { return k };
    let n = positions(domain);
    if n < launch.keep_from {
        return k;
    }
    // A row kernel folding column sums walks as many positions as its partials cover, with
    // `BLOCK` units; another takes the smallest cube whose units each walk at most
    // `MAX_UNROLL` positions (an EvoNorm's group of 8 channels of 56x56: 1024 units), a power
    // of two of them in a cube of `BLOCK`, in a larger one (where the register file leaves
    // each unit less) no more than it needs.
    let walks = |units: usize| {
        let w = n.div_ceil(units / k.values_per_cube);
        if units == BLOCK { w.next_power_of_two() } else { w }
    };
    let (units, unroll) = match k.across() {
        0 => match [BLOCK, 2 * BLOCK, MAX_UNITS].into_iter().filter(|&u| u <= launch.max_units).find(|&u| walks(u) <= MAX_UNROLL.min(kept_room(u))) {
            Some(u) => (u, walks(u)),
            None => return k,
        },
        _ => (k.units, k.unroll),
    };
    if n > unroll * (units / k.values_per_cube) {
        return k;
    }
    let walking: Vec<&LPhase> = walking(domain).collect();
    let written = |t: usize| k.phases.iter().any(|p| p.stores.iter().any(|s| s.0 == t) || p.reduces.iter().any(|r| r.2 == t));
    let mut loads: Vec<((usize, usize, Buf), usize)> = Vec::new();
    for op in walking.iter().flat_map(|p| &p.ops) {
        if let &LOp::Load(t, s, buf) = op {
            if !loads.iter().any(|(l, _)| *l == (t, s, buf)) {
                loads.push(((t, s, buf), walking.iter().filter(|p| p.ops.contains(op)).count()));
            }
        }
    }
    loads.retain(|&((t, ..), n)| n >= 2 && !written(t));
    loads.sort_by_key(|&((.., buf), n)| (!matches!(buf, Buf::Input | Buf::GradOutput), std::cmp::Reverse(n)));
    let room = (kept_room(units) / unroll).saturating_sub(k.across());
    let kept: Vec<_> = loads.into_iter().take(room).map(|(l, _)| l).collect();
    if kept.is_empty() {
        return k;
    }
    LProgram { unroll, kept, keep: domain, units, ..k }
}

/// Registers per unit a cube of `units` may give its kept loads and column partials: at most
/// [`MAX_KEPT`], and in a cube too large for that, what the register file leaves each unit
/// less [`RESERVED`] for the kernel's own work.
fn kept_room(units: usize) -> usize {
    MAX_KEPT.min((REGISTERS_PER_CUBE / units).saturating_sub(RESERVED))
}

/// The registers a cube's units share (on NVIDIA GPUs since Kepler, Hopper included).
pub const REGISTERS_PER_CUBE: usize = 65_536;

/// Registers per unit a keeping kernel leaves to everything but its kept loads (indices,
/// addresses, reductions); the CUDA tests check what ptxas makes of it.
pub const RESERVED: usize = 32;

impl Launch {
    /// The default for `device`: a CPU adapter (lavapipe) keeps nothing in registers — its
    /// caches serve a row read again, and it compiles each unrolled row kernel slowly.
    pub fn for_device(device: &cubecl::Device) -> Self {
        let cpu = match device {
            cubecl::Device::Wgpu(d) => matches!(d.kind, cubecl::device::WgpuDeviceKind::Cpu),
            cubecl::Device::Cpu(_) => true,
            _ => false,
        };
        Launch { keep_from: if cpu { 0 } else { KEEP_FROM }, ..Launch::default() }
    }

    /// Every reduction in one unit per value, each in a kernel of its own.
    pub fn per_unit() -> Self {
        Launch { cooperative_min: usize::MAX, rows_per_cube: 0, ..Launch::default() }
    }

    /// Refuse what the kernels cannot run.
    pub fn check(&self) -> Result<(), Error> {
        if !(self.columns.is_power_of_two() && self.columns <= BLOCK) {
            return Err(Error(format!("columns per cube must be a power of two up to {BLOCK}, not {}", self.columns)));
        }
        if !(self.max_units.is_power_of_two() && (BLOCK..=MAX_UNITS).contains(&self.max_units)) {
            return Err(Error(format!("a cube has a power of two units from {BLOCK} to {MAX_UNITS}, not {}", self.max_units)));
        }
        if !(self.min_units.is_power_of_two() && (MIN_UNITS..=BLOCK).contains(&self.min_units)) {
            return Err(Error(format!("the smallest cube has a power of two units from {MIN_UNITS} to {BLOCK}, not {}", self.min_units)));
        }
        if !(self.values_per_unit.is_power_of_two() && self.values_per_unit <= MAX_UNROLL) {
            return Err(Error(format!("values per unit must be a power of two up to {MAX_UNROLL}, not {}", self.values_per_unit)));
        }
        if !(self.vector_bytes == 0 || (self.vector_bytes.is_power_of_two() && self.vector_bytes <= MAX_VECTOR_BYTES)) {
            return Err(Error(format!("bytes per access must be 0 or a power of two up to {MAX_VECTOR_BYTES}, not {}", self.vector_bytes)));
        }
        Ok(())
    }
}

/// The kernel to launch when its longest phase covers `per_value` elements per target element
/// and its target is `last` long along the last axis: cooperative from `cooperative_min`
/// elements on, taking `columns` values per cube where they are neighbours in memory (the
/// target full along the last axis) and there are at least that many; an elementwise kernel
/// giving each unit `values_per_unit` target elements. A cooperative kernel taking a value per
/// cube, each shorter than `BLOCK` (rows of 64 to 255: an attention head's norm, the products of
/// Muon's 64-row matrices), takes a cube of about a unit per two elements, at least
/// `min_units`: a cube of `BLOCK` would leave most of its units idle, and hold a GPU to a few
/// such values at a time.
pub fn launched(k: &LProgram, per_value: usize, last: usize, launch: &Launch) -> LProgram {
    let mut k = k.clone();
    k.cooperative &= per_value >= launch.cooperative_min;
    let neighbours = k.kinds.get(k.target).and_then(|a| a.last()) == Some(&AxisKind::Full);
    k.values_per_cube = if k.cooperative && neighbours && last >= launch.columns { launch.columns } else { 1 };
    if k.cooperative && k.values_per_cube == 1 && k.units == BLOCK && k.across() == 0 && per_value < BLOCK {
        k.units = per_value.div_ceil(2).next_power_of_two().clamp(launch.min_units, BLOCK);
    }
    k.planes = launch.planes && k.cooperative;
    let elementwise = !k.cooperative && k.phases.iter().all(|p| p.reduces.is_empty() && p.domain == k.target);
    k.values_per_unit = if elementwise { launch.values_per_unit } else { 1 };
    k
}

/// `k` (a launched variant, bound to the shape table `meta`) reading and writing `lanes`
/// neighbouring positions along the last axis as one access, where that reads the same values;
/// else with fewer lanes (down to two), else `k` itself. Two kinds of kernel qualify:
///
/// - one keeping rows (`keeping`), `x`, `dy` and `io` read only by its keeping phases' kept
///   loads and written only by their stores, its rows whole along the last axis and a whole
///   number of vectors; its units' positions become vectors (`unroll` counts them);
/// - an elementwise one giving each unit several values (`launched`), its target full along the
///   last axis, a whole number of vectors long there: each unit then takes as many vectors
///   (`unroll`), their loads of `x`, `dy` and `io` kept for the phases' lanes (`kept`, over
///   the target).
///
/// Every tensor read or written a vector at a time lies along the last axis, its offset and
/// strides multiples of the vector; a kept f32 parameter lies along the row or is broadcast
/// along it. With `params` (CUDA), the f32 loads along the row that the lanes make are read
/// [`PARAM_LANES`] values an access where each lies at whole vectors of them
/// (`LProgram::vector_params`); other loads of `work` are read per lane.
pub fn vectorized(k: &LProgram, meta: &[u32], lanes: usize, params: bool) -> LProgram {
    let mut lanes = lanes;
    while lanes > 1 {
        if let Some(v) = vectors_of(k, meta, lanes, params) {
            return v;
        }
        lanes /= 2;
    }
    k.clone()
}

/// [`vectorized`] with `lanes` lanes exactly, if `k` qualifies; its f32 loads along the row
/// [`PARAM_LANES`] an access where `params` allows and every one lies at whole vectors of them.
fn vectors_of(k: &LProgram, meta: &[u32], lanes: usize, params: bool) -> Option<LProgram> {
    let (rank, last) = (k.rank, k.rank.checked_sub(1)?);
    let shape = |s: usize, part: usize| &meta[3 * rank * s + part * rank..3 * rank * s + (part + 1) * rank];
    let size = |s: usize| shape(s, 0).iter().map(|&e| e as usize).product::<usize>();
    let offset = |t: usize| meta[3 * rank * k.shapes + t] as usize;
    let elementwise = !k.cooperative && k.values_per_unit > 1 && k.phases.iter().all(|p| p.domain == k.target && p.reduces.is_empty());
    let v = if elementwise {
        // Every load of the storage type kept, a vector per unit's value.
        let mut kept: Vec<(usize, usize, Buf)> = Vec::new();
        for op in k.phases.iter().flat_map(|p| &p.ops) {
            if let &LOp::Load(t, s, buf) = op {
                if buf != Buf::Work && !kept.contains(&(t, s, buf)) {
                    kept.push((t, s, buf));
                }
            }
        }
        let along = k.kinds[k.target][last] == AxisKind::Full && (shape(k.target, 0)[last] as usize).is_multiple_of(lanes);
        (along && !kept.is_empty()).then(|| LProgram { vector: lanes, unroll: k.values_per_unit, kept, keep: k.target, ..k.clone() })?
    } else {
        let fits = k.cooperative && !k.kept.is_empty() && k.values_per_cube == 1 && k.kinds[k.keep][last] == AxisKind::Full && k.kinds[k.target][last] == AxisKind::One;
        if !(fits && (shape(k.keep, 0)[last] as usize).is_multiple_of(lanes)) {
            return None;
        }
        // A cube of `BLOCK` units keeps its power of two positions per unit, as vectors; a
        // larger one walks as many vectors as its row needs, where that is no more positions
        // than it keeps a value at a time (the cap of 64 registers per unit leaves nothing
        // spare: an EvoNorm's groups of 25088 in bf16 spilled at 32 positions where it keeps 25).
        let unroll = if k.units == BLOCK {
            k.unroll.is_multiple_of(lanes).then_some(k.unroll / lanes)?
        } else {
            let unroll = (size(k.keep) / size(k.target).max(1)).div_ceil(lanes * k.units);
            (unroll * lanes <= k.unroll).then_some(unroll)?
        };
        // Every phase over the kept shape keeps; every column partial is over it.
        let phases = k.phases.iter().enumerate().all(|(ph, p)| (p.domain != k.keep || k.keeps(ph)) && (p.reach != Reach::Across || p.domain == k.keep));
        phases.then(|| LProgram { vector: lanes, unroll, ..k.clone() })?
    };
    // What is read or written a vector at a time: (tensor, shape).
    let mut vectors: Vec<(usize, usize)> = v.kept.iter().filter(|&&(.., buf)| buf != Buf::Work).map(|&(t, s, _)| (t, s)).collect();
    let parameters = v.kept.iter().filter(|&&(.., buf)| buf == Buf::Work).all(|&(_, s, _)| match k.kinds[s][last] {
        AxisKind::One => true,
        AxisKind::Full => shape(s, 2)[last] == 1,
        AxisKind::Grouped => false,
    });
    let mut alone = true;
    for (ph, p) in v.phases.iter().enumerate() {
        for op in &p.ops {
            if let &LOp::Load(t, s, buf) = op {
                alone &= buf == Buf::Work || (v.keeps(ph) && v.kept.contains(&(t, s, buf)));
            }
        }
        for &(t, _, in_io) in &p.stores {
            alone &= !in_io || v.keeps(ph);
            if in_io {
                vectors.push((t, p.domain));
            }
        }
    }
    // Tensor `t` read through shape `s` lies along the last axis in whole vectors of `n`.
    let whole = |t: usize, s: usize, n: usize| {
        let strides = shape(s, 2);
        let aligned = strides.iter().enumerate().all(|(a, &d)| a == last || k.kinds[s][a] == AxisKind::One || (d as usize).is_multiple_of(n));
        k.kinds[s][last] == AxisKind::Full && strides[last] == 1 && aligned && offset(t).is_multiple_of(n)
    };
    let contiguous = vectors.iter().all(|&(t, s)| whole(t, s, lanes));
    // The f32 loads along the row the lanes would read four values an access, each at whole
    // vectors of them. (Not in a cube of more than `BLOCK` units: beside a row, its units have
    // no registers for a vector's parameters at once — a layer norm's forward at rows of 16384
    // in bf16, cubes of 512 units, spilled.)
    let wide = LProgram { vector_params: true, ..v };
    let vector_params = params && wide.units == BLOCK && lanes.is_multiple_of(PARAM_LANES) && wide.wide_loads().iter().all(|&(t, s, _)| whole(t, s, PARAM_LANES));
    (alone && parameters && contiguous).then_some(LProgram { vector_params, ..wide })
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
    /// In order: the kernel variant to launch and its grid (of cubes of its `units`).
    pub launches: Vec<(LProgram, (u32, u32, u32))>,
}

impl Layout {
    /// Elements of tensor `t` of the plan.
    pub fn len(&self, plan: &Plan, t: usize) -> usize {
        self.sizes[plan.tensors[t].1]
    }

    /// Its kernels, over values `bytes` wide in storage, reading and writing them
    /// `launch.vector_bytes` at a time where they may ([`vectorized`]).
    pub fn vectorize(&mut self, bytes: usize, launch: &Launch) {
        let lanes = launch.vector_bytes / bytes.max(1);
        for (k, _) in &mut self.launches {
            *k = vectorized(k, &self.meta, lanes, launch.vector_params);
        }
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

/// Whether the kernels' 32-bit shape tables and offsets index every tensor of `plan` bound to
/// `b` — its shapes (a product's fold among them: Muon's at 1024 x 4096 has 2^32 values) and
/// its arenas — as `layout` needs (which refuses a call where they do not; it also sizes a
/// layer's column partials per launch, and checks those).
pub fn indexable(plan: &Plan, b: &AxisBinding, hparams: &[f64]) -> Result<bool, Error> {
    let sizes: Vec<usize> = plan.shapes.iter().map(|s| bind::extents(s, b, hparams).map(|e| e.iter().product())).collect::<Result<_, _>>().map_err(Error)?;
    let (mut io, mut work) = (0usize, 0usize);
    for &(_, shape, buf) in &plan.tensors {
        match buf {
            Buf::Io => io += sizes[shape],
            Buf::Work => work += sizes[shape],
            Buf::Input | Buf::GradOutput => {}
        }
    }
    let fits = sizes.iter().chain([&io, &work]).all(|&n| n <= u32::MAX as usize);
    Ok(fits)
}

/// Bind a plan to shapes, its kernels launched as `launch` says.
pub fn layout(plan: &Plan, b: &AxisBinding, hparams: &[f64], step: f64, launch: &Launch) -> Result<Layout, Error> {
    launch.check()?;
    let too_big = || Error("a tensor of this layer call exceeds 2^32 values".into());
    if !indexable(plan, b, hparams)? {
        return Err(too_big());
    }
    let rank = b.extents.len();
    let mut meta: Vec<u32> = Vec::new();
    let mut sizes = Vec::new();
    let size = |s: usize| bind::extents(&plan.shapes[s], b, hparams).map(|e| e.iter().product::<usize>()).map_err(Error);
    // Whether the column sums fold inside the row kernel, and for `Fold::Registers` over how
    // many of its cubes and for rows of how many positions: rows short enough for
    // its registers, and long enough (or finer elements large enough) for a cube each.
    let mut across: Option<(&Across, Option<(usize, usize)>)> = None;
    if let Some(a) = plan.across.as_ref().filter(|_| launch.rows_per_cube > 0) {
        let rows = size(a.kernels[a.row].target)?;
        match a.how {
            Fold::Registers { columns, .. } => {
                let positions = size(columns)?;
                if rows > 0 && (launch.cooperative_min..=BLOCK * MAX_UNROLL).contains(&positions) {
                    let cubes = rows.div_ceil(launch.rows_per_cube).min(if launch.max_cubes > 0 { launch.max_cubes } else { usize::MAX });
                    across = Some((a, Some((cubes.min(65_535), positions))));
                }
            }
            Fold::Finer { finer, domain } => {
                let (f, d) = (size(finer)?, size(domain)?);
                if f > 0 && d / f >= launch.cooperative_min {
                    across = Some((a, None));
                }
            }
        }
    }
    for (k, (s, perm)) in plan.shapes.iter().zip(&plan.perms).enumerate() {
        let mut outer = bind::extents(s, b, hparams).map_err(Error)?;
        if let Some(Fold::Registers { shape, axis, .. }) = plan.across.as_ref().map(|a| a.how) {
            if shape == k {
                // The partials: a row per cube of the row kernel (one if unused).
                outer[axis] = across.and_then(|(_, r)| r).map_or(1, |(cubes, _)| cubes);
            }
        }
        let inner: Vec<usize> = outer.iter().zip(&b.extents).map(|(&o, &e)| e.checked_div(o).unwrap_or(0)).collect();
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
    let mut offsets = vec![0; plan.tensors.len()];
    // The work arena starts with what a caller hands over each call (parameters, buffers), side
    // by side in table order, so that one copy brings them all; then the rest.
    for handed in [true, false] {
        for (t, &(src, shape, buf)) in plan.tensors.iter().enumerate() {
            if Source::handed(src) != handed {
                continue;
            }
            let mut own = 0;
            let end = match buf {
                Buf::Io => &mut io_len,
                // (Each at whole vectors of `PARAM_LANES`, so rows may read them so.)
                Buf::Work => {
                    work_len = work_len.next_multiple_of(PARAM_LANES);
                    &mut work_len
                }
                Buf::Input | Buf::GradOutput => &mut own,
            };
            offsets[t] = *end;
            *end += sizes[shape];
        }
    }
    for &o in &offsets {
        meta.push(u32::try_from(o).map_err(|_| too_big())?);
    }
    u32::try_from(sizes.iter().fold(io_len.max(work_len), |a, &b| a.max(b))).map_err(|_| too_big())?;
    let query = |op: &Op| bind::query(op, b, hparams).expect("only shape queries") as f64;
    let scalars = plan.uniforms.values(&plan.program, hparams, step, query);
    let (p, flags) = (&plan.program, &plan.uniforms.flags);
    let needed = uniform::needed(p, flags, &uniform::values(p, flags, hparams, step, query), |i| p.nodes[i].op.args());
    let needed_tensor = |t: usize| {
        let t = match plan.tensors[t].0 {
            Source::Blocked(out) => out as usize,
            _ => t,
        };
        matches!(plan.tensors[t].0, Source::Node(i) | Source::Partial(i) if needed[i as usize])
    };
    let mut launches = Vec::new();
    let kernels = across.map_or(&plan.kernels, |(a, ..)| &a.kernels);
    for (i, k) in kernels.iter().enumerate() {
        let count = sizes[k.target];
        // A kernel whose every result only a branch not taken reads (known from this call's
        // hyper-parameters and shapes: Muon's wide or tall form) is not launched; what reads
        // it still runs the select, which drops the (zero) value.
        let used = |ph: &LPhase| !ph.stores.is_empty() || ph.reduces.iter().any(|&(_, _, t)| needed_tensor(t));
        if count == 0 || !k.phases.iter().any(used) {
            continue;
        }
        let per_value = k.phases.iter().map(|p| sizes[p.domain] / count).max().unwrap_or(1);
        let last = if rank == 0 { 1 } else { meta[3 * rank * k.target + rank - 1] as usize };
        let (k, cubes) = match across {
            // Cubes each folding a block of rows, or (`Fold::Finer`) a cube per row element.
            Some((a, r)) if a.row == i => {
                let k = a.row_kernel(r.map_or(0, |(_, positions)| positions));
                (LProgram { planes: launch.planes, ..k }, r.map_or(count, |(cubes, _)| cubes))
            }
            _ => {
                let k = launched(k, per_value, last, launch);
                let cubes = if k.cube_per_value() { count.div_ceil(k.values_per_cube) } else { count.div_ceil(k.units * k.values_per_unit) };
                (k, cubes)
            }
        };
        let k = keeping(k, &|d| sizes[d] / count, launch);
        let x = cubes.min(65_535);
        let y = cubes.div_ceil(x);
        launches.push((k, (x as u32, y as u32, 1)));
    }
    Ok(Layout { meta, sizes, offsets, io_len, work_len, scalars, launches })
}

/// Run a plan bound to one call's shapes (`lay`) on the device: `data` gives the tensors it
/// reads (the rest it computes); `io` is the storage type of the input, output and their
/// gradients. Every output comes back, by target, in f32.
/// Kernels read and write `launch.vector_bytes` at a time where they may ([`vectorized`]), in
/// vectors of at most [`WGSL_LANES`].
pub(crate) fn run<'a>(client: &cubecl::client::Client, plan: &Plan, lay: &Layout, io: Dtype, launch: &Launch, data: &dyn Fn(Source) -> Option<&'a [f32]>) -> Result<Vec<(Target, Vec<f32>)>, Error> {
    let held = io.held_on(client)?;
    let mut lay = lay.clone();
    lay.vectorize(held.size(), &Launch { vector_bytes: launch.vector_bytes.min(WGSL_LANES * held.size()), vector_params: false, ..*launch });
    for (k, _) in &mut lay.launches {
        k.planes = false;
    }
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
    // Never an empty binding: not every runtime allows one. Whole vectors, for the kernels
    // reading them.
    for buffer in [&mut x, &mut dy, &mut io_arena] {
        buffer.resize(buffer.len().max(1).next_multiple_of(WGSL_LANES), 0.0);
    }
    if work.is_empty() {
        work.push(0.0);
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
        let (cc, cd) = (CubeCount::Static(*gx, *gy, 1), CubeDim::new_1d(k.units as u32));
        let (ty, round) = held.kernel_type();
        // SAFETY: units (or cubes) past the target's size do nothing; every offset is a
        // tensor's offset plus an index below its size (the meta table is built from the same
        // shapes), so inside its buffer, whose length is passed.
        unsafe {
            let arg = |h: &cubecl::server::Handle, len: usize| BufferArg::from_raw_parts(h.clone(), len);
            let lanes = k.vector.max(1);
            with_type!(ty, F => layer_kernel::launch_unchecked::<F>(
                client,
                cc,
                cd,
                lanes,
                arg(&x_h, x.len() / lanes),
                arg(&dy_h, dy.len() / lanes),
                arg(&io_h, io_arena.len() / lanes),
                arg(&work_h, work.len()),
                arg(&meta_h, meta.len()),
                arg(&sc, scalars.len()),
                k.clone(),
                round,
            ))
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
