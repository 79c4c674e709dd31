//! One LSTM layer over a whole batch-first sequence from a zero state, and its
//! backpropagation through time. PyTorch's layout and gate order (i, f, g, o), both biases
//! added. The input projection of every step is one GEMM up front (and the input and weight
//! gradients one GEMM each at the end), so only the recurrent `h W_hh^T` runs step by step.

use super::dense::column_sums;
use super::gemm::{matmul, Mat, MatMut, Par};
use crate::engine::shapes::Lstm;
use crate::engine::{Real, Result};

fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// Forward; see [`crate::engine::Backend::lstm_fwd`].
#[allow(clippy::too_many_arguments)]
pub fn lstm_fwd<T: Real>(
    s: &Lstm,
    x: &[T],
    w_ih: &[T],
    w_hh: &[T],
    b_ih: &[T],
    b_hh: &[T],
    h_seq: &mut [T],
    c_seq: &mut [T],
    gates: &mut [T],
) -> Result<()> {
    let (b, t_len, h) = (s.batch, s.seq, s.hidden);
    let g4 = 4 * h;
    if b * t_len * h == 0 {
        return Ok(());
    }
    // Pre-activations of all steps: bias + x W_ih^T.
    for row in gates.chunks_mut(g4) {
        for ((o, bi), bh) in row.iter_mut().zip(b_ih).zip(b_hh) {
            *o = *bi + *bh;
        }
    }
    matmul(
        MatMut::new(gates, b * t_len, g4),
        Mat::new(x, b * t_len, s.input),
        Mat::new(w_ih, g4, s.input).t(),
        true,
        Par::Rayon,
    )?;
    let w_hh_t = Mat::new(w_hh, g4, h).t();
    for t in 0..t_len {
        if t > 0 {
            // Rows of step t across the batch are strided by seq*4h (batch-first layout).
            let dst = MatMut::strided(&mut gates[t * g4..], b, g4, t_len * g4, 1);
            let hp = Mat::strided(&h_seq[(t - 1) * h..], b, h, t_len * h, 1);
            matmul(dst, hp, w_hh_t, true, Par::Rayon)?;
        }
        for bi in 0..b {
            let r = bi * t_len + t;
            let gr = &mut gates[r * g4..(r + 1) * g4];
            for j in 0..h {
                let i = sigmoid(gr[j]);
                let f = sigmoid(gr[h + j]);
                let g = gr[2 * h + j].tanh();
                let o = sigmoid(gr[3 * h + j]);
                gr[j] = i;
                gr[h + j] = f;
                gr[2 * h + j] = g;
                gr[3 * h + j] = o;
                let c_prev = if t > 0 {
                    c_seq[(r - 1) * h + j]
                } else {
                    T::zero()
                };
                let c = f * c_prev + i * g;
                c_seq[r * h + j] = c;
                h_seq[r * h + j] = o * c.tanh();
            }
        }
    }
    Ok(())
}

/// Backpropagation through time; see [`crate::engine::Backend::lstm_bwd`].
#[allow(clippy::too_many_arguments)]
pub fn lstm_bwd<T: Real>(
    s: &Lstm,
    x: &[T],
    w_ih: &[T],
    w_hh: &[T],
    h_seq: &[T],
    c_seq: &[T],
    gates: &[T],
    dh_seq: &[T],
    dx: &mut [T],
    dw_ih: &mut [T],
    dw_hh: &mut [T],
    db: &mut [T],
) -> Result<()> {
    let (b, t_len, h) = (s.batch, s.seq, s.hidden);
    let g4 = 4 * h;
    dx.fill(T::zero());
    dw_ih.fill(T::zero());
    dw_hh.fill(T::zero());
    db.fill(T::zero());
    if b * t_len * h == 0 {
        return Ok(());
    }
    // Gradients of the gate pre-activations, [batch, seq, 4h].
    let mut dgates = vec![T::zero(); s.gates_len()];
    let mut dh_next = vec![T::zero(); b * h];
    let mut dc_next = vec![T::zero(); b * h];
    let one = T::one();
    for t in (0..t_len).rev() {
        for bi in 0..b {
            let r = bi * t_len + t;
            let gr = &gates[r * g4..(r + 1) * g4];
            let dg = &mut dgates[r * g4..(r + 1) * g4];
            for j in 0..h {
                let (i, f, g, o) = (gr[j], gr[h + j], gr[2 * h + j], gr[3 * h + j]);
                let dh = dh_seq[r * h + j] + dh_next[bi * h + j];
                let c = c_seq[r * h + j];
                let c_prev = if t > 0 {
                    c_seq[(r - 1) * h + j]
                } else {
                    T::zero()
                };
                let tc = c.tanh();
                let dc = dc_next[bi * h + j] + dh * o * (one - tc * tc);
                dc_next[bi * h + j] = dc * f;
                dg[j] = dc * g * i * (one - i);
                dg[h + j] = dc * c_prev * f * (one - f);
                dg[2 * h + j] = dc * i * (one - g * g);
                dg[3 * h + j] = dh * tc * o * (one - o);
            }
        }
        if t > 0 {
            let dgt = Mat::strided(&dgates[t * g4..], b, g4, t_len * g4, 1);
            matmul(
                MatMut::new(&mut dh_next, b, h),
                dgt,
                Mat::new(w_hh, g4, h),
                false,
                Par::Rayon,
            )?;
        }
    }
    let rows = b * t_len;
    matmul(
        MatMut::new(dx, rows, s.input),
        Mat::new(&dgates, rows, g4),
        Mat::new(w_ih, g4, s.input),
        false,
        Par::Rayon,
    )?;
    matmul(
        MatMut::new(dw_ih, g4, s.input),
        Mat::new(&dgates, rows, g4).t(),
        Mat::new(x, rows, s.input),
        false,
        Par::Rayon,
    )?;
    if t_len > 1 {
        for bi in 0..b {
            // Step t's gate gradients meet h of step t-1.
            let dgb = Mat::new(
                &dgates[(bi * t_len + 1) * g4..(bi + 1) * t_len * g4],
                t_len - 1,
                g4,
            );
            let hb = Mat::new(
                &h_seq[bi * t_len * h..((bi + 1) * t_len - 1) * h],
                t_len - 1,
                h,
            );
            matmul(MatMut::new(dw_hh, g4, h), dgb.t(), hb, true, Par::Rayon)?;
        }
    }
    column_sums(&dgates, rows, g4, db);
    Ok(())
}
