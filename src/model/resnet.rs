//! torchvision's ResNet backbone over a [`Backend`]: the parameter declarations (names and
//! order of torchvision's `state_dict`) and the activations of one input shape, with the
//! forward pass (training-mode, batch-statistics or eval-mode batch norm) and the backward
//! pass that writes every backbone gradient through the training buffers made for those
//! activations ([`BackboneGrads`]: the activation gradients in buffers that every block
//! shares, the plan of [`super::grad_plan`]), channels-last (NHWC) between the stem's max-pool and the
//! global average pool on a backend that asks for it ([`Backend::channels_last_train`]),
//! those NHWC activations (and the units' dz) in the storage it asks for
//! ([`Backend::train_storage`]: f32, or bf16 in [`Backend::storage_slots`] slots each);
//! and the eval-mode backbone of inference
//! ([`BackboneEval`]), which keeps no layer's output but the last block's: its few buffers
//! follow the activation plan of [`super::eval_plan`] (test-time memory reused layer to
//! layer); on a backend that asks for it ([`Backend::channels_last_eval`]) its blocks run
//! channels-last (NHWC) between two layout changes, the features NCHW as ever, and those
//! NHWC activations in the storage the model asks for ([`ActStorage`]: f32, or bf16 in
//! [`Backend::storage_slots`] slots each). The stem is
//! 7x7/2 conv, BN, ReLU, 3x3/2
//! max-pool; stages of basic or bottleneck blocks (stride on the 3x3, as torchvision v1.5);
//! a 1x1 conv + BN downsample when the stride or the channel count changes; then global
//! average pooling. Knows nothing about the LSTM, the heads or files.

use super::config::{BlockKind, ModelConfig};
use super::eval_plan::{self, Plan, PlanOp, Src};
use super::grad_plan::{self, BackboneShape, BlockOps, BlockShape, GradOps};
use super::memory::ActLayout;
use super::params::{grad_buf, Group, Init, ParamStore, Trainable, S, W};
use super::ModelError;
use crate::engine::shapes::Transpose;
use crate::engine::{ActStorage, Backend, BatchNorm2d, Conv2d, Pool2d};

/// How a forward pass normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BnMode {
    /// PyTorch's train(): batch statistics, running stats updated.
    Train,
    /// Batch statistics, running stats left as they are.
    Batch,
    /// PyTorch's eval(): running stats. Inference runs it on [`BackboneEval`];
    /// [`BackboneActs`] runs it keeping every unit's output (the reference the activation
    /// plan is tested against).
    Eval,
}

