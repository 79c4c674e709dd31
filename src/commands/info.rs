//! `ichcam info`: the build (version, whether the kernels were precompiled and for which
//! targets), whether the CUDA driver and NVRTC load, the GPUs, and what `--device auto` picks.

use ichcam::engine::cuda::device::{self, DeviceChoice};
use ichcam::engine::cuda::module;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    println!("ichcam {}", env!("CARGO_PKG_VERSION"));
    let kernels: Vec<&str> = module::KERNELS.iter().map(|k| k.name).collect();
    if module::precompiled() {
        println!(
            "kernels: {} modules precompiled to PTX for {} ({})",
            kernels.len(),
            module::PRECOMPILED_TARGETS.join(", "),
            kernels.join(", ")
        );
    } else {
        println!(
            "kernels: {} modules embedded as source only (the build had no NVRTC; compiled at first GPU use) ({})",
            kernels.len(),
            kernels.join(", ")
        );
    }
    match device::nvrtc_version() {
        Ok((a, b)) => println!("nvrtc: present at run time, version {a}.{b}"),
        Err(e) => println!(
            "nvrtc: not available at run time ({})",
            device::reason_line(&e)
        ),
    }
    if device::driver_present() {
        match device::driver_version() {
            Ok((a, b)) => println!("cuda driver: present, CUDA {a}.{b}"),
            Err(e) => println!(
                "cuda driver: present, version unknown ({})",
                device::reason_line(&e)
            ),
        }
    } else {
        println!("cuda driver: not found (libcuda.so did not load)");
    }
    match device::cuda_available() {
        Ok(devs) => {
            for d in &devs {
                println!(
                    "gpu {}: {}, compute capability {}.{}, {} multiprocessors, {:.1} GiB",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors,
                    d.total_mem as f64 / (1u64 << 30) as f64
                );
            }
        }
        Err(e) => println!("gpus: none ({})", device::reason_line(&e)),
    }
    match device::pick_device("auto") {
        Ok(DeviceChoice::Cuda(d)) => println!("--device auto: cuda:{} ({})", d.ordinal, d.name),
        Ok(DeviceChoice::Cpu { reason }) => {
            println!(
                "--device auto: cpu: {}",
                reason.unwrap_or_else(|| "asked for".into())
            )
        }
        Err(e) => println!("--device auto: cpu: {}", device::reason_line(&e)),
    }
    Ok(())
}
