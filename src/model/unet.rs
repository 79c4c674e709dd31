//! The stage-3 U-Net over any [`Backend`]: the authors' `UNet2D` (encoder blocks
//! `conv3x3(bias) -> ReLU -> BatchNorm` twice, 2x2 max-pool, a bottleneck block, `ConvTranspose2d`
//! 2x2/2 up written straight into the first channels of the `[up, skip]` concatenation, the
//! skip copied into the last ones, decoder blocks, a 1x1 conv and a sigmoid), with PyTorch's
//! parameter names, any input channels, features and depth (H and W multiples of 2^depth).
//!
//! Laid out as llm.c lays out GPT-2: the parameters are a named struct ([`Weights`], the same
//! struct for gradients and optimizer moments), the activations of one input shape a named
//! struct allocated once and reused while the shape stays, and the gradient buffers a
//! second one allocated with them on the first training pass. The forward runs batch norm in
//! training mode (batch statistics, running statistics updated) or eval mode; the backward
//! is that of the soft Dice loss (plus, when configured, a weighted mean BCE of the logits);
//! the optimizer step is the backend's Adam (or SGD). On CUDA the whole training step
//! (forward, losses, backward, optimizer step) is also available as a captured CUDA graph
//! ([`graph`]). Knows nothing about CT, datasets or files other than the tensors' names.

pub mod checkpoint;
pub mod config;
pub mod graph;
pub mod handle;
pub mod tensors;

pub use config::UNetConfig;
pub use handle::SecondHandle;

/// One trainable tensor's optimizer moments (`m`, `v`), on the host.
pub type MomentPair<T> = (Vec<T>, Vec<T>);
/// Every trainable tensor's moments and the steps taken.
pub type OptSnapshot<T> = (Vec<MomentPair<T>>, u64);
pub use tensors::{Block, BlockStats, RunningStats, Spec, Stats, Unit, Up, Weights};

use super::optim::OptimizerConfig;
use super::ModelError;
use crate::engine::{Backend, BatchNorm2d, ChannelCopy, Conv2d, Pool2d, Real, SoftDice, UpConv2d};
use crate::rng::Rng;
use tensors::Init;

/// The losses of one training pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UNetLoss {
    /// What the backward pass differentiates: `dice + bce_weight * bce`.
    pub loss: f64,
    /// The soft Dice loss.
    pub dice: f64,
    /// The mean BCE of the logits (computed only when `bce_weight > 0`, else 0).
    pub bce: f64,
}

/// Where a training pass's losses go: computed and returned by the backend's ops
/// ([`HostLosses`], the eager pass), or left in a device buffer that a captured CUDA graph
/// writes (`graph.rs`; the returned values are then meaningless). Each writes its loss's
/// gradient.
trait LossSink<B: Backend> {
    /// The soft Dice of `probs` against `targets`; dL/dprobs into `dprobs`.
    fn dice(
        &mut self,
        be: &B,
        s: &SoftDice,
        probs: &B::Buf,
        targets: &B::Buf,
        dprobs: &mut B::Buf,
    ) -> Result<f64, ModelError>;
    /// The mean BCE of `logits` (pos_weight 1); its gradient into `dlogits`.
    fn bce(
        &mut self,
        be: &B,
        logits: &B::Buf,
        targets: &B::Buf,
        dlogits: &mut B::Buf,
    ) -> Result<f64, ModelError>;
}

/// The losses computed and read back at once.
struct HostLosses;

impl<B: Backend> LossSink<B> for HostLosses {
    fn dice(
        &mut self,
        be: &B,
        s: &SoftDice,
        probs: &B::Buf,
        targets: &B::Buf,
        dprobs: &mut B::Buf,
    ) -> Result<f64, ModelError> {
        Ok(be.soft_dice_loss(s, probs, targets, dprobs)?)
    }
    fn bce(
        &mut self,
        be: &B,
        logits: &B::Buf,
        targets: &B::Buf,
        dlogits: &mut B::Buf,
    ) -> Result<f64, ModelError> {
        Ok(be.bce_with_logits(logits, targets, 1.0, dlogits)?)
    }
}

/// One conv(bias) -> ReLU -> BatchNorm unit for one input shape.
struct UnitActs<B: Backend> {
    conv: Conv2d,
    bn: BatchNorm2d,
    /// conv + bias, then ReLU: the batch norm's input.
    r: B::Buf,
    /// The batch norm's output.
    y: B::Buf,
    mean: B::Buf,
    invstd: B::Buf,
}

