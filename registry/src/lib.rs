//! The registry: checked entries by name, with where each came from.
//!
//! Built-in specs reach it through `inventory` (a crate submits [`StaticSource`]s and they
//! are found at start-up wherever that crate is linked); `.nf` files and strings are loaded at
//! run time. Loading is all or nothing: a source with any error adds no entry.

use normforge_dsl::{diag, ir::Entry, suggest, Diagnostics};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A `.nf` source compiled into a crate, submitted with `inventory::submit!`.
pub struct StaticSource {
    /// Where it came from, for messages and listings (e.g. `std/layer_norm.nf`).
    pub origin: &'static str,
    pub text: &'static str,
}

inventory::collect!(StaticSource);

/// Every statically submitted source linked into this program, in a stable order.
pub fn static_sources() -> Vec<&'static StaticSource> {
    let mut v: Vec<&StaticSource> = inventory::iter::<StaticSource>.into_iter().collect();
    v.sort_by_key(|s| s.origin);
    v
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Builtin(String),
    File(String),
    Text(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(s) => write!(f, "built in ({s})"),
            Origin::File(s) => write!(f, "file {s}"),
            Origin::Text(s) => write!(f, "{s}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Registered {
    pub entry: Arc<Entry>,
    pub origin: Origin,
}

#[derive(Debug)]
pub enum Error {
    /// The source has errors; `render()` shows them against the text.
    Invalid { origin: String, src: String, diags: Diagnostics },
    Io { path: String, message: String },
    Conflict { name: String, existing: Origin, incoming: Origin },
    Unknown { name: String, nearest: Vec<String> },
}

impl Error {
    /// The full message, with source excerpts for DSL errors.
    pub fn render(&self) -> String {
        match self {
            Error::Invalid { origin, src, diags } => diag::render(diags, origin, src),
            other => format!("error: {other}\n"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { origin, diags, .. } => write!(f, "{origin}: {} error(s); first: {}", diags.0.len(), diags.0[0].message),
            Error::Io { path, message } => write!(f, "cannot read {path}: {message}"),
            Error::Conflict { name, existing, incoming } => {
                write!(f, "`{name}` from {incoming} conflicts with `{name}` already registered from {existing}")
            }
            Error::Unknown { name, nearest } => {
                write!(f, "no entry named `{name}`")?;
                if !nearest.is_empty() {
                    write!(f, "; nearest: {}", nearest.join(", "))?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    entries: BTreeMap<String, Registered>,
    aliases: BTreeMap<String, String>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every statically submitted source linked into the program.
    pub fn with_builtins() -> Result<Self, Error> {
        let mut r = Registry::new();
        for s in static_sources() {
            r.load_source(s.text, Origin::Builtin(s.origin.to_string()))?;
        }
        Ok(r)
    }

    pub fn load_str(&mut self, src: &str, name: &str) -> Result<Vec<String>, Error> {
        self.load_source(src, Origin::Text(name.to_string()))
    }

    pub fn load_file(&mut self, path: &Path) -> Result<Vec<String>, Error> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: shown.clone(), message: e.to_string() })?;
        let src = normforge_dsl::source_from_bytes(&bytes)
            .map_err(|(src, diags)| Error::Invalid { origin: shown.clone(), src, diags })?;
        self.load_source(&src, Origin::File(shown))
    }

    /// Compile `src` and add all its entries, or none.
    pub fn load_source(&mut self, src: &str, origin: Origin) -> Result<Vec<String>, Error> {
        let label = match &origin {
            Origin::Builtin(s) | Origin::File(s) | Origin::Text(s) => s.clone(),
        };
        let entries = normforge_dsl::compile(src).map_err(|diags| Error::Invalid { origin: label, src: src.to_string(), diags })?;
        for e in &entries {
            for n in std::iter::once(&e.name).chain(&e.meta.aliases) {
                if let Some(existing) = self.lookup(n) {
                    return Err(Error::Conflict { name: n.clone(), existing: existing.origin.clone(), incoming: origin });
                }
            }
        }
        let mut names = Vec::new();
        for e in entries {
            for a in &e.meta.aliases {
                self.aliases.insert(a.clone(), e.name.clone());
            }
            names.push(e.name.clone());
            self.entries.insert(e.name.clone(), Registered { entry: Arc::new(e), origin: origin.clone() });
        }
        Ok(names)
    }

    fn lookup(&self, name: &str) -> Option<&Registered> {
        self.entries.get(name).or_else(|| self.aliases.get(name).and_then(|n| self.entries.get(n)))
    }

    /// The entry called `name` (or aliased so); unknown names list the nearest ones.
    pub fn get(&self, name: &str) -> Result<&Registered, Error> {
        self.lookup(name).ok_or_else(|| Error::Unknown {
            name: name.to_string(),
            nearest: suggest::nearest(name, self.entries.keys().chain(self.aliases.keys()).map(String::as_str), 3)
                .into_iter()
                .map(String::from)
                .collect(),
        })
    }

    /// Entries in name order, optionally filtered by a glob (`*` and `?`).
    pub fn list(&self, pattern: Option<&str>) -> Vec<&Registered> {
        self.entries.values().filter(|r| pattern.is_none_or(|p| glob(p, &r.entry.name))).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `*` matches any run of characters, `?` any one.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        assert!(glob("adam*", "adamw"));
        assert!(glob("adam*", "adam"));
        assert!(!glob("adam*", "lamb"));
        assert!(glob("*norm", "layer_norm"));
        assert!(glob("?amb", "lamb"));
        assert!(!glob("?amb", "lambs"));
        assert!(glob("*", ""));
    }

    #[test]
    fn loading_is_all_or_nothing() {
        let mut r = Registry::new();
        r.load_str("optimizer a(lr = 0.1) { p = p - lr * g }", "one").unwrap();
        // The second entry conflicts, so the first of the same source must not land either.
        let err = r
            .load_str("optimizer b(lr = 0.1) { p = p - lr * g }\noptimizer a(lr = 0.1) { p = p - g }", "two")
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { ref name, .. } if name == "a"), "{err}");
        assert!(r.get("b").is_err());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let mut r = Registry::new();
        r.load_str("optimizer adamw(lr = 0.1) { p = p - lr * g }", "t").unwrap();
        let Error::Unknown { nearest, .. } = r.get("adamv").unwrap_err() else { panic!("expected Unknown") };
        assert_eq!(nearest, vec!["adamw".to_string()]);
    }
}
