//! Memory a network needs, computed from its [`ModelConfig`] alone, before anything is
//! allocated: parameter counts, the bytes an [`super::IchNet`] holds for them, and the
//! activations of a forward pass at a given batch and input size: a training pass keeps
//! every layer's ([`backbone_activations`]; exactly, with the gradients, in the training
//! backbone's layout and storage: [`train_backbone_slots`], the gradients in the buffers of
//! the backward pass's plan that every block shares, [`train_grad_plan`]), an eval-mode
//! pass only the buffers of its
//! activation plan ([`eval_activations`], [`super::eval_plan`], in an [`ActLayout`]: NCHW,
//! or channels-last with its two layout changes, the NHWC activations a slot per value or
//! two bf16 per slot, what the backend asks for); and the bytes of a
//! whole CAM pass split into chunks of slices ([`cam_pass_bytes`], [`cam_pass_chunk`]). The
//! arithmetic is checked (`u128`, `None` on overflow), so an absurd config from a model
//! file is refused instead of overflowing or aborting in the allocator. The shapes mirror
//! `resnet.rs` and `net.rs` (tests compare the counts with a built network). Knows nothing
//! about CT or files.

use super::config::{BlockKind, ModelConfig};
use super::eval_plan::{self, Plan, PlanOp, Src};
use super::grad_plan::{self, BackboneShape, BlockShape, GradOps};
use crate::engine::Backend;

/// The layout and storage of the eval-mode backbone's activations, as the counts need
/// them: a buffer's slots are 4 bytes (f32) whatever it stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActLayout {
    /// NCHW f32 throughout.
    #[default]
    Nchw,
    /// Channels-last between the max-pool and the last block, a slot per value (f32
    /// storage, and the CPU reference's bf16 storage).
    Nhwc,
    /// Channels-last, the NHWC activations in bf16 storage two values per slot (CUDA's
    /// `ActStorage::Bf16`): half the slots.
    NhwcBf16,
}

impl ActLayout {
    /// Every layout.
    pub const ALL: [ActLayout; 3] = [ActLayout::Nchw, ActLayout::Nhwc, ActLayout::NhwcBf16];

    /// What `be` allocates for an eval-mode backbone: [`Backend::channels_last_eval`], then
    /// [`Backend::eval_storage`] in [`Backend::storage_slots`] slots per value.
    pub fn of<B: Backend>(be: &B) -> Self {
        if !be.channels_last_eval() {
            ActLayout::Nchw
        } else if be.storage_slots(be.eval_storage(), 2) < 2 {
            ActLayout::NhwcBf16
        } else {
            ActLayout::Nhwc
        }
    }

    /// What `be` allocates for a training-mode backbone: [`Backend::channels_last_train`],
    /// then [`Backend::train_storage`] in [`Backend::storage_slots`] slots per value.
    pub fn of_train<B: Backend>(be: &B) -> Self {
        if !be.channels_last_train() {
            ActLayout::Nchw
        } else if be.storage_slots(be.train_storage(), 2) < 2 {
            ActLayout::NhwcBf16
        } else {
            ActLayout::Nhwc
        }
    }

    /// Whether the blocks run channels-last.
    pub fn channels_last(self) -> bool {
        self != ActLayout::Nchw
    }

    /// Slots of a channels-last tensor of `values` values.
    pub fn nhwc_slots(self, values: u128) -> u128 {
        match self {
            ActLayout::NhwcBf16 => values.div_ceil(2),
            _ => values,
        }
    }
}

/// Parameter counts of a config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Every tensor (trainables and batch-norm running statistics).
    pub total: u128,
    /// Trainable scalars (each also has a gradient buffer once training uses it).
    pub trainable: u128,
}

fn mul(a: u128, b: u128) -> Option<u128> {
    a.checked_mul(b)
}

fn add(a: u128, b: u128) -> Option<u128> {
    a.checked_add(b)
}

/// A conv + batch norm's parameters: weight `[cout, cin, k, k]`, BN weight and bias
/// (trainable), running mean and variance.
fn conv_bn(c: &mut Counts, cin: u128, cout: u128, k: u128) -> Option<()> {
    let w = mul(mul(cout, cin)?, mul(k, k)?)?;
    c.trainable = add(c.trainable, add(w, mul(2, cout)?)?)?;
    c.total = add(c.total, add(w, mul(4, cout)?)?)?;
    Some(())
}

fn linear(c: &mut Counts, k: u128, n: u128) -> Option<()> {
    let p = add(mul(n, k)?, n)?;
    c.trainable = add(c.trainable, p)?;
    c.total = add(c.total, p)?;
    Some(())
}

/// Parameters of the whole network (backbone, LSTM, head, fc); `None` on overflow.
pub fn param_counts(cfg: &ModelConfig) -> Option<Counts> {
    let mut c = Counts {
        total: 0,
        trainable: 0,
    };
    let base = cfg.base_width as u128;
    conv_bn(&mut c, cfg.in_channels as u128, base, 7)?;
    let mut cin = base;
    for (i, &n) in cfg.layers.iter().enumerate() {
        let w = mul(base, 1u128.checked_shl(i as u32)?)?;
        // The first block of a stage may stride and change the width; the others are all
        // alike (counted once, times their number: no loop over a hostile count).
        let block = |c: &mut Counts, cin: u128, stride2: bool| -> Option<u128> {
            let cout = match cfg.block {
                BlockKind::Basic => {
                    conv_bn(c, cin, w, 3)?;
                    conv_bn(c, w, w, 3)?;
                    w
                }
                BlockKind::Bottleneck => {
                    let out = mul(w, 4)?;
                    conv_bn(c, cin, w, 1)?;
                    conv_bn(c, w, w, 3)?;
                    conv_bn(c, w, out, 1)?;
                    out
                }
            };
            if stride2 || cin != cout {
                conv_bn(c, cin, cout, 1)?;
            }
            Some(cout)
        };
        if n == 0 {
            continue;
        }
        let cout = block(&mut c, cin, i > 0)?;
        let mut rest = Counts {
            total: 0,
            trainable: 0,
        };
        block(&mut rest, cout, false)?;
        let k = (n - 1) as u128;
        c.total = add(c.total, mul(rest.total, k)?)?;
        c.trainable = add(c.trainable, mul(rest.trainable, k)?)?;
        cin = cout;
    }
    let feat = cin;
    let hid = cfg.lstm_hidden as u128;
    for l in 0..cfg.lstm_layers {
        let input = if l == 0 { feat } else { hid };
        let p = add(mul(mul(4, hid)?, add(input, hid)?)?, mul(8, hid)?)?;
        c.trainable = add(c.trainable, p)?;
        c.total = add(c.total, p)?;
    }
    let mut kin = hid;
    for &n in cfg.head.iter().chain(std::iter::once(&1)) {
        linear(&mut c, kin, n as u128)?;
        kin = n as u128;
    }
    linear(&mut c, feat, 1)?;
    Some(c)
}

