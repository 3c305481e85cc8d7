//! Text -> AST. pest does the matching; this module builds the tree, turns pest's errors into
//! diagnostics and bounds nesting so that no input can overflow the stack.

use crate::ast::*;
use crate::diag::{Diagnostic, Diagnostics};
use pest::iterators::Pair;
use pest::Parser as _;

#[derive(pest_derive::Parser)]
#[grammar = "grammar.pest"]
struct NfParser;

/// Deepest bracket nesting accepted. pest recurses per level, so this bounds its stack use.
pub const MAX_BRACKET_DEPTH: usize = 64;
/// Deepest expression tree accepted (operators chained without `let`), bounding every
/// recursive walk over expressions later on.
pub const MAX_EXPR_DEPTH: usize = 200;

pub fn parse(src: &str) -> Result<File, Diagnostics> {
    // Ask pest to record the tokens it expected, for "expected `)`" in messages.
    pest::set_error_detail(true);
    check_nesting(src)?;
    let mut pairs = NfParser::parse(Rule::file, src).map_err(|e| Diagnostics::from(syntax_error(src, e)))?;
    let file = pairs.next().expect("the file rule always yields one pair");
    let mut items = Vec::new();
    for p in file.into_inner() {
        if p.as_rule() == Rule::item {
            items.push(item(p)?);
        }
    }
    Ok(File { items })
}

/// Parse one expression (used by tests and tools that evaluate snippets).
pub fn parse_expr(src: &str) -> Result<Expr, Diagnostics> {
    check_nesting(src)?;
    let mut pairs = NfParser::parse(Rule::expr, src).map_err(|e| Diagnostics::from(syntax_error(src, e)))?;
    let p = pairs.next().expect("the expr rule yields one pair");
    let end = p.as_span().end();
    if src[end..].trim().is_empty() {
        expr(p)
    } else {
        Err(Diagnostic::new(Span::new(end, src.len()), "unexpected text after the expression", "not part of the expression").into())
    }
}

/// A pair's span without the whitespace and comments pest may have skipped at its end
/// (rules ending in an optional part keep the skipped text).
fn span_of(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    let src = s.get_input();
    let start = s.start();
    let mut end = s.end();
    loop {
        end = start + src[start..end].trim_end().len();
        let line_start = src[..end].rfind('\n').map_or(0, |i| i + 1).max(start);
        match comment_start(&src[line_start..end]) {
            Some(c) => end = line_start + c,
            None => break,
        }
    }
    Span::new(start, end)
}

/// Where a `#` comment starts in one line, outside strings.
fn comment_start(line: &str) -> Option<usize> {
    let mut in_string = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_string = !in_string,
            '#' if !in_string => return Some(i),
            _ => {}
        }
    }
    None
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident { name: p.as_str().to_string(), span: span_of(&p) }
}

/// Reject brackets nested deeper than [`MAX_BRACKET_DEPTH`] before pest sees them.
fn check_nesting(src: &str) -> Result<(), Diagnostics> {
    let mut depth = 0usize;
    let mut chars = src.char_indices().peekable();
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => in_string = !in_string,
            '\n' => in_string = false,
            '#' if !in_string => {
                while let Some(&(_, c)) = chars.peek() {
                    if c == '\n' {
                        break;
                    }
                    chars.next();
                }
            }
            '(' | '[' | '{' if !in_string => {
                depth += 1;
                if depth > MAX_BRACKET_DEPTH {
                    return Err(Diagnostic::new(
                        Span::new(i, i + 1),
                        format!("brackets nested more than {MAX_BRACKET_DEPTH} deep"),
                        "too deep",
                    )
                    .note("name intermediate values with `let`")
                    .into());
                }
            }
            ')' | ']' | '}' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn rule_name(r: Rule) -> &'static str {
    match r {
        Rule::EOI => "end of file",
        Rule::item | Rule::layer | Rule::reparam | Rule::optimizer => "`layer`, `reparam` or `optimizer`",
        Rule::attribute => "an attribute (`@name \"text\"`)",
        Rule::string => "a string",
        Rule::input => "an input with axes, like `x[..., d]`",
        Rule::axis | Rule::ellipsis => "an axis",
        Rule::hparams | Rule::hparam => "a hyper-parameter (`name: type = default`)",
        Rule::ty => "a type",
        Rule::literal | Rule::neg => "a literal",
        Rule::range => "a range (`in [lo, hi]`)",
        Rule::lbracket => "`[` or `(`",
        Rule::rbracket => "`]` or `)`",
        Rule::block => "`{`",
        Rule::stmt | Rule::decl | Rule::let_stmt | Rule::return_stmt | Rule::if_stmt | Rule::repeat_stmt | Rule::assign => {
            "a statement"
        }
        Rule::twins | Rule::twin => "`with j = o`",
        Rule::decl_kind => "`param`, `buffer` or `state`",
        Rule::else_if | Rule::else_block => "`else`",
        Rule::shape => "a shape",
        Rule::expr | Rule::operand | Rule::primary | Rule::call | Rule::prefix => "an expression",
        Rule::pow => "an operator",
        Rule::infix => "an operator",
        Rule::arg | Rule::named => "an argument",
        Rule::over => "`over`",
        Rule::axis_ref => "an axis name",
        Rule::ident => "a name",
        Rule::boolean => "`true` or `false`",
        Rule::number | Rule::int => "a number",
        Rule::keyword => "a keyword",
        Rule::file => "`layer`, `reparam` or `optimizer`",
        Rule::WHITESPACE | Rule::COMMENT => "input",
    }
}

