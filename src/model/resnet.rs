//! torchvision's ResNet backbone over a [`Backend`]: the parameter declarations (names and
//! order of torchvision's `state_dict`) and the activations of one input shape, with the
//! forward pass (training-mode, batch-statistics or eval-mode batch norm) and the backward
//! pass that writes every backbone gradient through the training buffers made for those
//! activations ([`BackboneGrads`]). The stem is 7x7/2 conv, BN, ReLU, 3x3/2
//! max-pool; stages of basic or bottleneck blocks (stride on the 3x3, as torchvision v1.5);
//! a 1x1 conv + BN downsample when the stride or the channel count changes; then global
//! average pooling. Knows nothing about the LSTM, the heads or files.

use super::config::{BlockKind, ModelConfig};
use super::params::{Group, Init, ParamStore, Trainable, S, W};
use super::ModelError;
use crate::engine::{Backend, BatchNorm2d, Conv2d, Pool2d};

/// How a forward pass normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BnMode {
    /// PyTorch's train(): batch statistics, running stats updated.
    Train,
    /// Batch statistics, running stats left as they are.
    Batch,
    /// PyTorch's eval(): running stats.
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

/// A unit's training buffer: dL/d(conv output).
struct UnitGrads<B: Backend> {
    dz: B::Buf,
}

