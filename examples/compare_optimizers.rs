//! Train the same CNN (same data, same initial weights) with several registry update rules and
//! plot their loss curves together.
//!
//!     cargo run --example compare_optimizers -- --optimizers sgd,adam,adamw,lion,lamb,adamp

mod common;

use clap::Parser;
use normforge::tch::{nn, Device};
use normforge::RegistryExt;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(about = "Compare registry optimizers on one task and plot their loss curves")]
struct Args {
    /// Comma-separated optimizer names, each optionally with a learning rate: `lion:3e-4`.
    #[arg(long, default_value = "sgd:0.05,adam:3e-3,adamw:3e-3,lion:3e-4,lamb:1e-2,adamp:3e-3")]
    optimizers: String,
    #[arg(long, default_value = "batch_norm")]
    norm: String,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    #[arg(long, default_value_t = 2000)]
    train_size: i64,
    #[arg(long, default_value = "compare-optimizers.png")]
    plot: PathBuf,
}

fn run(args: Args) -> Result<(), String> {
    let reg = normforge::builtin_registry().map_err(|e| e.render())?;
    let (xs, ys) = common::shapes(args.train_size, 0);
    let (tx, ty) = common::shapes(1000, 1);
    let mut curves = Vec::new();
    for item in args.optimizers.split(',') {
        let (name, lr) = match item.split_once(':') {
            Some((n, lr)) => (n, lr.parse::<f64>().map_err(|_| format!("bad learning rate in `{item}`"))?),
            None => (item, 1e-3),
        };
        normforge::tch::manual_seed(0); // the same initial weights for every rule
        let vs = nn::VarStore::new(Device::Cpu);
        let model = common::Cnn::new(&vs, &reg, &args.norm, &[], None)?;
        let mut opt = reg.optimizer(name).map_err(|e| e.to_string())?.hparam("lr", lr).build(&vs).map_err(|e| e.to_string())?;
        let mut losses = Vec::new();
        for _ in 0..args.epochs {
            losses.extend(common::train_epoch(&model, &mut opt, &xs, &ys, 64, |_| {})?);
        }
        let acc = common::accuracy(&model, &tx, &ty);
        let last = losses.iter().rev().take(10).sum::<f64>() / 10.0;
        println!("{name:<8} lr {lr:<8} final loss {last:.4}  test accuracy {acc:.3}");
        curves.push((format!("{name} (lr {lr})"), common::smooth(&losses, 25)));
    }
    common::plot_losses(&args.plot, &format!("optimizers on {} generated images, norm {}", args.train_size, args.norm), &curves)?;
    println!("loss curves written to {}", args.plot.display());
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
