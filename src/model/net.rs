//! [`IchNet`]: the stage-1 network (ResNet per slice, all `batch*seq` slices as one batch ->
//! GAP -> LSTM (batch_first) -> Linear-ReLU-...-Linear(.., 1) per slice) and the stage-2
//! network (the same ResNet -> GAP -> fc Linear(features, 1)) over one parameter store,
//! with their forward and backward passes, the optimizer step, and the CAM / Grad-CAM path.
//! The backbone's and the sequence's activations (and their gradients when training) of a
//! given input shape are allocated once and reused while the shape stays, and so are the
//! stage-2 training head's logits and their gradient; the stage-2 inference head's and the
//! CAM's few small buffers are allocated per call. Eval-mode passes (inference, validation,
//! the stage-2 training step's frozen backbone) run on the eval-mode backbone, whose few
//! buffers follow its activation plan ([`super::eval_plan`]), never on the training
//! activations; the CAM pass owns its own, for a chunk of its slices ([`CamChunking`]). A
//! warm training step of either stage thus allocates nothing besides its input uploads and
//! never waits for the device besides its loss (and logits) readback, which the steps'
//! cores leave to their callers: on CUDA the whole step is captured as a graph and replayed
//! (`net_graph.rs`), keyed by [`IchNet::generation`], which counts every replacement or
//! allocation of a buffer a step holds. The parameters' gradients and optimizer moments are
//! allocated on their first training use: a model used only for inference holds neither.
//! Knows nothing about CT, datasets or files.

use super::config::ModelConfig;
use super::memory;
use super::optim::{self, OptimizerConfig};
use super::params::{grad_buf, Group, Init, ParamGroup, ParamStore, W};
use super::resnet::{self, BackboneActs, BackboneEval, BackboneGrads, BackboneSpec, BnMode};
use super::ModelError;
use crate::engine::{ActStorage, Backend, ChannelCopy, Lstm, Real};

/// Which class activation map [`IchNet::stage2_infer`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CamKind {
    /// Last block's feature maps weighted by the fc weights (no ReLU).
    Vanilla,
    /// Feature maps weighted by the spatial mean of d(fc logit)/d(features), then ReLU.
    GradCam,
}

/// The result of one stage-1 training step.
#[derive(Clone, Debug)]
pub struct Stage1Step {
    /// Mean BCE-with-logits over all `batch*seq` slices.
    pub loss: f64,
    /// `[batch*seq]`, slice-major within each sequence.
    pub logits: Vec<f64>,
}

/// Stage-2 inference on single slices, on the host.
#[derive(Clone, Debug)]
pub struct Stage2Out {
    /// `[n]` fc logits.
    pub logits: Vec<f64>,
    /// Size (fh, fw) of the last block's feature maps.
    pub features_hw: (usize, usize),
    /// `[n, fh, fw]` at feature resolution.
    pub cam: Vec<f64>,
    /// `[n, h, w]`, bilinear (align_corners=False).
    pub cam_up: Vec<f64>,
    /// `cam_up` min-max normalised per slice (a constant slice becomes 0).
    pub cam_norm: Vec<f64>,
}

/// Stage-2 inference with the results left on the backend: the logits and the CAM at the
/// features' resolution (the segmentation brings it to the native grid itself).
pub struct Stage2DeviceOut<B: Backend> {
    /// `[n]` fc logits.
    pub logits: B::Buf,
    /// Size (fh, fw) of the last block's feature maps.
    pub features_hw: (usize, usize),
    /// `[n, fh, fw]`.
    pub cam: B::Buf,
}

/// Stage-2 inference on the host without upsampling: the fc logits `[n]`, the CAM at the
/// features' resolution `[n, fh, fw]` and `(fh, fw)`.
pub type Stage2Cam = (Vec<f64>, Vec<f64>, (usize, usize));

/// The outputs of a vanilla-CAM pass ([`IchNet::stage2_cam_pass`]) over `n` slices of
/// `h x w`, allocated once for that shape and written again by every pass: a warm pass
/// allocates nothing (so that it can be captured as a CUDA graph and replayed).
pub struct CamPassBufs<B: Backend> {
    /// `[n]` fc logits.
    pub logits: B::Buf,
    /// `[n, fh, fw]` CAM at the features' resolution.
    pub cam: B::Buf,
    /// `[n, h, w]` CAM upsampled to the input (bilinear, align_corners=False) and min-max
    /// normalised per slice.
    pub norm: B::Buf,
    /// Size (fh, fw) of the last block's feature maps.
    pub features_hw: (usize, usize),
    /// (n, h, w) of the pass.
    pub shape: (usize, usize, usize),
    /// Slices per chunk of the backbone (`n` when the pass is not split).
    pub chunk: usize,
    /// Values of the staging buffers.
    staging_scalars: usize,
    /// The chunk's eval-mode backbone: the pass's own, so that nothing else reallocates
    /// the buffers a CUDA graph of the pass holds.
    eval: BackboneEval<B>,
    /// A chunk's input and outputs when the pass is split.
    staging: Option<CamStaging<B>>,
}

/// How [`IchNet::stage2_cam_pass`] splits its slices: the eval-mode backbone runs on
/// chunks of slices, each writing its rows of the full-batch outputs, so that the pass's
/// memory does not grow with its slices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CamChunking {
    /// The fewest chunks, as even as can be, whose pass [`memory::cam_pass_bytes`] counts
    /// within this many bytes (parameters, input, outputs and activations;
    /// [`memory::cam_pass_chunk`]); chunks of one slice when none fits.
    Budget(u128),
    /// At most this many slices per chunk (0 counts as 1).
    Slices(usize),
}

/// The default memory budget of a CAM pass: issue 14's goal for the paper's ResNet-101 on
/// 32 slices of 512^2 (0.8 GB), less 100 MB for what [`memory::cam_pass_bytes`] does not
/// count: the composite ops' scratch (on CUDA the split-K workspaces, kept per length; by
/// our reading of the split plan about 4 x SMs x 64 x 64 values, 9 MB, each on an H200) and
/// the CUDA graph. It splits that pass into 7 chunks of 5 slices (the last of 2; 0.67 GB
/// counted: 0.18 GB of it parameters, 0.35 GB the chunk's activations and staging, 0.10 GB
/// the input); when a built model still held a gradient buffer per trainable (0.18 GB more)
/// it took 16 chunks of 2. Channels-last the count and the chunks are the same, but the
/// default channels-last unit (`Backend::conv2d_bn_eval_fwd_nhwc`'s NCHW temporaries) keeps
/// about 0.33 GB more scratch that this margin does not cover (docs/perf.md). In bf16 storage
/// (CUDA at `--precision bf16`) the pass takes 5 chunks of 7 (0.70 GB counted); the bf16
/// unit by conversions keeps about 0.46 GB of f32 copies in the arena, not covered either.
/// Not measured on a GPU.
pub const CAM_PASS_BUDGET: u128 = 700_000_000;

impl Default for CamChunking {
    fn default() -> Self {
        CamChunking::Budget(CAM_PASS_BUDGET)
    }
}

/// A CAM pass's chunk: its input and outputs, copied from and to the full-batch buffers.
struct CamStaging<B: Backend> {
    x: B::Buf,
    logits: B::Buf,
    cam: B::Buf,
    norm: B::Buf,
}

impl<B: Backend> CamPassBufs<B> {
    /// The buffers of a pass on `n` slices of `c_in x h x w` in chunks of `m`.
    fn new(
        be: &B,
        spec: &BackboneSpec,
        c_in: usize,
        n: usize,
        h: usize,
        w: usize,
        m: usize,
    ) -> Result<Self, ModelError> {
        let eval = BackboneEval::new(be, spec, m, h, w)?;
        let fhw = eval.out_h * eval.out_w;
        let staging = if m < n {
            Some(CamStaging {
                x: be.zeros(m * c_in * h * w)?,
                logits: be.zeros(m)?,
                cam: be.zeros(m * fhw)?,
                norm: be.zeros(m * h * w)?,
            })
        } else {
            None
        };
        Ok(CamPassBufs {
            logits: be.zeros(n)?,
            cam: be.zeros(n * fhw)?,
            norm: be.zeros(n * h * w)?,
            features_hw: (eval.out_h, eval.out_w),
            shape: (n, h, w),
            chunk: m,
            staging_scalars: m * (c_in * h * w + 1 + fhw + h * w) * usize::from(m < n),
            eval,
            staging,
        })
    }

    /// Values of the activations the pass allocated: the chunk's eval-mode backbone (its
    /// plan's buffers and pooled features) and, when chunked, the chunk's staging buffers
    /// (the input and the outputs are not counted).
    pub fn activation_scalars(&self) -> usize {
        self.eval.scalars() + self.staging_scalars
    }

