//! The op set as a trait: every backend (CPU reference, CUDA) implements exactly these ops
//! over its own buffers. The model is written once over this trait.
//!
//! Conventions, the same for every op:
//! - buffers are contiguous, row-major (NCHW for images, except the channels-last ops:
//!   [`Backend::conv2d_bn_eval_fwd_nhwc`], the training ops [`Backend::conv2d_bn_train_fwd_nhwc`],
//!   [`Backend::batchnorm_bwd_nhwc`], [`Backend::conv2d_bwd_data_nhwc`],
//!   [`Backend::conv2d_bwd_weight_nhwc`] (weights OIHW as ever), and the layout changes [`Backend::nchw_to_nhwc`],
//!   [`Backend::nhwc_to_nchw`], and their bf16-storage forms
//!   [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`], [`Backend::nchw_to_nhwc_bf16`],
//!   [`Backend::nhwc_bf16_to_nchw`], whose bf16 tensors take
//!   [`Backend::storage_slots`] slots); lengths are checked, a mismatch is
//!   `EngineError::Shape`, never a panic. The checks of the ops with a shape type
//!   ([`Conv2d`], [`BatchNorm2d`], [`Lstm`], ...) are written once, here: the trait's
//!   method validates the lengths on the shape and calls the backend's `*_unchecked`
//!   implementation (an `unsafe fn`: a device kernel trusts them);
//! - outputs are **overwritten** (never accumulated) unless the op's name says `accumulate`
//!   or `assign`;
//! - scalars (learning rates, eps, momentum) are passed as f64 and cast to `T` inside.

use super::shapes::check_lens;
use super::shapes::{
    check_minmax, BatchNorm2d, ChannelCopy, Conv2d, Linear, Lstm, Maps, Pool2d, Resize, RowMean,
    SoftDice, Transpose, UpConv2d,
};
use super::{ActStorage, Real, Result};

