//! Graph construction with hash-consing and constant folding, shared by the checker and by
//! autodiff, so that derived backward passes come out small without a separate optimizer.

use crate::ir::*;
use std::collections::HashMap;

pub struct Builder {
    nodes: Vec<Node>,
    interned: HashMap<String, NodeId>,
    rank: usize,
}

impl Builder {
    pub fn new(rank: usize) -> Self {
        Builder { nodes: Vec::new(), interned: HashMap::new(), rank }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.nodes[id as usize].shape
    }

    pub fn ty(&self, id: NodeId) -> Type {
        self.nodes[id as usize].ty
    }

    pub fn constant_value(&self, id: NodeId) -> Option<f64> {
        match self.nodes[id as usize].op {
            Op::Const(v) => Some(v),
            _ => None,
        }
    }

    /// Add a node, or return the identical one already built.
    pub fn add(&mut self, op: Op, shape: Shape, ty: Type) -> NodeId {
        // Debug formatting of f64 round-trips and tells 0.0 from -0.0: a sound key.
        let key = format!("{op:?}|{shape:?}|{ty:?}");
        if let Some(&id) = self.interned.get(&key) {
            return id;
        }
        let id = self.nodes.len() as NodeId;
        self.nodes.push(Node { op, shape, ty });
        self.interned.insert(key, id);
        id
    }

    pub fn constant(&mut self, v: f64) -> NodeId {
        self.add(Op::Const(v), Shape::scalar(self.rank), Type::Float)
    }

    pub fn boolean(&mut self, v: bool) -> NodeId {
        self.add(Op::Const(f64::from(v)), Shape::scalar(self.rank), Type::Bool)
    }

    pub fn leaf(&mut self, op: Op, shape: Shape) -> NodeId {
        self.add(op, shape, Type::Float)
    }

    pub fn unary(&mut self, u: Unary, a: NodeId) -> NodeId {
        let ty = if u == Unary::Not { Type::Bool } else { Type::Float };
        if let Some(v) = self.constant_value(a) {
            let r = u.apply(v);
            return if ty == Type::Bool { self.boolean(r != 0.0) } else { self.constant(r) };
        }
        if let Op::Unary(inner, x) = self.node(a).op {
            if inner == u && matches!(u, Unary::Neg | Unary::Not) {
                return x;
            }
        }
        let shape = self.shape(a).clone();
        self.add(Op::Unary(u, a), shape, ty)
    }

    /// Elementwise binary op with broadcasting; `None` when the shapes cannot broadcast.
    pub fn try_binary(&mut self, op: Binary, a: NodeId, b: NodeId) -> Option<NodeId> {
        let shape = self.shape(a).join(self.shape(b))?;
        let ty = op.result_type();
        let (ca, cb) = (self.constant_value(a), self.constant_value(b));
        if let (Some(x), Some(y)) = (ca, cb) {
            let r = op.apply(x, y);
            return Some(if ty == Type::Bool { self.boolean(r != 0.0) } else { self.constant(r) });
        }
        // (Guards, not float patterns: `z == 0.0` says which zero counts, -0.0 included.)
        #[allow(clippy::redundant_guards)]
        let folded = match (op, ca, cb) {
            (Binary::Add, Some(z), _) if z == 0.0 => Some(b),
            (Binary::Add | Binary::Sub, _, Some(z)) if z == 0.0 => Some(a),
            (Binary::Sub, Some(z), _) if z == 0.0 => Some(self.unary(Unary::Neg, b)),
            (Binary::Mul, Some(o), _) if o == 1.0 => Some(b),
            (Binary::Mul | Binary::Div | Binary::Pow, _, Some(o)) if o == 1.0 => Some(a),
            (Binary::Mul, Some(m), _) if m == -1.0 => Some(self.unary(Unary::Neg, b)),
            (Binary::Mul, _, Some(m)) if m == -1.0 => Some(self.unary(Unary::Neg, a)),
            (Binary::Div, Some(o), _) if o == 1.0 => Some(self.unary(Unary::Recip, b)),
            _ => None,
        };
        if let Some(f) = folded {
            return Some(self.expand(f, &shape));
        }
        Some(self.add(Op::Binary(op, a, b), shape, ty))
    }