    /// Whether the pass's backbone runs its blocks channels-last (what the backend asked
    /// for when these buffers were made, [`Backend::channels_last_eval`]).
    pub fn channels_last(&self) -> bool {
        self.eval.channels_last
    }

    /// The storage of the pass's channels-last activations (f32 when NCHW; what the backend
    /// asked for when these buffers were made, [`Backend::eval_storage`]).
    pub fn storage(&self) -> ActStorage {
        self.eval.storage
    }

    /// Layout and storage as [`memory`]'s counts take them.
    pub fn layout(&self) -> memory::ActLayout {
        self.eval.layout
    }
}

/// One tensor's optimizer state on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct OptState<T> {
    /// SGD's momentum buffer or Adam's first moment (None before the first step).
    pub m: Option<Vec<T>>,
    /// Adam's second moment.
    pub v: Option<Vec<T>>,
    /// Steps taken.
    pub steps: u64,
}

/// The last block's feature maps `[n, c, h, w]`.
#[derive(Clone, Debug)]
pub struct FeatureMaps {
    pub data: Vec<f64>,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

#[derive(Clone, Copy, Debug)]
struct LinearSpec {
    w: W,
    b: W,
    k: usize,
    n: usize,
}

#[derive(Clone, Copy, Debug)]
struct LstmSpec {
    w_ih: W,
    w_hh: W,
    b_ih: W,
    b_hh: W,
    input: usize,
}

struct LstmActs<B: Backend> {
    s: Lstm,
    h: B::Buf,
    c: B::Buf,
    gates: B::Buf,
}

/// A linear layer's output.
struct LinActs<B: Backend> {
    spec: LinearSpec,
    a: B::Buf,
}

/// Stage-1 activations above the backbone for one (batch, seq).
struct SeqActs<B: Backend> {
    batch: usize,
    seq: usize,
    lstm: Vec<LstmActs<B>>,
    head: Vec<LinActs<B>>,
    /// ReLU of every head layer's output but the last's.
    relu: Vec<B::Buf>,
}

/// An LSTM layer's training buffers: dL/d(its output), dL/d(its bias).
struct LstmGrads<B: Backend> {
    dh: B::Buf,
    db: B::Buf,
}

/// The training buffers of a [`SeqActs`], made for it (allocated with it when training).
struct SeqGrads<B: Backend> {
    batch: usize,
    seq: usize,
    lstm: Vec<LstmGrads<B>>,
    /// dL/d(output) of every head layer.
    head: Vec<B::Buf>,
    /// dL/d(ReLU output) of every head layer but the last.
    relu: Vec<B::Buf>,
}

impl<B: Backend> SeqActs<B> {
    fn new(
        be: &B,
        lstm: &[LstmSpec],
        head: &[LinearSpec],
        hidden: usize,
        batch: usize,
        seq: usize,
    ) -> Result<Self, ModelError> {
        let n = batch * seq;
        let mut la = Vec::with_capacity(lstm.len());
        for l in lstm {
            let s = Lstm {
                batch,
                seq,
                input: l.input,
                hidden,
            };
            la.push(LstmActs {
                s,
                h: be.zeros(s.h_len())?,
                c: be.zeros(s.h_len())?,
                gates: be.zeros(s.gates_len())?,
            });
        }
        let mut ha = Vec::with_capacity(head.len());
        for &spec in head {
            ha.push(LinActs {
                spec,
                a: be.zeros(n * spec.n)?,
            });
        }
        let relu = head[..head.len().saturating_sub(1)]
            .iter()
            .map(|spec| be.zeros(n * spec.n))
            .collect::<Result<_, _>>()?;
        Ok(SeqActs {
            batch,
            seq,
            lstm: la,
            head: ha,
            relu,
        })
    }

    fn fits(&self, batch: usize, seq: usize) -> bool {
        (self.batch, self.seq) == (batch, seq)
    }
}

impl<B: Backend> SeqGrads<B> {
    fn new(be: &B, a: &SeqActs<B>) -> Result<Self, ModelError> {
        let n = a.batch * a.seq;
        Ok(SeqGrads {
            batch: a.batch,
            seq: a.seq,
            lstm: a
                .lstm
                .iter()
                .map(|l| {
                    Ok::<_, ModelError>(LstmGrads {
                        dh: be.zeros(l.s.h_len())?,
                        db: be.zeros(4 * l.s.hidden)?,
                    })
                })
                .collect::<Result<_, _>>()?,
            head: a
                .head
                .iter()
                .map(|h| be.zeros(n * h.spec.n))
                .collect::<Result<_, _>>()?,
            relu: a
                .relu
                .iter()
                .map(|r| be.zeros(be.len(r)))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// The buffer in `slot` when `fits` says it is for the current shape, else a new one from
/// `make` (the old one freed first, the replacement counted in `generation`).
fn reuse<'a, T, E>(
    slot: &'a mut Option<T>,
    generation: &mut u64,
    fits: impl FnOnce(&T) -> bool,
    make: impl FnOnce() -> Result<T, E>,
) -> Result<&'a mut T, E> {
    match slot.take() {
        Some(t) if fits(&t) => Ok(slot.insert(t)),
        old => {
            drop(old);
            *generation += 1;
            Ok(slot.insert(make()?))
        }
    }
}

/// An input shape: `batch` sequences of `seq` slices of `h x w` (the backbone sees
/// `batch * seq` images; single slices are `seq` 1).
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
    h: usize,
    w: usize,
}

impl Dims {
    /// `n` single images.
    fn images(n: usize, h: usize, w: usize) -> Self {
        Dims {
            batch: n,
            seq: 1,
            h,
            w,
        }
    }
    fn n(self) -> usize {
        self.batch * self.seq
    }
}

/// What the network is made of beyond its tensors: the layers' places in the store and
/// their sizes.
struct Topology {
    backbone: BackboneSpec,
    lstm: Vec<LstmSpec>,
    head: Vec<LinearSpec>,
    fc: LinearSpec,
    hidden: usize,
}

/// The stage-1 activations of a training step and their gradients.
type TrainBufs<'a, B> = (
    &'a mut BackboneActs<B>,
    &'a mut SeqActs<B>,
    &'a mut BackboneGrads<B>,
    &'a mut SeqGrads<B>,
);

/// The buffers of the current input shape: the backbone's and the sequence's activations
/// and, once a training step ran on that shape, their gradients; the eval-mode backbone's
/// (each reallocated, the old ones freed first, when the shape changes). Training and
/// batch-statistics passes use `bb`, eval-mode passes `eval` only: inference never
/// allocates the training activations. Every (re)allocation is counted in `generation`.
struct Slots<B: Backend> {
    bb: Option<BackboneActs<B>>,
    eval: Option<BackboneEval<B>>,
    bb_grads: Option<BackboneGrads<B>>,
    seq: Option<SeqActs<B>>,
    seq_grads: Option<SeqGrads<B>>,
    /// The stage-2 training step's fc logits `[n]` and their gradient, for `n`.
    fc_train: Option<(usize, B::Buf, B::Buf)>,
    /// Counts the times a buffer of these slots was allocated or replaced (never reset:
    /// [`Slots::release`] counts too).
    generation: u64,
}

impl<B: Backend> Slots<B> {
    fn empty() -> Self {
        Slots {
            bb: None,
            eval: None,
            bb_grads: None,
            seq: None,
            seq_grads: None,
            fc_train: None,
            generation: 0,
        }
    }

    /// Frees every buffer (counted as a replacement).
    fn release(&mut self) {
        *self = Slots {
            generation: self.generation + 1,
            ..Slots::empty()
        };
    }

    /// The eval-mode backbone run on `x` `[n, c, h, w]`.
    fn backbone(
        &mut self,
        be: &B,
        t: &Topology,
        store: &ParamStore<B>,
        x: &B::Buf,
        d: Dims,
    ) -> Result<&mut BackboneEval<B>, ModelError> {
        eval_pass(
            be,
            &t.backbone,
            store,
            &mut self.eval,
            &mut self.generation,
            x,
            d,
        )
    }

    /// The stage-1 net (backbone, LSTM, head) run on `x` `[batch, seq, c, h, w]`: the
    /// eval-mode backbone for [`BnMode::Eval`], the training activations otherwise.
    fn stage1(
        &mut self,
        be: &B,
        t: &Topology,
        store: &mut ParamStore<B>,
        x: &B::Buf,
        d: Dims,
        mode: BnMode,
    ) -> Result<&mut SeqActs<B>, ModelError> {
        let gen = &mut self.generation;
        let gap = if mode == BnMode::Eval {
            &eval_pass(be, &t.backbone, store, &mut self.eval, gen, x, d)?.gap
        } else {
            &backbone_pass(be, &t.backbone, store, &mut self.bb, gen, x, d, mode)?.gap
        };
        seq_pass(be, t, store, &mut self.seq, gen, gap, d)
    }

