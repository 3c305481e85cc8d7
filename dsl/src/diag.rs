//! Diagnostics: every error a user can cause points at a span of their text.
//! Rendering goes through ariadne in plain ASCII, so the output is stable enough to snapshot.

use crate::ast::Span;
use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub message: String,
    pub span: Span,
    pub label: String,
    pub notes: Vec<String>,
    pub related: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn new(span: Span, message: impl Into<String>, label: impl Into<String>) -> Self {
        Diagnostic { message: message.into(), span, label: label.into(), notes: vec![], related: vec![] }
    }
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }
    pub fn related(mut self, span: Span, label: impl Into<String>) -> Self {
        self.related.push((span, label.into()));
        self
    }
}

/// One or more errors from one source text.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Diagnostics(vec![d])
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {} (bytes {}..{})", d.message, d.span.start, d.span.end)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(src, offset.min(src.len()));
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Widen empty spans to one character (or the end of file) so the caret is visible, and keep
/// spans on char boundaries.
fn visible(src: &str, span: Span) -> std::ops::Range<usize> {
    let start = floor_char_boundary(src, span.start.min(src.len()));
    let mut end = floor_char_boundary(src, span.end.min(src.len())).max(start);
    if end == start {
        end = src[start..].chars().next().map_or(start, |c| start + c.len_utf8());
    }
    start..end
}

/// Render diagnostics as text: `file:line:col`, the source line, carets under the span.
pub fn render(diags: &Diagnostics, file: &str, src: &str) -> String {
    use ariadne::{CharSet, Config, IndexType, Label, Report, ReportKind, Source};
    let mut out = Vec::new();
    for d in &diags.0 {
        let (line, col) = line_col(src, d.span.start);
        let primary = visible(src, d.span);
        let mut report = Report::build(ReportKind::Error, (file, primary.clone()))
            .with_config(
                Config::default()
                    .with_color(false)
                    .with_char_set(CharSet::Ascii)
                    .with_index_type(IndexType::Byte)
                    .with_compact(false),
            )
            .with_message(format!("{file}:{line}:{col}: {}", d.message))
            .with_label(Label::new((file, primary)).with_message(&d.label).with_order(0));
        for (i, (span, label)) in d.related.iter().enumerate() {
            report = report.with_label(
                Label::new((file, visible(src, *span))).with_message(label).with_order(i as i32 + 1),
            );
        }
        for n in &d.notes {
            report = report.with_note(n);
        }
        let mut buf = Vec::new();
        // Writing into a Vec cannot fail; fall back to the plain form if ariadne ever does.
        if report.finish().write((file, Source::from(src)), &mut buf).is_err() {
            buf = format!("error: {file}:{line}:{col}: {}\n", d.message).into_bytes();
        }
        out.extend(buf);
    }
    String::from_utf8_lossy(&out).into_owned()
}
