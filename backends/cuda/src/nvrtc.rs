//! NVRTC behind a two-level cache. The key hashes everything the PTX depends on — the source,
//! the target architecture, the options and NVRTC's version — so a hit is always the module a
//! fresh compile would give, and a changed hyper-parameter (a run-time scalar) never misses.

use cudarc::nvrtc::{self, CompileOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NVRTC is not available: no libnvrtc among {searched:?} on the library path (LD_LIBRARY_PATH); scripts/setup-libtorch.sh installs one")]
    NoNvrtc { searched: Vec<String> },
    #[error("NVRTC rejected the kernel for {arch}:\n{log}")]
    Compile { arch: String, log: String },
    #[error("kernel cache {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Where a compiled module came from: the compiler itself, or one of the caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    Memory,
    Disk,
}

/// PTX for one architecture, and what it cost to get.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: Arc<str>,
    pub origin: Origin,
    pub elapsed: Duration,
    pub key: u128,
}

/// Compiles CUDA C++ for one architecture (`compute_90` for Hopper), caching the PTX in memory
/// and, if given a directory, on disk across runs.
pub struct Compiler {
    arch: &'static str,
    include_dirs: Vec<String>,
    disk: Option<PathBuf>,
    memory: Mutex<HashMap<u128, Arc<str>>>,
    /// NVRTC's `major.minor`, part of every key.
    version: String,
}

/// First line of a cache file; then the key and a checksum of the PTX, then the PTX. Anything
/// else — another format, another key, a torn or edited file — is not ours.
const MAGIC: &str = "// normforge nvrtc cache v1";

impl Compiler {
    /// Fails with [`Error::NoNvrtc`] (never a panic) when the library cannot be loaded.
    pub fn new(arch: &'static str, include_dirs: Vec<String>, disk: Option<PathBuf>) -> Result<Compiler, Error> {
        // SAFETY: only tries to dlopen the candidate names; nothing is called.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            return Err(Error::NoNvrtc { searched: cudarc::get_lib_name_candidates("nvrtc") });
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints; the library is loaded.
        unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        Ok(Compiler { arch, include_dirs, disk, memory: Mutex::new(HashMap::new()), version: format!("{major}.{minor}") })
    }

    /// Include directories for the CUDA headers the kernels use (`cuda_bf16.h`):
    /// `NORMFORGE_CUDA_INCLUDE`, then `$CUDA_HOME/include`, then `/usr/local/cuda/include`.
    pub fn default_include_dirs() -> Vec<String> {
        let mut dirs = Vec::new();
        if let Ok(d) = std::env::var("NORMFORGE_CUDA_INCLUDE") {
            dirs.push(d);
        }
        for home in [std::env::var("CUDA_HOME").ok(), Some("/usr/local/cuda".to_string())].into_iter().flatten() {
            let d = Path::new(&home).join("include");
            if d.join("cuda_bf16.h").exists() {
                dirs.push(d.to_string_lossy().into_owned());
            }
        }
        dirs
    }

