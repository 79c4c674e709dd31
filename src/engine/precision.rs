//! The arithmetic of the CUDA backend's convolutions, chosen with `--precision`: `f32` (the
//! SIMT kernels of `kernels/conv.cu`, the reference and the default), `tf32` or `bf16`
//! (tensor cores, `kernels/conv_tc.cu`: operands rounded to tf32 or bf16, f32
//! accumulation). A setting of the backend ([`Device::set_precision`]), not of the model:
//! weights, activations and gradients stay f32 buffers either way. The CPU backend runs
//! f32 only. Beside it the storage of the channels-last eval activations ([`ActStorage`]:
//! f32, or bf16 where the precision rounds the convolutions' operands to bf16 anyway) and
//! the one bf16 rounding of the host ([`round_bf16`]). Knows nothing about what runs at
//! that precision.

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

/// How a backend stores the channels-last activations of the eval-mode backbone
/// (`Backend::eval_storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActStorage {
    /// One f32 per value.
    #[default]
    F32,
    /// bf16 values (rounded to nearest even, [`round_bf16`]). On CUDA a tensor of `L` values
    /// is a buffer of `L.div_ceil(2)` f32 slots, value `i` the `u16` at index `i` (the low
    /// half of slot `i / 2` for even `i`, little-endian); on the CPU (the reference) `L`
    /// slots, each holding its value rounded to bf16.
    Bf16,
}

impl ActStorage {
    /// Both storages, in the order the help text lists them.
    pub const ALL: [ActStorage; 2] = [ActStorage::F32, ActStorage::Bf16];

    /// `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            ActStorage::F32 => "f32",
            ActStorage::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for ActStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ActStorage {
    type Err = EngineError;

    /// `f32` or `bf16` (any case, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        ActStorage::ALL
            .into_iter()
            .find(|p| p.name() == t)
            .ok_or_else(|| {
                EngineError::Param(format!("unknown activation storage `{s}`: use f32 or bf16"))
            })
    }
}

/// The bf16 bits of `x` (its upper 16 bits after rounding to nearest, ties to even, as
/// `__float2bfloat16_rn`; a NaN stays a NaN, made quiet; overflow rounds to infinity): what
/// `kernels/channels.cu` computes the same way.
pub fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `x` rounded to bf16 ([`bf16_bits`]) as an f32.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
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
    use super::{round_bf16, ActStorage, Precision};

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even 1; 1 + 3 * 2^-8 is
        // halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(
            round_bf16(-(1.0 + 3.0 * 2f32.powi(-8))),
            -(1.0 + 2f32.powi(-6))
        );
        // Just above the tie: up.
        assert_eq!(
            round_bf16(f32::from_bits((1.0f32 + 2f32.powi(-8)).to_bits() + 1)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::NEG_INFINITY), f32::NEG_INFINITY);
        assert_eq!(round_bf16(3.0), 3.0);
    }

    #[test]
    fn parses_the_two_storages() {
        assert_eq!(" BF16".parse::<ActStorage>().ok(), Some(ActStorage::Bf16));
        assert_eq!("f32".parse::<ActStorage>().ok(), Some(ActStorage::F32));
        let e = "fp16".parse::<ActStorage>().unwrap_err().to_string();
        assert!(e.contains("use f32 or bf16"), "{e}");
    }

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