/// Indices into the parameter store of one conv + BN pair, and the conv's geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvBnSpec {
    w: W,
    g: W,
    b: W,
    rm: S,
    rv: S,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl ConvBnSpec {
    /// The conv's and the batch norm's shapes on input `[n, c_in, h, w]`.
    fn geometry(
        &self,
        n: usize,
        h: usize,
        w: usize,
        eps: f64,
        momentum: f64,
    ) -> (Conv2d, BatchNorm2d) {
        let conv = Conv2d {
            n,
            c_in: self.c_in,
            h,
            w,
            c_out: self.c_out,
            kh: self.k,
            kw: self.k,
            stride: self.stride,
            pad: self.pad,
        };
        let bn = BatchNorm2d {
            n,
            c: self.c_out,
            hw: conv.out_h() * conv.out_w(),
            eps,
            momentum,
        };
        (conv, bn)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct BlockSpec {
    /// conv1/bn1, conv2/bn2 (and conv3/bn3 for bottlenecks), in order.
    units: Vec<ConvBnSpec>,
    down: Option<ConvBnSpec>,
}

#[derive(Clone, Debug)]
pub(crate) struct BackboneSpec {
    stem: ConvBnSpec,
    blocks: Vec<BlockSpec>,
    pub out_c: usize,
    eps: f64,
    momentum: f64,
}

#[allow(clippy::too_many_arguments)]
fn declare_conv_bn<B: Backend>(
    store: &mut ParamStore<B>,
    be: &B,
    conv: &str,
    bn: &str,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
    seed: u64,
) -> Result<ConvBnSpec, ModelError> {
    let bb = Group::Backbone;
    let w = store.add_trainable(
        be,
        format!("{conv}.weight"),
        vec![c_out, c_in, k, k],
        bb,
        Init::KaimingConvFanOut,
        seed,
    )?;
    let g = store.add_trainable(
        be,
        format!("{bn}.weight"),
        vec![c_out],
        bb,
        Init::Constant(1.0),
        seed,
    )?;
    let b = store.add_trainable(
        be,
        format!("{bn}.bias"),
        vec![c_out],
        bb,
        Init::Constant(0.0),
        seed,
    )?;
    let rm = store.add_stat(be, format!("{bn}.running_mean"), vec![c_out], bb, 0.0)?;
    let rv = store.add_stat(be, format!("{bn}.running_var"), vec![c_out], bb, 1.0)?;
    Ok(ConvBnSpec {
        w,
        g,
        b,
        rm,
        rv,
        c_in,
        c_out,
        k,
        stride,
        pad,
    })
}

/// The stem's max-pool (3x3, stride 2, padding 1) over its `c`-channel `h x w` output.
fn stem_pool(n: usize, c: usize, h: usize, w: usize) -> Pool2d {
    Pool2d {
        n,
        c,
        h,
        w,
        k: 3,
        stride: 2,
        pad: 1,
    }
}

/// Declares the backbone's tensors in torchvision's order.
pub(crate) fn declare<B: Backend>(
    store: &mut ParamStore<B>,
    be: &B,
    cfg: &ModelConfig,
    seed: u64,
) -> Result<BackboneSpec, ModelError> {
    let base = cfg.base_width;
    let stem = declare_conv_bn(
        store,
        be,
        "conv1",
        "bn1",
        cfg.in_channels,
        base,
        7,
        2,
        3,
        seed,
    )?;
    let mut blocks = Vec::new();
    let mut cin = base;
    for (i, &n) in cfg.layers.iter().enumerate() {
        let w = base << i;
        for j in 0..n {
            let stride = if j == 0 && i > 0 { 2 } else { 1 };
            let p = format!("layer{}.{}", i + 1, j);
            let c = |k: usize| format!("{p}.conv{k}");
            let b = |k: usize| format!("{p}.bn{k}");
            let (units, cout) = match cfg.block {
                BlockKind::Basic => (
                    vec![
                        declare_conv_bn(store, be, &c(1), &b(1), cin, w, 3, stride, 1, seed)?,
                        declare_conv_bn(store, be, &c(2), &b(2), w, w, 3, 1, 1, seed)?,
                    ],
                    w,
                ),
                BlockKind::Bottleneck => (
                    vec![
                        declare_conv_bn(store, be, &c(1), &b(1), cin, w, 1, 1, 0, seed)?,
                        declare_conv_bn(store, be, &c(2), &b(2), w, w, 3, stride, 1, seed)?,
                        declare_conv_bn(store, be, &c(3), &b(3), w, w * 4, 1, 1, 0, seed)?,
                    ],
                    w * 4,
                ),
            };
            let down = if stride != 1 || cin != cout {
                let (dc, db) = (format!("{p}.downsample.0"), format!("{p}.downsample.1"));
                Some(declare_conv_bn(
                    store, be, &dc, &db, cin, cout, 1, stride, 0, seed,
                )?)
            } else {
                None
            };
            blocks.push(BlockSpec { units, down });
            cin = cout;
        }
    }
    Ok(BackboneSpec {
        stem,
        blocks,
        out_c: cin,
        eps: cfg.bn_eps,
        momentum: cfg.bn_momentum,
    })
}

fn two_mut<B: Backend>(
    w: &mut [Trainable<B>],
    a: W,
    b: W,
) -> Result<[&mut Trainable<B>; 2], ModelError> {
    w.get_disjoint_mut([a.0, b.0])
        .map_err(|e| ModelError::Internal(format!("parameter indices {a:?}, {b:?}: {e}")))
}

/// The activations of one conv + BN (+ ReLU) for one input shape.
struct UnitActs<B: Backend> {
    spec: ConvBnSpec,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: bool,
    /// Whether the unit's activations are channels-last (NHWC): its ops the `*_nhwc` ones.
    nhwc: bool,
    /// The storage of its activations (input, residual, z, y, and the gradient dz):
    /// [`ActStorage::Bf16`] only channels-last, its ops then the `*_nhwc_bf16` ones and its
    /// buffers [`Backend::storage_slots`] slots each.
    storage: ActStorage,
    /// Conv output (BN input).
    z: B::Buf,
    /// BN (+ ReLU) output; empty for a block's last unit, which writes the block's output
    /// (the residual join fused into its normalisation) and has no ReLU of its own.
    y: B::Buf,
    mean: B::Buf,
    invstd: B::Buf,
    /// Copies of the running stats for [`BnMode::Batch`], which must not touch the real ones.
    scratch_mean: B::Buf,
    scratch_var: B::Buf,
}

/// The buffers of the backward pass's gradient plan ([`grad_plan`]), each gradient found
/// by the index of the op that writes it ([`GradOps`]); the plan never gives an op's
/// output the buffer of a tensor it reads (checked when it was made), so the pairs below
/// are two buffers (else a typed error).
struct GradBufs<'a, B: Backend> {
    bufs: &'a mut [B::Buf],
    out: &'a [usize],
}

impl<'a, B: Backend> GradBufs<'a, B> {
    fn index(&self, t: usize) -> Result<usize, ModelError> {
        self.out
            .get(t)
            .copied()
            .ok_or_else(|| ModelError::Internal(format!("gradient {t} not in the plan")))
    }

    /// The buffer holding gradient `t`.
    fn get(&self, t: usize) -> Result<&B::Buf, ModelError> {
        let b = self.index(t)?;
        self.bufs
            .get(b)
            .ok_or_else(|| ModelError::Internal(format!("gradient buffer {b} missing")))
    }

    /// The buffer that gradient `t` is written into.
    fn write(&mut self, t: usize) -> Result<&mut B::Buf, ModelError> {
        let b = self.index(t)?;
        self.bufs
            .get_mut(b)
            .ok_or_else(|| ModelError::Internal(format!("gradient buffer {b} missing")))
    }

    /// Gradient `r`'s buffer to read and gradient `w`'s to write (or update in place).
    fn rw(&mut self, r: usize, w: usize) -> Result<(&B::Buf, &mut B::Buf), ModelError> {
        let (rb, wb) = (self.index(r)?, self.index(w)?);
        let [rd, wr] = self.bufs.get_disjoint_mut([rb, wb]).map_err(|e| {
            ModelError::Internal(format!("gradients {r} and {w} (buffers {rb}, {wb}): {e}"))
        })?;
        Ok((&*rd, wr))
    }
}

impl<B: Backend> UnitActs<B> {
    /// `joins`: the unit is a block's last, whose forward writes the block's output through
    /// the residual join (`relu` must then be false: the join has the ReLU), so it keeps no
    /// `y` of its own.
    #[allow(clippy::too_many_arguments)]
    fn new(
        be: &B,
        spec: ConvBnSpec,
        n: usize,
        h: usize,
        w: usize,
        relu: bool,
        joins: bool,
        nhwc: bool,
        storage: ActStorage,
        eps: f64,
        momentum: f64,
    ) -> Result<Self, ModelError> {
        let (conv, bn) = spec.geometry(n, h, w, eps, momentum);
        let storage = if nhwc { storage } else { ActStorage::F32 };
        let slots = be.storage_slots(storage, conv.y_len());
        Ok(UnitActs {
            spec,
            conv,
            bn,
            relu,
            nhwc,
            storage,
            z: be.zeros(slots)?,
            y: be.zeros(if joins { 0 } else { slots })?,
            mean: be.zeros(spec.c_out)?,
            invstd: be.zeros(spec.c_out)?,
            scratch_mean: be.zeros(spec.c_out)?,
            scratch_var: be.zeros(spec.c_out)?,
        })
    }

    fn out_hw(&self) -> (usize, usize) {
        (self.conv.out_h(), self.conv.out_w())
    }

    /// The forward pass into this unit's `y`, or with `join` = (shortcut, out) a block's last
    /// unit with the residual join, `out = relu(bn(conv(x)) + shortcut)`: one backend op
    /// either way (conv, BN, and the join in the normalisation's output).
    fn forward(
        &mut self,
        be: &B,
        params: &mut ParamStore<B>,
        x: &B::Buf,
        mode: BnMode,
        join: Option<(&B::Buf, &mut B::Buf)>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        let (residual, relu, out) = match join {
            Some((r, o)) => (Some(r), true, Some(o)),
            None => (None, self.relu, None),
        };
        if mode == BnMode::Eval {
            return self.forward_eval(be, params, x, residual, relu, out);
        }
        let (w, g, b) = (
            &params.w[s.w.0].data,
            &params.w[s.g.0].data,
            &params.w[s.b.0].data,
        );
        let (rm, rv) = match mode {
            BnMode::Eval => return Ok(()), // handled above
            BnMode::Train => {
                let [rm, rv] = params.s.get_disjoint_mut([s.rm.0, s.rv.0]).map_err(|e| {
                    ModelError::Internal(format!("batch-norm statistic indices: {e}"))
                })?;
                (&mut rm.data, &mut rv.data)
            }
            BnMode::Batch => {
                be.copy(&params.s[s.rm.0].data, &mut self.scratch_mean)?;
                be.copy(&params.s[s.rv.0].data, &mut self.scratch_var)?;
                (&mut self.scratch_mean, &mut self.scratch_var)
            }
        };
        // Conv and batch norm (and the join) as one op: a backend may take the batch
        // statistics in the convolution's epilogue and the join in the normalisation (CUDA
        // does both).
        let y = match out {
            Some(o) => o,
            None => &mut self.y,
        };
        let unit = match (self.nhwc, self.storage) {
            (false, _) => B::conv2d_bn_train_fwd,
            (true, ActStorage::F32) => B::conv2d_bn_train_fwd_nhwc,
            (true, ActStorage::Bf16) => B::conv2d_bn_train_fwd_nhwc_bf16,
        };
        unit(
            be,
            &self.conv,
            &self.bn,
            x,
            w,
            g,
            b,
            rm,
            rv,
            &mut self.mean,
            &mut self.invstd,
            &mut self.z,
            y,
            residual,
            relu,
        )?;
        Ok(())
    }

    /// Eval-mode forward as one fused op (conv, BN with the running stats, optional
    /// residual, optional ReLU) into `out`, or into this unit's `y` when `out` is None.
    fn forward_eval(
        &mut self,
        be: &B,
        params: &ParamStore<B>,
        x: &B::Buf,
        residual: Option<&B::Buf>,
        relu: bool,
        out: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        let w = |i: W| &params.w[i.0].data;
        let st = |i: S| &params.s[i.0].data;
        let y = match out {
            Some(o) => o,
            None => &mut self.y,
        };
        let unit = match (self.nhwc, self.storage) {
            (false, _) => B::conv2d_bn_eval_fwd,
            (true, ActStorage::F32) => B::conv2d_bn_eval_fwd_nhwc,
            (true, ActStorage::Bf16) => B::conv2d_bn_eval_fwd_nhwc_bf16,
        };
        unit(
            be,
            &self.conv,
            &self.bn,
            x,
            w(s.w),
            w(s.g),
            w(s.b),
            st(s.rm),
            st(s.rv),
            residual,
            relu,
            y,
        )?;
        Ok(())
    }

    /// Backward of a training-mode forward: reads gradient `dy` (dL/d(this unit's
    /// output)) of `grads`, writes its dz into gradient `dz`, the conv and BN gradients
    /// into the store and, when asked, dL/d(input) into gradient `dx`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &B,
        params: &mut ParamStore<B>,
        grads: &mut GradBufs<'_, B>,
        x: &B::Buf,
        dy: usize,
        dz: usize,
        dx: Option<usize>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        // The output masks dy only for a ReLU of the unit's own; a unit without one (a block's
        // last keeps no `y`: its ReLU is the join's, masked by the caller) passes z, unread.
        let y = if self.relu { &self.y } else { &self.z };
        // Channels-last: the same ops on NHWC activations; in bf16 storage x, z, y and dz
        // stored in bf16 (dy and dx f32).
        let (bn_bwd, bwd_weight, bwd_data) = match (self.nhwc, self.storage) {
            (false, _) => (
                B::batchnorm_bwd as BnBwd<B>,
                B::conv2d_bwd_weight as ConvBwd<B>,
                B::conv2d_bwd_data as ConvBwd<B>,
            ),
            (true, ActStorage::F32) => (
                B::batchnorm_bwd_nhwc as BnBwd<B>,
                B::conv2d_bwd_weight_nhwc as ConvBwd<B>,
                B::conv2d_bwd_data_nhwc as ConvBwd<B>,
            ),
            (true, ActStorage::Bf16) => (
                B::batchnorm_bwd_nhwc_bf16 as BnBwd<B>,
                B::conv2d_bwd_weight_nhwc_bf16 as ConvBwd<B>,
                B::conv2d_bwd_data_nhwc_bf16 as ConvBwd<B>,
            ),
        };
        {
            let (dy, dz) = grads.rw(dy, dz)?;
            let [g, b] = two_mut(&mut params.w, s.g, s.b)?;
            bn_bwd(
                be,
                &self.bn,
                &self.z,
                y,
                dy,
                &g.data,
                &self.mean,
                &self.invstd,
                dz,
                grad_buf(&mut g.grad, &g.name)?,
                grad_buf(&mut b.grad, &b.name)?,
                self.relu,
            )?;
        }
        let pw = &mut params.w[s.w.0];
        let dzb = grads.get(dz)?;
        bwd_weight(be, &self.conv, x, dzb, grad_buf(&mut pw.grad, &pw.name)?)?;
        if let Some(dx) = dx {
            let (dz, dx) = grads.rw(dz, dx)?;
            bwd_data(be, &self.conv, dz, &pw.data, dx)?;
        }
        Ok(())
    }
}