/// Gradient scratch of one resolution level, shared by its units: dL/d(unit output) of the
/// first unit, dL/d(BN input), dL/d(conv output).
struct Scratch<'a, B: Backend> {
    mid: &'a mut B::Buf,
    s1: &'a mut B::Buf,
    s2: &'a mut B::Buf,
}

impl<B: Backend> UnitActs<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        be: &B,
        cfg: &UNetConfig,
        n: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
    ) -> Result<Self, ModelError> {
        let conv = Conv2d {
            n,
            c_in,
            h,
            w,
            c_out,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        let bn = BatchNorm2d {
            n,
            c: c_out,
            hw: h * w,
            eps: cfg.bn_eps,
            momentum: cfg.bn_momentum,
        };
        Ok(UnitActs {
            conv,
            bn,
            r: be.zeros(conv.y_len())?,
            y: be.zeros(conv.y_len())?,
            mean: be.zeros(c_out)?,
            invstd: be.zeros(c_out)?,
        })
    }

    fn forward(
        &mut self,
        be: &B,
        p: &Unit<B::Buf>,
        st: &mut RunningStats<B::Buf>,
        x: &B::Buf,
        train: bool,
    ) -> Result<(), ModelError> {
        let bn = &self.bn;
        be.conv2d_fwd(&self.conv, x, &p.conv_weight, &mut self.r)?;
        be.bias_relu_assign(bn.n, bn.c, bn.hw, &p.conv_bias, &mut self.r, true)?;
        if train {
            be.batchnorm_train_fwd(
                bn,
                &self.r,
                &p.norm_weight,
                &p.norm_bias,
                &mut st.mean,
                &mut st.var,
                &mut self.mean,
                &mut self.invstd,
                &mut self.y,
                false,
            )?;
        } else {
            be.batchnorm_eval_fwd(
                bn,
                &self.r,
                &p.norm_weight,
                &p.norm_bias,
                &st.mean,
                &st.var,
                &mut self.y,
                false,
            )?;
        }
        Ok(())
    }

    /// From dL/dy: the unit's four gradients into `g`, dL/dx into `dx` when wanted. `s1`,
    /// `s2` are scratch of the unit's output size.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &B,
        p: &Unit<B::Buf>,
        g: &mut Unit<B::Buf>,
        x: &B::Buf,
        dy: &B::Buf,
        s1: &mut B::Buf,
        s2: &mut B::Buf,
        dx: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let bn = &self.bn;
        be.batchnorm_bwd(
            bn,
            &self.r,
            &self.y,
            dy,
            &p.norm_weight,
            &self.mean,
            &self.invstd,
            s1,
            &mut g.norm_weight,
            &mut g.norm_bias,
            false,
        )?;
        be.relu_bwd(&self.r, s1, s2)?;
        be.bias_bwd(bn.n, bn.c, bn.hw, s2, &mut g.conv_bias)?;
        be.conv2d_bwd_weight(&self.conv, x, s2, &mut g.conv_weight)?;
        if let Some(dx) = dx {
            be.conv2d_bwd_data(&self.conv, s2, &p.conv_weight, dx)?;
        }
        Ok(())
    }
}

/// A block's two units; its output is `u2.y`.
struct BlockActs<B: Backend> {
    u1: UnitActs<B>,
    u2: UnitActs<B>,
}

impl<B: Backend> BlockActs<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        be: &B,
        cfg: &UNetConfig,
        n: usize,
        c_in: usize,
        c_out: usize,
        h: usize,
        w: usize,
    ) -> Result<Self, ModelError> {
        Ok(BlockActs {
            u1: UnitActs::new(be, cfg, n, c_in, c_out, h, w)?,
            u2: UnitActs::new(be, cfg, n, c_out, c_out, h, w)?,
        })
    }

    fn out(&self) -> &B::Buf {
        &self.u2.y
    }

    fn forward(
        &mut self,
        be: &B,
        p: &Block<B::Buf>,
        st: &mut BlockStats<B::Buf>,
        x: &B::Buf,
        train: bool,
    ) -> Result<(), ModelError> {
        self.u1.forward(be, &p.unit1, &mut st.norm1, x, train)?;
        self.u2
            .forward(be, &p.unit2, &mut st.norm2, &self.u1.y, train)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        be: &B,
        p: &Block<B::Buf>,
        g: &mut Block<B::Buf>,
        x: &B::Buf,
        dy: &B::Buf,
        sc: Scratch<'_, B>,
        dx: Option<&mut B::Buf>,
    ) -> Result<(), ModelError> {
        let Scratch { mid, s1, s2 } = sc;
        self.u2.backward(
            be,
            &p.unit2,
            &mut g.unit2,
            &self.u1.y,
            dy,
            s1,
            s2,
            Some(&mut *mid),
        )?;
        self.u1
            .backward(be, &p.unit1, &mut g.unit1, x, mid, s1, s2, dx)
    }
}

