//! The op set of the ResNet-LSTM and U-Net topologies as one trait ([`Backend`]), and the
//! volume ops a mask refinement is built from as another ([`VolumeOps`]: thresholds, window,
//! box mean, k-means per segment, band, morphology, connected components), each with a CPU
//! reference ([`cpu`]: generic over f32/f64, used for gradient checks and as the oracle) and
//! a CUDA backend ([`cuda`]: NVRTC-compiled kernels driven through cudarc, f32); the shape
//! descriptors and their checks ([`shapes`]); and where code runs ([`Device`]: `auto`,
//! `cpu` or `cuda[:N]` resolved once).
//!
//! Nothing here knows about CT, refinement rules, files or the model's layer names: only
//! shapes, values, masks and buffers. It imports no other layer of the crate.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod precision;
pub mod shapes;
pub mod volume;

pub use backend::Backend;
pub use device::Device;
pub use precision::{ActStorage, Precision};
pub use shapes::{BatchNorm2d, ChannelCopy, Conv2d, Lstm, Pool2d, SoftDice, UpConv2d};
pub use volume::{Connectivity, Structuring, VolumeOps};

use std::fmt::{Debug, Display};

/// The element types the CPU reference runs in: f32 for work, f64 for gradient checks.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::ToPrimitive
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + std::iter::Sum
    + 'static
{
    const NAME: &'static str;
    fn from_f64_lossy(v: f64) -> Self;
    fn as_f64(self) -> f64;
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    fn from_f64_lossy(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    fn from_f64_lossy(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Errors of the engine: shapes that do not fit, and everything CUDA can say.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("invalid parameter: {0}")]
    Param(String),
    #[error("volume too large for 32-bit labels: {0} voxels")]
    TooLarge(usize),
    #[error("CUDA is not available: {0}")]
    NoCuda(String),
    #[error("out of GPU memory allocating {bytes} bytes: lower the batch size, the number of slices or the image size")]
    OutOfMemory { bytes: usize },
    #[error("CUDA error in {op}: {msg}")]
    Cuda { op: String, msg: String },
    #[error("kernel compilation failed for {module}:\n{log}")]
    Compile { module: String, log: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Checks that a buffer holds exactly `want` elements; the one shape check every op uses.
pub fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(EngineError::Shape {
            op,
            detail: format!("{what} has {got} elements, expected {want}"),
        })
    }
}
