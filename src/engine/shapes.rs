//! Shape descriptors of the ops: plain numbers, shared by every backend, with the checks
//! of the buffers' lengths (written once, here; called once, by the [`super::Backend`]
//! trait's methods, before a backend's implementation touches a buffer).

use super::{check_len, EngineError, Result};

/// 2-D convolution without bias. x `[n, c_in, h, w]`, weight `[c_out, c_in, kh, kw]`,
/// y `[n, c_out, out_h, out_w]`, all contiguous row-major (NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.c_out * self.c_in * self.kh * self.kw
    }
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w()
    }
    /// Multiply-adds of the forward pass (the same count for each backward pass).
    pub fn macs(&self) -> usize {
        self.y_len() * self.c_in * self.kh * self.kw
    }
}

/// Max pooling (the stem's 3x3 stride 2 pad 1, but any k/stride/pad). Padding is -inf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pool2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Pool2d {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn y_len(&self) -> usize {
        self.n * self.c * self.out_h() * self.out_w()
    }
}

/// Batch norm over x `[n, c, hw]` (statistics per channel over n and hw).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNorm2d {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f64,
    /// PyTorch's momentum: running = (1 - momentum) * running + momentum * batch.
    pub momentum: f64,
}

impl BatchNorm2d {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One unidirectional LSTM layer, batch_first: x `[batch, seq, input]` -> h `[batch, seq, hidden]`.
/// PyTorch's gate order i, f, g, o; `w_ih [4*hidden, input]`, `w_hh [4*hidden, hidden]`,
/// `b_ih [4*hidden]`, `b_hh [4*hidden]`; zero initial state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lstm {
    pub batch: usize,
    pub seq: usize,
    pub input: usize,
    pub hidden: usize,
}

impl Lstm {
    pub fn x_len(&self) -> usize {
        self.batch * self.seq * self.input
    }
    pub fn h_len(&self) -> usize {
        self.batch * self.seq * self.hidden
    }
    pub fn gates_len(&self) -> usize {
        self.batch * self.seq * 4 * self.hidden
    }
}

/// Transposed convolution whose kernel equals its stride (PyTorch's
/// `ConvTranspose2d(c_in, c_out, k, stride=k)`, the U-Net's 2x2/2 up-convolution), with bias.
/// x `[n, c_in, h, w]`, weight `[c_in, c_out, k, k]` (PyTorch's layout), bias `[c_out]`; the
/// output `[n, c_out, k*h, k*w]` is channels `y_offset..y_offset + c_out` of a wider buffer
/// y `[n, y_channels, k*h, k*w]` (the U-Net writes it straight into its concatenation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpConv2d {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub k: usize,
    pub y_channels: usize,
    pub y_offset: usize,
}

impl UpConv2d {
    pub fn out_h(&self) -> usize {
        self.k * self.h
    }
    pub fn out_w(&self) -> usize {
        self.k * self.w
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.c_in * self.c_out * self.k * self.k
    }
    /// Length of the whole (wider) output buffer.
    pub fn y_len(&self) -> usize {
        self.n * self.y_channels * self.out_h() * self.out_w()
    }
}

/// `c` channels copied between two `[n, *, hw]` buffers: channels `src_offset..` of a
/// `src_channels`-channel source into channels `dst_offset..` of a `dst_channels`-channel
/// destination (the U-Net's skip concatenation, and its split in the backward pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelCopy {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub src_channels: usize,
    pub src_offset: usize,
    pub dst_channels: usize,
    pub dst_offset: usize,
}

impl ChannelCopy {
    pub fn src_len(&self) -> usize {
        self.n * self.src_channels * self.hw
    }
    pub fn dst_len(&self) -> usize {
        self.n * self.dst_channels * self.hw
    }
}

/// A change of layout of `n` images of `c` channel maps of `hw` pixels between
/// channels-first `[n, c, hw]` (NCHW) and channels-last `[n, hw, c]` (NHWC): per image a
/// `c x hw` matrix transposed (`nchw_to_nhwc`) or the other way (`nhwc_to_nchw`). Source and
/// destination hold `n * c * hw` values each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transpose {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl Transpose {
    /// Values of either side; None when `n * c * hw` overflows.
    pub fn len(&self) -> Option<usize> {
        self.n.checked_mul(self.c)?.checked_mul(self.hw)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }
}