/// One resolution level `l` (H/2^l x W/2^l, `features * 2^l` channels).
struct Level<B: Backend> {
    enc: BlockActs<B>,
    /// 2x2/2 pooling of the encoder's output: the next level's (or the bottleneck's) input.
    pool: Pool2d,
    pooled: B::Buf,
    /// From the level below (or the bottleneck) into channels `0..c` of `cat`.
    up: UpConv2d,
    /// The encoder's output into channels `c..2c` of `cat`.
    skip: ChannelCopy,
    cat: B::Buf,
    dec: BlockActs<B>,
}

/// The activations of one input shape `[n, in_channels, h, w]`.
struct Acts<B: Backend> {
    n: usize,
    h: usize,
    w: usize,
    levels: Vec<Level<B>>,
    bottleneck: BlockActs<B>,
    seg: Conv2d,
    logits: B::Buf,
    probs: B::Buf,
}

impl<B: Backend> Acts<B> {
    fn new(be: &B, cfg: &UNetConfig, n: usize, h: usize, w: usize) -> Result<Self, ModelError> {
        let d = cfg.depth;
        let mut levels = Vec::with_capacity(d);
        for l in 0..d {
            let (hl, wl, c) = (h >> l, w >> l, cfg.channels(l));
            let c_in = if l == 0 {
                cfg.in_channels
            } else {
                cfg.channels(l - 1)
            };
            let pool = Pool2d {
                n,
                c,
                h: hl,
                w: wl,
                k: 2,
                stride: 2,
                pad: 0,
            };
            let up = UpConv2d {
                n,
                c_in: cfg.channels(l + 1),
                h: hl / 2,
                w: wl / 2,
                c_out: c,
                k: 2,
                y_channels: 2 * c,
                y_offset: 0,
            };
            let skip = ChannelCopy {
                n,
                hw: hl * wl,
                c,
                src_channels: c,
                src_offset: 0,
                dst_channels: 2 * c,
                dst_offset: c,
            };
            levels.push(Level {
                enc: BlockActs::new(be, cfg, n, c_in, c, hl, wl)?,
                pool,
                pooled: be.zeros(pool.y_len())?,
                up,
                skip,
                cat: be.zeros(skip.dst_len())?,
                dec: BlockActs::new(be, cfg, n, 2 * c, c, hl, wl)?,
            });
        }
        let bottleneck = BlockActs::new(
            be,
            cfg,
            n,
            cfg.channels(d - 1),
            cfg.channels(d),
            h >> d,
            w >> d,
        )?;
        let seg = Conv2d {
            n,
            c_in: cfg.features,
            h,
            w,
            c_out: cfg.out_channels,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
        };
        Ok(Acts {
            n,
            h,
            w,
            levels,
            bottleneck,
            seg,
            logits: be.zeros(seg.y_len())?,
            probs: be.zeros(seg.y_len())?,
        })
    }

    /// The whole forward pass on `x`; batch norm in training mode when `train`.
    fn forward(
        &mut self,
        be: &B,
        p: &Weights<B::Buf>,
        st: &mut Stats<B::Buf>,
        x: &B::Buf,
        train: bool,
    ) -> Result<(), ModelError> {
        let d = self.levels.len();
        for l in 0..d {
            let (prev, cur) = self.levels.split_at_mut(l);
            let lv = &mut cur[0];
            let input = if l == 0 { x } else { &prev[l - 1].pooled };
            lv.enc
                .forward(be, &p.encoders[l], &mut st.encoders[l], input, train)?;
            be.maxpool2d_fwd(&lv.pool, lv.enc.out(), &mut lv.pooled)?;
        }
        let deepest = &self.levels[d - 1].pooled;
        self.bottleneck
            .forward(be, &p.bottleneck, &mut st.bottleneck, deepest, train)?;
        for l in (0..d).rev() {
            let (cur, below) = self.levels.split_at_mut(l + 1);
            let lv = &mut cur[l];
            let from = match below.first() {
                Some(b) => b.dec.out(),
                None => self.bottleneck.out(),
            };
            let u = &p.upconvs[l];
            be.upconv2d_fwd(&lv.up, from, &u.weight, &u.bias, &mut lv.cat)?;
            be.copy_channels(&lv.skip, lv.enc.out(), &mut lv.cat, false)?;
            lv.dec
                .forward(be, &p.decoders[l], &mut st.decoders[l], &lv.cat, train)?;
        }
        let s = &self.seg;
        be.conv2d_fwd(s, self.levels[0].dec.out(), &p.seg_weight, &mut self.logits)?;
        let hw = s.h * s.w;
        be.bias_relu_assign(s.n, s.c_out, hw, &p.seg_bias, &mut self.logits, false)?;
        be.sigmoid_fwd(&self.logits, &mut self.probs)?;
        Ok(())
    }
}

