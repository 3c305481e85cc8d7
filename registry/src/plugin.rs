//! Loading compiled plugins: open the library, call its entry point, validate the descriptor
//! and the manifest, check every spec. Nothing reaches the registry until all of that passed.

use crate::{Error, SpecError};
use normforge_dsl::ir::Entry;
use normforge_plugin::{EntryFn, Manifest, PluginDescriptor, ABI_VERSION, ENTRY_SYMBOL};
use std::path::Path;

/// A plugin that passed every check, ready to register.
pub struct Loaded {
    pub library: libloading::Library,
    pub manifest: Manifest,
    /// Each entry with the manifest file it came from.
    pub entries: Vec<(Entry, String)>,
}

/// Upper bound on any byte string a descriptor points to, against garbage lengths.
const MAX_LEN: usize = 64 << 20;

fn fail(path: &Path, message: impl Into<String>) -> Error {
    Error::Plugin { path: path.display().to_string(), message: message.into() }
}

/// Copy out a (pointer, length) byte string of the descriptor.
///
/// # Safety
/// `ptr` must point to `len` readable bytes, which is the plugin's promise under the ABI.
unsafe fn bytes(path: &Path, what: &str, ptr: *const u8, len: usize) -> Result<Vec<u8>, Error> {
    if ptr.is_null() {
        return Err(fail(path, format!("the descriptor's {what} is a null pointer")));
    }
    if len > MAX_LEN {
        return Err(fail(path, format!("the descriptor's {what} claims {len} bytes")));
    }
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec())
}

fn text(path: &Path, what: &str, b: Vec<u8>) -> Result<String, Error> {
    String::from_utf8(b).map_err(|_| fail(path, format!("the plugin's {what} is not UTF-8")))
}

pub fn load(path: &Path) -> Result<Loaded, Error> {
    if !path.is_file() {
        return Err(fail(path, "no such file"));
    }
    // SAFETY: loading runs the library's initialisers; plugins are trusted code by contract
    // (see the README). A file that is not a library is refused by the dynamic loader.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| fail(path, format!("not a loadable shared library: {e}")))?;
    // SAFETY: the symbol's type is fixed by the versioned ABI named in its symbol name.
    let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL) }
        .map(|s| *s)
        .map_err(|_| {
            let sym = String::from_utf8_lossy(&ENTRY_SYMBOL[..ENTRY_SYMBOL.len() - 1]).into_owned();
            fail(path, format!("the library does not export `{sym}`: it is not a normforge plugin (or one for another ABI)"))
        })?;
    // SAFETY: calling the entry point is the one thing a plugin's contract allows.
    let desc: *const PluginDescriptor = unsafe { entry() };
    if desc.is_null() {
        return Err(fail(path, "the entry point returned a null descriptor"));
    }
    // `abi_version` leads every descriptor version: read it before trusting the layout.
    let abi = unsafe { std::ptr::addr_of!((*desc).abi_version).read_unaligned() };
    if abi != ABI_VERSION {
        return Err(fail(path, format!("the plugin uses ABI version {abi}; this normforge supports version {ABI_VERSION}")));
    }
    // SAFETY: ABI version 1 guarantees this layout and pointers to static bytes.
    let d = unsafe { &*desc };
    let name = text(path, "name", unsafe { bytes(path, "name", d.name, d.name_len) }?)?;
    let version = text(path, "version", unsafe { bytes(path, "version", d.version, d.version_len) }?)?;
    let raw = unsafe { bytes(path, "manifest", d.manifest, d.manifest_len) }?;
    let manifest: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| fail(path, format!("plugin `{name}`: its manifest is corrupt or truncated ({e})")))?;
    if manifest.name != name || manifest.version != version || manifest.abi_version != abi {
        return Err(fail(
            path,
            format!(
                "plugin `{name}` {version}: its manifest says `{}` {} (ABI {})",
                manifest.name, manifest.version, manifest.abi_version
            ),
        ));
    }
    if !is_plugin_name(&name) {
        return Err(fail(path, format!("`{name}` is not a valid plugin name (letters, digits, `_`)")));
    }
    let mut entries = Vec::new();
    for s in &manifest.sources {
        let compiled = normforge_dsl::compile(&s.text).map_err(|diags| {
            Error::PluginSpec(Box::new(SpecError {
                plugin: name.clone(),
                path: path.display().to_string(),
                file: s.file.clone(),
                entry: entry_at(&s.text, diags.0[0].span.start),
                src: s.text.clone(),
                diags,
            }))
        })?;
        entries.extend(compiled.into_iter().map(|e| (e, s.file.clone())));
    }
    Ok(Loaded { library, manifest, entries })
}

fn is_plugin_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The name of the definition that contains `offset`, for messages: the last
/// `layer`/`reparam`/`optimizer` header at or before it.
fn entry_at(src: &str, offset: usize) -> Option<String> {
    let before = &src[..offset.min(src.len())];
    ["layer ", "reparam ", "optimizer "]
        .iter()
        .filter_map(|kw| before.rfind(kw).map(|i| (i, i + kw.len())))
        .max()
        .and_then(|(_, start)| {
            let name: String = src[start..].trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            (!name.is_empty()).then_some(name)
        })
}

#[cfg(test)]
mod tests {
    use super::entry_at;

    #[test]
    fn entry_at_finds_the_enclosing_definition() {
        let src = "optimizer a(lr = 1) { p = p }\nlayer b(x[d]) {\n    return y\n}\n";
        assert_eq!(entry_at(src, src.find("return y").unwrap() + 7).as_deref(), Some("b"));
        assert_eq!(entry_at(src, 12).as_deref(), Some("a"));
        assert_eq!(entry_at("garbage", 3), None);
    }
}
