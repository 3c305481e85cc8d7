//! The main job: train a small CNN to tell four noisy shapes apart, with a DSL norm layer
//! after each convolution and a DSL update rule, both from the registry, through tch (CPU by
//! default, CUDA when present). Prints loss and accuracy, draws a progress bar, and writes the
//! loss curve to a PNG. With `--checkpoint DIR` it saves the model, the optimizer's state and
//! its progress after each epoch, and `--resume` continues from the newest.
//!
//!     bash scripts/train.sh --norm group_norm --norm-hparam groups=4 --optimizer lion --lr 3e-4

mod common;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use normforge::dsl::hyper::parse_assignment;
use normforge::cuda::{Compiler, FusedOptimizer, Gpu};
use normforge::tch::{nn, Device};
use normforge::torch::Optimize;
use normforge::RegistryExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "Train a small CNN with a DSL norm layer and a DSL optimizer through tch")]
struct Args {
    /// Registry name of the normalization layer.
    #[arg(long, default_value = "batch_norm")]
    norm: String,
    /// Registry name of the update rule.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Norm-layer hyper-parameters as name=value (repeatable), e.g. groups=4.
    #[arg(long = "norm-hparam")]
    norm_hparams: Vec<String>,
    /// Optimizer hyper-parameters as name=value (repeatable), e.g. weight_decay=0.05.
    #[arg(long = "opt-hparam")]
    opt_hparams: Vec<String>,
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch: i64,
    #[arg(long, default_value_t = 4000)]
    train_size: i64,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    clip: Option<f64>,
    /// Where to write the loss curve.
    #[arg(long, default_value = "train-loss.png")]
    plot: PathBuf,
    /// Also load entries from this compiled plugin (trusted code only).
    #[arg(long)]
    plugin: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Run on the CPU even when CUDA is available.
    #[arg(long)]
    cpu: bool,
    /// Run the norm layers and the update rule on normforge's own CUDA kernels (the fast path:
    /// NVRTC-compiled, launched on tch's tensors) instead of libtorch's operations. Needs CUDA.
    #[arg(long)]
    fused: bool,
    /// Save a checkpoint here after each epoch (the model's variables, the optimizer's state,
    /// the progress), keeping the newest.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Continue from the newest checkpoint in --checkpoint's directory, if there is one.
    #[arg(long, requires = "checkpoint")]
    resume: bool,
}

/// What a checkpoint says of the run beside the model's and the optimizer's tensors.
#[derive(Serialize, Deserialize)]
struct Progress {
    norm: String,
    optimizer: String,
    epoch: usize,
    losses: Vec<f64>,
}

/// `dir/epoch-N`, written under a temporary name and renamed whole, so an interrupted save
/// leaves the last complete checkpoint; the older ones are then removed.
fn save_checkpoint(dir: &Path, vs: &nn::VarStore, opt: &dyn Optimize, progress: &Progress) -> Result<(), String> {
    let io = |e: std::io::Error| format!("checkpoint in {}: {e}", dir.display());
    let tmp = dir.join(format!("epoch-{}.partial", progress.epoch));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io)?;
    vs.save(tmp.join("model.safetensors")).map_err(|e| format!("saving the model: {e}"))?;
    opt.save(&tmp.join("optimizer.safetensors")).map_err(|e| format!("saving the optimizer: {e}"))?;
    std::fs::write(tmp.join("progress.json"), serde_json::to_string(progress).map_err(|e| e.to_string())?).map_err(io)?;
    let done = dir.join(format!("epoch-{}", progress.epoch));
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(io)?;
    for (old, _) in checkpoints(dir)?.into_iter().filter(|(_, e)| *e != progress.epoch) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// The complete checkpoints in `dir`, with their epochs.
fn checkpoints(dir: &Path) -> Result<Vec<(PathBuf, usize)>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let epoch = e.file_name().to_str().and_then(|n| n.strip_prefix("epoch-")).and_then(|n| n.parse::<usize>().ok());
        if let Some(epoch) = epoch {
            out.push((e.path(), epoch));
        }
    }
    Ok(out)
}

/// Load the newest checkpoint of `dir` into the model and the optimizer: its progress, or
/// `None` where there is none. Refuses one of another layer or rule.
fn resume(dir: &Path, vs: &mut nn::VarStore, opt: &mut dyn Optimize, args: &Args) -> Result<Option<Progress>, String> {
    let Some((path, _)) = checkpoints(dir)?.into_iter().max_by_key(|(_, e)| *e) else { return Ok(None) };
    let text = std::fs::read_to_string(path.join("progress.json")).map_err(|e| format!("{}: {e}", path.display()))?;
    let progress: Progress = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if (progress.norm.as_str(), progress.optimizer.as_str()) != (args.norm.as_str(), args.optimizer.as_str()) {
        return Err(format!(
            "{} is a checkpoint of norm `{}` with optimizer `{}`, not `{}` with `{}`",
            path.display(),
            progress.norm,
            progress.optimizer,
            args.norm,
            args.optimizer
        ));
    }
    vs.load(path.join("model.safetensors")).map_err(|e| format!("{}: the model: {e}", path.display()))?;
    opt.load(&path.join("optimizer.safetensors")).map_err(|e| format!("{}: the optimizer: {e}", path.display()))?;
    Ok(Some(progress))
}

