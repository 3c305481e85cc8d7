//! Storage types: what a layer's input, output and their gradients, or a rule's state, are
//! kept in on the device. Arithmetic is f32 whatever the storage.

use crate::Error;
use cubecl::ir::{ElemType, FloatKind};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Dtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::BF16),
            _ => Err(Error(format!("unknown dtype `{s}`: expected `f32`, `f16` or `bf16`"))),
        }
    }
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    fn elem(self) -> ElemType {
        ElemType::Float(match self {
            Dtype::F32 => FloatKind::F32,
            Dtype::F16 => FloatKind::F16,
            Dtype::BF16 => FloatKind::BF16,
        })
    }

    /// Refuse a type the device cannot keep in buffers (lavapipe has no bf16).
    pub fn check(self, client: &cubecl::client::Client) -> Result<(), Error> {
        if client.properties().supports_type(self.elem()) {
            Ok(())
        } else {
            Err(Error(format!("this device cannot store {self:?} (it has no such buffers)")))
        }
    }

    /// The values rounded to this type, little-endian bytes.
    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
            Dtype::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
        }
    }

    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        }
    }

    /// Round in place, as storing and loading would.
    pub fn round(self, v: &mut [f32]) {
        for x in v {
            *x = match self {
                Dtype::F32 => *x,
                Dtype::F16 => f16::from_f32(*x).to_f32(),
                Dtype::BF16 => bf16::from_f32(*x).to_f32(),
            }
        }
    }
}