/// The soft Dice loss over probabilities `[n, c, hw]`:
/// `1 - mean_c(2 * sum(p * t) / (sum(p + t) + eps))`, sums over the batch and the pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftDice {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f64,
}

impl SoftDice {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---- validation ---------------------------------------------------------------------------
//
// Every op's shape and length checks, written once here and called by both backends before
// they touch a buffer. Lengths are passed as numbers so that any backend's buffers fit.

/// Checks `(what, got, want)` buffer lengths in order; the first mismatch is the error.
pub fn check_lens(op: &'static str, lens: &[(&str, usize, usize)]) -> Result<()> {
    for &(what, got, want) in lens {
        check_len(op, what, got, want)?;
    }
    Ok(())
}

fn bad<T>(op: &'static str, detail: String) -> Result<T> {
    Err(EngineError::Shape { op, detail })
}

impl Conv2d {
    /// Rejects shapes for which the output size is undefined (the formulas would underflow).
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.stride == 0 {
            return bad(op, "stride must be at least 1".into());
        }
        if self.kh == 0 || self.kw == 0 {
            return bad(op, "kernel size must be at least 1".into());
        }
        if self.kh > self.h + 2 * self.pad || self.kw > self.w + 2 * self.pad {
            return bad(
                op,
                format!(
                    "kernel {}x{} larger than the padded input {}x{}",
                    self.kh,
                    self.kw,
                    self.h + 2 * self.pad,
                    self.w + 2 * self.pad
                ),
            );
        }
        Ok(())
    }
    /// `conv2d_fwd`: x, w, y.
    pub fn check_fwd(&self, x: usize, w: usize, y: usize) -> Result<()> {
        const OP: &str = "conv2d_fwd";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("x", x, self.x_len()),
                ("w", w, self.w_len()),
                ("y", y, self.y_len()),
            ],
        )
    }
    /// `conv2d_bwd_data`: dy, w, dx.
    pub fn check_bwd_data(&self, dy: usize, w: usize, dx: usize) -> Result<()> {
        const OP: &str = "conv2d_bwd_data";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("dy", dy, self.y_len()),
                ("w", w, self.w_len()),
                ("dx", dx, self.x_len()),
            ],
        )
    }
    /// `conv2d_bwd_weight`: x, dy, dw.
    pub fn check_bwd_weight(&self, x: usize, dy: usize, dw: usize) -> Result<()> {
        const OP: &str = "conv2d_bwd_weight";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("x", x, self.x_len()),
                ("dy", dy, self.y_len()),
                ("dw", dw, self.w_len()),
            ],
        )
    }
}

impl Pool2d {
    /// Rejects windows PyTorch refuses: a window must never lie entirely in the padding.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.k == 0 || self.stride == 0 {
            return bad(op, "kernel and stride must be at least 1".into());
        }
        if 2 * self.pad > self.k {
            return bad(
                op,
                format!("padding {} exceeds half the kernel {}", self.pad, self.k),
            );
        }
        if self.k > self.h + 2 * self.pad || self.k > self.w + 2 * self.pad {
            return bad(
                op,
                format!(
                    "kernel {} larger than the padded input {}x{}",
                    self.k,
                    self.h + 2 * self.pad,
                    self.w + 2 * self.pad
                ),
            );
        }
        Ok(())
    }
    /// `maxpool2d_fwd`: x, y.
    pub fn check_fwd(&self, x: usize, y: usize) -> Result<()> {
        const OP: &str = "maxpool2d_fwd";
        self.check(OP)?;
        check_lens(OP, &[("x", x, self.x_len()), ("y", y, self.y_len())])
    }
    /// `maxpool2d_bwd`: x, y, dy, dx.
    pub fn check_bwd(&self, x: usize, y: usize, dy: usize, dx: usize) -> Result<()> {
        const OP: &str = "maxpool2d_bwd";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("x", x, self.x_len()),
                ("y", y, self.y_len()),
                ("dy", dy, self.y_len()),
                ("dx", dx, self.x_len()),
            ],
        )
    }
}