/// [`Backend::batchnorm_bwd`] or its channels-last twin.
type BnBwd<B> = fn(
    &B,
    &BatchNorm2d,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &mut <B as Backend>::Buf,
    &mut <B as Backend>::Buf,
    &mut <B as Backend>::Buf,
    bool,
) -> crate::engine::Result<()>;

/// A convolution's data or weight gradient ([`Backend::conv2d_bwd_data`],
/// [`Backend::conv2d_bwd_weight`]) or its channels-last twin: two inputs, one output.
type ConvBwd<B> = fn(
    &B,
    &Conv2d,
    &<B as Backend>::Buf,
    &<B as Backend>::Buf,
    &mut <B as Backend>::Buf,
) -> crate::engine::Result<()>;

/// One residual block's activations.
struct BlockActs<B: Backend> {
    units: Vec<UnitActs<B>>,
    down: Option<UnitActs<B>>,
    /// The block's storage (its units', of `out` and of its input).
    storage: ActStorage,
    /// The block's output, in `storage`.
    out: B::Buf,
    out_len: usize,
    in_len: usize,
}

impl<B: Backend> BlockActs<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        be: &B,
        spec: &BlockSpec,
        n: usize,
        h: usize,
        w: usize,
        nhwc: bool,
        storage: ActStorage,
        eps: f64,
        momentum: f64,
    ) -> Result<(Self, usize, usize), ModelError> {
        let storage = if nhwc { storage } else { ActStorage::F32 };
        let mut units: Vec<UnitActs<B>> = Vec::with_capacity(spec.units.len());
        let (mut ch, mut cw) = (h, w);
        let last = spec.units.len() - 1;
        for (j, &u) in spec.units.iter().enumerate() {
            let (relu, joins) = (j != last, j == last);
            let a = UnitActs::new(be, u, n, ch, cw, relu, joins, nhwc, storage, eps, momentum)?;
            (ch, cw) = a.out_hw();
            units.push(a);
        }
        let down = match spec.down {
            Some(d) => Some(UnitActs::new(
                be, d, n, h, w, false, false, nhwc, storage, eps, momentum,
            )?),
            None => None,
        };
        let in_len = n * spec.units[0].c_in * h * w;
        let out_len = n * spec.units[last].c_out * ch * cw;
        let out = be.zeros(be.storage_slots(storage, out_len))?;
        Ok((
            BlockActs {
                units,
                down,
                storage,
                out,
                out_len,
                in_len,
            },
            ch,
            cw,
        ))
    }

    fn forward(
        &mut self,
        be: &B,
        params: &mut ParamStore<B>,
        x: &B::Buf,
        mode: BnMode,
    ) -> Result<(), ModelError> {
        let last = self.units.len() - 1;
        // The shortcut first, then the main branch, its last unit fused with the join
        // (`out = relu(bn(conv) + shortcut)`, in either mode: no separate add + ReLU pass).
        if let Some(d) = self.down.as_mut() {
            d.forward(be, params, x, mode, None)?;
        }
        for j in 0..=last {
            let (prev, cur) = self.units.split_at_mut(j);
            let input = if j == 0 { x } else { &prev[j - 1].y };
            let join = if j < last {
                None
            } else {
                let shortcut = match &self.down {
                    Some(d) => &d.y,
                    None => x,
                };
                Some((shortcut, &mut self.out))
            };
            cur[0].forward(be, params, input, mode, join)?;
        }
        Ok(())
    }

    /// Reads gradient `o.dout` of `grads`; writes the block's gradients there (`o`) and
    /// dL/d(block input) into gradient `o.dx`. `x` is the block's input.
    fn backward(
        &self,
        be: &B,
        params: &mut ParamStore<B>,
        grads: &mut GradBufs<'_, B>,
        o: &BlockOps,
        x: &B::Buf,
    ) -> Result<(), ModelError> {
        let last = self.units.len() - 1;
        if (o.dz.len(), o.dy.len(), o.down.is_some()) != (last + 1, last, self.down.is_some()) {
            return Err(ModelError::Internal(
                "the gradient plan's block differs from the activations'".into(),
            ));
        }
        {
            let (dout, g) = grads.rw(o.dout, o.g)?;
            match self.storage {
                ActStorage::F32 => be.relu_bwd(&self.out, dout, g)?,
                ActStorage::Bf16 => be.relu_bwd_bf16(&self.out, dout, g)?,
            }
        }
        for j in (0..=last).rev() {
            let dy = if j == last { o.g } else { o.dy[j] };
            let (input, dx) = if j == 0 {
                (x, o.dx)
            } else {
                (&self.units[j - 1].y, o.dy[j - 1])
            };
            self.units[j].backward(be, params, grads, input, dy, o.dz[j], Some(dx))?;
        }
        // The shortcut's gradient added to the main branch's: the downsample branch's input
        // gradient, or `g` itself.
        let shortcut = match (&self.down, o.down) {
            (Some(d), Some((dz, ddx))) => {
                d.backward(be, params, grads, x, o.g, dz, Some(ddx))?;
                ddx
            }
            _ => o.g,
        };
        let (sc, dx) = grads.rw(shortcut, o.dx)?;
        be.add_assign(dx, sc)?;
        Ok(())
    }
}

/// The backbone's activations for one input shape `[n, c, h, w]`, reused while the shape
/// stays the same. Channels-last when the backend asked for it when these were built
/// ([`Backend::channels_last_train`]): the stem and its max-pool NCHW, the pooled
/// activations changed once to NHWC (`pooled_nhwc`), every block unit on NHWC activations
/// (forward and backward), the last block's output changed back to NCHW (`feats`) for the
/// global average pool, so that the features are `[n, c, h, w]` for everything above.
/// Channels-last, the NHWC activations in the storage the backend asked for when these were
/// built ([`Backend::train_storage`]): in bf16 storage ([`ActStorage::Bf16`],
/// [`Backend::storage_slots`] slots per tensor) every block unit's input, z, output and
/// residual, each block's output and `pooled_nhwc`, and the units' dz in [`BackboneGrads`];
/// the units' ops the `*_nhwc_bf16` ones, the layout changes into and out of bf16
/// ([`Backend::nchw_to_nhwc_bf16`], [`Backend::nhwc_bf16_to_nchw`]). The other gradients,
/// the weights and the statistics stay f32.
pub(crate) struct BackboneActs<B: Backend> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Whether the blocks run channels-last (fixed when built).
    pub channels_last: bool,
    /// The storage of the channels-last activations (f32 when NCHW; fixed when built).
    pub storage: ActStorage,
    stem: UnitActs<B>,
    pool: Pool2d,
    pooled: B::Buf,
    /// Channels-last: the pooled activations NHWC, the first block's input (else empty).
    pooled_nhwc: B::Buf,
    blocks: Vec<BlockActs<B>>,
    /// Channels-last: the last block's output NCHW, what the global average pool reads
    /// (else empty: the pool reads the last block's output).
    feats: B::Buf,
    pub out_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Global average pool of the last block: `[n, out_c]`.
    pub gap: B::Buf,
}

