//! What a failing launch looks like from the engine, on a GPU and on the emulated driver: a
//! kernel that faults while it runs is reported by the next synchronising call, and that
//! error names the launch (the engine's own note, plus the emulator's exact account); a
//! launch beyond the block limits or the kernel's `__launch_bounds__` is refused at once;
//! and, on the emulator only (a GPU would hang), a `__syncthreads` that half a block skips
//! is a launch failure naming the kernel and the block.
//!
//! A fault poisons the process's CUDA context for good (on an H200 every later call, a new
//! context's creation too, returned CUDA_ERROR_ILLEGAL_ADDRESS; the emulated driver models
//! it), so the faulting test runs in a child process of its own (this binary, run again
//! with `--exact` on that test and ICHCAM_FAULT_CHILD=1), and the tests run one at a time.

mod common;

use common::cuda::{device, emulator};
use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use ichcam::engine::cuda::{CudaBackend, KArg};
use ichcam::engine::Backend;

fn main() {
    common::cuda::main_with_threads(
        vec![
            device(
                "a_fault_during_a_kernel_names_the_launch",
                a_fault_during_a_kernel_names_the_launch,
            ),
            device(
                "launches_beyond_the_limits_are_refused",
                launches_beyond_the_limits_are_refused,
            ),
            emulator(
                "a_barrier_half_a_block_skips_is_a_launch_failure",
                a_barrier_half_a_block_skips_is_a_launch_failure,
            ),
        ],
        1,
    )
}

fn one_warp() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// fill_f32 through an address that is no device memory: the launch is accepted, the
/// kernel faults, and the next download reports it naming elementwise::fill_f32 (exactly
/// with CUDA_LAUNCH_BLOCKING=1, as one of the launches since the last sync otherwise).
/// Runs in a child process (see the module doc).
fn a_fault_during_a_kernel_names_the_launch() {
    const NAME: &str = "a_fault_during_a_kernel_names_the_launch";
    if std::env::var_os("ICHCAM_FAULT_CHILD").is_none() {
        let exe = std::env::current_exe().expect("this test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env("ICHCAM_FAULT_CHILD", "1")
            .output()
            .expect("run the faulting test in a child process");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{text}");
        assert!(out.status.success(), "the child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
        return;
    }
    let be = CudaBackend::new(0).expect("device");
    let x = be.upload(&[1.0, -2.0, 3.0]).expect("upload");
    let mut y = be.zeros(3).expect("zeros");
    be.relu_fwd(&x, &mut y).expect("a good launch first");
    assert_eq!(be.download(&y).expect("download"), vec![1.0, 0.0, 3.0]);
    be.relu_fwd(&x, &mut y).expect("another good launch");
    let bad = [KArg::Ptr(0xdead_0000), KArg::F32(1.0), KArg::I32(32)];
    // SAFETY: deliberately not: the address is no device memory; the fault is the test.
    let err = match unsafe { be.launch_raw("elementwise", "fill_f32", one_warp(), &bad) } {
        Err(e) => e, // CUDA_LAUNCH_BLOCKING=1: the launch itself waits and reports
        Ok(()) => be
            .download(&y)
            .expect_err("the fault is reported by the next synchronising call"),
    };
    let msg = err.to_string();
    println!("the engine's error: {msg}");
    assert!(msg.contains("elementwise::fill_f32"), "{msg}");
    assert!(
        msg.contains("ILLEGAL_ADDRESS") || msg.contains("LAUNCH_FAILED"),
        "{msg}"
    );
}

fn launches_beyond_the_limits_are_refused() {
    let be = CudaBackend::new(0).expect("device");
    let y = be.zeros(64).expect("zeros");
    let args = [KArg::Ptr(be.ptr(&y)), KArg::F32(1.0), KArg::I32(64)];
    let mut cfg = one_warp();
    cfg.block_dim = (1025, 1, 1);
    // SAFETY: refused before it runs (the test).
    let e = unsafe { be.launch_raw("elementwise", "fill_f32", cfg, &args) }
        .expect_err("a block of 1025 threads");
    assert!(e.to_string().contains("INVALID_VALUE"), "{e}");
    cfg.block_dim = (32, 1, 1);
    cfg.grid_dim = (1, 65_536, 1);
    // SAFETY: refused before it runs (the test).
    let e = unsafe { be.launch_raw("elementwise", "fill_f32", cfg, &args) }
        .expect_err("grid.y = 65536");
    assert!(e.to_string().contains("INVALID_VALUE"), "{e}");
    // conv2d_fwd is __launch_bounds__(256): 512 threads are refused (an H200's driver 580
    // says CUDA_ERROR_INVALID_VALUE; the emulated driver answers the same).
    let conv_args: Vec<KArg> = [be.ptr(&y); 3]
        .into_iter()
        .map(KArg::Ptr)
        .chain([1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1].map(KArg::I32))
        .collect();
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: refused before it runs (the test).
    let e = unsafe { be.launch_raw("conv", "conv2d_fwd", cfg, &conv_args) }
        .expect_err("512 threads for a kernel bounded to 256");
    assert!(e.to_string().contains("INVALID_VALUE"), "{e}");
    // None of that poisoned the context.
    be.synchronize()
        .expect("refused launches leave the device usable");
}

/// The emulator's own test kernels (emu/tests/selftest.cu), compiled by NVRTC as the
/// engine's are and loaded through cudarc: st_partial_barrier lets half the block skip a
/// __syncthreads.
fn a_barrier_half_a_block_skips_is_a_launch_failure() {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
    let src = include_str!("../emu/tests/selftest.cu");
    let opts = CompileOptions {
        arch: Some("compute_90"),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(src, opts).expect("NVRTC compiles the emulator's test kernels");
    let ctx = CudaContext::new(0).expect("context");
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(ptx)
        .expect("the emulator maps the PTX to its host build");
    let f = module
        .load_function("st_partial_barrier")
        .expect("st_partial_barrier");
    let mut out = stream.alloc_zeros::<f32>(128).expect("alloc");
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&mut out);
    let launched = unsafe { b.launch(cfg) };
    let err = match launched {
        Err(e) => e,
        Ok(_) => stream
            .synchronize()
            .expect_err("the deadlock is reported by the next synchronisation"),
    };
    let msg = err.to_string();
    println!("the driver's error: {msg}");
    assert!(
        msg.contains("CUDA_ERROR_LAUNCH_FAILED")
            && msg.contains("st_partial_barrier")
            && msg.contains("deadlock")
            && msg.contains("__syncthreads reached by 32 of 64 threads"),
        "{msg}"
    );
}
