//! Parameters and gradients in two flat buffers, so one launch can update every tensor with no
//! copy: each parameter's storage becomes a view into the flat parameter buffer, and its
//! gradient tensor a view into the flat gradient buffer, into which backpropagation then
//! accumulates in place. Tensors are padded to whole blocks of `BLOCK` (a block never straddles
//! two; the last padded to whole cubes of blocks), the layout the CubeCL step kernels index
//! (`blocks`: per block its tensor, first element and length; `ranges`: per tensor its first
//! block and block count).

use normforge_tch::shim;
use crate::plans::dtype_of;
use normforge_cubecl::Dtype;
use tch::{Device, Kind, Tensor};

/// Units per cube of the step kernels.
pub use normforge_cubecl::kernel::BLOCK;
use normforge_cubecl::kernel::padded_layout;

pub struct Arena {
    pub p: Tensor,
    pub g: Tensor,
    /// Per cube: tensor index, first element, length (as u32 bits).
    pub blocks: Tensor,
    /// Per tensor: first cube, cube count (as u32 bits).
    pub ranges: Tensor,
    pub sizes: Vec<usize>,
    pub shapes: Vec<Vec<usize>>,
    /// Blocks of `BLOCK` elements (the name is older than `BLOCKS_PER_CUBE`): a cube each in a
    /// step phase that reduces, four to a cube in one that does not (`KProgram::cubes`).
    pub cubes: usize,
    pub device: Device,
    /// What every parameter and gradient is stored in: f32, bf16 or f16.
    pub kind: Kind,
    /// Where each parameter's data and gradient live in `p` and `g`.
    places: Vec<(usize, usize)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ArenaError(pub String);

impl Arena {
    /// Move `vars` (contiguous, all of one kind — f32, bf16 or f16 — on one device) into flat
    /// buffers of that kind; their values and existing gradients are kept. Checks everything
    /// before changing anything.
    pub fn adopt(vars: &mut [Tensor]) -> Result<Arena, ArenaError> {
        let device = vars.first().map_or(Device::Cpu, Tensor::device);
        let kind = vars.first().map_or(Kind::Float, Tensor::kind);
        if dtype_of(kind).is_none() {
            return Err(ArenaError(format!("parameter 0 is {kind:?}: a flat arena takes f32, bf16 or f16 tensors")));
        }
        for (i, v) in vars.iter().enumerate() {
            if v.kind() != kind || v.device() != device || !v.is_contiguous() {
                return Err(ArenaError(format!(
                    "parameter {i} is {:?} on {:?}{}: a flat arena takes contiguous tensors of one kind ({kind:?}) on one device ({device:?})",
                    v.kind(),
                    v.device(),
                    if v.is_contiguous() { "" } else { ", not contiguous" }
                )));
            }
        }
        let sizes: Vec<usize> = vars.iter().map(|v| v.numel()).collect();
        let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.size().iter().map(|&d| d as usize).collect()).collect();
        let (blocks, ranges, cubes) = padded_layout(&sizes);
        if (cubes * BLOCK) as u64 > u32::MAX as u64 / 4 {
            return Err(ArenaError(format!("{} elements exceed the 32-bit indexing of the step kernels", cubes * BLOCK)));
        }
        let bits = |v: &[u32]| Tensor::from_slice(&v.iter().map(|&x| x as i32).collect::<Vec<_>>()).to_device(device);
        let opts = (kind, device);
        let p = Tensor::zeros([(cubes * BLOCK).max(1) as i64], opts);
        let g = Tensor::zeros([(cubes * BLOCK).max(1) as i64], opts);
        tch::no_grad(|| -> Result<(), ArenaError> {
            let mut first = 0i64;
            for (v, &n) in vars.iter_mut().zip(&sizes) {
                let view = |flat: &Tensor| flat.narrow(0, first, n as i64).view(v.size().as_slice());
                let (pv, gv) = (view(&p), view(&g));
                pv.shallow_clone().copy_(v);
                let old = v.grad();
                if old.defined() {
                    gv.shallow_clone().copy_(&old);
                }
                v.set_data(&pv);
                shim::set_grad(v, &gv).map_err(|e| ArenaError(e.0))?;
                first += (n.div_ceil(BLOCK) * BLOCK) as i64;
            }
            Ok(())
        })?;
        let places = vars.iter().map(|v| (v.data_ptr() as usize, v.grad().data_ptr() as usize)).collect();
        Ok(Arena { p, g, blocks: bits(&blocks), ranges: bits(&ranges), sizes, shapes, cubes, device, kind, places })
    }

