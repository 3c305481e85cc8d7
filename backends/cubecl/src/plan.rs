//! A layer program -> layer kernels. Every reduction is materialized: one kernel per reduction,
//! one unit per reduced value, looping over the values it folds; the elementwise work feeding
//! it is recomputed inside that loop rather than stored. Outputs of one shape share one
//! elementwise kernel. Shapes stay symbolic: extents arrive at run time in the `meta` table, so
//! a kernel serves every input shape and group count.

use crate::compile::{binary, reduce, unary, Uniforms};
use crate::kernel::{layer_kernel, LOp, LProgram, BLOCK};
use crate::Error;
use cubecl::prelude::*;
use normforge_dsl::bind::{self, AxisBinding};
use normforge_dsl::ir::{Entry, Op, Program, Shape, Target};

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
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// In launch order.
    pub kernels: Vec<LProgram>,
    /// The shape table.
    pub shapes: Vec<Shape>,
    /// The tensor table: where each comes from, and its shape's index.
    pub tensors: Vec<(Source, usize)>,
    /// Which tensor holds each output.
    pub outputs: Vec<(Target, usize)>,
    pub(crate) program: Program,
    pub(crate) uniforms: Uniforms,
}

struct Tables {
    shapes: Vec<Shape>,
    tensors: Vec<(Source, usize)>,
}

impl Tables {
    fn shape(&mut self, s: &Shape) -> usize {
        self.shapes.iter().position(|x| x == s).unwrap_or_else(|| {
            self.shapes.push(s.clone());
            self.shapes.len() - 1
        })
    }
    fn tensor(&mut self, src: Source, s: &Shape) -> usize {
        let sh = self.shape(s);
        self.tensors.iter().position(|(x, _)| *x == src).unwrap_or_else(|| {
            self.tensors.push((src, sh));
            self.tensors.len() - 1
        })
    }
}

pub fn plan(entry: &Entry, p: &Program) -> Result<Plan, Error> {
    let unsupported = |what: &str| Error(format!("`{}`: {what} is not supported in a layer by the CubeCL backend", entry.name));
    let mut uniforms = Uniforms::new(p, |op| matches!(op, Op::Size(_) | Op::Rank(_)));
    // (`Step` is uniform too: `Uniforms` knows it.)
    let n = p.nodes.len();
    let materialized: Vec<bool> = (0..n).map(|i| !uniforms.flags[i] && matches!(p.nodes[i].op, Op::Reduce(..))).collect();
    let mut t = Tables { shapes: Vec::new(), tensors: Vec::new() };
    let rank = entry.axes.len();
    let mut kernels = Vec::new();

    // The ops computing `roots` from tensors and scalars; returns their registers.
    let build = |roots: &[u32], t: &mut Tables, uniforms: &mut Uniforms| -> Result<(Vec<LOp>, Vec<usize>), Error> {
        let mut needed = vec![false; n];
        for &r in roots {
            needed[r as usize] = true;
        }
        for i in (0..n).rev() {
            if needed[i] && !uniforms.flags[i] && !materialized[i] {
                for a in p.nodes[i].op.args() {
                    needed[a as usize] = true;
                }
            }
        }
        let mut ops = Vec::new();
        let mut reg = vec![usize::MAX; n];
        for (i, node) in p.nodes.iter().enumerate() {
            if !needed[i] {
                continue;
            }
            let load = |src: Source, t: &mut Tables| LOp::Load(t.tensor(src, &node.shape), t.shape(&node.shape));
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
                        reg[i] = reg[*a as usize];
                        continue;
                    }
                    Op::Unary(u, a) => LOp::Unary(unary(*u), reg[*a as usize]),
                    Op::Binary(b, x, y) => LOp::Binary(binary(*b), reg[*x as usize], reg[*y as usize]),
                    Op::Select(c, x, y) => LOp::Select(reg[*c as usize], reg[*x as usize], reg[*y as usize]),
                    other => return Err(unsupported(&format!("{other:?}"))),
                }
            };
            ops.push(op);
            reg[i] = ops.len() - 1;
        }
        Ok((ops, roots.iter().map(|&r| reg[r as usize]).collect()))
    };

    for (i, node) in p.nodes.iter().enumerate() {
        if !materialized[i] {
            continue;
        }
        let Op::Reduce(r, a) = &node.op else { unreachable!() };
        let (ops, regs) = build(&[*a], &mut t, &mut uniforms)?;
        let out = t.tensor(Source::Node(i as u32), &node.shape);
        let domain = t.shape(&p.nodes[*a as usize].shape);
        let target = t.shape(&node.shape);
        kernels.push(LProgram { rank, shapes: 0, domain, target, ops, reduce: Some((reduce(*r), regs[0], out)), stores: Vec::new() });
    }
    // Outputs that are reductions are already in their tensors; the rest, by shape.
    let mut outputs = Vec::new();
    let mut by_shape: Vec<(Shape, Vec<u32>)> = Vec::new();
    for o in &p.outputs {
        let node = &p.nodes[o.node as usize];
        outputs.push((o.target, t.tensor(Source::Node(o.node), &node.shape)));
        if !materialized[o.node as usize] {
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
        let stores = nodes.iter().zip(regs).map(|(&nd, r)| (t.tensor(Source::Node(nd), &shape), r)).collect();
        kernels.push(LProgram { rank, shapes: 0, domain: target, target, ops, reduce: None, stores });
    }
    for k in &mut kernels {
        k.shapes = t.shapes.len();
    }
    Ok(Plan { kernels, shapes: t.shapes, tensors: t.tensors, outputs, program: p.clone(), uniforms })
}

