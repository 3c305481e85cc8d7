//! normforge's DSL front end: `.nf` text -> AST (spans kept) -> checked IR with derived
//! backward passes. Backends depend on this crate; it depends on none of them.
//!
//! Where things live: `grammar.pest` + `parser` (text -> AST), `check` (AST -> IR, all user
//! errors), `builder` (hash-consed graph construction), `autodiff` (backward programs), `ir`
//! and `text` (the IR and its stable text form), `fmt` (the formatter), `hyper` (run-time
//! hyper-parameter values), `diag` (rendering errors).

pub mod ast;
pub mod autodiff;
pub mod bind;
pub mod builder;
pub mod check;
pub mod diag;
pub mod fmt;
pub mod hyper;
pub mod ir;
pub mod parser;
pub mod suggest;
pub mod text;
pub mod uniform;

pub use diag::{Diagnostic, Diagnostics};

/// A run-time error with a message: bad hyper-parameter values, shapes that do not fit the
/// declared axes. Backends report their own run-time errors with it too.
#[derive(Clone, Debug, PartialEq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
pub use ir::Entry;

/// Parse and check a source text.
pub fn compile(src: &str) -> Result<Vec<Entry>, Diagnostics> {
    let file = parser::parse(src)?;
    if file.items.is_empty() {
        return Err(Diagnostic::new(ast::Span::new(0, 0), "no definitions in this file", "expected `layer`, `reparam` or `optimizer`")
            .note("a file defines at least one `layer`, `reparam` or `optimizer`")
            .into());
    }
    check::check_file(&file)
}

/// Read a file's bytes as source text; invalid UTF-8 is a diagnostic at its first bad byte.
pub fn source_from_bytes(bytes: &[u8]) -> Result<String, (String, Diagnostics)> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let lossy = String::from_utf8_lossy(bytes).into_owned();
            // Offsets shift in the lossy text only after the first bad byte, so `at` holds.
            let d = Diagnostic::new(ast::Span::new(at, at + 1), "the file is not valid UTF-8 text", "invalid byte here")
                .note("normforge specs are UTF-8 text files");
            Err((lossy, d.into()))
        }
    }
}
