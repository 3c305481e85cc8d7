//! The main job: train a small MLP classifier on a generated three-arm spiral, with a DSL
//! normalization layer after each hidden layer and a DSL update rule for every parameter,
//! both taken from the registry and run by the f64 reference backend.
//!
//!     cargo run --release --example train -- --norm layer_norm --optimizer adamw
//!
//! The linear layers and the loss are plain Rust here; the norm layers' backward passes are
//! the ones the compiler derived from their specs.

use clap::Parser;
use normforge::dsl::hyper::parse_assignment;
use normforge::reference::{Layer, Optimizer, StepOutcome, Tensor};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "Train an MLP on a generated spiral with a DSL norm layer and a DSL optimizer")]
struct Args {
    /// Registry name of the normalization layer (applied to [batch, features]).
    #[arg(long, default_value = "layer_norm")]
    norm: String,
    /// Registry name of the update rule.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Hyper-parameters of the norm layer, as name=value (repeatable).
    #[arg(long = "norm-hparam")]
    norm_hparams: Vec<String>,
    /// Hyper-parameters of the optimizer, as name=value (repeatable); lr defaults to 0.01.
    #[arg(long = "opt-hparam")]
    opt_hparams: Vec<String>,
    #[arg(long, default_value_t = 60)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    hidden: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// xorshift64*: deterministic data and initialisation without an RNG dependency.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

const CLASSES: usize = 3;

/// Three interleaved spiral arms with noise: not linearly separable.
fn spiral(n_per_class: usize, rng: &mut Rng) -> (Vec<[f64; 2]>, Vec<usize>) {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for c in 0..CLASSES {
        for i in 0..n_per_class {
            let r = i as f64 / n_per_class as f64;
            let theta = c as f64 * 2.0 * std::f64::consts::PI / CLASSES as f64 + 3.5 * r + 0.15 * rng.normal();
            xs.push([r * theta.cos() * 2.0, r * theta.sin() * 2.0]);
            ys.push(c);
        }
    }
    (xs, ys)
}

/// y = x W^T + b over a batch; W is [out, in].
struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn new(inp: usize, out: usize, rng: &mut Rng) -> Self {
        let scale = (2.0 / inp as f64).sqrt();
        let w = Tensor::new(vec![out, inp], (0..out * inp).map(|_| rng.normal() * scale).collect()).unwrap();
        Linear { w, b: Tensor::full(vec![out], 0.0) }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, inp, out) = (x.shape[0], x.shape[1], self.w.shape[0]);
        let mut y = vec![0.0; n * out];
        for r in 0..n {
            for o in 0..out {
                let row = &self.w.data[o * inp..(o + 1) * inp];
                y[r * out + o] = self.b.data[o] + row.iter().zip(&x.data[r * inp..(r + 1) * inp]).map(|(a, b)| a * b).sum::<f64>();
            }
        }
        Tensor::new(vec![n, out], y).unwrap()
    }
    /// Returns (grad x, grad W, grad b).
    fn backward(&self, x: &Tensor, gy: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (n, inp, out) = (x.shape[0], x.shape[1], self.w.shape[0]);
        let (mut gx, mut gw, mut gb) = (vec![0.0; n * inp], vec![0.0; out * inp], vec![0.0; out]);
        for r in 0..n {
            for o in 0..out {
                let g = gy.data[r * out + o];
                gb[o] += g;
                for i in 0..inp {
                    gw[o * inp + i] += g * x.data[r * inp + i];
                    gx[r * inp + i] += g * self.w.data[o * inp + i];
                }
            }
        }
        (
            Tensor::new(vec![n, inp], gx).unwrap(),
            Tensor::new(vec![out, inp], gw).unwrap(),
            Tensor::new(vec![out], gb).unwrap(),
        )
    }
}

fn relu(t: &Tensor) -> Tensor {
    Tensor { shape: t.shape.clone(), data: t.data.iter().map(|v| v.max(0.0)).collect() }
}

fn relu_backward(pre: &Tensor, g: &Tensor) -> Tensor {
    Tensor { shape: g.shape.clone(), data: pre.data.iter().zip(&g.data).map(|(p, g)| if *p > 0.0 { *g } else { 0.0 }).collect() }
}

