//! The formatter: one canonical layout for every spec, keeping every comment.
//!
//! Comments are not in the AST; they are scanned from the text and re-attached by position:
//! a comment on the same line after a statement (or attribute, or hyper-parameter) trails
//! it, any other comment leads the next one. Parentheses are re-derived from precedence.

use crate::ast::*;
use crate::diag::Diagnostics;
use crate::parser;

const INDENT: &str = "    ";
const MAX_LINE: usize = 100;

pub fn format(src: &str) -> Result<String, Diagnostics> {
    let file = parser::parse(src)?;
    let mut f = Formatter { src, comments: scan_comments(src), used: vec![], out: String::new() };
    f.used = vec![false; f.comments.len()];
    let mut prev_end = 0;
    for (k, item) in file.items.iter().enumerate() {
        if k > 0 {
            f.out.push('\n');
        }
        f.leading(prev_end, item.span.start, "", false);
        let text = f.item(item);
        f.emit_slot(item.span.start, item.span.end, "", text);
        prev_end = item.span.end;
    }
    // Comments after the last item, and any the rules above did not place.
    let rest: Vec<usize> = (0..f.comments.len()).filter(|&i| !f.used[i]).collect();
    if !rest.is_empty() && !file.items.is_empty() {
        f.out.push('\n');
    }
    for i in rest {
        f.used[i] = true;
        let c = f.comments[i].1.clone();
        f.out.push_str(&c);
        f.out.push('\n');
    }
    Ok(f.out)
}

/// Every `#` comment (outside strings) with its byte offset.
fn scan_comments(src: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_string = false;
    let mut it = src.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        match c {
            '"' => in_string = !in_string,
            '\n' => in_string = false,
            '#' if !in_string => {
                let end = src[i..].find('\n').map_or(src.len(), |e| i + e);
                out.push((i, src[i..end].trim_end().to_string()));
                while it.peek().is_some_and(|&(j, _)| j < end) {
                    it.next();
                }
            }
            _ => {}
        }
    }
    out
}

struct Formatter<'a> {
    src: &'a str,
    comments: Vec<(usize, String)>,
    used: Vec<bool>,
    out: String,
}