/// Gradient buffers of one level, shared by its encoder and decoder (used at different
/// times): dL/d(block output), the units' scratch, dL/d(cat), dL/d(pooled).
struct LevelGrads<B: Backend> {
    d_out: B::Buf,
    mid: B::Buf,
    s1: B::Buf,
    s2: B::Buf,
    d_cat: B::Buf,
    d_pooled: B::Buf,
}

/// Everything a training pass writes besides the activations: the weights' gradients and
/// the activations' gradients of one input shape.
struct TrainBufs<B: Backend> {
    grads: Weights<B::Buf>,
    levels: Vec<LevelGrads<B>>,
    d_bottleneck: B::Buf,
    b_mid: B::Buf,
    b_s1: B::Buf,
    b_s2: B::Buf,
    dprobs: B::Buf,
    dlogits: B::Buf,
    dbce: B::Buf,
}

impl<B: Backend> TrainBufs<B> {
    fn new(be: &B, cfg: &UNetConfig, a: &Acts<B>) -> Result<Self, ModelError> {
        let grads = Weights::try_build(cfg, |_, s| Ok(be.zeros(numel(&s.shape))?))?;
        let mut levels = Vec::with_capacity(a.levels.len());
        for lv in &a.levels {
            let out = lv.enc.u2.conv.y_len();
            levels.push(LevelGrads {
                d_out: be.zeros(out)?,
                mid: be.zeros(out)?,
                s1: be.zeros(out)?,
                s2: be.zeros(out)?,
                d_cat: be.zeros(lv.skip.dst_len())?,
                d_pooled: be.zeros(lv.pool.y_len())?,
            });
        }
        let bl = a.bottleneck.u2.conv.y_len();
        let ll = a.seg.y_len();
        Ok(TrainBufs {
            grads,
            levels,
            d_bottleneck: be.zeros(bl)?,
            b_mid: be.zeros(bl)?,
            b_s1: be.zeros(bl)?,
            b_s2: be.zeros(bl)?,
            dprobs: be.zeros(ll)?,
            dlogits: be.zeros(ll)?,
            dbce: be.zeros(ll)?,
        })
    }

    /// The backward pass of [`Acts::forward`] (training mode) from `self.dlogits`.
    fn backward(
        &mut self,
        be: &B,
        a: &Acts<B>,
        p: &Weights<B::Buf>,
        x: &B::Buf,
    ) -> Result<(), ModelError> {
        let d = a.levels.len();
        let g = &mut self.grads;
        let s = &a.seg;
        be.bias_bwd(s.n, s.c_out, s.h * s.w, &self.dlogits, &mut g.seg_bias)?;
        let top = a.levels[0].dec.out();
        be.conv2d_bwd_weight(s, top, &self.dlogits, &mut g.seg_weight)?;
        be.conv2d_bwd_data(s, &self.dlogits, &p.seg_weight, &mut self.levels[0].d_out)?;
        // Decoders, top down; each up-convolution hands dL/d(its input) one level down.
        for l in 0..d {
            let lv = &a.levels[l];
            let (cur, below) = self.levels.split_at_mut(l + 1);
            let lg = &mut cur[l];
            let sc = Scratch {
                mid: &mut lg.mid,
                s1: &mut lg.s1,
                s2: &mut lg.s2,
            };
            lv.dec.backward(
                be,
                &p.decoders[l],
                &mut g.decoders[l],
                &lv.cat,
                &lg.d_out,
                sc,
                Some(&mut lg.d_cat),
            )?;
            let (from, d_from) = match below.first_mut() {
                Some(b) => (a.levels[l + 1].dec.out(), &mut b.d_out),
                None => (a.bottleneck.out(), &mut self.d_bottleneck),
            };
            let (u, gu) = (&p.upconvs[l], &mut g.upconvs[l]);
            be.upconv2d_bwd(
                &lv.up,
                from,
                &u.weight,
                &lg.d_cat,
                d_from,
                &mut gu.weight,
                &mut gu.bias,
            )?;
        }
        let deepest = &mut self.levels[d - 1];
        a.bottleneck.backward(
            be,
            &p.bottleneck,
            &mut g.bottleneck,
            &a.levels[d - 1].pooled,
            &self.d_bottleneck,
            Scratch {
                mid: &mut self.b_mid,
                s1: &mut self.b_s1,
                s2: &mut self.b_s2,
            },
            Some(&mut deepest.d_pooled),
        )?;
        // Encoders, bottom up: dL/d(encoder output) = the pooling's + the skip's.
        for l in (0..d).rev() {
            let lv = &a.levels[l];
            let (above, cur) = self.levels.split_at_mut(l);
            let lg = &mut cur[0];
            be.maxpool2d_bwd(
                &lv.pool,
                lv.enc.out(),
                &lv.pooled,
                &lg.d_pooled,
                &mut lg.d_out,
            )?;
            let back = ChannelCopy {
                src_channels: lv.skip.dst_channels,
                src_offset: lv.skip.dst_offset,
                dst_channels: lv.skip.src_channels,
                dst_offset: lv.skip.src_offset,
                ..lv.skip
            };
            be.copy_channels(&back, &lg.d_cat, &mut lg.d_out, true)?;
            let (input, dx) = match above.last_mut() {
                Some(up) => (&a.levels[l - 1].pooled, Some(&mut up.d_pooled)),
                None => (x, None),
            };
            let sc = Scratch {
                mid: &mut lg.mid,
                s1: &mut lg.s1,
                s2: &mut lg.s2,
            };
            lv.enc.backward(
                be,
                &p.encoders[l],
                &mut g.encoders[l],
                input,
                &lg.d_out,
                sc,
                dx,
            )?;
        }
        Ok(())
    }
}