/// What stands at `pos`, for "found ..." in messages, and its span.
fn found_at(src: &str, pos: usize) -> (String, Span) {
    let rest = &src[pos.min(src.len())..];
    let Some(c) = rest.chars().next() else {
        return ("end of file".into(), Span::new(src.len(), src.len()));
    };
    let len = if c.is_alphanumeric() || c == '_' {
        rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.')).unwrap_or(rest.len())
    } else {
        c.len_utf8()
    };
    let tok = &rest[..len];
    let what = if c.is_control() {
        format!("the control character U+{:04X}", c as u32)
    } else if is_keyword(tok) {
        format!("the keyword `{tok}`")
    } else {
        format!("`{tok}`")
    };
    (what, Span::new(pos, pos + len))
}

pub fn is_keyword(s: &str) -> bool {
    matches!(
        s,
        "layer" | "reparam" | "optimizer" | "param" | "buffer" | "state" | "let" | "return" | "if" | "else" | "over"
            | "true" | "false" | "in"
    )
}

/// Punctuation worth naming in "expected ..." (operators are summed up as "an operator").
const STRUCTURAL: &[&str] = &[")", "]", "}", "[", "{", ";", ",", "=", ":"];

fn syntax_error(src: &str, e: pest::error::Error<Rule>) -> Diagnostic {
    let mut pos = match e.location {
        pest::error::InputLocation::Pos(p) => p,
        pest::error::InputLocation::Span((s, _)) => s,
    };
    let mut expected: Vec<String> = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => positives.iter().map(|r| rule_name(*r).to_string()).collect(),
        pest::error::ErrorVariant::CustomError { .. } => vec![],
    };
    // pest's rule-level report can stop short of the furthest point reached; where the
    // furthest point expected closing punctuation, report that instead.
    if let Some(att) = e.parse_attempts() {
        let tokens: Vec<String> = att
            .expected_tokens()
            .iter()
            .map(|t| t.to_string())
            .filter(|t| STRUCTURAL.contains(&t.as_str()))
            .map(|t| format!("`{t}`"))
            .collect();
        if att.max_position >= pos && !tokens.is_empty() {
            if att.max_position > pos {
                expected.clear();
            }
            pos = att.max_position;
            expected.extend(tokens);
        }
    }
    expected.retain(|n| n != "input");
    expected.sort();
    expected.dedup();
    let (found, span) = found_at(src, pos);
    let expected = match expected.len() {
        0 => "something else".to_string(),
        1 => expected[0].clone(),
        n => format!("{} or {}", expected[..n - 1].join(", "), expected[n - 1]),
    };
    let mut d = Diagnostic::new(span, format!("syntax error: expected {expected}, found {found}"), format!("expected {expected}"));
    if src.chars().all(|c| matches!(c, ' ' | '\t' | '\r' | '\n')) {
        d = d.note("the file is empty: it should define at least one `layer`, `reparam` or `optimizer`");
    }
    if src[span.start.min(src.len())..].starts_with('"') {
        d = d.note("a string must end on the line where it starts");
    }
    for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
        let before = &src[..pos.min(src.len())];
        if span.start >= src.len() && before.matches(open).count() > before.matches(close).count() {
            d = d.note(format!("a `{open}` is never closed"));
        }
    }
    d
}

