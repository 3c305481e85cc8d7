//! The f64 reference backend: a plain interpreter of the IR over Rust vectors.
//!
//! It is the oracle every other backend is checked against, so it favours obviousness over
//! speed: each node is materialised in full, broadcasting is explicit index arithmetic.

mod eval;
mod layer;
mod optimizer;
mod tensor;

pub use eval::{bind_axes, AxisBinding};
pub use layer::{Gradients, Layer};
pub use optimizer::{Optimizer, StepOutcome};
pub use tensor::Tensor;

/// A run-time error: bad shapes, bad hyper-parameter values, mismatched inputs.
pub use normforge_dsl::Error;

pub type Result<T> = std::result::Result<T, Error>;