/// Run a plan on the device: `data` gives the tensors it reads (the rest it computes); every
/// output comes back, by target.
pub(crate) fn run<'a>(
client: &cubecl::client::Client,
plan: &Plan,
b: &AxisBinding,
hparams: &[f64],
step: f64,
data: &dyn Fn(Source) -> Option<&'a [f32]>,
) -> Result<Vec<(Target, Vec<f32>)>, Error> {
    let rank = b.extents.len();
    let mut meta: Vec<u32> = Vec::new();
    let mut sizes = Vec::new();
    for s in &plan.shapes {
        let outer = bind::extents(s, b, hparams).map_err(Error)?;
        let inner: Vec<usize> = outer.iter().zip(&b.extents).map(|(&o, &e)| if o == 0 { 0 } else { e / o }).collect();
        let mut stride = vec![0usize; rank];
        let mut acc = 1;
        for a in (0..rank).rev() {
            stride[a] = acc;
            acc *= outer[a];
        }
        sizes.push(acc);
        for v in outer.iter().chain(&inner).chain(&stride) {
            meta.push(u32::try_from(*v).map_err(|_| Error("a tensor of this layer call exceeds 2^32 values".into()))?);
        }
    }
    let mut arena: Vec<f32> = Vec::new();
    for &(src, shape) in &plan.tensors {
        meta.push(arena.len() as u32);
        let len = sizes[shape];
        match data(src) {
            Some(d) if d.len() != len => return Err(Error(format!("{src:?} has {} values, the layer expects {len}", d.len()))),
            Some(d) => arena.extend_from_slice(d),
            None if matches!(src, Source::Node(_)) => arena.resize(arena.len() + len, 0.0),
            None => return Err(Error(format!("{src:?} is missing"))),
        }
    }
    if arena.is_empty() {
        arena.push(0.0);
    }
    // A binding past the adapter's limit does not run: refuse it here.
    let limit = client.properties().memory.max_page_size;
    if (arena.len() * 4) as u64 > limit {
        return Err(Error(format!("this layer call needs {} values, more than the adapter's largest buffer ({limit} bytes)", arena.len())));
    }
    let scalars = plan.uniforms.values(&plan.program, hparams, step, |op| match op {
        Op::Size(s) => bind::size(s, b, hparams) as f64,
        Op::Rank(axes) => axes.iter().map(|&a| b.dims[a as usize].len()).sum::<usize>() as f64,
        _ => unreachable!("only shape queries"),
    });
    let arena_h = client.create_from_slice(f32::as_bytes(&arena));
    let meta_h = client.create_from_slice(u32::as_bytes(&meta));
    let sc = client.create_from_slice(f32::as_bytes(&scalars));
    for k in &plan.kernels {
        let count = sizes[k.target];
        if count == 0 {
            continue;
        }
        let cubes = count.div_ceil(BLOCK);
        let x = cubes.min(65_535);
        let y = cubes.div_ceil(x);
        // SAFETY: units past `count` do nothing; every offset is a tensor's offset plus an
        // index below its size (the meta table is built from the same shapes), so inside
        // the arena, whose length is passed.
        unsafe {
            layer_kernel::launch_unchecked(
                &client,
                CubeCount::Static(x as u32, y as u32, 1),
                CubeDim::new_1d(BLOCK as u32),
                BufferArg::from_raw_parts(arena_h.clone(), arena.len()),
                BufferArg::from_raw_parts(meta_h.clone(), meta.len()),
                BufferArg::from_raw_parts(sc.clone(), scalars.len()),
                k.clone(),
            );
        }
    }
    let bytes = client.read_one(arena_h).map_err(|e| Error(format!("reading back: {e:?}")))?;
    let out = f32::from_bytes(&bytes);
    let offsets = &meta[meta.len() - plan.tensors.len()..];
    Ok(plan
        .outputs
        .iter()
        .map(|&(target, t)| {
            let off = offsets[t] as usize;
            (target, out[off..off + sizes[plan.tensors[t].1]].to_vec())
        })
        .collect())
}