fn item(p: Pair<Rule>) -> Result<Item, Diagnostics> {
    let span = span_of(&p);
    let mut attrs = Vec::new();
    let mut def = None;
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::attribute => {
                let aspan = span_of(&c);
                let mut it = c.into_inner();
                let key = ident(it.next().unwrap());
                let value = unquote(it.next().unwrap().as_str());
                attrs.push(Attr { key, value, span: aspan });
            }
            _ => def = Some(c),
        }
    }
    let def = def.expect("grammar: item ends in a definition");
    let kind = match def.as_rule() {
        Rule::layer => ItemKind::Layer,
        Rule::reparam => ItemKind::Reparam,
        _ => ItemKind::Optimizer,
    };
    let mut name = None;
    let mut input_decl = None;
    let mut hparams = Vec::new();
    let mut body = None;
    for c in def.into_inner() {
        match c.as_rule() {
            Rule::ident => name = Some(ident(c)),
            Rule::input => input_decl = Some(input(c)),
            Rule::hparams => {
                for h in c.into_inner() {
                    hparams.push(hparam(h)?);
                }
            }
            Rule::block => body = Some(block(c)?),
            r => unreachable!("grammar: unexpected {r:?} in a definition"),
        }
    }
    Ok(Item { attrs, kind, name: name.unwrap(), input: input_decl, hparams, body: body.unwrap(), span })
}

fn unquote(s: &str) -> String {
    s[1..s.len() - 1].to_string()
}

fn input(p: Pair<Rule>) -> Input {
    let span = span_of(&p);
    let mut it = p.into_inner();
    let name = ident(it.next().unwrap());
    let mut twins = Vec::new();
    let axes = it
        .filter(|a| {
            if a.as_rule() != Rule::twins {
                return true;
            }
            for t in a.clone().into_inner() {
                let tspan = span_of(&t);
                let mut names = t.into_inner().map(ident);
                let (name, of) = (names.next().unwrap(), names.next().unwrap());
                twins.push(TwinDecl { name, of, span: tspan });
            }
            false
        })
        .map(|a| {
            let aspan = span_of(&a);
            let mut name = None;
            let mut variadic = false;
            for c in a.into_inner() {
                match c.as_rule() {
                    Rule::ident => name = Some(ident(c)),
                    _ => variadic = true,
                }
            }
            AxisDecl { name, variadic, span: aspan }
        })
        .collect();
    Input { name, axes, twins, span }
}

fn hparam(p: Pair<Rule>) -> Result<HParam, Diagnostics> {
    let span = span_of(&p);
    let mut it = p.into_inner();
    let name = ident(it.next().unwrap());
    let mut ty = None;
    let mut default = None;
    let mut range = None;
    let mut doc = None;
    for c in it {
        match c.as_rule() {
            Rule::ty => ty = Some(ident(c.into_inner().next().unwrap())),
            Rule::literal => default = Some(literal(c)?),
            Rule::range => {
                let rspan = span_of(&c);
                let mut r = c.into_inner();
                let lo_inclusive = r.next().unwrap().as_str() == "[";
                let lo = literal(r.next().unwrap())?;
                let hi = literal(r.next().unwrap())?;
                let hi_inclusive = r.next().unwrap().as_str() == "]";
                range = Some(RangeSpec { lo, hi, lo_inclusive, hi_inclusive, span: rspan });
            }
            Rule::string => doc = Some(unquote(c.as_str())),
            r => unreachable!("grammar: unexpected {r:?} in a hyper-parameter"),
        }
    }
    Ok(HParam { name, ty, default: default.unwrap(), range, doc, span })
}

fn literal(p: Pair<Rule>) -> Result<Literal, Diagnostics> {
    let span = span_of(&p);
    let text: String = p.as_str().split_whitespace().collect();
    let mut negative = false;
    let mut value = LitValue::Bool(false);
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::neg => negative = true,
            Rule::boolean => value = LitValue::Bool(c.as_str() == "true"),
            _ => {
                let v = number(&c)?;
                value = LitValue::Num(if negative { -v } else { v });
            }
        }
    }
    Ok(Literal { value, text, span })
}

fn number(p: &Pair<Rule>) -> Result<f64, Diagnostics> {
    let v: f64 = p.as_str().parse().map_err(|_| Diagnostic::new(span_of(p), "malformed number", "not a number"))?;
    if !v.is_finite() {
        return Err(Diagnostic::new(span_of(p), "number out of range", "does not fit in a 64-bit float").into());
    }
    Ok(v)
}

fn block(p: Pair<Rule>) -> Result<Block, Diagnostics> {
    let span = span_of(&p);
    let stmts = p.into_inner().map(stmt).collect::<Result<_, _>>()?;
    Ok(Block { stmts, span })
}