/// Declares an op whose lengths a shape type validates: the trait method `$name` checks
/// them with `$check` (once, for every backend) and calls `$unchecked`, which each backend
/// implements (an `unsafe fn`: a device kernel trusts the lengths).
macro_rules! checked_op {
    (
        $(#[$doc:meta])*
        fn $name:ident / $unchecked:ident(&$self:ident, $($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
        $check:block
    ) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name(&$self, $($arg: $ty),*) -> $ret {
            $check
            // SAFETY: the buffers hold the lengths the shape gives (checked above).
            unsafe { $self.$unchecked($($arg),*) }
        }
        #[doc = concat!("[`Backend::", stringify!($name), "`] once its lengths are checked: what a backend implements.")]
        ///
        /// # Safety
        /// Every buffer holds the length the shape argument gives (what the checked method
        /// validates); a device kernel reads and writes that many values.
        #[allow(clippy::too_many_arguments)]
        unsafe fn $unchecked(&$self, $($arg: $ty),*) -> $ret;
    };
    // The same with a default implementation of `$unchecked` (`$default`).
    (
        $(#[$doc:meta])*
        fn $name:ident / $unchecked:ident(&$self:ident, $($arg:ident: $ty:ty),* $(,)?) -> $ret:ty
        $check:block default $default:block
    ) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name(&$self, $($arg: $ty),*) -> $ret {
            $check
            // SAFETY: the buffers hold the lengths the shape gives (checked above).
            unsafe { $self.$unchecked($($arg),*) }
        }
        #[doc = concat!("[`Backend::", stringify!($name), "`] once its lengths are checked: what a backend implements (a default is given).")]
        ///
        /// # Safety
        /// Every buffer holds the length the shape argument gives (what the checked method
        /// validates); a device kernel reads and writes that many values.
        #[allow(clippy::too_many_arguments)]
        unsafe fn $unchecked(&$self, $($arg: $ty),*) -> $ret $default
    };
}

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
    /// A buffer of `len` values for a composite op's temporaries, contents undefined: hand
    /// it back with [`Backend::recycle`] once the op's work is queued. The default allocates
    /// (zeros); a backend may keep such buffers for reuse, so that a warm op allocates
    /// nothing (CUDA: its arena, what a CUDA graph's capture needs).
    fn scratch(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// Gives back a buffer of [`Backend::scratch`] (the default drops it).
    fn recycle(&self, buf: Self::Buf) {
        drop(buf)
    }

    // ---- convolution (no bias) -----------------------------------------------------------
    checked_op! {
        /// y = conv(x, w).
        fn conv2d_fwd / conv2d_fwd_unchecked(
            &self,
            s: &Conv2d,
            x: &Self::Buf,
            w: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            s.check_fwd(self.len(x), self.len(w), self.len(y))?;
        }
    }
    checked_op! {
        /// dx = conv_transpose(dy, w).
        fn conv2d_bwd_data / conv2d_bwd_data_unchecked(
            &self,
            s: &Conv2d,
            dy: &Self::Buf,
            w: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd_data(self.len(dy), self.len(w), self.len(dx))?;
        }
    }
    checked_op! {
        /// dw = sum over the batch of x (*) dy.
        fn conv2d_bwd_weight / conv2d_bwd_weight_unchecked(
            &self,
            s: &Conv2d,
            x: &Self::Buf,
            dy: &Self::Buf,
            dw: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd_weight(self.len(x), self.len(dy), self.len(dw))?;
        }
    }

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
        s.check_fwd(self.len(x), self.len(w), self.len(y))?;
        bn.check_after_conv(
            "conv2d_bn_eval_fwd",
            s,
            [gamma, beta, running_mean, running_var].map(|b| self.len(b)),
            residual.map(|r| self.len(r)),
        )?;
        // SAFETY: the buffers hold the lengths the shape gives (checked above).
        unsafe {
            self.conv2d_bn_eval_fwd_unchecked(
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
            )
        }
    }
    /// [`Backend::conv2d_bn_eval_fwd`] once its lengths are checked: what a backend implements.
    ///
    /// # Safety
    /// Every buffer holds the length the shape argument gives (what [`Backend::conv2d_bn_eval_fwd`]
    /// checks); a device kernel reads and writes that many values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2d_bn_eval_fwd_unchecked(
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

    /// Whether the eval-mode backbone should run channels-last on this backend (its block
    /// units as [`Backend::conv2d_bn_eval_fwd_nhwc`] between two layout changes): a setting
    /// of the backend, read once when the model builds its eval-mode buffers. The default
    /// (and the CPU reference) says no.
    fn channels_last_eval(&self) -> bool {
        false
    }

    /// [`Backend::conv2d_bn_eval_fwd`] on channels-last activations: x `[n, h, w, c_in]`,
    /// residual and y `[n, out_h, out_w, c_out]` (NHWC), the weights OIHW as ever; the same
    /// arguments and checks. The default changes x (and the residual) to NCHW temporaries
    /// ([`Backend::scratch`]), runs [`Backend::conv2d_bn_eval_fwd`] and changes its output
    /// back: bit for bit the NCHW op, at the cost of three transposes; a backend may run a
    /// native channels-last kernel instead.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_eval_fwd_nhwc(
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
        s.check_fwd(self.len(x), self.len(w), self.len(y))?;
        bn.check_after_conv(
            "conv2d_bn_eval_fwd_nhwc",
            s,
            [gamma, beta, running_mean, running_var].map(|b| self.len(b)),
            residual.map(|r| self.len(r)),
        )?;
        // SAFETY: the buffers hold the lengths the shape gives (checked above).
        unsafe {
            self.conv2d_bn_eval_fwd_nhwc_unchecked(
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
            )
        }
    }
    /// [`Backend::conv2d_bn_eval_fwd_nhwc`] once its lengths are checked: what a backend
    /// implements; the default transposes around [`Backend::conv2d_bn_eval_fwd`].
    ///
    /// # Safety
    /// Every buffer holds the length the shape argument gives (what
    /// [`Backend::conv2d_bn_eval_fwd_nhwc`] checks); a device kernel reads and writes that
    /// many values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2d_bn_eval_fwd_nhwc_unchecked(
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
        conv2d_bn_eval_fwd_nhwc_by_transposes(
            self,
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
        )
    }

    /// How the channels-last eval activations are stored on this backend ([`ActStorage`]): a
    /// setting of the backend, read (with [`Backend::channels_last_eval`], and only when that
    /// says yes) once when the model builds its eval-mode buffers. The default (and the CPU
    /// reference unless told otherwise) is f32.
    fn eval_storage(&self) -> ActStorage {
        ActStorage::F32
    }

    /// Makes [`Backend::eval_storage`] answer f32 from now on, whatever this backend's
    /// setting was: for a comparison whose reference rounds only the convolutions' operands
    /// (`ichcam parity`'s rounded references), which bf16 storage would move further (the
    /// residual adds and the features). Nothing to do for a backend that stores f32 only.
    fn force_f32_eval_storage(&mut self) {}

    /// Buffer length (slots of `T`) of a tensor of `values` values in storage `st`: `values`
    /// by default (f32, and the CPU reference's bf16 storage: a slot per value, rounded);
    /// CUDA packs two bf16 values per slot (`values.div_ceil(2)`).
    fn storage_slots(&self, st: ActStorage, values: usize) -> usize {
        let _ = st;
        values
    }

    /// [`Backend::conv2d_bn_eval_fwd_nhwc`] on activations in bf16 storage: x, the residual
    /// and y channels-last in [`ActStorage::Bf16`] ([`Backend::storage_slots`] slots each),
    /// the weights and the batch norm's f32. The convolution reads the bf16 values, the
    /// batch norm, residual add and ReLU run in f32, and y is rounded to bf16 (nearest even)
    /// when stored. The same arguments as [`Backend::conv2d_bn_eval_fwd_nhwc`], the lengths
    /// checked in slots.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_eval_fwd_nhwc_bf16(
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
        const OP: &str = "conv2d_bn_eval_fwd_nhwc_bf16";
        s.check(OP)?;
        let slots = |v: usize| self.storage_slots(ActStorage::Bf16, v);
        check_lens(
            OP,
            &[
                ("x", self.len(x), slots(s.x_len())),
                ("w", self.len(w), s.w_len()),
                ("y", self.len(y), slots(s.y_len())),
            ],
        )?;
        bn.check_after_conv(
            OP,
            s,
            [gamma, beta, running_mean, running_var].map(|b| self.len(b)),
            None,
        )?;
        if let Some(r) = residual {
            check_lens(OP, &[("residual", self.len(r), slots(s.y_len()))])?;
        }
        // SAFETY: the buffers hold the lengths the shape gives (checked above).
        unsafe {
            self.conv2d_bn_eval_fwd_nhwc_bf16_unchecked(
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
            )
        }
    }
    /// [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`] once its lengths are checked: what a
    /// backend implements.
    ///
    /// # Safety
    /// Every buffer holds the length (in slots) that
    /// [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`] checks; a device kernel reads and writes
    /// that many.
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2d_bn_eval_fwd_nhwc_bf16_unchecked(
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
    ) -> Result<()>;

    /// Training convolution + batch norm (+ residual) (+ ReLU): `z = conv(x, w)` (kept: the
    /// backward needs it), then [`Backend::batchnorm_train_fwd`] of z (batch statistics,
    /// running stats updated, mean and 1/sqrt(var+eps) saved) and `y = act(bn(z) + residual)`
    /// (`act`: a ReLU when `relu`; with a residual, the join of a residual block as
    /// [`Backend::add_relu_fwd`] computes it, so the block's output is written once). The
    /// default runs the separate ops (allocating the normalised intermediate when there is a
    /// residual); a backend may take the statistics in the convolution's epilogue and the
    /// join in the normalisation's pass.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_train_fwd(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Self::Buf,
        w: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        z: &mut Self::Buf,
        y: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
    ) -> Result<()> {
        check_conv_bn_train(
            self,
            "conv2d_bn_train_fwd",
            s,
            bn,
            [
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                z,
                y,
            ],
            residual,
        )?;
        // SAFETY: the buffers hold the lengths the shapes give (checked above).
        unsafe {
            self.conv2d_bn_train_fwd_unchecked(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                z,
                y,
                residual,
                relu,
            )
        }
    }
    /// [`Backend::conv2d_bn_train_fwd`] once its lengths are checked: what a backend implements.
    ///
    /// # Safety
    /// Every buffer holds the length the shape arguments give (what
    /// [`Backend::conv2d_bn_train_fwd`] checks); a device kernel reads and writes that many values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2d_bn_train_fwd_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Self::Buf,
        w: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        z: &mut Self::Buf,
        y: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
    ) -> Result<()> {
        self.conv2d_fwd(s, x, w, z)?;
        let Some(r) = residual else {
            return self.batchnorm_train_fwd(
                bn,
                z,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                y,
                relu,
            );
        };
        let mut t = self.zeros(s.y_len())?;
        self.batchnorm_train_fwd(
            bn,
            z,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
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

    /// Whether the training-mode backbone should run channels-last on this backend (its
    /// block units as [`Backend::conv2d_bn_train_fwd_nhwc`] and their backward as
    /// [`Backend::batchnorm_bwd_nhwc`], [`Backend::conv2d_bwd_weight_nhwc`] and
    /// [`Backend::conv2d_bwd_data_nhwc`], between two layout changes): a setting of the
    /// backend, read once when the model builds its training activations. The default (and
    /// the CPU reference) says no.
    fn channels_last_train(&self) -> bool {
        false
    }

    /// [`Backend::conv2d_bn_train_fwd`] on channels-last activations: x `[n, h, w, c_in]`,
    /// z, y and the residual `[n, out_h, out_w, c_out]` (NHWC), the weights OIHW as ever;
    /// the same arguments and checks. The default changes x (and the residual) to NCHW
    /// temporaries ([`Backend::scratch`]), runs [`Backend::conv2d_bn_train_fwd`] and changes
    /// z and y back ([`conv2d_bn_train_fwd_nhwc_by_transposes`]): bit for bit the NCHW op;
    /// a backend may run a native channels-last kernel instead.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_bn_train_fwd_nhwc(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Self::Buf,
        w: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        z: &mut Self::Buf,
        y: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
    ) -> Result<()> {
        check_conv_bn_train(
            self,
            "conv2d_bn_train_fwd_nhwc",
            s,
            bn,
            [
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                z,
                y,
            ],
            residual,
        )?;
        // SAFETY: the buffers hold the lengths the shapes give (checked above).
        unsafe {
            self.conv2d_bn_train_fwd_nhwc_unchecked(
                s,
                bn,
                x,
                w,
                gamma,
                beta,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                z,
                y,
                residual,
                relu,
            )
        }
    }
    /// [`Backend::conv2d_bn_train_fwd_nhwc`] once its lengths are checked: what a backend
    /// implements; the default transposes around [`Backend::conv2d_bn_train_fwd`].
    ///
    /// # Safety
    /// Every buffer holds the length the shape arguments give (what
    /// [`Backend::conv2d_bn_train_fwd_nhwc`] checks); a device kernel reads and writes that
    /// many values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv2d_bn_train_fwd_nhwc_unchecked(
        &self,
        s: &Conv2d,
        bn: &BatchNorm2d,
        x: &Self::Buf,
        w: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        save_mean: &mut Self::Buf,
        save_invstd: &mut Self::Buf,
        z: &mut Self::Buf,
        y: &mut Self::Buf,
        residual: Option<&Self::Buf>,
        relu: bool,
    ) -> Result<()> {
        conv2d_bn_train_fwd_nhwc_by_transposes(
            self,
            s,
            bn,
            x,
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            z,
            y,
            residual,
            relu,
        )
    }

    // ---- batch norm ----------------------------------------------------------------------
    checked_op! {
        /// Training mode: normalises with the batch statistics (biased variance), updates the
        /// running stats with PyTorch's momentum and the *unbiased* variance, saves the batch
        /// mean and 1/sqrt(var+eps) for the backward pass; `relu` fuses a ReLU on the output.
        fn batchnorm_train_fwd / batchnorm_train_fwd_unchecked(
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
        ) -> Result<()> {
            s.check_train_fwd(
                self.len(x),
                self.len(y),
                self.len(gamma),
                self.len(beta),
                self.len(running_mean),
                self.len(running_var),
                self.len(save_mean),
                self.len(save_invstd),
            )?;
        }
    }
    checked_op! {
        /// Eval mode: normalises with the running stats; `relu` fuses a ReLU.
        fn batchnorm_eval_fwd / batchnorm_eval_fwd_unchecked(
            &self,
            s: &BatchNorm2d,
            x: &Self::Buf,
            gamma: &Self::Buf,
            beta: &Self::Buf,
            running_mean: &Self::Buf,
            running_var: &Self::Buf,
            y: &mut Self::Buf,
            relu: bool,
        ) -> Result<()> {
            s.check_eval_fwd(
                self.len(x),
                self.len(y),
                self.len(gamma),
                self.len(beta),
                self.len(running_mean),
                self.len(running_var),
            )?;
        }
    }
    checked_op! {
        /// Backward of the training-mode forward. `y` is that forward's output, used only when
        /// `relu` (to mask dy). dx, dgamma, dbeta are overwritten.
        fn batchnorm_bwd / batchnorm_bwd_unchecked(
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
        ) -> Result<()> {
            s.check_bwd(
                self.len(x),
                self.len(y),
                self.len(dy),
                self.len(dx),
                self.len(gamma),
                self.len(save_mean),
                self.len(save_invstd),
                self.len(dgamma),
                self.len(dbeta),
            )?;
        }
    }

    checked_op! {
        /// [`Backend::batchnorm_bwd`] on channels-last tensors: x, y, dy and dx
        /// `[n, hw, c]` (NHWC), the same arguments and checks. The default changes x, dy
        /// (and y, when `relu` reads it) to NCHW temporaries, runs [`Backend::batchnorm_bwd`]
        /// and changes dx back ([`nchw_between_layout_changes`]): bit for bit the NCHW op.
        fn batchnorm_bwd_nhwc / batchnorm_bwd_nhwc_unchecked(
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
        ) -> Result<()> {
            s.check_bwd(
                self.len(x),
                self.len(y),
                self.len(dy),
                self.len(dx),
                self.len(gamma),
                self.len(save_mean),
                self.len(save_invstd),
                self.len(dgamma),
                self.len(dbeta),
            )?;
        } default {
            batchnorm_bwd_nhwc_by_transposes(
                self, s, x, y, dy, gamma, save_mean, save_invstd, dx, dgamma, dbeta, relu,
            )
        }
    }
    checked_op! {
        /// [`Backend::conv2d_bwd_data`] on channels-last tensors: dy `[n, out_h, out_w,
        /// c_out]`, dx `[n, h, w, c_in]` (NHWC), w OIHW. The default changes dy to NCHW,
        /// runs [`Backend::conv2d_bwd_data`] and changes dx back: bit for bit the NCHW op.
        fn conv2d_bwd_data_nhwc / conv2d_bwd_data_nhwc_unchecked(
            &self,
            s: &Conv2d,
            dy: &Self::Buf,
            w: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd_data(self.len(dy), self.len(w), self.len(dx))?;
        } default {
            conv2d_bwd_data_nhwc_by_transposes(self, s, dy, w, dx)
        }
    }
    checked_op! {
        /// [`Backend::conv2d_bwd_weight`] on channels-last tensors: x `[n, h, w, c_in]`, dy
        /// `[n, out_h, out_w, c_out]` (NHWC), dw OIHW. The default changes x and dy to NCHW
        /// and runs [`Backend::conv2d_bwd_weight`]: bit for bit the NCHW op.
        fn conv2d_bwd_weight_nhwc / conv2d_bwd_weight_nhwc_unchecked(
            &self,
            s: &Conv2d,
            x: &Self::Buf,
            dy: &Self::Buf,
            dw: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd_weight(self.len(x), self.len(dy), self.len(dw))?;
        } default {
            conv2d_bwd_weight_nhwc_by_transposes(self, s, x, dy, dw)
        }
    }

    // ---- bf16 storage of the channels-last training activations -------------------------
    /// How the channels-last training activations are stored on this backend
    /// ([`ActStorage`]): a setting of the backend, read (with
    /// [`Backend::channels_last_train`], and only when that says yes) once when the model
    /// builds its training activations. In [`ActStorage::Bf16`] the block units' inputs and
    /// outputs, the conv outputs z kept for the batch norms, and the batch norms' input
    /// gradients dz are stored in bf16 ([`Backend::storage_slots`] slots each); the other
    /// gradients, the weights and the statistics stay f32. The default (and the CPU
    /// reference unless told otherwise) is f32.
    fn train_storage(&self) -> ActStorage {
        ActStorage::F32
    }

    /// Makes [`Backend::train_storage`] answer f32 from now on (the training twin of
    /// [`Backend::force_f32_eval_storage`]). Nothing to do for a backend that stores f32 only.
    fn force_f32_train_storage(&mut self) {}

    checked_op! {
        /// y = x in bf16 storage: x f32 (`L` values), y [`ActStorage::Bf16`]
        /// ([`Backend::storage_slots`] slots), each value rounded to bf16 (nearest even).
        fn pack_bf16 / pack_bf16_unchecked(&self, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
            let slots = self.storage_slots(ActStorage::Bf16, self.len(x));
            check_lens("pack_bf16", &[("y", self.len(y), slots)])?;
        }
    }
    checked_op! {
        /// y = x out of bf16 storage: x [`ActStorage::Bf16`] (`L` values in
        /// [`Backend::storage_slots`] slots), y f32 (`L` values), every value exact.
        fn unpack_bf16 / unpack_bf16_unchecked(&self, x: &Self::Buf, y: &mut Self::Buf) -> Result<()> {
            let slots = self.storage_slots(ActStorage::Bf16, self.len(y));
            check_lens("unpack_bf16", &[("x", self.len(x), slots)])?;
        }
    }

    checked_op! {
        /// [`Backend::conv2d_bn_train_fwd_nhwc`] on activations in bf16 storage: x, z, y and
        /// the residual channels-last in [`ActStorage::Bf16`] ([`Backend::storage_slots`]
        /// slots each), the weights, the batch norm's parameters and statistics f32. z is the
        /// convolution's output rounded to bf16, and the batch statistics (saved and folded
        /// into the running ones) are those of the rounded z, which the backward reads; the
        /// normalisation, residual add and ReLU run in f32 and y is rounded when stored. The
        /// default runs by conversions ([`conv2d_bn_train_fwd_nhwc_bf16_by_conversions`]).
        fn conv2d_bn_train_fwd_nhwc_bf16 / conv2d_bn_train_fwd_nhwc_bf16_unchecked(
            &self,
            s: &Conv2d,
            bn: &BatchNorm2d,
            x: &Self::Buf,
            w: &Self::Buf,
            gamma: &Self::Buf,
            beta: &Self::Buf,
            running_mean: &mut Self::Buf,
            running_var: &mut Self::Buf,
            save_mean: &mut Self::Buf,
            save_invstd: &mut Self::Buf,
            z: &mut Self::Buf,
            y: &mut Self::Buf,
            residual: Option<&Self::Buf>,
            relu: bool,
        ) -> Result<()> {
            const OP: &str = "conv2d_bn_train_fwd_nhwc_bf16";
            s.check(OP)?;
            let slots = |v: usize| self.storage_slots(ActStorage::Bf16, v);
            check_lens(
                OP,
                &[
                    ("x", self.len(x), slots(s.x_len())),
                    ("w", self.len(w), s.w_len()),
                    ("z", self.len(z), slots(s.y_len())),
                    ("y", self.len(y), slots(s.y_len())),
                ],
            )?;
            let bufs = [gamma, beta, &*running_mean, &*running_var];
            bn.check_after_conv(OP, s, bufs.map(|b| self.len(b)), None)?;
            bn.check_train_fwd(
                bn.len(),
                bn.len(),
                self.len(gamma),
                self.len(beta),
                self.len(running_mean),
                self.len(running_var),
                self.len(save_mean),
                self.len(save_invstd),
            )?;
            if let Some(r) = residual {
                check_lens(OP, &[("residual", self.len(r), slots(s.y_len()))])?;
            }
        } default {
            conv2d_bn_train_fwd_nhwc_bf16_by_conversions(
                self, s, bn, x, w, gamma, beta, running_mean, running_var, save_mean,
                save_invstd, z, y, residual, relu,
            )
        }
    }
    checked_op! {
        /// [`Backend::batchnorm_bwd_nhwc`] on bf16 storage: z (the forward's input) and y (its
        /// output, read when `relu`) in [`ActStorage::Bf16`], dy f32, dz written in bf16
        /// storage (rounded), dgamma and dbeta f32. The default unpacks z (and y), runs
        /// [`Backend::batchnorm_bwd_nhwc`] and packs dz ([`through_bf16_storage`]).
        fn batchnorm_bwd_nhwc_bf16 / batchnorm_bwd_nhwc_bf16_unchecked(
            &self,
            s: &BatchNorm2d,
            z: &Self::Buf,
            y: &Self::Buf,
            dy: &Self::Buf,
            gamma: &Self::Buf,
            save_mean: &Self::Buf,
            save_invstd: &Self::Buf,
            dz: &mut Self::Buf,
            dgamma: &mut Self::Buf,
            dbeta: &mut Self::Buf,
            relu: bool,
        ) -> Result<()> {
            const OP: &str = "batchnorm_bwd_nhwc_bf16";
            let slots = self.storage_slots(ActStorage::Bf16, s.len());
            check_lens(
                OP,
                &[
                    ("z", self.len(z), slots),
                    ("y", self.len(y), slots),
                    ("dz", self.len(dz), slots),
                ],
            )?;
            s.check_bwd(
                s.len(),
                s.len(),
                self.len(dy),
                s.len(),
                self.len(gamma),
                self.len(save_mean),
                self.len(save_invstd),
                self.len(dgamma),
                self.len(dbeta),
            )?;
        } default {
            let len = s.len();
            // y is read only to mask dy by the fused ReLU: without one, z stands in for it.
            let mut ins = vec![(z, len)];
            if relu {
                ins.push((y, len));
            }
            through_bf16_storage(self, &ins, &mut [(dz, len)], |i, o| {
                let yf = i.get(1).unwrap_or(&i[0]);
                self.batchnorm_bwd_nhwc(
                    s, &i[0], yf, dy, gamma, save_mean, save_invstd, &mut o[0], dgamma, dbeta,
                    relu,
                )
            })
        }
    }
    checked_op! {
        /// [`Backend::conv2d_bwd_data_nhwc`] with dy in bf16 storage ([`ActStorage::Bf16`]),
        /// w OIHW and dx f32. The default unpacks dy and runs the f32 op.
        fn conv2d_bwd_data_nhwc_bf16 / conv2d_bwd_data_nhwc_bf16_unchecked(
            &self,
            s: &Conv2d,
            dy: &Self::Buf,
            w: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            const OP: &str = "conv2d_bwd_data_nhwc_bf16";
            s.check(OP)?;
            check_lens(
                OP,
                &[
                    ("dy", self.len(dy), self.storage_slots(ActStorage::Bf16, s.y_len())),
                    ("w", self.len(w), s.w_len()),
                    ("dx", self.len(dx), s.x_len()),
                ],
            )?;
        } default {
            through_bf16_storage(self, &[(dy, s.y_len())], &mut [], |i, _| {
                self.conv2d_bwd_data_nhwc(s, &i[0], w, dx)
            })
        }
    }
    checked_op! {
        /// [`Backend::conv2d_bwd_weight_nhwc`] with x and dy in bf16 storage
        /// ([`ActStorage::Bf16`]), dw OIHW f32. The default unpacks both and runs the f32 op.
        fn conv2d_bwd_weight_nhwc_bf16 / conv2d_bwd_weight_nhwc_bf16_unchecked(
            &self,
            s: &Conv2d,
            x: &Self::Buf,
            dy: &Self::Buf,
            dw: &mut Self::Buf,
        ) -> Result<()> {
            const OP: &str = "conv2d_bwd_weight_nhwc_bf16";
            s.check(OP)?;
            let slots = |v: usize| self.storage_slots(ActStorage::Bf16, v);
            check_lens(
                OP,
                &[
                    ("x", self.len(x), slots(s.x_len())),
                    ("dy", self.len(dy), slots(s.y_len())),
                    ("dw", self.len(dw), s.w_len()),
                ],
            )?;
        } default {
            through_bf16_storage(self, &[(x, s.x_len()), (dy, s.y_len())], &mut [], |i, _| {
                self.conv2d_bwd_weight_nhwc(s, &i[0], &i[1], dw)
            })
        }
    }
    checked_op! {
        /// [`Backend::relu_bwd`] with y (the ReLU's output) in bf16 storage
        /// ([`ActStorage::Bf16`]), dy and dx f32: dx = dy * (y > 0). The default unpacks y.
        fn relu_bwd_bf16 / relu_bwd_bf16_unchecked(
            &self,
            y: &Self::Buf,
            dy: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            let len = self.len(dy);
            check_lens(
                "relu_bwd_bf16",
                &[
                    ("y", self.len(y), self.storage_slots(ActStorage::Bf16, len)),
                    ("dx", self.len(dx), len),
                ],
            )?;
        } default {
            through_bf16_storage(self, &[(y, self.len(dy))], &mut [], |i, _| {
                self.relu_bwd(&i[0], dy, dx)
            })
        }
    }

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
    checked_op! {
        fn maxpool2d_fwd / maxpool2d_fwd_unchecked(
            &self,
            s: &Pool2d,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            s.check_fwd(self.len(x), self.len(y))?;
        }
    }
    checked_op! {
        /// Routes each dy to the first maximum (row-major scan of the window) of its window in x.
        fn maxpool2d_bwd / maxpool2d_bwd_unchecked(
            &self,
            s: &Pool2d,
            x: &Self::Buf,
            y: &Self::Buf,
            dy: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd(self.len(x), self.len(y), self.len(dy), self.len(dx))?;
        }
    }
    checked_op! {
        /// `y[i]` = mean of `x[i, 0..hw]` for i in `0..rows` (rows = n*c).
        fn global_avg_pool_fwd / global_avg_pool_fwd_unchecked(
            &self,
            rows: usize,
            hw: usize,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            RowMean { rows, hw }.check_fwd(self.len(x), self.len(y))?;
        }
    }
    checked_op! {
        fn global_avg_pool_bwd / global_avg_pool_bwd_unchecked(
            &self,
            rows: usize,
            hw: usize,
            dy: &Self::Buf,
            dx: &mut Self::Buf,
        ) -> Result<()> {
            RowMean { rows, hw }.check_bwd(self.len(dy), self.len(dx))?;
        }
    }

    // ---- dense ---------------------------------------------------------------------------
    checked_op! {
        /// `y[m, n] = x[m, k] . w[n, k]^T + b[n]`.
        fn linear_fwd / linear_fwd_unchecked(
            &self,
            m: usize,
            k: usize,
            n: usize,
            x: &Self::Buf,
            w: &Self::Buf,
            b: Option<&Self::Buf>,
            y: &mut Self::Buf,
        ) -> Result<()> {
            Linear { m, k, n }.check_fwd(self.len(x), self.len(w), b.map(|b| self.len(b)), self.len(y))?;
        }
    }
    checked_op! {
        /// dx = dy . w (if wanted), dw = dy^T . x, db = column sums of dy (if wanted).
        fn linear_bwd / linear_bwd_unchecked(
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
        ) -> Result<()> {
            Linear { m, k, n }.check_bwd(
                self.len(x),
                self.len(w),
                self.len(dy),
                dx.as_deref().map(|d| self.len(d)),
                self.len(dw),
                db.as_deref().map(|d| self.len(d)),
            )?;
        }
    }

    // ---- LSTM (one layer, full sequence) -------------------------------------------------
    checked_op! {
        /// Forward over the whole sequence from a zero state. Writes h_seq and c_seq
        /// `[batch, seq, hidden]` and the activated gates `[batch, seq, 4*hidden]` (i, f, g, o
        /// after sigmoid/tanh) that BPTT needs.
        fn lstm_fwd / lstm_fwd_unchecked(
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
        ) -> Result<()> {
            s.check_fwd(
                self.len(x),
                self.len(w_ih),
                self.len(w_hh),
                self.len(b_ih),
                self.len(b_hh),
                self.len(h_seq),
                self.len(c_seq),
                self.len(gates),
            )?;
        }
    }
    checked_op! {
        /// Backpropagation through time given dL/dh for every step. Overwrites dx and the weight
        /// gradients; `db` is the gradient of both b_ih and b_hh (they are equal).
        fn lstm_bwd / lstm_bwd_unchecked(
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
        ) -> Result<()> {
            s.check_bwd(
                self.len(x),
                self.len(w_ih),
                self.len(w_hh),
                self.len(h_seq),
                self.len(c_seq),
                self.len(gates),
                self.len(dh_seq),
                self.len(dx),
                self.len(dw_ih),
                self.len(dw_hh),
                self.len(db),
            )?;
        }
    }

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
    checked_op! {
        /// `cam[i, p] = sum_c weights[c] * features[i, c, p]` for features `[n, c, hw]`.
        fn cam_weight / cam_weight_unchecked(
            &self,
            n: usize,
            c: usize,
            hw: usize,
            features: &Self::Buf,
            weights: &Self::Buf,
            cam: &mut Self::Buf,
        ) -> Result<()> {
            Maps { n, c, hw }.check_cam_weight(self.len(features), self.len(weights), self.len(cam))?;
        }
    }
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
        Maps { n, c, hw: fh * fw }.check_cam_weight(
            self.len(features),
            self.len(weights),
            self.len(cam),
        )?;
        Resize {
            n,
            h: fh,
            w: fw,
            oh,
            ow,
        }
        .check(self.len(cam), self.len(norm))?;
        // SAFETY: the buffers hold the lengths the shapes give (checked above).
        unsafe { self.cam_normalized_unchecked(n, c, fh, fw, oh, ow, features, weights, cam, norm) }
    }
    /// [`Backend::cam_normalized`] once its lengths are checked; the default runs the three ops.
    ///
    /// # Safety
    /// Every buffer holds the length the shapes give (what [`Backend::cam_normalized`] checks).
    #[allow(clippy::too_many_arguments)]
    unsafe fn cam_normalized_unchecked(
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
    checked_op! {
        /// Grad-CAM: alpha[i, c] = mean over p of grads[i, c, p]; out[i, p] = relu(sum_c alpha * features).
        fn gradcam / gradcam_unchecked(
            &self,
            n: usize,
            c: usize,
            hw: usize,
            features: &Self::Buf,
            grads: &Self::Buf,
            out: &mut Self::Buf,
        ) -> Result<()> {
            Maps { n, c, hw }.check_gradcam(self.len(features), self.len(grads), self.len(out))?;
        }
    }
    checked_op! {
        /// Bilinear resize of `[n, h, w]` to `[n, oh, ow]`, PyTorch's align_corners=False.
        fn upsample_bilinear / upsample_bilinear_unchecked(
            &self,
            n: usize,
            h: usize,
            w: usize,
            oh: usize,
            ow: usize,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            Resize { n, h, w, oh, ow }.check(self.len(x), self.len(y))?;
        }
    }
    checked_op! {
        /// Per row of `[n, len]`: (x - min) / (max - min); a constant row becomes all zeros.
        fn minmax_normalize / minmax_normalize_unchecked(
            &self,
            n: usize,
            len: usize,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            check_minmax(n, len, self.len(x), self.len(y))?;
        }
    }

    // ---- layout --------------------------------------------------------------------------
    checked_op! {
        /// y `[n, hw, c]` (channels-last, NHWC) = x `[n, c, hw]` (NCHW): per image the
        /// `c x hw` matrix transposed, every value copied exactly.
        fn nchw_to_nhwc / nchw_to_nhwc_unchecked(
            &self,
            s: &Transpose,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            s.check("nchw_to_nhwc", self.len(x), self.len(y))?;
        }
    }
    checked_op! {
        /// y `[n, c, hw]` (NCHW) = x `[n, hw, c]` (channels-last, NHWC): the inverse of
        /// [`Backend::nchw_to_nhwc`], every value copied exactly.
        fn nhwc_to_nchw / nhwc_to_nchw_unchecked(
            &self,
            s: &Transpose,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            s.check("nhwc_to_nchw", self.len(x), self.len(y))?;
        }
    }

    checked_op! {
        /// [`Backend::nchw_to_nhwc`] into bf16 storage: y `[n, hw, c]` in
        /// [`ActStorage::Bf16`] ([`Backend::storage_slots`] slots), each value rounded to
        /// bf16 (nearest even).
        fn nchw_to_nhwc_bf16 / nchw_to_nhwc_bf16_unchecked(
            &self,
            s: &Transpose,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            const OP: &str = "nchw_to_nhwc_bf16";
            let len = s.values(OP)?;
            check_lens(OP, &[("x", self.len(x), len), ("y", self.len(y), self.storage_slots(ActStorage::Bf16, len))])?;
        }
    }
    checked_op! {
        /// [`Backend::nhwc_to_nchw`] out of bf16 storage: x `[n, hw, c]` in
        /// [`ActStorage::Bf16`], y `[n, c, hw]` f32, every value exact.
        fn nhwc_bf16_to_nchw / nhwc_bf16_to_nchw_unchecked(
            &self,
            s: &Transpose,
            x: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            const OP: &str = "nhwc_bf16_to_nchw";
            let len = s.values(OP)?;
            check_lens(OP, &[("x", self.len(x), self.storage_slots(ActStorage::Bf16, len)), ("y", self.len(y), len)])?;
        }
    }

    // ---- U-Net (stage 3) -----------------------------------------------------------------
    checked_op! {
        /// `y[i, ch, p] = y[i, ch, p] + b[ch]` over y `[n, c, hw]`, then `max(., 0)` when `relu`:
        /// a convolution's bias (and the ReLU after it), in place.
        fn bias_relu_assign / bias_relu_assign_unchecked(
            &self,
            n: usize,
            c: usize,
            hw: usize,
            b: &Self::Buf,
            y: &mut Self::Buf,
            relu: bool,
        ) -> Result<()> {
            Maps { n, c, hw }.check_bias(self.len(b), self.len(y))?;
        }
    }
    checked_op! {
        /// `db[ch]` = sum over i and p of `dy[i, ch, p]` for dy `[n, c, hw]`: a bias's gradient.
        fn bias_bwd / bias_bwd_unchecked(
            &self,
            n: usize,
            c: usize,
            hw: usize,
            dy: &Self::Buf,
            db: &mut Self::Buf,
        ) -> Result<()> {
            Maps { n, c, hw }.check_bias_bwd(self.len(dy), self.len(db))?;
        }
    }
    checked_op! {
        /// `y[:, y_offset + co] = conv_transpose(x, w)[:, co] + b[co]` (kernel = stride = k); the
        /// other channels of y are left as they are.
        fn upconv2d_fwd / upconv2d_fwd_unchecked(
            &self,
            s: &UpConv2d,
            x: &Self::Buf,
            w: &Self::Buf,
            b: &Self::Buf,
            y: &mut Self::Buf,
        ) -> Result<()> {
            s.check_fwd(self.len(x), self.len(w), self.len(b), self.len(y))?;
        }
    }
    checked_op! {
        /// Backward of [`Backend::upconv2d_fwd`] from the gradient of the whole wider output
        /// (only the op's channel slice of `dy` is read): overwrites dx, dw and db.
        fn upconv2d_bwd / upconv2d_bwd_unchecked(
            &self,
            s: &UpConv2d,
            x: &Self::Buf,
            w: &Self::Buf,
            dy: &Self::Buf,
            dx: &mut Self::Buf,
            dw: &mut Self::Buf,
            db: &mut Self::Buf,
        ) -> Result<()> {
            s.check_bwd(
                self.len(x),
                self.len(w),
                self.len(dy),
                self.len(dx),
                self.len(dw),
                self.len(db),
            )?;
        }
    }
    checked_op! {
        /// dst[i, dst_offset + k, p] = src[i, src_offset + k, p] for k < s.c (`+=` when
        /// `accumulate`); dst's other channels are left as they are. The concatenation and, with
        /// `accumulate`, its backward.
        fn copy_channels / copy_channels_unchecked(
            &self,
            s: &ChannelCopy,
            src: &Self::Buf,
            dst: &mut Self::Buf,
            accumulate: bool,
        ) -> Result<()> {
            s.check(self.len(src), self.len(dst))?;
        }
    }

    /// y = 1 / (1 + exp(-x)).
    fn sigmoid_fwd(&self, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// dx = dy * y * (1 - y), y being the sigmoid's output.
    fn sigmoid_bwd(&self, y: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf) -> Result<()>;
    checked_op! {
        /// The soft Dice loss of probabilities against 0/1 targets (see [`SoftDice`]), summed in
        /// f64; returns the loss and writes dL/dprobs.
        fn soft_dice_loss / soft_dice_loss_unchecked(
            &self,
            s: &SoftDice,
            probs: &Self::Buf,
            targets: &Self::Buf,
            dprobs: &mut Self::Buf,
        ) -> Result<f64> {
            s.check(self.len(probs), self.len(targets), self.len(dprobs))?;
        }
    }
}

/// The channels-last eval unit by layout changes: x (and the residual) to NCHW temporaries
/// ([`Backend::scratch`]), [`Backend::conv2d_bn_eval_fwd`], its output back to NHWC: bit for
/// bit the NCHW op, at the cost of three transposes. The trait's default for
/// [`Backend::conv2d_bn_eval_fwd_nhwc`], and a backend's fallback where its native
/// channels-last kernel does not run a shape. Lengths as that op checks them (the ops it
/// runs check them again).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bn_eval_fwd_nhwc_by_transposes<B: Backend + ?Sized>(
    be: &B,
    s: &Conv2d,
    bn: &BatchNorm2d,
    x: &B::Buf,
    w: &B::Buf,
    gamma: &B::Buf,
    beta: &B::Buf,
    running_mean: &B::Buf,
    running_var: &B::Buf,
    residual: Option<&B::Buf>,
    relu: bool,
    y: &mut B::Buf,
) -> Result<()> {
    if s.y_len() == 0 {
        return Ok(());
    }
    let (t_in, t_out) = conv_transposes(s);
    let mut ins = vec![(x, t_in)];
    if let Some(r) = residual {
        ins.push((r, t_out));
    }
    nchw_between_layout_changes(be, &ins, &mut [(y, t_out)], |i, o| {
        be.conv2d_bn_eval_fwd(
            s,
            bn,
            &i[0],
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            i.get(1),
            relu,
            &mut o[0],
        )
    })
}

