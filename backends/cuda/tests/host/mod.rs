//! The CUDA C++ that NVRTC compiles for the GPU, compiled by the host's C++ compiler and run on
//! the CPU (`prelude.h`: a cube at a time, each unit a coroutine where units wait for one
//! another at `__syncthreads`, run to its next in alternating orders, so a barrier missing
//! between a write and another unit's read shows every run): a slow device for checking,
//! on a machine with no GPU, what the kernels compute from the buffers and tables the CUDA path
//! hands them — the eight-lane bf16 and f16 vectors included, which CubeCL's own runtime here
//! (lavapipe, WGSL's `vec4`) cannot run. [`HostCompiler::gpu`] is a `Gpu` standing on the host
//! with this compiler as its `HostDevice`, so the CUDA path itself launches them, on CPU tensors.
//! What a GPU faults on or gets wrong and a CPU forgives stops the test, naming the kernel: a
//! misaligned vector access, a register array indexed past its end or a division by zero
//! (the undefined-behaviour sanitizer, `OPTIONS`), and an access past the end of a buffer (each
//! launch's buffers copied against an inaccessible page, `nf_guarded` in `prelude.h`, by the
//! lengths in the kernel's info — so those must be right too).
//!
//! NVIDIA's headers give the host what NVRTC has built in: `cuda_bf16.h` and `cuda_fp16.h` from
//! the CUDA runtime's package (`NORMFORGE_CUDA_INCLUDE`), the compiler's `crt/` headers and
//! libcu++'s `nv/target`, which those include, from two more
//! (`NORMFORGE_HOST_CUDA_INCLUDE`; both set up by `scripts/setup-libtorch.sh`).

use normforge_cuda::driver::{HostDevice, HostKernel};
use normforge_cuda::Gpu;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

type Entry = unsafe extern "C" fn(u32, u32, u32, u32, usize, *mut *mut c_void);

/// One unit built for the host and loaded.
pub struct HostUnit {
    entry: Entry,
    _lib: libloading::Library,
}

impl HostKernel for HostUnit {
    unsafe fn launch(&self, grid: (u32, u32, u32), units: u32, shared_bytes: u32, args: &[u64]) {
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        // SAFETY: `nf_entry` reads an argument per parameter of the kernel, as the caller
        // vouches for.
        unsafe { (self.entry)(grid.0, grid.1, grid.2, units, shared_bytes as usize, params.as_mut_ptr()) };
    }
}

impl HostDevice for &'static HostCompiler {
    fn load(&self, source: &str) -> Result<Arc<dyn HostKernel>, String> {
        Ok(Arc::new(self.kernel(source)?))
    }
}

/// The host's C++ compiler with the CUDA headers; units are built once into a directory of
/// the target folder, by the hash of what they are built from, so a later test run loads them.
pub struct HostCompiler {
    includes: [PathBuf; 2],
    dir: PathBuf,
    /// The prelude under a name of its content's hash, precompiled beside it (the CUDA headers
    /// take most of a unit's compile time).
    prelude: PathBuf,
}

/// The options every unit and the precompiled prelude are built with (a precompiled header is
/// used only under the options it was made with). The sanitizers stop the test, with the
/// kernel's line, at what the host forgives and a GPU does not: a vector access off its
/// alignment (a fault there), a register array indexed past its end, a division by zero.
const OPTIONS: [&str; 7] = [
    "-std=c++20",
    "-O1",
    "-fPIC",
    "-pthread",
    "-w",
    "-fsanitize=alignment,bounds,integer-divide-by-zero",
    "-fno-sanitize-recover=all",
];

