//! The activation plan of an eval-mode (inference) forward pass: which buffer each op of
//! the pass writes, so that a few buffers serve the whole backbone (test-time memory reused
//! layer to layer) instead of one per layer. An op reads the pass's input or earlier ops'
//! outputs and writes one output; a buffer is reused by a later op once every op that
//! reads what it holds has run, and never by an op that reads it: the engine's ops do not
//! allow a buffer to be both read and written by one op ([`check`] asserts it). The
//! engine's ops take buffers of the exact length of what they hold, so a buffer holds one
//! length: the plan keeps as many buffers of each length as tensors of that length are
//! live at once. Pure: knows op lists and lengths, no backend, no layer and no shape
//! (`resnet.rs` builds the backbone's ops from its layers, `memory.rs` from a config). The
//! training backward pass's gradients are planned with it too ([`super::grad_plan`]: its
//! in-place updates are ops of length 0, which write nothing that is read).

/// What an op reads: the pass's input, or the output of an earlier op (its index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Input,
    Op(usize),
}

/// One op of a forward pass, in execution order: what it reads and how many values it
/// writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanOp {
    pub reads: Vec<Src>,
    pub len: u128,
}

/// The buffers of a pass and the buffer each op writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Values of every buffer.
    pub lens: Vec<u128>,
    /// `out[i]`: the buffer op `i` writes (an index into `lens`).
    pub out: Vec<usize>,
}

impl Plan {
    /// Values of all the buffers together; `None` on overflow.
    pub fn scalars(&self) -> Option<u128> {
        self.lens.iter().try_fold(0u128, |a, &l| a.checked_add(l))
    }
}

/// For each op, the index of the last op that reads its output; the last op's output is
/// read after the pass (its index is `ops.len()`). An error for a read of an op that has
/// not run yet.
fn last_uses(ops: &[PlanOp]) -> Result<Vec<usize>, String> {
    let mut last: Vec<usize> = (0..ops.len()).collect();
    for (i, op) in ops.iter().enumerate() {
        for r in &op.reads {
            if let Src::Op(k) = *r {
                if k >= i {
                    return Err(format!("op {i} reads op {k}, which has not run"));
                }
                last[k] = last[k].max(i);
            }
        }
    }
    if let Some(l) = last.last_mut() {
        *l = ops.len();
    }
    Ok(last)
}

/// Assigns each op's output a buffer: a free buffer of exactly its length (free: every op
/// reading what it holds ran before this op, strictly, so no op writes a buffer it reads),
/// else a new one. The last op's output stays (the caller reads it after the pass). Greedy
/// in execution order over interval lifetimes, which is optimal per length: as many buffers
/// of a length as tensors of that length are live at once (the op that writes one and the
/// ops that read its inputs counted together). The result is [`check`]ed.
pub fn plan(ops: &[PlanOp]) -> Result<Plan, String> {
    let last = last_uses(ops)?;
    let mut p = Plan {
        lens: Vec::new(),
        out: Vec::with_capacity(ops.len()),
    };
    // The last op reading what each buffer holds now.
    let mut busy_until: Vec<usize> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let free = (0..p.lens.len()).find(|&b| p.lens[b] == op.len && busy_until[b] < i);
        let b = match free {
            Some(b) => b,
            None => {
                p.lens.push(op.len);
                busy_until.push(0);
                p.lens.len() - 1
            }
        };
        busy_until[b] = last[i];
        p.out.push(b);
    }
    check(ops, &p)?;
    Ok(p)
}

