//! ichcam: weakly supervised intracranial hemorrhage segmentation in non-contrast head CT.
//!
//! Data flows one way: [`io`] -> [`data`] -> ([`train`] | [`infer`] -> [`seg`]) -> [`eval`],
//! with [`engine`] (the op set, CPU reference and CUDA backends, and where code runs:
//! [`engine::Device`]) and [`model`] (the ResNet-LSTM and U-Net topologies over any backend,
//! the model file's metadata) underneath; [`rng`] is the one seeded generator. Each layer
//! imports only the layers below it; bottom to top: `rng`, `engine`, `io`, `model` (its
//! files go through `io`), `data`, `seg` (the refinement, used by both stage-3 training and
//! inference), `infer` | `train`, `eval`. So nothing in `engine` knows about CT, the
//! refinement rules or files (the refinement in `seg` drives the engine's volume ops through a
//! trait); `infer` needs nothing from `train`; nothing in `io` knows about the network.
//! `tests/architecture.rs` checks this order on the source.

pub mod data;
pub mod engine;
pub mod eval;
pub mod infer;
pub mod io;
pub mod model;
pub mod rng;
pub mod seg;
pub mod train;