/// The backbone's training buffers, made for one [`BackboneActs`] (allocated with it when
/// training, reused while the shape stays): the buffers of its backward pass's gradient
/// plan ([`grad_plan`]), shared by every block (a gradient held only while it is live: a
/// block's while that block is processed, the gradient flowing into the block below until
/// that block reads it; as many buffers of a length as gradients of it are live at once),
/// the units' dz among them in the activations' storage, the other gradients f32; and
/// dL/d(gap).
pub(crate) struct BackboneGrads<B: Backend> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Whether the activations these were made for are channels-last.
    pub channels_last: bool,
    /// The storage of the activations these were made for (their dz in it).
    pub storage: ActStorage,
    /// The backward pass's gradients and the ops that write them.
    ops: GradOps,
    plan: Plan,
    /// The plan's buffers (`plan.lens`).
    bufs: Vec<B::Buf>,
    /// dL/d(gap), written by the layer above before [`BackboneActs::backward`].
    pub dgap: B::Buf,
}

/// The buffers of a plan (eval activations or training gradients), zeroed: one of each of
/// `plan.lens`.
fn plan_buffers<B: Backend>(be: &B, plan: &Plan) -> Result<Vec<B::Buf>, ModelError> {
    plan.lens
        .iter()
        .map(|&l| {
            let l = usize::try_from(l)
                .map_err(|_| ModelError::Internal(format!("a buffer of {l} values")))?;
            Ok(be.zeros(l)?)
        })
        .collect()
}

impl<B: Backend> BackboneGrads<B> {
    pub fn new(be: &B, a: &BackboneActs<B>) -> Result<Self, ModelError> {
        let (ops, plan) = grad_plan::grad_plan(&a.grad_shape(be))
            .map_err(|e| ModelError::Internal(format!("gradient plan: {e}")))?;
        Self::with_plan(be, a, ops, plan)
    }

    /// A buffer per gradient, none shared (what the buffers were before the plan shared
    /// them: the tests' reference).
    #[cfg(test)]
    fn unshared(be: &B, a: &BackboneActs<B>) -> Result<Self, ModelError> {
        let ops = grad_plan::grad_ops(&a.grad_shape(be))
            .ok_or_else(|| ModelError::Internal("no blocks".into()))?;
        let plan = Plan {
            lens: ops.ops.iter().map(|o| o.len).collect(),
            out: (0..ops.ops.len()).collect(),
        };
        eval_plan::check(&ops.ops, &plan).map_err(ModelError::Internal)?;
        Self::with_plan(be, a, ops, plan)
    }

    fn with_plan(
        be: &B,
        a: &BackboneActs<B>,
        ops: GradOps,
        plan: Plan,
    ) -> Result<Self, ModelError> {
        let bufs = plan_buffers(be, &plan)?;
        Ok(BackboneGrads {
            n: a.n,
            h: a.h,
            w: a.w,
            channels_last: a.channels_last,
            storage: a.storage,
            ops,
            plan,
            bufs,
            dgap: be.zeros(a.n * a.out_c)?,
        })
    }

    /// Whether these buffers were made for `a`'s shape, layout and storage.
    pub fn fits(&self, a: &BackboneActs<B>) -> bool {
        (self.n, self.h, self.w, self.channels_last, self.storage)
            == (a.n, a.h, a.w, a.channels_last, a.storage)
    }

    /// Slots (values of `B::T`) allocated: the plan's buffers and dL/d(gap).
    pub fn scalars(&self, be: &B) -> usize {
        self.bufs.iter().map(|b| be.len(b)).sum::<usize>() + be.len(&self.dgap)
    }
}