    /// The user's cache directory for compiled kernels: `NORMFORGE_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/normforge/cuda`, else `~/.cache/normforge/cuda`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        if let Some(d) = std::env::var_os("NORMFORGE_CACHE_DIR") {
            return Some(PathBuf::from(d));
        }
        let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
        Some(base.join("normforge").join("cuda"))
    }

    pub fn arch(&self) -> &'static str {
        self.arch
    }

    fn options(&self) -> CompileOptions {
        CompileOptions {
            arch: Some(self.arch),
            include_paths: self.include_dirs.clone(),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        }
    }

    /// The cache key of `source` under this compiler's architecture, options and NVRTC.
    pub fn key(&self, source: &str) -> u128 {
        let options = format!("{:?}", self.options());
        xxhash_rust::xxh3::xxh3_128(format!("{}\0{options}\0{source}", self.version).as_bytes())
    }

    pub fn compile(&self, source: &str) -> Result<Compiled, Error> {
        let start = Instant::now();
        let key = self.key(source);
        let done = |ptx: Arc<str>, origin| Compiled { ptx, origin, elapsed: start.elapsed(), key };
        if let Some(ptx) = self.memory.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(done(ptx.clone(), Origin::Memory));
        }
        if let Some(ptx) = self.read_disk(key) {
            self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ptx.clone());
            return Ok(done(ptx, Origin::Disk));
        }
        let ptx: Arc<str> = match nvrtc::compile_ptx_with_opts(source, self.options()) {
            Ok(ptx) => ptx.to_src().into(),
            Err(e) => return Err(Error::Compile { arch: self.arch.to_string(), log: compile_log(e) }),
        };
        self.write_disk(key, &ptx)?;
        self.memory.lock().unwrap_or_else(|e| e.into_inner()).insert(key, ptx.clone());
        Ok(done(ptx, Origin::Compiled))
    }

    /// `source` compiled through ptxas for the real architecture of this compiler's virtual one
    /// (`compute_90` -> `sm_90`), its one kernel's [`Usage`] read from NVRTC's log (nothing is
    /// cached: this is a check, not a load).
    pub fn usage(&self, source: &str) -> Result<Usage, Error> {
        let arch = self.arch.replace("compute_", "sm_");
        let fail = |log: String| Error::Compile { arch: arch.clone(), log };
        let src = std::ffi::CString::new(source).map_err(|_| fail("the source holds a NUL byte".into()))?;
        let prog = nvrtc::result::create_program(&src, None).map_err(|e| fail(format!("{e:?}")))?;
        let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into(), "--ptxas-options=-v".into()];
        options.extend(self.include_dirs.iter().map(|d| format!("--include-path={d}")));
        // SAFETY: `prog` was created above from `src`, which outlives it, and is destroyed once.
        let (done, log) = unsafe {
            let done = nvrtc::result::compile_program(prog, &options);
            let log = nvrtc::result::get_program_log(prog).map(|l| std::ffi::CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned());
            let _ = nvrtc::result::destroy_program(prog);
            (done, log)
        };
        let log = log.map_err(|e| fail(format!("{e:?}")))?;
        done.map_err(|_| fail(log.clone()))?;
        parse_usage(&log).ok_or_else(|| fail(format!("no register count in ptxas' report:\n{log}")))
    }

    fn path(&self, key: u128) -> Option<PathBuf> {
        self.disk.as_ref().map(|d| d.join(format!("{key:032x}.ptx")))
    }

    /// A cache file that is unreadable, truncated or for another key counts as a miss.
    fn read_disk(&self, key: u128) -> Option<Arc<str>> {
        let text = std::fs::read_to_string(self.path(key)?).ok()?;
        let rest = text.strip_prefix(MAGIC)?.strip_prefix('\n')?;
        let (header, ptx) = rest.split_once('\n')?;
        (header == stamp(key, ptx)).then(|| ptx.into())
    }

    /// Written to a temporary file and renamed, so a reader never sees half a module.
    fn write_disk(&self, key: u128, ptx: &str) -> Result<(), Error> {
        let (Some(dir), Some(path)) = (self.disk.as_ref(), self.path(key)) else { return Ok(()) };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = dir.join(format!("{key:032x}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, format!("{MAGIC}\n{}\n{ptx}", stamp(key, ptx))).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }
}

/// What ptxas makes of one kernel for a real architecture: registers per unit, and the local
/// memory its stack frame and spills take. A cube of `n` units gets at most 65536 / `n`
/// registers per unit on Hopper (a kernel's `__launch_bounds__` makes ptxas spill to fit), so
/// these say whether a kernel keeps what it means to keep in registers — no GPU needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// The figures of ptxas' `-v` report for the (one) function it compiled.
fn parse_usage(log: &str) -> Option<Usage> {
    // The number just before `what` on `line`.
    let before = |line: &str, what: &str| -> Option<u32> { line.split(what).next()?.split_whitespace().last()?.parse().ok() };
    let mut usage = Usage::default();
    let mut found = false;
    for line in log.lines() {
        if line.contains("registers") {
            usage.registers = before(line, " registers")?;
            found = true;
        }
        if line.contains("stack frame") {
            usage.stack_bytes = before(line, " bytes stack frame")?;
            usage.spill_stores = before(line, " bytes spill stores")?;
            usage.spill_loads = before(line, " bytes spill loads")?;
        }
    }
    found.then_some(usage)
}

fn stamp(key: u128, ptx: &str) -> String {
    format!("{key:032x} {:016x} {}", xxhash_rust::xxh3::xxh3_64(ptx.as_bytes()), ptx.len())
}

fn compile_log(e: nvrtc::CompileError) -> String {
    match e {
        nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ptxas_reports_are_read() {
        let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k' for 'sm_90'\nptxas info    : Function properties for k\nptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\nptxas info    : Used 42 registers, used 1 barriers, 384 bytes smem\n";
        assert_eq!(super::parse_usage(log), Some(super::Usage { registers: 42, stack_bytes: 8, spill_stores: 4, spill_loads: 12 }));
        assert_eq!(super::parse_usage("ptxas info    : 0 bytes gmem\n"), None);
    }
}
