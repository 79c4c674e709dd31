//! Dense products on the device (`kernels/dense.cu`, mirroring `cpu/dense.rs` and the
//! products of `cpu/gemm.rs`): the tiled SGEMM behind the linear layers and the LSTM, named
//! by a [`Gemm`] shape, and the column sums of bias gradients.

use cudarc::driver::{CudaSlice, DeviceSlice};

use super::launch::{blocks, grid, int_args, kernels, DeviceArg, NULL};
use super::CudaBackend;
use crate::engine::{EngineError, Result};

kernels!("dense" {
    sgemm: "sgemm",
    colsum: "colsum",
});

fn kernels(be: &CudaBackend) -> Result<&Kernels> {
    be.families.dense.get(|| Kernels::load(be.modules()))
}

/// One product `C[m, n] = op(A)[m, k] . op(B)[k, n] (+ bias[n]) (+ C when accumulate)` over
/// row-major operands with leading dimensions: `op(A)[i, p] = A[i*lda + p]`, or
/// `A[p*lda + i]` when `trans_a`; `op(B)[p, j] = B[p*ldb + j]`, or `B[j*ldb + p]` when
/// `trans_b`; `C[i, j] = C[i*ldc + j]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub accumulate: bool,
}

impl Gemm {
    /// `C[m, n] = A[m, k] . B[k, n]`, all contiguous.
    pub(crate) fn nn(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            m,
            n,
            k,
            lda: k,
            ldb: n,
            ldc: n,
            trans_a: false,
            trans_b: false,
            accumulate: false,
        }
    }
    /// `C[m, n] = A[m, k] . B[n, k]^T` (a linear layer: x times the weight's transpose).
    pub(crate) fn nt(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            ldb: k,
            trans_b: true,
            ..Gemm::nn(m, n, k)
        }
    }
    /// `C[m, n] = A[k, m]^T . B[k, n]` (a weight gradient: dy's transpose times x).
    pub(crate) fn tn(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            lda: m,
            trans_a: true,
            ..Gemm::nn(m, n, k)
        }
    }

    /// The elements of A, B and C the product touches (the last one's index + 1).
    fn extents(&self) -> (usize, usize, usize) {
        let span = |rows: usize, ld: usize, cols: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1) * ld + cols
            }
        };
        let a = if self.trans_a {
            span(self.k, self.lda, self.m)
        } else {
            span(self.m, self.lda, self.k)
        };
        let b = if self.trans_b {
            span(self.n, self.ldb, self.k)
        } else {
            span(self.k, self.ldb, self.n)
        };
        (a, b, span(self.m, self.ldc, self.n))
    }
}

/// Runs `g` on A (`a`), B (`b`) into `c`, with `bias[n]` when given. A and B may be views.
pub(crate) fn sgemm<A, B>(
    be: &CudaBackend,
    g: &Gemm,
    a: &A,
    b: &B,
    c: &mut CudaSlice<f32>,
    bias: Option<&CudaSlice<f32>>,
) -> Result<()>
where
    A: DeviceSlice<f32> + DeviceArg,
    B: DeviceSlice<f32> + DeviceArg,
{
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    let (ea, eb, ec) = g.extents();
    let short = |what: &str, got: usize, need: usize| EngineError::Shape {
        op: "sgemm",
        detail: format!("{what} holds {got} elements, the product {g:?} reads {need}"),
    };
    if a.len() < ea {
        return Err(short("A", a.len(), ea));
    }
    if b.len() < eb {
        return Err(short("B", b.len(), eb));
    }
    if c.len() < ec {
        return Err(short("C", c.len(), ec));
    }
    if bias.is_some_and(|v| v.len() < g.n) {
        return Err(short("bias", bias.map_or(0, |v| v.len()), g.n));
    }
    let shape = int_args([g.m, g.n, g.k, g.lda, g.ldb, g.ldc])?;
    let flags = [g.trans_a as i32, g.trans_b as i32, g.accumulate as i32];
    let cfg = blocks("sgemm", (g.n.div_ceil(64), g.m.div_ceil(64), 1), 256)?;
    let k = kernels(be)?;
    let mut l = k.sgemm.on(be.stream());
    l.dev(a).dev(b).arg(c);
    match bias {
        Some(v) => l.arg(v),
        None => l.arg(&NULL),
    };
    // SAFETY: every operand holds at least the elements the product reads or writes
    // (checked above against the shape and leading dimensions).
    unsafe { l.ints(&shape).ints(&flags).launch(cfg) }
}

/// `out[j] = sum_i x[i, j]` for `x` `[m, n]`.
pub(crate) fn colsum<X>(
    be: &CudaBackend,
    x: &X,
    m: usize,
    n: usize,
    out: &mut CudaSlice<f32>,
) -> Result<()>
where
    X: DeviceSlice<f32> + DeviceArg,
{
    if n == 0 {
        return Ok(());
    }
    if x.len() < m * n || out.len() < n {
        return Err(EngineError::Shape {
            op: "colsum",
            detail: format!(
                "{} and {} elements for the column sums of [{m}, {n}]",
                x.len(),
                out.len()
            ),
        });
    }
    let a = int_args([m, n])?;
    // SAFETY: x holds m*n values and out n (checked).
    unsafe {
        kernels(be)?
            .colsum
            .on(be.stream())
            .dev(x)
            .arg(out)
            .ints(&a)
            .launch(grid(n))
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_fwd(
    be: &CudaBackend,
    m: usize,
    k: usize,
    n: usize,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    b: Option<&CudaSlice<f32>>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    int_args([m * k, n * k, m * n])?;
    sgemm(be, &Gemm::nt(m, n, k), x, w, y, b)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd(
    be: &CudaBackend,
    m: usize,
    k: usize,
    n: usize,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: Option<&mut CudaSlice<f32>>,
    dw: &mut CudaSlice<f32>,
    db: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    int_args([m * k, n * k, m * n])?;
    if let Some(dx) = dx {
        // dx[m, k] = dy[m, n] . w[n, k]
        sgemm(be, &Gemm::nn(m, k, n), dy, w, dx, None)?;
    }
    // dw[n, k] = dy^T[n, m] . x[m, k]
    sgemm(be, &Gemm::tn(n, k, m), dy, x, dw, None)?;
    if let Some(db) = db {
        colsum(be, dy, m, n, db)?;
    }
    Ok(())
}
