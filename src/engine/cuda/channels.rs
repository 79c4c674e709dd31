//! Channel slices on the device (`kernels/channels.cu`, mirroring `cpu/channels.rs`): the
//! U-Net's skip concatenation and, accumulating, its backward.

use cudarc::driver::CudaSlice;

use super::launch::{grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::ChannelCopy;
use crate::engine::Result;

kernels!("channels" {
    copy: "copy_channels",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.channels.get(|| Kernels::load(be.modules()))
}

pub(crate) fn copy_channels(
    be: &CudaBackend,
    s: &ChannelCopy,
    src: &CudaSlice<f32>,
    dst: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    int_args([s.src_len(), s.dst_len()])?;
    let total = s.n * s.c * s.hw;
    if total == 0 {
        return Ok(());
    }
    let a = int_args([
        s.n,
        s.c,
        s.hw,
        s.src_channels,
        s.src_offset,
        s.dst_channels,
        s.dst_offset,
        accumulate as usize,
    ])?;
    // SAFETY: src and dst hold the lengths `s` gives, the slices inside them (checked).
    unsafe {
        kernels(be)?
            .copy
            .on(be.stream())
            .arg(src)
            .arg(dst)
            .ints(&a)
            .launch(grid(total))
    }
}
