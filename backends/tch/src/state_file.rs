//! An update rule's state on disk, as safetensors: per parameter (by `VarStore` name)
//! `name::step` and `name::<state>` for each declared state. One format for `DslOptimizer` and
//! the CUDA path's `FusedOptimizer`, so a run resumes on either from the other's file.

use crate::Error;
use normforge_dsl::bind;
use normforge_dsl::ir::Entry;
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// One parameter's state: its step count and a tensor per declared state.
pub struct Saved {
    pub step: i64,
    pub states: Vec<Tensor>,
}

/// What a parameter's saved state must be: its name, the kind of its states and each state's
/// dims (`bind::state_dims`).
pub struct Expected<'a> {
    pub name: &'a str,
    pub kind: Kind,
    pub dims: Vec<Vec<usize>>,
}

impl<'a> Expected<'a> {
    /// What the state of `var`, named `name`, under hyper-parameters `hparams` must be.
    pub fn of(entry: &Entry, name: &'a str, var: &Tensor, hparams: &[f64]) -> Result<Self, Error> {
        let shape: Vec<usize> = var.size().iter().map(|&d| d as usize).collect();
        let dims = bind::state_dims(entry, &shape, hparams, &format!("`{name}`")).map_err(Error)?;
        Ok(Expected { name, kind: var.kind(), dims })
    }
}

pub fn write(path: &Path, entry: &Entry, params: Vec<(&str, Saved)>) -> Result<(), Error> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, s) in params {
        named.push((format!("{name}::step"), Tensor::from_slice(&[s.step])));
        for (d, t) in entry.states.iter().zip(s.states) {
            named.push((format!("{name}::{}", d.name), t.to_device(Device::Cpu).contiguous()));
        }
    }
    Tensor::write_safetensors(&named, path)?;
    Ok(())
}

/// The saved states of `params` in `path` (a parameter it does not name has none there).
/// Refuses a file naming anything else, or missing a state, or holding one of another kind or
/// size, or a step count below one.
pub fn read(path: &Path, entry: &Entry, params: &[Expected]) -> Result<HashMap<String, Saved>, Error> {
    let mut map: HashMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
    let mut out = HashMap::new();
    for p in params {
        let Some(step) = map.remove(&format!("{}::step", p.name)) else { continue };
        let step = match i64::try_from(&step) {
            Ok(s) if s >= 1 => s,
            _ => return Err(Error(format!("{}: `{}::step` is not a step count of one or more", path.display(), p.name))),
        };
        let mut states = Vec::new();
        for (d, dims) in entry.states.iter().zip(&p.dims) {
            let key = format!("{}::{}", p.name, d.name);
            let t = map.remove(&key).ok_or_else(|| Error(format!("{}: no tensor `{key}`", path.display())))?;
            if t.kind() != p.kind {
                return Err(Error(format!("`{key}` is {:?}, the parameter {:?}", t.kind(), p.kind)));
            }
            if t.numel() != dims.iter().product::<usize>() {
                return Err(Error(format!("`{key}` has shape {:?}, the state of this parameter {dims:?}", t.size())));
            }
            states.push(t);
        }
        out.insert(p.name.to_string(), Saved { step, states });
    }
    if let Some(extra) = map.keys().next() {
        return Err(Error(format!("{}: `{extra}` belongs to no parameter of this optimizer", path.display())));
    }
    Ok(out)
}
