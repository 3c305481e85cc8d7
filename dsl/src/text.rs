//! The stable text form of the IR (`normforge show`), also what the IR snapshots hold.

use crate::ir::*;
use std::fmt::Write;

/// `[n, c/groups]`: the axes a value varies along; `[]` for a scalar.
pub fn shape_text(s: &Shape, axes: &[Axis], hparams: &[HParam]) -> String {
    let parts: Vec<String> = s
        .0
        .iter()
        .zip(axes)
        .filter_map(|(e, a)| match e {
            Extent::One => None,
            Extent::Full => Some(a.display_name()),
            Extent::Grouped(g) => Some(format!("{}/{}", a.display_name(), groups_text(*g, hparams))),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn groups_text(g: Groups, hparams: &[HParam]) -> String {
    match g {
        Groups::Count(n) => n.to_string(),
        Groups::HParam(i) => hparams.get(i as usize).map_or_else(|| format!("hparam{i}"), |h| h.name.clone()),
    }
}

pub fn hparam_text(h: &HParam) -> String {
    let default = match h.ty {
        HType::Bool => (h.default != 0.0).to_string(),
        _ => fmt_f64(h.default),
    };
    let mut s = format!("{}: {} = {default}", h.name, h.ty.name());
    if let Some(r) = &h.range {
        let _ = write!(s, " in {r}");
    }
    s
}

/// `p[o, i] with j = o`: the input, its axes and their twins.
pub fn input_text(e: &Entry) -> String {
    let (own, twins): (Vec<&Axis>, Vec<&Axis>) = e.axes.iter().partition(|a| a.twin.is_none());
    let own: Vec<String> = own.iter().map(|a| a.display_name()).collect();
    let twins: Vec<String> =
        twins.iter().map(|a| format!("{} = {}", a.display_name(), a.twin.map_or("?".into(), |o| e.axes[o as usize].display_name()))).collect();
    let with = if twins.is_empty() { String::new() } else { format!(" with {}", twins.join(", ")) };
    format!("{}[{}]{with}", e.input, own.join(", "))
}

pub fn entry_text(e: &Entry, backward: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} {}({})", e.kind.keyword(), e.name, input_text(e));
    for (k, v) in [("paper", &e.meta.paper), ("reference", &e.meta.reference), ("version", &e.meta.version)] {
        if let Some(v) = v {
            let _ = writeln!(s, "  @{k} {v:?}");
        }
    }
    for h in &e.hparams {
        let _ = writeln!(s, "  hparam {}", hparam_text(h));
    }
    for (kind, decls) in [("param", &e.params), ("buffer", &e.buffers), ("state", &e.states)] {
        for d in decls {
            let _ = writeln!(s, "  {kind} {} {}", d.name, shape_text(&d.shape, &e.axes, &e.hparams));
        }
    }
    program_text(&mut s, "init", &e.init, e);
    match &e.programs {
        Programs::Optimizer { step } => program_text(&mut s, "step", step, e),
        Programs::Layer { train, eval, train_backward, eval_backward } => {
            let same = train == eval;
            if backward {
                if same {
                    program_text(&mut s, "backward (train, eval)", train_backward, e);
                } else {
                    program_text(&mut s, "backward train", train_backward, e);
                    program_text(&mut s, "backward eval", eval_backward, e);
                }
            } else if same {
                program_text(&mut s, "forward (train, eval)", train, e);
            } else {
                program_text(&mut s, "forward train", train, e);
                program_text(&mut s, "forward eval", eval, e);
            }
        }
    }
    s
}

pub fn program_text(s: &mut String, title: &str, p: &Program, e: &Entry) {
    let _ = writeln!(s, "{title}:");
    let name = |decls: &[TensorDecl], i: u32| decls.get(i as usize).map_or_else(|| format!("#{i}"), |d| d.name.clone());
    for (i, n) in p.nodes.iter().enumerate() {
        let op = match &n.op {
            Op::Const(v) => format!("const {}", fmt_f64(*v)),
            Op::HParam(h) => format!("hparam {}", e.hparams.get(*h as usize).map_or("?", |h| h.name.as_str())),
            Op::Size(sh) => format!("size {}", shape_text(sh, &e.axes, &e.hparams)),
            Op::Rank(axes) => {
                let names: Vec<String> = axes.iter().map(|&a| e.axes[a as usize].display_name()).collect();
                format!("rank [{}]", names.join(", "))
            }
            Op::Step => "step".into(),
            Op::Input => format!("input {}", e.input),
            Op::Grad => "grad".into(),
            Op::GradOutput => "grad_output".into(),
            Op::Param(i) => format!("param {}", name(&e.params, *i)),
            Op::Buffer(i) => format!("buffer {}", name(&e.buffers, *i)),
            Op::State(i) => format!("state {}", name(&e.states, *i)),
            Op::Unary(u, a) => format!("{} %{a}", u.name()),
            Op::Binary(b, x, y) => format!("{} %{x}, %{y}", b.name()),
            Op::Select(c, x, y) => format!("select %{c}, %{x}, %{y}"),
            Op::Reduce(r, a) => format!("reduce.{} %{a}", r.name()),
            Op::Expand(a) => format!("expand %{a}"),
            Op::Swap(a, i, j) => format!("swap %{a}, {}, {}", e.axes[*i as usize].display_name(), e.axes[*j as usize].display_name()),
        };
        let ty = if n.ty == Type::Bool { "bool" } else { "" };
        let _ = writeln!(s, "  %{i} = {op} : {ty}{}", shape_text(&n.shape, &e.axes, &e.hparams));
    }
    for o in &p.outputs {
        let target = match o.target {
            Target::Y => "y".to_string(),
            Target::P => "p".to_string(),
            Target::Param(i) => format!("param {}", name(&e.params, i)),
            Target::Buffer(i) => format!("buffer {}", name(&e.buffers, i)),
            Target::State(i) => format!("state {}", name(&e.states, i)),
            Target::GradInput => format!("grad {}", e.input),
            Target::GradParam(i) => format!("grad {}", name(&e.params, i)),
        };
        let _ = writeln!(s, "  {target} <- %{}", o.node);
    }
}
