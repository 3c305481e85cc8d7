//! Storage types: what a layer's input, output and their gradients, or a rule's state, are
//! kept in on the device. Arithmetic is f32 whatever the storage.

use crate::Error;
use cubecl::ir::{ElemType, FloatKind};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

    /// How this type is kept on the device; an error where it cannot be.
    pub fn held_on(self, client: &cubecl::client::Client) -> Result<Held, Error> {
        let props = client.properties();
        if props.supports_type(self.elem()) {
            Ok(Held::Native(self))
        } else if self == Dtype::BF16 && props.supports_type(Dtype::F32.elem()) {
            Ok(Held::Bf16InF32)
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

/// How a storage type is kept on one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// In buffers of its own type.
    Native(Dtype),
    /// bf16 where the device has no bf16 buffers (lavapipe: WGSL has no bf16 type): f32 words
    /// holding bf16 values. The host uploads bf16 values and the kernels round every value they
    /// store to bf16 (to nearest, ties to even), so every number is the one bf16 storage would
    /// hold; only the memory is twice.
    Bf16InF32,
}

impl Held {
    /// Bytes per value on the device.
    pub fn size(self) -> usize {
        match self {
            Held::Native(d) => d.size(),
            Held::Bf16InF32 => 4,
        }
    }

    /// The kernel's storage type, and whether its stores round to bf16.
    pub fn kernel_type(self) -> (Dtype, bool) {
        match self {
            Held::Native(d) => (d, false),
            Held::Bf16InF32 => (Dtype::F32, true),
        }
    }

    pub fn encode(self, v: &[f32]) -> Vec<u8> {
        match self {
            Held::Native(d) => d.encode(v),
            Held::Bf16InF32 => {
                let mut r = v.to_vec();
                Dtype::BF16.round(&mut r);
                Dtype::F32.encode(&r)
            }
        }
    }

    pub fn decode(self, b: &[u8]) -> Vec<f32> {
        match self {
            Held::Native(d) => d.decode(b),
            Held::Bf16InF32 => Dtype::F32.decode(b),
        }
    }
}

/// What an update rule stores its parameters (and their gradients) and its states in; it
/// computes in f32 whatever they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Precision {
    pub param: Dtype,
    pub state: Dtype,
}

impl Precision {
    /// Parameters and states in `d`: torch's way, whose optimizers keep a state in its
    /// parameter's dtype.
    pub fn uniform(d: Dtype) -> Precision {
        Precision { param: d, state: d }
    }
}

/// `$body` with `$t` naming the Rust type of dtype `$d`: one generic kernel, launched or
/// printed for the storage type a caller chose at run time.
macro_rules! with_type {
    ($d:expr, $t:ident => $body:expr) => {
        match $d {
            $crate::Dtype::F32 => {
                type $t = f32;
                $body
            }
            $crate::Dtype::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::Dtype::BF16 => {
                type $t = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_type;