struct Model {
    lin: [Linear; 3],
    norm: [Layer; 2],
}

/// What the backward pass needs from the forward pass.
struct Trace {
    x: Tensor,
    h: [Tensor; 2],
    n: [Tensor; 2],
    a: [Tensor; 2],
}

impl Model {
    fn forward(&mut self, x: Tensor, train: bool) -> Result<(Tensor, Trace), normforge::reference::Error> {
        let h0 = self.lin[0].forward(&x);
        let n0 = self.norm[0].forward(&h0, train)?;
        let a0 = relu(&n0);
        let h1 = self.lin[1].forward(&a0);
        let n1 = self.norm[1].forward(&h1, train)?;
        let a1 = relu(&n1);
        let logits = self.lin[2].forward(&a1);
        Ok((logits, Trace { x, h: [h0, h1], n: [n0, n1], a: [a0, a1] }))
    }

    /// Gradients in the order of `params()`.
    fn backward(&self, t: &Trace, g_logits: &Tensor) -> Result<Vec<Tensor>, normforge::reference::Error> {
        let (g_a1, gw2, gb2) = self.lin[2].backward(&t.a[1], g_logits);
        let g_n1 = relu_backward(&t.n[1], &g_a1);
        let norm1 = self.norm[1].backward(&t.h[1], &g_n1, true)?;
        let (g_a0, gw1, gb1) = self.lin[1].backward(&t.a[0], &norm1.input);
        let g_n0 = relu_backward(&t.n[0], &g_a0);
        let norm0 = self.norm[0].backward(&t.h[0], &g_n0, true)?;
        let (_, gw0, gb0) = self.lin[0].backward(&t.x, &norm0.input);
        let mut grads = vec![gw0, gb0, gw1, gb1, gw2, gb2];
        grads.extend(norm0.params);
        grads.extend(norm1.params);
        Ok(grads)
    }

    fn params(&self) -> Vec<Tensor> {
        let mut v: Vec<Tensor> = self.lin.iter().flat_map(|l| [l.w.clone(), l.b.clone()]).collect();
        v.extend(self.norm[0].params.iter().cloned());
        v.extend(self.norm[1].params.iter().cloned());
        v
    }

    fn set_params(&mut self, mut v: Vec<Tensor>) {
        let rest = v.split_off(6);
        for (k, l) in self.lin.iter_mut().enumerate() {
            l.w = v[2 * k].clone();
            l.b = v[2 * k + 1].clone();
        }
        let n0 = self.norm[0].params.len();
        self.norm[0].params = rest[..n0].to_vec();
        self.norm[1].params = rest[n0..].to_vec();
    }
}

/// Mean cross-entropy and its gradient with respect to the logits; also the correct count.
fn cross_entropy(logits: &Tensor, labels: &[usize]) -> (f64, Tensor, usize) {
    let n = labels.len();
    let mut loss = 0.0;
    let mut correct = 0;
    let mut g = vec![0.0; logits.data.len()];
    for (r, &y) in labels.iter().enumerate() {
        let row = &logits.data[r * CLASSES..(r + 1) * CLASSES];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        loss += -(row[y] - m - z.ln());
        let argmax = (0..CLASSES).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        correct += usize::from(argmax == y);
        for c in 0..CLASSES {
            g[r * CLASSES + c] = ((row[c] - m).exp() / z - f64::from(c == y)) / n as f64;
        }
    }
    (loss / n as f64, Tensor { shape: logits.shape.clone(), data: g }, correct)
}

fn batch(xs: &[[f64; 2]], idx: &[usize]) -> Tensor {
    Tensor::new(vec![idx.len(), 2], idx.iter().flat_map(|&i| xs[i]).collect()).unwrap()
}

fn hparams(list: &[String]) -> Result<Vec<(String, f64)>, String> {
    list.iter().map(|s| parse_assignment(s).map_err(|e| e.to_string())).collect()
}