/// Bytes an `IchNet` holds for its parameters with `elem`-byte scalars: every tensor; when
/// `training`, also a gradient buffer and Adam's two moments per trainable (allocated on the
/// first training step: a model used only for inference holds neither,
/// `ParamStore::held_scalars`).
pub fn param_bytes(cfg: &ModelConfig, elem: usize, training: bool) -> Option<u128> {
    let c = param_counts(cfg)?;
    let per_trainable = if training { 3 } else { 0 };
    mul(
        add(c.total, mul(c.trainable, per_trainable)?)?,
        elem as u128,
    )
}

/// `(h + 2 pad - k) / stride + 1`, as the engine's shapes compute it.
fn out_len(h: u128, k: u128, stride: u128, pad: u128) -> u128 {
    (h + 2 * pad).saturating_sub(k) / stride + 1
}

/// Scalars of the backbone activations an `IchNet` keeps for a batch of `n` images of
/// `h x w` (every conv's output and its batch-norm output, the max-pool, each block's
/// output, the pooled features), as `BackboneActs` allocates them. Returns the count and the
/// last feature map's `(channels, height, width)`.
pub fn backbone_activations(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
) -> Option<(u128, (u128, u128, u128))> {
    let n = n as u128;
    let base = cfg.base_width as u128;
    let mut total: u128 = 0;
    // Each conv + BN keeps its conv output and its BN output.
    let unit = |total: &mut u128, c: u128, oh: u128, ow: u128| -> Option<()> {
        *total = add(*total, mul(2, mul(mul(n, c)?, mul(oh, ow)?)?)?)?;
        Some(())
    };
    let (sh, sw) = (out_len(h as u128, 7, 2, 3), out_len(w as u128, 7, 2, 3));
    unit(&mut total, base, sh, sw)?;
    let (mut ch, mut cw) = (out_len(sh, 3, 2, 1), out_len(sw, 3, 2, 1));
    total = add(total, mul(mul(n, base)?, mul(ch, cw)?)?)?;
    let mut cin = base;
    for (i, &nb) in cfg.layers.iter().enumerate() {
        let wd = mul(base, 1u128.checked_shl(i as u32)?)?;
        // One block's activations; the blocks after a stage's first are all alike.
        let block =
            |cin: u128, ch: u128, cw: u128, stride: u128| -> Option<(u128, u128, u128, u128)> {
                let mut t: u128 = 0;
                let (oh, ow) = (out_len(ch, 3, stride, 1), out_len(cw, 3, stride, 1));
                let cout = match cfg.block {
                    BlockKind::Basic => {
                        unit(&mut t, wd, oh, ow)?;
                        unit(&mut t, wd, oh, ow)?;
                        wd
                    }
                    BlockKind::Bottleneck => {
                        unit(&mut t, wd, ch, cw)?;
                        unit(&mut t, wd, oh, ow)?;
                        unit(&mut t, mul(wd, 4)?, oh, ow)?;
                        mul(wd, 4)?
                    }
                };
                if stride != 1 || cin != cout {
                    unit(&mut t, cout, oh, ow)?;
                }
                t = add(t, mul(mul(n, cout)?, mul(oh, ow)?)?)?;
                Some((t, cout, oh, ow))
            };
        if nb == 0 {
            continue;
        }
        let (t, cout, oh, ow) = block(cin, ch, cw, if i > 0 { 2 } else { 1 })?;
        let (rest, _, _, _) = block(cout, oh, ow, 1)?;
        total = add(add(total, t)?, mul(rest, (nb - 1) as u128)?)?;
        (ch, cw, cin) = (oh, ow, cout);
    }
    total = add(total, mul(n, cin)?)?;
    Some((total, (cin, ch, cw)))
}

/// Values of the channels-last training backbone's two layout copies (`BackboneActs` on a
/// backend whose `Backend::channels_last_train` says yes): the pooled activations changed to
/// NHWC (the first block's input; in bf16 storage, in its slots) and the last block's output
/// changed back to NCHW (the global average pool's input, f32); their gradients, f32, are
/// two more gradients of the backward pass's plan ([`train_grad_plan`], in buffers it
/// shares).
pub fn train_layout_copies(cfg: &ModelConfig, n: usize, h: usize, w: usize) -> Option<u128> {
    let (_, (c, fh, fw)) = backbone_activations(cfg, n, h, w)?;
    let n = n as u128;
    let (sh, sw) = (out_len(h as u128, 7, 2, 3), out_len(w as u128, 7, 2, 3));
    let (ph, pw) = (out_len(sh, 3, 2, 1), out_len(sw, 3, 2, 1));
    let pooled = mul(mul(n, cfg.base_width as u128)?, mul(ph, pw)?)?;
    add(pooled, mul(mul(n, c)?, mul(fh, fw)?)?)
}

