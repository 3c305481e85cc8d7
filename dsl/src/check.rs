//! AST -> IR: name resolution, types, shapes, and lowering of the statement language
//! (sequential assignment, `if`) into SSA programs. Every user mistake becomes a [`Diagnostic`].

use crate::ast::{self, Arg, BinOp, DeclKind, Expr, ExprKind, GroupRef, ItemKind, LitValue, StmtKind, UnOp};
use crate::builder::Builder;
use crate::diag::{Diagnostic, Diagnostics};
use crate::ir::{self, *};
use crate::suggest::did_you_mean;
use std::collections::HashMap;

/// Check every item of a parsed file; names must be unique within the file.
pub fn check_file(file: &ast::File) -> Result<Vec<Entry>, Diagnostics> {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<&str, ast::Span> = HashMap::new();
    for item in &file.items {
        if let Some(first) = seen.get(item.name.name.as_str()) {
            errors.push(
                Diagnostic::new(item.name.span, format!("`{}` is defined twice in this file", item.name.name), "defined again here")
                    .related(*first, "first defined here"),
            );
            continue;
        }
        seen.insert(&item.name.name, item.name.span);
        match check_item(item) {
            Ok(e) => entries.push(e),
            Err(d) => errors.extend(d.0),
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(Diagnostics(errors))
    }
}

/// Functions callable in expressions, for arity errors and suggestions.
pub const FUNCTIONS: &[&str] = &[
    "sqrt", "rsqrt", "exp", "log", "tanh", "sigmoid", "sign", "abs", "relu", "softplus", "stop_gradient", "min", "max", "pow", "lerp",
    "clamp", "select", "sum", "mean", "var", "std", "rms", "norm", "size", "rank",
    "swap",
];

/// The most times `repeat` unrolls its block (torch's Muon allows fewer than 100 iterations).
const MAX_REPEAT: u32 = 100;

const ATTRIBUTES: &[&str] = &["paper", "doc", "reference", "version", "alias"];

fn err(span: ast::Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
    Diagnostic::new(span, message, label)
}

pub fn check_item(item: &ast::Item) -> Result<Entry, Diagnostics> {
    let mut cx = Checker::new(item)?;
    cx.lower_init_decls();
    let first = cx.lower_body(Some(true));
    if !cx.errors.is_empty() {
        return Err(Diagnostics(std::mem::take(&mut cx.errors)));
    }
    let programs = match item.kind {
        ItemKind::Optimizer => Programs::Optimizer { step: first },
        _ => {
            let eval = cx.lower_body(Some(false));
            let shapes: Vec<Shape> = cx.params.iter().map(|p| p.shape.clone()).collect();
            let train_backward = crate::autodiff::backward(&first, cx.axes.len(), &shapes);
            let eval_backward = crate::autodiff::backward(&eval, cx.axes.len(), &shapes);
            Programs::Layer { train: first, eval, train_backward, eval_backward }
        }
    };
    if !cx.errors.is_empty() {
        return Err(Diagnostics(cx.errors));
    }
    Ok(Entry {
        kind: item.kind,
        name: item.name.name.clone(),
        meta: cx.meta,
        input: cx.input_name,
        axes: cx.axes,
        hparams: cx.hparams,
        params: cx.params,
        buffers: cx.buffers,
        states: cx.states,
        init: cx.init,
        programs,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Binding {
    HParam(u32, HType),
    Input,
    Grad,
    Step,
    Train,
    Param(u32),
    Buffer(u32),
    State(u32),
    Let,
}

/// The SSA state while lowering one program: current value of every name in scope.
#[derive(Clone)]
struct Env {
    names: HashMap<String, (Binding, ast::Span, Option<NodeId>)>,
}

struct Checker<'a> {
    item: &'a ast::Item,
    meta: Meta,
    input_name: String,
    axes: Vec<Axis>,
    hparams: Vec<HParam>,
    params: Vec<TensorDecl>,
    buffers: Vec<TensorDecl>,
    states: Vec<TensorDecl>,
    init: Program,
    errors: Vec<Diagnostic>,
    /// Only the first lowering reports errors; later passes see the same code.
    reporting: bool,
    b: Builder,
    train: Option<bool>,
    /// Lowering initial values, which see only literals and hyper-parameters.
    in_init: bool,
    /// Names whose definition failed: later uses are not reported again.
    failed: std::collections::HashSet<String>,
    /// Declarations that made it into the entry, by statement start.
    declared_ok: std::collections::HashSet<usize>,
}

/// The result of lowering a block: whether (and what) it returned.
struct Flow {
    returned: Option<NodeId>,
}

impl<'a> Checker<'a> {
    fn new(item: &'a ast::Item) -> Result<Self, Diagnostics> {
        let mut errors = Vec::new();
        let meta = meta(&item.attrs, &mut errors);
        let (input_name, axes, _axis_spans) = match (&item.input, item.kind) {
            (Some(inp), _) => {
                if item.kind == ItemKind::Optimizer && inp.name.name != "p" {
                    errors.push(
                        err(inp.name.span, "an optimizer's input is the parameter `p`", "rename this to `p`")
                            .note("`p` is the parameter, `g` its gradient and `t` the step count"),
                    );
                }
                let mut axes = Vec::new();
                let mut spans = Vec::new();
                let mut variadic: Option<ast::Span> = None;
                for a in &inp.axes {
                    if a.variadic {
                        if let Some(first) = variadic {
                            errors.push(
                                err(a.span, "only one axis may be variadic (`...`)", "second variadic axis")
                                    .related(first, "first one here"),
                            );
                        }
                        variadic = Some(a.span);
                    }
                    if let Some(n) = &a.name {
                        if let Some(j) = axes.iter().position(|x: &Axis| x.name.as_deref() == Some(n.name.as_str())) {
                            errors.push(
                                err(n.span, format!("axis `{}` is declared twice", n.name), "declared again")
                                    .related(spans[j], "first declared here"),
                            );
                        }
                        if n.name == inp.name.name {
                            errors.push(err(n.span, "an axis cannot have the input's name", "rename this axis"));
                        }
                    }
                    axes.push(Axis { name: a.name.as_ref().map(|n| n.name.clone()), variadic: a.variadic, twin: None });
                    spans.push(a.span);
                }
                for t in &inp.twins {
                    if item.kind != ItemKind::Optimizer {
                        errors.push(
                            err(t.span, "axes beyond the input's (`with`) are for update rules", "not in a layer")
                                .note("the derived backward pass does not handle them yet"),
                        );
                        continue;
                    }
                    let taken = axes.iter().position(|x: &Axis| x.name.as_deref() == Some(t.name.name.as_str()));
                    if let Some(j) = taken {
                        errors.push(
                            err(t.name.span, format!("axis `{}` is declared twice", t.name.name), "declared again")
                                .related(spans[j], "first declared here"),
                        );
                        continue;
                    }
                    match inp.axes.iter().position(|a| a.name.as_ref().is_some_and(|n| n.name == t.of.name)) {
                        Some(o) if !inp.axes[o].variadic => {
                            axes.push(Axis { name: Some(t.name.name.clone()), variadic: false, twin: Some(o as u32) });
                            spans.push(t.span);
                        }
                        Some(_) => errors.push(err(t.of.span, format!("`{}` is variadic; a twin takes the length of one dim", t.of.name), "variadic axis")),
                        None => errors.push(
                            err(t.of.span, format!("no axis named `{}`", t.of.name), "not an axis of the input")
                                .note(format!("`{} = <axis>` takes its length from one of the input's axes", t.name.name)),
                        ),
                    }
                }
                (inp.name.name.clone(), axes, spans)
            }
            (None, _) => ("p".to_string(), vec![Axis { name: None, variadic: true, twin: None }], vec![item.name.span]),
        };
        let hparams = hparams(item, &axes, &input_name, &mut errors);
        if !errors.is_empty() {
            return Err(Diagnostics(errors));
        }
        let rank = axes.len();
        Ok(Checker {
            item,
            meta,
            input_name,
            axes,
            hparams,
            params: vec![],
            buffers: vec![],
            states: vec![],
            init: Program::default(),
            errors: vec![],
            reporting: true,
            b: Builder::new(rank),
            train: None,
            in_init: false,
            failed: Default::default(),
            declared_ok: Default::default(),
        })
    }

    fn is_optimizer(&self) -> bool {
        self.item.kind == ItemKind::Optimizer
    }

    fn report(&mut self, d: Diagnostic) {
        if self.reporting {
            self.errors.push(d);
        }
    }

    fn axis_index(&self, name: &ast::Ident) -> Result<usize, Diagnostic> {
        self.axes.iter().position(|a| a.name.as_deref() == Some(name.name.as_str())).ok_or_else(|| {
            let names: Vec<String> = self.axes.iter().filter_map(|a| a.name.clone()).collect();
            let listed: Vec<String> = self.axes.iter().map(|a| a.display_name()).collect();
            let mut d = err(name.span, format!("no axis named `{}`", name.name), "not an axis of the input")
                .note(format!("the axes of `{}` are [{}]", self.input_name, listed.join(", ")));
            if let Some(s) = did_you_mean(&name.name, names.iter().map(String::as_str)) {
                d = d.note(format!("did you mean `{s}`?"));
            }
            d
        })
    }

    /// A declaration's shape: its axes in the input's order, each whole or in groups
    /// (`weight[c / groups]`), as `over` names them.
    fn decl_shape(&mut self, refs: &[ast::AxisRef]) -> Option<Shape> {
        let mut last: Option<(usize, &ast::Ident)> = None;
        for r in refs {
            let n = &r.axis;
            let i = match self.axis_index(n) {
                Ok(i) => i,
                Err(d) => {
                    self.report(d);
                    return None;
                }
            };
            if self.axes[i].twin.is_some() {
                self.report(err(n.span, format!("`{}` is not an axis of the input; declared tensors vary along the input's axes", n.name), "a `with` axis"));
                return None;
            }
            if let Some((j, prev)) = last {
                if i < j {
                    self.report(err(n.span, format!("axes must follow the input's order: `{}` comes before `{}`", n.name, prev.name), "out of order"));
                    return None;
                }
            }
            last = Some((i, n));
        }
        self.reduced_shape(refs)
    }

    fn shape_text(&self, s: &Shape) -> String {
        crate::text::shape_text(s, &self.axes, &self.hparams)
    }

    /// Lower the initialisers of every declaration into the init program (once).
    fn lower_init_decls(&mut self) {
        let mut b = Builder::new(self.axes.len());
        let mut outputs = Vec::new();
        let mut env = self.base_env();
        // Only hyper-parameters (and, for optimizer state, `p`) are visible to initialisers.
        env.names.retain(|_, (bind, _, _)| matches!(bind, Binding::HParam(..) | Binding::Input));
        if self.is_optimizer() {
            let p = b.leaf(Op::Input, input_shape(&self.axes));
            env.names.get_mut(&self.input_name).unwrap().2 = Some(p);
        } else {
            env.names.retain(|_, (bind, _, _)| !matches!(bind, Binding::Input));
        }
        self.in_init = true;
        let mut declared: HashMap<String, ast::Span> = HashMap::new();
        for stmt in &self.item.body.stmts {
            let StmtKind::Decl { kind, name, shape, init } = &stmt.kind else { continue };
            // Until it is known good, uses of the name should not cascade into more errors.
            self.failed.insert(name.name.clone());
            let allowed = match kind {
                DeclKind::State => self.is_optimizer(),
                _ => !self.is_optimizer(),
            };
            if !allowed {
                let what = if self.is_optimizer() {
                    "an optimizer keeps `state`, not `param` or `buffer`"
                } else {
                    "`state` belongs to optimizers; a layer keeps `param`s and `buffer`s"
                };
                self.report(err(stmt.span, what, format!("`{}` not allowed here", kind.keyword())));
                continue;
            }
            if let Some(first) = declared.get(&name.name) {
                self.report(
                    err(name.span, format!("`{}` is declared twice", name.name), "declared again")
                        .related(*first, "first declared here"),
                );
                continue;
            }
            if let Some(d) = self.reserved(name) {
                self.report(d);
                continue;
            }
            declared.insert(name.name.clone(), name.span);
            let decl_shape = match shape {
                Some(refs) => match self.decl_shape(refs) {
                    Some(s) => s,
                    None => continue,
                },
                None if *kind == DeclKind::State => input_shape(&self.axes),
                None => Shape::scalar(self.axes.len()),
            };
            std::mem::swap(&mut self.b, &mut b);
            let value = self.expr(init, &mut env);
            std::mem::swap(&mut self.b, &mut b);
            let Some(value) = value else { continue };
            if b.ty(value) != Type::Float {
                self.report(err(init.span, "an initial value must be a number", "this is a condition"));
                continue;
            }
            if !b.shape(value).fits_in(&decl_shape) {
                let (vs, ds) = (self.shape_text(b.shape(value)), self.shape_text(&decl_shape));
                self.report(err(
                    init.span,
                    format!("shape mismatch: `{}` is declared {ds}, its initial value has shape {vs}", name.name),
                    format!("shape {vs}"),
                ));
                continue;
            }
            let value = b.expand(value, &decl_shape);
            let decl = TensorDecl { name: name.name.clone(), shape: decl_shape };
            let target = match kind {
                DeclKind::Param => {
                    self.params.push(decl);
                    Target::Param(self.params.len() as u32 - 1)
                }
                DeclKind::Buffer => {
                    self.buffers.push(decl);
                    Target::Buffer(self.buffers.len() as u32 - 1)
                }
                DeclKind::State => {
                    self.states.push(decl);
                    Target::State(self.states.len() as u32 - 1)
                }
            };
            outputs.push(Output { target, node: value });
            self.failed.remove(&name.name);
            self.declared_ok.insert(stmt.span.start);
        }
        self.in_init = false;
        self.init = b.finish(outputs);
    }

    /// Names that are always bound: hyper-parameters and the entry's implicit inputs.
    fn base_env(&self) -> Env {
        let mut names = HashMap::new();
        let here = self.item.name.span;
        for (i, h) in self.hparams.iter().enumerate() {
            let span = self.item.hparams.get(i).map_or(here, |h| h.name.span);
            names.insert(h.name.clone(), (Binding::HParam(i as u32, h.ty), span, None));
        }
        let input_span = self.item.input.as_ref().map_or(here, |i| i.name.span);
        names.insert(self.input_name.clone(), (Binding::Input, input_span, None));
        if self.is_optimizer() {
            names.insert("g".into(), (Binding::Grad, here, None));
            names.insert("t".into(), (Binding::Step, here, None));
        } else {
            names.insert("train".into(), (Binding::Train, here, None));
        }
        Env { names }
    }

    /// Names a user may not declare, with the reason.
    fn reserved(&self, name: &ast::Ident) -> Option<Diagnostic> {
        let n = name.name.as_str();
        if self.axes.iter().any(|a| a.name.as_deref() == Some(n)) {
            return Some(err(name.span, format!("`{n}` is already an axis of the input"), "choose another name"));
        }
        if n == self.input_name || is_reserved(n, self.item.kind) {
            let note = if self.is_optimizer() {
                "reserved in an optimizer: `p` (the parameter), `g` (its gradient), `t` (the step count)"
            } else {
                "reserved in a layer: `train` (the mode) and the input's name"
            };
            return Some(err(name.span, format!("`{n}` is a reserved name"), "choose another name").note(note));
        }
        if self.hparams.iter().any(|h| h.name == n) {
            return Some(err(name.span, format!("`{n}` is already a hyper-parameter"), "choose another name"));
        }
        None
    }

    /// Lower the item's body into one program (`train` fixes the mode for layers).
    fn lower_body(&mut self, train: Option<bool>) -> Program {
        self.b = Builder::new(self.axes.len());
        self.train = train;
        let mut env = self.base_env();
        let full = input_shape(&self.axes);
        let input = self.b.leaf(Op::Input, full.clone());
        env.names.get_mut(&self.input_name).unwrap().2 = Some(input);
        if self.is_optimizer() {
            let g = self.b.leaf(Op::Grad, full.clone());
            env.names.get_mut("g").unwrap().2 = Some(g);
        }
        let flow = self.block(&self.item.body, &mut env, true);
        let mut outputs = Vec::new();
        if self.is_optimizer() {
            let p = env.names[&self.input_name].2.unwrap();
            if p == input && self.errors.is_empty() {
                self.report(err(self.item.name.span, format!("optimizer `{}` never assigns `p`", self.item.name.name), "no update")
                    .note("an update rule ends by assigning the new parameter, e.g. `p = p - lr * g`"));
            }
            outputs.push(Output { target: Target::P, node: self.b.expand(p, &full) });
            for (i, s) in self.states.iter().enumerate() {
                let v = env.names[&s.name].2.unwrap();
                outputs.push(Output { target: Target::State(i as u32), node: self.b.expand(v, &s.shape) });
            }
        } else {
            match flow.returned {
                Some(y) => outputs.push(Output { target: Target::Y, node: self.b.expand(y, &full) }),
                None if !self.errors.is_empty() => {} // the cause was reported already
                None => {
                    let d = err(self.item.body.span, format!("{} `{}` never returns a value", self.item.kind.keyword(), self.item.name.name), "no `return` in this block")
                        .note("end the body with `return <expression>`");
                    self.report(d);
                }
            }
            for (i, buf) in self.buffers.iter().enumerate() {
                let v = env.names[&buf.name].2.unwrap();
                let leaf = self.b.leaf(Op::Buffer(i as u32), buf.shape.clone());
                if v != leaf {
                    outputs.push(Output { target: Target::Buffer(i as u32), node: self.b.expand(v, &buf.shape) });
                }
            }
        }
        self.reporting = false;
        let b = std::mem::replace(&mut self.b, Builder::new(self.axes.len()));
        b.finish(outputs)
    }

    fn block(&mut self, block: &ast::Block, env: &mut Env, top: bool) -> Flow {
        let mut returned = None;
        let outer: Vec<String> = env.names.keys().cloned().collect();
        for (k, stmt) in block.stmts.iter().enumerate() {
            if returned.is_some() {
                self.report(err(stmt.span, "unreachable statement after `return`", "never runs").note("`return` must be the last statement of its block"));
                break;
            }
            match &stmt.kind {
                StmtKind::Decl { kind, name, shape, .. } => {
                    if !top {
                        self.report(err(stmt.span, format!("`{}` declarations belong at the top level of the body, not inside `if` or `repeat`", kind.keyword()), "move this to the top level"));
                        continue;
                    }
                    if !self.declared_ok.contains(&stmt.span.start) {
                        continue; // its error was reported by lower_init_decls
                    }
                    let (binding, leaf) = if let Some(i) = self.params.iter().position(|p| p.name == name.name) {
                        (Binding::Param(i as u32), Op::Param(i as u32))
                    } else if let Some(i) = self.buffers.iter().position(|p| p.name == name.name) {
                        (Binding::Buffer(i as u32), Op::Buffer(i as u32))
                    } else if let Some(i) = self.states.iter().position(|p| p.name == name.name) {
                        (Binding::State(i as u32), Op::State(i as u32))
                    } else {
                        continue; // its error was reported by lower_init_decls
                    };
                    let _ = shape;
                    if let Some((_, first, _)) = env.names.get(&name.name) {
                        let first = *first;
                        self.report(err(name.span, format!("`{}` is already defined", name.name), "defined again").related(first, "first defined here"));
                        continue;
                    }
                    let decl_shape = match leaf {
                        Op::Param(i) => self.params[i as usize].shape.clone(),
                        Op::Buffer(i) => self.buffers[i as usize].shape.clone(),
                        Op::State(i) => self.states[i as usize].shape.clone(),
                        _ => unreachable!(),
                    };
                    let id = self.b.leaf(leaf, decl_shape);
                    env.names.insert(name.name.clone(), (binding, name.span, Some(id)));
                }
                StmtKind::Let { name, value } => {
                    if let Some(d) = self.reserved(name) {
                        self.report(d);
                        self.failed.insert(name.name.clone());
                        continue;
                    }
                    if let Some((_, first, _)) = env.names.get(&name.name) {
                        let first = *first;
                        self.report(err(name.span, format!("`{}` is already defined", name.name), "defined again").related(first, "first defined here").note("`let` names are immutable; choose a new name"));
                        continue;
                    }
                    match self.expr(value, env) {
                        Some(v) => {
                            env.names.insert(name.name.clone(), (Binding::Let, name.span, Some(v)));
                        }
                        None => {
                            self.failed.insert(name.name.clone());
                        }
                    }
                }
                StmtKind::Assign { name, value } => self.assign(name, value, env),
                StmtKind::Return(e) => {
                    if self.is_optimizer() {
                        self.report(err(stmt.span, "an optimizer does not `return`; it assigns `p`", "not allowed in an optimizer").note("write `p = <new value>`"));
                        continue;
                    }
                    if let Some(v) = self.expr(e, env) {
                        if self.b.ty(v) != Type::Float {
                            self.report(err(e.span, "a layer must return a number tensor, not a condition", "this is a condition"));
                            continue;
                        }
                        returned = Some(v);
                    }
                }
                StmtKind::If { branches, otherwise } => {
                    let is_last = k + 1 == block.stmts.len();
                    returned = self.if_stmt(stmt.span, branches, otherwise.as_ref(), env, is_last);
                }
                StmtKind::Repeat { count, count_span, body } => {
                    if !(1..=MAX_REPEAT).contains(count) {
                        self.report(err(*count_span, format!("`repeat` runs its block 1 to {MAX_REPEAT} times"), "out of range"));
                        continue;
                    }
                    // Each pass lowers the same code: report its errors once.
                    let reporting = self.reporting;
                    for _ in 0..*count {
                        let flow = self.block(body, env, false);
                        self.reporting = false;
                        if flow.returned.is_some() {
                            self.reporting = reporting;
                            self.report(err(stmt.span, "`return` inside `repeat`", "not allowed").note("return after the loop"));
                            break;
                        }
                    }
                    self.reporting = reporting;
                }
            }
        }
        // Names declared inside this block go out of scope; mutable values keep their updates.
        if !top {
            env.names.retain(|k, _| outer.contains(k));
        }
        Flow { returned }
    }

    fn assign(&mut self, name: &ast::Ident, value: &Expr, env: &mut Env) {
        let Some(&(binding, decl_span, _)) = env.names.get(&name.name) else {
            let d = self.unknown_name(&name.name, name.span, env);
            self.report(d);
            return;
        };
        let target_shape = match binding {
            Binding::Buffer(i) => self.buffers[i as usize].shape.clone(),
            Binding::State(i) => self.states[i as usize].shape.clone(),
            Binding::Input | Binding::Grad if self.is_optimizer() => input_shape(&self.axes),
            Binding::Input => {
                self.report(err(name.span, format!("`{}` is the layer's input and cannot be assigned", name.name), "read-only").note("bind a new name with `let`"));
                return;
            }
            Binding::Param(_) => {
                self.report(err(name.span, format!("`{}` is a learned parameter; a layer cannot assign it", name.name), "read-only").related(decl_span, "declared as a `param` here").note("declare it as a `buffer` if the layer updates it"));
                return;
            }
            Binding::HParam(..) => {
                self.report(err(name.span, format!("`{}` is a hyper-parameter and cannot be assigned", name.name), "read-only"));
                return;
            }
            Binding::Let => {
                self.report(err(name.span, format!("`{}` is a `let` binding and cannot be reassigned", name.name), "immutable").related(decl_span, "bound here").note("bind a new name with `let`"));
                return;
            }
            Binding::Step | Binding::Train | Binding::Grad => {
                self.report(err(name.span, format!("`{}` is built in and cannot be assigned", name.name), "read-only"));
                return;
            }
        };
        let Some(v) = self.expr(value, env) else { return };
        if self.b.ty(v) != Type::Float {
            self.report(err(value.span, format!("`{}` holds numbers; this value is a condition", name.name), "a condition"));
            return;
        }
        if !self.b.shape(v).fits_in(&target_shape) {
            let (vs, ts) = (self.shape_text(self.b.shape(v)), self.shape_text(&target_shape));
            self.report(
                err(value.span, format!("shape mismatch: `{}` has shape {ts}, the value has shape {vs}", name.name), format!("shape {vs}"))
                    .note("reduce the value over the extra axes first, e.g. `mean(..., over n)`"),
            );
            return;
        }
        let v = self.b.expand(v, &target_shape);
        env.names.get_mut(&name.name).unwrap().2 = Some(v);
    }

    fn if_stmt(
        &mut self,
        span: ast::Span,
        branches: &[(Expr, ast::Block)],
        otherwise: Option<&ast::Block>,
        env: &mut Env,
        is_last: bool,
    ) -> Option<NodeId> {
        let mut conds = Vec::new();
        let mut outcomes = Vec::new();
        for (cond, body) in branches {
            let c = self.expr(cond, env);
            if let Some(c) = c {
                if self.b.ty(c) != Type::Bool {
                    self.report(err(cond.span, "an `if` condition must be a condition, not a number", "a number").note("compare it, e.g. `x > 0`"));
                }
            }
            let mut benv = env.clone();
            let flow = self.block(body, &mut benv, false);
            conds.push(c);
            outcomes.push((benv, flow.returned, body.span));
        }
        let mut eenv = env.clone();
        let else_ret = otherwise.map(|b| self.block(b, &mut eenv, false).returned);
        let any_return = outcomes.iter().any(|o| o.1.is_some()) || else_ret.flatten().is_some();
        let all_return = outcomes.iter().all(|o| o.1.is_some()) && matches!(else_ret, Some(Some(_)));
        if any_return && !all_return {
            let d = if otherwise.is_none() {
                err(span, "this `if` returns but has no `else`", "some paths do not return").note("add an `else` branch that returns too")
            } else {
                err(span, "some branches of this `if` return and others do not", "every branch must return, or none")
            };
            self.report(d);
            return None;
        }
        if all_return && !is_last {
            self.report(err(span, "statements after an `if` whose branches all return never run", "every branch returns here"));
        }
        if conds.iter().any(Option::is_none) {
            return None;
        }
        // Merge from the last branch backwards: v = select(c1, v1, select(c2, v2, v_else)),
        // name by name in a fixed order, so that one text always gives one IR.
        let mut mutable: Vec<String> = env
            .names
            .iter()
            .filter(|(_, (b, _, _))| matches!(b, Binding::Buffer(_) | Binding::State(_) | Binding::Input | Binding::Grad))
            .map(|(k, _)| k.clone())
            .collect();
        mutable.sort();
        for name in mutable {
            let mut v = eenv.names[&name].2.unwrap();
            for (c, (benv, _, _)) in conds.iter().zip(&outcomes).rev() {
                let bv = benv.names[&name].2.unwrap();
                v = self.merge(c.unwrap(), bv, v, span);
            }
            env.names.get_mut(&name).unwrap().2 = Some(v);
        }
        if all_return {
            let mut v = else_ret.flatten().unwrap();
            for (c, (_, r, _)) in conds.iter().zip(&outcomes).rev() {
                v = self.merge(c.unwrap(), r.unwrap(), v, span);
            }
            return Some(v);
        }
        None
    }

    fn merge(&mut self, c: NodeId, a: NodeId, b: NodeId, span: ast::Span) -> NodeId {
        match self.b.try_select(c, a, b) {
            Some(v) => v,
            None => {
                self.report(err(span, "the branches of this `if` produce values of incompatible shapes", "cannot merge"));
                a
            }
        }
    }

    fn unknown_name(&self, name: &str, span: ast::Span, env: &Env) -> Diagnostic {
        let mut d = err(span, format!("unknown name `{name}`"), "not defined here");
        let declared = self.item.body.stmts.iter().any(|s| matches!(&s.kind, StmtKind::Decl { name: n, .. } | StmtKind::Let { name: n, .. } if n.name == name));
        if self.in_init && (declared || self.base_env().names.contains_key(name)) {
            let what = if self.is_optimizer() { "literals, hyper-parameters and `p`" } else { "literals and hyper-parameters" };
            return err(span, format!("an initial value cannot read `{name}`"), "not available to initial values")
                .note(format!("initial values are computed before the first step from {what}"));
        }
        if self.axes.iter().any(|a| a.name.as_deref() == Some(name)) {
            return err(span, format!("`{name}` is an axis, not a value"), "an axis")
                .note(format!("use it in `over {name}` or a shape, or `size({name})` for its length"));
        }
        let reason = match name {
            "g" | "t" if !self.is_optimizer() => Some("is only defined in optimizers"),
            "p" if !self.is_optimizer() => Some("(the parameter) is only defined in optimizers"),
            "train" if self.is_optimizer() => Some("is only defined in layers and reparams"),
            _ => None,
        };
        if let Some(r) = reason {
            return err(span, format!("`{name}` {r}"), "not available here");
        }
        if let Some(s) = did_you_mean(name, env.names.keys().map(String::as_str)) {
            d = d.note(format!("did you mean `{s}`?"));
        }
        d
    }

    fn expr(&mut self, e: &Expr, env: &mut Env) -> Option<NodeId> {
        match &e.kind {
            ExprKind::Num { value, .. } => Some(self.b.constant(*value)),
            ExprKind::Bool(v) => Some(self.b.boolean(*v)),
            ExprKind::Name(n) => {
                if self.failed.contains(n) {
                    return None; // its definition failed and was reported
                }
                let Some(&(binding, _, value)) = env.names.get(n) else {
                    if !self.failed.contains(n) {
                        let d = self.unknown_name(n, e.span, env);
                        self.report(d);
                    }
                    return None;
                };
                match binding {
                    Binding::HParam(i, ty) => {
                        let id = self.b.leaf(Op::HParam(i), Shape::scalar(self.axes.len()));
                        if ty == HType::Bool {
                            // A bool hyper-parameter reads as a condition.
                            let zero = self.b.constant(0.0);
                            return Some(self.b.binary(Binary::Ne, id, zero));
                        }
                        Some(id)
                    }
                    Binding::Step => Some(self.b.leaf(Op::Step, Shape::scalar(self.axes.len()))),
                    Binding::Train => Some(self.b.boolean(self.train.unwrap_or(true))),
                    _ => value,
                }
            }
            ExprKind::Unary(op, a) => {
                let a_id = self.expr(a, env)?;
                let want = if *op == UnOp::Neg { Type::Float } else { Type::Bool };
                if self.b.ty(a_id) != want {
                    let msg = if *op == UnOp::Neg { "`-` needs a number, found a condition" } else { "`!` needs a condition, found a number" };
                    self.report(err(a.span, msg, "wrong type"));
                    return None;
                }
                Some(self.b.unary(if *op == UnOp::Neg { Unary::Neg } else { Unary::Not }, a_id))
            }
            ExprKind::Binary(op, l, r) => {
                let (li, ri) = (self.expr(l, env), self.expr(r, env));
                let (li, ri) = (li?, ri?);
                let (lt, rt) = (self.b.ty(li), self.b.ty(ri));
                let (want, bin) = match op {
                    BinOp::Or => (Type::Bool, Binary::Or),
                    BinOp::And => (Type::Bool, Binary::And),
                    BinOp::Eq => (Type::Float, Binary::Eq),
                    BinOp::Ne => (Type::Float, Binary::Ne),
                    BinOp::Lt => (Type::Float, Binary::Lt),
                    BinOp::Le => (Type::Float, Binary::Le),
                    BinOp::Gt => (Type::Float, Binary::Gt),
                    BinOp::Ge => (Type::Float, Binary::Ge),
                    BinOp::Add => (Type::Float, Binary::Add),
                    BinOp::Sub => (Type::Float, Binary::Sub),
                    BinOp::Mul => (Type::Float, Binary::Mul),
                    BinOp::Div => (Type::Float, Binary::Div),
                    BinOp::Pow => (Type::Float, Binary::Pow),
                };
                for (t, side) in [(lt, l), (rt, r)] {
                    if t != want {
                        let what = if want == Type::Float { "a number" } else { "a condition" };
                        let found = if t == Type::Float { "a number" } else { "a condition" };
                        self.report(err(side.span, format!("`{}` needs {what} on each side, found {found}", op.symbol()), found.to_string()));
                        return None;
                    }
                }
                self.binary(bin, li, ri, e.span)
            }
            ExprKind::Call { func, args } => self.call(func, args, e.span, env),
        }
    }

    fn binary(&mut self, op: Binary, a: NodeId, b: NodeId, span: ast::Span) -> Option<NodeId> {
        match self.b.try_binary(op, a, b) {
            Some(v) => Some(v),
            None => {
                let (sa, sb) = (self.shape_text(self.b.shape(a)), self.shape_text(self.b.shape(b)));
                self.report(err(span, format!("shapes {sa} and {sb} cannot be combined"), "incompatible groupings").note("values grouped differently along one axis do not broadcast"));
                None
            }
        }
    }

    fn call(&mut self, func: &ast::Ident, args: &[Arg], span: ast::Span, env: &mut Env) -> Option<NodeId> {
        let name = func.name.as_str();
        let mut pos: Vec<&Expr> = Vec::new();
        let mut named: Vec<(&ast::Ident, &Expr)> = Vec::new();
        let mut over: Option<(&[ast::AxisRef], ast::Span)> = None;
        for a in args {
            match a {
                Arg::Pos(e) => pos.push(e),
                Arg::Named(n, e) => named.push((n, e)),
                Arg::Over(refs, s) => {
                    if over.is_some() {
                        self.report(err(*s, "`over` given twice", "second `over`"));
                        return None;
                    }
                    over = Some((refs, *s));
                }
            }
        }
        let reduction = matches!(name, "sum" | "mean" | "var" | "std" | "rms" | "norm")
            || (matches!(name, "max" | "min") && (over.is_some() || pos.len() == 1));
        if !FUNCTIONS.contains(&name) {
            let mut d = err(func.span, format!("unknown function `{name}`"), "not a function");
            if let Some(s) = did_you_mean(name, FUNCTIONS.iter().copied()) {
                d = d.note(format!("did you mean `{s}`?"));
            }
            self.report(d);
            return None;
        }
        if let (false, Some((_, s))) = (reduction, over) {
            self.report(err(s, format!("`{name}` is elementwise and takes no `over`"), "unexpected `over`"));
            return None;
        }
        let allowed_named: &[&str] = if matches!(name, "var" | "std") { &["correction"] } else { &[] };
        for (n, _) in &named {
            if !allowed_named.contains(&n.name.as_str()) {
                let mut d = err(n.span, format!("`{name}` has no argument named `{}`", n.name), "unknown argument");
                if !allowed_named.is_empty() {
                    d = d.note(format!("its named arguments: {}", allowed_named.join(", ")));
                }
                self.report(d);
                return None;
            }
        }
        if matches!(name, "size" | "rank") {
            return self.size_or_rank(name, &pos, span);
        }
        if name == "swap" {
            return self.swap(&pos, span, env);
        }
        let arity = match name {
            "lerp" | "clamp" | "select" => 3,
            "pow" => 2,
            "min" | "max" if !reduction => 2,
            _ => 1,
        };
        if pos.len() != arity {
            let s = if arity == 1 { "" } else { "s" };
            self.report(err(span, format!("`{name}` takes {arity} argument{s}, found {}", pos.len()), format!("expected {arity} argument{s}")));
            return None;
        }
        let mut ids = Vec::new();
        for p in &pos {
            ids.push(self.expr(p, env));
        }
        let ids: Vec<NodeId> = ids.into_iter().collect::<Option<_>>()?;
        for (k, (&id, p)) in ids.iter().zip(&pos).enumerate() {
            let want = if name == "select" && k == 0 { Type::Bool } else { Type::Float };
            if self.b.ty(id) != want {
                let what = if want == Type::Float { "a number" } else { "a condition" };
                self.report(err(p.span, format!("argument {} of `{name}` must be {what}", k + 1), "wrong type"));
                return None;
            }
        }
        if reduction {
            let correction = match named.first() {
                Some((_, e)) => {
                    let c = self.expr(e, env)?;
                    if self.b.ty(c) != Type::Float || !self.b.shape(c).is_scalar() {
                        self.report(err(e.span, "`correction` must be a scalar number", "not a scalar number"));
                        return None;
                    }
                    Some(c)
                }
                None => None,
            };
            return self.reduction(name, ids[0], over, correction, span);
        }
        let b = &mut self.b;
        let unary = |u| -> Option<Unary> { Some(u) };
        let u = match name {
            "sqrt" => unary(Unary::Sqrt),
            "rsqrt" => unary(Unary::Rsqrt),
            "exp" => unary(Unary::Exp),
            "log" => unary(Unary::Log),
            "tanh" => unary(Unary::Tanh),
            "sigmoid" => unary(Unary::Sigmoid),
            "sign" => unary(Unary::Sign),
            "abs" => unary(Unary::Abs),
            "relu" => unary(Unary::Relu),
            "softplus" => unary(Unary::Softplus),
            "stop_gradient" => unary(Unary::StopGradient),
            _ => None,
        };
        if let Some(u) = u {
            return Some(b.unary(u, ids[0]));
        }
        match name {
            "min" => self.binary(Binary::Min, ids[0], ids[1], span),
            "max" => self.binary(Binary::Max, ids[0], ids[1], span),
            "pow" => self.binary(Binary::Pow, ids[0], ids[1], span),
            "lerp" => {
                // a + w * (b - a)
                let d = self.binary(Binary::Sub, ids[1], ids[0], span)?;
                let wd = self.binary(Binary::Mul, ids[2], d, span)?;
                self.binary(Binary::Add, ids[0], wd, span)
            }
            "clamp" => {
                let lo = self.binary(Binary::Max, ids[0], ids[1], span)?;
                self.binary(Binary::Min, lo, ids[2], span)
            }
            "select" => match self.b.try_select(ids[0], ids[1], ids[2]) {
                Some(v) => Some(v),
                None => {
                    self.report(err(span, "the arguments of `select` have incompatible shapes", "cannot broadcast"));
                    None
                }
            },
            _ => unreachable!("every function in FUNCTIONS is handled"),
        }
    }

    /// `swap(a, o, j)`: `a` with two axes of one length exchanged (a transpose).
    fn swap(&mut self, pos: &[&Expr], span: ast::Span, env: &mut Env) -> Option<NodeId> {
        if pos.len() != 3 {
            self.report(err(span, format!("`swap` takes a value and two axes, found {} arguments", pos.len()), "expected 3 arguments"));
            return None;
        }
        let mut axes = [0usize; 2];
        for (k, p) in pos[1..].iter().enumerate() {
            let ExprKind::Name(n) = &p.kind else {
                self.report(err(p.span, "`swap` takes axis names after the value", "not an axis"));
                return None;
            };
            match self.axis_index(&ast::Ident { name: n.clone(), span: p.span }) {
                Ok(i) => axes[k] = i,
                Err(d) => {
                    self.report(d);
                    return None;
                }
            }
        }
        let [i, j] = axes;
        let origin = |a| Axis::origin(&self.axes, a);
        if i == j || origin(i) != origin(j) {
            let (a, b) = (self.axes[i].display_name(), self.axes[j].display_name());
            let why = if i == j { format!("`{a}` is named twice") } else { format!("`{a}` and `{b}` may differ in length") };
            self.report(err(span, format!("`swap` exchanges two axes of one length: {why}"), "cannot swap").note("declare an axis of another's length with `with j = o` after the input's axes"));
            return None;
        }
        let a = self.expr(pos[0], env)?;
        if self.b.ty(a) != Type::Float {
            self.report(err(pos[0].span, "argument 1 of `swap` must be a number", "wrong type"));
            return None;
        }
        let shape = self.b.shape(a);
        if [i, j].iter().any(|&k| matches!(shape.0[k], Extent::Grouped(_))) {
            self.report(err(pos[0].span, "`swap` exchanges whole axes; this value is grouped along one of them", "grouped"));
            return None;
        }
        Some(self.b.swap(a, i, j))
    }

    /// `size(d, c / groups)`: elements per reduction; `rank(s)`: run-time dims of axes.
    fn size_or_rank(&mut self, name: &str, pos: &[&Expr], span: ast::Span) -> Option<NodeId> {
        if pos.is_empty() {
            self.report(err(span, format!("`{name}` needs at least one axis"), "no axes given"));
            return None;
        }
        let mut refs = Vec::new();
        for p in pos {
            let r = match &p.kind {
                ExprKind::Name(n) => ast::AxisRef { axis: ast::Ident { name: n.clone(), span: p.span }, groups: None, span: p.span },
                ExprKind::Binary(BinOp::Div, l, r) if name == "size" => match (&l.kind, &r.kind) {
                    (ExprKind::Name(a), ExprKind::Name(g)) => ast::AxisRef {
                        axis: ast::Ident { name: a.clone(), span: l.span },
                        groups: Some(GroupRef::Name(ast::Ident { name: g.clone(), span: r.span })),
                        span: p.span,
                    },
                    (ExprKind::Name(a), ExprKind::Num { value, .. }) if *value >= 1.0 && value.fract() == 0.0 => ast::AxisRef {
                        axis: ast::Ident { name: a.clone(), span: l.span },
                        groups: Some(GroupRef::Count(*value as u32, r.span)),
                        span: p.span,
                    },
                    _ => {
                        self.report(err(p.span, format!("`{name}` takes axes, like `d` or `c / groups`"), "not an axis"));
                        return None;
                    }
                },
                _ => {
                    self.report(err(p.span, format!("`{name}` takes axis names"), "not an axis"));
                    return None;
                }
            };
            refs.push(r);
        }
        let reduced = self.reduced_shape(&refs)?;
        let scalar = Shape::scalar(self.axes.len());
        if name == "size" {
            return Some(self.b.add(Op::Size(reduced), scalar, Type::Float));
        }
        let axes = reduced.0.iter().enumerate().filter(|(_, e)| **e != Extent::One).map(|(i, _)| i as u32).collect();
        Some(self.b.add(Op::Rank(axes), scalar, Type::Float))
    }

    /// The axes an `over` names, as a shape: `Full` for a whole axis, `Grouped` for groups.
    fn reduced_shape(&mut self, refs: &[ast::AxisRef]) -> Option<Shape> {
        let mut s = Shape::scalar(self.axes.len());
        for r in refs {
            let i = match self.axis_index(&r.axis) {
                Ok(i) => i,
                Err(d) => {
                    self.report(d);
                    return None;
                }
            };
            if s.0[i] != Extent::One {
                self.report(err(r.span, format!("axis `{}` is named twice", r.axis.name), "repeated"));
                return None;
            }
            s.0[i] = match &r.groups {
                None => Extent::Full,
                Some(GroupRef::Count(n, gs)) => {
                    if *n == 0 {
                        self.report(err(*gs, "the number of groups must be at least 1", "zero groups"));
                        return None;
                    }
                    Extent::Grouped(Groups::Count(*n))
                }
                Some(GroupRef::Name(g)) => match self.hparams.iter().position(|h| h.name == g.name) {
                    Some(k) if self.hparams[k].ty == HType::Int => Extent::Grouped(Groups::HParam(k as u32)),
                    Some(k) => {
                        let ty = self.hparams[k].ty.name();
                        self.report(err(g.span, format!("the number of groups must be an `int` hyper-parameter; `{}` is a {ty}", g.name), "not an int"));
                        return None;
                    }
                    None => {
                        let mut d = err(g.span, format!("unknown hyper-parameter `{}`", g.name), "not a hyper-parameter")
                            .note("the number of groups is an `int` hyper-parameter or a literal");
                        if let Some(s) = did_you_mean(&g.name, self.hparams.iter().map(|h| h.name.as_str())) {
                            d = d.note(format!("did you mean `{s}`?"));
                        }
                        self.report(d);
                        return None;
                    }
                },
            };
        }
        Some(s)
    }

    fn reduction(
        &mut self,
        name: &str,
        arg: NodeId,
        over: Option<(&[ast::AxisRef], ast::Span)>,
        correction: Option<NodeId>,
        span: ast::Span,
    ) -> Option<NodeId> {
        let reduced = match over {
            Some((refs, _)) => self.reduced_shape(refs)?,
            // The whole value: the input's axes and the twins it varies along.
            None if self.is_optimizer() => {
                let along = self.b.shape(arg).clone();
                let whole = self.axes.iter().zip(&along.0).map(|(a, e)| if a.twin.is_none() || *e != Extent::One { Extent::Full } else { Extent::One });
                Shape(whole.collect())
            }
            None => {
                self.report(err(span, format!("`{name}` in a {} needs `over`", self.item.kind.keyword()), "which axes?").note(format!("e.g. `{name}(x, over d)`")));
                return None;
            }
        };
        // Target: each reduced axis becomes One (whole axis) or Grouped (per group).
        let arg_shape = self.b.shape(arg).clone();
        let mut widened = arg_shape.clone();
        let mut target = arg_shape.clone();
        for (i, e) in reduced.0.iter().enumerate() {
            match e {
                Extent::One => {}
                Extent::Full => {
                    widened.0[i] = Extent::Full;
                    target.0[i] = Extent::One;
                }
                Extent::Grouped(g) => {
                    widened.0[i] = Extent::Full;
                    target.0[i] = Extent::Grouped(*g);
                }
            }
        }
        // Reducing over an axis the value is constant along still counts every element.
        let x = self.b.expand(arg, &widened);
        // But a max or min over such an axis is the value itself: in an update rule (no
        // derivative passes through it, so ties need no rule) it folds only the axes the value
        // varies along — AdamP's `max(cos_channel)` a fold over channels, not over every weight.
        let own: Option<Shape> = self.is_optimizer().then(|| {
            let fits = arg_shape.0.iter().zip(&target.0).all(|(a, t)| *a == Extent::One || *t == Extent::One || a == t);
            fits.then(|| Shape(arg_shape.0.iter().zip(&target.0).map(|(a, t)| if *a == Extent::One { Extent::One } else { *t }).collect()))
        }).flatten();
        let scalar = Shape::scalar(self.axes.len());
        let count = self.b.add(Op::Size(reduced.clone()), scalar, Type::Float);
        let b = &mut self.b;
        let sum = |b: &mut Builder, v: NodeId| b.reduce(ReduceOp::Sum, v, &target);
        let v = match name {
            "sum" => sum(b, x),
            "max" | "min" => {
                let op = if name == "max" { ReduceOp::Max } else { ReduceOp::Min };
                match own {
                    Some(own) => {
                        let v = b.reduce(op, arg, &own);
                        b.expand(v, &target)
                    }
                    None => b.reduce(op, x, &target),
                }
            }
            "mean" => {
                let s = sum(b, x);
                b.binary(Binary::Div, s, count)
            }
            "rms" | "norm" => {
                let sq = b.binary(Binary::Mul, x, x);
                let s = sum(b, sq);
                let m = if name == "rms" { b.binary(Binary::Div, s, count) } else { s };
                b.unary(Unary::Sqrt, m)
            }
            "var" | "std" => {
                let s = sum(b, x);
                let mean = b.binary(Binary::Div, s, count);
                let d = b.binary(Binary::Sub, x, mean);
                let d2 = b.binary(Binary::Mul, d, d);
                let ss = sum(b, d2);
                let denom = match correction {
                    Some(c) => b.binary(Binary::Sub, count, c),
                    None => count,
                };
                let var = b.binary(Binary::Div, ss, denom);
                if name == "std" { b.unary(Unary::Sqrt, var) } else { var }
            }
            _ => unreachable!("reduction names are matched above"),
        };
        Some(v)
    }
}

fn meta(attrs: &[ast::Attr], errors: &mut Vec<Diagnostic>) -> Meta {
    let mut m = Meta::default();
    let mut seen: HashMap<&str, ast::Span> = HashMap::new();
    for a in attrs {
        let key = a.key.name.as_str();
        if !ATTRIBUTES.contains(&key) {
            let mut d = err(a.key.span, format!("unknown attribute `@{key}`"), "not an attribute")
                .note(format!("attributes: {}", ATTRIBUTES.iter().map(|a| format!("@{a}")).collect::<Vec<_>>().join(", ")));
            if let Some(s) = did_you_mean(key, ATTRIBUTES.iter().copied()) {
                d = d.note(format!("did you mean `@{s}`?"));
            }
            errors.push(d);
            continue;
        }
        if key != "alias" {
            if let Some(first) = seen.get(key) {
                errors.push(err(a.span, format!("`@{key}` given twice"), "again").related(*first, "first here"));
                continue;
            }
            seen.insert(key, a.span);
        }
        let v = Some(a.value.clone());
        match key {
            "paper" => m.paper = v,
            "doc" => m.doc = v,
            "reference" => m.reference = v,
            "version" => m.version = v,
            _ => m.aliases.push(a.value.clone()),
        }
    }
    m
}

fn hparams(item: &ast::Item, axes: &[Axis], input: &str, errors: &mut Vec<Diagnostic>) -> Vec<HParam> {
    let mut out: Vec<HParam> = Vec::new();
    for h in &item.hparams {
        let name = h.name.name.as_str();
        if let Some(j) = out.iter().position(|o| o.name == name) {
            errors.push(err(h.name.span, format!("hyper-parameter `{name}` is declared twice"), "declared again").related(item.hparams[j].name.span, "first declared here"));
            continue;
        }
        if name == input || is_reserved(name, item.kind) || axes.iter().any(|a| a.name.as_deref() == Some(name)) {
            errors.push(err(h.name.span, format!("`{name}` is a reserved name or an axis"), "choose another name"));
            continue;
        }
        let lit_is_bool = matches!(h.default.value, LitValue::Bool(_));
        let ty = match h.ty.as_ref().map(|t| t.name.as_str()) {
            None if lit_is_bool => HType::Bool,
            None => HType::Float,
            Some("float" | "f32" | "f64") => HType::Float,
            Some("int") => HType::Int,
            Some("bool") => HType::Bool,
            Some(other) => {
                let t = h.ty.as_ref().unwrap();
                let mut d = err(t.span, format!("unknown type `{other}`"), "not a type").note("hyper-parameters are `float`, `int` or `bool`");
                if let Some(s) = did_you_mean(other, ["float", "int", "bool"]) {
                    d = d.note(format!("did you mean `{s}`?"));
                }
                errors.push(d);
                continue;
            }
        };
        let default = match (ty, h.default.value) {
            (HType::Bool, LitValue::Bool(b)) => f64::from(b),
            (HType::Float, LitValue::Num(v)) => v,
            (HType::Int, LitValue::Num(v)) if v.fract() == 0.0 && v.abs() < 2f64.powi(31) => v,
            (HType::Int, LitValue::Num(_)) => {
                errors.push(err(h.default.span, format!("`{name}` is an int; its default `{}` is not a whole number", h.default.text), "not an int"));
                continue;
            }
            (_, lit) => {
                let found = if matches!(lit, LitValue::Bool(_)) { "a bool" } else { "a number" };
                errors.push(err(h.default.span, format!("`{name}` is a {}; its default is {found}", ty.name()), format!("expected a {}", ty.name())));
                continue;
            }
        };
        let range = match &h.range {
            None => None,
            Some(r) => {
                if ty == HType::Bool {
                    errors.push(err(r.span, "a bool hyper-parameter cannot have a range", "not for bools"));
                    continue;
                }
                let (LitValue::Num(lo), LitValue::Num(hi)) = (r.lo.value, r.hi.value) else {
                    errors.push(err(r.span, "range bounds must be numbers", "not numbers"));
                    continue;
                };
                if lo > hi {
                    errors.push(err(r.span, format!("empty range: {lo} is above {hi}"), "empty range"));
                    continue;
                }
                Some(ir::Range { lo, hi, lo_inclusive: r.lo_inclusive, hi_inclusive: r.hi_inclusive })
            }
        };
        if let Some(r) = range {
            if !r.contains(default) {
                errors.push(err(h.default.span, format!("the default of `{name}`, {}, is outside its range {r}", h.default.text), "out of range"));
                continue;
            }
        }
        out.push(HParam { name: name.to_string(), ty, default, range, doc: h.doc.clone() });
    }
    out
}

/// Names bound implicitly in an entry of this kind.
fn is_reserved(name: &str, kind: ItemKind) -> bool {
    match kind {
        ItemKind::Optimizer => matches!(name, "p" | "g" | "t"),
        _ => name == "train",
    }
}
