//! A plugin as a foreign toolchain might write it: the descriptor layout copied from the ABI
//! documentation, the manifest as literal JSON. Each feature breaks one thing.

#[repr(C)]
pub struct Descriptor {
    abi_version: u32,
    name: *const u8,
    name_len: usize,
    version: *const u8,
    version_len: usize,
    manifest: *const u8,
    manifest_len: usize,
}

unsafe impl Sync for Descriptor {}

const NAME: &[u8] = b"foreign";
const VERSION: &[u8] = b"0.0.1";

#[cfg(not(any(feature = "corrupt_manifest", feature = "bad_dsl", feature = "duplicate")))]
const MANIFEST: &[u8] = br#"{"name":"foreign","version":"0.0.1","abi_version":1,"sources":[{"file":"sign_sgd.nf","text":"optimizer sign_sgd(lr = 0.01) {\n    p = p - lr * sign(g)\n}\n"}],"kernels":[]}"#;

#[cfg(feature = "corrupt_manifest")]
const MANIFEST: &[u8] = b"{\"name\":\"foreign\",\"version\":\"0.0.1\",\"abi_version\":1,\"sources\":[{\"file\":\x00\xff}]}";

#[cfg(feature = "bad_dsl")]
const MANIFEST: &[u8] = br#"{"name":"foreign","version":"0.0.1","abi_version":1,"sources":[{"file":"ok.nf","text":"optimizer fine(lr = 0.01) {\n    p = p - lr * g\n}\n"},{"file":"broken.nf","text":"layer broken(x[d]) {\n    param w[d] = 1\n    return x * wieght\n}\n"}],"kernels":[]}"#;

#[cfg(feature = "duplicate")]
const MANIFEST: &[u8] = br#"{"name":"foreign","version":"0.0.1","abi_version":1,"sources":[{"file":"mine.nf","text":"optimizer foreign_only(lr = 0.01) {\n    p = p - lr * g\n}\n"},{"file":"adamw.nf","text":"optimizer adamw(lr = 0.01) {\n    p = p - lr * g\n}\n"}],"kernels":[]}"#;

const MANIFEST_LEN: usize = if cfg!(feature = "truncated_manifest") { MANIFEST.len() / 2 } else { MANIFEST.len() };

static DESCRIPTOR: Descriptor = Descriptor {
    abi_version: if cfg!(feature = "wrong_abi") { 99 } else { 1 },
    name: NAME.as_ptr(),
    name_len: NAME.len(),
    version: VERSION.as_ptr(),
    version_len: VERSION.len(),
    manifest: if cfg!(feature = "null_manifest") { std::ptr::null() } else { MANIFEST.as_ptr() },
    manifest_len: MANIFEST_LEN,
};

#[cfg(not(feature = "no_symbol"))]
#[unsafe(no_mangle)]
pub extern "C" fn normforge_plugin_entry_v1() -> *const Descriptor {
    &DESCRIPTOR
}

/// Something to export when the entry point is left out, so the library is still a library.
#[unsafe(no_mangle)]
pub extern "C" fn normforge_test_foreign_marker() -> u32 {
    DESCRIPTOR.abi_version
}