impl<B: Backend> BackboneActs<B> {
    pub fn new(
        be: &B,
        spec: &BackboneSpec,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Self, ModelError> {
        let (eps, mom) = (spec.eps, spec.momentum);
        let cl = be.channels_last_train();
        let storage = if cl {
            be.train_storage()
        } else {
            ActStorage::F32
        };
        let f32s = ActStorage::F32;
        let stem = UnitActs::new(be, spec.stem, n, h, w, true, false, false, f32s, eps, mom)?;
        let (sh, sw) = stem.out_hw();
        let pool = stem_pool(n, spec.stem.c_out, sh, sw);
        let pooled = be.zeros(pool.y_len())?;
        let (mut ch, mut cw) = (pool.out_h(), pool.out_w());
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for b in &spec.blocks {
            let (a, oh, ow) = BlockActs::new(be, b, n, ch, cw, cl, storage, eps, mom)?;
            (ch, cw) = (oh, ow);
            blocks.push(a);
        }
        if blocks.is_empty() {
            return Err(ModelError::Internal("a backbone without blocks".into()));
        }
        let gap = be.zeros(n * spec.out_c)?;
        let copy_len = |len: usize| be.zeros(if cl { len } else { 0 });
        // The first block's input in the blocks' storage; the features f32.
        let pooled_nhwc = copy_len(be.storage_slots(storage, pool.y_len()))?;
        let feats = copy_len(n * spec.out_c * ch * cw)?;
        Ok(BackboneActs {
            n,
            h,
            w,
            channels_last: cl,
            storage,
            stem,
            pool,
            pooled,
            pooled_nhwc,
            blocks,
            feats,
            out_c: spec.out_c,
            out_h: ch,
            out_w: cw,
            gap,
        })
    }

    /// Whether these buffers are for input `[n, _, h, w]`.
    pub fn fits(&self, n: usize, h: usize, w: usize) -> bool {
        (self.n, self.h, self.w) == (n, h, w)
    }

    /// Slots (values of `B::T`) allocated: every unit's z, y and four per-channel
    /// statistics, the max-pool's output, the blocks' outputs, the layout copies and the
    /// pooled features.
    pub fn scalars(&self, be: &B) -> usize {
        let unit = |u: &UnitActs<B>| {
            [
                &u.z,
                &u.y,
                &u.mean,
                &u.invstd,
                &u.scratch_mean,
                &u.scratch_var,
            ]
            .iter()
            .map(|b| be.len(b))
            .sum::<usize>()
        };
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                b.units.iter().map(unit).sum::<usize>()
                    + b.down.as_ref().map_or(0, unit)
                    + be.len(&b.out)
            })
            .sum();
        unit(&self.stem)
            + [&self.pooled, &self.pooled_nhwc, &self.feats, &self.gap]
                .iter()
                .map(|b| be.len(b))
                .sum::<usize>()
            + blocks
    }

    /// The last block's feature maps `[n, out_c, out_h, out_w]` (inference reads
    /// [`BackboneEval::features`]; the tests compare the two).
    #[cfg(test)]
    pub fn features(&self) -> &B::Buf {
        // Channels-last: the changed copy.
        match self.blocks.last() {
            Some(_) if self.channels_last => &self.feats,
            Some(b) => &b.out,
            None => &self.pooled,
        }
    }

    /// The layout change of the pooled activations (the blocks' input).
    fn pooled_transpose(&self) -> Transpose {
        Transpose {
            n: self.n,
            c: self.pool.c,
            hw: self.pool.out_h() * self.pool.out_w(),
        }
    }

    /// The layout change of the last block's output (the features).
    fn feats_transpose(&self) -> Transpose {
        Transpose {
            n: self.n,
            c: self.out_c,
            hw: self.out_h * self.out_w,
        }
    }

    /// Runs the backbone and the global average pool on `x` `[n, c, h, w]`.
    pub fn forward(
        &mut self,
        be: &B,
        params: &mut ParamStore<B>,
        x: &B::Buf,
        mode: BnMode,
    ) -> Result<(), ModelError> {
        self.stem.forward(be, params, x, mode, None)?;
        be.maxpool2d_fwd(&self.pool, &self.stem.y, &mut self.pooled)?;
        let cl = self.channels_last;
        let bf16 = self.storage == ActStorage::Bf16;
        if cl {
            let t = self.pooled_transpose();
            if bf16 {
                be.nchw_to_nhwc_bf16(&t, &self.pooled, &mut self.pooled_nhwc)?;
            } else {
                be.nchw_to_nhwc(&t, &self.pooled, &mut self.pooled_nhwc)?;
            }
        }
        for i in 0..self.blocks.len() {
            let (prev, cur) = self.blocks.split_at_mut(i);
            let input = match i {
                0 if cl => &self.pooled_nhwc,
                0 => &self.pooled,
                _ => &prev[i - 1].out,
            };
            cur[0].forward(be, params, input, mode)?;
        }
        if let (true, Some(last)) = (cl, self.blocks.last()) {
            let t = self.feats_transpose();
            if bf16 {
                be.nhwc_bf16_to_nchw(&t, &last.out, &mut self.feats)?;
            } else {
                be.nhwc_to_nchw(&t, &last.out, &mut self.feats)?;
            }
        }
        let hw = self.out_h * self.out_w;
        let rows = self.n * self.out_c;
        // The pool reads the NCHW features; `gap` is its own buffer.
        let feats = match self.blocks.last() {
            Some(_) if cl => &self.feats,
            Some(b) => &b.out,
            None => &self.pooled,
        };
        be.global_avg_pool_fwd(rows, hw, feats, &mut self.gap)?;
        Ok(())
    }

    /// The backbone as its backward pass's gradient plan sees it: the gradients' slots (the
    /// units' dz in the activations' storage, the others f32).
    fn grad_shape(&self, be: &B) -> BackboneShape {
        let dz = |u: &UnitActs<B>| be.storage_slots(u.storage, u.conv.y_len()) as u128;
        BackboneShape {
            stem: self.stem.conv.y_len() as u128,
            pooled: self.pool.y_len() as u128,
            channels_last: self.channels_last,
            blocks: self
                .blocks
                .iter()
                .map(|b| BlockShape {
                    in_len: b.in_len as u128,
                    out_len: b.out_len as u128,
                    units: b
                        .units
                        .iter()
                        .map(|u| (u.conv.y_len() as u128, dz(u)))
                        .collect(),
                    down: b.down.as_ref().map(dz),
                })
                .collect(),
        }
    }

    /// Backward of a [`BnMode::Train`] forward from `grads.dgap`; writes every backbone
    /// gradient. `x` is the input of that forward; `grads` were made for these activations.
    pub fn backward(
        &self,
        be: &B,
        params: &mut ParamStore<B>,
        grads: &mut BackboneGrads<B>,
        x: &B::Buf,
    ) -> Result<(), ModelError> {
        if !grads.fits(self) {
            return Err(ModelError::BuffersMismatch(format!(
                "training buffers made for {}x_x{}x{} ({}, {} storage), activations {}x_x{}x{} \
                 ({}, {} storage)",
                grads.n,
                grads.h,
                grads.w,
                layout_name(grads.channels_last),
                grads.storage,
                self.n,
                self.h,
                self.w,
                layout_name(self.channels_last),
                self.storage
            )));
        }
        let BackboneGrads {
            ops,
            plan,
            bufs,
            dgap,
            ..
        } = grads;
        if ops.blocks.len() != self.blocks.len() {
            return Err(ModelError::Internal(format!(
                "a gradient plan of {} blocks for {}",
                ops.blocks.len(),
                self.blocks.len()
            )));
        }
        let mut gb = GradBufs::<B> {
            bufs,
            out: &plan.out,
        };
        let hw = self.out_h * self.out_w;
        let rows = self.n * self.out_c;
        let nb = self.blocks.len();
        if let Some(last) = ops.blocks.last() {
            match ops.dfeats {
                Some(f) => {
                    // The pool's gradient NCHW, changed to the last block's layout.
                    be.global_avg_pool_bwd(rows, hw, dgap, gb.write(f)?)?;
                    let (df, dout) = gb.rw(f, last.dout)?;
                    be.nchw_to_nhwc(&self.feats_transpose(), df, dout)?;
                }
                None => be.global_avg_pool_bwd(rows, hw, dgap, gb.write(last.dout)?)?,
            }
        }
        for i in (0..nb).rev() {
            let input = match i {
                0 if self.channels_last => &self.pooled_nhwc,
                0 => &self.pooled,
                _ => &self.blocks[i - 1].out,
            };
            self.blocks[i].backward(be, params, &mut gb, &ops.blocks[i], input)?;
        }
        if let Some(p) = ops.dpooled_nhwc {
            // Back to NCHW for the max-pool's backward.
            let (src, dst) = gb.rw(p, ops.dpooled)?;
            be.nhwc_to_nchw(&self.pooled_transpose(), src, dst)?;
        }
        {
            let (dpooled, dstem) = gb.rw(ops.dpooled, ops.dstem)?;
            be.maxpool2d_bwd(&self.pool, &self.stem.y, &self.pooled, dpooled, dstem)?;
        }
        self.stem
            .backward(be, params, &mut gb, x, ops.dstem, ops.stem_dz, None)?;
        Ok(())
    }
}

/// "channels-last" or "NCHW", for messages.
fn layout_name(channels_last: bool) -> &'static str {
    if channels_last {
        "channels-last"
    } else {
        "NCHW"
    }
}

/// What one op of the eval-mode backbone does.
#[derive(Clone, Copy, Debug)]
enum EvalKind {
    /// Conv + batch norm with the running statistics (+ the residual, the op's second
    /// read) (+ ReLU): [`Backend::conv2d_bn_eval_fwd`], or with `nhwc` on channels-last
    /// activations, [`Backend::conv2d_bn_eval_fwd_nhwc`] (in bf16 storage
    /// [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`]).
    Unit {
        spec: ConvBnSpec,
        conv: Conv2d,
        bn: BatchNorm2d,
        relu: bool,
        nhwc: bool,
    },
    /// The stem's max-pool.
    Pool(Pool2d),
    /// The max-pool's output to channels-last ([`Backend::nchw_to_nhwc`], in bf16 storage
    /// [`Backend::nchw_to_nhwc_bf16`]).
    ToNhwc(Transpose),
    /// The last block's output back to NCHW ([`Backend::nhwc_to_nchw`], from bf16 storage
    /// [`Backend::nhwc_bf16_to_nchw`]).
    ToNchw(Transpose),
}

/// One op of the eval-mode backbone and what it reads.
#[derive(Clone, Debug)]
struct EvalOp {
    kind: EvalKind,
    reads: Vec<Src>,
}

impl EvalOp {
    /// Values the op writes.
    fn len(&self) -> usize {
        match &self.kind {
            EvalKind::Unit { conv, .. } => conv.y_len(),
            EvalKind::Pool(p) => p.y_len(),
            EvalKind::ToNhwc(t) | EvalKind::ToNchw(t) => t.n * t.c * t.hw,
        }
    }

    /// Whether the op writes channels-last activations (in the pass's NHWC storage).
    fn writes_nhwc(&self) -> bool {
        matches!(
            self.kind,
            EvalKind::ToNhwc(_) | EvalKind::Unit { nhwc: true, .. }
        )
    }
}

/// The eval-mode ops of the backbone on `[n, c, h, w]` in execution order (the stem, its
/// max-pool, then per block the downsample branch, the units, the last one joining the
/// shortcut), as [`BackboneActs::forward`] runs them, and the last block's `(c, h, w)`.
/// `channels_last`: the blocks on NHWC activations, a layout change after the max-pool and
/// one after the last block (none without blocks).
fn eval_ops(
    spec: &BackboneSpec,
    n: usize,
    h: usize,
    w: usize,
    channels_last: bool,
) -> (Vec<EvalOp>, (usize, usize, usize)) {
    let (eps, mom) = (spec.eps, spec.momentum);
    let mut ops = Vec::new();
    let unit = |s: ConvBnSpec, h: usize, w: usize, relu: bool, nhwc: bool, reads: Vec<Src>| {
        let (conv, bn) = s.geometry(n, h, w, eps, mom);
        let op = EvalOp {
            kind: EvalKind::Unit {
                spec: s,
                conv,
                bn,
                relu,
                nhwc,
            },
            reads,
        };
        (op, conv.out_h(), conv.out_w())
    };
    let (stem, sh, sw) = unit(spec.stem, h, w, true, false, vec![Src::Input]);
    ops.push(stem);
    let pool = stem_pool(n, spec.stem.c_out, sh, sw);
    let (mut ch, mut cw) = (pool.out_h(), pool.out_w());
    ops.push(EvalOp {
        kind: EvalKind::Pool(pool),
        reads: vec![Src::Op(0)],
    });
    let mut c = spec.stem.c_out;
    let nhwc = channels_last && !spec.blocks.is_empty();
    if nhwc {
        ops.push(EvalOp {
            kind: EvalKind::ToNhwc(Transpose { n, c, hw: ch * cw }),
            reads: vec![Src::Op(1)],
        });
    }
    for b in &spec.blocks {
        let input = Src::Op(ops.len() - 1);
        // The shortcut first, then the main branch, its last unit fused with the join.
        let shortcut = match b.down {
            Some(d) => {
                ops.push(unit(d, ch, cw, false, nhwc, vec![input]).0);
                Src::Op(ops.len() - 1)
            }
            None => input,
        };
        let last = b.units.len() - 1;
        let (mut uh, mut uw) = (ch, cw);
        let mut prev = input;
        for (j, &u) in b.units.iter().enumerate() {
            let reads = if j == last {
                vec![prev, shortcut]
            } else {
                vec![prev]
            };
            let (op, oh, ow) = unit(u, uh, uw, true, nhwc, reads);
            ops.push(op);
            (uh, uw, prev) = (oh, ow, Src::Op(ops.len() - 1));
            c = u.c_out;
        }
        (ch, cw) = (uh, uw);
    }
    if nhwc {
        ops.push(EvalOp {
            kind: EvalKind::ToNchw(Transpose { n, c, hw: ch * cw }),
            reads: vec![Src::Op(ops.len() - 1)],
        });
    }
    (ops, (c, ch, cw))
}