fn parse(list: &[String]) -> Result<Vec<(String, f64)>, String> {
    list.iter().map(|s| parse_assignment(s).map_err(|e| e.to_string())).collect()
}

fn run(args: Args) -> Result<f64, String> {
    let reg = normforge::builtin_registry().map_err(|e| e.render())?;
    if let Some(p) = &args.plugin {
        reg.load_plugin(p).map_err(|e| e.render())?;
    }
    let device = if !args.cpu && normforge::torch::load_cuda() { Device::Cuda(0) } else { Device::Cpu };
    let gpu = match (args.fused, device) {
        (false, _) => None,
        (true, Device::Cuda(i)) => Some(Arc::new(Gpu::open(i, Compiler::default_cache_dir()).map_err(|e| format!("--fused: {e}"))?)),
        (true, _) => return Err("--fused runs normforge's CUDA kernels: it needs CUDA, and libtorch sees none here (or --cpu was given)".into()),
    };
    let (train_x, train_y) = common::shapes(args.train_size, args.seed);
    let (test_x, test_y) = common::shapes(1000, args.seed + 1);
    let (train_x, train_y, test_x, test_y) =
        (train_x.to_device(device), train_y.to_device(device), test_x.to_device(device), test_y.to_device(device));

    normforge::tch::manual_seed(args.seed);
    let mut vs = nn::VarStore::new(device);
    let model = common::Cnn::new(&vs, &reg, &args.norm, &parse(&args.norm_hparams)?, gpu.as_ref())?;
    let mut spec = reg.optimizer(&args.optimizer).map_err(|e| e.to_string())?.hparam("lr", args.lr);
    for (k, v) in parse(&args.opt_hparams)? {
        spec = spec.hparam(&k, v);
    }
    let has_decay = spec.0.entry.hparams.iter().any(|h| h.name == "weight_decay");
    // The usual grouping: no weight decay on biases and norm parameters.
    let no_decay = |n: &str| n.ends_with("bias") || n.starts_with("norm");
    let zero = [("weight_decay".to_string(), 0.0)];
    let mut opt: Box<dyn Optimize> = match &gpu {
        None => Box::new(spec.build(&vs).map_err(|e| e.to_string())?),
        Some(gpu) => Box::new(FusedOptimizer::new(gpu.clone(), spec.0.entry.clone(), &vs, &spec.0.hparams).map_err(|e| e.to_string())?),
    };
    if has_decay {
        opt.split_group(&no_decay, &zero).map_err(|e| e.to_string())?;
    }
    opt.clip_grad_norm(args.clip);
    println!(
        "training a CNN on {} generated images ({}) on {device:?}{}: norm `{}`, optimizer `{}` (lr {})",
        args.train_size,
        common::CLASS_NAMES.join(", "),
        if gpu.is_some() { ", on normforge's fused kernels" } else { "" },
        args.norm,
        args.optimizer,
        args.lr
    );

    let mut progress = Progress { norm: args.norm.clone(), optimizer: args.optimizer.clone(), epoch: 0, losses: Vec::new() };
    if let (true, Some(dir)) = (args.resume, &args.checkpoint) {
        match resume(dir, &mut vs, opt.as_mut(), &args)? {
            Some(p) => {
                println!("resuming after epoch {} from {}", p.epoch, dir.display());
                progress = p;
            }
            None => println!("no checkpoint in {} yet: starting afresh", dir.display()),
        }
    }

    let steps_per_epoch = (args.train_size / args.batch) as u64;
    let mut acc = common::accuracy(&model, &test_x, &test_y);
    for epoch in progress.epoch + 1..=args.epochs {
        // Each epoch's shuffle from its own seed, so a resumed run takes the same batches.
        normforge::tch::manual_seed(args.seed.wrapping_mul(1_000_003).wrapping_add(epoch as i64));
        let bar = ProgressBar::new(steps_per_epoch);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix:>2} [{bar:30}] {pos}/{len} {msg}").unwrap().progress_chars("=> "),
        );
        bar.set_prefix(epoch.to_string());
        let epoch_losses = common::train_epoch(&model, opt.as_mut(), &train_x, &train_y, args.batch, |l| {
            bar.set_message(format!("loss {l:.4}"));
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        acc = common::accuracy(&model, &test_x, &test_y);
        let mean = epoch_losses.iter().sum::<f64>() / epoch_losses.len().max(1) as f64;
        println!("epoch {epoch:>2}  loss {mean:.4}  test accuracy {acc:.3}");
        progress.losses.extend(epoch_losses);
        progress.epoch = epoch;
        if let Some(dir) = &args.checkpoint {
            save_checkpoint(dir, &vs, opt.as_ref(), &progress)?;
        }
    }
    let losses = progress.losses;
    let title = format!("{} + {}", args.norm, args.optimizer);
    common::plot_losses(&args.plot, &title, &[(title.clone(), common::smooth(&losses, 25))])?;
    println!("final test accuracy: {acc:.3}");
    println!("loss curve written to {}", args.plot.display());
    Ok(acc)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
