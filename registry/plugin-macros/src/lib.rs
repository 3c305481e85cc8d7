//! `export!`: reads a plugin's `.nf` files at build time, checks them with the real front end
//! (errors fail the build with the usual diagnostics), and emits the C-ABI entry point with a
//! JSON manifest. Parsed by hand to keep the SDK free of `syn`.

use proc_macro::{Delimiter, Literal, TokenStream, TokenTree};
use std::path::PathBuf;

#[proc_macro]
pub fn export(input: TokenStream) -> TokenStream {
    match expand(input) {
        Ok(ts) => ts,
        Err(msg) => format!("::core::compile_error!({:?});", msg).parse().unwrap(),
    }
}

fn string_lit(t: &TokenTree) -> Result<String, String> {
    let s = t.to_string();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') && !s.contains('\\') {
        Ok(s[1..s.len() - 1].to_string())
    } else {
        Err(format!("normforge_plugin::export!: expected a plain string literal, found `{s}`"))
    }
}

/// `name = "..."` and `specs = ["a.nf", ...]`, in either order; `version` defaults to the
/// crate's version.
fn parse(input: TokenStream) -> Result<(String, Option<String>, Vec<String>), String> {
    let toks: Vec<TokenTree> = input.into_iter().collect();
    let (mut name, mut version, mut specs) = (None, None, None);
    let mut i = 0;
    while i < toks.len() {
        let key = match &toks[i] {
            TokenTree::Ident(id) => id.to_string(),
            other => return Err(format!("normforge_plugin::export!: expected `name`, `version` or `specs`, found `{other}`")),
        };
        match toks.get(i + 1) {
            Some(TokenTree::Punct(p)) if p.as_char() == '=' => {}
            _ => return Err(format!("normforge_plugin::export!: expected `=` after `{key}`")),
        }
        let value = toks.get(i + 2).ok_or_else(|| format!("normforge_plugin::export!: `{key}` has no value"))?;
        match key.as_str() {
            "name" => name = Some(string_lit(value)?),
            "version" => version = Some(string_lit(value)?),
            "specs" => match value {
                TokenTree::Group(g) if g.delimiter() == Delimiter::Bracket => {
                    let mut v = Vec::new();
                    for t in g.stream() {
                        match &t {
                            TokenTree::Punct(p) if p.as_char() == ',' => {}
                            _ => v.push(string_lit(&t)?),
                        }
                    }
                    specs = Some(v);
                }
                _ => return Err("normforge_plugin::export!: `specs` takes a list: [\"a.nf\", ...]".into()),
            },
            other => return Err(format!("normforge_plugin::export!: unknown key `{other}`")),
        }
        i += 3;
        if let Some(TokenTree::Punct(p)) = toks.get(i) {
            if p.as_char() == ',' {
                i += 1;
            }
        }
    }
    let name = name.ok_or("normforge_plugin::export!: missing `name = \"...\"`")?;
    let specs = specs.ok_or("normforge_plugin::export!: missing `specs = [...]`")?;
    if specs.is_empty() {
        return Err("normforge_plugin::export!: `specs` is empty".into());
    }
    Ok((name, version, specs))
}

fn expand(input: TokenStream) -> Result<TokenStream, String> {
    let (name, version, specs) = parse(input)?;
    let version = match version {
        Some(v) => v,
        None => std::env::var("CARGO_PKG_VERSION").map_err(|_| "normforge_plugin::export!: give `version = \"...\"`")?,
    };
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").map_err(|_| "CARGO_MANIFEST_DIR is not set")?);
    let mut sources = Vec::new();
    let mut tracked = String::new();
    let mut errors = String::new();
    for file in &specs {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| format!("normforge_plugin::export!: cannot read {}: {e}", path.display()))?;
        // Make cargo rebuild the plugin when a spec changes.
        tracked.push_str(&format!("const _: &[u8] = include_bytes!({:?});\n", path.display().to_string()));
        let text = match normforge_dsl::source_from_bytes(&bytes) {
            Ok(t) => t,
            Err((lossy, d)) => {
                errors.push_str(&normforge_dsl::diag::render(&d, file, &lossy));
                continue;
            }
        };
        if let Err(d) = normforge_dsl::compile(&text) {
            errors.push_str(&normforge_dsl::diag::render(&d, file, &text));
        }
        sources.push(serde_json::json!({ "file": file, "text": text }));
    }
    if !errors.is_empty() {
        return Err(format!("the specs of plugin `{name}` have errors:\n{errors}"));
    }
    let manifest = serde_json::json!({
        "name": name,
        "version": version,
        "abi_version": 1,
        "sources": sources,
        "kernels": [],
    })
    .to_string();
    let lit = |s: &str| Literal::byte_string(s.as_bytes()).to_string();
    let code = format!(
        r#"{tracked}
const _: () = assert!(::normforge_plugin::ABI_VERSION == 1, "normforge-plugin and its macro disagree on the ABI");
static __NORMFORGE_PLUGIN_NAME: &[u8] = {name};
static __NORMFORGE_PLUGIN_VERSION: &[u8] = {version};
static __NORMFORGE_PLUGIN_MANIFEST: &[u8] = {manifest};
static __NORMFORGE_PLUGIN_DESCRIPTOR: ::normforge_plugin::PluginDescriptor = ::normforge_plugin::PluginDescriptor {{
    abi_version: ::normforge_plugin::ABI_VERSION,
    name: __NORMFORGE_PLUGIN_NAME.as_ptr(),
    name_len: __NORMFORGE_PLUGIN_NAME.len(),
    version: __NORMFORGE_PLUGIN_VERSION.as_ptr(),
    version_len: __NORMFORGE_PLUGIN_VERSION.len(),
    manifest: __NORMFORGE_PLUGIN_MANIFEST.as_ptr(),
    manifest_len: __NORMFORGE_PLUGIN_MANIFEST.len(),
}};
/// The plugin's entry point (see `normforge_plugin::ENTRY_SYMBOL`).
#[unsafe(no_mangle)]
pub extern "C" fn normforge_plugin_entry_v1() -> *const ::normforge_plugin::PluginDescriptor {{
    &__NORMFORGE_PLUGIN_DESCRIPTOR
}}
"#,
        name = lit(&name),
        version = lit(&version),
        manifest = lit(&manifest),
    );
    code.parse().map_err(|e| format!("normforge_plugin::export!: internal error: {e:?}"))
}
