//! Run-time shapes against declared axes: which dims each axis takes, how many values a
//! symbolic [`Shape`] has. Every backend binds inputs the same way, so this lives here.

use crate::ir::{Axis, Entry, Extent, Groups, Op, Shape};

/// How a run-time tensor shape maps onto the declared axes.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisBinding {
    /// The run-time dims each declared axis took (variadic axes take zero or more).
    pub dims: Vec<Vec<usize>>,
    /// Per axis, the product of its dims (1 for a variadic axis that took none).
    pub extents: Vec<usize>,
}

pub fn bind_axes(axes: &[Axis], shape: &[usize], what: &str) -> Result<AxisBinding, String> {
    let own = || axes.iter().filter(|a| a.twin.is_none());
    let fixed = own().filter(|a| !a.variadic).count();
    let has_variadic = own().any(|a| a.variadic);
    if shape.len() < fixed || (!has_variadic && shape.len() != fixed) {
        let names: Vec<String> = own().map(Axis::display_name).collect();
        return Err(format!("{what} has shape {shape:?}, which does not match the declared axes [{}]", names.join(", ")));
    }
    let var_len = shape.len() - fixed;
    let mut dims = Vec::new();
    let mut k = 0;
    for a in axes {
        let n = if a.variadic { var_len } else { 1 };
        match a.twin {
            // Twins follow the input's axes, so their origin is bound already.
            Some(o) => dims.push(dims.get(o as usize).cloned().unwrap_or_default()),
            None => {
                dims.push(shape[k..k + n].to_vec());
                k += n;
            }
        }
    }
    let extents = dims.iter().map(|d| d.iter().product()).collect();
    Ok(AxisBinding { dims, extents })
}

pub fn group_count(g: Groups, hparams: &[f64]) -> usize {
    match g {
        Groups::Count(n) => n as usize,
        Groups::HParam(i) => hparams.get(i as usize).map_or(0, |v| v.max(0.0) as usize),
    }
}

/// Number of values per axis for a shape, after checking that groups divide their axes.
pub fn extents(shape: &Shape, b: &AxisBinding, hparams: &[f64]) -> Result<Vec<usize>, String> {
    shape
        .0
        .iter()
        .zip(&b.extents)
        .map(|(e, &n)| match e {
            Extent::One => Ok(1),
            Extent::Full => Ok(n),
            Extent::Grouped(g) => {
                let groups = group_count(*g, hparams);
                if groups == 0 || n % groups != 0 {
                    Err(format!("an axis of length {n} cannot be split into {groups} equal groups"))
                } else {
                    Ok(groups)
                }
            }
        })
        .collect()
}

/// Check that every node of `p` has a valid extent for this binding (groups divide their
/// axes), so that a layer can refuse an input shape when it is built, not mid-run.
pub fn check_program(p: &crate::ir::Program, b: &AxisBinding, hparams: &[f64]) -> Result<(), String> {
    p.nodes.iter().try_for_each(|n| extents(&n.shape, b, hparams).map(|_| ()))
}

/// Number of elements per output element of a reduction over `reduced` (`Op::Size`).
pub fn size(reduced: &Shape, b: &AxisBinding, hparams: &[f64]) -> usize {
    reduced
        .0
        .iter()
        .zip(&b.extents)
        .map(|(e, &full)| match e {
            Extent::One => 1,
            Extent::Full => full,
            Extent::Grouped(g) => full / group_count(*g, hparams).max(1),
        })
        .product()
}

/// The value of a shape query on this binding: `Op::Size` (see [`size`]), `Op::Rank` (the dims
/// its axes took: a variadic axis may take several or none); `None` for any other op.
pub fn query(op: &Op, b: &AxisBinding, hparams: &[f64]) -> Option<usize> {
    match op {
        Op::Size(s) => Some(size(s, b, hparams)),
        Op::Rank(axes) => Some(axes.iter().map(|&a| b.dims[a as usize].len()).sum()),
        _ => None,
    }
}

/// Run-time dims of a tensor declared with `shape` (its axes' dims, in order).
pub fn dims_of(shape: &Shape, b: &AxisBinding, hparams: &[f64]) -> Result<Vec<usize>, String> {
    extents(shape, b, hparams)?;
    let mut d = Vec::new();
    for (e, dims) in shape.0.iter().zip(&b.dims) {
        match e {
            Extent::One => {}
            Extent::Full => d.extend(dims),
            Extent::Grouped(g) => d.push(group_count(*g, hparams)),
        }
    }
    Ok(d)
}

/// A parameter with fewer dims than an update rule names (a scalar under `p[o, r...]`) is
/// viewed with leading unit dims, as `view(1, -1)` would in PyTorch. Rules that name only fixed
/// axes (`p[o, i]`, a matrix rule) take exactly that many dims: nothing is padded.
pub fn param_view(entry: &Entry, shape: &[usize]) -> Vec<usize> {
    let own = || entry.axes.iter().filter(|a| a.twin.is_none());
    if !own().any(|a| a.variadic) {
        return shape.to_vec();
    }
    let fixed = own().filter(|a| !a.variadic).count();
    let mut v = vec![1; fixed.saturating_sub(shape.len())];
    v.extend_from_slice(shape);
    v
}

/// The dims of each state an update rule keeps for a parameter of `shape`: what a saved
/// state must hold, whichever backend saved it.
pub fn state_dims(entry: &Entry, shape: &[usize], hparams: &[f64], what: &str) -> Result<Vec<Vec<usize>>, String> {
    let b = bind_axes(&entry.axes, &param_view(entry, shape), what)?;
    entry.states.iter().map(|d| dims_of(&d.shape, &b, hparams)).collect()
}