/// The one mechanism of the scratch runners ([`nchw_between_layout_changes`],
/// [`through_bf16_storage`]): each of `inputs` (a buffer and what its conversion needs, `D`)
/// converted by `into` into a [`Backend::scratch`] buffer of `len` values, `run` on those and on scratch buffers of `len` values for the `outputs`,
/// each of which is then converted by `back` into its output; every scratch buffer given
/// back whatever happens (an input's even when its conversion fails).
fn through_scratch<B: Backend + ?Sized, D>(
    be: &B,
    inputs: &[(&B::Buf, D)],
    outputs: &mut [(&mut B::Buf, D)],
    len: impl Fn(&B::Buf, &D) -> usize,
    into: impl Fn(&D, &B::Buf, &mut B::Buf) -> Result<()>,
    back: impl Fn(&D, &B::Buf, &mut B::Buf) -> Result<()>,
    run: impl FnOnce(&[B::Buf], &mut [B::Buf]) -> Result<()>,
) -> Result<()> {
    let mut ins: Vec<B::Buf> = Vec::with_capacity(inputs.len());
    let mut outs: Vec<B::Buf> = Vec::with_capacity(outputs.len());
    let r = (|| {
        for (x, d) in inputs {
            let mut xt = be.scratch(len(x, d))?;
            let converted = into(d, x, &mut xt);
            ins.push(xt);
            converted?;
        }
        for (y, d) in outputs.iter() {
            outs.push(be.scratch(len(y, d))?);
        }
        run(&ins, &mut outs)?;
        for ((y, d), yt) in outputs.iter_mut().zip(&outs) {
            back(d, yt, y)?;
        }
        Ok(())
    })();
    for b in ins.into_iter().chain(outs) {
        be.recycle(b);
    }
    r
}

