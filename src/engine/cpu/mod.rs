//! The CPU reference backend: plain, readable implementations of every op, generic over
//! f32/f64 (f64 for finite-difference gradient checks), parallel with rayon, convolutions
//! and dense products through the `gemm` crate.
//!
//! [`CpuBackend`] only forwards: the [`Backend`] trait checks the lengths of the ops with a
//! shape type before its `*_unchecked` method runs here; each op family lives in its own
//! file over plain slices (a direct call with wrong lengths panics on a slice bound, where the
//! trait's method returns the error). [`gemm::matmul`] is the shared bounds-checked matrix
//! product.

pub mod bias;
pub mod cam;
pub mod ccl;
pub mod channels;
pub mod conv;
pub mod dense;
pub mod dice;
pub mod elementwise;
pub mod gemm;
pub mod kmeans;
pub mod loss;
pub mod lstm;
pub mod morph;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod scratch;
pub mod simd;
pub mod upconv;
pub mod volume;
pub mod winograd;

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use super::backend::Backend;
use super::shapes::{
    BatchNorm2d, ChannelCopy, Conv2d, Lstm, Pool2d, SoftDice, Transpose, UpConv2d,
};
use super::{ActStorage, Real, Result};

/// Per-op wall time, collected when `ICHCAM_PROFILE=1` (see [`profile_report`]).
struct Prof {
    on: bool,
    ns: [AtomicU64; OPS.len()],
    calls: [AtomicU64; OPS.len()],
}

const OPS: [&str; 18] = [
    "conv2d_fwd",
    "conv2d_bwd_data",
    "conv2d_bwd_weight",
    "batchnorm_train_fwd",
    "batchnorm_eval_fwd",
    "batchnorm_bwd",
    "elementwise",
    "maxpool2d_fwd",
    "maxpool2d_bwd",
    "global_avg_pool",
    "linear",
    "lstm_fwd",
    "lstm_bwd",
    "loss",
    "optimizer",
    "cam",
    "memory",
    "conv2d_bn_eval_fwd",
];

fn prof() -> &'static Prof {
    static P: OnceLock<Prof> = OnceLock::new();
    P.get_or_init(|| Prof {
        on: std::env::var("ICHCAM_PROFILE").is_ok_and(|v| v == "1"),
        ns: std::array::from_fn(|_| AtomicU64::new(0)),
        calls: std::array::from_fn(|_| AtomicU64::new(0)),
    })
}

/// Runs `f`, adding its wall time to op `op` when profiling is on.
fn timed<R>(op: usize, f: impl FnOnce() -> R) -> R {
    let p = prof();
    if !p.on {
        return f();
    }
    let t = std::time::Instant::now();
    let r = f();
    p.ns[op].fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
    p.calls[op].fetch_add(1, Relaxed);
    r
}

/// With `ICHCAM_PROFILE=1`: the wall time spent in each op family since the last report
/// (ms, calls), largest first, and resets the counters; None when profiling is off.
pub fn profile_report() -> Option<Vec<(&'static str, f64, u64)>> {
    let p = prof();
    if !p.on {
        return None;
    }
    let mut v: Vec<_> = OPS
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                *n,
                p.ns[i].swap(0, Relaxed) as f64 / 1e6,
                p.calls[i].swap(0, Relaxed),
            )
        })
        .filter(|r| r.2 > 0)
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(v)
}

/// The CPU backend over host vectors of `T` (f32 for work, f64 for gradient checks).
#[derive(Clone, Copy, Debug)]
pub struct CpuBackend<T: Real> {
    _t: PhantomData<fn() -> T>,
    /// What [`Backend::channels_last_eval`] answers (off unless
    /// [`CpuBackend::with_channels_last_eval`] said).
    channels_last_eval: bool,
    /// What [`Backend::channels_last_train`] answers (off unless
    /// [`CpuBackend::with_channels_last_train`] said).
    channels_last_train: bool,
    /// What [`Backend::eval_storage`] answers (f32 unless
    /// [`CpuBackend::with_eval_storage`] said).
    eval_storage: ActStorage,
    /// What [`Backend::train_storage`] answers (f32 unless
    /// [`CpuBackend::with_train_storage`] said).
    train_storage: ActStorage,
}

