//! The CUDA driver, loaded at run time: torch's context on a device, our kernels loaded into it,
//! launched on raw device pointers (tch tensors' `data_ptr`) on a stream we are given (torch's
//! current one), so nothing is copied and nothing races with torch's own work.
//!
//! A CubeCL kernel takes its buffers in declaration order, then one pointer to its `info_st`:
//! per buffer its length (the kernel addresses state slots by it), packed by CubeCL's own
//! [`cubecl::InfoBuilder`] so the layout is the one the generated code reads.
//!
//! A [`Gpu`] may instead stand on the host ([`Gpu::on_host`]): the same CUDA C++ built for the
//! CPU by a [`HostDevice`] (the tests' `tests/host`), launched on CPU tensors, so everything
//! above the launch — arenas, stacks and the states kept between their steps, autograd, the
//! user's optimizer — runs where no GPU is.

use crate::nvrtc::{self, Compiler};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver: libcuda is not on the library path")]
    NoDriver,
    #[error("no CUDA device {ordinal} ({count} found)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {what}: {error}")]
    Driver { what: String, error: String },
    #[error("generated kernel without an entry point")]
    NoEntryPoint,
    #[error("libtorch's CUDA support is not loaded (normforge_tch::load_cuda)")]
    NoTorchCuda,
    #[error("{0} needs a CUDA device; this one runs its kernels on the host")]
    NotOnHost(&'static str),
    #[error("building {kernel} for the host: {error}")]
    Host { kernel: String, error: String },
    #[error(transparent)]
    Compile(#[from] nvrtc::Error),
}

fn driver(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| Error::Driver { what: what.to_string(), error: format!("{e:?}") }
}

/// A kernel loaded on the device, and what getting it cost the first time.
#[derive(Clone)]
pub struct Kernel {
    function: Loaded,
    pub name: Arc<str>,
    /// Dynamic shared memory each launch gives a cube (CubeCL's CUDA code sizes its shared
    /// arrays at launch).
    pub shared_bytes: u32,
    /// Compile (or cache read) and load time of the first request.
    pub prepared_in: Duration,
    pub origin: nvrtc::Origin,
}

/// A `CUfunction` lives as long as its module, which the [`Gpu`] keeps loaded.
#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: a CUfunction handle may be used from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

#[derive(Clone)]
enum Loaded {
    Cuda(Function),
    Host(Arc<dyn HostKernel>),
}

/// What builds the kernels' CUDA C++ for the host ([`Gpu::on_host`]).
pub trait HostDevice: Send + Sync {
    /// One translation unit (one `__global__` function), built and loaded.
    fn load(&self, source: &str) -> Result<Arc<dyn HostKernel>, String>;
}

/// One kernel built for the host.
pub trait HostKernel: Send + Sync {
    /// Run `grid` cubes of `units` units, each cube with `shared_bytes` of dynamic shared
    /// memory, to completion; `args` are the kernel's arguments in order (buffers as pointers),
    /// as the driver takes them.
    ///
    /// # Safety
    /// Every pointer must be valid for what the kernel reads and writes there.
    unsafe fn launch(&self, grid: (u32, u32, u32), units: u32, shared_bytes: u32, args: &[u64]);
}

/// Where a [`Gpu`] runs its kernels.
enum Runs {
    /// Device `ordinal`'s primary context (the one torch uses) and a compiler for its
    /// architecture.
    Cuda { ctx: Context, compiler: Compiler },
    Host(Box<dyn HostDevice>),
}

/// One device: where it runs kernels, and every kernel loaded so far, by source.
pub struct Gpu {
    ordinal: usize,
    runs: Runs,
    kernels: Mutex<HashMap<u128, Kernel>>,
    name: String,
    /// Streaming multiprocessors (on the host: cubes run at once).
    sms: u32,
}

#[derive(Clone, Copy)]
struct Context(sys::CUcontext);
// SAFETY: a context handle may be made current on any thread.
unsafe impl Send for Context {}
unsafe impl Sync for Context {}

impl Gpu {
    /// Open device `ordinal`: [`Error::NoDriver`] or [`Error::NoDevice`] where there is none
    /// (never a panic). PTX is cached on disk in `cache` if given.
    pub fn open(ordinal: usize, cache: Option<std::path::PathBuf>) -> Result<Gpu, Error> {
        // SAFETY: only tries to dlopen the candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        result::init().map_err(driver("cuInit"))?;
        let count = result::device::get_count().map_err(driver("cuDeviceGetCount"))? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let dev = result::device::get(ordinal as i32).map_err(driver("cuDeviceGet"))?;
        // SAFETY: `dev` comes from cuDeviceGet.
        let (major, minor, sms) = unsafe {
            (
                result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                result::device::get_attribute(dev, sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            )
        };
        let (major, minor) = (major.map_err(driver("compute capability"))?, minor.map_err(driver("compute capability"))?);
        let sms = sms.map_err(driver("multiprocessor count"))?.max(1) as u32;
        // SAFETY: `dev` is valid; the primary context is retained for the life of the process,
        // as torch retains it.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(driver("cuDevicePrimaryCtxRetain"))?;
        let name = result::device::get_name(dev).map_err(driver("cuDeviceGetName"))?;
        let arch = architecture(major, minor);
        let compiler = Compiler::new(arch, Compiler::default_include_dirs(), cache)?;
        Ok(Gpu { ordinal, runs: Runs::Cuda { ctx: Context(ctx), compiler }, kernels: Mutex::new(HashMap::new()), name, sms })
    }

    /// A stand-in device running the kernels `host` builds on CPU tensors, synchronously,
    /// `resident` cubes of any kernel counted as running at once.
    pub fn on_host(host: Box<dyn HostDevice>, resident: u32) -> Gpu {
        let name = "the host (the kernels' CUDA C++ on the CPU)".to_string();
        Gpu { ordinal: 0, runs: Runs::Host(host), kernels: Mutex::new(HashMap::new()), name, sms: resident.max(1) }
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Where the tensors this device's kernels read live.
    pub fn device(&self) -> tch::Device {
        match self.runs {
            Runs::Cuda { .. } => tch::Device::Cuda(self.ordinal),
            Runs::Host(_) => tch::Device::Cpu,
        }
    }

    /// The stream launches go on: torch's current one (null on the host, which runs each
    /// launch before returning).
    pub fn stream(&self) -> Result<*mut c_void, Error> {
        match self.runs {
            Runs::Cuda { .. } => normforge_tch::shim::current_cuda_stream(self.ordinal).ok_or(Error::NoTorchCuda),
            Runs::Host(_) => Ok(std::ptr::null_mut()),
        }
    }

    /// The device's name, as the driver gives it (`NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn arch(&self) -> &'static str {
        match &self.runs {
            Runs::Cuda { compiler, .. } => compiler.arch(),
            Runs::Host(_) => "host",
        }
    }

    /// How many cubes of `block` units of `kernel` the device runs at once (its registers and
    /// shared memory allowing): a grid of that many runs in one wave.
    pub fn resident(&self, kernel: &Kernel, block: u32) -> Result<u32, Error> {
        let Loaded::Cuda(f) = &kernel.function else { return Ok(self.sms) };
        self.make_current()?;
        // SAFETY: a function of a loaded module of this context.
        let per_sm = unsafe { result::occupancy::max_active_block_per_multiprocessor(f.0, block as i32, kernel.shared_bytes as usize) }
            .map_err(driver(&format!("occupancy of {}", kernel.name)))?;
        Ok(self.sms * per_sm.max(1) as u32)
    }

    fn make_current(&self) -> Result<(), Error> {
        let Runs::Cuda { ctx, .. } = &self.runs else { return Ok(()) };
        // SAFETY: the context is retained for the life of this `Gpu`.
        unsafe { result::ctx::set_current(ctx.0) }.map_err(driver("cuCtxSetCurrent"))
    }

    /// The kernel of one translation unit (one `__global__` function) needing `shared_bytes` of
    /// dynamic shared memory per cube, compiled and loaded once.
    pub fn kernel(&self, source: &str, shared_bytes: usize) -> Result<Kernel, Error> {
        let key = match &self.runs {
            Runs::Cuda { compiler, .. } => compiler.key(source),
            Runs::Host(_) => xxhash_rust::xxh3::xxh3_128(source.as_bytes()),
        };
        if let Some(k) = self.kernels.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(k.clone());
        }
        let name = entry_point(source).ok_or(Error::NoEntryPoint)?;
        let shared_bytes = u32::try_from(shared_bytes).map_err(|_| Error::Driver { what: name.to_string(), error: "shared memory size".into() })?;
        let start = std::time::Instant::now();
        let (function, origin) = match &self.runs {
            Runs::Cuda { compiler, .. } => {
                let compiled = compiler.compile(source)?;
                self.make_current()?;
                let image = CString::new(compiled.ptx.as_bytes()).map_err(|_| Error::NoEntryPoint)?;
                // SAFETY: a NUL-terminated PTX image; the module stays loaded for the process
                // (kernels are few and small, and launches may still be queued when a `Gpu` is
                // dropped).
                let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(driver("cuModuleLoadData"))?;
                let cname = CString::new(name).map_err(|_| Error::NoEntryPoint)?;
                // SAFETY: `module` was just loaded.
                let f = unsafe { result::module::get_function(module, cname) }.map_err(driver("cuModuleGetFunction"))?;
                (Loaded::Cuda(Function(f)), compiled.origin)
            }
            Runs::Host(host) => {
                let k = host.load(source).map_err(|error| Error::Host { kernel: name.to_string(), error })?;
                (Loaded::Host(k), nvrtc::Origin::Compiled)
            }
        };
        let k = Kernel { function, name: name.into(), shared_bytes, prepared_in: start.elapsed(), origin };
        self.kernels.lock().unwrap_or_else(|e| e.into_inner()).insert(key, k.clone());
        Ok(k)
    }

    /// Launch `kernel` over `grid` cubes of `block` units on `stream`, with `buffers` (device
    /// pointers, in the kernel's parameter order) and `info` (a device pointer to the kernel's
    /// `info_st`, see [`info`]).
    ///
    /// # Safety
    /// Every pointer must be a live device allocation of this device, as long as the kernel
    /// indexes it (the lengths in `info`), until the launch completes on `stream`; `stream`
    /// must be a stream of this device's primary context (or null).
    pub unsafe fn launch(
        &self,
        kernel: &Kernel,
        grid: (u32, u32, u32),
        block: u32,
        buffers: &[u64],
        info: u64,
        stream: *mut c_void,
    ) -> Result<(), Error> {
        let mut args: Vec<u64> = buffers.to_vec();
        args.push(info);
        let f = match &kernel.function {
            Loaded::Cuda(f) => f,
            Loaded::Host(k) => {
                // SAFETY: as this function's.
                unsafe { k.launch(grid, block, kernel.shared_bytes, &args) };
                return Ok(());
            }
        };
        self.make_current()?;
        let mut params: Vec<*mut c_void> = args.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        result::launch_kernel(f.0, grid, (block, 1, 1), kernel.shared_bytes, stream as sys::CUstream, &mut params)
            .map_err(driver(&format!("launching {}", kernel.name)))
    }

    /// Keep `stream` busy for `d` of the device's own time (one unit spinning on its global
    /// timer), so that work queued behind it starts only then.
    pub fn hold(&self, stream: *mut c_void, d: Duration) -> Result<(), Error> {
        if let Runs::Host(_) = self.runs {
            return Err(Error::NotOnHost("holding a stream"));
        }
        let k = self.kernel(HOLD, 0)?;
        let Loaded::Cuda(f) = k.function else { unreachable!("loaded on the GPU") };
        self.make_current()?;
        let mut ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut params = [&mut ns as *mut u64 as *mut c_void];
        // SAFETY: `HOLD`'s one parameter is a u64 by value; it touches no memory.
        unsafe { result::launch_kernel(f.0, (1, 1, 1), (1, 1, 1), 0, stream as sys::CUstream, &mut params) }.map_err(driver("launching the hold kernel"))
    }

    /// Each of `reps` runs of `f`: its device time between events recorded on `stream` around
    /// it, and the host's time queueing it. `before` runs ahead of each, untimed, then the
    /// stream is held for `ahead` ([`Gpu::hold`]) so the host has queued the run before the
    /// device reaches its first event: the device time is then the device's work alone, even
    /// where the host is slower to queue it (triton's `do_bench`, which times the peers, has
    /// only its cache flush to hide the host behind). `host_ms` above `ahead` means the host
    /// fell behind all the same.
    pub fn time(&self, stream: *mut c_void, reps: usize, ahead: Duration, mut before: impl FnMut(), mut f: impl FnMut()) -> Result<Vec<Timed>, Error> {
        if let Runs::Host(_) = self.runs {
            return Err(Error::NotOnHost("timing"));
        }
        let mut events = Vec::with_capacity(2 * reps);
        let mut host_ms = Vec::with_capacity(reps);
        let mut run = || -> Result<(), Error> {
            // Every event made first, so that only recording one lies between a run and its
            // events (making one allocates).
            self.make_current()?;
            for _ in 0..2 * reps {
                events.push(result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(driver("cuEventCreate"))?);
            }
            let record = |e: sys::CUevent| -> Result<(), Error> {
                self.make_current()?;
                // SAFETY: an event of this context, recorded on a stream of it.
                unsafe { result::event::record(e, stream as sys::CUstream) }.map_err(driver("cuEventRecord"))
            };
            for pair in events.chunks(2) {
                before();
                self.hold(stream, ahead)?;
                record(pair[0])?;
                let queued = std::time::Instant::now();
                f();
                host_ms.push(queued.elapsed().as_secs_f64() * 1e3);
                record(pair[1])?;
            }
            self.synchronize(stream)
        };
        let ran = run();
        // SAFETY: events of this context, all recorded and complete (or never recorded).
        let times = ran.and_then(|()| {
            events
                .chunks(2)
                .zip(&host_ms)
                .map(|(e, &host_ms)| unsafe { result::event::elapsed(e[0], e[1]) }.map(|d| Timed { device_ms: f64::from(d), host_ms }).map_err(driver("cuEventElapsedTime")))
                .collect()
        });
        for e in events {
            // SAFETY: as above; each destroyed once.
            let _ = unsafe { result::event::destroy(e) };
        }
        times
    }

    /// Wait for everything queued on `stream`.
    pub fn synchronize(&self, stream: *mut c_void) -> Result<(), Error> {
        if let Runs::Host(_) = self.runs {
            return Ok(());
        }
        self.make_current()?;
        // SAFETY: a stream of this context (or null, the legacy stream).
        unsafe { result::stream::synchronize(stream as sys::CUstream) }.map_err(driver("cuStreamSynchronize"))
    }
}

/// One timed run ([`Gpu::time`]).
#[derive(Clone, Copy, Debug)]
pub struct Timed {
    /// Between the events around the run, on the device.
    pub device_ms: f64,
    /// Queueing the run, on the host.
    pub host_ms: f64,
}

/// [`Gpu::hold`]'s kernel: one unit reading the device's global timer (nanoseconds) until `ns`
/// have passed — or, should that timer not advance, until its own clock has counted 8 cycles
/// per nanosecond asked (4 times as long at 2 GHz), so a hold always ends. CUDA C++ written
/// here, not generated: it is timing scaffolding, no rule's math.
pub const HOLD: &str = r#"extern "C" __global__ void normforge_hold(unsigned long long ns) {
    unsigned long long start, now;
    long long c0 = clock64();
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns && (unsigned long long)(clock64() - c0) < 8 * ns);
}
"#;