/// The layout changes of a convolution's input `[n, c_in, h*w]` and output
/// `[n, c_out, out_h*out_w]`.
fn conv_transposes(s: &Conv2d) -> (Transpose, Transpose) {
    (
        Transpose {
            n: s.n,
            c: s.c_in,
            hw: s.h * s.w,
        },
        Transpose {
            n: s.n,
            c: s.c_out,
            hw: s.out_h() * s.out_w(),
        },
    )
}

/// The checks of [`Backend::conv2d_bn_train_fwd`] (and its channels-last twin, `op`): the
/// buffers x, w, gamma, beta, running_mean, running_var, save_mean, save_invstd, z, y in
/// that order, and the residual.
fn check_conv_bn_train<B: Backend + ?Sized>(
    be: &B,
    op: &'static str,
    s: &Conv2d,
    bn: &BatchNorm2d,
    bufs: [&B::Buf; 10],
    residual: Option<&B::Buf>,
) -> Result<()> {
    let [x, w, gamma, beta, rm, rv, sm, si, z, y] = bufs.map(|b| be.len(b));
    s.check_fwd(x, w, z)?;
    bn.check_after_conv(op, s, [gamma, beta, rm, rv], residual.map(|r| be.len(r)))?;
    bn.check_train_fwd(z, y, gamma, beta, rm, rv, sm, si)
}

