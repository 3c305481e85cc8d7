//! Small host values (shape tables, scalars, `info_st`) to the device without stalling it. A
//! copy from pageable memory makes torch wait for the stream, so every launch queued before it
//! would have to finish first; a copy from pinned memory is queued on torch's current stream
//! like a kernel, and torch's host allocator keeps the pinned block until that copy has run.

use normforge_tch::shim;
use std::collections::HashMap;
use std::sync::Mutex;
use tch::{Device, Tensor};

/// Segments of one upload start at multiples of this (the widest field a kernel reads).
const ALIGN: usize = 16;

/// Several byte strings as one device buffer: a pointer to each.
pub struct Packed {
    tensor: Tensor,
    offsets: Vec<usize>,
}

impl Packed {
    /// The same device buffer (kept alive by either).
    fn share(&self) -> Packed {
        Packed { tensor: self.tensor.shallow_clone(), offsets: self.offsets.clone() }
    }

    /// Device pointer to segment `i`.
    pub fn ptr(&self, i: usize) -> u64 {
        self.tensor.data_ptr() as u64 + self.offsets[i] as u64
    }
}

/// Copy `segments` to `device` as one buffer, queued on torch's current stream.
pub fn pack(segments: &[&[u8]], device: Device) -> Packed {
    let mut bytes = Vec::new();
    let mut offsets = Vec::new();
    for s in segments {
        bytes.resize(bytes.len().next_multiple_of(ALIGN), 0);
        offsets.push(bytes.len());
        bytes.extend_from_slice(s);
    }
    bytes.resize(bytes.len().max(1).next_multiple_of(ALIGN), 0);
    Packed { tensor: upload(&bytes, device), offsets }
}

/// One byte string on `device`: on a GPU from pinned memory without waiting, or (where
/// pinning fails) from pageable memory, which waits.
pub fn upload(bytes: &[u8], device: Device) -> Tensor {
    match device {
        Device::Cuda(d) => shim::upload_pinned(bytes, d).unwrap_or_else(|_| Tensor::from_slice(bytes).to_device(device)),
        _ => Tensor::from_slice(bytes).to_device(device),
    }
}

/// The little-endian bytes of 32-bit words.
pub fn words<T: Copy + Into<Word>>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|&w| w.into().0.to_le_bytes()).collect()
}

/// A 32-bit word, by its bits.
pub struct Word(u32);

impl From<u32> for Word {
    fn from(v: u32) -> Word {
        Word(v)
    }
}

impl From<f32> for Word {
    fn from(v: f32) -> Word {
        Word(v.to_bits())
    }
}

/// Uploads by content: a layer called again on the same shapes reuses its tables. Bounded: a
/// miss when full starts afresh (a rule's step count makes every step new).
#[derive(Default)]
pub struct Cache {
    map: Mutex<HashMap<Vec<Vec<u8>>, Packed>>,
}

const CACHED: usize = 64;

impl Cache {
    pub fn pack(&self, segments: Vec<Vec<u8>>, device: Device) -> Packed {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&segments) {
            return p.share();
        }
        if map.len() >= CACHED {
            map.clear();
        }
        let packed = pack(&segments.iter().map(Vec::as_slice).collect::<Vec<_>>(), device);
        let shared = packed.share();
        map.insert(segments, packed);
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_at(p: &Packed, i: usize, n: usize) -> Vec<u8> {
        let start = p.offsets[i] as i64;
        Vec::<u8>::try_from(p.tensor.narrow(0, start, n as i64)).unwrap()
    }

    #[test]
    fn segments_land_aligned_and_intact() {
        let (a, b, c) = (words(&[1u32, 2, 3]), words(&[0.5f32]), vec![7u8; 5]);
        let p = pack(&[&a, &b, &c], Device::Cpu);
        assert!(p.offsets.iter().all(|o| o % ALIGN == 0), "{:?}", p.offsets);
        assert_eq!(bytes_at(&p, 0, a.len()), a);
        assert_eq!(bytes_at(&p, 1, 4), 0.5f32.to_bits().to_le_bytes());
        assert_eq!(bytes_at(&p, 2, 5), c);
        assert_eq!(p.ptr(1) - p.ptr(0), 16);
    }

    #[test]
    fn the_cache_reuses_by_content_and_stays_bounded() {
        let cache = Cache::default();
        let first = cache.pack(vec![vec![1, 2], vec![3]], Device::Cpu);
        assert_eq!(cache.pack(vec![vec![1, 2], vec![3]], Device::Cpu).ptr(0), first.ptr(0));
        assert_ne!(cache.pack(vec![vec![1, 2], vec![4]], Device::Cpu).ptr(0), first.ptr(0));
        for k in 0..2 * CACHED {
            cache.pack(vec![k.to_le_bytes().to_vec()], Device::Cpu);
            assert!(cache.map.lock().unwrap().len() <= CACHED);
        }
        // A buffer handed out stays valid after the cache forgot it.
        assert_eq!(bytes_at(&first, 1, 1), [3]);
    }
}
