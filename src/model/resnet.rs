//! torchvision's ResNet backbone over a [`Backend`]: the parameter declarations (names and
//! order of torchvision's `state_dict`) and the activations of one input shape, with the
//! forward pass (training-mode, batch-statistics or eval-mode batch norm) and the backward
//! pass that writes every backbone gradient. The stem is 7x7/2 conv, BN, ReLU, 3x3/2
//! max-pool; stages of basic or bottleneck blocks (stride on the 3x3, as torchvision v1.5);
//! a 1x1 conv + BN downsample when the stride or the channel count changes; then global
//! average pooling. Knows nothing about the LSTM, the heads or files.

use super::config::{BlockKind, ModelConfig};
use super::params::{Group, Init, Param, ParamKind, ParamStore};
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
    w: usize,
    g: usize,
    b: usize,
    rm: usize,
    rv: usize,
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
    use ParamKind::{Buffer, Trainable};
    let bb = Group::Backbone;
    let w = store.add(
        be,
        format!("{conv}.weight"),
        vec![c_out, c_in, k, k],
        Trainable,
        bb,
        Init::KaimingConvFanOut,
        seed,
    )?;
    let g = store.add(
        be,
        format!("{bn}.weight"),
        vec![c_out],
        Trainable,
        bb,
        Init::Constant(1.0),
        seed,
    )?;
    let b = store.add(
        be,
        format!("{bn}.bias"),
        vec![c_out],
        Trainable,
        bb,
        Init::Constant(0.0),
        seed,
    )?;
    let rm = store.add(
        be,
        format!("{bn}.running_mean"),
        vec![c_out],
        Buffer,
        bb,
        Init::Constant(0.0),
        seed,
    )?;
    let rv = store.add(
        be,
        format!("{bn}.running_var"),
        vec![c_out],
        Buffer,
        bb,
        Init::Constant(1.0),
        seed,
    )?;
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

fn internal(what: &str) -> ModelError {
    ModelError::Internal(format!("{what} not allocated"))
}

/// Allocates `slot` unless it already holds a buffer.
pub(crate) fn ensure<B: Backend>(
    be: &B,
    slot: &mut Option<B::Buf>,
    len: usize,
) -> Result<(), ModelError> {
    if slot.is_none() {
        *slot = Some(be.zeros(len)?);
    }
    Ok(())
}

fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> Result<[&mut T; 2], ModelError> {
    v.get_disjoint_mut([a, b])
        .map_err(|e| ModelError::Internal(format!("parameter indices {a}, {b}: {e}")))
}

fn grad_of<B: Backend>(p: &mut Param<B>) -> Result<&mut B::Buf, ModelError> {
    let name = &p.name;
    p.grad
        .as_mut()
        .ok_or_else(|| ModelError::Internal(format!("{name} has no gradient buffer")))
}

/// The activations of one conv + BN (+ ReLU) for one input shape.
struct UnitActs<B: Backend> {
    spec: ConvBnSpec,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: bool,
    /// Conv output (BN input).
    z: B::Buf,
    /// BN (+ ReLU) output.
    y: B::Buf,
    mean: B::Buf,
    invstd: B::Buf,
    /// Copies of the running stats for [`BnMode::Batch`], which must not touch the real ones.
    scratch: Option<(B::Buf, B::Buf)>,
    dz: Option<B::Buf>,
    /// Gradient w.r.t. `y`, when a later unit of the same block writes it.
    dy: Option<B::Buf>,
}

