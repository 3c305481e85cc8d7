//! The plugin ABI and SDK.
//!
//! A compiled plugin is a shared library exporting one C function, [`ENTRY_SYMBOL`], that
//! returns a pointer to a static [`PluginDescriptor`]. Only C types cross the boundary: the
//! descriptor holds an ABI version and (pointer, length) byte strings, one of which is a JSON
//! [`Manifest`] with the plugin's `.nf` sources. Nothing of Rust's unstable ABI is shared, so a
//! plugin built by another compiler version still loads.
//!
//! Writing one takes a `cdylib` crate and one line:
//!
//! ```ignore
//! normforge_plugin::export!(name = "example", specs = ["nf/qk_norm.nf", "nf/signum.nf"]);
//! ```
//!
//! The macro checks the specs while the plugin compiles: a DSL error fails its build.

use serde::{Deserialize, Serialize};

pub use normforge_plugin_macros::export;

/// Bumped whenever [`PluginDescriptor`] or [`Manifest`] change incompatibly.
pub const ABI_VERSION: u32 = 1;

/// The exported entry point, NUL-terminated for `dlsym`. Versioned so that a future ABI can be
/// exported beside this one.
pub const ENTRY_SYMBOL: &[u8] = b"normforge_plugin_entry_v1\0";

pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;

/// What the entry point returns. `abi_version` comes first in every version of this struct, so
/// a loader can read it before trusting the rest of the layout.
#[repr(C)]
pub struct PluginDescriptor {
    pub abi_version: u32,
    pub name: *const u8,
    pub name_len: usize,
    pub version: *const u8,
    pub version_len: usize,
    /// UTF-8 JSON of a [`Manifest`].
    pub manifest: *const u8,
    pub manifest_len: usize,
}

// The descriptor only points at immutable statics of the plugin.
unsafe impl Sync for PluginDescriptor {}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub abi_version: u32,
    pub sources: Vec<Source>,
    /// Pre-generated kernel sources, for backends that can use them; may be empty.
    #[serde(default)]
    pub kernels: Vec<Kernel>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The file name inside the plugin's crate, for messages.
    pub file: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kernel {
    pub entry: String,
    /// e.g. `cuda` or `wgsl`.
    pub target: String,
    /// e.g. `forward`, `backward` or `step`.
    pub pass: String,
    pub source: String,
}
