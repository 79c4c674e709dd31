//! In-plane binary morphology on the device (`kernels/morph.cu`, mirroring `cpu/morph.rs`):
//! dilation or erosion of every slice with a cross or a square, one thread per voxel.

use cudarc::driver::CudaSlice;

use super::launch::{grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::volume::{check, Dims, Structuring};
use crate::engine::Result;

kernels!("morph" {
    morph2d: "morph2d",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.morph.get(|| Kernels::load(be.modules()))
}

/// In-plane binary dilation (`dilate`) or erosion of every slice, as `cpu::morph::morph2d`.
pub fn morph2d(
    be: &CudaBackend,
    input: &CudaSlice<u8>,
    dims: Dims,
    radius: usize,
    shape: Structuring,
    dilate: bool,
    out: &mut CudaSlice<u8>,
) -> Result<()> {
    let n = check::same_volume("morph2d", dims, input.len(), out.len())?;
    if n == 0 {
        return Ok(());
    }
    // Beyond ny + nx every window (even the diamond) covers the whole slice: same result.
    let radius = radius.min(dims.1 + dims.2);
    let shape = match shape {
        Structuring::Cross => 0,
        Structuring::Square => 1,
    };
    let a = int_args([dims.0, dims.1, dims.2, radius, shape, dilate as usize])?;
    // SAFETY: input and out hold nz*ny*nx voxels (checked).
    unsafe {
        kernels(be)?
            .morph2d
            .on(be.stream())
            .arg(input)
            .ints(&a)
            .arg(out)
            .launch(grid(n))
    }
}