/// Slots of the training-mode backbone's buffers (`BackboneActs` and `BackboneGrads` in
/// `resnet.rs`), as [`train_backbone_slots`] counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainSlots {
    /// The activations: per conv + BN unit its conv output z, its output y (none for a
    /// block's last unit, which writes the block's output) and four per-channel statistics
    /// (the saved mean and inverse deviation, the copies of the running ones a
    /// batch-statistics pass uses); the max-pool's output; each block's output; the
    /// channels-last layout's two copies; the pooled features.
    pub acts: u128,
    /// Their gradients: the buffers of the backward pass's gradient plan
    /// ([`train_grad_plan`]: every block's, the stem's, the max-pool's and the layout
    /// copies' gradients in buffers shared by all of them, as many of a length as are live
    /// at once), and the pooled features' gradient.
    pub grads: u128,
}

impl TrainSlots {
    /// Activations and gradients together.
    pub fn total(self) -> Option<u128> {
        add(self.acts, self.grads)
    }
}

/// The slots the training-mode backbone (`BackboneActs` and, once a training step ran,
/// `BackboneGrads`) holds for `n` images of `h x w` in `layout` (NCHW, or channels-last
/// with the NHWC activations, block units' z, outputs and dz in the layout's slots: half in
/// CUDA's bf16 storage; the other gradients, the stem, the max-pool, the features and the
/// statistics f32). A stage's blocks after its first are alike: their activations counted
/// once, times their number, their gradients planned on at most three of them
/// ([`train_grad_plan`]; no loop over a hostile count). Tests compare it with a built
/// network.
pub fn train_backbone_slots(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Option<TrainSlots> {
    let (shape, acts, c) = train_shape(cfg, n, h, w, layout, 3)?;
    let (_, plan) = grad_plan::grad_plan(&shape).ok()?;
    // The plan's buffers and dL/d(gap) `[n, c]`.
    let grads = add(plan.scalars()?, mul(n as u128, c)?)?;
    Some(TrainSlots { acts, grads })
}

/// The training backbone's backward pass on `n` images of `h x w` in `layout`, as
/// `resnet.rs` builds it ([`grad_plan::grad_ops`]) with at most three blocks per stage, and
/// its gradient plan: a stage's blocks after its first are alike, so the third and later
/// add no length and no gradient live at once with others that the first three lack (the
/// gradients of at most two neighbouring blocks are live at once): the plan's buffers are
/// those of the whole backbone (a test compares them with a built one).
pub fn train_grad_plan(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Option<(GradOps, Plan)> {
    grad_plan::grad_plan(&train_shape(cfg, n, h, w, layout, 3)?.0).ok()
}

/// The backbone's gradient shapes with at most `most` blocks per stage (three:
/// [`train_grad_plan`]), the slots of its activations (all blocks: [`TrainSlots::acts`])
/// and the last block's output channels.
fn train_shape(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
    most: usize,
) -> Option<(BackboneShape, u128, u128)> {
    let nn = n as u128;
    let base = cfg.base_width as u128;
    let len = |c: u128, oh: u128, ow: u128| mul(mul(nn, c)?, mul(oh, ow)?);
    let cl = layout.channels_last();
    let slots = |l: u128| if cl { layout.nhwc_slots(l) } else { l };
    let mut acts: u128 = 0;
    // A unit of `c` output channels, its output `s` slots, with an output buffer of its own
    // when `y`: z, y, four statistics.
    let unit = |acts: &mut u128, c: u128, s: u128, y: bool| -> Option<()> {
        let ys = if y { s } else { 0 };
        *acts = add(*acts, add(add(s, ys)?, mul(4, c)?)?)?;
        Some(())
    };
    let (sh, sw) = (out_len(h as u128, 7, 2, 3), out_len(w as u128, 7, 2, 3));
    let stem = len(base, sh, sw)?;
    unit(&mut acts, base, stem, true)?;
    let (mut ch, mut cw) = (out_len(sh, 3, 2, 1), out_len(sw, 3, 2, 1));
    let pooled = len(base, ch, cw)?;
    acts = add(acts, pooled)?;
    if cl {
        acts = add(acts, slots(pooled))?;
    }
    let mut blocks = Vec::new();
    let mut cin = base;
    for (i, &nb) in cfg.layers.iter().enumerate() {
        if nb == 0 {
            continue;
        }
        let wd = mul(base, 1u128.checked_shl(i as u32)?)?;
        // A block's activations and its gradients' shape.
        let block = |cin: u128, ch: u128, cw: u128, stride: u128| {
            let mut a: u128 = 0;
            let (oh, ow) = (out_len(ch, 3, stride, 1), out_len(cw, 3, stride, 1));
            // (channels, values) of each unit's output, in order.
            let (units, cout) = match cfg.block {
                BlockKind::Basic => (vec![(wd, len(wd, oh, ow)?); 2], wd),
                BlockKind::Bottleneck => {
                    let c4 = mul(wd, 4)?;
                    let u = vec![
                        (wd, len(wd, ch, cw)?),
                        (wd, len(wd, oh, ow)?),
                        (c4, len(c4, oh, ow)?),
                    ];
                    (u, c4)
                }
            };
            let out = len(cout, oh, ow)?;
            for (k, &(c, l)) in units.iter().enumerate() {
                unit(&mut a, c, slots(l), k + 1 < units.len())?;
            }
            let down = stride != 1 || cin != cout;
            if down {
                unit(&mut a, cout, slots(out), true)?;
            }
            a = add(a, slots(out))?;
            let shape = BlockShape {
                in_len: len(cin, ch, cw)?,
                out_len: out,
                units: units.iter().map(|&(_, l)| (l, slots(l))).collect(),
                down: down.then(|| slots(out)),
            };
            Some((a, shape, cout, oh, ow))
        };
        let (first, shape, cout, oh, ow) = block(cin, ch, cw, if i > 0 { 2 } else { 1 })?;
        let (rest, rest_shape, _, _, _) = block(cout, oh, ow, 1)?;
        acts = add(add(acts, first)?, mul(rest, (nb - 1) as u128)?)?;
        blocks.push(shape);
        for _ in 1..nb.min(most) {
            blocks.push(rest_shape.clone());
        }
        (ch, cw, cin) = (oh, ow, cout);
    }
    if cl {
        acts = add(acts, len(cin, ch, cw)?)?;
    }
    acts = add(acts, mul(nn, cin)?)?;
    let shape = BackboneShape {
        stem,
        pooled,
        channels_last: cl,
        blocks,
    };
    Some((shape, acts, cin))
}

/// The eval-mode backbone's ops on `n` images of `h x w` (as `resnet.rs` builds them: the
/// stem, the max-pool, then per block the downsample branch and the units, the last one
/// joining the shortcut; channels-last ([`ActLayout`]): with a layout change after the
/// max-pool and one after the last block, the tensors between them in the layout's slots) with at most three blocks per stage, and their activation plan.
/// A stage's blocks after its first are alike, so the third and later add no length and no
/// tensor live at once with others that the first three lack: the plan's buffers are those
/// of the whole backbone (a test compares them with a built one), and a hostile block count
/// costs nothing. Returns the plan and the last feature map's `(channels, height, width)`.
pub fn eval_plan(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Option<(Plan, (u128, u128, u128))> {
    let (ops, out) = eval_ops(cfg, n, h, w, layout)?;
    Some((eval_plan::plan(&ops).ok()?, out))
}

/// The ops of [`eval_plan()`] (what each reads and writes) and the last feature map's
/// `(channels, height, width)`.
pub fn eval_ops(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Option<(Vec<PlanOp>, (u128, u128, u128))> {
    let n = n as u128;
    let base = cfg.base_width as u128;
    let len = |c: u128, oh: u128, ow: u128| mul(mul(n, c)?, mul(oh, ow)?);
    let op = |reads: Vec<Src>, len: u128| PlanOp { reads, len };
    let (sh, sw) = (out_len(h as u128, 7, 2, 3), out_len(w as u128, 7, 2, 3));
    let (mut ch, mut cw) = (out_len(sh, 3, 2, 1), out_len(sw, 3, 2, 1));
    let mut ops = vec![
        op(vec![Src::Input], len(base, sh, sw)?),
        op(vec![Src::Op(0)], len(base, ch, cw)?),
    ];
    // The layout changes, around the blocks (none without); between them every tensor
    // channels-last, in the layout's slots.
    let nhwc = layout.channels_last() && cfg.layers.iter().any(|&nb| nb > 0);
    let slots = |l: u128| if nhwc { layout.nhwc_slots(l) } else { l };
    if nhwc {
        ops.push(op(vec![Src::Op(1)], slots(len(base, ch, cw)?)));
    }
    let mut cin = base;
    for (i, &nb) in cfg.layers.iter().enumerate() {
        let wd = mul(base, 1u128.checked_shl(i as u32)?)?;
        for j in 0..nb.min(3) {
            let stride = if j == 0 && i > 0 { 2 } else { 1 };
            let (oh, ow) = (out_len(ch, 3, stride, 1), out_len(cw, 3, stride, 1));
            let (units, cout) = match cfg.block {
                BlockKind::Basic => (vec![slots(len(wd, oh, ow)?); 2], wd),
                BlockKind::Bottleneck => {
                    let c4 = mul(wd, 4)?;
                    let u = vec![
                        slots(len(wd, ch, cw)?),
                        slots(len(wd, oh, ow)?),
                        slots(len(c4, oh, ow)?),
                    ];
                    (u, c4)
                }
            };
            let input = Src::Op(ops.len() - 1);
            let shortcut = if stride != 1 || cin != cout {
                ops.push(op(vec![input], slots(len(cout, oh, ow)?)));
                Src::Op(ops.len() - 1)
            } else {
                input
            };
            let mut prev = input;
            for (k, &l) in units.iter().enumerate() {
                let reads = if k + 1 == units.len() {
                    vec![prev, shortcut]
                } else {
                    vec![prev]
                };
                ops.push(op(reads, l));
                prev = Src::Op(ops.len() - 1);
            }
            (ch, cw, cin) = (oh, ow, cout);
        }
    }
    if nhwc {
        ops.push(op(vec![Src::Op(ops.len() - 1)], len(cin, ch, cw)?));
    }
    Some((ops, (cin, ch, cw)))
}

/// Scalars the eval-mode backbone (`BackboneEval`) holds for a batch of `n` images of
/// `h x w` in `layout`: its plan's buffers (in slots) and the pooled features
/// `[n, c]`. Returns the count and the last feature map's `(channels, height, width)`.
pub fn eval_activations(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    layout: ActLayout,
) -> Option<(u128, (u128, u128, u128))> {
    let (plan, (c, fh, fw)) = eval_plan(cfg, n, h, w, layout)?;
    Some((add(plan.scalars()?, mul(n as u128, c)?)?, (c, fh, fw)))
}

/// [`eval_activations`] in the layout that needs more (the estimates made before a
/// backend is known: either may run).
fn eval_activations_either(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
) -> Option<(u128, (u128, u128, u128))> {
    let (a, out) = eval_activations(cfg, n, h, w, ActLayout::Nchw)?;
    let (b, _) = eval_activations(cfg, n, h, w, ActLayout::Nhwc)?;
    Some((a.max(b), out))
}

/// Bytes of one stage-2 inference pass (`IchNet::stage2_infer_device`) on `n` slices of
/// `size x size` with `elem`-byte scalars: the input, the eval-mode backbone's buffers (in
/// the layout that needs more) and the CAM at the features' resolution (Grad-CAM's gradient
/// maps included).
pub fn stage2_infer_bytes(cfg: &ModelConfig, n: usize, size: usize, elem: usize) -> Option<u128> {
    let (acts, (c, fh, fw)) = eval_activations_either(cfg, n, size, size)?;
    let n = n as u128;
    let plane = mul(size as u128, size as u128)?;
    let input = mul(mul(n, cfg.in_channels as u128)?, plane)?;
    let cam = add(mul(n, mul(fh, fw)?)?, mul(mul(n, c)?, mul(fh, fw)?)?)?;
    let scalars = add(add(input, acts)?, cam)?;
    mul(scalars, elem as u128)
}

/// Scalars of the activations of a CAM pass (`IchNet::stage2_cam_pass`) on `n` slices of
/// `h x w` in chunks of `chunk` slices: the chunk's eval-mode backbone (in `layout`) and, when the pass is split (`chunk < n`), the chunk's input and outputs (logits,
/// CAM, normalised CAM), as `CamPassBufs::activation_scalars` counts them.
pub fn cam_pass_activations(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    chunk: usize,
    layout: ActLayout,
) -> Option<u128> {
    let m = chunk.clamp(1, n.max(1));
    let (acts, (_, fh, fw)) = eval_activations(cfg, m, h, w, layout)?;
    if m >= n {
        return Some(acts);
    }
    let plane = mul(h as u128, w as u128)?;
    let row = add(
        add(mul(cfg.in_channels as u128, plane)?, 1)?,
        add(mul(fh, fw)?, plane)?,
    )?;
    add(acts, mul(m as u128, row)?)
}

/// Bytes of a whole CAM pass (`IchNet::stage2_cam_pass`) on `n` slices of `h x w` in chunks
/// of `chunk` slices with `elem`-byte scalars, as a model built for it holds them: the
/// parameters (no gradient buffers: a model that has not trained allocates none), the input,
/// the outputs (logits, CAM, normalised CAM) and [`cam_pass_activations`] (in `layout`). Not counted: the composite ops' scratch (a backend's arena: among them the NCHW
/// temporaries of the default channels-last unit, `Backend::conv2d_bn_eval_fwd_nhwc`) and a
/// CUDA graph.
pub fn cam_pass_bytes(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    chunk: usize,
    elem: usize,
    layout: ActLayout,
) -> Option<u128> {
    let params = param_bytes(cfg, elem, false)?;
    let acts = cam_pass_activations(cfg, n, h, w, chunk, layout)?;
    let (_, (_, fh, fw)) = eval_plan(cfg, 1, h, w, ActLayout::Nchw)?;
    let plane = mul(h as u128, w as u128)?;
    let row = add(
        add(mul(cfg.in_channels as u128, plane)?, 1)?,
        add(mul(fh, fw)?, plane)?,
    )?;
    let scalars = add(acts, mul(n as u128, row)?)?;
    add(params, mul(scalars, elem as u128)?)
}

/// Slices per chunk when `n` slices are split into chunks of at most `most`: as few chunks
/// as that allows, as even as can be (the last one shorter by less than the chunks'
/// number).
pub fn even_chunk(n: usize, most: usize) -> usize {
    let most = most.clamp(1, n.max(1));
    n.div_ceil(n.div_ceil(most).max(1)).max(1)
}

/// Slices per chunk of a CAM pass on `n` slices within `budget` bytes: the fewest chunks
/// whose pass ([`cam_pass_bytes`], in `layout`) fits, as even as can
/// be ([`even_chunk`]); chunks of 1 when none fits (or the sizes overflow).
pub fn cam_pass_chunk(
    cfg: &ModelConfig,
    n: usize,
    h: usize,
    w: usize,
    elem: usize,
    budget: u128,
    layout: ActLayout,
) -> usize {
    let fits =
        |m: usize| cam_pass_bytes(cfg, n, h, w, m, elem, layout).is_some_and(|b| b <= budget);
    if n <= 1 || fits(n) {
        return n.max(1);
    }
    // Split, the bytes grow with the chunk: the largest that fits in 1..n.
    let (mut lo, mut hi) = (1usize, n - 1);
    if !fits(lo) {
        return 1;
    }
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    even_chunk(n, lo)
}

/// Bytes of one stage-1 forward pass (`IchNet::stage1_logits`, eval mode) on `batch`
/// sequences of `seq` slices of `size x size`: the input, the eval-mode backbone's buffers
/// for every slice (in the layout that needs more), and the LSTM and head states.
pub fn stage1_infer_bytes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    size: usize,
    elem: usize,
) -> Option<u128> {
    let (n, input, seq_state) = stage1_parts(cfg, batch, seq, size)?;
    let (acts, _) = eval_activations_either(cfg, n, size, size)?;
    mul(add(add(input, acts)?, seq_state)?, elem as u128)
}

/// Of a stage-1 pass on `batch` sequences of `seq` slices of `size x size`: the number of
/// slices, the input's scalars and those of the LSTM's and the head's states.
fn stage1_parts(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    size: usize,
) -> Option<(usize, u128, u128)> {
    let n = (batch as u128).checked_mul(seq as u128)?;
    let nn = usize::try_from(n).ok()?;
    let plane = mul(size as u128, size as u128)?;
    let input = mul(mul(n, cfg.in_channels as u128)?, plane)?;
    let hid = cfg.lstm_hidden as u128;
    // Gates (4h), cell and hidden states per step and layer, kept for BPTT.
    let lstm = mul(mul(n, mul(6, hid)?)?, cfg.lstm_layers as u128)?;
    let head: u128 = cfg
        .head
        .iter()
        .try_fold(0u128, |a, &w| add(a, mul(mul(2, n)?, w as u128)?))?;
    Some((nn, input, add(lstm, head)?))
}

/// Bytes of training (stage 1, the larger stage) with the training backbone in `layout`
/// ([`ActLayout::of_train`] the backend): parameters with their gradients and optimizer
/// moments, the input, the training backbone's activations and gradients
/// ([`train_backbone_slots`]: in CUDA's bf16 storage the channels-last activations and dz
/// take half), the LSTM's and head's states twice over (their gradients), and the eval-mode
/// backbone's buffers that validation (eval mode, the same batch shape, in the layout that
/// needs more) adds to them.
pub fn training_bytes_in(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    size: usize,
    elem: usize,
    layout: ActLayout,
) -> Option<u128> {
    let params = param_bytes(cfg, elem, true)?;
    let (n, input, seq_state) = stage1_parts(cfg, batch, seq, size)?;
    let bb = train_backbone_slots(cfg, n, size, size, layout)?.total()?;
    let (eval, _) = eval_activations_either(cfg, n, size, size)?;
    let scalars = add(add(add(input, bb)?, mul(seq_state, 2)?)?, eval)?;
    add(params, mul(scalars, elem as u128)?)
}

/// [`training_bytes_in`] in the layout that needs more (the estimate made before a backend
/// is known: any may run; channels-last in f32 storage, its two layout copies beside NCHW's
/// buffers).
pub fn training_bytes(
    cfg: &ModelConfig,
    batch: usize,
    seq: usize,
    size: usize,
    elem: usize,
) -> Option<u128> {
    ActLayout::ALL
        .iter()
        .map(|&l| training_bytes_in(cfg, batch, seq, size, elem, l))
        .try_fold(0u128, |a, b| Some(a.max(b?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::CpuBackend;
    use crate::model::IchNet;

    #[test]
    fn counts_match_a_built_network() {
        let mut bottle = ModelConfig::tiny();
        bottle.block = BlockKind::Bottleneck;
        bottle.layers = vec![1, 2];
        bottle.lstm_layers = 2;
        bottle.head = vec![16];
        for cfg in [ModelConfig::tiny(), bottle] {
            let net = IchNet::new(CpuBackend::<f32>::new(), cfg.clone(), 0).unwrap();
            let c = param_counts(&cfg).unwrap();
            let total: usize = net.params().iter().map(|p| p.numel()).sum();
            assert_eq!(c.total, total as u128);
            assert_eq!(c.trainable, net.params().trainable_count() as u128);
        }
    }

    /// The parameter bytes counted for inference and for training are what the CPU backend
    /// holds: no gradient or moment after inference passes (the CAM pass included), and
    /// every gradient and Adam's two moments after training steps of both stages.
    #[test]
    fn param_bytes_are_what_the_store_holds() {
        use crate::engine::Backend;
        use crate::model::{OptimizerConfig, ParamGroup};
        let cfg = ModelConfig {
            block: BlockKind::Bottleneck,
            layers: vec![1, 2],
            base_width: 4,
            ..ModelConfig::tiny()
        };
        let be = CpuBackend::<f32>::new();
        let mut net = IchNet::new(be, cfg.clone(), 0).unwrap();
        let held = |net: &IchNet<CpuBackend<f32>>| net.params().held_scalars(&be) as u128 * 4;
        let (n, h, w) = (2, 32, 32);
        let x = vec![0.5f32; n * cfg.in_channels * h * w];
        assert_eq!(Some(held(&net)), param_bytes(&cfg, 4, false), "built");
        net.stage2_infer(&x, n, h, w, crate::model::CamKind::GradCam)
            .unwrap();
        net.stage1_logits(&x, 1, n, h, w).unwrap();
        let xb = net.backend().upload(&x).unwrap();
        net.stage2_cam_pass(&xb, n, h, w, &mut None).unwrap();
        assert_eq!(Some(held(&net)), param_bytes(&cfg, 4, false), "inference");
        // A stage-2 step allocates the fc's gradients and moments only.
        let opt = OptimizerConfig::adam(1e-3);
        net.stage2_forward_backward(&x, &[1.0, 0.0], n, h, w, 1.0)
            .unwrap();
        net.step(&opt, ParamGroup::Fc).unwrap();
        let fc = (cfg.feature_channels() as u128 + 1) * 3 * 4;
        assert_eq!(
            Some(held(&net)),
            param_bytes(&cfg, 4, false).map(|b| b + fc)
        );
        net.zero_grads().unwrap();
        net.stage1_forward_backward(&x, &[1.0, 0.0], 1, n, h, w, 1.0)
            .unwrap();
        net.step(&opt, ParamGroup::Stage1).unwrap();
        assert_eq!(Some(held(&net)), param_bytes(&cfg, 4, true), "training");
    }

    #[test]
    fn activations_match_the_feature_map() {
        let cfg = ModelConfig::tiny();
        let (_, (c, fh, fw)) = backbone_activations(&cfg, 2, 64, 64).unwrap();
        assert_eq!(c as usize, cfg.feature_channels());
        // Stem /2, pool /2, two more stages /2 each.
        assert_eq!((fh, fw), (4, 4));
    }

    #[test]
    fn eval_plan_bytes_are_what_the_backbone_allocates() {
        use crate::engine::{ActStorage, Backend};
        use crate::model::CamChunking;
        let (n, h, w) = (3, 41, 33);
        for (block, layers) in [
            (BlockKind::Basic, vec![2, 2, 2]),
            (BlockKind::Bottleneck, vec![3, 4, 6, 3]),
            (BlockKind::Bottleneck, vec![1, 5]),
        ] {
            let cfg = ModelConfig {
                block,
                layers,
                base_width: 4,
                ..ModelConfig::tiny()
            };
            for (cl, st) in [
                (false, ActStorage::F32),
                (true, ActStorage::F32),
                (true, ActStorage::Bf16),
            ] {
                let be = CpuBackend::<f32>::new()
                    .with_channels_last_eval(cl)
                    .with_eval_storage(st);
                let lay = ActLayout::of(&be);
                assert_eq!(lay, if cl { ActLayout::Nhwc } else { ActLayout::Nchw });
                let mut net = IchNet::new(be, cfg.clone(), 0).unwrap();
                let x = vec![0.5f32; n * cfg.in_channels * h * w];
                net.stage2_features(&x, n, h, w).unwrap();
                let (eval, train) = net.activation_state();
                assert!(!train);
                let (want, _) = eval_activations(&cfg, n, h, w, lay).unwrap();
                assert_eq!(eval.map(|v| v as u128), Some(want), "{cfg:?} {cl} {st}");
                let (full, _) = backbone_activations(&cfg, n, h, w).unwrap();
                assert!(3 * want < full, "{want} vs {full}");
                // The CAM pass, split or not.
                let xb = net.backend().upload(&x).unwrap();
                for s in [1, 2, 3] {
                    net.set_cam_chunking(CamChunking::Slices(s));
                    let mut bufs = None;
                    net.stage2_cam_pass(&xb, n, h, w, &mut bufs).unwrap();
                    let b = bufs.unwrap();
                    assert_eq!(b.chunk, s);
                    let want = cam_pass_activations(&cfg, n, h, w, s, lay).unwrap();
                    assert_eq!(b.activation_scalars() as u128, want, "chunk {s} {cl} {st}");
                }
            }
        }
    }

    /// What `train_backbone_slots` counts is what a training step allocates (activations
    /// and gradients: the gradient plan counted on at most three blocks a stage is the
    /// built backbone's, stages of four and six blocks here), NCHW, channels-last f32 and
    /// channels-last bf16 (the CPU reference: a slot per value, as f32); CUDA's packed bf16
    /// storage in tests/cuda_train_bf16_storage.rs.
    #[test]
    fn train_slots_are_what_a_training_step_allocates() {
        use crate::engine::ActStorage;
        let (batch, seq, h, w) = (1, 3, 41, 33);
        let n = batch * seq;
        for (block, layers) in [
            (BlockKind::Basic, vec![2, 2, 2]),
            (BlockKind::Bottleneck, vec![3, 4, 6, 3]),
            (BlockKind::Bottleneck, vec![1, 5]),
        ] {
            let cfg = ModelConfig {
                block,
                layers,
                base_width: 4,
                lstm_hidden: 5,
                ..ModelConfig::tiny()
            };
            for (cl, st) in [
                (false, ActStorage::F32),
                (false, ActStorage::Bf16),
                (true, ActStorage::F32),
                (true, ActStorage::Bf16),
            ] {
                let be = CpuBackend::<f32>::new()
                    .with_channels_last_train(cl)
                    .with_train_storage(st);
                let lay = ActLayout::of_train(&be);
                assert_eq!(lay, if cl { ActLayout::Nhwc } else { ActLayout::Nchw });
                let mut net = IchNet::new(be, cfg.clone(), 0).unwrap();
                let x = vec![0.5f32; n * cfg.in_channels * h * w];
                assert_eq!(net.train_backbone_slots(), None);
                net.stage1_forward_backward(&x, &[1.0, 0.0, 1.0], batch, seq, h, w, 1.0)
                    .unwrap();
                assert_eq!(
                    net.train_storage(),
                    Some(if cl { st } else { ActStorage::F32 })
                );
                let (acts, grads) = net.train_backbone_slots().unwrap();
                let want = train_backbone_slots(&cfg, n, h, w, lay).unwrap();
                let what = format!("{cfg:?} channels-last {cl} {st}");
                assert_eq!(acts as u128, want.acts, "{what} activations");
                assert_eq!(
                    grads.map(|g| g as u128),
                    Some(want.grads),
                    "{what} gradients"
                );
            }
            // Packed bf16 storage: the NHWC activations and dz in half the slots, the rest
            // as f32 storage's.
            let f = train_backbone_slots(&cfg, n, h, w, ActLayout::Nhwc).unwrap();
            let b = train_backbone_slots(&cfg, n, h, w, ActLayout::NhwcBf16).unwrap();
            let c = train_backbone_slots(&cfg, n, h, w, ActLayout::Nchw).unwrap();
            assert!(b.acts < f.acts && b.grads < f.grads && c.total() < f.total());
            assert!(2 * b.acts < f.acts + f.acts / 2, "{b:?} {f:?}");
        }
    }

    /// The training memory figures of docs/perf.md (printed with `--nocapture`): the paper's
    /// ResNet-101 at 1x32 slices of 512^2 and ResNet-18 at 4x32 of 256^2, the backbone's
    /// buffers and the whole of `training_bytes_in`, NCHW, channels-last f32 and bf16
    /// (CUDA's packed) storage.
    #[test]
    fn training_memory_figures() {
        let r18 = ModelConfig {
            block: BlockKind::Basic,
            layers: vec![2, 2, 2, 2],
            ..ModelConfig::resnet101_lstm()
        };
        for (name, cfg, batch, seq, size) in [
            (
                "ResNet-101 1x32 512^2",
                ModelConfig::resnet101_lstm(),
                1,
                32,
                512,
            ),
            ("ResNet-18 4x32 256^2", r18, 4, 32, 256),
        ] {
            let gb = |b: u128| b as f64 / 1e9;
            let mut bb = Vec::new();
            for lay in ActLayout::ALL {
                let t = train_backbone_slots(&cfg, batch * seq, size, size, lay).unwrap();
                let all = training_bytes_in(&cfg, batch, seq, size, 4, lay).unwrap();
                println!(
                    "{name} {lay:?}: backbone activations {:.4} GB + gradients {:.4} GB = {:.4} GB; training_bytes {:.4} GB",
                    gb(t.acts * 4),
                    gb(t.grads * 4),
                    gb(t.total().unwrap() * 4),
                    gb(all)
                );
                // The gradient plan's buffers by length, largest first.
                let (_, plan) = train_grad_plan(&cfg, batch * seq, size, size, lay).unwrap();
                let mut lens = plan.lens.clone();
                lens.sort_unstable_by(|a, b| b.cmp(a));
                lens.dedup();
                let by_len: Vec<String> = lens
                    .iter()
                    .filter(|&&l| l > 0)
                    .map(|&l| {
                        let k = plan.lens.iter().filter(|&&m| m == l).count();
                        format!("{k} x {:.3}", gb(l * 4))
                    })
                    .collect();
                println!("  gradient buffers (GB): {}", by_len.join(", "));
                bb.push((t, all));
            }
            // bf16 storage saves on the backbone, and the estimate before a backend is known
            // is the largest (channels-last f32).
            assert!(bb[2].1 < bb[0].1 && bb[0].1 < bb[1].1);
            assert_eq!(training_bytes(&cfg, batch, seq, size, 4), Some(bb[1].1));
        }
    }

    /// The gradient plan made on at most three blocks per stage needs the buffers of the
    /// whole backbone's, for the deep configs (stages of 23 and 36 blocks) in every layout.
    #[test]
    fn three_blocks_a_stage_plan_the_whole_backbones_gradients() {
        let r152 = ModelConfig {
            layers: vec![3, 8, 36, 3],
            ..ModelConfig::resnet101_lstm()
        };
        let r34 = ModelConfig {
            block: BlockKind::Basic,
            layers: vec![3, 4, 6, 3],
            ..ModelConfig::resnet101_lstm()
        };
        for cfg in [ModelConfig::resnet101_lstm(), r152, r34] {
            for lay in ActLayout::ALL {
                let plan = |most: usize| {
                    let (shape, _, _) = train_shape(&cfg, 6, 96, 80, lay, most).unwrap();
                    let blocks = shape.blocks.len();
                    let (_, p) = grad_plan::grad_plan(&shape).unwrap();
                    let mut lens = p.lens;
                    lens.sort_unstable();
                    (lens, blocks)
                };
                let (three, b3) = plan(3);
                let (all, ball) = plan(usize::MAX);
                assert_eq!(ball, cfg.layers.iter().sum::<usize>());
                assert!(b3 < ball);
                assert_eq!(three, all, "{:?} {lay:?}", cfg.layers);
            }
        }
    }

    #[test]
    fn cam_pass_chunks_fit_the_budget() {
        let cfg = ModelConfig::resnet101_lstm();
        let (n, s) = (32, 512);
        let bytes = |m: usize| cam_pass_bytes(&cfg, n, s, s, m, 4, ActLayout::Nchw).unwrap();
        assert!(bytes(1) < bytes(2) && bytes(2) < bytes(16));
        // 32 slices: at most 5 per chunk makes 7 chunks, of 5 (and 2); at most 4, 8 of 4.
        let m = cam_pass_chunk(&cfg, n, s, s, 4, bytes(5), ActLayout::Nchw);
        assert_eq!(m, 5);
        assert_eq!(
            cam_pass_chunk(&cfg, n, s, s, 4, bytes(5) - 1, ActLayout::Nchw),
            4
        );
        // At most 9 per chunk: 4 chunks, so of 8.
        assert_eq!(
            cam_pass_chunk(&cfg, n, s, s, 4, bytes(9), ActLayout::Nchw),
            8
        );
        assert_eq!(even_chunk(7, 6), 4);
        assert_eq!(even_chunk(7, 0), 1);
        assert_eq!(even_chunk(0, 3), 1);
        assert_eq!(cam_pass_chunk(&cfg, n, s, s, 4, 0, ActLayout::Nchw), 1);
        assert_eq!(
            cam_pass_chunk(&cfg, n, s, s, 4, u128::MAX, ActLayout::NhwcBf16),
            n
        );
        // Unsplit, no staging: the eval backbone alone.
        assert_eq!(
            cam_pass_activations(&cfg, n, s, s, n, ActLayout::NhwcBf16),
            eval_activations(&cfg, n, s, s, ActLayout::NhwcBf16).map(|a| a.0)
        );
    }

    #[test]
    fn absurd_configs_do_not_overflow() {
        let mut cfg = ModelConfig::tiny();
        cfg.base_width = usize::MAX;
        cfg.layers = vec![usize::MAX; 8];
        // Answered at once (no loop over the block count) and without overflowing.
        assert_eq!(param_counts(&cfg), None);
        assert_eq!(stage2_infer_bytes(&cfg, usize::MAX, usize::MAX, 8), None);
        for cl in ActLayout::ALL {
            assert_eq!(
                cam_pass_bytes(&cfg, usize::MAX, usize::MAX, 9, 9, 8, cl),
                None
            );
            assert_eq!(
                cam_pass_chunk(&cfg, usize::MAX, 64, 64, 4, u128::MAX, cl),
                1
            );
        }
        let mut deep = ModelConfig::tiny();
        deep.layers = vec![usize::MAX];
        assert!(param_counts(&deep).unwrap().total > u64::MAX as u128);
        // Training: the gradient plan on three blocks of the stage, whatever its count.
        for lay in ActLayout::ALL {
            assert_eq!(train_backbone_slots(&cfg, 2, 64, 64, lay), None);
            assert_eq!(training_bytes_in(&cfg, 1, 2, 64, 4, lay), None);
            let t = train_backbone_slots(&deep, 2, 64, 64, lay).unwrap();
            assert!(t.acts > u64::MAX as u128 && t.grads < 1 << 20, "{t:?}");
            let (ops, _) = train_grad_plan(&deep, 2, 64, 64, lay).unwrap();
            assert_eq!(ops.blocks.len(), 3);
        }
    }
}
