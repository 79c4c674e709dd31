//! The one place `--device` is resolved: `auto` (the first GPU when one opens, else the CPU
//! with one line saying why), `cpu`, `cuda` / `gpu` or `cuda:N` (an error when that GPU is
//! not there or does not open). A command resolves its device once and hands the [`Device`]
//! to everything that runs on it ([`on_device!`](crate::on_device) picks the backend).
//! Knows nothing about what runs on it.

use super::cpu::CpuBackend;
use super::cuda::device::{cuda_available, reason_line};
use super::cuda::CudaBackend;
use super::{Backend, EngineError, Result};

/// A resolved device: its backend, and for a CPU that `auto` fell back to, the reason.
#[derive(Clone)]
pub enum Device {
    Cpu {
        backend: CpuBackend<f32>,
        /// Why `auto` did not take a GPU (None when the CPU was asked for).
        fallback: Option<String>,
    },
    Cuda(CudaBackend),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Device {
    /// Resolves `auto`, `cpu`, `cuda`, `gpu` or `cuda:N` (any case, surrounding spaces
    /// ignored).
    pub fn open(spec: &str) -> Result<Device> {
        let spec = spec.trim().to_ascii_lowercase();
        let ordinal = match spec.as_str() {
            "cpu" => return Ok(Device::cpu()),
            "auto" => return Ok(Device::auto()),
            "cuda" | "gpu" => 0,
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    EngineError::NoCuda(format!(
                        "unknown device `{spec}`: use auto, cpu, cuda or cuda:N"
                    ))
                })?,
        };
        let n = cuda_available()?.len();
        if ordinal >= n {
            return Err(EngineError::NoCuda(format!(
                "asked for cuda:{ordinal} but the driver reports {n} GPU(s)"
            )));
        }
        Ok(Device::Cuda(CudaBackend::new(ordinal)?))
    }

    /// The CPU, asked for.
    pub fn cpu() -> Device {
        Device::Cpu {
            backend: CpuBackend::new(),
            fallback: None,
        }
    }

    /// The first GPU when one opens, else the CPU with the reason.
    fn auto() -> Device {
        let opened = cuda_available().and_then(|devs| match devs.first() {
            Some(d) => CudaBackend::new(d.ordinal),
            None => Err(EngineError::NoCuda("no GPU found".into())),
        });
        match opened {
            Ok(be) => Device::Cuda(be),
            Err(e) => Device::Cpu {
                backend: CpuBackend::new(),
                fallback: Some(reason_line(&e)),
            },
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// The backend's name ("cpu-f32", "cuda:0 NVIDIA H200").
    pub fn name(&self) -> String {
        match self {
            Device::Cpu { backend, .. } => backend.name(),
            Device::Cuda(be) => be.name(),
        }
    }

    /// The one line to print when `auto` fell back to the CPU:
    /// `device auto: using the CPU (<why>)`.
    pub fn fallback_note(&self) -> Option<String> {
        match self {
            Device::Cpu {
                fallback: Some(why),
                ..
            } => Some(format!("device auto: using the CPU ({why})")),
            _ => None,
        }
    }
}

/// Runs `$body` with `$be` bound to the device's backend (by reference when `$device` is a
/// reference): `on_device!(&device, be => train_with(be.clone(), ...))`. Each arm is typed
/// with its own backend, so `$body` may call anything generic over backends.
#[macro_export]
macro_rules! on_device {
    ($device:expr, $be:ident => $body:expr) => {
        match $device {
            $crate::engine::Device::Cpu { backend: $be, .. } => $body,
            $crate::engine::Device::Cuda($be) => $body,
        }
    };
}
