//! The CUDA fast path: the CUDA C++ that `normforge-cubecl` emits, compiled by NVRTC for the
//! device's architecture (cached in memory and on disk), loaded through the CUDA driver and
//! launched on tch's CUDA tensors, on torch's current stream, with no copies. NVRTC and the
//! driver are loaded at run time (cudarc's dynamic loading), so this builds anywhere; compiling
//! needs only NVRTC, launching a GPU.

pub mod arena;
pub mod check;
pub mod driver;
pub mod fused;
pub mod items;
pub mod layer;
pub mod nvrtc;
pub mod optimizer;
pub mod parallel;
pub mod plans;
pub mod upload;

pub use arena::Arena;
pub use driver::{Gpu, Timed};
pub use fused::{fused_layer, fused_layer_launched, FusedOptimizer};
pub use layer::CudaLayerKernels;
pub use nvrtc::{Compiled, Compiler, Error, Origin, Usage};
pub use optimizer::{CudaOptimizer, RuleState};
