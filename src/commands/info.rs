//! `ichcam info`: the build (version, whether the kernels were precompiled and for which
//! targets), whether the CUDA driver and NVRTC load, the GPUs (saying so when the driver is
//! the project's CPU emulator, emu/), and what `--device auto` picks.

use ichcam::engine::cuda::device;
use ichcam::engine::cuda::module;
use ichcam::engine::Device;
use std::io::Write;

/// Appends a formatted line to a String (the report is printed in one write).
macro_rules! outln {
    ($s:expr, $($arg:tt)*) => {{
        $s.push_str(&format!($($arg)*));
        $s.push('\n');
    }};
}

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let mut out = String::new();
    outln!(out, "ichcam {}", env!("CARGO_PKG_VERSION"));
    let kernels: Vec<&str> = module::KERNELS.iter().map(|k| k.name).collect();
    if module::precompiled() {
        outln!(
            out,
            "kernels: {} modules precompiled to PTX for {} ({})",
            kernels.len(),
            module::PRECOMPILED_TARGETS.join(", "),
            kernels.join(", ")
        );
    } else {
        outln!(out,
            "kernels: {} modules embedded as source only (the build had no NVRTC; compiled at first GPU use) ({})",
            kernels.len(),
            kernels.join(", ")
        );
    }
    match device::nvrtc_version() {
        Ok((a, b)) => outln!(out, "nvrtc: present at run time, version {a}.{b}"),
        Err(e) => outln!(
            out,
            "nvrtc: not available at run time ({})",
            device::reason_line(&e)
        ),
    }
    if device::driver_present() {
        match device::driver_version() {
            Ok((a, b)) => outln!(out, "cuda driver: present, CUDA {a}.{b}"),
            Err(e) => outln!(
                out,
                "cuda driver: present, version unknown ({})",
                device::reason_line(&e)
            ),
        }
    } else {
        outln!(out, "cuda driver: not found (libcuda.so did not load)");
    }
    match device::cuda_available() {
        Ok(devs) => {
            for d in &devs {
                outln!(
                    out,
                    "gpu {}: {}, compute capability {}.{}, {} multiprocessors, {:.1} GiB, {} KiB shared memory per block",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors,
                    d.total_mem as f64 / (1u64 << 30) as f64,
                    d.shared_memory_per_block / 1024
                );
                if d.name.contains("emulated") {
                    outln!(
                        out,
                        "gpu {}: this is ichcam's CPU emulator of the CUDA driver (emu/README.md): the CUDA path runs on the CPU, for correctness checks; its timings mean nothing",
                        d.ordinal
                    );
                }
            }
        }
        Err(e) => outln!(out, "gpus: none ({})", device::reason_line(&e)),
    }
    match Device::open("auto") {
        Ok(Device::Cuda(be)) => {
            let d = be.info();
            outln!(out, "--device auto: cuda:{} ({})", d.ordinal, d.name)
        }
        Ok(Device::Cpu { fallback, .. }) => outln!(
            out,
            "--device auto: cpu: {}",
            fallback.unwrap_or_else(|| "asked for".into())
        ),
        Err(e) => outln!(out, "--device auto: cpu: {}", device::reason_line(&e)),
    }
    // A closed pipe (`ichcam info | head -1`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
