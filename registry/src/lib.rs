//! The registry: checked entries by name, with where each came from.
//!
//! Built-in specs reach it through `inventory` (a crate submits [`StaticSource`]s and they
//! are found at start-up wherever that crate is linked); `.nf` files and strings are loaded at
//! run time; compiled plugins through `libloading` (see [`plugin`]). Every load is all or
//! nothing: a source or plugin with any error, or any name that clashes, adds no entry.
//! The registry locks internally, so one instance can be shared (`&Registry`) across threads.

pub mod plugin;

use normforge_dsl::{diag, ir::Entry, suggest, Diagnostics};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};

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
    Plugin { plugin: String, version: String, path: String, file: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(s) => write!(f, "built in ({s})"),
            Origin::File(s) => write!(f, "file {s}"),
            Origin::Text(s) => write!(f, "{s}"),
            Origin::Plugin { plugin, version, path, file } => write!(f, "plugin `{plugin}` {version} ({path}: {file})"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Registered {
    /// The name it is registered under: the entry's own, or `plugin::name` when namespaced.
    pub name: String,
    pub entry: Arc<Entry>,
    pub origin: Origin,
}

#[derive(Debug)]
pub enum Error {
    /// The source has errors; `render()` shows them against the text.
    Invalid { origin: String, src: String, diags: Diagnostics },
    Io { path: String, message: String },
    /// (The origins boxed: every `Result` of the registry carries this enum.)
    Conflict { name: String, existing: Box<Origin>, incoming: Box<Origin> },
    Unknown { name: String, nearest: Vec<String> },
    /// A compiled plugin that cannot be used: not a library, no entry point, wrong ABI,
    /// broken manifest.
    Plugin { path: String, message: String },
    /// A plugin whose specs do not check.
    PluginSpec(Box<SpecError>),
}

/// Where in a plugin a spec fails to check, and why.
#[derive(Debug)]
pub struct SpecError {
    pub plugin: String,
    pub path: String,
    pub file: String,
    pub entry: Option<String>,
    pub src: String,
    pub diags: Diagnostics,
}

impl Error {
    /// The full message, with source excerpts for DSL errors.
    pub fn render(&self) -> String {
        match self {
            Error::Invalid { origin, src, diags } => diag::render(diags, origin, src),
            Error::PluginSpec(e) => format!("error: {self}\n{}", diag::render(&e.diags, &e.file, &e.src)),
            other => format!("error: {other}\n"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Invalid { origin, diags, .. } => {
                write!(f, "{origin}: {} error(s); first: {}", diags.0.len(), diags.0[0].message)
            }
            Error::Io { path, message } => write!(f, "cannot read {path}: {message}"),
            Error::Conflict { name, existing, incoming } => {
                write!(f, "`{name}` from {incoming} conflicts with `{name}` already registered from {existing}")?;
                if matches!(**incoming, Origin::Plugin { .. }) {
                    write!(f, "; load the plugin under its namespace to keep both")?;
                }
                Ok(())
            }
            Error::Unknown { name, nearest } => {
                write!(f, "no entry named `{name}`")?;
                if !nearest.is_empty() {
                    write!(f, "; nearest: {}", nearest.join(", "))?;
                }
                Ok(())
            }
            Error::Plugin { path, message } => write!(f, "cannot load plugin {path}: {message}"),
            Error::PluginSpec(e) => {
                let SpecError { plugin, path, file, entry, src, diags } = &**e;
                let d = &diags.0[0];
                let (line, col) = diag::line_col(src, d.span.start);
                let entry = entry.as_ref().map(|e| format!(", entry `{e}`")).unwrap_or_default();
                write!(f, "plugin `{plugin}` ({path}){entry}: {file}:{line}:{col}: {}", d.message)
            }
        }
    }
}

impl std::error::Error for Error {}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Registered>,
    aliases: BTreeMap<String, String>,
    /// Loaded plugins stay loaded for the registry's life: their code may be called later.
    libraries: Vec<Arc<libloading::Library>>,
}

impl Inner {
    fn lookup(&self, name: &str) -> Option<&Registered> {
        self.entries.get(name).or_else(|| self.aliases.get(name).and_then(|n| self.entries.get(n)))
    }

    /// Add all of `batch` (registered name, entry, origin) or, on any clash, none of it.
    fn insert_all(&mut self, batch: Vec<(String, Arc<Entry>, Origin)>, prefix: &str) -> Result<Vec<String>, Error> {
        let mut seen: BTreeMap<String, Origin> = BTreeMap::new();
        for (name, e, origin) in &batch {
            let aliases = e.meta.aliases.iter().map(|a| format!("{prefix}{a}"));
            for n in std::iter::once(name.clone()).chain(aliases) {
                if let Some(existing) = self.lookup(&n) {
                    return Err(Error::Conflict { name: n, existing: Box::new(existing.origin.clone()), incoming: Box::new(origin.clone()) });
                }
                if let Some(existing) = seen.insert(n.clone(), origin.clone()) {
                    return Err(Error::Conflict { name: n, existing: Box::new(existing), incoming: Box::new(origin.clone()) });
                }
            }
        }
        let mut names = Vec::new();
        for (name, entry, origin) in batch {
            for a in &entry.meta.aliases {
                self.aliases.insert(format!("{prefix}{a}"), name.clone());
            }
            names.push(name.clone());
            self.entries.insert(name.clone(), Registered { name, entry, origin });
        }
        Ok(names)
    }
}

#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-inserted batch (inserts happen
        // after all checks), so a poisoned lock still guards consistent data.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A registry holding every statically submitted source linked into the program.
    pub fn with_builtins() -> Result<Self, Error> {
        let r = Registry::new();
        for s in static_sources() {
            r.load_source(s.text, Origin::Builtin(s.origin.to_string()))?;
        }
        Ok(r)
    }

    pub fn load_str(&self, src: &str, name: &str) -> Result<Vec<String>, Error> {
        self.load_source(src, Origin::Text(name.to_string()))
    }

    pub fn load_file(&self, path: &Path) -> Result<Vec<String>, Error> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::Io { path: shown.clone(), message: e.to_string() })?;
        let src = normforge_dsl::source_from_bytes(&bytes)
            .map_err(|(src, diags)| Error::Invalid { origin: shown.clone(), src, diags })?;
        self.load_source(&src, Origin::File(shown))
    }

    /// Compile `src` and add all its entries, or none.
    pub fn load_source(&self, src: &str, origin: Origin) -> Result<Vec<String>, Error> {
        let label = match &origin {
            Origin::Builtin(s) | Origin::File(s) | Origin::Text(s) => s.clone(),
            Origin::Plugin { file, .. } => file.clone(),
        };
        let entries =
            normforge_dsl::compile(src).map_err(|diags| Error::Invalid { origin: label, src: src.to_string(), diags })?;
        let batch = entries.into_iter().map(|e| (e.name.clone(), Arc::new(e), origin.clone())).collect();
        self.write().insert_all(batch, "")
    }

    /// Load a compiled plugin and register its entries under their own names.
    ///
    /// A plugin is native code that runs with this program's rights: load only trusted ones.
    pub fn load_plugin(&self, path: &Path) -> Result<Vec<String>, Error> {
        self.load_plugin_inner(path, false)
    }

    /// Like [`Registry::load_plugin`], but register each entry as `plugin::name`, so that it
    /// can share a name with an entry already registered.
    pub fn load_plugin_namespaced(&self, path: &Path) -> Result<Vec<String>, Error> {
        self.load_plugin_inner(path, true)
    }

    fn load_plugin_inner(&self, path: &Path, namespaced: bool) -> Result<Vec<String>, Error> {
        let loaded = plugin::load(path)?;
        let prefix = if namespaced { format!("{}::", loaded.manifest.name) } else { String::new() };
        let batch = loaded
            .entries
            .into_iter()
            .map(|(e, file)| {
                let origin = Origin::Plugin {
                    plugin: loaded.manifest.name.clone(),
                    version: loaded.manifest.version.clone(),
                    path: path.display().to_string(),
                    file,
                };
                (format!("{prefix}{}", e.name), Arc::new(e), origin)
            })
            .collect();
        let mut inner = self.write();
        let names = inner.insert_all(batch, &prefix)?;
        inner.libraries.push(Arc::new(loaded.library));
        Ok(names)
    }

    /// The entry called `name` (or aliased so); unknown names list the nearest ones.
    pub fn get(&self, name: &str) -> Result<Registered, Error> {
        let inner = self.read();
        inner.lookup(name).cloned().ok_or_else(|| Error::Unknown {
            name: name.to_string(),
            nearest: suggest::nearest(name, inner.entries.keys().chain(inner.aliases.keys()).map(String::as_str), 3)
                .into_iter()
                .map(String::from)
                .collect(),
        })
    }

    /// Entries in name order, optionally filtered by a glob (`*` and `?`).
    pub fn list(&self, pattern: Option<&str>) -> Vec<Registered> {
        self.read().entries.values().filter(|r| pattern.is_none_or(|p| glob(p, &r.name))).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().entries.is_empty()
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
        assert!(glob("example::*", "example::signum"));
    }

    #[test]
    fn loading_is_all_or_nothing() {
        let r = Registry::new();
        r.load_str("optimizer a(lr = 0.1) { p = p - lr * g }", "one").unwrap();
        // The second entry conflicts, so the first of the same source must not land either.
        let err = r
            .load_str("optimizer b(lr = 0.1) { p = p - lr * g }\noptimizer a(lr = 0.1) { p = p - g }", "two")
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { ref name, .. } if name == "a"), "{err}");
        assert!(err.to_string().contains("from two") && err.to_string().contains("from one"), "{err}");
        assert!(r.get("b").is_err());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn aliases_resolve_and_clash() {
        let r = Registry::new();
        r.load_str("@alias \"sgd_plain\"\noptimizer plain(lr = 0.1) { p = p - lr * g }", "one").unwrap();
        assert_eq!(r.get("sgd_plain").unwrap().name, "plain");
        let err = r.load_str("optimizer sgd_plain(lr = 0.1) { p = p - g }", "two").unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
    }

    #[test]
    fn unknown_names_suggest_the_nearest() {
        let r = Registry::new();
        r.load_str("optimizer adamw(lr = 0.1) { p = p - lr * g }", "t").unwrap();
        let Error::Unknown { nearest, .. } = r.get("adamv").unwrap_err() else { panic!("expected Unknown") };
        assert_eq!(nearest, vec!["adamw".to_string()]);
    }

    #[test]
    fn files_load_with_their_path_as_origin_and_bad_files_add_nothing() {
        let dir = std::env::temp_dir().join(format!("normforge-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.nf");
        std::fs::write(&good, "optimizer half_step(lr = 0.5) { p = p - lr * g }\n").unwrap();
        let bad = dir.join("bad.nf");
        std::fs::write(&bad, "optimizer fine(lr = 0.5) { p = p - lr * g }\nlayer broken(x[d]) { return y }\n").unwrap();
        let r = Registry::new();
        assert_eq!(r.load_file(&good).unwrap(), vec!["half_step".to_string()]);
        assert_eq!(r.get("half_step").unwrap().origin, Origin::File(good.display().to_string()));
        let err = r.load_file(&bad).unwrap_err();
        assert!(err.render().contains("bad.nf:2:") && err.render().contains("unknown name `y`"), "{}", err.render());
        assert!(r.get("fine").is_err(), "half of a bad file landed");
        assert!(matches!(r.load_file(&dir.join("missing.nf")), Err(Error::Io { .. })));
        std::fs::write(dir.join("binary.nf"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(r.load_file(&dir.join("binary.nf")).unwrap_err().render().contains("not valid UTF-8"));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn registry_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Registry>();
    }
}