/// The virtual architecture NVRTC compiles for (PTX, so the driver can JIT it for newer cards).
pub fn architecture(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (10, _) => "compute_100",
        (9, _) => "compute_90",
        (8, 9) => "compute_89",
        (8, 6..) => "compute_86",
        (8, _) => "compute_80",
        (7, 5..) => "compute_75",
        _ => "compute_70",
    }
}

/// The name of the `__global__` function of a CubeCL translation unit.
pub fn entry_point(source: &str) -> Option<&str> {
    let rest = &source[source.find("__global__ void")? + "__global__ void".len()..];
    let rest = rest.trim_start();
    // `__launch_bounds__(256)` may precede the name.
    let rest = match rest.strip_prefix("__launch_bounds__") {
        Some(r) => r[r.find(')')? + 1..].trim_start(),
        None => rest,
    };
    let end = rest.find('(')?;
    let name = rest[..end].trim();
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(name)
}

/// The bytes of a kernel's `info_st` for buffers of these lengths (in elements), as CubeCL
/// packs them for its own launches (32-bit addressing, no scalar arguments).
pub fn info(lengths: &[usize]) -> Vec<u8> {
    let mut b = cubecl::InfoBuilder::default();
    for &n in lengths {
        b.metadata.register_buffer(n as u64, cubecl::ir::AddressType::U32);
    }
    let words = b.finish(cubecl::ir::AddressType::U32).data;
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}
