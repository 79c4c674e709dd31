//! The loss on the device (`kernels/loss.cu`, mirroring `cpu/loss.rs`): mean BCE with
//! logits and its gradient, summed in f64 by one block.

use cudarc::driver::CudaSlice;

use super::device::cuda;
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
    const OP: &str = "bce_with_logits";
    check_bce(logits.len(), targets.len(), dlogits.len())?;
    let mut loss = be.alloc::<f64>(1)?;
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
            .arg(&mut loss)
            .arg(&n)
            .launch(blocks(OP, (1, 1, 1), 256)?)?;
    }
    let host = be
        .stream()
        .clone_dtoh(&loss)
        .map_err(|e| cuda("download loss", e))?;
    host.first().copied().ok_or_else(|| EngineError::Cuda {
        op: OP.into(),
        msg: "empty loss download".into(),
    })
}
