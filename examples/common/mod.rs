//! What both examples share: a generated image data set, a small CNN whose norm layers come
//! from the registry, one training epoch, and loss-curve plots.
#![allow(dead_code)]

use normforge::tch::nn::{self, Module, ModuleT};
use normforge::tch::{Device, Kind, Tensor};
use normforge::torch::{DslLayer, Optimize, StepReport};
use normforge::{Registry, RegistryExt};
use normforge::cuda::Gpu;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Arc;

pub const SIDE: i64 = 16;
pub const CLASSES: i64 = 4;
pub const CLASS_NAMES: [&str; 4] = ["square", "disc", "cross", "bar"];

/// Noisy 16x16 images of four shapes at random places and sizes, drawn with tch's RNG so a
/// seed fixes the data set. Returns ([n, 1, 16, 16] images, [n] labels).
pub fn shapes(n: i64, seed: i64) -> (Tensor, Tensor) {
    normforge::tch::manual_seed(seed);
    let labels = Tensor::randint(CLASSES, [n], (Kind::Int64, Device::Cpu));
    // Sizes from 3 to 5 pixels: smaller discs and crosses look alike.
    let cx = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 6.0 + 5.0;
    let cy = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 6.0 + 5.0;
    let r = Tensor::rand([n], (Kind::Float, Device::Cpu)) * 2.0 + 3.0;
    let coords = Tensor::arange(SIDE, (Kind::Float, Device::Cpu));
    let xs = coords.view([1, 1, SIDE]).expand([n, SIDE, SIDE], false);
    let ys = coords.view([1, SIDE, 1]).expand([n, SIDE, SIDE], false);
    let dx = (&xs - cx.view([n, 1, 1])).abs();
    let dy = (&ys - cy.view([n, 1, 1])).abs();
    let rr = r.view([n, 1, 1]);
    let square = dx.le_tensor(&rr).logical_and(&dy.le_tensor(&rr));
    let disc = (&dx * &dx + &dy * &dy).le_tensor(&(&rr * &rr));
    let cross = (dx.le(0.8).logical_and(&dy.le_tensor(&rr))).logical_or(&dy.le(0.8).logical_and(&dx.le_tensor(&rr)));
    let bar = dy.le(0.8).logical_and(&dx.le_tensor(&(&rr * 2.0)));
    let masks = Tensor::stack(&[square, disc, cross, bar], 1).to_kind(Kind::Float); // [n, 4, H, W]
    let pick = labels.one_hot(CLASSES).to_kind(Kind::Float).view([n, CLASSES, 1, 1]);
    let img = (masks * pick).sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
    let noise = Tensor::randn([n, 1, SIDE, SIDE], (Kind::Float, Device::Cpu)) * 0.35;
    (img + noise, labels)
}

/// A norm layer from the registry applied to [n, c, h, w] feature maps. Layers over the last
/// axis (`x[..., d]`: layer_norm, rms_norm, dyt) see channels last, as in ConvNeXt.
#[derive(Debug)]
pub struct Norm {
    layer: DslLayer,
    channels_last: bool,
}

impl Norm {
    /// `fused`: a layer's forward and backward run by our CUDA kernels, as the GPU it names.
    pub fn new(reg: &Registry, name: &str, hparams: &[(String, f64)], path: nn::Path, channels: i64, fused: Option<&Arc<Gpu>>) -> Result<Self, String> {
        let mut spec = reg.layer(name).map_err(|e| e.to_string())?;
        for (k, v) in hparams {
            spec = spec.hparam(k, *v);
        }
        let axes = &spec.0.entry.axes;
        // `x[n, c, s...]` takes NCHW; anything else is given channels last.
        let channels_last = axes.len() != 3 || axes[0].variadic || axes[1].variadic || !axes[2].variadic;
        let sample = if channels_last { [1, SIDE, SIDE, channels] } else { [1, channels, SIDE, SIDE] };
        let mut layer = spec.build(&path, &sample).map_err(|e| e.to_string())?;
        if let Some(gpu) = fused {
            layer = normforge::cuda::fused_layer(layer, gpu).map_err(|e| e.to_string())?;
        }
        Ok(Norm { layer, channels_last })
    }
}

impl ModuleT for Norm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if self.channels_last {
            self.layer.forward_t(&xs.permute([0, 2, 3, 1]), train).permute([0, 3, 1, 2])
        } else {
            self.layer.forward_t(xs, train)
        }
    }
}

#[derive(Debug)]
pub struct Cnn {
    conv1: nn::Conv2D,
    norm1: Norm,
    conv2: nn::Conv2D,
    norm2: Norm,
    conv3: nn::Conv2D,
    norm3: Norm,
    head: nn::Linear,
}

