//! normforge on libtorch, through tch: registry layers become `nn::ModuleT`s whose forward is
//! the IR lowered to libtorch operations (so autograd differentiates them), and registry
//! update rules drive the variables of a `VarStore`.
//!
//! ```ignore
//! use normforge_tch::RegistryExt;
//! let norm = registry.layer("evonorm_s0")?.hparam("groups", 8.0).build(&vs.root() / "norm1", &[1, 64, 8, 8])?;
//! let mut opt = registry.optimizer("adamw")?.hparam("lr", 1e-3).build(&vs)?;
//! ```

pub mod builtins;
pub mod shim;
pub mod layer;
pub mod lower;
pub mod optimizer;
pub mod state_file;
pub mod wrappers;

pub use shim::LayerKernels;
pub use layer::DslLayer;
pub use optimizer::{DslOptimizer, Optimize, StepReport};
pub use wrappers::{Lookahead, Sam};

use normforge_dsl::Entry;
use normforge_registry::Registry;
use std::fmt;
use std::sync::Arc;
use tch::{nn, Kind, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error(format!("libtorch: {e}"))
    }
}

impl From<normforge_dsl::Error> for Error {
    fn from(e: normforge_dsl::Error) -> Self {
        Error(e.0)
    }
}

impl From<normforge_registry::Error> for Error {
    fn from(e: normforge_registry::Error) -> Self {
        Error(e.to_string())
    }
}

/// Load libtorch's CUDA library, if this libtorch has one that can load here, so that tch sees
/// the GPU: linkers drop `libtorch_cuda.so` from binaries that name no symbol of it, and
/// linking it unconditionally would break CPU-only machines, where its CUDA dependencies are
/// missing. Returns whether CUDA is now available. Safe to call more than once.
pub fn load_cuda() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let Some(dir) = option_env!("NORMFORGE_LIBTORCH_LIB") else { return tch::Cuda::is_available() };
        let path = std::path::Path::new(dir).join("libtorch_cuda.so");
        if path.exists() {
            #[cfg(unix)]
            {
                use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
                // SAFETY: libtorch's own library, from the libtorch this binary was built against.
                if let Ok(lib) = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_GLOBAL) } {
                    std::mem::forget(lib); // registered kernels must outlive everything
                }
            }
        }
        tch::Cuda::is_available()
    })
}

/// libtorch's default generator, seeded with `seed` and held for as long as the guard lives.
/// There is one generator per process, so two threads drawing from it at once (tests on the
/// harness's threads) each see values that depend on the other's timing: a check whose verdict
/// depends on its data — how many values two roundings leave apart, whether interrupted runs
/// replay an uninterrupted one — holds this while it draws. Reentrant, so a check called under
/// it reseeds it; never poisoned, so one failed test does not fail the rest.
pub fn seeded(seed: i64) -> Seeded {
    static GENERATOR: parking_lot::ReentrantMutex<()> = parking_lot::const_reentrant_mutex(());
    let guard = GENERATOR.lock();
    tch::manual_seed(seed);
    Seeded(guard)
}

/// What [`seeded`] returns: the generator is this thread's until it drops.
#[must_use = "the generator is held only while this lives"]
pub struct Seeded(#[allow(dead_code)] parking_lot::ReentrantMutexGuard<'static, ()>);

/// The type arithmetic runs in: f32 and f64 as they are, half types in f32.
pub(crate) fn float_kind(k: Kind) -> Kind {
    match k {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// A layer or optimizer picked from a registry, with hyper-parameter overrides.
#[derive(Clone, Debug)]
pub struct Spec {
    pub entry: Arc<Entry>,
    pub hparams: Vec<(String, f64)>,
}

impl Spec {
    pub fn hparam(mut self, name: &str, value: f64) -> Self {
        self.hparams.push((name.to_string(), value));
        self
    }

    /// Build a layer under `path` for inputs shaped like `sample_shape`.
    pub fn build_layer(&self, path: &nn::Path, sample_shape: &[i64]) -> Result<DslLayer, Error> {
        DslLayer::new(self.entry.clone(), path, sample_shape, &self.hparams)
    }

    /// Build an optimizer over every trainable variable of `vs`.
    pub fn build_optimizer(&self, vs: &nn::VarStore) -> Result<DslOptimizer, Error> {
        DslOptimizer::new(self.entry.clone(), vs, &self.hparams)
    }
}

/// `registry.layer(name)` and `registry.optimizer(name)`.
pub trait RegistryExt {
    fn layer(&self, name: &str) -> Result<LayerSpec, Error>;
    fn optimizer(&self, name: &str) -> Result<OptimizerSpec, Error>;
}

/// A registry layer ready to build.
#[derive(Clone, Debug)]
pub struct LayerSpec(pub Spec);

/// A registry optimizer ready to build.
#[derive(Clone, Debug)]
pub struct OptimizerSpec(pub Spec);

impl LayerSpec {
    pub fn hparam(self, name: &str, value: f64) -> Self {
        LayerSpec(self.0.hparam(name, value))
    }
    pub fn build(&self, path: &nn::Path, sample_shape: &[i64]) -> Result<DslLayer, Error> {
        self.0.build_layer(path, sample_shape)
    }
}

impl OptimizerSpec {
    pub fn hparam(self, name: &str, value: f64) -> Self {
        OptimizerSpec(self.0.hparam(name, value))
    }
    pub fn build(&self, vs: &nn::VarStore) -> Result<DslOptimizer, Error> {
        self.0.build_optimizer(vs)
    }
    /// Build over the trainable variables of `vs` that `select` takes ([`DslOptimizer::selected`]).
    pub fn build_selected(&self, vs: &nn::VarStore, select: impl Fn(&str, &Tensor) -> bool) -> Result<DslOptimizer, Error> {
        DslOptimizer::selected(self.0.entry.clone(), vs, &self.0.hparams, select)
    }
}

impl RegistryExt for Registry {
    fn layer(&self, name: &str) -> Result<LayerSpec, Error> {
        let r = self.get(name)?;
        if r.entry.kind == normforge_dsl::ir::Kind::Optimizer {
            return Err(Error(format!("`{name}` is an optimizer, not a layer")));
        }
        Ok(LayerSpec(Spec { entry: r.entry, hparams: vec![] }))
    }

    fn optimizer(&self, name: &str) -> Result<OptimizerSpec, Error> {
        let r = self.get(name)?;
        if r.entry.kind != normforge_dsl::ir::Kind::Optimizer {
            return Err(Error(format!("`{name}` is a {}, not an optimizer", r.entry.kind.keyword())));
        }
        Ok(OptimizerSpec(Spec { entry: r.entry, hparams: vec![] }))
    }
}
