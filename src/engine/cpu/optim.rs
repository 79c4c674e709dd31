//! Parameter updates exactly as PyTorch's `torch.optim.SGD` (momentum, L2 weight decay,
//! no dampening, no Nesterov; the buffer starts as the first gradient) and
//! `torch.optim.Adam` (L2 weight decay added to the gradient, bias-corrected moments,
//! `eps` added after the square root).

use rayon::prelude::*;

use crate::engine::shapes::{check_adam, check_sgd};
use crate::engine::{Real, Result};

const CHUNK: usize = 1 << 14;

/// g' = g + wd*p; m = momentum*m + g' (m = g' when `first_step`); p -= lr*m.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    lr: f64,
    momentum: f64,
    weight_decay: f64,
    first_step: bool,
) -> Result<()> {
    check_sgd(p.len(), g.len(), m.len())?;
    let (lr, mom, wd) = (
        T::from_f64_lossy(lr),
        T::from_f64_lossy(momentum),
        T::from_f64_lossy(weight_decay),
    );
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((pc, mc), gc)| sgd_chunk(pc, mc, gc, [lr, mom, wd], first_step));
    Ok(())
}

#[inline(always)]
fn sgd_chunk_body<T: Real>(pc: &mut [T], mc: &mut [T], gc: &[T], k: [T; 3], first_step: bool) {
    let [lr, mom, wd] = k;
    for ((pv, mv), gv) in pc.iter_mut().zip(mc.iter_mut()).zip(gc) {
        let d = *gv + wd * *pv;
        *mv = if first_step { d } else { mom * *mv + d };
        *pv = *pv - lr * *mv;
    }
}
crate::multiversion!(sgd_chunk, sgd_chunk_body, <T: Real>, (
    pc: &mut [T], mc: &mut [T], gc: &[T], k: [T; 3], first_step: bool
));

/// One Adam step; `step` counts from 1.
#[allow(clippy::too_many_arguments)]
pub fn adam_step<T: Real>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    step: u64,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    check_adam(p.len(), g.len(), m.len(), v.len(), step)?;
    let t = step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - beta1.powi(t);
    let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let step_size = T::from_f64_lossy(lr / bc1);
    let bc2_sqrt = T::from_f64_lossy(bc2_sqrt);
    let (b1, b2) = (T::from_f64_lossy(beta1), T::from_f64_lossy(beta2));
    let (eps, wd) = (T::from_f64_lossy(eps), T::from_f64_lossy(weight_decay));
    let one = T::one();
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((pc, mc), vc), gc)| {
            for (((pv, mv), vv), gv) in pc.iter_mut().zip(mc.iter_mut()).zip(vc.iter_mut()).zip(gc)
            {
                let d = *gv + wd * *pv;
                *mv = b1 * *mv + (one - b1) * d;
                *vv = b2 * *vv + (one - b2) * d * d;
                let denom = vv.sqrt() / bc2_sqrt + eps;
                *pv = *pv - step_size * *mv / denom;
            }
        });
    Ok(())
}