impl<T: Real> CpuBackend<T> {
    pub fn new() -> Self {
        CpuBackend {
            _t: PhantomData,
            channels_last_eval: false,
            channels_last_train: false,
            eval_storage: ActStorage::F32,
            train_storage: ActStorage::F32,
        }
    }

    /// This backend storing the channels-last eval activations in `st` (with
    /// [`CpuBackend::with_channels_last_eval`]): bf16 storage is the reference of the
    /// device's, a slot per value holding it rounded to bf16, the units the f32 ones with
    /// their outputs rounded.
    pub fn with_eval_storage(mut self, st: ActStorage) -> Self {
        self.eval_storage = st;
        self
    }

    /// This backend storing the channels-last training activations in `st` (with
    /// [`CpuBackend::with_channels_last_train`]): bf16 storage is the reference of the
    /// device's, a slot per value holding it rounded to bf16; the bf16-storage training ops
    /// run the trait's defaults (the f32 ops on the stored values, outputs rounded).
    pub fn with_train_storage(mut self, st: ActStorage) -> Self {
        self.train_storage = st;
        self
    }

    /// This backend asking for a channels-last eval-mode backbone: the CPU has no
    /// channels-last convolution, so its units run the trait's default (transposes around
    /// the NCHW op), bit for bit the NCHW backbone: the reference the layout is tested
    /// against, never faster.
    pub fn with_channels_last_eval(mut self, on: bool) -> Self {
        self.channels_last_eval = on;
        self
    }

    /// This backend asking for a channels-last training-mode backbone: its block units and
    /// their backward run the trait's defaults (transposes around the NCHW ops), bit for bit
    /// the NCHW backbone: the reference the layout is tested against, never faster.
    pub fn with_channels_last_train(mut self, on: bool) -> Self {
        self.channels_last_train = on;
        self
    }
}

impl<T: Real> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Real> Backend for CpuBackend<T> {
    type T = T;
    type Buf = Vec<T>;

    fn name(&self) -> String {
        format!("cpu-{}", T::NAME)
    }

    fn zeros(&self, len: usize) -> Result<Vec<T>> {
        timed(16, || Ok(vec![T::zero(); len]))
    }
    fn upload(&self, host: &[T]) -> Result<Vec<T>> {
        timed(16, || Ok(host.to_vec()))
    }
    fn download(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        timed(16, || Ok(buf.clone()))
    }
    fn len(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn fill(&self, buf: &mut Vec<T>, value: f64) -> Result<()> {
        timed(16, || elementwise::fill(buf, value))
    }
    fn copy(&self, src: &Vec<T>, dst: &mut Vec<T>) -> Result<()> {
        timed(16, || elementwise::copy(src, dst))
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn channels_last_eval(&self) -> bool {
        self.channels_last_eval
    }
    fn channels_last_train(&self) -> bool {
        self.channels_last_train
    }
    fn eval_storage(&self) -> ActStorage {
        self.eval_storage
    }
    fn force_f32_eval_storage(&mut self) {
        self.eval_storage = ActStorage::F32;
    }
    fn train_storage(&self) -> ActStorage {
        self.train_storage
    }
    fn force_f32_train_storage(&mut self) {
        self.train_storage = ActStorage::F32;
    }
    unsafe fn pack_bf16_unchecked(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        // A slot per value, rounded.
        timed(16, || {
            elementwise::copy(x, y)?;
            channels::round_to_bf16(y);
            Ok(())
        })
    }
    unsafe fn unpack_bf16_unchecked(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        // Exact when x holds bf16 values (rounded again otherwise, as nhwc_bf16_to_nchw).
        timed(16, || {
            elementwise::copy(x, y)?;
            channels::round_to_bf16(y);
            Ok(())
        })
    }
    unsafe fn conv2d_bn_eval_fwd_nhwc_bf16_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Vec<T>,
        w: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        residual: Option<&Vec<T>>,
        relu: bool,
        y: &mut Vec<T>,
    ) -> Result<()> {
        // A slot per value: the f32 unit on the stored (bf16) values, its output rounded.
        self.conv2d_bn_eval_fwd_nhwc(
            s,
            bn,
            x,
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            residual,
            relu,
            y,
        )?;
        timed(16, || channels::round_to_bf16(y));
        Ok(())
    }

    unsafe fn conv2d_fwd_unchecked(
        &self,
        s: &Conv2d,
        x: &Vec<T>,
        w: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(0, || conv::conv2d_fwd(s, x, w, y))
    }
    unsafe fn conv2d_bwd_data_unchecked(
        &self,
        s: &Conv2d,
        dy: &Vec<T>,
        w: &Vec<T>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        timed(1, || conv::conv2d_bwd_data(s, dy, w, dx))
    }
    unsafe fn conv2d_bwd_weight_unchecked(
        &self,
        s: &Conv2d,
        x: &Vec<T>,
        dy: &Vec<T>,
        dw: &mut Vec<T>,
    ) -> Result<()> {
        timed(2, || conv::conv2d_bwd_weight(s, x, dy, dw))
    }

    unsafe fn conv2d_bn_eval_fwd_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Vec<T>,
        w: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        residual: Option<&Vec<T>>,
        relu: bool,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(17, || {
            let (scale, shift) =
                norm::eval_scale_shift(bn, gamma, beta, running_mean, running_var)?;
            let ep = winograd::Epilogue {
                affine: Some((&scale, &shift)),
                residual: residual.map(|r| r.as_slice()),
                relu,
            };
            conv::conv2d_fwd_fused(s, x, w, y, ep)
        })
    }

