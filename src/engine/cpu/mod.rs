//! The CPU reference backend: plain, readable implementations of every op, generic over
//! f32/f64 (f64 for finite-difference gradient checks), parallel with rayon, convolutions
//! and dense products through the `gemm` crate.
