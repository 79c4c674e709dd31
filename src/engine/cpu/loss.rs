//! Mean binary cross-entropy with logits, PyTorch's `BCEWithLogitsLoss(pos_weight=pw)`:
//! `loss_i = -(pw * y * log σ(x) + (1 - y) * log(1 - σ(x)))`, averaged over all elements,
//! computed through a stable softplus (never `log(σ)` directly) and accumulated in f64.

use crate::engine::shapes::check_bce;
use crate::engine::{Real, Result};

/// log(1 + e^x) without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Returns the mean loss and writes dL/dlogits.
pub fn bce_with_logits<T: Real>(
    logits: &[T],
    targets: &[T],
    pos_weight: f64,
    dlogits: &mut [T],
) -> Result<f64> {
    check_bce(logits.len(), targets.len(), dlogits.len())?;
    let inv_n = 1.0 / logits.len() as f64;
    let pw = pos_weight;
    let mut total = 0.0;
    for ((x, y), d) in logits.iter().zip(targets).zip(dlogits.iter_mut()) {
        let (x, y) = (x.as_f64(), y.as_f64());
        // -log σ(x) = softplus(-x); -log(1 - σ(x)) = softplus(x).
        total += pw * y * softplus(-x) + (1.0 - y) * softplus(x);
        let s = sigmoid(x);
        *d = T::from_f64_lossy((pw * y * (s - 1.0) + (1.0 - y) * s) * inv_n);
    }
    Ok(total * inv_n)
}
