//! The gradient plan of the training backbone's backward pass: the activation gradients it
//! writes (the flowing gradient of every block's output and input, each block's
//! gradient of the pre-ReLU sum, every unit's dz and the gradients of its units' outputs,
//! the downsample branch's dz and input gradient, the stem's, the max-pool's and the layout
//! copies'), in the order the pass writes them, what each reads, and the buffers
//! [`super::eval_plan::plan`] assigns them: a gradient lives only from the op that writes it
//! to the last op that reads it (a block's gradients while that block is processed, the
//! gradient flowing into the block below until that block's first op), so every block
//! reuses the buffers of the blocks processed before it. The engine's ops take buffers of
//! the exact length of what they hold: a buffer serves the tensors of one length (slots),
//! as many buffers of a length as tensors of it are live at once. In-place updates (the
//! downsample branch's input gradient added to the main branch's) are ops that write
//! nothing (`len` 0) and read the tensor they update. Pure: knows lengths and the pass's
//! order, no backend and no layer (`resnet.rs` builds the shapes from a built backbone and
//! runs the pass on the plan's buffers, `memory.rs` builds them from a config to count it).

use super::eval_plan::{self, Plan, PlanOp, Src};

/// A residual block as its backward pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockShape {
    /// Slots of the block's input gradient (f32: a slot per value).
    pub in_len: u128,
    /// Slots of its output's gradient (f32) and of the pre-ReLU sum's.
    pub out_len: u128,
    /// Per unit in order: the slots of the gradient of its output (f32) and of its dz (in
    /// the activations' storage). The last unit's output is the block's: its own
    /// gradient is the pre-ReLU sum's.
    pub units: Vec<(u128, u128)>,
    /// The downsample branch's dz slots, when the block has one (its input gradient is
    /// `in_len`).
    pub down: Option<u128>,
}

/// The backbone as its backward pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackboneShape {
    /// Slots of the stem's conv output (the max-pool's input gradient and the stem's dz,
    /// f32).
    pub stem: u128,
    /// Slots of the max-pool's output gradient (f32).
    pub pooled: u128,
    /// Whether the blocks run channels-last: the first block's input gradient is then an
    /// NHWC copy changed back to `pooled`, and the global average pool's input gradient an
    /// NCHW copy of the last block's output gradient.
    pub channels_last: bool,
    /// The blocks, in forward order (at least one).
    pub blocks: Vec<BlockShape>,
}

/// Where a block's gradients are: indices of the ops that write them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOps {
    /// dL/d(block output).
    pub dout: usize,
    /// dL/d(pre-ReLU sum).
    pub g: usize,
    /// Per unit, its dz.
    pub dz: Vec<usize>,
    /// Per unit but the last, dL/d(its output).
    pub dy: Vec<usize>,
    /// The downsample branch: its dz and its input gradient.
    pub down: Option<(usize, usize)>,
    /// dL/d(block input), written by the first unit's data gradient.
    pub dx: usize,
    /// The in-place add of the shortcut's gradient into `dx` (writes nothing).
    pub add: usize,
}

/// The backward pass's gradient ops and where each gradient is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradOps {
    /// In execution order: what each reads, the slots it writes.
    pub ops: Vec<PlanOp>,
    /// Channels-last: the global average pool's input gradient, NCHW.
    pub dfeats: Option<usize>,
    /// Per block, in forward order.
    pub blocks: Vec<BlockOps>,
    /// Channels-last: the first block's input gradient, NHWC (the last block's `dx`).
    pub dpooled_nhwc: Option<usize>,
    /// The max-pool's output gradient.
    pub dpooled: usize,
    /// The max-pool's input gradient (the stem's output's).
    pub dstem: usize,
    /// The stem's dz (the last op: the stem's weight gradient reads it).
    pub stem_dz: usize,
}

