//! ichcam: weakly supervised intracranial hemorrhage segmentation in non-contrast head CT.
//!
//! Data flows one way: [`io`] -> [`data`] -> ([`train`] | [`seg`]) -> [`eval`], with
//! [`engine`] (the op set, CPU reference and CUDA backends) and [`model`] (the ResNet-LSTM
//! topology over any backend) underneath. Nothing in `engine` knows about CT; nothing in
//! `io` knows about the network.

pub mod data;
pub mod engine;
pub mod eval;
pub mod infer;
pub mod io;
pub mod model;
pub mod rng;
pub mod seg;
pub mod train;