impl<B: Backend> UnitGrads<B> {
    fn new(be: &B, a: &UnitActs<B>) -> Result<Self, ModelError> {
        Ok(UnitGrads {
            dz: be.zeros(a.conv.y_len())?,
        })
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
        eps: f64,
        momentum: f64,
    ) -> Result<Self, ModelError> {
        let conv = Conv2d {
            n,
            c_in: spec.c_in,
            h,
            w,
            c_out: spec.c_out,
            kh: spec.k,
            kw: spec.k,
            stride: spec.stride,
            pad: spec.pad,
        };
        let bn = BatchNorm2d {
            n,
            c: spec.c_out,
            hw: conv.out_h() * conv.out_w(),
            eps,
            momentum,
        };
        Ok(UnitActs {
            spec,
            conv,
            bn,
            relu,
            z: be.zeros(conv.y_len())?,
            y: be.zeros(if joins { 0 } else { conv.y_len() })?,
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
        be.conv2d_bn_train_fwd(
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
        be.conv2d_bn_eval_fwd(
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

    /// Backward of a training-mode forward: `dy` is dL/d(this unit's output); writes the
    /// conv and BN gradients into the store and, when asked, dL/d(input) into `dx`.
    fn backward(
        &self,
        be: &B,
        params: &mut ParamStore<B>,
        grads: &mut UnitGrads<B>,
        x: &B::Buf,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        let dz = &mut grads.dz;
        // The output masks dy only for a ReLU of the unit's own; a unit without one (a block's
        // last keeps no `y`: its ReLU is the join's, masked by the caller) passes z, unread.
        let y = if self.relu { &self.y } else { &self.z };
        {
            let [g, b] = two_mut(&mut params.w, s.g, s.b)?;
            be.batchnorm_bwd(
                &self.bn,
                &self.z,
                y,
                dy,
                &g.data,
                &self.mean,
                &self.invstd,
                dz,
                &mut g.grad,
                &mut b.grad,
                self.relu,
            )?;
        }
        let pw = &mut params.w[s.w.0];
        be.conv2d_bwd_weight(&self.conv, x, dz, &mut pw.grad)?;
        if let Some(dx) = dx {
            be.conv2d_bwd_data(&self.conv, dz, &pw.data, dx)?;
        }
        Ok(())
    }
}

/// One residual block's activations.
struct BlockActs<B: Backend> {
    units: Vec<UnitActs<B>>,
    down: Option<UnitActs<B>>,
    out: B::Buf,
    out_len: usize,
    in_len: usize,
}

/// The downsample branch's training buffers.
struct DownGrads<B: Backend> {
    unit: UnitGrads<B>,
    /// The branch's input gradient, added to the main branch's.
    dx: B::Buf,
}

/// One residual block's training buffers, made for its [`BlockActs`] (the same units, a
/// downsample branch exactly when the block has one).
struct BlockGrads<B: Backend> {
    units: Vec<UnitGrads<B>>,
    /// dL/d(output of unit `j`) for every unit but the last, written by unit `j + 1`.
    dys: Vec<B::Buf>,
    down: Option<DownGrads<B>>,
    /// dL/d(pre-ReLU sum): the gradient of both branches' outputs.
    g: B::Buf,
    /// dL/d(out), written by the next block or the pooling.
    dout: B::Buf,
}

impl<B: Backend> BlockGrads<B> {
    fn new(be: &B, a: &BlockActs<B>) -> Result<Self, ModelError> {
        let last = a.units.len().saturating_sub(1);
        Ok(BlockGrads {
            units: a
                .units
                .iter()
                .map(|u| UnitGrads::new(be, u))
                .collect::<Result<_, _>>()?,
            dys: a.units[..last]
                .iter()
                .map(|u| be.zeros(u.conv.y_len()))
                .collect::<Result<_, _>>()?,
            down: match &a.down {
                Some(d) => Some(DownGrads {
                    unit: UnitGrads::new(be, d)?,
                    dx: be.zeros(a.in_len)?,
                }),
                None => None,
            },
            g: be.zeros(a.out_len)?,
            dout: be.zeros(a.out_len)?,
        })
    }
}

impl<B: Backend> BlockActs<B> {
    fn new(
        be: &B,
        spec: &BlockSpec,
        n: usize,
        h: usize,
        w: usize,
        eps: f64,
        momentum: f64,
    ) -> Result<(Self, usize, usize), ModelError> {
        let mut units: Vec<UnitActs<B>> = Vec::with_capacity(spec.units.len());
        let (mut ch, mut cw) = (h, w);
        let last = spec.units.len() - 1;
        for (j, &u) in spec.units.iter().enumerate() {
            let a = UnitActs::new(be, u, n, ch, cw, j != last, j == last, eps, momentum)?;
            (ch, cw) = a.out_hw();
            units.push(a);
        }
        let down = match spec.down {
            Some(d) => Some(UnitActs::new(be, d, n, h, w, false, false, eps, momentum)?),
            None => None,
        };
        let in_len = n * spec.units[0].c_in * h * w;
        let out_len = n * spec.units[last].c_out * ch * cw;
        let out = be.zeros(out_len)?;
        Ok((
            BlockActs {
                units,
                down,
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

    /// Needs `grads.dout`; writes dL/d(block input) into `dx`.
    fn backward(
        &self,
        be: &B,
        params: &mut ParamStore<B>,
        grads: &mut BlockGrads<B>,
        x: &B::Buf,
        dx: &mut B::Buf,
    ) -> Result<(), ModelError> {
        let BlockGrads {
            units,
            dys,
            down,
            g,
            dout,
        } = grads;
        be.relu_bwd(&self.out, dout, g)?;
        let g = &*g;
        let last = self.units.len() - 1;
        for j in (0..=last).rev() {
            let (lo, hi) = dys.split_at_mut(j);
            let dy = if j == last { g } else { &hi[0] };
            let (input, dx_j) = if j == 0 {
                (x, &mut *dx)
            } else {
                (&self.units[j - 1].y, &mut lo[j - 1])
            };
            self.units[j].backward(be, params, &mut units[j], input, dy, Some(dx_j))?;
        }
        // `down` is made for this block: a downsample branch's buffers exactly when it has one.
        match (&self.down, down.as_mut()) {
            (Some(d), Some(dg)) => {
                d.backward(be, params, &mut dg.unit, x, g, Some(&mut dg.dx))?;
                be.add_assign(dx, &dg.dx)?;
            }
            _ => be.add_assign(dx, g)?,
        }
        Ok(())
    }
}

/// The backbone's activations for one input shape `[n, c, h, w]`, reused while the shape
/// stays the same.
pub(crate) struct BackboneActs<B: Backend> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    stem: UnitActs<B>,
    pool: Pool2d,
    pooled: B::Buf,
    blocks: Vec<BlockActs<B>>,
    pub out_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Global average pool of the last block: `[n, out_c]`.
    pub gap: B::Buf,
}

/// The backbone's training buffers, made for one [`BackboneActs`] (allocated with it when
/// training, reused while the shape stays).
pub(crate) struct BackboneGrads<B: Backend> {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    stem: UnitGrads<B>,
    dstem: B::Buf,
    dpooled: B::Buf,
    blocks: Vec<BlockGrads<B>>,
    /// dL/d(gap), written by the layer above before [`BackboneActs::backward`].
    pub dgap: B::Buf,
}

impl<B: Backend> BackboneGrads<B> {
    pub fn new(be: &B, a: &BackboneActs<B>) -> Result<Self, ModelError> {
        Ok(BackboneGrads {
            n: a.n,
            h: a.h,
            w: a.w,
            stem: UnitGrads::new(be, &a.stem)?,
            dstem: be.zeros(a.stem.conv.y_len())?,
            dpooled: be.zeros(a.pool.y_len())?,
            blocks: a
                .blocks
                .iter()
                .map(|b| BlockGrads::new(be, b))
                .collect::<Result<_, _>>()?,
            dgap: be.zeros(a.n * a.out_c)?,
        })
    }

    /// Whether these buffers were made for `a`'s shape.
    pub fn fits(&self, a: &BackboneActs<B>) -> bool {
        (self.n, self.h, self.w) == (a.n, a.h, a.w)
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
        let stem = UnitActs::new(be, spec.stem, n, h, w, true, false, eps, mom)?;
        let (sh, sw) = stem.out_hw();
        let pool = Pool2d {
            n,
            c: spec.stem.c_out,
            h: sh,
            w: sw,
            k: 3,
            stride: 2,
            pad: 1,
        };
        let pooled = be.zeros(pool.y_len())?;
        let (mut ch, mut cw) = (pool.out_h(), pool.out_w());
        let mut blocks = Vec::with_capacity(spec.blocks.len());
        for b in &spec.blocks {
            let (a, oh, ow) = BlockActs::new(be, b, n, ch, cw, eps, mom)?;
            (ch, cw) = (oh, ow);
            blocks.push(a);
        }
        if blocks.is_empty() {
            return Err(ModelError::Internal("a backbone without blocks".into()));
        }
        let gap = be.zeros(n * spec.out_c)?;
        Ok(BackboneActs {
            n,
            h,
            w,
            stem,
            pool,
            pooled,
            blocks,
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

    /// The last block's feature maps `[n, out_c, out_h, out_w]`.
    pub fn features(&self) -> &B::Buf {
        match self.blocks.last() {
            Some(b) => &b.out,
            None => &self.pooled,
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
        for i in 0..self.blocks.len() {
            let (prev, cur) = self.blocks.split_at_mut(i);
            let input = if i == 0 {
                &self.pooled
            } else {
                &prev[i - 1].out
            };
            cur[0].forward(be, params, input, mode)?;
        }
        let hw = self.out_h * self.out_w;
        let feats = match self.blocks.last() {
            Some(b) => &b.out,
            None => &self.pooled,
        };
        be.global_avg_pool_fwd(self.n * self.out_c, hw, feats, &mut self.gap)?;
        Ok(())
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
        let hw = self.out_h * self.out_w;
        let rows = self.n * self.out_c;
        let nb = self.blocks.len();
        let gb = &mut grads.blocks;
        if let Some(last) = gb.last_mut() {
            be.global_avg_pool_bwd(rows, hw, &grads.dgap, &mut last.dout)?;
        }
        for i in (0..nb).rev() {
            let (prev, cur) = gb.split_at_mut(i);
            if i == 0 {
                self.blocks[0].backward(
                    be,
                    params,
                    &mut cur[0],
                    &self.pooled,
                    &mut grads.dpooled,
                )?;
            } else {
                let dx = &mut prev[i - 1].dout;
                self.blocks[i].backward(be, params, &mut cur[0], &self.blocks[i - 1].out, dx)?;
            }
        }
        be.maxpool2d_bwd(
            &self.pool,
            &self.stem.y,
            &self.pooled,
            &grads.dpooled,
            &mut grads.dstem,
        )?;
        self.stem
            .backward(be, params, &mut grads.stem, x, &grads.dstem, None)?;
        Ok(())
    }
}
