//! One LSTM layer on the device (`kernels/lstm.cu`, mirroring `cpu/lstm.rs`): the input
//! projection of every step as one product, then a step kernel per time step; BPTT with a
//! step kernel and the recurrent product per step, the weight gradients over all steps at
//! once.

use cudarc::driver::CudaSlice;

use super::dense::{colsum, sgemm, Gemm};
use super::launch::{blocks, grid, int_args, kernels};
use super::CudaBackend;
use crate::engine::shapes::Lstm;
use crate::engine::{Backend, EngineError, Result};

kernels!("lstm" {
    step_fwd: "lstm_step_fwd",
    step_bwd: "lstm_step_bwd",
    shift_h: "lstm_shift_h",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.lstm.get(|| Kernels::load(be.modules()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_fwd(
    be: &CudaBackend,
    s: &Lstm,
    x: &CudaSlice<f32>,
    w_ih: &CudaSlice<f32>,
    w_hh: &CudaSlice<f32>,
    b_ih: &CudaSlice<f32>,
    b_hh: &CudaSlice<f32>,
    h_seq: &mut CudaSlice<f32>,
    c_seq: &mut CudaSlice<f32>,
    gates: &mut CudaSlice<f32>,
) -> Result<()> {
    const OP: &str = "lstm_fwd";
    let (b, t, inp, h) = (s.batch, s.seq, s.input, s.hidden);
    if b == 0 || t == 0 || h == 0 {
        return Ok(());
    }
    if h * 4 > 48 * 1024 {
        return Err(EngineError::Shape {
            op: OP,
            detail: format!("hidden size {h} exceeds the step kernel's shared memory"),
        });
    }
    int_args([s.gates_len(), s.x_len(), 4 * h * inp])?;
    // The input projection of every step at once: pre[b*t, 4h] = x . W_ih^T.
    // Scratch from the arena (nothing allocated once warm: capturable as a CUDA graph).
    let mut pre = be.take_scratch(s.gates_len())?;
    let r = (|| -> Result<()> {
        if inp == 0 {
            be.fill(&mut pre, 0.0)?;
        } else {
            sgemm(be, &Gemm::nt(b * t, 4 * h, inp), x, w_ih, &mut pre, None)?;
        }
        let mut cfg = blocks(OP, (h.div_ceil(8), b, 1), 256)?;
        cfg.shared_mem_bytes = (h * 4) as u32;
        let k = kernels(be)?;
        for step in 0..t {
            let a = int_args([b, t, h, step])?;
            // SAFETY: pre and gates hold b*t*4h values, h_seq and c_seq b*t*h, the weights and
            // biases the lengths `s` gives (checked); the kernel writes step `step` of each.
            unsafe {
                k.step_fwd
                    .on(be.stream())
                    .arg(&pre)
                    .arg(w_hh)
                    .arg(b_ih)
                    .arg(b_hh)
                    .arg(&mut *h_seq)
                    .arg(&mut *c_seq)
                    .arg(&mut *gates)
                    .ints(&a)
                    .launch(cfg)?;
            }
        }
        Ok(())
    })();
    be.give_scratch(pre);
    r
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn lstm_bwd(
    be: &CudaBackend,
    s: &Lstm,
    x: &CudaSlice<f32>,
    w_ih: &CudaSlice<f32>,
    w_hh: &CudaSlice<f32>,
    h_seq: &CudaSlice<f32>,
    c_seq: &CudaSlice<f32>,
    gates: &CudaSlice<f32>,
    dh_seq: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    dw_ih: &mut CudaSlice<f32>,
    dw_hh: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
) -> Result<()> {
    let (b, t, inp, h) = (s.batch, s.seq, s.input, s.hidden);
    int_args([s.gates_len(), s.x_len(), 4 * h * inp])?;
    if b == 0 || t == 0 || h == 0 {
        be.fill(dx, 0.0)?;
        be.fill(dw_ih, 0.0)?;
        be.fill(dw_hh, 0.0)?;
        return be.fill(db, 0.0);
    }
    let mut dgates = be.take_scratch(s.gates_len())?;
    let mut dh_rec = be.take_scratch(b * h)?;
    let mut dc = be.take_scratch(b * h)?;
    let mut hprev = be.take_scratch(s.h_len())?;
    let r = (|| -> Result<()> {
        be.fill(&mut dh_rec, 0.0)?;
        be.fill(&mut dc, 0.0)?;
        let step_cfg = blocks("lstm_bwd", ((b * h).div_ceil(256), 1, 1), 256)?;
        let k = kernels(be)?;
        // dh_{t-1}[b, h] = dgates_t[b, 4h] . W_hh[4h, h]: row r of step t is at r*T*4h + t*4h.
        let recurrent = Gemm {
            lda: t * 4 * h,
            ..Gemm::nn(b, h, 4 * h)
        };
        for step in (0..t).rev() {
            let a = int_args([b, t, h, step])?;
            // SAFETY: gates and dgates hold b*t*4h values, c_seq and dh_seq b*t*h, dh_rec and
            // dc b*h (checked / allocated so).
            unsafe {
                k.step_bwd
                    .on(be.stream())
                    .arg(gates)
                    .arg(c_seq)
                    .arg(dh_seq)
                    .arg(&dh_rec)
                    .arg(&mut dc)
                    .arg(&mut dgates)
                    .ints(&a)
                    .launch(step_cfg)?;
            }
            if step > 0 {
                let rows = dgates.slice(step * 4 * h..);
                sgemm(be, &recurrent, &rows, w_hh, &mut dh_rec, None)?;
            }
        }
        // Weight gradients over all steps at once.
        let a = int_args([b, t, h])?;
        // SAFETY: h_seq and hprev hold b*t*h values.
        unsafe {
            k.shift_h
                .on(be.stream())
                .arg(h_seq)
                .arg(&mut hprev)
                .ints(&a)
                .launch(grid(s.h_len()))?;
        }
        let rows = b * t;
        sgemm(be, &Gemm::tn(4 * h, h, rows), &dgates, &hprev, dw_hh, None)?;
        if inp > 0 {
            sgemm(be, &Gemm::tn(4 * h, inp, rows), &dgates, x, dw_ih, None)?;
            sgemm(be, &Gemm::nn(rows, inp, 4 * h), &dgates, w_ih, dx, None)?;
        }
        colsum(be, &dgates, rows, 4 * h, db)
    })();
    for buf in [dgates, dh_rec, dc, hprev] {
        be.give_scratch(buf);
    }
    r
}
