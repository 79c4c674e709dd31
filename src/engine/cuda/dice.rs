//! The U-Net's output and loss on the device (`kernels/dice.cu`, mirroring `cpu/dice.rs`):
//! the sigmoid and its backward, and the soft Dice loss (per-channel f64 sums by partial
//! blocks, the loss and the gradient's coefficients by one thread, then the gradient), its
//! scratch from the backend's f64 arena; [`soft_dice_loss_into`] leaves the loss in a device
//! buffer (no allocation, no synchronisation: what a captured CUDA graph can hold).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, grid, int_args, kernels, map1, map2};
use super::CudaBackend;
use crate::engine::shapes::SoftDice;
use crate::engine::{EngineError, Result};

kernels!("dice" {
    sigmoid_fwd: "sigmoid_fwd",
    sigmoid_bwd: "sigmoid_bwd",
    partial: "dice_partial",
    finalize: "dice_finalize",
    grad: "dice_grad",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.dice.get(|| Kernels::load(be.modules()))
}

pub(crate) fn sigmoid_fwd(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    map1(be.stream(), "sigmoid_fwd", &kernels(be)?.sigmoid_fwd, x, y)
}

pub(crate) fn sigmoid_bwd(
    be: &CudaBackend,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    map2(
        be.stream(),
        "sigmoid_bwd",
        &kernels(be)?.sigmoid_bwd,
        y,
        dy,
        dx,
    )
}

pub(crate) fn soft_dice_loss(
    be: &CudaBackend,
    s: &SoftDice,
    probs: &CudaSlice<f32>,
    targets: &CudaSlice<f32>,
    dprobs: &mut CudaSlice<f32>,
) -> Result<f64> {
    const OP: &str = "soft_dice_loss";
    let mut out = be.take_scratch_f64(2)?;
    let r = soft_dice_loss_into(be, s, probs, targets, dprobs, &mut out, 0);
    let host = r.and_then(|()| be.download_prefix(&out, out.len()));
    be.give_scratch_f64(out);
    match host?[..] {
        [loss, z] => dice_value(loss, z),
        _ => Err(EngineError::Cuda {
            op: OP.into(),
            msg: "empty loss download".into(),
        }),
    }
}

/// The loss from what `soft_dice_loss_into` wrote: `loss`, or the error of a zero
/// denominator when `zero_den` is set.
pub fn dice_value(loss: f64, zero_den: f64) -> Result<f64> {
    if zero_den != 0.0 {
        return Err(EngineError::Shape {
            op: "soft_dice_loss",
            detail: "empty prediction and target with eps = 0: the Dice is 0/0".into(),
        });
    }
    Ok(loss)
}

/// [`soft_dice_loss`] leaving its result on the device, nothing allocated and nothing
/// waited for (capturable): the loss in `out[at]`, 1 in `out[at + 1]` when a denominator
/// is 0 (the eager form's error, [`dice_value`]) else 0, and dL/dprobs in `dprobs`. The
/// partial sums and the gradient's coefficients come from the backend's f64 scratch arena.
#[allow(clippy::too_many_arguments)]
pub fn soft_dice_loss_into(
    be: &CudaBackend,
    s: &SoftDice,
    probs: &CudaSlice<f32>,
    targets: &CudaSlice<f32>,
    dprobs: &mut CudaSlice<f32>,
    out: &mut CudaSlice<f64>,
    at: usize,
) -> Result<()> {
    const OP: &str = "soft_dice_loss";
    s.check(probs.len(), targets.len(), dprobs.len())?;
    dim(s.len())?;
    let out_len = out.len();
    let mut outv = out
        .try_slice_mut(at..at + 2)
        .ok_or_else(|| EngineError::Shape {
            op: OP,
            detail: format!("the loss goes to {at}..{} of a buffer of {out_len}", at + 2),
        })?;
    let (split, chunk) = be.reduce_split(s.n * s.hw, s.c);
    let red = blocks(OP, (split, s.c, 1), 256)?;
    let sizes = int_args([s.n, s.c, s.hw, chunk, split, s.len()])?;
    let k = kernels(be)?;
    let mut part_i = be.take_scratch_f64(s.c * split)?;
    let mut part_t = be.take_scratch_f64(s.c * split)?;
    let mut coef = be.take_scratch_f64(2 * s.c)?;
    let st = be.stream();
    let eps = s.eps;
    let [n, c, hw, chunk, split, total] = sizes;
    let r = (|| -> Result<()> {
        // SAFETY: probs, targets and dprobs hold n*c*hw values (checked); the partial sums one
        // per (channel, split), `coef` two per channel, `outv` two values.
        unsafe {
            k.partial
                .on(st)
                .arg(probs)
                .arg(targets)
                .arg(&mut part_i)
                .arg(&mut part_t)
                .ints(&[n, c, hw, chunk])
                .launch(red)?;
            k.finalize
                .on(st)
                .arg(&part_i)
                .arg(&part_t)
                .arg(&mut coef)
                .arg(&mut outv)
                .ints(&[c, split])
                .arg(&eps)
                .launch(blocks(OP, (1, 1, 1), 1)?)?;
            if !s.is_empty() {
                k.grad
                    .on(st)
                    .arg(targets)
                    .arg(&coef)
                    .arg(dprobs)
                    .ints(&[total, c, hw])
                    .launch(grid(s.len()))?;
            }
        }
        Ok(())
    })();
    be.give_scratch_f64(part_i);
    be.give_scratch_f64(part_t);
    be.give_scratch_f64(coef);
    r
}
