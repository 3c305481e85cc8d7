//! The `normforge` command line: check, format, show and list specs.

use clap::{Parser, Subcommand};
use normforge::dsl::{self, diag, text};
use normforge::registry::{Registered, Registry};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "normforge", version, about = "Normalization layers and update rules from a small DSL")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check spec files; prints diagnostics and exits non-zero on any error.
    Check { files: Vec<PathBuf> },
    /// Format spec files in place, or with --check report those that are not formatted.
    Fmt {
        #[arg(long)]
        check: bool,
        files: Vec<PathBuf>,
    },
    /// Print the checked IR of a registered entry or of every entry in a file.
    Show {
        /// An entry name, or a path to a .nf file.
        target: String,
        #[command(flatten)]
        plugins: PluginArgs,
        /// Print the derived backward programs instead of the forward ones.
        #[arg(long)]
        backward: bool,
        /// Print the IR as JSON (serde) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List registered entries with their hyper-parameters.
    List {
        /// A glob over names, e.g. `adam*`.
        pattern: Option<String>,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Print the CubeCL-generated source of an entry's kernel; needs no GPU.
    Emit {
        name: String,
        /// `cuda` (C++ for NVRTC) or `wgsl`.
        #[arg(long, default_value = "cuda")]
        target: String,
        /// Which program: `step` or `init` for an update rule; `forward`, `backward` (training
        /// mode), `forward-eval`, `backward-eval` or `init` for a layer. Default: `step` or
        /// `forward`.
        #[arg(long)]
        pass: Option<String>,
        /// Storage type of a rule's parameters, their gradients and its state, or of a layer's
        /// input, output and their gradients: `f32`, `f16` or `bf16` (arithmetic is f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[command(flatten)]
        plugins: PluginArgs,
    },
    /// Everything about one entry: origin, paper, hyper-parameters, tensors.
    Info {
        name: String,
        #[command(flatten)]
        plugins: PluginArgs,
    },
}

/// Compiled plugins to load first. A plugin is native code running with your rights: load
/// only plugins you trust.
#[derive(clap::Args)]
struct PluginArgs {
    /// Path to a compiled plugin (a shared library); repeatable.
    #[arg(long = "plugin")]
    plugins: Vec<PathBuf>,
    /// Register plugin entries as `plugin::name` (avoids clashes with built-in names).
    #[arg(long)]
    namespaced: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { files } => check(&files),
        Command::Fmt { check, files } => fmt(&files, check),
        Command::Show { target, plugins, backward, json } => show(&target, &plugins, backward, json),
        Command::List { pattern, plugins } => list(pattern.as_deref(), &plugins),
        Command::Info { name, plugins } => info(&name, &plugins),
        Command::Emit { name, target, pass, dtype, plugins } => emit(&name, &target, pass.as_deref(), &dtype, &plugins),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(msg) => {
            eprint!("{msg}");
            ExitCode::FAILURE
        }
    }
}

/// Read a spec file; unreadable or non-UTF-8 files become rendered diagnostics.
fn read(path: &Path) -> Result<String, String> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| format!("error: cannot read {shown}: {e}\n"))?;
    dsl::source_from_bytes(&bytes).map_err(|(src, d)| diag::render(&d, &shown, &src))
}

fn require_files(files: &[PathBuf]) -> Result<(), String> {
    if files.is_empty() {
        return Err("error: no files given\n".into());
    }
    Ok(())
}

fn check(files: &[PathBuf]) -> Result<bool, String> {
    require_files(files)?;
    let mut ok = true;
    for f in files {
        let shown = f.display().to_string();
        match read(f).and_then(|src| dsl::compile(&src).map_err(|d| diag::render(&d, &shown, &src))) {
            Ok(entries) => {
                let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
                println!("ok: {shown}: {}", names.join(", "));
            }
            Err(msg) => {
                eprint!("{msg}");
                ok = false;
            }
        }
    }
    Ok(ok)
}

fn fmt(files: &[PathBuf], check_only: bool) -> Result<bool, String> {
    require_files(files)?;
    let mut ok = true;
    for f in files {
        let shown = f.display().to_string();
        let src = match read(f) {
            Ok(s) => s,
            Err(msg) => {
                eprint!("{msg}");
                ok = false;
                continue;
            }
        };
        let formatted = match dsl::fmt::format(&src) {
            Ok(s) => s,
            Err(d) => {
                eprint!("{}", diag::render(&d, &shown, &src));
                ok = false;
                continue;
            }
        };
        if formatted == src {
            continue;
        }
        if check_only {
            println!("{shown}: not formatted");
            ok = false;
        } else {
            std::fs::write(f, formatted).map_err(|e| format!("error: cannot write {shown}: {e}\n"))?;
            println!("formatted {shown}");
        }
    }
    Ok(ok)
}

