//! Hyper-parameter values chosen at run time, checked against the entry's declarations.
//! Backends receive them as plain numbers in declaration order, so changing one never changes
//! a program.

use crate::ir::{Entry, HType};
use crate::suggest::did_you_mean;

/// Hyper-parameter errors are the crate's run-time [`Error`](crate::Error).
pub use crate::Error as HyperError;

/// Defaults overridden by `overrides` (name, value); bools are 0 or 1.
pub fn resolve(entry: &Entry, overrides: &[(String, f64)]) -> Result<Vec<f64>, HyperError> {
    let mut values: Vec<f64> = entry.hparams.iter().map(|h| h.default).collect();
    for (name, v) in overrides {
        set(entry, &mut values, name, *v)?;
    }
    Ok(values)
}

/// The position of hyper-parameter `name`, or an error naming the close matches.
pub fn index(entry: &Entry, name: &str) -> Result<usize, HyperError> {
    entry.hparams.iter().position(|h| h.name == name).ok_or_else(|| {
        let mut msg = format!("`{}` has no hyper-parameter `{name}`", entry.name);
        if let Some(s) = did_you_mean(name, entry.hparams.iter().map(|h| h.name.as_str())) {
            msg.push_str(&format!("; did you mean `{s}`?"));
        }
        let all: Vec<&str> = entry.hparams.iter().map(|h| h.name.as_str()).collect();
        msg.push_str(&format!(" (it has: {})", all.join(", ")));
        HyperError(msg)
    })
}

/// `values[name] = v`, checked; on an error `values` is unchanged.
pub fn set(entry: &Entry, values: &mut [f64], name: &str, v: f64) -> Result<(), HyperError> {
    let i = index(entry, name)?;
    values[i] = check_value(entry, i, v)?;
    Ok(())
}

/// Validate one value for hyper-parameter `i` of `entry`.
pub fn check_value(entry: &Entry, i: usize, v: f64) -> Result<f64, HyperError> {
    let h = &entry.hparams[i];
    let bad = |why: &str| Err(HyperError(format!("{}.{} = {v}: {why}", entry.name, h.name)));
    match h.ty {
        _ if v.is_nan() => return bad("not a number"),
        HType::Bool if v != 0.0 && v != 1.0 => return bad("expected a bool (true or false)"),
        HType::Int if v.fract() != 0.0 || v.abs() >= 2f64.powi(31) => return bad("expected a whole number"),
        _ => {}
    }
    if let Some(r) = &h.range {
        if !r.contains(v) {
            return bad(&format!("outside the range {r}"));
        }
    }
    Ok(v)
}

/// Parse `name=value` (`value` a number, `true` or `false`).
pub fn parse_assignment(s: &str) -> Result<(String, f64), HyperError> {
    let Some((k, v)) = s.split_once('=') else {
        return Err(HyperError(format!("`{s}`: expected name=value")));
    };
    let v = v.trim();
    let value = match v {
        "true" => 1.0,
        "false" => 0.0,
        _ => v.parse::<f64>().map_err(|_| HyperError(format!("`{s}`: `{v}` is not a number, true or false")))?,
    };
    Ok((k.trim().to_string(), value))
}