/// Runs an NCHW op on channels-last tensors by layout changes: each of `inputs` (an NHWC
/// tensor and its [`Transpose`] shape `{n, c, hw}`) changed into an NCHW
/// [`Backend::scratch`] buffer of its length, `run` on those and on NCHW scratch buffers as
/// long as the `outputs`, each of which is then changed into its NHWC output; the scratch
/// given back whatever happens (`through_scratch`). The layout changes copy values, so the
/// result is bit for bit the NCHW op's. The trait's defaults of the channels-last ops
/// ([`conv2d_bn_eval_fwd_nhwc_by_transposes`], [`conv2d_bn_train_fwd_nhwc_by_transposes`], [`Backend::batchnorm_bwd_nhwc`],
/// [`Backend::conv2d_bwd_data_nhwc`], [`Backend::conv2d_bwd_weight_nhwc`]), and a backend's
/// fallback where its native channels-last kernel does not run a shape. The lengths are
/// the caller's (checked by its op; the ops run here check them again).
pub fn nchw_between_layout_changes<B: Backend + ?Sized>(
    be: &B,
    inputs: &[(&B::Buf, Transpose)],
    outputs: &mut [(&mut B::Buf, Transpose)],
    run: impl FnOnce(&[B::Buf], &mut [B::Buf]) -> Result<()>,
) -> Result<()> {
    through_scratch(
        be,
        inputs,
        outputs,
        |b, _| be.len(b),
        |t, x, xt| be.nhwc_to_nchw(t, x, xt),
        |t, yt, y| be.nchw_to_nhwc(t, yt, y),
        run,
    )
}