    /// [`Slots::stage1`] in training mode, with the gradients of those activations.
    fn stage1_train(
        &mut self,
        be: &B,
        t: &Topology,
        store: &mut ParamStore<B>,
        x: &B::Buf,
        d: Dims,
    ) -> Result<TrainBufs<'_, B>, ModelError> {
        let gen = &mut self.generation;
        let bb = backbone_pass(
            be,
            &t.backbone,
            store,
            &mut self.bb,
            gen,
            x,
            d,
            BnMode::Train,
        )?;
        let sa = seq_pass(be, t, store, &mut self.seq, gen, &bb.gap, d)?;
        let bg = reuse(
            &mut self.bb_grads,
            gen,
            |g| g.fits(bb),
            || BackboneGrads::new(be, bb),
        )?;
        let sg = reuse(
            &mut self.seq_grads,
            gen,
            |g| (g.batch, g.seq) == (d.batch, d.seq),
            || SeqGrads::new(be, sa),
        )?;
        Ok((bb, sa, bg, sg))
    }

    /// The eval-mode backbone and fc on `x` `[n, c, h, w]`: the backbone's activations and
    /// the fc logits `[n]`.
    fn stage2(
        &mut self,
        be: &B,
        t: &Topology,
        store: &mut ParamStore<B>,
        x: &B::Buf,
        d: Dims,
    ) -> Result<(&BackboneEval<B>, B::Buf), ModelError> {
        let bb = eval_pass(
            be,
            &t.backbone,
            store,
            &mut self.eval,
            &mut self.generation,
            x,
            d,
        )?;
        let (n, fc) = (d.n(), t.fc);
        let mut logits = be.zeros(n)?;
        let p = |i: W| &store.w[i.0].data;
        be.linear_fwd(n, fc.k, 1, &bb.gap, p(fc.w), Some(p(fc.b)), &mut logits)?;
        Ok((bb, logits))
    }
}

/// Runs the backbone on `x` `[n, c, h, w]` in the activations of that shape in `slot`
/// (a reallocation counted in `generation`) and returns them.
#[allow(clippy::too_many_arguments)]
fn backbone_pass<'a, B: Backend>(
    be: &B,
    spec: &BackboneSpec,
    store: &mut ParamStore<B>,
    slot: &'a mut Option<BackboneActs<B>>,
    generation: &mut u64,
    x: &B::Buf,
    d: Dims,
    mode: BnMode,
) -> Result<&'a mut BackboneActs<B>, ModelError> {
    let (n, h, w) = (d.n(), d.h, d.w);
    let bb = reuse(
        slot,
        generation,
        |a| a.fits(n, h, w),
        || BackboneActs::new(be, spec, n, h, w),
    )?;
    bb.forward(be, store, x, mode)?;
    Ok(bb)
}

/// Runs the eval-mode backbone on `x` `[n, c, h, w]` in the buffers of that shape in
/// `slot` (a reallocation counted in `generation`) and returns them.
fn eval_pass<'a, B: Backend>(
    be: &B,
    spec: &BackboneSpec,
    store: &ParamStore<B>,
    slot: &'a mut Option<BackboneEval<B>>,
    generation: &mut u64,
    x: &B::Buf,
    d: Dims,
) -> Result<&'a mut BackboneEval<B>, ModelError> {
    let (n, h, w) = (d.n(), d.h, d.w);
    let bb = reuse(
        slot,
        generation,
        |a| a.fits(n, h, w),
        || BackboneEval::new(be, spec, n, h, w),
    )?;
    bb.forward(be, store, x)?;
    Ok(bb)
}

/// Runs the LSTM and the head on the pooled features `gap` `[batch * seq, features]` in
/// the activations of that shape in `slot` (a reallocation counted in `generation`) and
/// returns them.
fn seq_pass<'a, B: Backend>(
    be: &B,
    t: &Topology,
    store: &ParamStore<B>,
    slot: &'a mut Option<SeqActs<B>>,
    generation: &mut u64,
    gap: &B::Buf,
    d: Dims,
) -> Result<&'a mut SeqActs<B>, ModelError> {
    let (batch, seq, n) = (d.batch, d.seq, d.n());
    let sa = reuse(
        slot,
        generation,
        |a| a.fits(batch, seq),
        || SeqActs::new(be, &t.lstm, &t.head, t.hidden, batch, seq),
    )?;
    let p = |i: W| &store.w[i.0].data;
    for (l, spec) in t.lstm.iter().enumerate() {
        let (prev, cur) = sa.lstm.split_at_mut(l);
        let x = if l == 0 { gap } else { &prev[l - 1].h };
        let a = &mut cur[0];
        be.lstm_fwd(
            &a.s,
            x,
            p(spec.w_ih),
            p(spec.w_hh),
            p(spec.b_ih),
            p(spec.b_hh),
            &mut a.h,
            &mut a.c,
            &mut a.gates,
        )?;
    }
    let top = sa.lstm.len() - 1;
    let last = sa.head.len() - 1;
    for i in 0..=last {
        let x = if i == 0 {
            &sa.lstm[top].h
        } else {
            &sa.relu[i - 1]
        };
        let a = &mut sa.head[i];
        let s = a.spec;
        be.linear_fwd(n, s.k, s.n, x, p(s.w), Some(p(s.b)), &mut a.a)?;
        if i < last {
            be.relu_fwd(&a.a, &mut sa.relu[i])?;
        }
    }
    Ok(sa)
}

fn to_f64<T: Real>(v: Vec<T>) -> Vec<f64> {
    v.into_iter().map(|x| x.as_f64()).collect()
}

/// The ResNet-LSTM (stage 1) and ResNet-fc (stage 2) networks over one parameter store.
pub struct IchNet<B: Backend> {
    be: B,
    cfg: ModelConfig,
    store: ParamStore<B>,
    topo: Topology,
    train: bool,
    slots: Slots<B>,
    cam_chunking: CamChunking,
}

impl<B: Backend> IchNet<B> {
    /// Builds the network with torchvision's / PyTorch's default initialisation from `seed`.
    pub fn new(backend: B, cfg: ModelConfig, seed: u64) -> Result<Self, ModelError> {
        cfg.validate()?;
        let be = backend;
        let mut store = ParamStore::default();
        let backbone = resnet::declare(&mut store, &be, &cfg, seed)?;
        let feat = backbone.out_c;
        let hid = cfg.lstm_hidden;
        let seqg = Group::Sequence;
        let mut lstm = Vec::with_capacity(cfg.lstm_layers);
        // nn.LSTM: every tensor uniform(-1/sqrt(hidden), 1/sqrt(hidden)).
        let k = Init::Uniform(1.0 / (hid as f64).sqrt());
        for l in 0..cfg.lstm_layers {
            let input = if l == 0 { feat } else { hid };
            let w_ih = store.add_trainable(
                &be,
                format!("lstm.weight_ih_l{l}"),
                vec![4 * hid, input],
                seqg,
                k,
                seed,
            )?;
            let w_hh = store.add_trainable(
                &be,
                format!("lstm.weight_hh_l{l}"),
                vec![4 * hid, hid],
                seqg,
                k,
                seed,
            )?;
            let b_ih = store.add_trainable(
                &be,
                format!("lstm.bias_ih_l{l}"),
                vec![4 * hid],
                seqg,
                k,
                seed,
            )?;
            let b_hh = store.add_trainable(
                &be,
                format!("lstm.bias_hh_l{l}"),
                vec![4 * hid],
                seqg,
                k,
                seed,
            )?;
            lstm.push(LstmSpec {
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                input,
            });
        }
        let add_linear = |store: &mut ParamStore<B>,
                          prefix: String,
                          k: usize,
                          n: usize,
                          group: Group| {
            // nn.Linear: kaiming_uniform(a=sqrt(5)) = uniform(+-1/sqrt(fan_in)), bias the same.
            let init = Init::Uniform(1.0 / (k as f64).sqrt());
            let w = store.add_trainable(
                &be,
                format!("{prefix}.weight"),
                vec![n, k],
                group,
                init,
                seed,
            )?;
            let b =
                store.add_trainable(&be, format!("{prefix}.bias"), vec![n], group, init, seed)?;
            Ok::<_, ModelError>(LinearSpec { w, b, k, n })
        };
        let mut head = Vec::new();
        let mut kin = hid;
        let widths: Vec<usize> = cfg.head.iter().copied().chain(std::iter::once(1)).collect();
        for (i, &n) in widths.iter().enumerate() {
            // nn.Sequential numbering: Linear, ReLU, Linear, ... -> indices 0, 2, 4.
            head.push(add_linear(
                &mut store,
                format!("head.{}", 2 * i),
                kin,
                n,
                seqg,
            )?);
            kin = n;
        }
        let fc = add_linear(&mut store, "fc".into(), feat, 1, Group::Fc)?;
        Ok(IchNet {
            be,
            cfg,
            store,
            topo: Topology {
                backbone,
                lstm,
                head,
                fc,
                hidden: hid,
            },
            train: false,
            slots: Slots::empty(),
            cam_chunking: CamChunking::default(),
        })
    }