fn stmt(p: Pair<Rule>) -> Result<Stmt, Diagnostics> {
    let inner = p.into_inner().next().unwrap();
    let span = span_of(&inner);
    let kind = match inner.as_rule() {
        Rule::decl => {
            let mut it = inner.into_inner();
            let kind = match it.next().unwrap().as_str() {
                "param" => DeclKind::Param,
                "buffer" => DeclKind::Buffer,
                _ => DeclKind::State,
            };
            let name = ident(it.next().unwrap());
            let mut shape = None;
            let mut init = None;
            for c in it {
                match c.as_rule() {
                    Rule::shape => shape = Some(c.into_inner().map(axis_ref).collect()),
                    _ => init = Some(expr(c)?),
                }
            }
            StmtKind::Decl { kind, name, shape, init: init.unwrap() }
        }
        Rule::let_stmt => {
            let mut it = inner.into_inner();
            let name = ident(it.next().unwrap());
            StmtKind::Let { name, value: expr(it.next().unwrap())? }
        }
        Rule::assign => {
            let mut it = inner.into_inner();
            let name = ident(it.next().unwrap());
            StmtKind::Assign { name, value: expr(it.next().unwrap())? }
        }
        Rule::return_stmt => StmtKind::Return(expr(inner.into_inner().next().unwrap())?),
        Rule::if_stmt => {
            let mut branches = Vec::new();
            let mut otherwise = None;
            let mut it = inner.into_inner();
            let cond = expr(it.next().unwrap())?;
            branches.push((cond, block(it.next().unwrap())?));
            for c in it {
                match c.as_rule() {
                    Rule::else_if => {
                        let mut e = c.into_inner();
                        let cond = expr(e.next().unwrap())?;
                        branches.push((cond, block(e.next().unwrap())?));
                    }
                    _ => otherwise = Some(block(c.into_inner().next().unwrap())?),
                }
            }
            StmtKind::If { branches, otherwise }
        }
        Rule::repeat_stmt => {
            let mut it = inner.into_inner();
            let n = it.next().unwrap();
            let count_span = span_of(&n);
            let count = n.as_str().parse().map_err(|_| {
                Diagnostic::new(count_span, "repeat count out of range", "too large").note("repeat at most 100 times")
            })?;
            StmtKind::Repeat { count, count_span, body: block(it.next().unwrap())? }
        }
        r => unreachable!("grammar: unexpected {r:?} in a statement"),
    };
    Ok(Stmt { kind, span })
}

/// An expression tree node under construction, with the depth of its subtree.
struct Built {
    expr: Expr,
    depth: usize,
}

fn too_deep(span: Span) -> Diagnostics {
    // Point at where the limit was crossed, not at the whole (possibly huge) subtree.
    let at = Span::new(span.start, span.start + 1);
    Diagnostic::new(at, format!("expression nested more than {MAX_EXPR_DEPTH} levels deep"), "too deep")
        .note("split it into steps with `let`")
        .into()
}

fn node(kind: ExprKind, span: Span, depth: usize) -> Result<Built, Diagnostics> {
    if depth > MAX_EXPR_DEPTH {
        return Err(too_deep(span));
    }
    Ok(Built { expr: Expr { kind, span }, depth })
}

fn infix_op(s: &str) -> BinOp {
    match s {
        "||" => BinOp::Or,
        "&&" => BinOp::And,
        "==" => BinOp::Eq,
        "!=" => BinOp::Ne,
        "<" => BinOp::Lt,
        "<=" => BinOp::Le,
        ">" => BinOp::Gt,
        ">=" => BinOp::Ge,
        "+" => BinOp::Add,
        "-" => BinOp::Sub,
        "*" => BinOp::Mul,
        _ => BinOp::Div,
    }
}

/// Precedence climbing without recursion: an operand stack and an operator stack.
fn expr(p: Pair<Rule>) -> Result<Expr, Diagnostics> {
    Ok(expr_built(p)?.expr)
}