/// The activations of the current input shape and, once a training pass ran on it, the
/// training buffers.
struct Workspace<B: Backend> {
    acts: Acts<B>,
    train: Option<TrainBufs<B>>,
}

/// Optimizer moments (Adam's m and v, SGD's momentum in m) and the steps taken.
struct OptState<B: Backend> {
    m: Weights<B::Buf>,
    v: Weights<B::Buf>,
    steps: u64,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The U-Net over one backend: parameters, running statistics, optimizer state and the
/// buffers of the current input shape.
pub struct UNet<B: Backend> {
    be: B,
    cfg: UNetConfig,
    w: Weights<B::Buf>,
    stats: Stats<B::Buf>,
    opt: Option<OptState<B>>,
    ws: Option<Workspace<B>>,
    /// Counts the times a buffer a training step reads or writes was replaced (parameters,
    /// optimizer state, workspace): a CUDA graph captured before holds stale addresses.
    generation: u64,
}

/// Where a named tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Weight(usize),
    Stat(usize),
}

impl<B: Backend> UNet<B> {
    /// Builds the network with PyTorch's default initialisation (Conv2d / ConvTranspose2d:
    /// uniform(+-1/sqrt(fan_in)) for weights and biases; batch norm 1, 0, running 0, 1), one
    /// independent stream of `seed` per tensor.
    pub fn new(backend: B, cfg: UNetConfig, seed: u64) -> Result<Self, ModelError> {
        cfg.validate()?;
        let be = backend;
        let init = |index: u64, s: &Spec| -> Result<B::Buf, ModelError> {
            let n = numel(&s.shape);
            let host: Vec<B::T> = match s.init {
                Init::Uniform(b) => {
                    let mut rng = Rng::stream(seed, index);
                    (0..n)
                        .map(|_| B::T::from_f64_lossy(rng.range(-b, b)))
                        .collect()
                }
                Init::Constant(c) => vec![B::T::from_f64_lossy(c); n],
            };
            Ok(be.upload(&host)?)
        };
        let w = Weights::try_build(&cfg, |i, s| init(i as u64, s))?;
        let stats = Stats::try_build(&cfg, |i, s| init((1 << 32) + i as u64, s))?;
        Ok(UNet {
            be,
            cfg,
            w,
            stats,
            opt: None,
            ws: None,
            generation: 0,
        })
    }

    pub fn cfg(&self) -> &UNetConfig {
        &self.cfg
    }
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Trainable tensors (name, shape), in state_dict order.
    pub fn weight_specs(&self) -> Vec<Spec> {
        Weights::<()>::specs(&self.cfg)
    }
    /// Batch-norm running statistics (name, shape).
    pub fn stat_specs(&self) -> Vec<Spec> {
        Stats::<()>::specs(&self.cfg)
    }
    /// Every tensor's name: the trainables, then the running statistics.
    pub fn names(&self) -> Vec<String> {
        self.weight_specs()
            .into_iter()
            .chain(self.stat_specs())
            .map(|s| s.name)
            .collect()
    }
    /// Number of trainable scalars.
    pub fn trainable_count(&self) -> usize {
        self.weight_specs().iter().map(|s| numel(&s.shape)).sum()
    }