/// The ops of the backward pass of `s`, in the order `BackboneActs::backward` runs them:
/// the global average pool's gradient (NCHW, then channels-last: changed to NHWC), then per
/// block from the last: the ReLU's gradient `g` from `dout`; per unit from the last, dz
/// (the batch norm's backward, from `g` or the unit output's gradient) and the gradient of
/// the unit's input (the data gradient, from dz: the previous unit's output's, or the
/// block input's `dx`); the downsample branch's dz (from `g`) and input gradient; the add
/// into `dx` (of the branch's input gradient, or of `g`: the identity shortcut). `dx` is the
/// block below's `dout`; the first block's the max-pool's output gradient (channels-last:
/// its NHWC copy, changed back). Then the max-pool's input gradient and the stem's dz.
/// `None` without blocks.
pub fn grad_ops(s: &BackboneShape) -> Option<GradOps> {
    let last = s.blocks.last()?;
    let mut ops: Vec<PlanOp> = Vec::new();
    let mut push = |reads: Vec<usize>, len: u128| {
        ops.push(PlanOp {
            reads: reads.into_iter().map(Src::Op).collect(),
            len,
        });
        ops.len() - 1
    };
    // The pool's gradient reads dL/d(gap), which no op here writes (the layer above's).
    let dfeats = s.channels_last.then(|| push(vec![], last.out_len));
    let mut dout = match dfeats {
        Some(f) => push(vec![f], last.out_len),
        None => push(vec![], last.out_len),
    };
    let mut blocks = Vec::with_capacity(s.blocks.len());
    for b in s.blocks.iter().rev() {
        let g = push(vec![dout], b.out_len);
        let nu = b.units.len();
        let (mut dz, mut dy) = (vec![0; nu], vec![0; nu.saturating_sub(1)]);
        let mut grad = g;
        let mut dx = g;
        for j in (0..nu).rev() {
            dz[j] = push(vec![grad], b.units[j].1);
            let len = if j == 0 { b.in_len } else { b.units[j - 1].0 };
            grad = push(vec![dz[j]], len);
            if j == 0 {
                dx = grad;
            } else {
                dy[j - 1] = grad;
            }
        }
        let (down, add) = match b.down {
            Some(dzs) => {
                let dzd = push(vec![g], dzs);
                let ddx = push(vec![dzd], b.in_len);
                (Some((dzd, ddx)), push(vec![dx, ddx], 0))
            }
            None => (None, push(vec![dx, g], 0)),
        };
        blocks.push(BlockOps {
            dout,
            g,
            dz,
            dy,
            down,
            dx,
            add,
        });
        dout = dx;
    }
    blocks.reverse();
    let (dpooled_nhwc, dpooled) = if s.channels_last {
        (Some(dout), push(vec![dout], s.pooled))
    } else {
        (None, dout)
    };
    let dstem = push(vec![dpooled], s.stem);
    let stem_dz = push(vec![dstem], s.stem);
    Some(GradOps {
        ops,
        dfeats,
        blocks,
        dpooled_nhwc,
        dpooled,
        dstem,
        stem_dz,
    })
}

/// [`grad_ops`] and their buffers ([`eval_plan::plan`]: checked).
pub fn grad_plan(s: &BackboneShape) -> Result<(GradOps, Plan), String> {
    let ops = grad_ops(s).ok_or("a backbone without blocks")?;
    let plan = eval_plan::plan(&ops.ops)?;
    Ok((ops, plan))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stages of bottleneck blocks (the first with a downsample branch), channels-last
    /// or not.
    fn shape(channels_last: bool, dz_half: bool) -> BackboneShape {
        let dz = |l: u128| if dz_half { l.div_ceil(2) } else { l };
        let block = |in_len: u128, w: u128, down: bool| BlockShape {
            in_len,
            out_len: 4 * w,
            units: vec![(w, dz(w)), (w, dz(w)), (4 * w, dz(4 * w))],
            down: down.then(|| dz(4 * w)),
        };
        BackboneShape {
            stem: 40,
            pooled: 100,
            channels_last,
            blocks: vec![
                block(100, 25, true),
                block(100, 25, false),
                block(100, 25, false),
                block(100, 13, true),
                block(52, 13, false),
                block(52, 13, false),
            ],
        }
    }

    #[test]
    fn the_plan_reuses_every_blocks_buffers() {
        for cl in [false, true] {
            for half in [false, true] {
                let s = shape(cl, half);
                let (ops, plan) = grad_plan(&s).unwrap();
                let lens = |l: u128| plan.lens.iter().filter(|&&b| b == l).count();
                let all: u128 = s
                    .blocks
                    .iter()
                    .map(|b| {
                        let units: u128 = b.units.iter().map(|u| u.0 + u.1).sum();
                        units + 2 * b.out_len + b.down.map_or(0, |d| d + b.in_len)
                    })
                    .sum();
                // Far fewer slots than a buffer per gradient.
                assert!(plan.scalars().unwrap() * 3 < all, "{cl} {half} {plan:?}");
                // The 100-slot gradients: the flowing one and `g`; while the downsample
                // branch runs, the block input's gradient, the branch's dz and its input
                // gradient (dz in half the slots: two). The 25s: a dz and a unit output's
                // gradient at once (dz in half the slots: one).
                let want = if half { 2 } else { 3 };
                assert_eq!(lens(100), want, "{cl} {half} {:?}", plan.lens);
                assert_eq!(lens(25), if half { 1 } else { 2 });
                // Each op writes its own buffer, never one it reads (checked by the plan);
                // a block's dx is the dout of the block below.
                for w in ops.blocks.windows(2) {
                    assert_eq!(w[1].dx, w[0].dout);
                }
                assert_eq!(ops.dpooled_nhwc.is_some(), cl);
                assert_eq!(ops.stem_dz, ops.ops.len() - 1);
            }
        }
        assert!(grad_ops(&BackboneShape {
            blocks: vec![],
            ..shape(false, false)
        })
        .is_none());
    }
}
