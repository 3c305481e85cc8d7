//! CubeCL plans (the layer kernels) on tch's CUDA tensors: what layers run, and update rules
//! that run through them (per-axis reductions, matrix products), a stack of same-shaped
//! tensors at a time.
//!
//! A run reads the input and the output gradient (a rule's parameter and gradient) in place and
//! lays the rest out in two device arenas, as the CubeCL runtime does: `io` in the storage
//! dtype (the output, the input gradient) and `work` in f32 (parameters, buffers, states,
//! reductions: small for a layer). Outputs are views of the arenas.

use crate::driver::{self, Gpu, Kernel};
use crate::parallel::each_in_parallel;
use crate::upload::{words, Cache};
use normforge_cubecl::emit::{layer_unit, Lang};
use normforge_cubecl::kernel::{Buf, LProgram, PARAM_LANES};
use normforge_cubecl::{launched, layout, Dtype, Launch, Layout, Plan, Source};
use normforge_dsl::bind::AxisBinding;
use normforge_dsl::ir::Target;
use normforge_tch::Error;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

fn err(e: impl std::fmt::Display) -> Error {
    Error(e.to_string())
}

/// The tch kind of a storage dtype.
pub fn kind_of(d: Dtype) -> Kind {
    match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
    }
}

/// The storage dtype of a tch kind, where the kernels have one.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Half => Some(Dtype::F16),
        _ => None,
    }
}

/// Buffers a layer kernel takes (then its `info_st`): the input, the output gradient, the `io`
/// and `work` arenas, the shape table, the scalars.
pub const LAYER_BUFFERS: usize = 6;

/// Layer kernels compiled for one GPU, each once per storage dtype.
pub struct PlanKernels {
    gpu: Arc<Gpu>,
    kernels: Mutex<HashMap<(LProgram, Dtype), Kernel>>,
    /// The tables of recent calls, on the device.
    uploads: Cache,
    launch: Launch,
}

impl PlanKernels {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        PlanKernels { gpu, kernels: Mutex::new(HashMap::new()), uploads: Cache::default(), launch: Launch::default() }
    }

    /// Launch the kernels so (tuning: the GPU check compares several).
    pub fn with_launch(mut self, launch: Launch) -> Result<Self, Error> {
        launch.check()?;
        self.launch = launch;
        Ok(self)
    }

    /// Compile (or load from the cache) every kernel `plan` may launch, in every form of its
    /// reductions, so the first run pays no compile time.
    pub fn prepare(&self, plan: &Plan, io: Dtype) -> Result<(), Error> {
        let mut variants: Vec<LProgram> = Vec::new();
        for k in &plan.kernels {
            for (per_value, last) in [(1, 1), (usize::MAX, 1), (usize::MAX, usize::MAX)] {
                let v = launched(k, per_value, last, &self.launch);
                if !variants.contains(&v) {
                    variants.push(v);
                }
            }
        }
        each_in_parallel(&variants, |k| self.kernel(k, io).map(|_| ()))
    }

    fn kernel(&self, k: &LProgram, io: Dtype) -> Result<Kernel, Error> {
        let key = (k.clone(), io);
        if let Some(found) = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(found.clone());
        }
        let unit = layer_unit(k, io, Lang::Cuda)?;
        let kernel = self.gpu.kernel(&unit.source, unit.shared_bytes).map_err(err)?;
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(key, kernel.clone());
        Ok(kernel)
    }

    /// Run `plan` bound to `b` on this GPU, on torch's current stream: `data` gives the tensors
    /// it reads (on this GPU); every output comes back, by target, flat. The input and the
    /// output gradient (a rule's parameter and gradient) are read in place where they are
    /// contiguous and of the storage type; outputs are views of the arena the kernels wrote.
    #[allow(clippy::too_many_arguments)]
    pub fn run<'a>(
        &self,
        plan: &Plan,
        b: &AxisBinding,
        hparams: &[f64],
        step: f64,
        io: Dtype,
        data: &dyn Fn(Source) -> Option<&'a Tensor>,
    ) -> Result<Vec<(Target, Tensor)>, Error> {
        self.run_laid(plan, &self.layout(plan, b, hparams, step, io)?, io, data, None)
    }

    /// `plan` bound to `b`, launched as these kernels launch (for storage type `io`). A row
    /// kernel folding column sums, whose cubes each take a block of rows, gets no more cubes
    /// than the GPU runs at once (unless the launch sets a limit), so none waits for a second
    /// wave.
    /// Kernels read and write `Launch::vector_bytes` at a time where they may.
    pub fn layout(&self, plan: &Plan, b: &AxisBinding, hparams: &[f64], step: f64, io: Dtype) -> Result<Layout, Error> {
        let laid = |launch: &Launch| -> Result<Layout, Error> {
            let mut lay = layout(plan, b, hparams, step, launch)?;
            lay.vectorize(io.size(), launch);
            Ok(lay)
        };
        let lay = laid(&self.launch)?;
        if self.launch.max_cubes > 0 {
            return Ok(lay);
        }
        let Some((k, (x, y, _))) = lay.launches.iter().find(|(k, _)| k.across() > 0) else { return Ok(lay) };
        let resident = self.gpu.resident(&self.kernel(k, io)?, k.units as u32).map_err(err)? as usize;
        if (*x as usize) * (*y as usize) <= resident {
            return Ok(lay);
        }
        laid(&Launch { max_cubes: resident, ..self.launch })
    }

    /// As [`Self::run`], bound by `lay`, with a `work` arena the caller keeps between calls
    /// (at least `lay.work_len` long): the states `data` does not give are read from it where
    /// `lay` places them — where the last call wrote them, with `Layout::swap_states` on
    /// alternate calls — so a rule's state is never copied; nor its parameter, which an
    /// in-place plan updates where `data` gives it.
    pub fn run_laid<'a>(&self, plan: &Plan, lay: &Layout, io: Dtype, data: &dyn Fn(Source) -> Option<&'a Tensor>, work: Option<&Tensor>) -> Result<Vec<(Target, Tensor)>, Error> {
        let dev = self.gpu.device();
        let bound = Bound::new(plan, lay, io, dev, data, work)?;
        let launches = bound.launches(lay, io);
        // An info per vector width the launches read x, dy and `io` in (their lengths count
        // vectors, as CubeCL's own launches count them).
        let widths: Vec<usize> = launches.iter().map(|(k, _)| k.vector.max(1)).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let infos = widths.iter().map(|&v| driver::info(&bound.lengths(lay, v)));
        let tables = self.uploads.pack([words(&lay.meta), words(&lay.scalars)].into_iter().chain(infos).collect(), dev);
        let stream = self.gpu.stream().map_err(err)?;
        // A first call compiles its kernels at once; later ones find them loaded and start no
        // thread.
        let missing: Vec<&LProgram> = {
            let loaded = self.kernels.lock().unwrap_or_else(|e| e.into_inner());
            launches.iter().map(|(k, _)| k).filter(|k| !loaded.contains_key(&((*k).clone(), io))).collect()
        };
        each_in_parallel(&missing, |k| self.kernel(k, io).map(|_| ()))?;
        let [x, dy, io_arena, work] = bound.pointers();
        let bufs: [u64; LAYER_BUFFERS] = [x, dy, io_arena, work, tables.ptr(0), tables.ptr(1)];
        for (k, grid) in &launches {
            let kernel = self.kernel(k, io)?;
            // SAFETY: the input and gradient are contiguous tensors of the storage type and
            // the arenas hold every other tensor at the offsets of `meta` (built from the same
            // layout); the info gives every length; units or cubes past the target's size do
            // nothing; all of them live until the stream has run the launch (torch's allocator
            // reuses memory in stream order).
            let info = tables.ptr(2 + widths.iter().position(|&v| v == k.vector.max(1)).expect("a width of the launches"));
            unsafe { self.gpu.launch(&kernel, *grid, k.units as u32, &bufs, info, stream) }.map_err(err)?;
        }
        Ok(bound.outputs(plan, lay))
    }
}

