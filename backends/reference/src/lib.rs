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

use std::fmt;

/// A run-time error: bad shapes, bad hyper-parameter values, mismatched inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<normforge_dsl::hyper::HyperError> for Error {
    fn from(e: normforge_dsl::hyper::HyperError) -> Self {
        Error(e.0)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