/// The channels-last training unit by layout changes: x (and the residual) to NCHW
/// temporaries, [`Backend::conv2d_bn_train_fwd`] (running statistics, saved mean and invstd
/// written directly), z and y back to NHWC: bit for bit the NCHW op. The trait's default for
/// [`Backend::conv2d_bn_train_fwd_nhwc`], and a backend's fallback where its native
/// channels-last kernel does not run a shape. Lengths as that op checks them.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bn_train_fwd_nhwc_by_transposes<B: Backend + ?Sized>(
    be: &B,
    s: &Conv2d,
    bn: &BatchNorm2d,
    x: &B::Buf,
    w: &B::Buf,
    gamma: &B::Buf,
    beta: &B::Buf,
    running_mean: &mut B::Buf,
    running_var: &mut B::Buf,
    save_mean: &mut B::Buf,
    save_invstd: &mut B::Buf,
    z: &mut B::Buf,
    y: &mut B::Buf,
    residual: Option<&B::Buf>,
    relu: bool,
) -> Result<()> {
    let (t_in, t_out) = conv_transposes(s);
    let mut ins = vec![(x, t_in)];
    if let Some(r) = residual {
        ins.push((r, t_out));
    }
    nchw_between_layout_changes(be, &ins, &mut [(z, t_out), (y, t_out)], |i, o| {
        let (zt, yt) = o.split_at_mut(1);
        be.conv2d_bn_train_fwd(
            s,
            bn,
            &i[0],
            w,
            gamma,
            beta,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            &mut zt[0],
            &mut yt[0],
            i.get(1),
            relu,
        )
    })
}