    pub fn cfg(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn backend(&self) -> &B {
        &self.be
    }
    pub fn params(&self) -> &ParamStore<B> {
        &self.store
    }
    /// Length of the pooled feature vector (the fc's input).
    pub fn feature_channels(&self) -> usize {
        self.topo.backbone.out_c
    }

    /// Selects the batch norm of the forward-only stage-1 pass ([`IchNet::stage1_logits`]):
    /// `true` normalises with the batch's statistics (without touching the running stats),
    /// `false` (the default) with the running stats, as PyTorch's eval(). Training steps
    /// always use batch statistics and update the running stats.
    pub fn set_train(&mut self, train: bool) {
        self.train = train;
    }
    pub fn is_train(&self) -> bool {
        self.train
    }

    /// Every tensor's name, in `state_dict` order.
    pub fn names(&self) -> Vec<String> {
        self.store.names()
    }
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.store.get(name)?.shape.to_vec())
    }
    pub fn param(&self, name: &str) -> Result<Vec<B::T>, ModelError> {
        Ok(self.be.download(self.store.get(name)?.data)?)
    }
    /// Overwrites a tensor's values: a new buffer (counted in [`IchNet::generation`]).
    pub fn set_param(&mut self, name: &str, values: &[B::T]) -> Result<(), ModelError> {
        self.store.set(&self.be, name, values)
    }
    /// The gradient left by the last backward pass (zeros before the first training pass of
    /// the tensor's group, which allocates it).
    pub fn grad(&self, name: &str) -> Result<Vec<B::T>, ModelError> {
        let p = self.store.trainable(name)?;
        match &p.grad {
            Some(g) => Ok(self.be.download(g)?),
            None => Ok(vec![B::T::from_f64_lossy(0.0); p.numel()]),
        }
    }
    /// Zeroes every gradient (those not allocated yet are zeros). (The backward passes
    /// overwrite the gradients they compute, so this is needed only to clear gradients a
    /// pass does not touch.)
    pub fn zero_grads(&mut self) -> Result<(), ModelError> {
        for g in self.store.w.iter_mut().filter_map(|p| p.grad.as_mut()) {
            self.be.fill(g, 0.0)?;
        }
        Ok(())
    }
    /// Counts every replacement or allocation of a buffer a training step reads or writes:
    /// a tensor set ([`IchNet::set_param`], as a checkpoint load does), an optimizer state
    /// set or allocated, a gradient allocated, the activations (training, eval-mode, the
    /// stage-2 head's) reallocated for another input shape, the buffers released. A CUDA
    /// graph captured at another generation holds stale addresses (`net_graph.rs` keys its
    /// graphs with it).
    pub fn generation(&self) -> u64 {
        self.store.generation() + self.slots.generation
    }
    /// One optimizer step on the tensors of `group` from the current gradients.
    pub fn step(&mut self, opt: &OptimizerConfig, group: ParamGroup) -> Result<(), ModelError> {
        optim::step(&self.be, &mut self.store, opt, group)
    }
    /// Optimizer state of a tensor, for checkpoints.
    pub fn opt_state(&self, name: &str) -> Result<OptState<B::T>, ModelError> {
        if self.store.get(name)?.kind == super::ParamKind::Buffer {
            // A running statistic: never stepped.
            return Ok(OptState {
                m: None,
                v: None,
                steps: 0,
            });
        }
        let p = self.store.trainable(name)?;
        let m = p.m.as_ref().map(|b| self.be.download(b)).transpose()?;
        let v = p.v.as_ref().map(|b| self.be.download(b)).transpose()?;
        Ok(OptState {
            m,
            v,
            steps: p.step,
        })
    }
    /// Restores the optimizer state saved by [`IchNet::opt_state`] (new buffers: counted in
    /// [`IchNet::generation`]).
    pub fn set_opt_state(
        &mut self,
        name: &str,
        m: Option<&[B::T]>,
        v: Option<&[B::T]>,
        steps: u64,
    ) -> Result<(), ModelError> {
        let be = &self.be;
        let p = self.store.trainable_mut(name)?;
        let n = p.numel();
        for x in [m, v].into_iter().flatten() {
            if x.len() != n {
                return Err(ModelError::ParamLen {
                    name: format!("optimizer state of {name}"),
                    shape: p.shape.clone(),
                    found: x.len(),
                });
            }
        }
        p.m = m.map(|x| be.upload(x)).transpose()?;
        p.v = v.map(|x| be.upload(x)).transpose()?;
        p.step = steps;
        self.store.replaced();
        Ok(())
    }

    fn check_images(
        &self,
        x_len: usize,
        n: usize,
        h: usize,
        w: usize,
        what: &str,
    ) -> Result<(), ModelError> {
        if n == 0 || h == 0 || w == 0 {
            return Err(ModelError::Input(format!(
                "{what}: empty input ({n} slices of {h}x{w})"
            )));
        }
        let want = n * self.cfg.in_channels * h * w;
        if x_len != want {
            return Err(ModelError::Input(format!(
                "{what}: {x_len} values, expected {n} slices x {} channels x {h} x {w} = {want}",
                self.cfg.in_channels
            )));
        }
        Ok(())
    }

    /// Stage-1 training forward + loss + backward: batch norm with batch statistics over all
    /// `batch*seq` slices (running stats updated), every gradient of the backbone, LSTM and
    /// head overwritten. `x` is `[batch, seq, c, h, w]`, `labels` `[batch*seq]` in {0, 1}.
    #[allow(clippy::too_many_arguments)]
    pub fn stage1_forward_backward(
        &mut self,
        x: &[B::T],
        labels: &[B::T],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
    ) -> Result<Stage1Step, ModelError> {
        self.check_stage1_input(x, labels, batch, seq, h, w, pos_weight)?;
        let xb = self.be.upload(x)?;
        let yb = self.be.upload(labels)?;
        let d = Dims { batch, seq, h, w };
        let loss = self.stage1_core(&xb, &yb, d, |be, l, y, dl| {
            Ok(be.bce_with_logits(l, y, pos_weight, dl)?)
        })?;
        let logits = self.stage1_train_logits()?;
        Ok(Stage1Step { loss, logits })
    }

    /// The checks of a stage-1 training step's inputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check_stage1_input<T>(
        &self,
        x: &[T],
        labels: &[T],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
    ) -> Result<(), ModelError> {
        let n = batch * seq;
        self.check_images(x.len(), n, h, w, "stage-1 input")?;
        if labels.len() != n {
            return Err(ModelError::Input(format!(
                "{} labels for {batch} x {seq} slices",
                labels.len()
            )));
        }
        check_pos_weight(pos_weight)
    }

    /// The checks of a stage-2 training step's inputs.
    pub(crate) fn check_stage2_input<T>(
        &self,
        x: &[T],
        labels: &[T],
        n: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
    ) -> Result<(), ModelError> {
        self.check_images(x.len(), n, h, w, "stage-2 input")?;
        if labels.len() != n {
            return Err(ModelError::Input(format!(
                "{} labels for {n} slices",
                labels.len()
            )));
        }
        check_pos_weight(pos_weight)
    }

    /// [`IchNet::stage1_core`] for the graphed step (`net_graph.rs`): dims (batch, seq, h, w).
    pub(crate) fn stage1_core_dev(
        &mut self,
        xb: &B::Buf,
        yb: &B::Buf,
        (batch, seq, h, w): (usize, usize, usize, usize),
        bce: impl FnOnce(&B, &B::Buf, &B::Buf, &mut B::Buf) -> Result<f64, ModelError>,
    ) -> Result<f64, ModelError> {
        self.stage1_core(xb, yb, Dims { batch, seq, h, w }, bce)
    }

    /// [`IchNet::stage2_core`] for the graphed step: dims (n, h, w).
    pub(crate) fn stage2_core_dev(
        &mut self,
        xb: &B::Buf,
        yb: &B::Buf,
        (n, h, w): (usize, usize, usize),
        bce: impl FnOnce(&B, &B::Buf, &B::Buf, &mut B::Buf) -> Result<f64, ModelError>,
    ) -> Result<f64, ModelError> {
        self.stage2_core(xb, yb, Dims::images(n, h, w), bce)
    }

    /// Counts one optimizer step on the tensors of `group` (after a graph's step ran).
    pub(crate) fn advance_steps(&mut self, group: ParamGroup) {
        optim::advance_steps(&mut self.store, group)
    }

    /// The logits `[batch*seq]` of the last stage-1 pass, on the host.
    pub(crate) fn stage1_last_logits(&self) -> Result<Vec<f64>, ModelError> {
        self.stage1_train_logits()
    }

    /// The logits `[batch*seq]` of the last stage-1 pass, on the host.
    fn stage1_train_logits(&self) -> Result<Vec<f64>, ModelError> {
        let sa = self
            .slots
            .seq
            .as_ref()
            .ok_or_else(|| ModelError::Internal("no stage-1 pass ran".into()))?;
        let last = sa.head.len() - 1;
        Ok(to_f64(self.be.download(&sa.head[last].a)?))
    }

    /// The stage-1 training forward and backward on device inputs `xb` `[batch, seq, c, h,
    /// w]` and `yb` `[batch*seq]` (checked by the caller): `bce(be, logits, targets,
    /// dlogits)` computes the loss's gradient (and returns the loss, or NaN when it leaves
    /// it on the device); nothing waits for the device otherwise.
    fn stage1_core(
        &mut self,
        xb: &B::Buf,
        yb: &B::Buf,
        d: Dims,
        bce: impl FnOnce(&B, &B::Buf, &B::Buf, &mut B::Buf) -> Result<f64, ModelError>,
    ) -> Result<f64, ModelError> {
        self.store.ensure_grads(&self.be, ParamGroup::Stage1)?;
        let be = &self.be;
        let n = d.n();
        // The activations and, allocated with them, their gradients.
        let (bb, sa, bg, sg) = self
            .slots
            .stage1_train(be, &self.topo, &mut self.store, xb, d)?;
        let params = &mut self.store;
        let last = sa.head.len() - 1;
        let top = sa.lstm.len() - 1;
        let loss = bce(be, &sa.head[last].a, yb, &mut sg.head[last])?;
        // Head, top to bottom.
        for i in (0..=last).rev() {
            let s = sa.head[i].spec;
            let [pw, pb] = params
                .w
                .get_disjoint_mut([s.w.0, s.b.0])
                .map_err(|e| ModelError::Internal(e.to_string()))?;
            let (lo, hi) = sg.head.split_at_mut(i);
            let dy = &hi[0];
            if i == 0 {
                be.linear_bwd(
                    n,
                    s.k,
                    s.n,
                    &sa.lstm[top].h,
                    &pw.data,
                    dy,
                    Some(&mut sg.lstm[top].dh),
                    grad_buf(&mut pw.grad, &pw.name)?,
                    Some(grad_buf(&mut pb.grad, &pb.name)?),
                )?;
            } else {
                let r = &sa.relu[i - 1];
                let dr = &mut sg.relu[i - 1];
                be.linear_bwd(
                    n,
                    s.k,
                    s.n,
                    r,
                    &pw.data,
                    dy,
                    Some(&mut *dr),
                    grad_buf(&mut pw.grad, &pw.name)?,
                    Some(grad_buf(&mut pb.grad, &pb.name)?),
                )?;
                be.relu_bwd(r, dr, &mut lo[i - 1])?;
            }
        }
        // LSTM layers, top to bottom; layer 0 writes dL/d(pooled features).
        for l in (0..=top).rev() {
            let spec = self.topo.lstm[l];
            let [wi, wh, bi, bh] = params
                .w
                .get_disjoint_mut([spec.w_ih.0, spec.w_hh.0, spec.b_ih.0, spec.b_hh.0])
                .map_err(|e| ModelError::Internal(e.to_string()))?;
            let (lo, hi) = sg.lstm.split_at_mut(l);
            let g = &mut hi[0];
            let a = &sa.lstm[l];
            let (x, dx) = if l == 0 {
                (&bb.gap, &mut bg.dgap)
            } else {
                (&sa.lstm[l - 1].h, &mut lo[l - 1].dh)
            };
            be.lstm_bwd(
                &a.s,
                x,
                &wi.data,
                &wh.data,
                &a.h,
                &a.c,
                &a.gates,
                &g.dh,
                dx,
                grad_buf(&mut wi.grad, &wi.name)?,
                grad_buf(&mut wh.grad, &wh.name)?,
                &mut g.db,
            )?;
            be.copy(&g.db, grad_buf(&mut bi.grad, &bi.name)?)?;
            be.copy(&g.db, grad_buf(&mut bh.grad, &bh.name)?)?;
        }
        bb.backward(be, params, bg, xb)?;
        Ok(loss)
    }

    /// Stage-1 logits without gradients (validation): eval-mode batch norm, or batch
    /// statistics after `set_train(true)`.
    pub fn stage1_logits(
        &mut self,
        x: &[B::T],
        batch: usize,
        seq: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f64>, ModelError> {
        let n = batch * seq;
        self.check_images(x.len(), n, h, w, "stage-1 input")?;
        let be = &self.be;
        let xb = be.upload(x)?;
        let mode = if self.train {
            BnMode::Batch
        } else {
            BnMode::Eval
        };
        let d = Dims { batch, seq, h, w };
        let sa = self
            .slots
            .stage1(be, &self.topo, &mut self.store, &xb, d, mode)?;
        let last = sa.head.len() - 1;
        Ok(to_f64(be.download(&sa.head[last].a)?))
    }

    /// Stage-2 training step: the backbone frozen (eval-mode batch norm, no backbone
    /// gradients); overwrites only the gradients of `fc.weight` and `fc.bias`. `x` is
    /// `[n, c, h, w]`. Returns the mean BCE-with-logits.
    #[allow(clippy::too_many_arguments)]
    pub fn stage2_forward_backward(
        &mut self,
        x: &[B::T],
        labels: &[B::T],
        n: usize,
        h: usize,
        w: usize,
        pos_weight: f64,
    ) -> Result<f64, ModelError> {
        self.check_stage2_input(x, labels, n, h, w, pos_weight)?;
        let xb = self.be.upload(x)?;
        let yb = self.be.upload(labels)?;
        let d = Dims::images(n, h, w);
        self.stage2_core(&xb, &yb, d, |be, l, y, dl| {
            Ok(be.bce_with_logits(l, y, pos_weight, dl)?)
        })
    }

    /// The stage-2 training forward and backward on device inputs `xb` `[n, c, h, w]` and
    /// `yb` `[n]` (checked by the caller), the loss as in [`IchNet::stage1_core`].
    fn stage2_core(
        &mut self,
        xb: &B::Buf,
        yb: &B::Buf,
        d: Dims,
        bce: impl FnOnce(&B, &B::Buf, &B::Buf, &mut B::Buf) -> Result<f64, ModelError>,
    ) -> Result<f64, ModelError> {
        self.store.ensure_grads(&self.be, ParamGroup::Fc)?;
        let be = &self.be;
        let (n, fc) = (d.n(), self.topo.fc);
        let gen = &mut self.slots.generation;
        let bb = eval_pass(
            be,
            &self.topo.backbone,
            &self.store,
            &mut self.slots.eval,
            gen,
            xb,
            d,
        )?;
        let (_, logits, dlogits) = reuse(
            &mut self.slots.fc_train,
            gen,
            |t| t.0 == n,
            || Ok::<_, ModelError>((n, be.zeros(n)?, be.zeros(n)?)),
        )?;
        {
            let p = |i: W| &self.store.w[i.0].data;
            be.linear_fwd(n, fc.k, 1, &bb.gap, p(fc.w), Some(p(fc.b)), logits)?;
        }
        let loss = bce(be, logits, yb, dlogits)?;
        let [pw, pb] = self
            .store
            .w
            .get_disjoint_mut([fc.w.0, fc.b.0])
            .map_err(|e| ModelError::Internal(e.to_string()))?;
        be.linear_bwd(
            n,
            fc.k,
            1,
            &bb.gap,
            &pw.data,
            dlogits,
            None,
            grad_buf(&mut pw.grad, &pw.name)?,
            Some(grad_buf(&mut pb.grad, &pb.name)?),
        )?;
        Ok(loss)
    }

    /// Eval-mode last-block feature maps of `x` `[n, c, h, w]`.
    pub fn stage2_features(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<FeatureMaps, ModelError> {
        self.check_images(x.len(), n, h, w, "stage-2 input")?;
        let be = &self.be;
        let xb = be.upload(x)?;
        let d = Dims::images(n, h, w);
        let bb = self.slots.backbone(be, &self.topo, &self.store, &xb, d)?;
        Ok(FeatureMaps {
            data: to_f64(be.download(bb.features())?),
            c: bb.out_c,
            h: bb.out_h,
            w: bb.out_w,
        })
    }

    /// Stage-2 inference (eval mode) on a device buffer `[n, c, h, w]`: fc logits and the
    /// chosen CAM at feature resolution.
    pub fn stage2_infer_device(
        &mut self,
        x: &B::Buf,
        n: usize,
        h: usize,
        w: usize,
        cam: CamKind,
    ) -> Result<Stage2DeviceOut<B>, ModelError> {
        self.check_images(self.be.len(x), n, h, w, "stage-2 input")?;
        let be = &self.be;
        let d = Dims::images(n, h, w);
        let (bb, logits) = self.slots.stage2(be, &self.topo, &mut self.store, x, d)?;
        let (c, fh, fw) = (bb.out_c, bb.out_h, bb.out_w);
        let hw = fh * fw;
        let fc_w = &self.store.w[self.topo.fc.w.0].data;
        let mut map = be.zeros(n * hw)?;
        match cam {
            CamKind::Vanilla => be.cam_weight(n, c, hw, bb.features(), fc_w, &mut map)?,
            CamKind::GradCam => {
                // d(logit_i)/d(gap_i) = fc weight, routed through the pooling's backward.
                let ones = be.upload(&vec![B::T::from_f64_lossy(1.0); n])?;
                let mut dgap = be.zeros(n * c)?;
                let mut dw = be.zeros(c)?;
                be.linear_bwd(
                    n,
                    c,
                    1,
                    &bb.gap,
                    fc_w,
                    &ones,
                    Some(&mut dgap),
                    &mut dw,
                    None,
                )?;
                let mut dfeat = be.zeros(n * c * hw)?;
                be.global_avg_pool_bwd(n * c, hw, &dgap, &mut dfeat)?;
                be.gradcam(n, c, hw, bb.features(), &dfeat, &mut map)?;
            }
        }
        Ok(Stage2DeviceOut {
            logits,
            features_hw: (fh, fw),
            cam: map,
        })
    }

    /// Stage-2 (eval mode) fc logits of `x` `[n, c, h, w]` on the host: no CAM.
    pub fn stage2_logits(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Vec<f64>, ModelError> {
        self.check_images(x.len(), n, h, w, "stage-2 input")?;
        let be = &self.be;
        let xb = be.upload(x)?;
        let d = Dims::images(n, h, w);
        let (_, logits) = self.slots.stage2(be, &self.topo, &mut self.store, &xb, d)?;
        Ok(to_f64(be.download(&logits)?))
    }

    /// [`IchNet::stage2_infer_device`] of host input `x` `[n, c, h, w]`.
    fn stage2_from_host(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
        cam: CamKind,
    ) -> Result<Stage2DeviceOut<B>, ModelError> {
        self.check_images(x.len(), n, h, w, "stage-2 input")?;
        let xb = self.be.upload(x)?;
        self.stage2_infer_device(&xb, n, h, w, cam)
    }

    /// [`IchNet::stage2_infer_device`] from and to host memory: the fc logits `[n]`, the CAM
    /// at the features' resolution `[n, fh, fw]` and `(fh, fw)`; nothing upsampled.
    pub fn stage2_cam(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
        cam: CamKind,
    ) -> Result<Stage2Cam, ModelError> {
        let o = self.stage2_from_host(x, n, h, w, cam)?;
        let d = |b: &B::Buf| self.be.download(b).map(to_f64);
        Ok((d(&o.logits)?, d(&o.cam)?, o.features_hw))
    }

    /// How [`IchNet::stage2_cam_pass`] splits its slices into chunks (by default the largest
    /// chunk whose pass fits [`CAM_PASS_BUDGET`] bytes).
    pub fn set_cam_chunking(&mut self, c: CamChunking) {
        self.cam_chunking = c;
    }
    pub fn cam_chunking(&self) -> CamChunking {
        self.cam_chunking
    }

    /// Slices per chunk of a CAM pass on `n` slices of `h x w`: at most what
    /// [`IchNet::set_cam_chunking`] allows, the chunks as even as can be (`n` when the pass
    /// is not split).
    pub fn cam_chunk(&self, n: usize, h: usize, w: usize) -> usize {
        match self.cam_chunking {
            CamChunking::Slices(m) => memory::even_chunk(n, m),
            CamChunking::Budget(bytes) => {
                let elem = std::mem::size_of::<B::T>();
                let layout = memory::ActLayout::of(&self.be);
                memory::cam_pass_chunk(&self.cfg, n, h, w, elem, bytes, layout)
            }
        }
    }

    /// The whole vanilla-CAM pass (eval mode) on a device buffer `[n, c, h, w]` into
    /// `bufs`: the backbone, the fc logits, and the CAM at feature resolution and upsampled
    /// and normalised at the input's ([`Backend::cam_normalized`]). The backbone runs on
    /// chunks of [`IchNet::cam_chunk`] slices (copied out of `x`), each writing its rows of
    /// the outputs; in eval mode a slice's result does not depend on the others in its
    /// batch. `bufs` (the outputs, the chunk's eval-mode backbone and its staging buffers:
    /// everything the pass writes) is (re)allocated when it does not hold this shape and
    /// chunk; with it in place, the pass allocates nothing and never waits for the device.
    pub fn stage2_cam_pass(
        &mut self,
        x: &B::Buf,
        n: usize,
        h: usize,
        w: usize,
        bufs: &mut Option<CamPassBufs<B>>,
    ) -> Result<(), ModelError> {
        self.check_images(self.be.len(x), n, h, w, "stage-2 input")?;
        let m = self.cam_chunk(n, h, w);
        let be = &self.be;
        let c_in = self.cfg.in_channels;
        if !matches!(bufs, Some(b) if b.shape == (n, h, w) && b.chunk == m) {
            *bufs = None;
            *bufs = Some(CamPassBufs::new(be, &self.topo.backbone, c_in, n, h, w, m)?);
        }
        let b = bufs
            .as_mut()
            .ok_or_else(|| ModelError::Internal("CAM pass buffers missing".into()))?;
        let fc = self.topo.fc;
        let (fc_w, fc_b) = (&self.store.w[fc.w.0].data, &self.store.w[fc.b.0].data);
        let CamPassBufs {
            logits,
            cam,
            norm,
            eval,
            staging,
            ..
        } = b;
        let (c, fh, fw) = (eval.out_c, eval.out_h, eval.out_w);
        let Some(st) = staging else {
            // One chunk: straight into the outputs.
            eval.forward(be, &self.store, x)?;
            be.linear_fwd(n, fc.k, 1, &eval.gap, fc_w, Some(fc_b), logits)?;
            return Ok(be.cam_normalized(n, c, fh, fw, h, w, eval.features(), fc_w, cam, norm)?);
        };
        for start in (0..n).step_by(m) {
            // Rows `start..start + k` of an `[n, row]` buffer and rows `0..k` of an
            // `[m, row]` one; the last chunk may be short (its other rows are left over
            // from the chunk before and never copied out).
            let k = m.min(n - start);
            let rows =
                |row: usize, (src_rows, src_at): (usize, usize), (dst_rows, dst_at)| ChannelCopy {
                    n: 1,
                    hw: row,
                    c: k,
                    src_channels: src_rows,
                    src_offset: src_at,
                    dst_channels: dst_rows,
                    dst_offset: dst_at,
                };
            let (whole, part) = ((n, start), (m, 0));
            be.copy_channels(&rows(c_in * h * w, whole, part), x, &mut st.x, false)?;
            eval.forward(be, &self.store, &st.x)?;
            be.linear_fwd(m, fc.k, 1, &eval.gap, fc_w, Some(fc_b), &mut st.logits)?;
            be.cam_normalized(
                m,
                c,
                fh,
                fw,
                h,
                w,
                eval.features(),
                fc_w,
                &mut st.cam,
                &mut st.norm,
            )?;
            be.copy_channels(&rows(1, part, whole), &st.logits, logits, false)?;
            be.copy_channels(&rows(fh * fw, part, whole), &st.cam, cam, false)?;
            be.copy_channels(&rows(h * w, part, whole), &st.norm, norm, false)?;
        }
        Ok(())
    }

    /// The CAM of a stage-2 pass on `n` slices upsampled to the input's `h x w` (bilinear,
    /// align_corners=False), and that min-max normalised per slice (a constant slice
    /// becomes 0).
    pub fn cam_to_input(
        &self,
        o: &Stage2DeviceOut<B>,
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<(B::Buf, B::Buf), ModelError> {
        let (fh, fw) = o.features_hw;
        let be = &self.be;
        let mut up = be.zeros(n * h * w)?;
        be.upsample_bilinear(n, fh, fw, h, w, &o.cam, &mut up)?;
        let mut norm = be.zeros(n * h * w)?;
        be.minmax_normalize(n, h * w, &up, &mut norm)?;
        Ok((up, norm))
    }

    /// [`IchNet::stage2_infer_device`] from and to host memory, with the CAM also upsampled
    /// to `h x w` and min-max normalised per slice (the parity fixtures' outputs).
    pub fn stage2_infer(
        &mut self,
        x: &[B::T],
        n: usize,
        h: usize,
        w: usize,
        cam: CamKind,
    ) -> Result<Stage2Out, ModelError> {
        let o = self.stage2_from_host(x, n, h, w, cam)?;
        let (up, norm) = self.cam_to_input(&o, n, h, w)?;
        let d = |b: &B::Buf| self.be.download(b).map(to_f64);
        Ok(Stage2Out {
            logits: d(&o.logits)?,
            features_hw: o.features_hw,
            cam: d(&o.cam)?,
            cam_up: d(&up)?,
            cam_norm: d(&norm)?,
        })
    }

    /// Values held by the eval-mode backbone's buffers (None before an eval pass, or after
    /// a shape change freed them), and whether the training activations are allocated.
    #[cfg(test)]
    pub(crate) fn activation_state(&self) -> (Option<usize>, bool) {
        let eval = self.slots.eval.as_ref().map(BackboneEval::scalars);
        (
            eval,
            self.slots.bb.is_some() || self.slots.bb_grads.is_some(),
        )
    }

    /// Whether the training activations (built by the last training or batch-statistics
    /// pass) run the blocks channels-last (what the backend's
    /// [`Backend::channels_last_train`] said when they were built); None before such a pass.
    pub fn train_channels_last(&self) -> Option<bool> {
        self.slots.bb.as_ref().map(|b| b.channels_last)
    }

    /// The storage of the training activations' channels-last tensors (f32 when NCHW; what
    /// the backend's [`Backend::train_storage`] said when they were built); None before a
    /// training or batch-statistics pass.
    pub fn train_storage(&self) -> Option<ActStorage> {
        self.slots.bb.as_ref().map(|b| b.storage)
    }

    /// Slots (values of the backend's scalar) the backbone's training buffers hold: its
    /// activations, and their gradients once a training step ran on that shape (what
    /// [`memory::train_backbone_slots`] counts); None before a training or batch-statistics
    /// pass.
    pub fn train_backbone_slots(&self) -> Option<(usize, Option<usize>)> {
        let a = self.slots.bb.as_ref()?;
        let g = self.slots.bb_grads.as_ref().map(|g| g.scalars(&self.be));
        Some((a.scalars(&self.be), g))
    }

    /// Frees the cached activation buffers (they are reallocated on the next pass; counted
    /// in [`IchNet::generation`]).
    pub fn release_buffers(&mut self) {
        self.slots.release();
    }
}

/// BCE's `pos_weight` must be a positive number.
fn check_pos_weight(pos_weight: f64) -> Result<(), ModelError> {
    if pos_weight.is_finite() && pos_weight > 0.0 {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "pos_weight must be positive, got {pos_weight}"
        )))
    }
}