impl Formatter<'_> {
    /// Emit the unused comments that start in `[from, to)` on lines of their own.
    fn leading_into(&mut self, out: &mut String, from: usize, to: usize, indent: &str, blank_ok: bool) {
        let idx: Vec<usize> =
            (0..self.comments.len()).filter(|&i| !self.used[i] && self.comments[i].0 >= from && self.comments[i].0 < to).collect();
        let first = idx.first().map_or(to, |&i| self.comments[i].0);
        if blank_ok && has_blank_line(&self.src[from.min(first)..first]) {
            out.push('\n');
        }
        for i in idx {
            self.used[i] = true;
            out.push_str(indent);
            out.push_str(&self.comments[i].1);
            out.push('\n');
        }
    }

    fn leading(&mut self, from: usize, to: usize, indent: &str, blank_ok: bool) {
        let mut s = std::mem::take(&mut self.out);
        self.leading_into(&mut s, from, to, indent, blank_ok);
        self.out = s;
    }

    /// The comment trailing position `end` on the same line with nothing but separators
    /// between (a comment after several things on one line belongs to the last of them).
    fn trailing(&mut self, end: usize) -> Option<String> {
        let i = (0..self.comments.len()).find(|&i| {
            !self.used[i]
                && self.comments[i].0 >= end
                && self.src[end..self.comments[i].0].chars().all(|c| matches!(c, ' ' | '\t' | '\r' | ',' | ';' | ')' | '{'))
        })?;
        self.used[i] = true;
        Some(self.comments[i].1.clone())
    }

    /// Append an already formatted construct (spanning `start..end` in the source), moving
    /// comments left inside it to just before it and attaching a trailing one.
    fn slot_into(&mut self, out: &mut String, start: usize, end: usize, indent: &str, text: String) {
        self.leading_into(out, start, end, indent, false);
        out.push_str(indent);
        out.push_str(&text);
        if let Some(c) = self.trailing(end) {
            out.push_str("  ");
            out.push_str(&c);
        }
        out.push('\n');
    }

    fn emit_slot(&mut self, start: usize, end: usize, indent: &str, text: String) {
        let mut s = std::mem::take(&mut self.out);
        self.slot_into(&mut s, start, end, indent, text);
        self.out = s;
    }

    fn item(&mut self, item: &Item) -> String {
        let mut out = String::new();
        let mut prev = item.span.start;
        for a in &item.attrs {
            self.leading_into(&mut out, prev, a.span.start, "", false);
            self.slot_into(&mut out, a.span.start, a.span.end, "", format!("@{} \"{}\"", a.key.name, a.value));
            prev = a.span.end;
        }
        // Header elements: the input, then the hyper-parameters.
        let mut elems: Vec<(Span, String)> = Vec::new();
        if let Some(inp) = &item.input {
            let axes: Vec<String> = inp
                .axes
                .iter()
                .map(|a| match (&a.name, a.variadic) {
                    (Some(n), true) => format!("{}...", n.name),
                    (Some(n), false) => n.name.clone(),
                    (None, _) => "...".into(),
                })
                .collect();
            let twins: Vec<String> = inp.twins.iter().map(|t| format!("{} = {}", t.name.name, t.of.name)).collect();
            let with = if twins.is_empty() { String::new() } else { format!(" with {}", twins.join(", ")) };
            elems.push((inp.span, format!("{}[{}]{with}", inp.name.name, axes.join(", "))));
        }
        for h in &item.hparams {
            elems.push((h.span, hparam_text(h)));
        }
        let has_input = item.input.is_some();
        let header_start = item.name.span.end;
        let header_end = item.body.span.start;
        let header_has_comment = self.comments.iter().enumerate().any(|(i, c)| !self.used[i] && c.0 > header_start && c.0 < header_end);
        let kw = item.kind.keyword();
        let one_line = {
            let mut s = String::new();
            for (k, (_, t)) in elems.iter().enumerate() {
                if k > 0 {
                    s.push_str(if k == 1 && has_input { "; " } else { ", " });
                }
                s.push_str(t);
            }
            format!("{kw} {}({s}) {{", item.name.name)
        };
        let mut body_prev;
        if !header_has_comment && one_line.len() <= MAX_LINE {
            out.push_str(&one_line);
            body_prev = header_end + 1;
        } else {
            out.push_str(&format!("{kw} {}(\n", item.name.name));
            let mut p = header_start;
            for (k, (span, t)) in elems.iter().enumerate() {
                let sep = if k == 0 && has_input { ";" } else { "," };
                let sep = if k == 0 && has_input && elems.len() == 1 { "" } else { sep };
                self.leading_into(&mut out, p, span.start, INDENT, false);
                self.slot_into(&mut out, span.start, span.end, INDENT, format!("{t}{sep}"));
                p = span.end;
            }
            self.leading_into(&mut out, p, header_end, INDENT, false);
            out.push_str(") {");
            body_prev = header_end + 1;
        }
        // The body's statements.
        let body = self.stmts(&item.body, INDENT, &mut body_prev);
        out.push_str(&body);
        out.push('}');
        out
    }

    /// `{` already written: the statements of `block`, then the indentation of `}`.
    fn stmts(&mut self, block: &Block, indent: &str, prev: &mut usize) -> String {
        let mut out = String::from("\n");
        if block.stmts.is_empty() && !self.comments.iter().enumerate().any(|(i, c)| !self.used[i] && c.0 > block.span.start && c.0 < block.span.end) {
            out.clear();
            return out;
        }
        for (k, st) in block.stmts.iter().enumerate() {
            self.leading_into(&mut out, *prev, st.span.start, indent, k > 0);
            let text = self.stmt(st, indent);
            self.slot_into(&mut out, st.span.start, st.span.end, indent, text);
            *prev = st.span.end;
        }
        self.leading_into(&mut out, *prev, block.span.end, indent, false);
        out.push_str(&indent[INDENT.len()..]);
        out
    }

    fn block(&mut self, block: &Block, indent: &str) -> String {
        let inner = format!("{indent}{INDENT}");
        let mut prev = block.span.start + 1;
        let body = self.stmts(block, &inner, &mut prev);
        format!("{{{body}}}")
    }

    fn stmt(&mut self, st: &Stmt, indent: &str) -> String {
        let (head, value) = match &st.kind {
            StmtKind::Decl { kind, name, shape, init } => {
                let shape = shape.as_ref().map_or(String::new(), |s| format!("[{}]", axis_refs(s)));
                (format!("{} {}{shape} = ", kind.keyword(), name.name), init)
            }
            StmtKind::Let { name, value } => (format!("let {} = ", name.name), value),
            StmtKind::Assign { name, value } => (format!("{} = ", name.name), value),
            StmtKind::Return(e) => ("return ".to_string(), e),
            StmtKind::If { .. } => return self.if_stmt(st, indent),
            StmtKind::Repeat { count, body, .. } => return format!("repeat {count} {}", self.block(body, indent)),
        };
        let line = format!("{head}{}", expr(value));
        match &value.kind {
            // A call too long for one line gets one argument per line.
            ExprKind::Call { func, args } if indent.len() + line.len() > MAX_LINE && args.len() > 1 => {
                let mut s = format!("{head}{}(\n", func.name);
                for a in args {
                    s.push_str(&format!("{indent}{INDENT}{},\n", arg(a)));
                }
                s.push_str(indent);
                s.push(')');
                s
            }
            _ => line,
        }
    }

    fn if_stmt(&mut self, st: &Stmt, indent: &str) -> String {
        match &st.kind {
            StmtKind::If { branches, otherwise } => {
                let mut s = String::new();
                for (k, (cond, body)) in branches.iter().enumerate() {
                    if k > 0 {
                        s.push_str(" else ");
                    }
                    s.push_str(&format!("if {} ", expr(cond)));
                    s.push_str(&self.block(body, indent));
                }
                if let Some(b) = otherwise {
                    s.push_str(" else ");
                    s.push_str(&self.block(b, indent));
                }
                s
            }
            _ => unreachable!("only called for `if`"),
        }
    }
}

