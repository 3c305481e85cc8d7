//! The syntax tree: what the user wrote, with a span on everything a diagnostic can point at.
//! Nothing here is checked yet; `check` turns it into the IR.

use serde::{Deserialize, Serialize};

/// Byte range into the source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span { start, end }
    }
    pub fn join(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ItemKind {
    Layer,
    Reparam,
    Optimizer,
}

impl ItemKind {
    pub fn keyword(self) -> &'static str {
        match self {
            ItemKind::Layer => "layer",
            ItemKind::Reparam => "reparam",
            ItemKind::Optimizer => "optimizer",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub attrs: Vec<Attr>,
    pub kind: ItemKind,
    pub name: Ident,
    pub input: Option<Input>,
    pub hparams: Vec<HParam>,
    pub body: Block,
    pub span: Span,
}

/// `@paper "..."`: metadata carried into the registry.
#[derive(Clone, Debug, PartialEq)]
pub struct Attr {
    pub key: Ident,
    pub value: String,
    pub span: Span,
}

/// `x[n, c, s...]`: the tensor a layer normalizes or an optimizer updates, with named axes.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    pub name: Ident,
    pub axes: Vec<AxisDecl>,
    /// `with j = o`: axes the input lacks, each as long as one it has.
    pub twins: Vec<TwinDecl>,
    pub span: Span,
}

/// `j = o`: axis `j`, of the same length as the input's axis `o`.
#[derive(Clone, Debug, PartialEq)]
pub struct TwinDecl {
    pub name: Ident,
    pub of: Ident,
    pub span: Span,
}

/// One declared axis; `variadic` axes (`s...`, or the anonymous `...`) match zero or more dims.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisDecl {
    pub name: Option<Ident>,
    pub variadic: bool,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HParam {
    pub name: Ident,
    pub ty: Option<Ident>,
    pub default: Literal,
    pub range: Option<RangeSpec>,
    pub doc: Option<String>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub value: LitValue,
    /// The spelling, kept so the formatter does not rewrite `1e-5` as `0.00001`.
    pub text: String,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LitValue {
    Num(f64),
    Bool(bool),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RangeSpec {
    pub lo: Literal,
    pub hi: Literal,
    pub lo_inclusive: bool,
    pub hi_inclusive: bool,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stmt {
    pub kind: StmtKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclKind {
    Param,
    Buffer,
    State,
}

impl DeclKind {
    pub fn keyword(self) -> &'static str {
        match self {
            DeclKind::Param => "param",
            DeclKind::Buffer => "buffer",
            DeclKind::State => "state",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum StmtKind {
    /// `shape` names axes, or groups of an axis (`weight[c / groups]`: one value per group).
    Decl { kind: DeclKind, name: Ident, shape: Option<Vec<AxisRef>>, init: Expr },
    Let { name: Ident, value: Expr },
    Assign { name: Ident, value: Expr },
    Return(Expr),
    /// `if c {..} else if c2 {..} else {..}`, flattened so long chains need no recursion.
    If { branches: Vec<(Expr, Block)>, otherwise: Option<Block> },
    /// `repeat n { .. }`: the block n times in a row.
    Repeat { count: u32, count_span: Span, body: Block },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Pow,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Pow => "^",
        }
    }
    /// Binding strength of infix operators; prefix operators bind at 6, `^` at 7.
    pub fn precedence(self) -> u8 {
        match self {
            BinOp::Or => 1,
            BinOp::And => 2,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => 3,
            BinOp::Add | BinOp::Sub => 4,
            BinOp::Mul | BinOp::Div => 5,
            BinOp::Pow => 7,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    Num { value: f64, text: String },
    Bool(bool),
    Name(String),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Call { func: Ident, args: Vec<Arg> },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Pos(Expr),
    Named(Ident, Expr),
    Over(Vec<AxisRef>, Span),
}

/// `d` or `c / groups` inside `over`: a whole axis, or the groups of one.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisRef {
    pub axis: Ident,
    pub groups: Option<GroupRef>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum GroupRef {
    Name(Ident),
    Count(u32, Span),
}