/// Replays `ops` on `plan`: every buffer an op writes has the length it writes and is not
/// one the op reads, and every read finds what it reads still in its buffer (not
/// overwritten since it was written); the last op's output is in its buffer at the end.
pub fn check(ops: &[PlanOp], plan: &Plan) -> Result<(), String> {
    if plan.out.len() != ops.len() {
        return Err(format!(
            "{} ops, {} output buffers",
            ops.len(),
            plan.out.len()
        ));
    }
    // The op whose output each buffer holds.
    let mut holds: Vec<Option<usize>> = vec![None; plan.lens.len()];
    for (i, op) in ops.iter().enumerate() {
        let b = plan.out[i];
        let len = *plan
            .lens
            .get(b)
            .ok_or_else(|| format!("op {i} writes buffer {b}, of {}", plan.lens.len()))?;
        if len != op.len {
            return Err(format!(
                "op {i} writes {} values into buffer {b} of {len}",
                op.len
            ));
        }
        for r in &op.reads {
            let Src::Op(k) = *r else { continue };
            let rb = *plan
                .out
                .get(k)
                .filter(|_| k < i)
                .ok_or_else(|| format!("op {i} reads op {k}, which has not run"))?;
            if holds[rb] != Some(k) {
                return Err(format!(
                    "op {i} reads op {k}'s output from buffer {rb}, overwritten by op {:?}",
                    holds[rb]
                ));
            }
            if rb == b {
                return Err(format!(
                    "op {i} reads and writes buffer {b} (op {k}'s output): aliasing"
                ));
            }
        }
        holds[b] = Some(i);
    }
    if let Some(last) = ops.len().checked_sub(1) {
        if holds[plan.out[last]] != Some(last) {
            return Err("the last op's output was overwritten".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(reads: &[Src], len: u128) -> PlanOp {
        PlanOp {
            reads: reads.to_vec(),
            len,
        }
    }

    /// Two residual blocks on a stem: x -> a; block: b = f(a), c = g(b, a) (c reads the
    /// shortcut a); block: d = f(c), e = g(d, c).
    fn two_blocks() -> Vec<PlanOp> {
        use Src::*;
        vec![
            op(&[Input], 8),
            op(&[Op(0)], 4),
            op(&[Op(1), Op(0)], 8),
            op(&[Op(2)], 4),
            op(&[Op(3), Op(2)], 8),
        ]
    }

    #[test]
    fn a_chain_of_blocks_needs_as_many_buffers_as_live_tensors() {
        let ops = two_blocks();
        let p = plan(&ops).unwrap();
        // Op 2 writes 8 values while op 0's 8 are read: two buffers of 8; the 4s are never
        // live together: one.
        let mut lens = p.lens.clone();
        lens.sort();
        assert_eq!(lens, [4, 8, 8]);
        assert_eq!(p.scalars(), Some(20));
        // Op 4 reuses op 0's buffer (free once op 2 ran), never op 2's (it reads it).
        assert_eq!(p.out[4], p.out[0]);
        assert_ne!(p.out[4], p.out[2]);
        // A plain chain ping-pongs between two buffers.
        let chain: Vec<PlanOp> = (0..6)
            .map(|i| op(&[if i == 0 { Src::Input } else { Src::Op(i - 1) }], 5))
            .collect();
        assert_eq!(plan(&chain).unwrap().lens, [5, 5]);
    }

    #[test]
    fn check_refuses_aliasing_overwrites_and_wrong_lengths() {
        let ops = two_blocks();
        let good = plan(&ops).unwrap();
        // An op writing the buffer it reads (op 4 into op 2's, the shortcut).
        let mut alias = good.clone();
        alias.out[4] = alias.out[2];
        let e = check(&ops, &alias).unwrap_err();
        assert!(e.contains("aliasing"), "{e}");
        // A live tensor overwritten before its last read: op 1 writes over op 0's output,
        // which op 2 still reads.
        let ops3 = vec![
            op(&[Src::Input], 4),
            op(&[Src::Input], 4),
            op(&[Src::Op(0), Src::Op(1)], 4),
        ];
        let over = Plan {
            lens: vec![4, 4],
            out: vec![0, 0, 1],
        };
        assert!(check(&ops3, &over).unwrap_err().contains("overwritten"));
        assert_eq!(plan(&ops3).unwrap().lens, [4, 4, 4]);
        let mut short = good.clone();
        short.lens[good.out[1]] = 3;
        assert!(check(&ops, &short)
            .unwrap_err()
            .contains("values into buffer"));
        // The output overwritten after the pass would lose the features.
        let ops2 = vec![op(&[Src::Input], 4), op(&[Src::Input], 4)];
        let p = Plan {
            lens: vec![4],
            out: vec![0, 0],
        };
        assert!(check(&ops2, &p).is_ok());
        assert!(
            plan(&[op(&[Src::Op(0)], 1)]).is_err(),
            "a read of the future"
        );
    }
}
