//! The CUDA backend: NVRTC-compiled kernels (kernels/*.cu) driven through cudarc, f32.
//! Never panics on a machine without a driver or GPU: discovery ([`device`]) checks that
//! the libraries load before touching them, and every failure is an `EngineError`.
//!
//! - [`device`]: driver/NVRTC presence, the devices;
//! - [`module`]: the embedded kernel table and the per-context module cache; `headers`:
//!   where the CUDA headers may be (shared with build.rs);
//! - `launch`: typed kernel launches, each kernel's handle and PTX parameter list loaded once;
//! - [`backend`]: [`CudaBackend`], the op trait over `CudaSlice<f32>`;
//! - `arena`: scratch buffers reused across ops, pinned upload staging, the capture state;
//! - [`graph`]: capture of a stream's work as a CUDA graph and its replay;
//! - one module per op family, each the twin of `cpu/<family>.rs` and `kernels/<family>.cu`
//!   (`bias`, `cam`, `channels`, `conv`, `dense`, `dice`, `elementwise`, `loss`, `lstm`,
//!   `norm`, `optim`, `pool`, `upconv`), and the volume ops of
//!   [`crate::engine::VolumeOps`]: [`ccl`], [`kmeans`], [`morph`], [`volume`].

mod arena;
pub mod backend;
mod bias;
mod cam;
pub mod ccl;
mod channels;
mod conv;
mod conv_wgmma;
mod dense;
pub mod device;
mod dice;
mod elementwise;
pub mod graph;
mod headers;
pub mod kmeans;
mod launch;
mod loss;
mod lstm;
pub mod module;
pub mod morph;
mod norm;
mod optim;
mod pool;
mod upconv;
pub mod volume;

pub use backend::CudaBackend;
pub use conv::MmaRoute;
pub use device::{cuda_available, DeviceInfo};
pub use graph::Graph;
pub use launch::KArg;