/// The backbone's eval-mode forward ops on `[n, c, h, w]` in `layout` as the activation
/// plan sees them (what each reads, how many slots it writes); `memory.rs` builds them from
/// a config.
#[cfg(test)]
pub(crate) fn eval_plan_ops(
    spec: &BackboneSpec,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Vec<PlanOp> {
    let ops = eval_ops(spec, n, h, w, layout.channels_last()).0;
    plan_ops(&ops, |o| {
        if o.writes_nhwc() {
            layout.nhwc_slots(o.len() as u128)
        } else {
            o.len() as u128
        }
    })
}

/// The plan's ops: what each reads and the slots it writes (`slots`).
fn plan_ops(ops: &[EvalOp], slots: impl Fn(&EvalOp) -> u128) -> Vec<PlanOp> {
    ops.iter()
        .map(|o| PlanOp {
            reads: o.reads.clone(),
            len: slots(o),
        })
        .collect()
}

/// The eval-mode backbone (batch norm with the running statistics) for one input shape:
/// its ops and the few buffers of its activation plan ([`eval_plan`]): each op writes a
/// buffer that no op still to run reads from the tensor it held, so a block's input, its
/// units' outputs, the downsample branch's and its output share buffers with every other
/// block's. Only the last block's feature maps and their global average pool outlive the
/// pass (what the fc, the CAM and Grad-CAM read). Nothing of the training activations
/// ([`BackboneActs`]): a model used only for inference never allocates those. Channels-last
/// when the backend asked for it when this was built ([`Backend::channels_last_eval`]): the
/// blocks' activations NHWC, the layout changes two more ops of the plan, the features
/// `[n, c, h, w]` either way. The NHWC activations (the first layout change's output and
/// every block unit's input, residual and output) in `storage`: bf16 storage takes
/// [`Backend::storage_slots`] slots per tensor (the plan counts slots), the units
/// [`Backend::conv2d_bn_eval_fwd_nhwc_bf16`], the layout changes into and out of bf16.
pub(crate) struct BackboneEval<B: Backend> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    /// Whether the blocks run channels-last (fixed when built).
    pub channels_last: bool,
    /// The storage of the channels-last activations (f32 when NCHW; fixed when built).
    pub storage: ActStorage,
    /// Layout and storage as the memory counts name them ([`ActLayout::of`] the backend).
    pub layout: ActLayout,
    ops: Vec<EvalOp>,
    plan: Plan,
    bufs: Vec<B::Buf>,
    pub out_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Global average pool of the last block: `[n, out_c]`.
    pub gap: B::Buf,
}

