//! A third-party plugin in one line: the specs are checked when this crate builds, and the
//! library exports them through normforge's C ABI. Load it with
//! `normforge list --plugin target/debug/libnormforge_plugin_example.so`.

normforge_plugin::export!(name = "example", specs = ["nf/qk_norm.nf", "nf/signum.nf"]);
