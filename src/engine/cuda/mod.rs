//! The CUDA backend: NVRTC-compiled kernels (kernels/*.cu) driven through cudarc, f32.
//! Never panics on a machine without a driver or GPU: discovery ([`device`]) checks that
//! the libraries load before touching them, and every failure is an `EngineError`.
//!
//! - [`device`]: driver/NVRTC presence, the devices;
//! - [`module`]: the embedded kernel table and the per-context module/function cache;
//! - [`backend`]: [`CudaBackend`], the op trait over `CudaSlice<f32>`.

pub mod backend;
pub mod device;
pub mod module;
pub mod seg;

pub use backend::{CudaBackend, KArg};
pub use device::{cuda_available, DeviceInfo};
