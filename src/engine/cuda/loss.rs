//! The loss on the device (`kernels/loss.cu`, mirroring `cpu/loss.rs`): mean BCE with
//! logits and its gradient, summed in f64 by one block; [`bce_with_logits_into`] leaves the
//! loss in a device buffer (no synchronisation: what a captured CUDA graph can hold).

use cudarc::driver::CudaSlice;

use super::launch::{blocks, dim, kernels};
use super::CudaBackend;
use crate::engine::shapes::check_bce;
use crate::engine::{EngineError, Result};

kernels!("loss" {
    bce: "bce_with_logits",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.loss.get(|| Kernels::load(be.modules()))
}

pub(crate) fn bce_with_logits(
    be: &CudaBackend,
    logits: &CudaSlice<f32>,
    targets: &CudaSlice<f32>,
    pos_weight: f64,
    dlogits: &mut CudaSlice<f32>,
) -> Result<f64> {
    let mut loss = be.alloc::<f64>(1)?;
    bce_with_logits_into(be, logits, targets, pos_weight, dlogits, &mut loss)?;
    let host = be.download_prefix(&loss, loss.len())?;
    host.first().copied().ok_or_else(|| EngineError::Cuda {
        op: "bce_with_logits".into(),
        msg: "empty loss download".into(),
    })
}

/// [`bce_with_logits`] with the mean loss written to `loss[0]` on the device.
pub fn bce_with_logits_into(
    be: &CudaBackend,
    logits: &CudaSlice<f32>,
    targets: &CudaSlice<f32>,
    pos_weight: f64,
    dlogits: &mut CudaSlice<f32>,
    loss: &mut CudaSlice<f64>,
) -> Result<()> {
    const OP: &str = "bce_with_logits";
    check_bce(logits.len(), targets.len(), dlogits.len())?;
    if loss.is_empty() {
        return Err(EngineError::Shape {
            op: OP,
            detail: "the loss buffer is empty".into(),
        });
    }
    let (n, pw) = (dim(logits.len())?, pos_weight as f32);
    // SAFETY: logits, targets and dlogits hold n values (checked), loss one.
    unsafe {
        kernels(be)?
            .bce
            .on(be.stream())
            .arg(logits)
            .arg(targets)
            .arg(&pw)
            .arg(dlogits)
            .arg(loss)
            .arg(&n)
            .launch(blocks(OP, (1, 1, 1), 256)?)?;
    }
    Ok(())
}