/// The tensors one run of a plan binds (the first four of its [`LAYER_BUFFERS`]), on any
/// device: CUDA for [`PlanKernels`], the CPU for tests running the same CUDA C++ on the host.
pub struct Bound {
    pub x: Tensor,
    pub dy: Tensor,
    pub io: Tensor,
    pub work: Tensor,
}

impl Bound {
    /// The buffers of `plan` laid out by `lay` on `dev`, as [`PlanKernels::run_laid`] takes
    /// `data` and `work`.
    pub fn new<'a>(plan: &Plan, lay: &Layout, io: Dtype, dev: Device, data: &dyn Fn(Source) -> Option<&'a Tensor>, work: Option<&Tensor>) -> Result<Bound, Error> {
        // Every output element is written by a launch, so neither arena needs clearing: what
        // a kernel skipped for a branch not taken leaves is read only by selects that drop it.
        // A rule writing its new parameter over the old (`Plan::in_place`) gets the parameter
        // itself as that arena, where it is laid out as the arena would be.
        let own = |d: &Tensor| d.is_contiguous() && d.kind() == kind_of(io) && d.device() == dev && d.numel() == lay.io_len;
        let io_arena = match data(Source::Input).filter(|d| plan.in_place() && own(d)) {
            Some(p) => p.reshape([-1]),
            None => Tensor::empty([lay.io_len.max(1) as i64], (kind_of(io), dev)),
        };
        let kept = work.is_some();
        let work = match work {
            Some(w) if w.numel() >= lay.work_len && w.device() == dev && w.kind() == Kind::Float => w.shallow_clone(),
            Some(_) => return Err(Error(format!("a kept work arena must be f32 on {}, {} values at least", named(dev), lay.work_len))),
            None => Tensor::empty([lay.work_len.max(1) as i64], (Kind::Float, dev)),
        };
        let (mut x, mut dy) = (None, None);
        // The parameters and buffers, which `layout` places side by side at the start of the
        // work arena (each at whole vectors): one copy for all of them (a layer norm's forward
        // launches one kernel).
        let mut handed: Vec<Tensor> = Vec::new();
        let mut handed_len = 0;
        for (t, &(src, _, buf)) in plan.tensors.iter().enumerate() {
            let (off, len) = (lay.offsets[t] as i64, lay.len(plan, t) as i64);
            match data(src) {
                Some(d) if d.numel() as i64 != len => return Err(Error(format!("{src:?} has {} values, the plan expects {len}", d.numel()))),
                Some(d) if d.device() != dev => return Err(Error(format!("{src:?} is on {}, these kernels run on {}", named(d.device()), named(dev)))),
                // (`layout` starts each at whole vectors: what lies between, never read, is
                // copied from an empty tensor.)
                Some(d) if buf == Buf::Work && src.handed() && (handed_len..handed_len + PARAM_LANES as i64).contains(&off) => {
                    if off > handed_len {
                        handed.push(Tensor::empty([off - handed_len], (Kind::Float, dev)));
                    }
                    handed.push(d.reshape([-1]).to_kind(Kind::Float));
                    handed_len = off + len;
                }
                Some(d) => match buf {
                    // (No copy unless `d` is strided or of another dtype.)
                    Buf::Input => x = Some(d.reshape([-1]).to_kind(kind_of(io)).contiguous()),
                    Buf::GradOutput => dy = Some(d.reshape([-1]).to_kind(kind_of(io)).contiguous()),
                    Buf::Io if d.data_ptr() == io_arena.data_ptr() => {}
                    Buf::Io => io_arena.narrow(0, off, len).copy_(&d.reshape([-1])),
                    Buf::Work => work.narrow(0, off, len).copy_(&d.reshape([-1])),
                },
                None if src.computed() => {}
                None if kept && matches!(src, Source::State(_)) => {}
                None => return Err(Error(format!("{src:?} is missing"))),
            }
        }
        match handed.len() {
            0 => {}
            1 => work.narrow(0, 0, handed_len).copy_(&handed[0]),
            _ => _ = Tensor::f_cat_out(&work.narrow(0, 0, handed_len), &handed, 0).map_err(err)?,
        }
        // A plan that reads no input or gradient still binds a buffer there (never read).
        let x = x.unwrap_or_else(|| io_arena.shallow_clone());
        let dy = dy.unwrap_or_else(|| io_arena.shallow_clone());
        Ok(Bound { x, dy, io: io_arena, work })
    }

    /// The buffers' lengths, for the `info_st` of kernels reading x, dy and `io` in vectors of
    /// `vector` values ([`driver::info`]): in those vectors, the rest in values.
    pub fn lengths(&self, lay: &Layout, vector: usize) -> [usize; LAYER_BUFFERS] {
        let v = vector.max(1);
        [self.x.numel() / v, self.dy.numel() / v, self.io.numel() / v, self.work.numel(), lay.meta.len(), lay.scalars.len()]
    }

    /// Where the buffers start, in the kernels' parameter order.
    pub fn pointers(&self) -> [u64; 4] {
        [&self.x, &self.dy, &self.io, &self.work].map(|t| t.data_ptr() as u64)
    }

    /// `lay`'s launches as they run on these buffers: a kernel reading vectors needs every
    /// buffer it reads so to start at a whole vector (a view may not); else it reads a value
    /// at a time. Its f32 parameters, likewise (a kept work arena may be a view).
    pub fn launches(&self, lay: &Layout, io: Dtype) -> Vec<(LProgram, (u32, u32, u32))> {
        let [x, dy, io_arena, work] = self.pointers();
        lay.launches
            .iter()
            .map(|(k, grid)| {
                let whole = [x, dy, io_arena].iter().all(|p| p % (k.vector.max(1) * io.size()) as u64 == 0);
                let k = match (whole, work % (PARAM_LANES * 4) as u64 == 0) {
                    (false, _) => k.unvectorized(),
                    (true, false) => LProgram { vector_params: false, ..k.clone() },
                    (true, true) => k.clone(),
                };
                (k, *grid)
            })
            .collect()
    }

    /// Every output of `plan`, by target, flat: views of the arena the kernels wrote.
    pub fn outputs(&self, plan: &Plan, lay: &Layout) -> Vec<(Target, Tensor)> {
        plan.outputs
            .iter()
            .map(|&(target, t)| {
                let (off, len) = (lay.offsets[t] as i64, lay.len(plan, t) as i64);
                let arena = if plan.tensors[t].2 == Buf::Io { &self.io } else { &self.work };
                (target, arena.narrow(0, off, len))
            })
            .collect()
    }
}

/// A device as torch writes it.
fn named(dev: Device) -> String {
    match dev {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

/// Output `target` of a run.
pub fn pick(out: &[(Target, Tensor)], target: Target) -> Result<&Tensor, Error> {
    out.iter().find(|(t, _)| *t == target).map(|(_, v)| v).ok_or_else(|| Error(format!("the program lacks the output {target:?}")))
}
