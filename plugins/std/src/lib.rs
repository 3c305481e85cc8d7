//! The standard library: `.nf` specs compiled into the binary and submitted to the registry
//! through `inventory`. The specs themselves live in `nf/`, one entry per file.

use normforge_registry::StaticSource;

macro_rules! std_specs {
    ($($file:literal),* $(,)?) => {
        $(inventory::submit! { StaticSource { origin: concat!("std/", $file), text: include_str!(concat!("../nf/", $file)) } })*
        /// File names of the standard specs, relative to `plugins/std/nf`.
        pub const FILES: &[&str] = &[$($file),*];
    };
}

std_specs!(
    "layer_norm.nf",
    "rms_norm.nf",
    "batch_norm.nf",
    "group_norm.nf",
    "evonorm_b0.nf",
    "evonorm_s0.nf",
    "dyt.nf",
    "sgd.nf",
    "adam.nf",
    "adamw.nf",
    "lion.nf",
    "lamb.nf",
    "adamp.nf",
    "instance_norm.nf",
    "amsgrad.nf",
    "radam.nf",
    "adabelief.nf",
    "grams.nf",
    "ademamix.nf",
    "sgdp.nf",
    "lars.nf",
    "adan.nf",
    "evonorm_b1.nf",
    "evonorm_b2.nf",
    "evonorm_s1.nf",
    "evonorm_s2.nf",
    "novograd.nf",
    "weight_norm.nf",
    "weight_standardization.nf",
    "scale_norm.nf",
    "crms_norm.nf",
    "fix_norm.nf",
    "diffgrad.nf",
    "spectral_norm.nf",
    "batch_channel_norm.nf",
    "muon.nf",
);

/// Call once from a program that uses the standard library so the linker keeps this crate
/// (and with it the `inventory` submissions) even if nothing else refers to it.
#[inline(never)]
pub fn link() {}
