//! The arithmetic of the CUDA backend's convolutions, chosen with `--precision`: `f32` (the
//! SIMT kernels of `kernels/conv.cu`, the reference and the default), `tf32` or `bf16`
//! (tensor cores, `kernels/conv_tc.cu`: operands rounded to tf32 or bf16, f32
//! accumulation). A setting of the backend ([`Device::set_precision`]), not of the model:
//! weights, activations and gradients stay f32 buffers either way. The CPU backend runs
//! f32 only. Knows nothing about what runs at that precision.

use std::fmt;
use std::str::FromStr;

use super::{Device, EngineError, Result};

/// The precision of the CUDA backend's convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands and arithmetic (SIMT).
    #[default]
    F32,
    /// Operands rounded to tf32 (10-bit mantissa), f32 accumulation, tensor cores.
    Tf32,
    /// Operands rounded to bf16 (7-bit mantissa), f32 accumulation, tensor cores.
    Bf16,
}

impl Precision {
    /// Every precision, in the order the help text lists them.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// `f32`, `tf32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Whether the convolutions run on the tensor cores.
    pub fn tensor_cores(self) -> bool {
        self != Precision::F32
    }

    /// The relative error a result at this precision is allowed against the f32 reference
    /// (`||ours - ref|| / ||ref||`): None for f32 (the element type's own tolerance), 1e-3
    /// for tf32, 1e-2 for bf16.
    pub fn tolerance(self) -> Option<f64> {
        match self {
            Precision::F32 => None,
            Precision::Tf32 => Some(1e-3),
            Precision::Bf16 => Some(1e-2),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = EngineError;

    /// `f32`, `tf32` or `bf16` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == t)
            .ok_or_else(|| {
                EngineError::Param(format!("unknown precision `{s}`: use f32, tf32 or bf16"))
            })
    }
}

impl Device {
    /// Sets the precision of the device's convolutions: any on a GPU with tensor cores for
    /// it (tf32 and bf16 need compute capability 8.0 or newer), only f32 on the CPU; a clear
    /// error otherwise, the device unchanged.
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        match self {
            Device::Cpu { .. } if p != Precision::F32 => Err(EngineError::Param(format!(
                "--precision {p} needs a CUDA device; the CPU backend computes in f32 only"
            ))),
            Device::Cpu { .. } => Ok(()),
            Device::Cuda(be) => be.set_precision(p),
        }
    }

    /// The precision of the device's convolutions.
    pub fn precision(&self) -> Precision {
        match self {
            Device::Cpu { .. } => Precision::F32,
            Device::Cuda(be) => be.precision(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Precision;

    #[test]
    fn parses_the_three_names_and_refuses_others() {
        assert_eq!(" BF16 ".parse::<Precision>().ok(), Some(Precision::Bf16));
        assert_eq!("tf32".parse::<Precision>().ok(), Some(Precision::Tf32));
        assert_eq!("f32".parse::<Precision>().ok(), Some(Precision::F32));
        for bad in ["fp16", "", "f64", "bf"] {
            let e = bad.parse::<Precision>().unwrap_err().to_string();
            assert!(e.contains("use f32, tf32 or bf16"), "{e}");
        }
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().ok(), Some(p));
        }
        assert_eq!(Precision::default(), Precision::F32);
    }

    #[test]
    fn the_cpu_refuses_reduced_precisions() {
        let mut d = crate::engine::Device::cpu();
        assert!(d.set_precision(Precision::F32).is_ok());
        let e = d.set_precision(Precision::Bf16).unwrap_err().to_string();
        assert!(e.contains("CPU backend computes in f32 only"), "{e}");
        assert_eq!(d.precision(), Precision::F32);
    }
}
