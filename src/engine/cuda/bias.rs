//! Convolution biases on the device (`kernels/bias.cu`, mirroring `cpu/bias.rs`): the bias
//! (and ReLU) added in place, and per-channel sums (a bias's gradient), deterministic in f64
//! through per-block partial sums.

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::Maps;
use crate::engine::Result;

kernels!("bias" {
    relu_assign: "bias_relu_assign",
    sum_partial: "channel_sum_partial",
    sum_finalize: "channel_sum_finalize",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.bias.get(|| Kernels::load(be.modules()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn bias_relu_assign(
    be: &CudaBackend,
    n: usize,
    c: usize,
    hw: usize,
    b: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    relu: bool,
) -> Result<()> {
    let maps = Maps { n, c, hw };
    if maps.is_empty() {
        return Ok(());
    }
    let a = int_args([maps.len(), c, hw])?;
    let relu = relu as i32;
    // SAFETY: y holds n*c*hw values and b c (checked).
    unsafe {
        kernels(be)?
            .relu_assign
            .on(be.stream())
            .arg(y)
            .arg(b)
            .ints(&a)
            .arg(&relu)
            .launch(grid(maps.len()))
    }
}

pub(crate) fn bias_bwd(
    be: &CudaBackend,
    n: usize,
    c: usize,
    hw: usize,
    dy: &CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
) -> Result<()> {
    let maps = Maps { n, c, hw };
    dim(maps.len())?;
    channel_sum(be, dy, Maps { n, c, hw }, 0, c, db)
}

/// `out[ch] = sum over the batch and the pixels of x[:, c_off + ch, :]` for `ch < c`, x
/// being `[n, x.c, hw]` (deterministic f64 sums).
pub(crate) fn channel_sum(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    shape: Maps,
    c_off: usize,
    c: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "channel_sum";
    if c == 0 {
        return Ok(());
    }
    let (split, chunk) = be.reduce_split(shape.n * shape.hw, c);
    let red = blocks(OP, (split, c, 1), 256)?;
    let per_c = blocks(OP, (c.div_ceil(256), 1, 1), 256)?;
    let a = int_args([shape.n, shape.c, c_off, shape.hw, chunk])?;
    let f = int_args([c, split])?;
    let k = kernels(be)?;
    // The partial sums from the f64 scratch arena: nothing allocated once warm (a captured
    // CUDA graph allocates nothing).
    let mut part = be.take_scratch_f64(c * split)?;
    let r = (|| -> Result<()> {
        // SAFETY: x holds n*x.c*hw values (checked by the callers), channels c_off..c_off + c
        // among them; `part` one partial sum per (channel, split), out c values.
        unsafe {
            k.sum_partial
                .on(be.stream())
                .arg(x)
                .arg(&mut part)
                .ints(&a)
                .launch(red)?;
            k.sum_finalize
                .on(be.stream())
                .arg(&part)
                .arg(out)
                .ints(&f)
                .launch(per_c)
        }
    })();
    be.give_scratch_f64(part);
    r
}
