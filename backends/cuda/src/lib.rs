//! The CUDA fast path, starting with its compiler: the CUDA C++ that `normforge-cubecl` emits,
//! compiled by NVRTC for one device architecture, cached in memory and on disk. NVRTC is loaded
//! at run time (cudarc's dynamic loading), so this builds anywhere and compiles wherever the
//! library is found — a GPU is not needed to compile, only to launch.

pub mod nvrtc;

pub use nvrtc::{Compiled, Compiler, Error, Origin};