/// Global average pooling of `rows` rows of `hw` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowMean {
    pub rows: usize,
    pub hw: usize,
}

impl RowMean {
    fn check_hw(&self, op: &'static str) -> Result<()> {
        if self.hw == 0 {
            return bad(op, "cannot average over hw = 0".into());
        }
        Ok(())
    }
    /// `global_avg_pool_fwd`: x `[rows, hw]`, y `[rows]`.
    pub fn check_fwd(&self, x: usize, y: usize) -> Result<()> {
        const OP: &str = "global_avg_pool_fwd";
        check_lens(OP, &[("x", x, self.rows * self.hw), ("y", y, self.rows)])?;
        self.check_hw(OP)
    }
    /// `global_avg_pool_bwd`: dy `[rows]`, dx `[rows, hw]`.
    pub fn check_bwd(&self, dy: usize, dx: usize) -> Result<()> {
        const OP: &str = "global_avg_pool_bwd";
        check_lens(
            OP,
            &[("dy", dy, self.rows), ("dx", dx, self.rows * self.hw)],
        )?;
        self.check_hw(OP)
    }
}

impl BatchNorm2d {
    /// `conv2d_bn_eval_fwd` / `conv2d_bn_train_fwd` (`op`, for the message): this batch norm
    /// on the output of `conv` (the same images, channels and pixels), its four per-channel
    /// buffers (gamma, beta, running mean and variance) and the residual, when there is one,
    /// of the convolution's output length.
    pub fn check_after_conv(
        &self,
        op: &'static str,
        conv: &Conv2d,
        per_channel: [usize; 4],
        residual: Option<usize>,
    ) -> Result<()> {
        if self.n != conv.n || self.c != conv.c_out || self.hw != conv.out_h() * conv.out_w() {
            return bad(
                op,
                format!("batch norm {self:?} does not fit the convolution {conv:?}"),
            );
        }
        let [gamma, beta, mean, var] = per_channel;
        self.check_params(
            op,
            &[
                ("gamma", gamma),
                ("beta", beta),
                ("running_mean", mean),
                ("running_var", var),
            ],
        )?;
        if let Some(r) = residual {
            check_lens(op, &[("residual", r, conv.y_len())])?;
        }
        Ok(())
    }
    pub fn check_params(&self, op: &'static str, per_channel: &[(&str, usize)]) -> Result<()> {
        for &(what, got) in per_channel {
            check_len(op, what, got, self.c)?;
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return bad(op, format!("eps must be positive, got {}", self.eps));
        }
        Ok(())
    }
    /// `batchnorm_train_fwd`: x, y, then gamma, beta, running mean and variance, saved mean
    /// and inverse std (one per channel); more than one value per channel.
    #[allow(clippy::too_many_arguments)]
    pub fn check_train_fwd(
        &self,
        x: usize,
        y: usize,
        gamma: usize,
        beta: usize,
        running_mean: usize,
        running_var: usize,
        save_mean: usize,
        save_invstd: usize,
    ) -> Result<()> {
        const OP: &str = "batchnorm_train_fwd";
        check_lens(OP, &[("x", x, self.len()), ("y", y, self.len())])?;
        self.check_params(
            OP,
            &[
                ("gamma", gamma),
                ("beta", beta),
                ("running_mean", running_mean),
                ("running_var", running_var),
                ("save_mean", save_mean),
                ("save_invstd", save_invstd),
            ],
        )?;
        let count = self.n * self.hw;
        if count < 2 {
            return bad(
                OP,
                format!("training needs more than one value per channel, got n*hw = {count}"),
            );
        }
        Ok(())
    }
    /// `batchnorm_eval_fwd`: x, y, then gamma, beta, running mean and variance.
    pub fn check_eval_fwd(
        &self,
        x: usize,
        y: usize,
        gamma: usize,
        beta: usize,
        running_mean: usize,
        running_var: usize,
    ) -> Result<()> {
        const OP: &str = "batchnorm_eval_fwd";
        check_lens(OP, &[("x", x, self.len()), ("y", y, self.len())])?;
        self.check_params(
            OP,
            &[
                ("gamma", gamma),
                ("beta", beta),
                ("running_mean", running_mean),
                ("running_var", running_var),
            ],
        )
    }
    /// `batchnorm_bwd`: x, y, dy, dx, then gamma, saved mean and inverse std, dgamma, dbeta.
    #[allow(clippy::too_many_arguments)]
    pub fn check_bwd(
        &self,
        x: usize,
        y: usize,
        dy: usize,
        dx: usize,
        gamma: usize,
        save_mean: usize,
        save_invstd: usize,
        dgamma: usize,
        dbeta: usize,
    ) -> Result<()> {
        const OP: &str = "batchnorm_bwd";
        let n = self.len();
        check_lens(
            OP,
            &[("x", x, n), ("y", y, n), ("dy", dy, n), ("dx", dx, n)],
        )?;
        self.check_params(
            OP,
            &[
                ("gamma", gamma),
                ("save_mean", save_mean),
                ("save_invstd", save_invstd),
                ("dgamma", dgamma),
                ("dbeta", dbeta),
            ],
        )
    }
}