impl Cnn {
    pub fn new(vs: &nn::VarStore, reg: &Registry, norm: &str, hparams: &[(String, f64)], fused: Option<&Arc<Gpu>>) -> Result<Self, String> {
        let root = vs.root();
        let conv = nn::ConvConfig { padding: 1, bias: false, ..Default::default() };
        Ok(Cnn {
            conv1: nn::conv2d(&root / "conv1", 1, 16, 3, conv),
            norm1: Norm::new(reg, norm, hparams, &root / "norm1", 16, fused)?,
            conv2: nn::conv2d(&root / "conv2", 16, 32, 3, conv),
            norm2: Norm::new(reg, norm, hparams, &root / "norm2", 32, fused)?,
            conv3: nn::conv2d(&root / "conv3", 32, 64, 3, conv),
            norm3: Norm::new(reg, norm, hparams, &root / "norm3", 64, fused)?,
            head: nn::linear(&root / "head", 64, CLASSES, Default::default()),
        })
    }
}

impl ModuleT for Cnn {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = self.norm1.forward_t(&self.conv1.forward(xs), train).relu().max_pool2d_default(2);
        let x = self.norm2.forward_t(&self.conv2.forward(&x), train).relu().max_pool2d_default(2);
        let x = self.norm3.forward_t(&self.conv3.forward(&x), train).relu();
        self.head.forward(&x.amax([2i64, 3].as_slice(), false))
    }
}

/// One pass over the training set in shuffled mini-batches; returns each step's loss.
pub fn train_epoch(
    model: &Cnn,
    opt: &mut dyn Optimize,
    xs: &Tensor,
    ys: &Tensor,
    batch: i64,
    mut on_step: impl FnMut(f64),
) -> Result<Vec<f64>, String> {
    let n = xs.size()[0];
    let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
    let mut losses = Vec::new();
    let mut start = 0;
    while start + batch <= n {
        let idx = perm.narrow(0, start, batch);
        let loss = model.forward_t(&xs.index_select(0, &idx), true).cross_entropy_for_logits(&ys.index_select(0, &idx));
        match opt.backward_step(&loss).map_err(|e| e.to_string())? {
            StepReport::Applied { .. } => {}
            StepReport::SkippedNonFinite { param } => eprintln!("step skipped: the gradient of {param} is not finite"),
        }
        let l = f64::try_from(&loss).unwrap_or(f64::NAN);
        losses.push(l);
        on_step(l);
        start += batch;
    }
    Ok(losses)
}

pub fn accuracy(model: &Cnn, xs: &Tensor, ys: &Tensor) -> f64 {
    normforge::tch::no_grad(|| {
        let pred = model.forward_t(xs, false).argmax(-1, false);
        f64::try_from(pred.eq_tensor(ys).to_kind(Kind::Float).mean(Kind::Float)).unwrap_or(0.0)
    })
}

/// Register a sans-serif font for plot labels, if the system has DejaVu Sans; without one the
/// plots are drawn without text.
fn font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        for p in ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"] {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok();
            }
        }
        false
    })
}

/// Moving average over `w` steps, for readable curves.
pub fn smooth(v: &[f64], w: usize) -> Vec<f64> {
    (0..v.len()).map(|i| {
        let lo = i.saturating_sub(w - 1);
        v[lo..=i].iter().sum::<f64>() / (i - lo + 1) as f64
    }).collect()
}

/// Plot loss curves (one per name) against the step, log-scaled.
pub fn plot_losses(path: &Path, title: &str, curves: &[(String, Vec<f64>)]) -> Result<(), String> {
    let labels = font();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let steps = curves.iter().map(|c| c.1.len()).max().unwrap_or(1).max(2);
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, c) in curves {
        for &v in c.iter().filter(|v| v.is_finite() && **v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        (lo, hi) = (1e-3, 1.0);
    }
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15).x_label_area_size(if labels { 40 } else { 5 }).y_label_area_size(if labels { 60 } else { 5 });
    if labels {
        builder.caption(title, ("sans-serif", 22));
    }
    let mut chart = builder
        .build_cartesian_2d(0usize..steps, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|e| e.to_string())?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("step").y_desc("training loss (moving average)").y_label_formatter(&|v| format!("{v:.3}"));
    } else {
        mesh.disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| e.to_string())?;
    for (k, (name, c)) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let s = chart
            .draw_series(LineSeries::new(c.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (i, *v)), color.stroke_width(2)))
            .map_err(|e| e.to_string())?;
        if labels {
            s.label(name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
    }
    if labels {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
