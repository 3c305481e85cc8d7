//! The formatter on hand-written messy input: canonical layout (snapshot), comments kept in
//! place, idempotent.

use normforge::dsl;

const MESSY: &str = r#"# A file comment.
@paper   "Somebody 2024"   # trailing on an attribute
layer   messy ( x [ n , c , s ... ] ; eps:float=1e-5 in (0,1) "doc" ,  # eps
   momentum = 0.1 ,
) {
  param weight [ c ] = 1 ;  param bias[c]=0
  # leading comment


  let m = mean( x , over n,s )   # the mean
  if train { return ((x - m)) * weight + bias } else {
     # eval branch
     return (x - m) * (weight) + -bias
  }
}
optimizer    o( lr = 0.1 ) { p = p - lr * (g + 2 ^ -t) ; }
# the end
"#;

#[test]
fn messy_input_takes_the_canonical_form() {
    let out = dsl::fmt::format(MESSY).unwrap();
    insta::assert_snapshot!(out);
    assert_eq!(dsl::fmt::format(&out).unwrap(), out, "not idempotent");
    for c in ["# A file comment.", "# trailing on an attribute", "# eps", "# leading comment", "# the mean", "# eval branch", "# the end"] {
        assert!(out.contains(c), "lost comment {c:?}:\n{out}");
    }
    assert_eq!(dsl::compile(MESSY).unwrap(), dsl::compile(&out).unwrap());
}

/// Fully parenthesised form, without spans: equal trees print equal.
fn tree(e: &dsl::ast::Expr) -> String {
    use dsl::ast::{ExprKind, UnOp};
    match &e.kind {
        ExprKind::Unary(op, a) => format!("({}{})", if *op == UnOp::Neg { "-" } else { "!" }, tree(a)),
        ExprKind::Binary(op, l, r) => format!("({} {} {})", tree(l), op.symbol(), tree(r)),
        _ => dsl::fmt::expr(e),
    }
}

#[test]
fn parentheses_are_kept_exactly_where_needed() {
    for (src, want) in [
        ("a - (b - c)", "a - (b - c)"),
        ("(a - b) - c", "a - b - c"),
        ("(a + b) * c", "(a + b) * c"),
        ("a + (b * c)", "a + b * c"),
        ("-(a^2)", "-a^2"),
        ("(-a)^2", "(-a)^2"),
        ("a^(-b)", "a^-b"),
        ("(a^b)^c", "(a^b)^c"),
        ("a^(b^c)", "a^(b^c)"),
        ("!(a < b)", "!(a < b)"),
        ("(a < b) && (c > d) || e", "a < b && c > d || e"),
        ("a && (b || c)", "a && (b || c)"),
        ("- -a", "--a"),
        ("f(x, over c / groups, s)", "f(x, over c / groups, s)"),
    ] {
        let e = dsl::parser::parse_expr(src).unwrap();
        let printed = dsl::fmt::expr(&e);
        assert_eq!(printed, want, "{src}");
        assert_eq!(tree(&dsl::parser::parse_expr(&printed).unwrap()), tree(&e), "{src} changed meaning");
    }
}