    unsafe fn conv2d_bn_train_fwd_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Vec<T>,
        w: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &mut Vec<T>,
        running_var: &mut Vec<T>,
        save_mean: &mut Vec<T>,
        save_invstd: &mut Vec<T>,
        z: &mut Vec<T>,
        y: &mut Vec<T>,
        residual: Option<&Vec<T>>,
        relu: bool,
    ) -> Result<()> {
        // The separate ops' arithmetic, the residual join in the normalisation's pass (no
        // intermediate allocated): bit for bit the composite.
        timed(0, || conv::conv2d_fwd(s, x, w, z))?;
        timed(3, || {
            norm::batchnorm_train_fwd(
                bn,
                z,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                y,
                residual.map(|r| r.as_slice()),
                relu,
            )
        })
    }
    unsafe fn batchnorm_train_fwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &mut Vec<T>,
        running_var: &mut Vec<T>,
        save_mean: &mut Vec<T>,
        save_invstd: &mut Vec<T>,
        y: &mut Vec<T>,
        relu: bool,
    ) -> Result<()> {
        timed(3, || {
            norm::batchnorm_train_fwd(
                s,
                x,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                y,
                None,
                relu,
            )
        })
    }
    unsafe fn batchnorm_eval_fwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        y: &mut Vec<T>,
        relu: bool,
    ) -> Result<()> {
        timed(4, || {
            norm::batchnorm_eval_fwd(s, x, gamma, beta, running_mean, running_var, y, relu)
        })
    }
    unsafe fn batchnorm_bwd_unchecked(
        &self,
        s: &BatchNorm2d,
        x: &Vec<T>,
        y: &Vec<T>,
        dy: &Vec<T>,
        gamma: &Vec<T>,
        save_mean: &Vec<T>,
        save_invstd: &Vec<T>,
        dx: &mut Vec<T>,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
        relu: bool,
    ) -> Result<()> {
        timed(5, || {
            norm::batchnorm_bwd(
                s,
                x,
                y,
                dy,
                gamma,
                save_mean,
                save_invstd,
                dx,
                dgamma,
                dbeta,
                relu,
            )
        })
    }

    fn relu_fwd(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        timed(6, || elementwise::relu_fwd(x, y))
    }
    fn relu_bwd(&self, y: &Vec<T>, dy: &Vec<T>, dx: &mut Vec<T>) -> Result<()> {
        timed(6, || elementwise::relu_bwd(y, dy, dx))
    }
    fn add_relu_fwd(&self, a: &Vec<T>, b: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        timed(6, || elementwise::add_relu_fwd(a, b, y))
    }
    fn add_assign(&self, y: &mut Vec<T>, x: &Vec<T>) -> Result<()> {
        timed(6, || elementwise::add_assign(y, x))
    }
    fn scale_assign(&self, y: &mut Vec<T>, alpha: f64) -> Result<()> {
        timed(6, || elementwise::scale_assign(y, alpha))
    }

    unsafe fn maxpool2d_fwd_unchecked(&self, s: &Pool2d, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        timed(7, || pool::maxpool2d_fwd(s, x, y))
    }
    unsafe fn maxpool2d_bwd_unchecked(
        &self,
        s: &Pool2d,
        x: &Vec<T>,
        y: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        timed(8, || pool::maxpool2d_bwd(s, x, y, dy, dx))
    }
    unsafe fn global_avg_pool_fwd_unchecked(
        &self,
        _rows: usize,
        hw: usize,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(9, || pool::global_avg_pool_fwd(hw, x, y))
    }
    unsafe fn global_avg_pool_bwd_unchecked(
        &self,
        _rows: usize,
        hw: usize,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
    ) -> Result<()> {
        timed(9, || pool::global_avg_pool_bwd(hw, dy, dx))
    }

    unsafe fn linear_fwd_unchecked(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        b: Option<&Vec<T>>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(10, || {
            dense::linear_fwd(m, k, n, x, w, b.map(|v| v.as_slice()), y)
        })
    }
    unsafe fn linear_bwd_unchecked(
        &self,
        m: usize,
        k: usize,
        n: usize,
        x: &Vec<T>,
        w: &Vec<T>,
        dy: &Vec<T>,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: Option<&mut Vec<T>>,
    ) -> Result<()> {
        timed(10, || {
            dense::linear_bwd(
                m,
                k,
                n,
                x,
                w,
                dy,
                dx.map(|v| v.as_mut_slice()),
                dw,
                db.map(|v| v.as_mut_slice()),
            )
        })
    }

    unsafe fn lstm_fwd_unchecked(
        &self,
        s: &Lstm,
        x: &Vec<T>,
        w_ih: &Vec<T>,
        w_hh: &Vec<T>,
        b_ih: &Vec<T>,
        b_hh: &Vec<T>,
        h_seq: &mut Vec<T>,
        c_seq: &mut Vec<T>,
        gates: &mut Vec<T>,
    ) -> Result<()> {
        timed(11, || {
            lstm::lstm_fwd(s, x, w_ih, w_hh, b_ih, b_hh, h_seq, c_seq, gates)
        })
    }
    unsafe fn lstm_bwd_unchecked(
        &self,
        s: &Lstm,
        x: &Vec<T>,
        w_ih: &Vec<T>,
        w_hh: &Vec<T>,
        h_seq: &Vec<T>,
        c_seq: &Vec<T>,
        gates: &Vec<T>,
        dh_seq: &Vec<T>,
        dx: &mut Vec<T>,
        dw_ih: &mut Vec<T>,
        dw_hh: &mut Vec<T>,
        db: &mut Vec<T>,
    ) -> Result<()> {
        timed(12, || {
            lstm::lstm_bwd(
                s, x, w_ih, w_hh, h_seq, c_seq, gates, dh_seq, dx, dw_ih, dw_hh, db,
            )
        })
    }

    fn bce_with_logits(
        &self,
        logits: &Vec<T>,
        targets: &Vec<T>,
        pos_weight: f64,
        dlogits: &mut Vec<T>,
    ) -> Result<f64> {
        timed(13, || {
            loss::bce_with_logits(logits, targets, pos_weight, dlogits)
        })
    }
    fn sgd_step(
        &self,
        p: &mut Vec<T>,
        g: &Vec<T>,
        m: &mut Vec<T>,
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        first_step: bool,
    ) -> Result<()> {
        timed(14, || {
            optim::sgd_step(p, g, m, lr, momentum, weight_decay, first_step)
        })
    }
    fn adam_step(
        &self,
        p: &mut Vec<T>,
        g: &Vec<T>,
        m: &mut Vec<T>,
        v: &mut Vec<T>,
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<()> {
        timed(14, || {
            optim::adam_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
        })
    }

    unsafe fn cam_weight_unchecked(
        &self,
        _n: usize,
        c: usize,
        hw: usize,
        features: &Vec<T>,
        weights: &Vec<T>,
        cam: &mut Vec<T>,
    ) -> Result<()> {
        timed(15, || cam::cam_weight(c, hw, features, weights, cam))
    }
    unsafe fn gradcam_unchecked(
        &self,
        _n: usize,
        c: usize,
        hw: usize,
        features: &Vec<T>,
        grads: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        timed(15, || cam::gradcam(c, hw, features, grads, out))
    }
    unsafe fn upsample_bilinear_unchecked(
        &self,
        n: usize,
        h: usize,
        w: usize,
        oh: usize,
        ow: usize,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(15, || cam::upsample_bilinear(n, h, w, oh, ow, x, y))
    }
    unsafe fn minmax_normalize_unchecked(
        &self,
        _n: usize,
        len: usize,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(15, || cam::minmax_normalize(len, x, y))
    }

    unsafe fn bias_relu_assign_unchecked(
        &self,
        _n: usize,
        c: usize,
        hw: usize,
        b: &Vec<T>,
        y: &mut Vec<T>,
        relu: bool,
    ) -> Result<()> {
        bias::bias_relu_assign(c, hw, b, y, relu)
    }
    unsafe fn bias_bwd_unchecked(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: &Vec<T>,
        db: &mut Vec<T>,
    ) -> Result<()> {
        bias::bias_bwd(n, c, hw, dy, db)
    }
    unsafe fn upconv2d_fwd_unchecked(
        &self,
        s: &UpConv2d,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        upconv::upconv2d_fwd(s, x, w, b, y)
    }
    unsafe fn upconv2d_bwd_unchecked(
        &self,
        s: &UpConv2d,
        x: &Vec<T>,
        w: &Vec<T>,
        dy: &Vec<T>,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
    ) -> Result<()> {
        upconv::upconv2d_bwd(s, x, w, dy, dx, dw, db)
    }
    unsafe fn copy_channels_unchecked(
        &self,
        s: &ChannelCopy,
        src: &Vec<T>,
        dst: &mut Vec<T>,
        accumulate: bool,
    ) -> Result<()> {
        channels::copy_channels(s, src, dst, accumulate)
    }
    unsafe fn nchw_to_nhwc_unchecked(
        &self,
        s: &Transpose,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(16, || channels::nchw_to_nhwc(s, x, y))
    }
    unsafe fn nhwc_to_nchw_unchecked(
        &self,
        s: &Transpose,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(16, || channels::nhwc_to_nchw(s, x, y))
    }
    unsafe fn nchw_to_nhwc_bf16_unchecked(
        &self,
        s: &Transpose,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(16, || channels::nchw_to_nhwc_bf16(s, x, y))
    }
    unsafe fn nhwc_bf16_to_nchw_unchecked(
        &self,
        s: &Transpose,
        x: &Vec<T>,
        y: &mut Vec<T>,
    ) -> Result<()> {
        timed(16, || channels::nhwc_bf16_to_nchw(s, x, y))
    }
    fn sigmoid_fwd(&self, x: &Vec<T>, y: &mut Vec<T>) -> Result<()> {
        dice::sigmoid_fwd(x, y)
    }
    fn sigmoid_bwd(&self, y: &Vec<T>, dy: &Vec<T>, dx: &mut Vec<T>) -> Result<()> {
        dice::sigmoid_bwd(y, dy, dx)
    }
    unsafe fn soft_dice_loss_unchecked(
        &self,
        s: &SoftDice,
        probs: &Vec<T>,
        targets: &Vec<T>,
        dprobs: &mut Vec<T>,
    ) -> Result<f64> {
        dice::soft_dice_loss(s, probs, targets, dprobs)
    }
}