impl HostCompiler {
    /// The compiler, where the CUDA headers are set up; else `None` with the reason printed,
    /// or a failure where `NORMFORGE_REQUIRE_NVRTC` is set (the test command sets both). One
    /// per test binary.
    pub fn find() -> Option<&'static HostCompiler> {
        static ONE: OnceLock<Option<HostCompiler>> = OnceLock::new();
        let found = ONE.get_or_init(|| {
            let var = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_dir());
            match (var("NORMFORGE_CUDA_INCLUDE"), var("NORMFORGE_HOST_CUDA_INCLUDE")) {
                (Some(a), Some(b)) => Some(HostCompiler::new([a, b])),
                _ if std::env::var_os("NORMFORGE_REQUIRE_NVRTC").is_some() => {
                    panic!("NORMFORGE_CUDA_INCLUDE and NORMFORGE_HOST_CUDA_INCLUDE must name the CUDA headers (scripts/test.sh sets them)")
                }
                _ => None,
            }
        });
        if found.is_none() {
            eprintln!("SKIPPED: no CUDA headers for the host (NORMFORGE_CUDA_INCLUDE, NORMFORGE_HOST_CUDA_INCLUDE)");
        }
        found.as_ref()
    }

    /// A [`Gpu`] on the host, running what the compiler builds (one per test binary), where
    /// [`Self::find`] finds it. It counts 8 cubes as running at once: few, so that a row
    /// kernel folding column sums, limited to them, takes several blocks of rows a cube.
    pub fn gpu() -> Option<Arc<Gpu>> {
        static ONE: OnceLock<Arc<Gpu>> = OnceLock::new();
        let cc = Self::find()?;
        Some(ONE.get_or_init(|| Arc::new(Gpu::on_host(Box::new(cc), 8))).clone())
    }

    fn new(includes: [PathBuf; 2]) -> HostCompiler {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("host-cuda");
        std::fs::create_dir_all(&dir).expect("a directory for the host's kernels");
        let text = PRELUDE.to_string() + &format!("// {OPTIONS:?} {includes:?}\n");
        let prelude = dir.join(format!("prelude-{:016x}.h", xxhash_rust::xxh3::xxh3_64(text.as_bytes())));
        let cc = HostCompiler { includes, dir, prelude };
        if !cc.prelude.with_extension("h.gch").exists() {
            std::fs::write(&cc.prelude, &text).unwrap();
            let part = cc.partial(&cc.prelude.with_extension("h.gch"));
            cc.compile(&["-x", "c++-header"], &cc.prelude, &part).unwrap_or_else(|e| panic!("the prelude: {e}"));
            std::fs::rename(&part, cc.prelude.with_extension("h.gch")).unwrap();
        }
        cc
    }

    /// A name to build `path` under before renaming it into place, so that a unit another
    /// thread or run is building is never loaded half written.
    fn partial(&self, path: &Path) -> PathBuf {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        path.with_extension(format!("{}-{}.part", std::process::id(), MADE.fetch_add(1, Ordering::Relaxed)))
    }

    fn compile(&self, extra: &[&str], input: &Path, output: &Path) -> Result<(), String> {
        let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
            .args(OPTIONS)
            .args(extra)
            .arg("-I")
            .arg(&self.includes[0])
            .arg("-I")
            .arg(&self.includes[1])
            .arg("-o")
            .arg(output)
            .arg(input)
            .output()
            .map_err(|e| format!("running the host's C++ compiler: {e}"))?;
        match out.status.success() {
            true => Ok(()),
            false => Err(format!("it does not compile for the host:\n{}", String::from_utf8_lossy(&out.stderr))),
        }
    }

    /// One CubeCL CUDA translation unit, compiled (or found built) and loaded.
    pub fn kernel(&self, source: &str) -> Result<HostUnit, String> {
        let name = normforge_cuda::driver::entry_point(source).ok_or("no kernel in the source")?;
        let unit = wrap(source, name);
        let key = xxhash_rust::xxh3::xxh3_64(format!("{}\n{unit}", self.prelude.display()).as_bytes());
        let lib_path = self.dir.join(format!("{key:016x}.so"));
        if !lib_path.exists() {
            // Kept beside the library, under the name a sanitizer's report gives (`#line`).
            let source_path = lib_path.with_extension("cpp");
            let cpp = self.partial(&source_path);
            std::fs::write(&cpp, format!("#line 2 \"{}\"\n{unit}", source_path.display())).map_err(|e| e.to_string())?;
            let part = self.partial(&lib_path);
            let prelude = self.prelude.to_str().ok_or("a path not in UTF-8")?;
            let built = self.compile(&["-x", "c++", "-shared", "-include", prelude], &cpp, &part);
            if built.is_err() {
                let _ = std::fs::remove_file(&cpp);
            }
            built?;
            std::fs::rename(&cpp, &source_path).map_err(|e| e.to_string())?;
            std::fs::rename(&part, &lib_path).map_err(|e| e.to_string())?;
        }
        // SAFETY: a library built from the kernel and the prelude; it runs no code on loading.
        let lib = unsafe { libloading::Library::new(&lib_path) }.map_err(|e| e.to_string())?;
        // SAFETY: `wrap` defines `nf_entry` with this signature.
        let entry = unsafe { *lib.get::<Entry>(b"nf_entry\0").map_err(|e| e.to_string())? };
        Ok(HostUnit { entry, _lib: lib })
    }
}

/// What the kernels take from the device, for the host (`prelude.h`).
const PRELUDE: &str = include_str!("prelude.h");

/// The translation unit in a namespace of its own (its integer typedefs would clash with the
/// host's), its dynamic shared memory the cube's (`nf_shared`), and an entry point launching it.
fn wrap(source: &str, name: &str) -> String {
    let mut body = String::with_capacity(source.len());
    for line in source.split_inclusive('\n') {
        match line.find("extern __shared__") {
            Some(at) => {
                let decl_end = line[at..].find(';').expect("a shared declaration") + at;
                let decl = &line[at..decl_end];
                let var = decl.rsplit(' ').next().unwrap().trim_end_matches("[]");
                body.push_str(&line[..at]);
                body.push_str(&format!("char* const {var} = nf_shared"));
                body.push_str(&line[decl_end..]);
            }
            None => body.push_str(line),
        }
    }
    // Units as coroutines only where they wait for one another.
    let launch = if source.contains("__syncthreads") { "nf_launch" } else { "nf_launch_serial" };
    format!(
        "namespace nf_kernel {{\n{body}\n}}\n\
         extern \"C\" void nf_entry(unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {{\n\
         nf_guarded(nf_kernel::{name}, \"{name}\", gx, gy, gz, units, shared, args, {launch});\n}}\n"
    )
}