/// [`Backend::batchnorm_bwd_nhwc`] by layout changes: x, dy (and y, when `relu` reads it) to
/// NCHW temporaries, [`Backend::batchnorm_bwd`], dx back: bit for bit the NCHW op. The
/// trait's default; a backend's fallback.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_bwd_nhwc_by_transposes<B: Backend + ?Sized>(
    be: &B,
    s: &BatchNorm2d,
    x: &B::Buf,
    y: &B::Buf,
    dy: &B::Buf,
    gamma: &B::Buf,
    save_mean: &B::Buf,
    save_invstd: &B::Buf,
    dx: &mut B::Buf,
    dgamma: &mut B::Buf,
    dbeta: &mut B::Buf,
    relu: bool,
) -> Result<()> {
    let t = Transpose {
        n: s.n,
        c: s.c,
        hw: s.hw,
    };
    // y is read only to mask dy by the fused ReLU: without one, x stands in for it.
    let mut ins = vec![(x, t), (dy, t)];
    if relu {
        ins.push((y, t));
    }
    nchw_between_layout_changes(be, &ins, &mut [(dx, t)], |i, o| {
        let (xt, dyt) = (&i[0], &i[1]);
        let yt = i.get(2).unwrap_or(xt);
        be.batchnorm_bwd(
            s,
            xt,
            yt,
            dyt,
            gamma,
            save_mean,
            save_invstd,
            &mut o[0],
            dgamma,
            dbeta,
            relu,
        )
    })
}