fn has_blank_line(gap: &str) -> bool {
    gap.split('\n').skip(1).collect::<Vec<_>>().iter().rev().skip(1).any(|l| l.trim().is_empty())
}

fn hparam_text(h: &HParam) -> String {
    let mut s = h.name.name.clone();
    if let Some(t) = &h.ty {
        s.push_str(&format!(": {}", t.name));
    }
    s.push_str(&format!(" = {}", h.default.text));
    if let Some(r) = &h.range {
        s.push_str(&format!(
            " in {}{}, {}{}",
            if r.lo_inclusive { "[" } else { "(" },
            r.lo.text,
            r.hi.text,
            if r.hi_inclusive { "]" } else { ")" }
        ));
    }
    if let Some(d) = &h.doc {
        s.push_str(&format!(" \"{d}\""));
    }
    s
}

const PREFIX_PREC: u8 = 6;
const ATOM_PREC: u8 = 8;

fn prec(e: &Expr) -> u8 {
    match &e.kind {
        ExprKind::Binary(op, _, _) => op.precedence(),
        ExprKind::Unary(..) => PREFIX_PREC,
        _ => ATOM_PREC,
    }
}

/// A chain of prefix operators ending in an atom: what may follow `^` unparenthesized.
fn is_prefixed_atom(e: &Expr) -> bool {
    match &e.kind {
        ExprKind::Unary(_, a) => is_prefixed_atom(a),
        _ => prec(e) == ATOM_PREC,
    }
}

fn paren(e: &Expr, need: bool) -> String {
    if need { format!("({})", expr(e)) } else { expr(e) }
}

pub fn expr(e: &Expr) -> String {
    match &e.kind {
        ExprKind::Num { text, .. } => text.clone(),
        ExprKind::Bool(b) => b.to_string(),
        ExprKind::Name(n) => n.clone(),
        ExprKind::Unary(op, a) => {
            let sym = if *op == UnOp::Neg { "-" } else { "!" };
            format!("{sym}{}", paren(a, prec(a) < PREFIX_PREC))
        }
        ExprKind::Binary(BinOp::Pow, l, r) => {
            format!("{}^{}", paren(l, prec(l) != ATOM_PREC), paren(r, !is_prefixed_atom(r)))
        }
        ExprKind::Binary(op, l, r) => {
            let p = op.precedence();
            format!("{} {} {}", paren(l, prec(l) < p), op.symbol(), paren(r, prec(r) <= p))
        }
        ExprKind::Call { func, args } => {
            let args: Vec<String> = args.iter().map(arg).collect();
            format!("{}({})", func.name, args.join(", "))
        }
    }
}

fn arg(a: &Arg) -> String {
    match a {
        Arg::Pos(e) => expr(e),
        Arg::Named(n, e) => format!("{} = {}", n.name, expr(e)),
        Arg::Over(refs, _) => format!("over {}", axis_refs(refs)),
    }
}

/// `c / groups, s`, as in `over` and in declaration shapes.
fn axis_refs(refs: &[AxisRef]) -> String {
    let r: Vec<String> = refs
        .iter()
        .map(|r| match &r.groups {
            None => r.axis.name.clone(),
            Some(GroupRef::Name(g)) => format!("{} / {}", r.axis.name, g.name),
            Some(GroupRef::Count(n, _)) => format!("{} / {n}", r.axis.name),
        })
        .collect();
    r.join(", ")
}