fn expr_built(p: Pair<Rule>) -> Result<Built, Diagnostics> {
    let mut operands: Vec<Built> = Vec::new();
    let mut ops: Vec<BinOp> = Vec::new();
    fn reduce(operands: &mut Vec<Built>, op: BinOp) -> Result<(), Diagnostics> {
        let r = operands.pop().unwrap();
        let l = operands.pop().unwrap();
        let span = l.expr.span.join(r.expr.span);
        let depth = l.depth.max(r.depth) + 1;
        if depth > MAX_EXPR_DEPTH {
            return Err(too_deep(r.expr.span));
        }
        operands.push(node(ExprKind::Binary(op, Box::new(l.expr), Box::new(r.expr)), span, depth)?);
        Ok(())
    }
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::operand => operands.push(operand(c)?),
            _ => {
                let op = infix_op(c.as_str());
                while let Some(&top) = ops.last() {
                    if top.precedence() >= op.precedence() {
                        ops.pop();
                        reduce(&mut operands, top)?;
                    } else {
                        break;
                    }
                }
                ops.push(op);
            }
        }
    }
    while let Some(op) = ops.pop() {
        reduce(&mut operands, op)?;
    }
    Ok(operands.pop().unwrap())
}

fn operand(p: Pair<Rule>) -> Result<Built, Diagnostics> {
    // prefix* primary (^ prefix* primary)?: prefixes before the base apply to the whole power.
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut base = None;
    let mut exponent = None;
    for c in p.into_inner() {
        match c.as_rule() {
            Rule::prefix => {
                let op = if c.as_str() == "-" { UnOp::Neg } else { UnOp::Not };
                let start = span_of(&c).start;
                if base.is_none() { before.push((op, start)) } else { after.push((op, start)) }
            }
            Rule::primary => {
                let b = primary(c)?;
                if base.is_none() { base = Some(b) } else { exponent = Some(b) }
            }
            _ => {} // `^`
        }
    }
    let apply = |mut b: Built, prefixes: Vec<(UnOp, usize)>| -> Result<Built, Diagnostics> {
        for (op, start) in prefixes.into_iter().rev() {
            let span = Span::new(start, b.expr.span.end);
            let depth = b.depth + 1;
            b = node(ExprKind::Unary(op, Box::new(b.expr)), span, depth)?;
        }
        Ok(b)
    };
    let mut b = base.unwrap();
    if let Some(e) = exponent {
        let e = apply(e, after)?;
        let span = b.expr.span.join(e.expr.span);
        let depth = b.depth.max(e.depth) + 1;
        b = node(ExprKind::Binary(BinOp::Pow, Box::new(b.expr), Box::new(e.expr)), span, depth)?;
    }
    apply(b, before)
}

fn primary(p: Pair<Rule>) -> Result<Built, Diagnostics> {
    let span = span_of(&p);
    let inner = p.into_inner().next().unwrap();
    match inner.as_rule() {
        Rule::number => {
            let value = number(&inner)?;
            node(ExprKind::Num { value, text: inner.as_str().to_string() }, span, 1)
        }
        Rule::boolean => node(ExprKind::Bool(inner.as_str() == "true"), span, 1),
        Rule::ident => node(ExprKind::Name(inner.as_str().to_string()), span, 1),
        Rule::expr => {
            // Parentheses: keep the inner tree, widen nothing (the formatter re-derives them).
            expr_built(inner)
        }
        Rule::call => {
            let mut it = inner.into_inner();
            let func = ident(it.next().unwrap());
            let mut args = Vec::new();
            let mut depth = 1;
            for a in it {
                let a = a.into_inner().next().unwrap();
                let arg = match a.as_rule() {
                    Rule::over => {
                        let ospan = span_of(&a);
                        let refs = a.into_inner().map(axis_ref).collect();
                        Arg::Over(refs, ospan)
                    }
                    Rule::named => {
                        let mut n = a.into_inner();
                        let name = ident(n.next().unwrap());
                        let v = expr_built(n.next().unwrap())?;
                        depth = depth.max(v.depth + 1);
                        Arg::Named(name, v.expr)
                    }
                    _ => {
                        let v = expr_built(a)?;
                        depth = depth.max(v.depth + 1);
                        Arg::Pos(v.expr)
                    }
                };
                args.push(arg);
            }
            node(ExprKind::Call { func, args }, span, depth)
        }
        r => unreachable!("grammar: unexpected {r:?} in a primary"),
    }
}

fn axis_ref(p: Pair<Rule>) -> AxisRef {
    let span = span_of(&p);
    let mut it = p.into_inner();
    let axis = ident(it.next().unwrap());
    let groups = it.next().map(|g| match g.as_rule() {
        Rule::int => {
            let gspan = span_of(&g);
            GroupRef::Count(g.as_str().parse().unwrap_or(u32::MAX), gspan)
        }
        _ => GroupRef::Name(ident(g)),
    });
    AxisRef { axis, groups, span }
}