/// [`Backend::conv2d_bwd_data_nhwc`] by layout changes: dy to NCHW,
/// [`Backend::conv2d_bwd_data`], dx back: bit for bit the NCHW op. The trait's default; a
/// backend's fallback where its native channels-last kernel does not run a shape.
pub fn conv2d_bwd_data_nhwc_by_transposes<B: Backend + ?Sized>(
    be: &B,
    s: &Conv2d,
    dy: &B::Buf,
    w: &B::Buf,
    dx: &mut B::Buf,
) -> Result<()> {
    let (t_in, t_out) = conv_transposes(s);
    nchw_between_layout_changes(be, &[(dy, t_out)], &mut [(dx, t_in)], |i, o| {
        be.conv2d_bwd_data(s, &i[0], w, &mut o[0])
    })
}

/// [`Backend::conv2d_bwd_weight_nhwc`] by layout changes: x and dy to NCHW,
/// [`Backend::conv2d_bwd_weight`] (dw OIHW either way): bit for bit the NCHW op. The trait's
/// default; a backend's fallback where its native channels-last kernel does not run a shape.
pub fn conv2d_bwd_weight_nhwc_by_transposes<B: Backend + ?Sized>(
    be: &B,
    s: &Conv2d,
    x: &B::Buf,
    dy: &B::Buf,
    dw: &mut B::Buf,
) -> Result<()> {
    let (t_in, t_out) = conv_transposes(s);
    nchw_between_layout_changes(be, &[(x, t_in), (dy, t_out)], &mut [], |i, _| {
        be.conv2d_bwd_weight(s, &i[0], &i[1], dw)
    })
}

/// Runs an f32 op on tensors in bf16 storage by conversions: each of `inputs` (a bf16
/// tensor and its number of values) unpacked ([`Backend::unpack_bf16`]) into an f32
/// [`Backend::scratch`] buffer of that many values, `run` on those and on f32 scratch
/// buffers as long as the `outputs` (bf16 tensors and their numbers of values), each of
/// which is then packed into its output ([`Backend::pack_bf16`], rounded to nearest even);
/// the scratch given back whatever happens (`through_scratch`). The trait's defaults of the
/// bf16-storage training ops, and a backend's fallback where its native kernel does not run a shape.
/// The lengths are the caller's (checked by its op; the conversions check them again).
pub fn through_bf16_storage<B: Backend + ?Sized>(
    be: &B,
    inputs: &[(&B::Buf, usize)],
    outputs: &mut [(&mut B::Buf, usize)],
    run: impl FnOnce(&[B::Buf], &mut [B::Buf]) -> Result<()>,
) -> Result<()> {
    through_scratch(
        be,
        inputs,
        outputs,
        |_, &values| values,
        |_, x, xf| be.unpack_bf16(x, xf),
        |_, yf, y| be.pack_bf16(yf, y),
        run,
    )
}

/// [`Backend::conv2d_bn_train_fwd_nhwc_bf16`] by conversions: x out of bf16 storage into
/// an NCHW scratch copy ([`Backend::nhwc_bf16_to_nchw`]: the unpack and the layout change in
/// one pass), [`Backend::conv2d_fwd`], its output into z in bf16 storage
/// ([`Backend::nchw_to_nhwc_bf16`]: rounded), z unpacked again (so that the statistics are
/// those of the rounded z the backward reads), [`Backend::batchnorm_train_fwd`] on it as
/// `[n * out_hw, c_out]` (channels-last z is NCHW with one pixel per "image": the same
/// per-channel statistics), the residual join as [`Backend::conv2d_bn_train_fwd`]'s
/// default, y packed (rounded). The trait's default (the CPU reference) and a backend's
/// fallback. Lengths as that op checks them.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_bn_train_fwd_nhwc_bf16_by_conversions<B: Backend + ?Sized>(
    be: &B,
    s: &Conv2d,
    bn: &BatchNorm2d,
    x: &B::Buf,
    w: &B::Buf,
    gamma: &B::Buf,
    beta: &B::Buf,
    running_mean: &mut B::Buf,
    running_var: &mut B::Buf,
    save_mean: &mut B::Buf,
    save_invstd: &mut B::Buf,
    z: &mut B::Buf,
    y: &mut B::Buf,
    residual: Option<&B::Buf>,
    relu: bool,
) -> Result<()> {
    if s.y_len() == 0 {
        return Ok(());
    }
    let (t_in, t_out) = conv_transposes(s);
    let flat = BatchNorm2d {
        n: s.n * s.out_h() * s.out_w(),
        c: s.c_out,
        hw: 1,
        ..*bn
    };
    let ins: Vec<(&B::Buf, usize)> = residual.map(|r| (r, s.y_len())).into_iter().collect();
    through_bf16_storage(be, &ins, &mut [(y, s.y_len())], |i, o| {
        let mut xt = be.scratch(s.x_len())?;
        let mut zt = be.scratch(s.y_len())?;
        let r = (|| {
            be.nhwc_bf16_to_nchw(&t_in, x, &mut xt)?;
            be.conv2d_fwd(s, &xt, w, &mut zt)?;
            be.nchw_to_nhwc_bf16(&t_out, &zt, z)?;
            // zt now holds the rounded z, channels-last.
            be.unpack_bf16(z, &mut zt)?;
            let Some(rf) = i.first() else {
                return be.batchnorm_train_fwd(
                    &flat,
                    &zt,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    save_mean,
                    save_invstd,
                    &mut o[0],
                    relu,
                );
            };
            let mut t = be.scratch(s.y_len())?;
            let joined = (|| {
                be.batchnorm_train_fwd(
                    &flat,
                    &zt,
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    save_mean,
                    save_invstd,
                    &mut t,
                    false,
                )?;
                if relu {
                    be.add_relu_fwd(&t, rf, &mut o[0])
                } else {
                    be.copy(&t, &mut o[0])?;
                    be.add_assign(&mut o[0], rf)
                }
            })();
            be.recycle(t);
            joined
        })();
        be.recycle(xt);
        be.recycle(zt);
        r
    })
}
