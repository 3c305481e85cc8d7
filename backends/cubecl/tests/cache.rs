//! CubeCL caches compiled kernels by their id, which includes the comptime program but not the
//! runtime scalars. This checks it where it happens: CubeCL's own compilation log and the ids
//! of the kernels launched, while only the learning rate changes between steps.
//!
//! Its own test binary: CubeCL reads `CUBECL_DEBUG_LOG` once per process, before the first
//! device is created.

use normforge_cubecl::{cpu_device, CubeOptimizer};
use normforge_registry::Registry;

#[test]
fn changing_the_learning_rate_compiles_nothing() {
    let log = std::env::temp_dir().join(format!("normforge-cubecl-cache-{}.log", std::process::id()));
    std::env::set_var("CUBECL_DEBUG_LOG", &log);
    normforge_std::link();
    let reg = Registry::with_builtins().unwrap();
    let device = cpu_device().expect("lavapipe (mesa-vulkan-drivers) is installed by scripts/test.sh");
    let mut opt = CubeOptimizer::new(reg.get("adamw").unwrap().entry, &[], &device).unwrap();
    let mut params = vec![vec![0.5f32; 1000], vec![-0.25f32; 37]];
    let grads = vec![vec![0.1f32; 1000], vec![0.2f32; 37]];
    // Every compilation CubeCL does is logged under this marker.
    let compiled = || std::fs::read_to_string(&log).unwrap_or_default().matches("[START_KERNEL_COMPILATION]").count();

    // The first step compiles the state initialiser and the step kernel.
    opt.step(&mut params, &grads).unwrap();
    assert_eq!(compiled(), 2, "the first step compiles the initialiser and the step kernel");
    let mut ids = Vec::new();
    for lr in [1e-2, 3e-4, 0.5] {
        opt.set_hparam("lr", lr).unwrap();
        let launched = cubecl::launched::LaunchedKernels::new();
        let before = params[0][0];
        opt.step(&mut params, &grads).unwrap();
        assert_ne!(params[0][0], before, "the step ran");
        ids.push(launched.finish());
    }
    assert_eq!(ids[0].len(), 1, "one kernel per step");
    assert!(ids.iter().all(|s| *s == ids[0]), "the same kernel for every learning rate: {ids:?}");
    assert_eq!(compiled(), 2, "nothing was compiled after the first step");
    let _ = std::fs::remove_file(&log);
}