    fn slot(&self, name: &str) -> Result<(Slot, Vec<usize>), ModelError> {
        if let Some((i, s)) = self
            .weight_specs()
            .into_iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
        {
            return Ok((Slot::Weight(i), s.shape));
        }
        self.stat_specs()
            .into_iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
            .map(|(i, s)| (Slot::Stat(i), s.shape))
            .ok_or_else(|| ModelError::UnknownParam(name.to_string()))
    }

    fn buf(&self, slot: Slot) -> Result<&B::Buf, ModelError> {
        let v = match slot {
            Slot::Weight(i) => self.w.refs().get(i).copied(),
            Slot::Stat(i) => self.stats.refs().get(i).copied(),
        };
        v.ok_or_else(|| ModelError::Internal(format!("tensor index {slot:?} out of range")))
    }

    /// A tensor's shape.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.slot(name)?.1)
    }

    /// A parameter's or running statistic's values on the host.
    pub fn param(&self, name: &str) -> Result<Vec<B::T>, ModelError> {
        let (slot, _) = self.slot(name)?;
        Ok(self.be.download(self.buf(slot)?)?)
    }

    /// Overwrites a parameter or running statistic (exactly its element count).
    pub fn set_param(&mut self, name: &str, values: &[B::T]) -> Result<(), ModelError> {
        let (slot, shape) = self.slot(name)?;
        if values.len() != numel(&shape) {
            return Err(ModelError::ParamLen {
                name: name.to_string(),
                shape,
                found: values.len(),
            });
        }
        let buf = self.be.upload(values)?;
        let target = match slot {
            Slot::Weight(i) => self.w.muts().into_iter().nth(i),
            Slot::Stat(i) => self.stats.muts().into_iter().nth(i),
        };
        match target {
            Some(t) => {
                *t = buf;
                self.generation += 1;
                Ok(())
            }
            None => Err(ModelError::Internal(format!(
                "tensor index {slot:?} out of range"
            ))),
        }
    }

    /// The gradient of a trainable tensor from the last [`UNet::forward_backward`].
    pub fn grad(&self, name: &str) -> Result<Vec<B::T>, ModelError> {
        let (slot, _) = self.slot(name)?;
        let Slot::Weight(i) = slot else {
            return Err(ModelError::NoGradient {
                name: name.to_string(),
            });
        };
        let tb = self
            .ws
            .as_ref()
            .and_then(|ws| ws.train.as_ref())
            .ok_or_else(|| {
                ModelError::Input("no gradients yet: run a training pass first".into())
            })?;
        let g = tb
            .grads
            .refs()
            .get(i)
            .copied()
            .ok_or_else(|| ModelError::Internal(format!("gradient index {i} out of range")))?;
        Ok(self.be.download(g)?)
    }

    /// Checks an input batch `[n, in_channels, h, w]`.
    fn check_input(
        &self,
        x_len: usize,
        n: usize,
        h: usize,
        w: usize,
        train: bool,
    ) -> Result<(), ModelError> {
        if n == 0 {
            return Err(ModelError::Input("U-Net input: an empty batch".into()));
        }
        self.cfg.check_size(h, w)?;
        let want = n * self.cfg.in_channels * h * w;
        if x_len != want {
            return Err(ModelError::Input(format!(
                "U-Net input: {x_len} values, expected {n} images x {} channels x {h} x {w} = {want}",
                self.cfg.in_channels
            )));
        }
        let d = self.cfg.depth;
        if train && n * (h >> d) * (w >> d) < 2 {
            return Err(ModelError::Input(format!(
                "U-Net training: batch norm needs more than one value per channel at the bottleneck, \
                 got {n} image(s) of {}x{}: use a larger batch or image",
                h >> d,
                w >> d
            )));
        }
        Ok(())
    }

    /// The workspace of shape `[n, h, w]`, reallocated (old buffers freed first, the
    /// generation counted) when the shape changed.
    fn workspace(
        be: &B,
        cfg: &UNetConfig,
        slot: &mut Option<Workspace<B>>,
        generation: &mut u64,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Workspace<B>, ModelError> {
        match slot.take() {
            Some(ws) if ws.acts.n == n && ws.acts.h == h && ws.acts.w == w => Ok(ws),
            old => {
                drop(old);
                *generation += 1;
                Ok(Workspace {
                    acts: Acts::new(be, cfg, n, h, w)?,
                    train: None,
                })
            }
        }
    }

    /// A training pass: the forward with batch norm in training mode (running statistics
    /// updated), the loss against `targets` `[n, out_channels, h, w]` (values in [0, 1]) and
    /// the backward, which overwrites every gradient. `x` is `[n, in_channels, h, w]`.
    pub fn forward_backward(
        &mut self,
        x: &[B::T],
        targets: &[B::T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<UNetLoss, ModelError> {
        self.check_train_input(x, targets, n, h, w)?;
        let xb = self.be.upload(x)?;
        let tb = self.be.upload(targets)?;
        self.train_pass(&xb, &tb, n, h, w, &mut HostLosses)
    }

    /// The checks of a training pass's input and targets.
    fn check_train_input(
        &self,
        x: &[B::T],
        targets: &[B::T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(), ModelError> {
        self.check_input(x.len(), n, h, w, true)?;
        let want = n * self.cfg.out_channels * h * w;
        if targets.len() != want {
            return Err(ModelError::Input(format!(
                "U-Net targets: {} values, expected {n} x {} x {h} x {w} = {want}",
                targets.len(),
                self.cfg.out_channels
            )));
        }
        if let Some(v) = targets
            .iter()
            .find(|v| !(v.as_f64() >= 0.0 && v.as_f64() <= 1.0))
        {
            return Err(ModelError::Input(format!(
                "U-Net targets must lie in [0, 1], found {v}"
            )));
        }
        Ok(())
    }

    /// The training pass on checked inputs already on the backend, in the workspace of
    /// their shape; the losses go to `sink`.
    fn train_pass(
        &mut self,
        x: &B::Buf,
        targets: &B::Buf,
        n: usize,
        h: usize,
        w: usize,
        sink: &mut impl LossSink<B>,
    ) -> Result<UNetLoss, ModelError> {
        let mut ws = Self::workspace(
            &self.be,
            &self.cfg,
            &mut self.ws,
            &mut self.generation,
            n,
            h,
            w,
        )?;
        let r = self.train_core(&mut ws, x, targets, sink);
        self.ws = Some(ws);
        r
    }

    fn train_core(
        &mut self,
        ws: &mut Workspace<B>,
        x: &B::Buf,
        targets: &B::Buf,
        sink: &mut impl LossSink<B>,
    ) -> Result<UNetLoss, ModelError> {
        let be = &self.be;
        let cfg = &self.cfg;
        let acts = &mut ws.acts;
        let train = match ws.train.take() {
            Some(t) => t,
            None => {
                self.generation += 1;
                TrainBufs::new(be, cfg, acts)?
            }
        };
        let tr = ws.train.insert(train);
        acts.forward(be, &self.w, &mut self.stats, x, true)?;
        let s = acts.seg;
        let dice = SoftDice {
            n: s.n,
            c: s.c_out,
            hw: s.h * s.w,
            eps: cfg.dice_eps,
        };
        let dice_loss = sink.dice(be, &dice, &acts.probs, targets, &mut tr.dprobs)?;
        be.sigmoid_bwd(&acts.probs, &tr.dprobs, &mut tr.dlogits)?;
        let mut bce = 0.0;
        if cfg.bce_weight > 0.0 {
            bce = sink.bce(be, &acts.logits, targets, &mut tr.dbce)?;
            be.scale_assign(&mut tr.dbce, cfg.bce_weight)?;
            be.add_assign(&mut tr.dlogits, &tr.dbce)?;
        }
        tr.backward(be, acts, &self.w, x)?;
        Ok(UNetLoss {
            loss: dice_loss + cfg.bce_weight * bce,
            dice: dice_loss,
            bce,
        })
    }

    /// The probabilities `[n, out_channels, h, w]` of the last forward pass.
    pub fn output(&self) -> Result<Vec<B::T>, ModelError> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| ModelError::Input("no forward pass yet".into()))?;
        Ok(self.be.download(&ws.acts.probs)?)
    }

    /// Eval-mode forward (running statistics, none updated) of `x` already on the backend;
    /// returns the probabilities `[n, out_channels, h, w]` left on the backend.
    pub fn predict_device(
        &mut self,
        x: &B::Buf,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<&B::Buf, ModelError> {
        self.check_input(self.be.len(x), n, h, w, false)?;
        let mut ws = Self::workspace(
            &self.be,
            &self.cfg,
            &mut self.ws,
            &mut self.generation,
            n,
            h,
            w,
        )?;
        let r = ws
            .acts
            .forward(&self.be, &self.w, &mut self.stats, x, false);
        let ws = self.ws.insert(ws);
        r?;
        Ok(&ws.acts.probs)
    }

    /// Eval-mode forward of `x` `[n, in_channels, h, w]`: the probabilities on the host.
    pub fn predict(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<B::T>, ModelError> {
        self.check_input(x.len(), n, h, w, false)?;
        let xb = self.be.upload(x)?;
        self.predict_device(&xb, n, h, w)?;
        self.output()
    }

    /// One optimizer step on every trainable tensor from the last training pass's gradients.
    pub fn step(&mut self, opt: &OptimizerConfig) -> Result<(), ModelError> {
        let tr = self
            .ws
            .as_ref()
            .and_then(|ws| ws.train.as_ref())
            .ok_or_else(|| {
                ModelError::Input("no gradients yet: run a training pass first".into())
            })?;
        let be = &self.be;
        let mut st = match self.opt.take() {
            Some(s) => s,
            None => {
                self.generation += 1;
                OptState {
                    m: Weights::try_build(&self.cfg, |_, s| Ok(be.zeros(numel(&s.shape))?))?,
                    v: Weights::try_build(&self.cfg, |_, s| Ok(be.zeros(numel(&s.shape))?))?,
                    steps: 0,
                }
            }
        };
        let r = (|| -> Result<(), ModelError> {
            let params = self.w.muts();
            let grads = tr.grads.refs();
            let ms = st.m.muts();
            let vs = st.v.muts();
            for (((p, g), m), v) in params.into_iter().zip(grads).zip(ms).zip(vs) {
                match *opt {
                    OptimizerConfig::Sgd {
                        lr,
                        momentum,
                        weight_decay,
                    } => be.sgd_step(p, g, m, lr, momentum, weight_decay, st.steps == 0)?,
                    OptimizerConfig::Adam {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    } => be.adam_step(
                        p,
                        g,
                        m,
                        v,
                        st.steps + 1,
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                    )?,
                }
            }
            Ok(())
        })();
        if r.is_ok() {
            st.steps += 1;
        }
        self.opt = Some(st);
        r
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.opt.as_ref().map_or(0, |o| o.steps)
    }

    /// The optimizer's moments of every trainable tensor, in [`UNet::weight_specs`] order
    /// (`m`, `v`; SGD leaves `v` at zero), and the steps taken; `None` before the first step.
    pub fn opt_state(&self) -> Result<Option<OptSnapshot<B::T>>, ModelError> {
        let Some(st) = &self.opt else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for (m, v) in st.m.refs().into_iter().zip(st.v.refs()) {
            out.push((self.be.download(m)?, self.be.download(v)?));
        }
        Ok(Some((out, st.steps)))
    }

    /// Restores what [`UNet::opt_state`] returned (one `(m, v)` per trainable tensor, in
    /// order, each of the tensor's size).
    pub fn set_opt_state(
        &mut self,
        moments: &[MomentPair<B::T>],
        steps: u64,
    ) -> Result<(), ModelError> {
        let specs = self.weight_specs();
        if moments.len() != specs.len() {
            return Err(ModelError::Input(format!(
                "U-Net optimizer state: {} tensors, expected {}",
                moments.len(),
                specs.len()
            )));
        }
        for (s, (m, v)) in specs.iter().zip(moments) {
            let n = numel(&s.shape);
            if m.len() != n || v.len() != n {
                return Err(ModelError::ParamLen {
                    name: s.name.clone(),
                    shape: s.shape.clone(),
                    found: m.len().min(v.len()),
                });
            }
        }
        let be = &self.be;
        let mut ms = Vec::with_capacity(moments.len());
        let mut vs = Vec::with_capacity(moments.len());
        for (m, v) in moments {
            ms.push(be.upload(m)?);
            vs.push(be.upload(v)?);
        }
        let mut mi = ms.into_iter();
        let mut vi = vs.into_iter();
        let m = Weights::try_build(&self.cfg, |_, _| {
            mi.next()
                .ok_or_else(|| ModelError::Internal("optimizer state ran short".into()))
        })?;
        let v = Weights::try_build(&self.cfg, |_, _| {
            vi.next()
                .ok_or_else(|| ModelError::Internal("optimizer state ran short".into()))
        })?;
        self.opt = Some(OptState { m, v, steps });
        self.generation += 1;
        Ok(())
    }

    /// Frees the activation and gradient buffers (they are rebuilt on the next pass).
    pub fn release_buffers(&mut self) {
        self.ws = None;
        self.generation += 1;
    }
}