/// A fully connected layer: x `[m, k]`, weight `[n, k]`, bias `[n]`, y `[m, n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Linear {
    /// `linear_fwd`: x, w, b (when given), y.
    pub fn check_fwd(&self, x: usize, w: usize, b: Option<usize>, y: usize) -> Result<()> {
        const OP: &str = "linear_fwd";
        let Linear { m, k, n } = *self;
        check_lens(OP, &[("x", x, m * k), ("w", w, n * k), ("y", y, m * n)])?;
        match b {
            Some(b) => check_len(OP, "b", b, n),
            None => Ok(()),
        }
    }
    /// `linear_bwd`: x, w, dy, dw, then dx and db when given.
    #[allow(clippy::too_many_arguments)]
    pub fn check_bwd(
        &self,
        x: usize,
        w: usize,
        dy: usize,
        dx: Option<usize>,
        dw: usize,
        db: Option<usize>,
    ) -> Result<()> {
        const OP: &str = "linear_bwd";
        let Linear { m, k, n } = *self;
        check_lens(
            OP,
            &[
                ("x", x, m * k),
                ("w", w, n * k),
                ("dy", dy, m * n),
                ("dw", dw, n * k),
            ],
        )?;
        if let Some(dx) = dx {
            check_len(OP, "dx", dx, m * k)?;
        }
        if let Some(db) = db {
            check_len(OP, "db", db, n)?;
        }
        Ok(())
    }
}

impl Lstm {
    /// `lstm_fwd`: x, w_ih, w_hh, b_ih, b_hh, h_seq, c_seq, gates.
    #[allow(clippy::too_many_arguments)]
    pub fn check_fwd(
        &self,
        x: usize,
        w_ih: usize,
        w_hh: usize,
        b_ih: usize,
        b_hh: usize,
        h_seq: usize,
        c_seq: usize,
        gates: usize,
    ) -> Result<()> {
        let g4 = 4 * self.hidden;
        check_lens(
            "lstm_fwd",
            &[
                ("x", x, self.x_len()),
                ("w_ih", w_ih, g4 * self.input),
                ("w_hh", w_hh, g4 * self.hidden),
                ("b_ih", b_ih, g4),
                ("b_hh", b_hh, g4),
                ("h_seq", h_seq, self.h_len()),
                ("c_seq", c_seq, self.h_len()),
                ("gates", gates, self.gates_len()),
            ],
        )
    }
    /// `lstm_bwd`: x, w_ih, w_hh, h_seq, c_seq, gates, dh_seq, dx, dw_ih, dw_hh, db.
    #[allow(clippy::too_many_arguments)]
    pub fn check_bwd(
        &self,
        x: usize,
        w_ih: usize,
        w_hh: usize,
        h_seq: usize,
        c_seq: usize,
        gates: usize,
        dh_seq: usize,
        dx: usize,
        dw_ih: usize,
        dw_hh: usize,
        db: usize,
    ) -> Result<()> {
        let g4 = 4 * self.hidden;
        check_lens(
            "lstm_bwd",
            &[
                ("x", x, self.x_len()),
                ("w_ih", w_ih, g4 * self.input),
                ("w_hh", w_hh, g4 * self.hidden),
                ("h_seq", h_seq, self.h_len()),
                ("c_seq", c_seq, self.h_len()),
                ("gates", gates, self.gates_len()),
                ("dh_seq", dh_seq, self.h_len()),
                ("dx", dx, self.x_len()),
                ("dw_ih", dw_ih, g4 * self.input),
                ("dw_hh", dw_hh, g4 * self.hidden),
                ("db", db, g4),
            ],
        )
    }
}