impl<B: Backend> UnitActs<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        be: &B,
        spec: ConvBnSpec,
        n: usize,
        h: usize,
        w: usize,
        relu: bool,
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
            y: be.zeros(conv.y_len())?,
            mean: be.zeros(spec.c_out)?,
            invstd: be.zeros(spec.c_out)?,
            scratch: None,
            dz: None,
            dy: None,
        })
    }

    fn out_hw(&self) -> (usize, usize) {
        (self.conv.out_h(), self.conv.out_w())
    }

    fn forward(
        &mut self,
        be: &B,
        params: &mut [Param<B>],
        x: &B::Buf,
        mode: BnMode,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        if mode == BnMode::Eval {
            return self.forward_eval(be, params, x, None, self.relu, None);
        }
        be.conv2d_fwd(&self.conv, x, &params[s.w].data, &mut self.z)?;
        match mode {
            BnMode::Eval => {} // handled above
            BnMode::Train => {
                let [g, b, rm, rv] =
                    params
                        .get_disjoint_mut([s.g, s.b, s.rm, s.rv])
                        .map_err(|e| {
                            ModelError::Internal(format!("batch-norm parameter indices: {e}"))
                        })?;
                be.batchnorm_train_fwd(
                    &self.bn,
                    &self.z,
                    &g.data,
                    &b.data,
                    &mut rm.data,
                    &mut rv.data,
                    &mut self.mean,
                    &mut self.invstd,
                    &mut self.y,
                    self.relu,
                )?;
            }
            BnMode::Batch => {
                if self.scratch.is_none() {
                    self.scratch = Some((be.zeros(s.c_out)?, be.zeros(s.c_out)?));
                }
                let (srm, srv) = self
                    .scratch
                    .as_mut()
                    .ok_or_else(|| internal("running-stat scratch"))?;
                be.copy(&params[s.rm].data, srm)?;
                be.copy(&params[s.rv].data, srv)?;
                let (g, b) = (&params[s.g].data, &params[s.b].data);
                be.batchnorm_train_fwd(
                    &self.bn,
                    &self.z,
                    g,
                    b,
                    srm,
                    srv,
                    &mut self.mean,
                    &mut self.invstd,
                    &mut self.y,
                    self.relu,
                )?;
            }
        }
        Ok(())
    }

    /// Eval-mode forward as one fused op (conv, BN with the running stats, optional
    /// residual, optional ReLU) into `out`, or into this unit's `y` when `out` is None.
    fn forward_eval(
        &mut self,
        be: &B,
        params: &[Param<B>],
        x: &B::Buf,
        residual: Option<&B::Buf>,
        relu: bool,
        out: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        let p = |i: usize| &params[i].data;
        let y = match out {
            Some(o) => o,
            None => &mut self.y,
        };
        be.conv2d_bn_eval_fwd(
            &self.conv,
            &self.bn,
            x,
            p(s.w),
            p(s.g),
            p(s.b),
            p(s.rm),
            p(s.rv),
            residual,
            relu,
            y,
        )?;
        Ok(())
    }

    /// Backward of a training-mode forward: `dy` is dL/d(this unit's output); writes the
    /// conv and BN gradients into the store and, when asked, dL/d(input) into `dx`.
    fn backward(
        &mut self,
        be: &B,
        params: &mut [Param<B>],
        x: &B::Buf,
        dy: &B::Buf,
        dx: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let s = self.spec;
        ensure(be, &mut self.dz, self.conv.y_len())?;
        let dz = self.dz.as_mut().ok_or_else(|| internal("dz"))?;
        {
            let [g, b] = two_mut(params, s.g, s.b)?;
            let dbeta = grad_of(b)?;
            let dgamma = g
                .grad
                .as_mut()
                .ok_or_else(|| internal("bn weight gradient"))?;
            be.batchnorm_bwd(
                &self.bn,
                &self.z,
                &self.y,
                dy,
                &g.data,
                &self.mean,
                &self.invstd,
                dz,
                dgamma,
                dbeta,
                self.relu,
            )?;
        }
        let pw = &mut params[s.w];
        let dw = pw
            .grad
            .as_mut()
            .ok_or_else(|| internal("conv weight gradient"))?;
        be.conv2d_bwd_weight(&self.conv, x, dz, dw)?;
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
    /// dL/d(pre-ReLU sum): the gradient of both branches' outputs.
    g: Option<B::Buf>,
    /// dL/d(out), written by the next block or the pooling.
    dout: Option<B::Buf>,
    /// The downsample branch's input gradient, added to the main branch's.
    dtmp: Option<B::Buf>,
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
            let a = UnitActs::new(be, u, n, ch, cw, j != last, eps, momentum)?;
            (ch, cw) = a.out_hw();
            units.push(a);
        }
        let down = match spec.down {
            Some(d) => Some(UnitActs::new(be, d, n, h, w, false, eps, momentum)?),
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
                g: None,
                dout: None,
                dtmp: None,
            },
            ch,
            cw,
        ))
    }

    fn forward(
        &mut self,
        be: &B,
        params: &mut [Param<B>],
        x: &B::Buf,
        mode: BnMode,
    ) -> Result<(), ModelError> {
        if mode == BnMode::Eval {
            // The shortcut first, then the main branch, its last unit fused with the join.
            if let Some(d) = self.down.as_mut() {
                d.forward(be, params, x, mode)?;
            }
            let last = self.units.len() - 1;
            for j in 0..=last {
                let (prev, cur) = self.units.split_at_mut(j);
                let input = if j == 0 { x } else { &prev[j - 1].y };
                if j < last {
                    cur[0].forward(be, params, input, mode)?;
                } else {
                    let shortcut = match &self.down {
                        Some(d) => &d.y,
                        None => x,
                    };
                    cur[0].forward_eval(
                        be,
                        params,
                        input,
                        Some(shortcut),
                        true,
                        Some(&mut self.out),
                    )?;
                }
            }
            return Ok(());
        }
        for j in 0..self.units.len() {
            let (prev, cur) = self.units.split_at_mut(j);
            let input = if j == 0 { x } else { &prev[j - 1].y };
            cur[0].forward(be, params, input, mode)?;
        }
        if let Some(d) = self.down.as_mut() {
            d.forward(be, params, x, mode)?;
        }
        let last = self.units.last().ok_or_else(|| internal("block units"))?;
        let shortcut = match &self.down {
            Some(d) => &d.y,
            None => x,
        };
        be.add_relu_fwd(&last.y, shortcut, &mut self.out)?;
        Ok(())
    }

    /// Needs `dout`; writes dL/d(block input) into `dx`.
    fn backward(
        &mut self,
        be: &B,
        params: &mut [Param<B>],
        x: &B::Buf,
        dx: &mut B::Buf,
    ) -> Result<(), ModelError> {
        ensure(be, &mut self.g, self.out_len)?;
        let g = self.g.as_mut().ok_or_else(|| internal("g"))?;
        let dout = self
            .dout
            .as_ref()
            .ok_or_else(|| internal("block output gradient"))?;
        be.relu_bwd(&self.out, dout, g)?;
        let g = &*g;
        let last = self.units.len() - 1;
        for j in 0..last {
            let len = self.units[j].conv.y_len();
            ensure(be, &mut self.units[j].dy, len)?;
        }
        for j in (0..=last).rev() {
            let (prev, cur) = self.units.split_at_mut(j);
            let unit = &mut cur[0];
            let own = unit.dy.take();
            let dy = if j == last {
                g
            } else {
                own.as_ref()
                    .ok_or_else(|| internal("unit output gradient"))?
            };
            let r = if j == 0 {
                unit.backward(be, params, x, dy, Some(&mut *dx))
            } else {
                let p = &mut prev[j - 1];
                unit.backward(be, params, &p.y, dy, p.dy.as_mut())
            };
            unit.dy = own;
            r?;
        }
        match self.down.as_mut() {
            Some(d) => {
                ensure(be, &mut self.dtmp, self.in_len)?;
                let dtmp = self.dtmp.as_mut().ok_or_else(|| internal("dtmp"))?;
                d.backward(be, params, x, g, Some(&mut *dtmp))?;
                be.add_assign(dx, dtmp)?;
            }
            None => be.add_assign(dx, g)?,
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
    dpooled: Option<B::Buf>,
    dstem: Option<B::Buf>,
    blocks: Vec<BlockActs<B>>,
    pub out_c: usize,
    pub out_h: usize,
    pub out_w: usize,
    /// Global average pool of the last block: `[n, out_c]`.
    pub gap: B::Buf,
    /// dL/d(gap), written by the layer above before [`BackboneActs::backward`].
    pub dgap: Option<B::Buf>,
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
        let stem = UnitActs::new(be, spec.stem, n, h, w, true, eps, mom)?;
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
        let gap = be.zeros(n * spec.out_c)?;
        Ok(BackboneActs {
            n,
            h,
            w,
            stem,
            pool,
            pooled,
            dpooled: None,
            dstem: None,
            blocks,
            out_c: spec.out_c,
            out_h: ch,
            out_w: cw,
            gap,
            dgap: None,
        })
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
        params: &mut [Param<B>],
        x: &B::Buf,
        mode: BnMode,
    ) -> Result<(), ModelError> {
        self.stem.forward(be, params, x, mode)?;
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

    /// Backward of a [`BnMode::Train`] forward from `dgap`; writes every backbone gradient.
    /// `x` is the input of that forward.
    pub fn backward(
        &mut self,
        be: &B,
        params: &mut [Param<B>],
        x: &B::Buf,
    ) -> Result<(), ModelError> {
        let hw = self.out_h * self.out_w;
        let rows = self.n * self.out_c;
        let dgap = self.dgap.as_ref().ok_or_else(|| internal("dgap"))?;
        let nb = self.blocks.len();
        ensure(be, &mut self.dpooled, self.pool.y_len())?;
        if nb == 0 {
            return Err(ModelError::Internal("a backbone without blocks".into()));
        }
        {
            let last = &mut self.blocks[nb - 1];
            ensure(be, &mut last.dout, last.out_len)?;
            let dout = last.dout.as_mut().ok_or_else(|| internal("dout"))?;
            be.global_avg_pool_bwd(rows, hw, dgap, dout)?;
        }
        for i in (0..nb).rev() {
            let (prev, cur) = self.blocks.split_at_mut(i);
            if i == 0 {
                let dx = self.dpooled.as_mut().ok_or_else(|| internal("dpooled"))?;
                cur[0].backward(be, params, &self.pooled, dx)?;
            } else {
                let p = &mut prev[i - 1];
                ensure(be, &mut p.dout, p.out_len)?;
                let dx = p.dout.as_mut().ok_or_else(|| internal("dout"))?;
                cur[0].backward(be, params, &p.out, dx)?;
            }
        }
        ensure(be, &mut self.dstem, self.stem.conv.y_len())?;
        let dstem = self.dstem.as_mut().ok_or_else(|| internal("dstem"))?;
        let dpooled = self.dpooled.as_ref().ok_or_else(|| internal("dpooled"))?;
        be.maxpool2d_bwd(&self.pool, &self.stem.y, &self.pooled, dpooled, dstem)?;
        self.stem.backward(be, params, x, dstem, None)?;
        Ok(())
    }
}