impl IchNet<crate::engine::cuda::CudaBackend> {
    /// The optimizer step of a captured graph ([`optim::step_device`]).
    pub(crate) fn step_dev(
        &mut self,
        opt: &OptimizerConfig,
        group: ParamGroup,
        hyper: &cudarc::driver::CudaSlice<f32>,
    ) -> Result<(), ModelError> {
        optim::step_device(&self.be, &mut self.store, opt, group, hyper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuBackend;
    use crate::rng::Rng;

    fn net(seed: u64) -> IchNet<CpuBackend<f64>> {
        let cfg = ModelConfig {
            layers: vec![1, 1],
            base_width: 4,
            lstm_hidden: 5,
            ..ModelConfig::tiny()
        };
        IchNet::new(CpuBackend::new(), cfg, seed).unwrap()
    }

    fn randn(seed: u64, n: usize) -> Vec<f64> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal()).collect()
    }

    #[test]
    fn names_follow_pytorch_order_and_init_is_torchvision_like() {
        let n = net(1);
        let names = n.names();
        assert_eq!(
            &names[..5],
            [
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var"
            ]
        );
        let tail: Vec<&str> = names[names.len() - 12..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            [
                "lstm.weight_ih_l0",
                "lstm.weight_hh_l0",
                "lstm.bias_ih_l0",
                "lstm.bias_hh_l0",
                "head.0.weight",
                "head.0.bias",
                "head.2.weight",
                "head.2.bias",
                "head.4.weight",
                "head.4.bias",
                "fc.weight",
                "fc.bias"
            ]
        );
        assert!(names.contains(&"layer2.0.downsample.1.running_var".to_string()));
        assert!(!names.iter().any(|x| x.starts_with("layer1.0.downsample")));
        // Kaiming fan_out: std = sqrt(2 / (c_out * 7 * 7)).
        let w = n.param("conv1.weight").unwrap();
        let std = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt();
        let want = (2.0f64 / (4.0 * 49.0)).sqrt();
        assert!((std / want - 1.0).abs() < 0.15, "{std} vs {want}");
        assert!(n.param("bn1.weight").unwrap().iter().all(|&x| x == 1.0));
        assert!(n
            .param("layer1.0.bn2.running_var")
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
        let bound = 1.0 / 5f64.sqrt();
        assert!(n
            .param("lstm.weight_hh_l0")
            .unwrap()
            .iter()
            .all(|x| x.abs() <= bound));
        // Same seed, same weights; another seed, others.
        assert_eq!(
            n.param("head.2.weight").unwrap(),
            net(1).param("head.2.weight").unwrap()
        );
        assert_ne!(
            n.param("head.2.weight").unwrap(),
            net(2).param("head.2.weight").unwrap()
        );
    }

    #[test]
    fn train_flag_selects_batch_stats_without_touching_running_stats() {
        let mut n = net(3);
        let x = randn(4, 2 * 3 * 20 * 20);
        let eval = n.stage1_logits(&x, 1, 2, 20, 20).unwrap();
        n.set_train(true);
        let batch = n.stage1_logits(&x, 1, 2, 20, 20).unwrap();
        assert_ne!(eval, batch);
        assert_eq!(
            n.param("bn1.running_mean").unwrap(),
            vec![0.0; 4],
            "a forward-only pass updated the running stats"
        );
        // The training step normalises the same way, so its logits equal the batch-stat ones.
        let step = n
            .stage1_forward_backward(&x, &[0.0, 1.0], 1, 2, 20, 20, 1.0)
            .unwrap();
        assert_eq!(step.logits, batch);
        assert_ne!(n.param("bn1.running_mean").unwrap(), vec![0.0; 4]);
    }

    #[test]
    fn shape_changes_reallocate_and_give_the_same_answers() {
        let mut a = net(5);
        let mut b = net(5);
        let x1 = randn(6, 3 * 3 * 17 * 21);
        let x2 = randn(7, 2 * 3 * 32 * 32);
        let first = a.stage2_infer(&x1, 3, 17, 21, CamKind::Vanilla).unwrap();
        a.stage2_infer(&x2, 2, 32, 32, CamKind::GradCam).unwrap();
        let again = a.stage2_infer(&x1, 3, 17, 21, CamKind::Vanilla).unwrap();
        assert_eq!(first.logits, again.logits);
        assert_eq!(first.cam_up, again.cam_up);
        assert_eq!(first.cam_up.len(), 3 * 17 * 21);
        let fresh = b.stage2_infer(&x1, 3, 17, 21, CamKind::Vanilla).unwrap();
        assert_eq!(first.cam_norm, fresh.cam_norm);
        let g = b.stage2_infer(&x2, 2, 32, 32, CamKind::GradCam).unwrap();
        assert!(g.cam.iter().all(|&v| v >= 0.0));
        assert!(g.cam_norm.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(g.features_hw, (4, 4)); // 32 -> stem 16 -> pool 8 -> layer2 4
    }

    #[test]
    fn host_logits_and_cam_are_those_of_the_full_inference() {
        let mut a = net(12);
        let x = randn(13, 3 * 3 * 32 * 32);
        let full = a.stage2_infer(&x, 3, 32, 32, CamKind::GradCam).unwrap();
        assert_eq!(a.stage2_logits(&x, 3, 32, 32).unwrap(), full.logits);
        let (l, cam, hw) = a.stage2_cam(&x, 3, 32, 32, CamKind::GradCam).unwrap();
        assert_eq!((l, cam, hw), (full.logits, full.cam, full.features_hw));
        assert!(a.stage2_logits(&x, 2, 32, 32).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut n = net(8);
        let x = randn(9, 2 * 3 * 16 * 16);
        let e = n
            .stage1_forward_backward(&x, &[1.0, 0.0], 1, 2, 16, 15, 1.0)
            .unwrap_err();
        assert!(matches!(e, ModelError::Input(_)), "{e}");
        assert!(n
            .stage1_forward_backward(&x, &[1.0], 1, 2, 16, 16, 1.0)
            .is_err());
        assert!(n
            .stage1_forward_backward(&x, &[1.0, 0.0], 1, 2, 16, 16, -1.0)
            .is_err());
        assert!(n.stage1_logits(&x, 0, 2, 16, 16).is_err());
        assert!(n
            .stage2_forward_backward(&x, &[1.0], 2, 16, 16, 1.0)
            .is_err());
        assert!(n.stage2_infer(&x, 3, 16, 16, CamKind::Vanilla).is_err());
        assert!(matches!(
            n.set_param("conv1.weight", &[1.0]),
            Err(ModelError::ParamLen { .. })
        ));
        assert!(matches!(
            n.param("conv9.weight"),
            Err(ModelError::UnknownParam(_))
        ));
        assert!(matches!(
            n.grad("bn1.running_var"),
            Err(ModelError::NoGradient { .. })
        ));
        let bad = ModelConfig {
            layers: vec![],
            ..ModelConfig::tiny()
        };
        assert!(IchNet::new(CpuBackend::<f64>::new(), bad, 0).is_err());
    }

    #[test]
    fn inference_allocates_no_training_activations() {
        let mut n = net(14);
        let x = randn(15, 3 * 3 * 24 * 24);
        assert_eq!(n.activation_state(), (None, false));
        n.stage2_infer(&x, 3, 24, 24, CamKind::GradCam).unwrap();
        n.stage2_features(&x, 3, 24, 24).unwrap();
        n.stage2_logits(&x, 3, 24, 24).unwrap();
        n.stage1_logits(&x, 1, 3, 24, 24).unwrap();
        n.stage2_forward_backward(&x, &[1.0, 0.0, 1.0], 3, 24, 24, 1.0)
            .unwrap();
        let xb = n.be.upload(&x).unwrap();
        let mut bufs = None;
        n.stage2_cam_pass(&xb, 3, 24, 24, &mut bufs).unwrap();
        let (eval, train) = n.activation_state();
        assert!(eval.is_some() && !train, "{eval:?} {train}");
        // Batch statistics (and training) keep every layer's output.
        n.set_train(true);
        n.stage1_logits(&x, 1, 3, 24, 24).unwrap();
        assert!(n.activation_state().1);
    }

    #[test]
    fn eval_plan_from_the_config_is_the_built_backbones() {
        use crate::model::BlockKind;
        for (block, layers) in [
            (BlockKind::Basic, vec![1, 2, 3]),
            (BlockKind::Bottleneck, vec![3, 1, 2]),
        ] {
            let cfg = ModelConfig {
                block,
                layers,
                base_width: 4,
                ..ModelConfig::tiny()
            };
            let n = IchNet::new(CpuBackend::<f64>::new(), cfg.clone(), 1).unwrap();
            for cl in memory::ActLayout::ALL {
                let built = resnet::eval_plan_ops(&n.topo.backbone, 2, 45, 31, cl);
                let (ops, _) = memory::eval_ops(&cfg, 2, 45, 31, cl).unwrap();
                assert_eq!(ops, built, "{block:?} {cl:?}");
            }
            // Channels-last: two more ops, the layout changes around the blocks; in packed
            // bf16 the NHWC tensors take half the slots (rounded up).
            let ops = |l| resnet::eval_plan_ops(&n.topo.backbone, 2, 45, 31, l);
            let (nchw, nhwc, bf16) = (
                ops(memory::ActLayout::Nchw),
                ops(memory::ActLayout::Nhwc),
                ops(memory::ActLayout::NhwcBf16),
            );
            assert_eq!(nhwc.len(), nchw.len() + 2);
            let last = nhwc.len() - 1;
            for (i, (a, b)) in nhwc.iter().zip(&bf16).enumerate() {
                let want = if (2..last).contains(&i) {
                    a.len.div_ceil(2)
                } else {
                    a.len
                };
                assert_eq!(b.len, want, "op {i}");
            }
        }
    }

    #[test]
    fn sgd_step_moves_only_its_group() {
        let mut n = net(10);
        let x = randn(11, 2 * 3 * 16 * 16);
        n.stage1_forward_backward(&x, &[1.0, 0.0], 1, 2, 16, 16, 1.0)
            .unwrap();
        n.stage2_forward_backward(&x, &[1.0, 0.0], 2, 16, 16, 1.0)
            .unwrap();
        let (c0, f0) = (
            n.param("conv1.weight").unwrap(),
            n.param("fc.weight").unwrap(),
        );
        n.step(
            &OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.0,
            },
            ParamGroup::Fc,
        )
        .unwrap();
        assert_eq!(n.param("conv1.weight").unwrap(), c0);
        let f1 = n.param("fc.weight").unwrap();
        let g = n.grad("fc.weight").unwrap();
        for i in 0..f0.len() {
            assert!((f1[i] - (f0[i] - 0.1 * g[i])).abs() < 1e-15);
        }
        n.step(&OptimizerConfig::paper_sgd(), ParamGroup::Stage1)
            .unwrap();
        assert_ne!(n.param("conv1.weight").unwrap(), c0);
        assert_eq!(n.param("fc.weight").unwrap(), f1);
    }

    /// [`IchNet::generation`] (what keys the CUDA training graphs) counts every replacement
    /// or allocation of a buffer a training step holds, and nothing else: a warm step of
    /// either stage, and eval passes of the training shape, leave it as it was.
    /// A named change to a net.
    type Change<'a> = (&'a str, &'a dyn Fn(&mut IchNet<CpuBackend<f64>>));

    #[test]
    fn generation_counts_every_buffer_replacement() {
        let mut n = net(3);
        let (h, w) = (32, 32);
        let x = randn(1, 3 * 3 * h * w);
        let x2 = randn(2, 2 * 3 * h * w);
        let y = [1.0, 0.0, 1.0];
        let opt = OptimizerConfig::adam(1e-3);
        let train1 = |n: &mut IchNet<CpuBackend<f64>>| {
            n.zero_grads().unwrap();
            n.stage1_forward_backward(&x, &y, 1, 3, h, w, 1.0).unwrap();
            n.step(&opt, ParamGroup::Stage1).unwrap();
        };
        let train2 = |n: &mut IchNet<CpuBackend<f64>>| {
            n.zero_grads().unwrap();
            n.stage2_forward_backward(&x, &y, 3, h, w, 1.0).unwrap();
            n.step(&opt, ParamGroup::Fc).unwrap();
        };
        let changed = |n: &mut IchNet<CpuBackend<f64>>,
                       f: &dyn Fn(&mut IchNet<CpuBackend<f64>>)| {
            let g = n.generation();
            f(n);
            n.generation() != g
        };
        // The first steps allocate (activations, gradients, moments), the warm ones nothing.
        assert!(changed(&mut n, &train1));
        assert!(!changed(&mut n, &train1), "a warm stage-1 step");
        assert!(changed(&mut n, &train2));
        assert!(!changed(&mut n, &train2), "a warm stage-2 step");
        assert!(
            !changed(&mut n, &train1),
            "stage 1 after stage 2, same shapes"
        );
        let same: [Change; 3] = [
            ("an eval pass of the training shape", &|n| {
                n.stage1_logits(&x, 1, 3, h, w).unwrap();
            }),
            ("a stage-2 eval pass of the training shape", &|n| {
                n.stage2_logits(&x, 3, h, w).unwrap();
            }),
            ("zeroing the gradients", &|n| n.zero_grads().unwrap()),
        ];
        for (what, f) in same {
            assert!(!changed(&mut n, f), "{what}");
        }
        let replacing: [Change; 7] = [
            ("a parameter set", &|n| {
                let v = n.param("conv1.weight").unwrap();
                n.set_param("conv1.weight", &v).unwrap();
            }),
            ("a running statistic set", &|n| {
                let v = n.param("bn1.running_mean").unwrap();
                n.set_param("bn1.running_mean", &v).unwrap();
            }),
            ("an optimizer state set", &|n| {
                let s = n.opt_state("fc.bias").unwrap();
                n.set_opt_state("fc.bias", s.m.as_deref(), s.v.as_deref(), s.steps)
                    .unwrap();
            }),
            ("an eval pass of another shape", &|n| {
                n.stage2_logits(&x2, 2, h, w).unwrap();
            }),
            ("a batch-statistics pass of another shape", &|n| {
                n.set_train(true);
                n.stage1_logits(&x2, 1, 2, h, w).unwrap();
                n.set_train(false);
            }),
            ("a stage-2 step of another batch", &|n| {
                n.stage2_forward_backward(&x2, &[1.0, 0.0], 2, h, w, 1.0)
                    .unwrap();
            }),
            ("the buffers released", &|n| n.release_buffers()),
        ];
        for (what, f) in replacing {
            // Back to the training shapes' buffers (a replacement of its own).
            train1(&mut n);
            train2(&mut n);
            assert!(!changed(&mut n, &train1), "warm again before {what}");
            assert!(changed(&mut n, f), "{what}");
        }
        // A fresh net's first step of a group allocates its gradients: counted.
        let mut m = net(3);
        m.stage2_logits(&x, 3, h, w).unwrap();
        let g = m.generation();
        m.zero_grads().unwrap();
        assert_eq!(m.generation(), g, "nothing to zero, nothing allocated");
        m.stage2_forward_backward(&x, &y, 3, h, w, 1.0).unwrap();
        assert!(
            m.generation() > g,
            "the fc's gradients and head buffers allocated"
        );
        assert!(m.params().get("conv1.weight").unwrap().grad.is_none());
        assert!(m.params().get("fc.weight").unwrap().grad.is_some());
    }
}
