//! The U-Net's up-convolution on the device (`kernels/upconv.cu`, mirroring
//! `cpu/upconv.rs`): a transposed convolution whose kernel equals its stride, written into
//! a channel slice of a wider output, and its data, weight and bias gradients.

use cudarc::driver::CudaSlice;

use super::bias::channel_sum;
use super::launch::{blocks, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::{Maps, UpConv2d};
use crate::engine::Result;

kernels!("upconv" {
    fwd: "upconv_fwd",
    bwd_data: "upconv_bwd_data",
    bwd_weight: "upconv_bwd_weight",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.upconv.get(|| Kernels::load(be.modules()))
}

/// The `int` arguments the up-convolution kernels share, in their order.
fn geometry(s: &UpConv2d) -> Result<[i32; 8]> {
    int_args([s.y_len(), s.x_len()])?;
    int_args([
        s.n,
        s.c_in,
        s.h,
        s.w,
        s.c_out,
        s.k,
        s.y_channels,
        s.y_offset,
    ])
}

pub(crate) fn upconv2d_fwd(
    be: &CudaBackend,
    s: &UpConv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let total = s.n * s.c_out * s.out_h() * s.out_w();
    if total == 0 {
        return Ok(());
    }
    let g = geometry(s)?;
    // SAFETY: x, w, b and y hold the lengths `s` gives (checked).
    unsafe {
        kernels(be)?
            .fwd
            .on(be.stream())
            .arg(x)
            .arg(w)
            .arg(b)
            .arg(y)
            .ints(&g)
            .launch(grid(total))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn upconv2d_bwd(
    be: &CudaBackend,
    s: &UpConv2d,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
) -> Result<()> {
    let g = geometry(s)?;
    let k = kernels(be)?;
    if s.x_len() > 0 {
        // SAFETY: dy, w and dx hold the lengths `s` gives (checked).
        unsafe {
            k.bwd_data
                .on(be.stream())
                .arg(dy)
                .arg(w)
                .arg(dx)
                .ints(&g)
                .launch(grid(s.x_len()))?;
        }
    }
    if s.w_len() > 0 {
        // One block per weight.
        let cfg = blocks("upconv2d_bwd", (s.w_len(), 1, 1), 256)?;
        // SAFETY: x, dy and dw hold the lengths `s` gives (checked).
        unsafe {
            k.bwd_weight
                .on(be.stream())
                .arg(x)
                .arg(dy)
                .arg(dw)
                .ints(&g)
                .launch(cfg)?;
        }
    }
    let out = Maps {
        n: s.n,
        c: s.y_channels,
        hw: s.out_h() * s.out_w(),
    };
    channel_sum(be, dy, out, s.y_offset, s.c_out, db)
}
