//! The op set as a trait: every backend (CPU reference, CUDA) implements exactly these ops
//! over its own buffers. The model is written once over this trait.
//!
//! Conventions, the same for every op:
//! - buffers are contiguous, row-major (NCHW for images); lengths are checked, a mismatch is
//!   `EngineError::Shape`, never a panic;
//! - outputs are **overwritten** (never accumulated) unless the op's name says `accumulate`
//!   or `assign`;
//! - scalars (learning rates, eps, momentum) are passed as f64 and cast to `T` inside.

use super::shapes::{BatchNorm2d, ChannelCopy, Conv2d, Lstm, Pool2d, SoftDice, UpConv2d};
use super::{Real, Result};

pub trait Backend: Send + Sync {
    /// Element type of the buffers.
    type T: Real;
    /// A buffer of `T` owned by this backend (host memory for the CPU, device memory for CUDA).
    type Buf: Send + Sync;

    /// A short name for messages ("cpu-f32", "cuda:0 NVIDIA H200").
    fn name(&self) -> String;

    // ---- memory --------------------------------------------------------------------------
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    fn upload(&self, host: &[Self::T]) -> Result<Self::Buf>;
    fn download(&self, buf: &Self::Buf) -> Result<Vec<Self::T>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn fill(&self, buf: &mut Self::Buf, value: f64) -> Result<()>;
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()>;
    /// Waits for queued work (a no-op on the CPU); timings call it.
    fn synchronize(&self) -> Result<()>;

    // ---- convolution (no bias) -----------------------------------------------------------
    /// y = conv(x, w).
    fn conv2d_fwd(&self, s: &Conv2d, x: &Self::Buf, w: &Self::Buf, y: &mut Self::Buf)
        -> Result<()>;
    /// dx = conv_transpose(dy, w).
    fn conv2d_bwd_data(
        &self,
        s: &Conv2d,
        dy: &Self::Buf,
        w: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// dw = sum over the batch of x (*) dy.
    fn conv2d_bwd_weight(
        &self,
        s: &Conv2d,
        x: &Self::Buf,
        dy: &Self::Buf,
        dw: &mut Self::Buf,
    ) -> Result<()>;

    /// Inference convolution + batch norm with the running statistics (+ residual)
    /// (+ ReLU): `y = act(bn_eval(conv(x, w)) + residual)`, the whole eval-mode unit of a
    /// residual block in one op. The default runs the separate ops (allocating the
    /// intermediates); a backend may fold the normalisation into the convolution's output.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_eval_fwd(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Self::Buf,
        w: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
        y: &mut Self::Buf,
    ) -> Result<()> {
        let mut z = self.zeros(s.y_len())?;
        self.conv2d_fwd(s, x, w, &mut z)?;
        match residual {
            None => {
                self.batchnorm_eval_fwd(bn, &z, gamma, beta, running_mean, running_var, y, relu)
            }
            Some(r) => {
                let mut t = self.zeros(s.y_len())?;
                self.batchnorm_eval_fwd(
                    bn,
                    &z,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    &mut t,
                    false,
                )?;
                if relu {
                    self.add_relu_fwd(&t, r, y)
                } else {
                    self.copy(&t, y)?;
                    self.add_assign(y, r)
                }
            }
        }
    }