    /// For graphs known to broadcast (autodiff, desugaring of checked code).
    pub fn binary(&mut self, op: Binary, a: NodeId, b: NodeId) -> NodeId {
        self.try_binary(op, a, b).expect("operands were checked to broadcast")
    }

    pub fn try_select(&mut self, c: NodeId, a: NodeId, b: NodeId) -> Option<NodeId> {
        let shape = self.shape(c).join(self.shape(a))?.join(self.shape(b))?;
        let ty = self.ty(a);
        if a == b {
            return Some(self.expand(a, &shape));
        }
        if let Some(v) = self.constant_value(c) {
            let pick = if v != 0.0 { a } else { b };
            return Some(self.expand(pick, &shape));
        }
        Some(self.add(Op::Select(c, a, b), shape, ty))
    }

    pub fn select(&mut self, c: NodeId, a: NodeId, b: NodeId) -> NodeId {
        self.try_select(c, a, b).expect("operands were checked to broadcast")
    }

    /// Reduce `a` to `to` (each extent of `to` at most as fine as `a`'s).
    pub fn reduce(&mut self, op: ReduceOp, a: NodeId, to: &Shape) -> NodeId {
        if self.shape(a) == to {
            return a;
        }
        let ty = self.ty(a);
        self.add(Op::Reduce(op, a), to.clone(), ty)
    }

    /// Broadcast `a` up to `to`; a no-op when the shapes agree.
    pub fn expand(&mut self, a: NodeId, to: &Shape) -> NodeId {
        if self.shape(a) == to {
            return a;
        }
        let a = match self.node(a).op {
            Op::Expand(inner) => inner,
            _ => a,
        };
        let ty = self.ty(a);
        self.add(Op::Expand(a), to.clone(), ty)
    }

    /// `a` with axes `i` and `j` exchanged (their lengths must agree); a no-op when `a` is
    /// constant along both.
    pub fn swap(&mut self, a: NodeId, i: usize, j: usize) -> NodeId {
        let mut shape = self.shape(a).clone();
        if shape.0[i] == Extent::One && shape.0[j] == Extent::One {
            return a;
        }
        if let Op::Swap(inner, x, y) = self.node(a).op {
            if (x as usize, y as usize) == (i.min(j), i.max(j)) {
                return inner;
            }
        }
        shape.0.swap(i, j);
        let ty = self.ty(a);
        self.add(Op::Swap(a, i.min(j) as u32, i.max(j) as u32), shape, ty)
    }

    /// Keep only what `outputs` need, renumbered in order.
    pub fn finish(self, outputs: Vec<Output>) -> Program {
        let mut live = vec![false; self.nodes.len()];
        for o in &outputs {
            live[o.node as usize] = true;
        }
        for i in (0..self.nodes.len()).rev() {
            if live[i] {
                for a in self.nodes[i].op.args() {
                    live[a as usize] = true;
                }
            }
        }
        let mut remap = vec![u32::MAX; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, mut n) in self.nodes.into_iter().enumerate() {
            if !live[i] {
                continue;
            }
            n.op = match n.op {
                Op::Unary(u, a) => Op::Unary(u, remap[a as usize]),
                Op::Binary(b, x, y) => Op::Binary(b, remap[x as usize], remap[y as usize]),
                Op::Select(c, x, y) => Op::Select(remap[c as usize], remap[x as usize], remap[y as usize]),
                Op::Reduce(r, a) => Op::Reduce(r, remap[a as usize]),
                Op::Expand(a) => Op::Expand(remap[a as usize]),
                Op::Swap(a, i, j) => Op::Swap(remap[a as usize], i, j),
                op => op,
            };
            remap[i] = nodes.len() as NodeId;
            nodes.push(n);
        }
        let outputs = outputs.into_iter().map(|o| Output { target: o.target, node: remap[o.node as usize] }).collect();
        Program { nodes, outputs }
    }

    /// Start from an existing program's nodes (ids are preserved).
    pub fn from_program(p: &Program, rank: usize) -> Self {
        let mut b = Builder::new(rank);
        for n in &p.nodes {
            let id = b.nodes.len() as NodeId;
            let key = format!("{:?}|{:?}|{:?}", n.op, n.shape, n.ty);
            b.interned.entry(key).or_insert(id);
            b.nodes.push(n.clone());
        }
        b
    }
}
