//! Shapes the op tests build again and again.

use ichcam::engine::Conv2d;

/// A square-kernel convolution's shape.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Conv2d {
    Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad,
    }
}
