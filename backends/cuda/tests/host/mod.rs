//! The CUDA C++ that NVRTC compiles for the GPU, compiled by the host's C++ compiler and run on
//! the CPU (`prelude.h`: a host thread per unit, a cube at a time): a slow device for checking,
//! on a machine with no GPU, what the kernels compute from the buffers and tables the CUDA path
//! hands them — the eight-lane bf16 and f16 vectors included, which CubeCL's own runtime here
//! (lavapipe, WGSL's `vec4`) cannot run.
//!
//! NVIDIA's headers give the host what NVRTC has built in: `cuda_bf16.h` and `cuda_fp16.h` from
//! the CUDA runtime's package (`NORMFORGE_CUDA_INCLUDE`), the compiler's `crt/` headers and
//! libcu++'s `nv/target`, which those include, from two more
//! (`NORMFORGE_HOST_CUDA_INCLUDE`; both set up by `scripts/setup-libtorch.sh`).

use std::collections::HashSet;
use std::ffi::c_void;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

type Entry = unsafe extern "C" fn(u32, u32, u32, u32, usize, *mut *mut c_void);

pub struct HostKernel {
    entry: Entry,
    shared_bytes: usize,
    _lib: libloading::Library,
}

impl HostKernel {
    /// Run the kernel over `grid` cubes of `units` units; `args` are the kernel's arguments'
    /// values, in order (buffers as pointers), as the driver takes them.
    ///
    /// # Safety
    /// Every pointer must be valid for what the kernel reads and writes there.
    pub unsafe fn launch(&self, grid: (u32, u32, u32), units: u32, args: &[u64]) {
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|a| a as *mut u64 as *mut c_void).collect();
        (self.entry)(grid.0, grid.1, grid.2, units, self.shared_bytes, params.as_mut_ptr());
    }
}

pub struct HostCompiler {
    includes: [PathBuf; 2],
    dir: PathBuf,
    built: Mutex<HashSet<u64>>,
}

impl HostCompiler {
    /// The compiler, where the CUDA headers are set up; else `None` with the reason printed,
    /// or a failure where `NORMFORGE_REQUIRE_NVRTC` is set (the test command sets both).
    pub fn find() -> Option<HostCompiler> {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_dir());
        match (var("NORMFORGE_CUDA_INCLUDE"), var("NORMFORGE_HOST_CUDA_INCLUDE")) {
            (Some(a), Some(b)) => {
                static MADE: AtomicUsize = AtomicUsize::new(0);
                let dir = std::env::temp_dir().join(format!("normforge-host-cuda-{}-{}", std::process::id(), MADE.fetch_add(1, Ordering::Relaxed)));
                std::fs::create_dir_all(&dir).expect("a temporary directory");
                Some(HostCompiler { includes: [a, b], dir, built: Mutex::new(HashSet::new()) })
            }
            _ if std::env::var_os("NORMFORGE_REQUIRE_NVRTC").is_some() => {
                panic!("NORMFORGE_CUDA_INCLUDE and NORMFORGE_HOST_CUDA_INCLUDE must name the CUDA headers (scripts/test.sh sets them)")
            }
            _ => {
                eprintln!("SKIPPED: no CUDA headers for the host (NORMFORGE_CUDA_INCLUDE, NORMFORGE_HOST_CUDA_INCLUDE)");
                None
            }
        }
    }

    /// One CubeCL CUDA translation unit, compiled and loaded, taking `shared_bytes` of dynamic
    /// shared memory per cube.
    pub fn kernel(&self, source: &str, shared_bytes: usize) -> HostKernel {
        let name = normforge_cuda::driver::entry_point(source).expect("a kernel");
        let key = xxhash_rust::xxh3::xxh3_64(source.as_bytes());
        let lib_path = self.dir.join(format!("{key:016x}.so"));
        let mut built = self.built.lock().unwrap();
        if !built.contains(&key) {
            let unit = self.dir.join(format!("{key:016x}.cpp"));
            std::fs::write(&unit, wrap(source, name)).unwrap();
            let prelude = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/host/prelude.h");
            let out = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()))
                .args(["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-include"])
                .arg(&prelude)
                .arg("-I")
                .arg(&self.includes[0])
                .arg("-I")
                .arg(&self.includes[1])
                .arg("-o")
                .arg(&lib_path)
                .arg(&unit)
                .output()
                .expect("running the host's C++ compiler");
            assert!(out.status.success(), "{name} does not compile for the host:\n{}", String::from_utf8_lossy(&out.stderr));
            built.insert(key);
        }
        // SAFETY: a library built just now from the kernel and the prelude; it runs no code on
        // loading.
        let lib = unsafe { libloading::Library::new(&lib_path) }.unwrap();
        // SAFETY: `wrap` defines `nf_entry` with this signature.
        let entry = unsafe { *lib.get::<Entry>(b"nf_entry\0").unwrap() };
        HostKernel { entry, shared_bytes, _lib: lib }
    }
}

impl Drop for HostCompiler {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    format!(
        "namespace nf_kernel {{\n{body}\n}}\n\
         extern \"C\" void nf_entry(unsigned gx, unsigned gy, unsigned gz, unsigned units, size_t shared, void** args) {{\n\
         nf_launch(nf_kernel::{name}, gx, gy, gz, units, shared, args);\n}}\n"
    )
}