/// `n` images of `c` channel maps of `hw` values each: the CAM ops' features and the
/// bias ops' activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Maps {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
}

impl Maps {
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `cam_weight`: features `[n, c, hw]`, weights `[c]`, cam `[n, hw]`.
    pub fn check_cam_weight(&self, features: usize, weights: usize, cam: usize) -> Result<()> {
        check_lens(
            "cam_weight",
            &[
                ("features", features, self.len()),
                ("weights", weights, self.c),
                ("cam", cam, self.n * self.hw),
            ],
        )
    }
    /// `gradcam`: features and grads `[n, c, hw]`, out `[n, hw]`.
    pub fn check_gradcam(&self, features: usize, grads: usize, out: usize) -> Result<()> {
        check_lens(
            "gradcam",
            &[
                ("features", features, self.len()),
                ("grads", grads, self.len()),
                ("out", out, self.n * self.hw),
            ],
        )
    }
    /// `bias_relu_assign`: b `[c]`, y `[n, c, hw]`.
    pub fn check_bias(&self, b: usize, y: usize) -> Result<()> {
        check_lens(
            "bias_relu_assign",
            &[("b", b, self.c), ("y", y, self.len())],
        )
    }
    /// `bias_bwd`: dy `[n, c, hw]`, db `[c]`.
    pub fn check_bias_bwd(&self, dy: usize, db: usize) -> Result<()> {
        check_lens("bias_bwd", &[("dy", dy, self.len()), ("db", db, self.c)])
    }
}

/// A bilinear resize of `n` maps from `h x w` to `oh x ow` (PyTorch's `align_corners=False`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resize {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Resize {
    /// Whether there is anything to write.
    pub fn has_output(&self) -> bool {
        self.n * self.oh * self.ow != 0
    }
    /// `upsample_bilinear`: x `[n, h, w]`, y `[n, oh, ow]`; an empty map cannot be resized
    /// to a non-empty one.
    pub fn check(&self, x: usize, y: usize) -> Result<()> {
        const OP: &str = "upsample_bilinear";
        let Resize { n, h, w, oh, ow } = *self;
        check_lens(OP, &[("x", x, n * h * w), ("y", y, n * oh * ow)])?;
        if self.has_output() && (h == 0 || w == 0) {
            return bad(
                OP,
                format!("cannot resize an empty {h}x{w} map to {oh}x{ow}"),
            );
        }
        Ok(())
    }
}

/// `minmax_normalize`: x and y `[n, len]`.
pub fn check_minmax(n: usize, len: usize, x: usize, y: usize) -> Result<()> {
    check_lens("minmax_normalize", &[("x", x, n * len), ("y", y, n * len)])
}

/// `bce_with_logits`: targets and dlogits as long as the logits, at least one.
pub fn check_bce(logits: usize, targets: usize, dlogits: usize) -> Result<()> {
    const OP: &str = "bce_with_logits";
    check_lens(
        OP,
        &[("targets", targets, logits), ("dlogits", dlogits, logits)],
    )?;
    if logits == 0 {
        return bad(OP, "no logits: the mean of nothing is undefined".into());
    }
    Ok(())
}

/// `sgd_step`: g and m as long as p.
pub fn check_sgd(p: usize, g: usize, m: usize) -> Result<()> {
    check_lens("sgd_step", &[("g", g, p), ("m", m, p)])
}