impl<B: Backend> BackboneEval<B> {
    /// The buffers of input `[n, _, h, w]`, channels-last when the backend asks for it, then
    /// in the storage it asks for ([`Backend::eval_storage`]).
    pub fn new(
        be: &B,
        spec: &BackboneSpec,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Self, ModelError> {
        let channels_last = be.channels_last_eval();
        let storage = if channels_last {
            be.eval_storage()
        } else {
            ActStorage::F32
        };
        let (ops, (out_c, out_h, out_w)) = eval_ops(spec, n, h, w, channels_last);
        let slots = |o: &EvalOp| {
            if o.writes_nhwc() {
                be.storage_slots(storage, o.len()) as u128
            } else {
                o.len() as u128
            }
        };
        let plan = eval_plan::plan(&plan_ops(&ops, slots))
            .map_err(|e| ModelError::Internal(format!("eval activation plan: {e}")))?;
        let bufs = plan_buffers(be, &plan)?;
        Ok(BackboneEval {
            n,
            h,
            w,
            channels_last,
            storage,
            layout: ActLayout::of(be),
            ops,
            plan,
            bufs,
            out_c,
            out_h,
            out_w,
            gap: be.zeros(n * out_c)?,
        })
    }

    /// Whether these buffers are for input `[n, _, h, w]`.
    pub fn fits(&self, n: usize, h: usize, w: usize) -> bool {
        (self.n, self.h, self.w) == (n, h, w)
    }

    /// Slots (values of `B::T`) allocated: the plan's buffers and the pooled features.
    pub fn scalars(&self) -> usize {
        self.plan.lens.iter().map(|&l| l as usize).sum::<usize>() + self.n * self.out_c
    }

    /// The last block's feature maps `[n, out_c, out_h, out_w]` (after a forward).
    pub fn features(&self) -> &B::Buf {
        // The plan has an op per unit and keeps the last op's output (plan::check).
        let last = self.plan.out[self.plan.out.len() - 1];
        &self.bufs[last]
    }

    /// Runs the backbone (eval mode) and the global average pool on `x` `[n, c, h, w]`.
    pub fn forward(
        &mut self,
        be: &B,
        params: &ParamStore<B>,
        x: &B::Buf,
    ) -> Result<(), ModelError> {
        let out = &self.plan.out;
        let bf16 = self.storage == ActStorage::Bf16;
        for (i, op) in self.ops.iter().enumerate() {
            let o = out[i];
            let (lo, rest) = self.bufs.split_at_mut(o);
            let Some((y, hi)) = rest.split_first_mut() else {
                return Err(ModelError::Internal(format!("op {i}: no buffer {o}")));
            };
            // What the op reads, from the buffers other than the one it writes (the plan
            // never makes them the same: checked when it was made).
            let read = |s: &Src| -> Result<&B::Buf, ModelError> {
                match *s {
                    Src::Input => Ok(x),
                    Src::Op(k) => match out[k] {
                        b if b < o => Ok(&lo[b]),
                        b if b > o => Ok(&hi[b - o - 1]),
                        b => Err(ModelError::Internal(format!(
                            "op {i} reads and writes buffer {b}"
                        ))),
                    },
                }
            };
            let input = read(
                op.reads
                    .first()
                    .ok_or_else(|| ModelError::Internal(format!("op {i} reads nothing")))?,
            )?;
            match op.kind {
                EvalKind::Unit {
                    spec: s,
                    conv,
                    bn,
                    relu,
                    nhwc,
                } => {
                    let residual = op.reads.get(1).map(read).transpose()?;
                    let p = |i: W| &params.w[i.0].data;
                    let st = |i: S| &params.s[i.0].data;
                    let unit = match (nhwc, bf16) {
                        (false, _) => B::conv2d_bn_eval_fwd,
                        (true, false) => B::conv2d_bn_eval_fwd_nhwc,
                        (true, true) => B::conv2d_bn_eval_fwd_nhwc_bf16,
                    };
                    unit(
                        be,
                        &conv,
                        &bn,
                        input,
                        p(s.w),
                        p(s.g),
                        p(s.b),
                        st(s.rm),
                        st(s.rv),
                        residual,
                        relu,
                        y,
                    )?;
                }
                EvalKind::Pool(pool) => be.maxpool2d_fwd(&pool, input, y)?,
                EvalKind::ToNhwc(t) if bf16 => be.nchw_to_nhwc_bf16(&t, input, y)?,
                EvalKind::ToNhwc(t) => be.nchw_to_nhwc(&t, input, y)?,
                EvalKind::ToNchw(t) if bf16 => be.nhwc_bf16_to_nchw(&t, input, y)?,
                EvalKind::ToNchw(t) => be.nhwc_to_nchw(&t, input, y)?,
            }
        }
        let hw = self.out_h * self.out_w;
        let last = out[out.len() - 1];
        be.global_avg_pool_fwd(self.n * self.out_c, hw, &self.bufs[last], &mut self.gap)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuBackend;
    use crate::rng::Rng;

    fn randn(seed: u64, n: usize) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    #[test]
    fn bf16_storage_stores_only_bf16_values() {
        use crate::engine::precision::round_bf16;
        let cfg = ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![2, 1],
            base_width: 4,
            ..ModelConfig::tiny()
        };
        let be = CpuBackend::<f32>::new()
            .with_channels_last_eval(true)
            .with_eval_storage(ActStorage::Bf16);
        let mut store = ParamStore::default();
        let spec = declare(&mut store, &be, &cfg, 3).unwrap();
        let (n, h, w) = (2, 35, 29);
        let x: Vec<f32> = randn(4, n * 3 * h * w).iter().map(|&v| v as f32).collect();
        let x = be.upload(&x).unwrap();
        let mut ev = BackboneEval::new(&be, &spec, n, h, w).unwrap();
        assert_eq!(ev.storage, ActStorage::Bf16);
        assert_eq!(ev.layout, ActLayout::Nhwc, "the CPU: a slot per value");
        ev.forward(&be, &store, &x).unwrap();
        // Every buffer that only channels-last ops write (their outputs in bf16 storage),
        // and the features (out of bf16 storage), hold bf16 values; the stem's does not.
        let mut nhwc_only = vec![true; ev.bufs.len()];
        for (i, op) in ev.ops.iter().enumerate() {
            if !op.writes_nhwc() {
                nhwc_only[ev.plan.out[i]] = false;
            }
        }
        let last = ev.plan.out[ev.ops.len() - 1];
        let exact = |b: &Vec<f32>| b.iter().all(|&v| round_bf16(v).to_bits() == v.to_bits());
        let checked = (0..ev.bufs.len())
            .filter(|&b| nhwc_only[b] || b == last)
            .inspect(|&b| assert!(exact(&ev.bufs[b]), "buffer {b}"))
            .count();
        assert!(checked >= 3, "{checked} buffers checked");
        assert!(!exact(&ev.bufs[ev.plan.out[0]]), "the stem's output is f32");
    }

    /// The training backbone channels-last in bf16 storage (the CPU reference: a slot per
    /// value, rounded): after a training forward and backward every tensor the storage
    /// covers (the pooled NHWC copy, every block unit's z and output, every block's output,
    /// the block units' dz: those left in the shared gradient buffers) holds bf16 values
    /// only, and the others (the stem's, the features, the f32 gradients) do not; grads made
    /// for f32 storage are refused with a typed error.
    #[test]
    fn bf16_training_storage_stores_only_bf16_values() {
        use crate::engine::precision::round_bf16;
        let cfg = ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![2, 1],
            base_width: 4,
            ..ModelConfig::tiny()
        };
        let be = CpuBackend::<f32>::new()
            .with_channels_last_train(true)
            .with_train_storage(ActStorage::Bf16);
        let mut store = ParamStore::default();
        let spec = declare(&mut store, &be, &cfg, 3).unwrap();
        let (n, h, w) = (2, 35, 29);
        let x: Vec<f32> = randn(4, n * 3 * h * w).iter().map(|&v| v as f32).collect();
        let x = be.upload(&x).unwrap();
        let mut a = BackboneActs::new(&be, &spec, n, h, w).unwrap();
        assert_eq!(a.storage, ActStorage::Bf16);
        let mut g = BackboneGrads::new(&be, &a).unwrap();
        assert!(g.fits(&a));
        for p in store.w.iter_mut() {
            p.grad = Some(be.zeros(be.len(&p.data)).unwrap());
        }
        a.forward(&be, &mut store, &x, BnMode::Train).unwrap();
        let dgap: Vec<f32> = randn(5, n * a.out_c).iter().map(|&v| v as f32).collect();
        g.dgap = be.upload(&dgap).unwrap();
        a.backward(&be, &mut store, &mut g, &x).unwrap();
        let exact = |b: &Vec<f32>| b.iter().all(|&v| round_bf16(v).to_bits() == v.to_bits());
        let mut checked = 0;
        let mut check = |b: &Vec<f32>, what: String| {
            assert!(!b.is_empty() && exact(b), "{what} not bf16");
            assert!(b.iter().any(|&v| v != 0.0), "{what} all zero");
            checked += 1;
        };
        check(&a.pooled_nhwc, "pooled_nhwc".into());
        for (i, b) in a.blocks.iter().enumerate() {
            check(&b.out, format!("block {i} out"));
            for (j, u) in b.units.iter().enumerate() {
                check(&u.z, format!("block {i} unit {j} z"));
                if j + 1 < b.units.len() {
                    check(&u.y, format!("block {i} unit {j} y"));
                }
            }
            if let Some(d) = &b.down {
                check(&d.z, format!("block {i} downsample z"));
                check(&d.y, format!("block {i} downsample y"));
            }
        }
        // The gradients share buffers, a buffer holding the last gradient written into it:
        // the block units' dz in bf16, every other gradient f32 (the stem's dz included).
        let dz_ops: Vec<usize> = g
            .ops
            .blocks
            .iter()
            .flat_map(|b| b.dz.iter().copied().chain(b.down.map(|d| d.0)))
            .collect();
        let mut last_written = vec![None; g.bufs.len()];
        for (op, &buf) in g.plan.out.iter().enumerate() {
            if g.ops.ops[op].len > 0 {
                last_written[buf] = Some(op);
            }
        }
        let (mut dzs, mut f32s) = (0, 0);
        for (buf, op) in last_written.iter().enumerate() {
            match *op {
                Some(op) if dz_ops.contains(&op) => {
                    check(&g.bufs[buf], format!("gradient buffer {buf}: op {op}'s dz"));
                    dzs += 1;
                }
                Some(op) => {
                    assert!(
                        !exact(&g.bufs[buf]),
                        "gradient buffer {buf}: op {op}'s is f32"
                    );
                    f32s += 1;
                }
                None => {}
            }
        }
        assert!(dzs >= 2 && f32s >= 4, "{dzs} dz, {f32s} f32 buffers");
        assert!(checked >= 25, "{checked}");
        let stem_dz = &g.bufs[g.plan.out[g.ops.stem_dz]];
        assert!(!exact(&a.stem.z) && !exact(&a.stem.y) && !exact(stem_dz));
        // The features: the bf16 block output unpacked (exact), the pool of them not.
        assert!(exact(&a.feats));
        // Buffers made for another storage are refused (a typed error, not a panic).
        let f32be = CpuBackend::<f32>::new().with_channels_last_train(true);
        let a32 = BackboneActs::new(&f32be, &spec, n, h, w).unwrap();
        assert_eq!(a32.storage, ActStorage::F32);
        let mut g32 = BackboneGrads::new(&f32be, &a32).unwrap();
        assert!(!g32.fits(&a));
        let e = a.backward(&be, &mut store, &mut g32, &x);
        assert!(matches!(e, Err(ModelError::BuffersMismatch(_))), "{e:?}");
        // NCHW: f32 whatever the backend's training storage says.
        let nchw = CpuBackend::<f32>::new().with_train_storage(ActStorage::Bf16);
        let an = BackboneActs::new(&nchw, &spec, n, h, w).unwrap();
        assert_eq!((an.channels_last, an.storage), (false, ActStorage::F32));
    }