fn registry(args: &PluginArgs) -> Result<Registry, String> {
    let reg = normforge::builtin_registry().map_err(|e| e.render())?;
    for p in &args.plugins {
        let loaded = if args.namespaced { reg.load_plugin_namespaced(p) } else { reg.load_plugin(p) };
        loaded.map_err(|e| e.render())?;
    }
    Ok(reg)
}

fn show(target: &str, plugins: &PluginArgs, backward: bool, json: bool) -> Result<bool, String> {
    let path = Path::new(target);
    let entries: Vec<dsl::Entry> = if target.ends_with(".nf") || path.is_file() {
        let src = read(path)?;
        dsl::compile(&src).map_err(|d| diag::render(&d, target, &src))?
    } else {
        let reg = registry(plugins)?;
        vec![(*reg.get(target).map_err(|e| e.render())?.entry).clone()]
    };
    for e in &entries {
        if json {
            println!("{}", serde_json::to_string_pretty(e).map_err(|e| format!("error: {e}\n"))?);
        } else {
            print!("{}", text::entry_text(e, backward));
        }
    }
    Ok(true)
}

fn list(pattern: Option<&str>, plugins: &PluginArgs) -> Result<bool, String> {
    let reg = registry(plugins)?;
    let found: Vec<Registered> = reg.list(pattern);
    if found.is_empty() {
        return Err(format!("error: no entries match `{}`\n", pattern.unwrap_or("*")));
    }
    for r in found {
        let e = &r.entry;
        println!("{:<12} {:<10} {}", r.name, e.kind.keyword(), e.meta.paper.as_deref().unwrap_or(""));
        for h in &e.hparams {
            let doc = h.doc.as_deref().map(|d| format!("  # {d}")).unwrap_or_default();
            println!("    {}{doc}", text::hparam_text(h));
        }
    }
    Ok(true)
}

fn emit(name: &str, target: &str, pass: Option<&str>, dtype: &str, plugins: &PluginArgs) -> Result<bool, String> {
    let lang = target.parse().map_err(|e: normforge::dsl::Error| format!("error: {e}\n"))?;
    let dtype = dtype.parse().map_err(|e: normforge::dsl::Error| format!("error: {e}\n"))?;
    let reg = registry(plugins)?;
    let r = reg.get(name).map_err(|e| e.render())?;
    let pass = pass.unwrap_or(if r.entry.kind == normforge::dsl::ir::Kind::Optimizer { "step" } else { "forward" });
    let source = normforge::cubecl::emit(&r.entry, pass, dtype, lang).map_err(|e| format!("error: {e}\n"))?;
    print!("{source}");
    Ok(true)
}

fn info(name: &str, plugins: &PluginArgs) -> Result<bool, String> {
    let reg = registry(plugins)?;
    let r = reg.get(name).map_err(|e| e.render())?;
    let e = &r.entry;
    println!("{} ({} {}({}))", r.name, e.kind.keyword(), e.name, text::input_text(e));
    println!("  origin:    {}", r.origin);
    for (k, v) in [("paper", &e.meta.paper), ("reference", &e.meta.reference), ("version", &e.meta.version), ("doc", &e.meta.doc)] {
        if let Some(v) = v {
            println!("  {k:<10} {v}");
        }
    }
    if !e.meta.aliases.is_empty() {
        println!("  aliases:   {}", e.meta.aliases.join(", "));
    }
    if !e.hparams.is_empty() {
        println!("  hyper-parameters:");
        for h in &e.hparams {
            let doc = h.doc.as_deref().map(|d| format!("  # {d}")).unwrap_or_default();
            println!("    {}{doc}", text::hparam_text(h));
        }
    }
    for (kind, decls) in [("parameters", &e.params), ("buffers", &e.buffers), ("state", &e.states)] {
        if !decls.is_empty() {
            let list: Vec<String> =
                decls.iter().map(|d| format!("{}{}", d.name, text::shape_text(&d.shape, &e.axes, &e.hparams))).collect();
            println!("  {kind}: {}", list.join(", "));
        }
    }
    Ok(true)
}