fn run(args: Args) -> Result<f64, String> {
    let registry = normforge::builtin_registry().map_err(|e| e.render())?;
    let norm_entry = registry.get(&args.norm).map_err(|e| e.to_string())?.entry;
    let opt_entry = registry.get(&args.optimizer).map_err(|e| e.to_string())?.entry;
    let norm_h = hparams(&args.norm_hparams)?;
    let mut opt_h = hparams(&args.opt_hparams)?;
    if !opt_h.iter().any(|(k, _)| k == "lr") && opt_entry.hparams.iter().any(|h| h.name == "lr") {
        opt_h.push(("lr".into(), 0.01));
    }

    let mut rng = Rng(args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (xs, ys) = spiral(200, &mut rng);
    let mut order: Vec<usize> = (0..xs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.uniform() * (i + 1) as f64) as usize);
    }
    let (test_idx, train_idx) = order.split_at(xs.len() / 5);
    let mut train_idx = train_idx.to_vec();

    let hidden = args.hidden;
    let err = |e: normforge::reference::Error| e.to_string();
    let mut model = Model {
        lin: [Linear::new(2, hidden, &mut rng), Linear::new(hidden, hidden, &mut rng), Linear::new(hidden, CLASSES, &mut rng)],
        norm: [
            Layer::new(Arc::clone(&norm_entry), &norm_h, &[args.batch, hidden]).map_err(err)?,
            Layer::new(Arc::clone(&norm_entry), &norm_h, &[args.batch, hidden]).map_err(err)?,
        ],
    };
    let mut opt = Optimizer::new(opt_entry, &opt_h).map_err(err)?;
    println!(
        "training a 2-{hidden}-{hidden}-{CLASSES} MLP on {} spiral points: norm `{}`, optimizer `{}` ({})",
        train_idx.len(),
        args.norm,
        args.optimizer,
        opt.entry.hparams.iter().zip(&opt.hparams).map(|(h, v)| format!("{}={v}", h.name)).collect::<Vec<_>>().join(", ")
    );

    let mut test_acc = 0.0;
    for epoch in 1..=args.epochs {
        for i in (1..train_idx.len()).rev() {
            train_idx.swap(i, (rng.uniform() * (i + 1) as f64) as usize);
        }
        let (mut total, mut correct, mut seen) = (0.0, 0, 0);
        // Full batches only, so the norm layers see the shape they were built for.
        for chunk in train_idx.chunks_exact(args.batch) {
            let labels: Vec<usize> = chunk.iter().map(|&i| ys[i]).collect();
            let (logits, trace) = model.forward(batch(&xs, chunk), true).map_err(err)?;
            let (loss, g, ok) = cross_entropy(&logits, &labels);
            let grads = model.backward(&trace, &g).map_err(err)?;
            let mut params = model.params();
            match opt.step(&mut params, &grads).map_err(err)? {
                StepOutcome::Applied => model.set_params(params),
                StepOutcome::SkippedNonFinite { tensor } => println!("  step skipped: gradient {tensor} is not finite"),
            }
            total += loss * chunk.len() as f64;
            correct += ok;
            seen += chunk.len();
        }
        // Evaluate in eval mode, in batches of the training size (the last one padded).
        let mut test_ok = 0;
        for chunk in test_idx.chunks(args.batch) {
            let mut idx = chunk.to_vec();
            idx.resize(args.batch, chunk[0]);
            let labels: Vec<usize> = idx.iter().map(|&i| ys[i]).collect();
            let (logits, _) = model.forward(batch(&xs, &idx), false).map_err(err)?;
            for (r, &y) in labels.iter().enumerate().take(chunk.len()) {
                let row = &logits.data[r * CLASSES..(r + 1) * CLASSES];
                let argmax = (0..CLASSES).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                test_ok += usize::from(argmax == y);
            }
        }
        test_acc = test_ok as f64 / test_idx.len() as f64;
        if epoch % 10 == 0 || epoch == 1 || epoch == args.epochs {
            println!(
                "epoch {epoch:>3}  loss {:.4}  train acc {:.3}  test acc {test_acc:.3}",
                total / seen as f64,
                correct as f64 / seen as f64
            );
        }
    }
    println!("final test accuracy: {test_acc:.3}");
    Ok(test_acc)
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
