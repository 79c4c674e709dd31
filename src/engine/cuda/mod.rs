//! The CUDA backend: NVRTC-compiled kernels (kernels/*.cu) driven through cudarc, f32.
//! Never panics on a machine without a driver or GPU.
