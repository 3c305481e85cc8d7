//! Diagnostics: every error a user can cause points at a span of their text.
//! Rendering is plain text with no colour, so it is stable enough to snapshot.

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

/// Render diagnostics as text, rustc-style: the message, `--> file:line:col`, the source
/// line and carets under the span, then related spans and notes. (ariadne and miette draw a
/// bar rather than a caret under one-character spans, and a caret is what we promise.)
pub fn render(diags: &Diagnostics, file: &str, src: &str) -> String {
    let mut out = String::new();
    for d in &diags.0 {
        let (line, col) = line_col(src, d.span.start);
        let width = gutter_width(src, d);
        let pad = " ".repeat(width);
        out.push_str(&format!("error: {}\n{pad}--> {file}:{line}:{col}\n", d.message));
        snippet(&mut out, src, d.span, '^', &d.label, width);
        for (span, label) in &d.related {
            let (l, c) = line_col(src, span.start);
            out.push_str(&format!("{pad}::: {file}:{l}:{c}\n"));
            snippet(&mut out, src, *span, '-', label, width);
        }
        for n in &d.notes {
            out.push_str(&format!("{pad} = note: {n}\n"));
        }
    }
    out
}

fn gutter_width(src: &str, d: &Diagnostic) -> usize {
    let max_line = std::iter::once(d.span).chain(d.related.iter().map(|r| r.0)).map(|s| line_col(src, s.start).0).max().unwrap_or(1);
    max_line.to_string().len() + 1
}

/// Longest stretch of a source line shown; longer lines are cut around the span.
const WINDOW: usize = 100;

fn snippet(out: &mut String, src: &str, span: Span, mark: char, label: &str, width: usize) {
    let start = floor_char_boundary(src, span.start.min(src.len()));
    let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
    let text: Vec<char> = src[line_start..line_end].chars().map(visible_char).collect();
    let col = src[line_start..start].chars().count();
    let span_end = floor_char_boundary(src, span.end.clamp(start, line_end));
    let len = src[start..span_end].chars().count().max(1);
    // Cut long lines to a window that holds the start of the span.
    let from = if text.len() > WINDOW { col.saturating_sub(WINDOW / 3) } else { 0 };
    let to = (from + WINDOW).min(text.len());
    let mut shown: String = text[from..to].iter().collect();
    let mut caret_col = col - from;
    if from > 0 {
        shown.insert_str(0, "...");
        caret_col += 3;
    }
    if to < text.len() {
        shown.push_str("...");
    }
    let len = len.min(to.saturating_sub(col).max(1));
    let pad = " ".repeat(width);
    let (line, _) = line_col(src, start);
    out.push_str(&format!("{pad} |\n{line:>width$} | {}\n", shown.trim_end()));
    out.push_str(&format!("{pad} | {}{} {label}\n", " ".repeat(caret_col), mark.to_string().repeat(len)));
}

/// Tabs as one space, control characters as their Unicode "control picture", so that columns
/// line up and snapshots stay printable.
fn visible_char(c: char) -> char {
    match c {
        '\t' => ' ',
        '\r' => ' ',
        c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('?'),
        '\u{7f}' => '\u{2421}',
        c => c,
    }
}