    // ---- batch norm ----------------------------------------------------------------------
    /// Training mode: normalises with the batch statistics (biased variance), updates the
    /// running stats with PyTorch's momentum and the *unbiased* variance, saves the batch
    /// mean and 1/sqrt(var+eps) for the backward pass; `relu` fuses a ReLU on the output.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_train_fwd(
        &self,
        s: &BatchNorm2d,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        y: &mut Self::Buf,
        relu: bool,
    ) -> Result<()>;
    /// Eval mode: normalises with the running stats; `relu` fuses a ReLU.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_eval_fwd(
        &self,
        s: &BatchNorm2d,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        y: &mut Self::Buf,
        relu: bool,
    ) -> Result<()>;
    /// Backward of the training-mode forward. `y` is that forward's output, used only when
    /// `relu` (to mask dy). dx, dgamma, dbeta are overwritten.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_bwd(
        &self,
        s: &BatchNorm2d,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        gamma: &Self::Buf,
        save_mean: &Self::Buf,
        save_invstd: &Self::Buf,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        relu: bool,
    ) -> Result<()>;

    // ---- elementwise ---------------------------------------------------------------------
    /// y = max(x, 0).
    fn relu_fwd(&self, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// dx = dy * (y > 0), y being the ReLU's output.
    fn relu_bwd(&self, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// y = max(a + b, 0): the residual join.
    fn add_relu_fwd(&self, a: &Self::Buf, b: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// y += x (gradient accumulation where a tensor feeds two branches).
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// y *= alpha.
    fn scale_assign(&self, y: &mut Self::Buf, alpha: f64) -> Result<()>;

    // ---- pooling -------------------------------------------------------------------------
    fn maxpool2d_fwd(&self, s: &Pool2d, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// Routes each dy to the first maximum (row-major scan of the window) of its window in x.
    fn maxpool2d_bwd(
        &self,
        s: &Pool2d,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;
    /// y[i] = mean of x[i, 0..hw] for i in 0..rows (rows = n*c).
    fn global_avg_pool_fwd(
        &self,
        rows: usize,
        hw: usize,
        x: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    fn global_avg_pool_bwd(
        &self,
        rows: usize,
        hw: usize,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    ) -> Result<()>;

    // ---- dense ---------------------------------------------------------------------------
    /// y[m, n] = x[m, k] . w[n, k]^T + b[n].
    #[allow(clippy::too_many_arguments)]
    fn linear_fwd(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        b: Option<&Self::Buf>,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// dx = dy . w (if wanted), dw = dy^T . x, db = column sums of dy (if wanted).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: Option<&mut Self::Buf>,
    ) -> Result<()>;

    // ---- LSTM (one layer, full sequence) -------------------------------------------------
    /// Forward over the whole sequence from a zero state. Writes h_seq and c_seq
    /// `[batch, seq, hidden]` and the activated gates `[batch, seq, 4*hidden]` (i, f, g, o
    /// after sigmoid/tanh) that BPTT needs.
    #[allow(clippy::too_many_arguments)]
    fn lstm_fwd(
        &self,
        s: &Lstm,
        x: &Self::Buf,
        w_ih: &Self::Buf,
        w_hh: &Self::Buf,
        b_ih: &Self::Buf,
        b_hh: &Self::Buf,
        h_seq: &mut Self::Buf,
        c_seq: &mut Self::Buf,
        gates: &mut Self::Buf,
    ) -> Result<()>;
    /// Backpropagation through time given dL/dh for every step. Overwrites dx and the weight
    /// gradients; `db` is the gradient of both b_ih and b_hh (they are equal).
    #[allow(clippy::too_many_arguments)]
    fn lstm_bwd(
        &self,
        s: &Lstm,
        x: &Self::Buf,
        w_ih: &Self::Buf,
        w_hh: &Self::Buf,
        h_seq: &Self::Buf,
        c_seq: &Self::Buf,
        gates: &Self::Buf,
        dh_seq: &Self::Buf,
        dx: &mut Self::Buf,
        dw_ih: &mut Self::Buf,
        dw_hh: &mut Self::Buf,
        db: &mut Self::Buf,
    ) -> Result<()>;

    // ---- loss and optimizers -------------------------------------------------------------
    /// Mean binary cross-entropy with logits (numerically stable), with PyTorch's
    /// `pos_weight` (1.0 = none). Returns the loss and writes dL/dlogits.
    fn bce_with_logits(
        &self,
        logits: &Self::Buf,
        targets: &Self::Buf,
        pos_weight: f64,
        dlogits: &mut Self::Buf,
    ) -> Result<f64>;
    /// PyTorch's SGD: g' = g + wd*p; m = momentum*m + g' (m = g' on the first step, pass
    /// `first_step`); p -= lr*m.
    #[allow(clippy::too_many_arguments)]
    fn sgd_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        first_step: bool,
    ) -> Result<()>;
    /// PyTorch's Adam (L2 weight decay added to the gradient, bias-corrected moments);
    /// `step` counts from 1.
    #[allow(clippy::too_many_arguments)]
    fn adam_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<()>;

    // ---- class activation maps -----------------------------------------------------------
    /// cam[i, p] = sum_c weights[c] * features[i, c, p] for features `[n, c, hw]`.
    fn cam_weight(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &Self::Buf,
        weights: &Self::Buf,
        cam: &mut Self::Buf,
    ) -> Result<()>;
    /// The vanilla CAM of features `[n, c, fh*fw]` at feature resolution into `cam`
    /// `[n, fh*fw]`, and upsampled to `oh x ow` (bilinear, align_corners=False) and min-max
    /// normalised per slice into `norm` `[n, oh*ow]`: [`Backend::cam_weight`],
    /// [`Backend::upsample_bilinear`] and [`Backend::minmax_normalize`] as one op. The
    /// default runs the three (allocating the upsampled map); a backend may fuse them.
    #[allow(clippy::too_many_arguments)]
    fn cam_normalized(
        &self,
        n: usize,
        c: usize,
        fh: usize,
        fw: usize,
        oh: usize,
        ow: usize,
        features: &Self::Buf,
        weights: &Self::Buf,
        cam: &mut Self::Buf,
        norm: &mut Self::Buf,
    ) -> Result<()> {
        self.cam_weight(n, c, fh * fw, features, weights, cam)?;
        let mut up = self.zeros(n * oh * ow)?;
        self.upsample_bilinear(n, fh, fw, oh, ow, cam, &mut up)?;
        self.minmax_normalize(n, oh * ow, &up, norm)
    }
    /// Grad-CAM: alpha[i, c] = mean over p of grads[i, c, p]; out[i, p] = relu(sum_c alpha * features).
    #[allow(clippy::too_many_arguments)]
    fn gradcam(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        features: &Self::Buf,
        grads: &Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Bilinear resize of `[n, h, w]` to `[n, oh, ow]`, PyTorch's align_corners=False.
    #[allow(clippy::too_many_arguments)]
    fn upsample_bilinear(
        &self,
        n: usize,
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        x: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Per row of `[n, len]`: (x - min) / (max - min); a constant row becomes all zeros.
    fn minmax_normalize(
        &self,
        n: usize,
        len: usize,
        x: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;

    // ---- U-Net (stage 3) -----------------------------------------------------------------
    /// y[i, ch, p] = y[i, ch, p] + b[ch] over y `[n, c, hw]`, then max(., 0) when `relu`:
    /// a convolution's bias (and the ReLU after it), in place.
    #[allow(clippy::too_many_arguments)]
    fn bias_relu_assign(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        b: &Self::Buf,
        y: &mut Self::Buf,
        relu: bool,
    ) -> Result<()>;
    /// db[ch] = sum over i and p of dy[i, ch, p] for dy `[n, c, hw]`: a bias's gradient.
    fn bias_bwd(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: &Self::Buf,
        db: &mut Self::Buf,
    ) -> Result<()>;
    /// y[:, y_offset + co] = conv_transpose(x, w)[:, co] + b[co] (kernel = stride = k); the
    /// other channels of y are left as they are.
    fn upconv2d_fwd(
        &self,
        s: &UpConv2d,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Backward of [`Backend::upconv2d_fwd`] from the gradient of the whole wider output
    /// (only the op's channel slice of `dy` is read): overwrites dx, dw and db.
    #[allow(clippy::too_many_arguments)]
    fn upconv2d_bwd(
        &self,
        s: &UpConv2d,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    ) -> Result<()>;
    /// dst[i, dst_offset + k, p] = src[i, src_offset + k, p] for k < s.c (`+=` when
    /// `accumulate`); dst's other channels are left as they are. The concatenation and, with
    /// `accumulate`, its backward.
    fn copy_channels(
        &self,
        s: &ChannelCopy,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        accumulate: bool,
    ) -> Result<()>;
    /// y = 1 / (1 + exp(-x)).
    fn sigmoid_fwd(&self, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// dx = dy * y * (1 - y), y being the sigmoid's output.
    fn sigmoid_bwd(&self, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    /// The soft Dice loss of probabilities against 0/1 targets (see [`SoftDice`]), summed in
    /// f64; returns the loss and writes dL/dprobs.
    fn soft_dice_loss(
        &self,
        s: &SoftDice,
        probs: &Self::Buf,
        targets: &Self::Buf,
        dprobs: &mut Self::Buf,
    ) -> Result<f64>;
}