/// `adam_step`: g, m and v as long as p; steps count from 1.
pub fn check_adam(p: usize, g: usize, m: usize, v: usize, step: u64) -> Result<()> {
    const OP: &str = "adam_step";
    check_lens(OP, &[("g", g, p), ("m", m, p), ("v", v, p)])?;
    if step == 0 {
        return bad(OP, "step counts from 1".into());
    }
    Ok(())
}

impl UpConv2d {
    /// Rejects shapes the op cannot hold.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if self.k == 0 {
            return bad(op, "kernel size must be at least 1".into());
        }
        if self
            .y_offset
            .checked_add(self.c_out)
            .is_none_or(|e| e > self.y_channels)
        {
            return bad(
                op,
                format!(
                    "{} output channels at offset {} do not fit {} channels",
                    self.c_out, self.y_offset, self.y_channels
                ),
            );
        }
        Ok(())
    }
    /// `upconv2d_fwd`: x, w, b, y.
    pub fn check_fwd(&self, x: usize, w: usize, b: usize, y: usize) -> Result<()> {
        const OP: &str = "upconv2d_fwd";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("x", x, self.x_len()),
                ("w", w, self.w_len()),
                ("b", b, self.c_out),
                ("y", y, self.y_len()),
            ],
        )
    }
    /// `upconv2d_bwd`: x, w, dy, dx, dw, db.
    #[allow(clippy::too_many_arguments)]
    pub fn check_bwd(
        &self,
        x: usize,
        w: usize,
        dy: usize,
        dx: usize,
        dw: usize,
        db: usize,
    ) -> Result<()> {
        const OP: &str = "upconv2d_bwd";
        self.check(OP)?;
        check_lens(
            OP,
            &[
                ("x", x, self.x_len()),
                ("w", w, self.w_len()),
                ("dy", dy, self.y_len()),
                ("dx", dx, self.x_len()),
                ("dw", dw, self.w_len()),
                ("db", db, self.c_out),
            ],
        )
    }
}

impl ChannelCopy {
    /// `copy_channels`: the slices fit their buffers; src, dst.
    pub fn check(&self, src: usize, dst: usize) -> Result<()> {
        const OP: &str = "copy_channels";
        let fits = |off: usize, total: usize| off.checked_add(self.c).is_some_and(|e| e <= total);
        if !fits(self.src_offset, self.src_channels) || !fits(self.dst_offset, self.dst_channels) {
            return bad(
                OP,
                format!(
                    "{} channels from {} of {} into {} of {}: a slice past the end",
                    self.c, self.src_offset, self.src_channels, self.dst_offset, self.dst_channels
                ),
            );
        }
        check_lens(
            OP,
            &[("src", src, self.src_len()), ("dst", dst, self.dst_len())],
        )
    }
}

impl Transpose {
    /// `nchw_to_nhwc` / `nhwc_to_nchw` (`op`): x and y of `n * c * hw` values each.
    pub fn check(&self, op: &'static str, x: usize, y: usize) -> Result<()> {
        let len = self.values(op)?;
        check_lens(op, &[("x", x, len), ("y", y, len)])
    }
    /// Values of either side, an error of `op` when they overflow.
    pub fn values(&self, op: &'static str) -> Result<usize> {
        self.len().map_or_else(
            || {
                bad(
                    op,
                    format!("{} x {} x {} values overflow", self.n, self.c, self.hw),
                )
            },
            Ok,
        )
    }
}

impl SoftDice {
    /// `soft_dice_loss`: probs, targets, dprobs; at least one channel, eps finite and not
    /// negative.
    pub fn check(&self, probs: usize, targets: usize, dprobs: usize) -> Result<()> {
        const OP: &str = "soft_dice_loss";
        check_lens(
            OP,
            &[
                ("probs", probs, self.len()),
                ("targets", targets, self.len()),
                ("dprobs", dprobs, self.len()),
            ],
        )?;
        if self.c == 0 {
            return bad(
                OP,
                "no channels: the mean over channels is undefined".into(),
            );
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(
                OP,
                format!("eps must be finite and not negative, got {}", self.eps),
            );
        }
        Ok(())
    }
}