    /// Tensor `k`'s elements in `flat` (`p` or `g`), flat: a view.
    pub fn tensor(&self, flat: &Tensor, k: usize) -> Tensor {
        self.stack(flat, k..k + 1)
    }

    /// Whether tensor `k` follows tensor `k - 1` with no padding between them (that one fills
    /// whole cubes), so the two can be read as one stack.
    pub fn joins(&self, k: usize) -> bool {
        k > 0 && self.sizes[k - 1].is_multiple_of(BLOCK)
    }

    /// The elements of tensors `r` in `flat`, one after another: a view. Every tensor but the
    /// last must fill whole cubes ([`Self::joins`]).
    pub fn stack(&self, flat: &Tensor, r: std::ops::Range<usize>) -> Tensor {
        debug_assert!((r.start + 1..r.end).all(|k| self.joins(k)));
        let first: usize = self.sizes[..r.start].iter().map(|n| n.div_ceil(BLOCK) * BLOCK).sum();
        flat.narrow(0, first as i64, self.sizes[r].iter().sum::<usize>() as i64)
    }

    /// What the parameters are stored in, as the kernels name it.
    pub fn dtype(&self) -> Dtype {
        dtype_of(self.kind).expect("checked at adoption")
    }

    /// Elements in the padded layout.
    pub fn len(&self) -> usize {
        self.cubes * BLOCK
    }

    pub fn is_empty(&self) -> bool {
        self.cubes == 0
    }

    /// The first of `vars` (those adopted, in order) that no longer lives where the arena put
    /// it, data or gradient: another arena adopted it, its data was replaced, or its gradient
    /// was set to none — a step would then update a copy, or miss its gradient. Host-side
    /// pointers only: nothing waits for the device.
    pub fn moved(&self, vars: &[Tensor]) -> Option<usize> {
        (0..self.places.len()).find(|&k| {
            let grad = vars[k].grad();
            (vars[k].data_ptr() as usize, if grad.defined() { grad.data_ptr() as usize } else { 0 }) != self.places[k]
        })
    }

    /// Every gradient to zero, in place (one operation).
    pub fn zero_grad(&mut self) {
        tch::no_grad(|| {
            let _ = self.g.zero_();
        });
    }

    /// The gradients' 2-norm (padding is zero): finite exactly when every gradient is.
    pub fn grad_norm(&self) -> f64 {
        Self::grad_norms(&[self])[0]
    }

    /// [`Self::grad_norm`] of each arena (on one device), read back together: an optimizer
    /// with several groups waits for the device once per step, not once per group; each in
    /// one read of its buffer (`normforge_tch::optimizer::norms`).
    pub fn grad_norms(arenas: &[&Arena]) -> Vec<f64> {
        normforge_tch::optimizer::norms(arenas.iter().map(|a| &a.g))
    }

    /// Which tensor's gradient holds NaN or infinity first, if one does.
    pub fn nonfinite_grad(&self) -> Option<usize> {
        (0..self.sizes.len()).find(|&k| tch::no_grad(|| self.tensor(&self.g, k).isfinite().all().int64_value(&[]) == 0))
    }

    /// Every gradient times `c`, in place.
    pub fn scale_grads(&self, c: f64) {
        tch::no_grad(|| {
            let _ = self.g.shallow_clone().g_mul_scalar_(c);
        });
    }
}