    /// The backward pass on the shared gradient buffers gives every parameter gradient bit
    /// for bit as on a buffer per gradient (unshared, what the pass had before), on fresh
    /// (zeroed) buffers, on buffers poisoned (NaN) beforehand, and after a pass on another
    /// input has left its gradients there (no gradient read before it is written, none
    /// overwritten while live); in every layout and storage, for both block kinds and blocks
    /// of several sizes (stages of one and of three blocks, downsample branches).
    #[test]
    fn shared_gradient_buffers_hold_nothing_between_passes() {
        for block in [BlockKind::Basic, BlockKind::Bottleneck] {
            let cfg = ModelConfig {
                block,
                layers: vec![3, 1, 2],
                base_width: 4,
                ..ModelConfig::tiny()
            };
            for (cl, st) in [
                (false, ActStorage::F32),
                (true, ActStorage::F32),
                (true, ActStorage::Bf16),
            ] {
                let be = CpuBackend::<f32>::new()
                    .with_channels_last_train(cl)
                    .with_train_storage(st);
                let mut store = ParamStore::default();
                let spec = declare(&mut store, &be, &cfg, 3).unwrap();
                let (n, h, w) = (2, 37, 31);
                let input = |seed: u64| {
                    let v: Vec<f32> = randn(seed, n * 3 * h * w)
                        .iter()
                        .map(|&v| v as f32)
                        .collect();
                    be.upload(&v).unwrap()
                };
                let (x, other) = (input(8), input(9));
                let mut a = BackboneActs::new(&be, &spec, n, h, w).unwrap();
                let dgap: Vec<f32> = randn(10, n * a.out_c).iter().map(|&v| v as f32).collect();
                let mut own = BackboneGrads::unshared(&be, &a).unwrap();
                let mut fresh = BackboneGrads::new(&be, &a).unwrap();
                let mut g = BackboneGrads::new(&be, &a).unwrap();
                for b in g.bufs.iter_mut() {
                    b.fill(f32::NAN);
                }
                let (bufs, written) =
                    (g.bufs.len(), g.ops.ops.iter().filter(|o| o.len > 0).count());
                // Every parameter gradient of a training forward and backward on `x` into
                // gradient buffers `g`, as bits.
                let mut pass = |g: &mut BackboneGrads<CpuBackend<f32>>, x: &Vec<f32>| {
                    for p in store.w.iter_mut() {
                        p.grad = Some(vec![f32::NAN; p.data.len()]);
                    }
                    a.forward(&be, &mut store, x, BnMode::Batch).unwrap();
                    g.dgap = dgap.clone();
                    a.backward(&be, &mut store, g, x).unwrap();
                    store
                        .w
                        .iter()
                        .map(|p| {
                            let g = p.grad.as_ref().unwrap();
                            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                };
                let what = format!("{block:?} channels-last {cl} {st}");
                let want = pass(&mut own, &x);
                assert!(
                    want.iter().flatten().all(|&b| !f32::from_bits(b).is_nan()),
                    "{what}"
                );
                assert!(want.iter().flatten().any(|&b| b != 0), "{what}");
                assert_eq!(pass(&mut fresh, &x), want, "{what}: shared buffers");
                // Poisoned.
                assert_eq!(pass(&mut g, &x), want, "{what}: poisoned buffers");
                // After a pass on another input.
                assert_ne!(pass(&mut g, &other), want, "{what}: another input");
                assert_eq!(pass(&mut g, &x), want, "{what}: after another pass");
                // Shared: fewer buffers than gradients written.
                assert!(2 * bufs < written, "{what}: {bufs} buffers for {written}");
            }
        }
    }

    /// The training backbone channels-last (the CPU's defaults: transposes around the NCHW
    /// ops) in every batch-norm mode, Eval included, gives the NCHW backbone's features and
    /// pooled features bit for bit; its two layout copies are what `memory` counts.
    #[test]
    fn channels_last_training_backbone_equals_nchw_in_every_mode() {
        for block in [BlockKind::Basic, BlockKind::Bottleneck] {
            let cfg = ModelConfig {
                block,
                layers: vec![2, 1, 1],
                base_width: 4,
                ..ModelConfig::tiny()
            };
            let (n, h, w) = (2, 37, 29);
            let x = randn(7, n * cfg.in_channels * h * w);
            let mut out = Vec::new();
            for cl in [false, true] {
                let be = CpuBackend::<f64>::new().with_channels_last_train(cl);
                let mut store = ParamStore::default();
                let spec = declare(&mut store, &be, &cfg, 3).unwrap();
                let xb = be.upload(&x).unwrap();
                let mut a = BackboneActs::new(&be, &spec, n, h, w).unwrap();
                assert_eq!(a.channels_last, cl);
                let copies = be.len(&a.pooled_nhwc) + be.len(&a.feats);
                let want = crate::model::memory::train_layout_copies(&cfg, n, h, w).unwrap();
                assert_eq!(copies as u128, if cl { want } else { 0 }, "{block:?}");
                let mut got = Vec::new();
                for mode in [BnMode::Train, BnMode::Train, BnMode::Batch, BnMode::Eval] {
                    a.forward(&be, &mut store, &xb, mode).unwrap();
                    got.push((
                        mode,
                        be.download(a.features()).unwrap(),
                        be.download(&a.gap).unwrap(),
                    ));
                }
                out.push(got);
            }
            for (a, b) in out[0].iter().zip(&out[1]) {
                assert_eq!(a.0, b.0);
                let bits = |v: &Vec<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.1), bits(&b.1), "{block:?} {:?} features", a.0);
                assert_eq!(bits(&a.2), bits(&b.2), "{block:?} {:?} pooled", a.0);
            }
        }
    }

    #[test]
    fn eval_plan_forward_equals_keeping_every_output() {
        for block in [BlockKind::Basic, BlockKind::Bottleneck] {
            let cfg = ModelConfig {
                block,
                layers: vec![2, 3, 1],
                base_width: 4,
                ..ModelConfig::tiny()
            };
            let be = CpuBackend::<f64>::new();
            let mut store = ParamStore::default();
            let spec = declare(&mut store, &be, &cfg, 3).unwrap();
            let (n, h, w) = (3, 37, 29);
            let c = cfg.in_channels;
            let x = be.upload(&randn(1, n * c * h * w)).unwrap();
            let x2 = be.upload(&randn(2, n * c * h * w)).unwrap();
            let mut full = BackboneActs::new(&be, &spec, n, h, w).unwrap();
            // Training passes move the running statistics away from 0 and 1.
            for _ in 0..3 {
                full.forward(&be, &mut store, &x2, BnMode::Train).unwrap();
            }
            full.forward(&be, &mut store, &x, BnMode::Eval).unwrap();
            // NCHW, and channels-last through the default units (transposes around the
            // NCHW op): bit for bit the same.
            for cl in [false, true] {
                let bec = be.with_channels_last_eval(cl);
                let mut ev = BackboneEval::new(&bec, &spec, n, h, w).unwrap();
                assert_eq!(ev.channels_last, cl);
                // Another input first: what it leaves in the reused buffers must not matter.
                ev.forward(&bec, &store, &x2).unwrap();
                ev.forward(&bec, &store, &x).unwrap();
                let d = |b: &Vec<f64>| be.download(b).unwrap();
                let what = format!("{block:?} channels-last {cl}");
                assert_eq!(d(ev.features()), d(full.features()), "{what} features");
                assert_eq!(d(&ev.gap), d(&full.gap), "{what} pooled features");
                assert_eq!(
                    (ev.out_c, ev.out_h, ev.out_w),
                    (full.out_c, full.out_h, full.out_w)
                );
                // A few buffers instead of one per layer: fewer than the units.
                let units = spec.blocks.iter().map(|b| b.units.len()).sum::<usize>();
                assert!(ev.plan.lens.len() < units, "{:?}", ev.plan.lens);
                // No op reads the buffer it writes.
                for (i, op) in ev.ops.iter().enumerate() {
                    for r in &op.reads {
                        if let Src::Op(k) = *r {
                            assert_ne!(ev.plan.out[k], ev.plan.out[i], "op {i} reads op {k}");
                        }
                    }
                }
                // Channels-last: every block unit NHWC between the two layout changes.
                let nhwc_units = ev
                    .ops
                    .iter()
                    .filter(|o| matches!(o.kind, EvalKind::Unit { nhwc: true, .. }))
                    .count();
                let block_units = units + spec.blocks.iter().filter(|b| b.down.is_some()).count();
                assert_eq!(nhwc_units, if cl { block_units } else { 0 }, "{what}");
                if cl {
                    assert!(matches!(ev.ops[2].kind, EvalKind::ToNhwc(_)));
                    assert!(matches!(
                        ev.ops.last().map(|o| o.kind),
                        Some(EvalKind::ToNchw(_))
                    ));
                }
            }
        }
    }
}
