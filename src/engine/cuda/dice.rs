//! The U-Net's output and loss on the device (`kernels/dice.cu`, mirroring `cpu/dice.rs`):
//! the sigmoid and its backward, and the soft Dice loss (per-channel f64 sums by partial
//! blocks, the loss and the gradient's coefficients by one thread, then the gradient).

use cudarc::driver::CudaSlice;

use super::device::cuda;
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
    dim(s.len())?;
    let (split, chunk) = be.reduce_split(s.n * s.hw, s.c);
    let red = blocks(OP, (split, s.c, 1), 256)?;
    let mut part_i = be.alloc::<f64>(s.c * split)?;
    let mut part_t = be.alloc::<f64>(s.c * split)?;
    let mut coef = be.alloc::<f64>(2 * s.c)?;
    let mut out = be.alloc::<f64>(2)?;
    let k = kernels(be)?;
    let st = be.stream();
    let eps = s.eps;
    let sizes = int_args([s.n, s.c, s.hw, chunk, split, s.len()])?;
    let [n, c, hw, chunk, split, total] = sizes;
    // SAFETY: probs, targets and dprobs hold n*c*hw values (checked); the partial sums one
    // per (channel, split), `coef` two per channel, `out` two values.
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
            .arg(&mut out)
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
    let host = st.clone_dtoh(&out).map_err(|e| cuda("download loss", e))?;
    match host[..] {
        [_, z, ..] if z != 0.0 => Err(EngineError::Shape {
            op: OP,
            detail: "empty prediction and target with eps = 0: the Dice is 0/0".into(),
        }),
        [loss, ..] => Ok(loss),
        _ => Err(EngineError::Cuda {
            op: OP.into(),
            msg: "empty loss download".into(),
        }),
    }
}
