//! The one dense matrix product of the CPU backend: a safe, bounds-checked wrapper over the
//! `gemm` crate for strided f32/f64 views. Convolutions, linear layers and the LSTM all go
//! through [`matmul`]; other modules (model, train) may reuse it.
//!
//! Knows nothing about layers: only matrices as (slice, rows, cols, row stride, col stride).

use crate::engine::{EngineError, Real, Result};

/// How the product may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// One thread: the caller already runs in parallel (e.g. one image per rayon task).
    Seq,
    /// The gemm crate splits the product over rayon's global pool.
    Rayon,
}

impl Par {
    fn to_gemm(self) -> ::gemm::Parallelism {
        match self {
            Par::Seq => ::gemm::Parallelism::None,
            Par::Rayon => ::gemm::Parallelism::Rayon(0),
        }
    }
}

/// A read-only strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major `rows x cols` matrix at the start of `data`.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// Any strides (in elements).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A writable strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    pub data: &'a mut [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> MatMut<'a, T> {
    /// A contiguous row-major `rows x cols` matrix at the start of `data`.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// Any strides (in elements); the view must not map two elements to one place.
    pub fn strided(data: &'a mut [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        MatMut {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

fn shape_err(detail: String) -> EngineError {
    EngineError::Shape {
        op: "matmul",
        detail,
    }
}

/// Index one past the last element a view touches (0 for an empty view).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

fn check_view(
    what: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    match extent(rows, cols, rs, cs) {
        Some(e) if e <= len => {}
        _ => {
            return Err(shape_err(format!(
            "{what} view {rows}x{cols} (strides {rs}, {cs}) exceeds its buffer of {len} elements"
        )))
        }
    }
    if rs > isize::MAX as usize || cs > isize::MAX as usize {
        return Err(shape_err(format!("{what} strides too large")));
    }
    Ok(())
}

/// `dst = a * b`, or `dst += a * b` when `accumulate`. All views are bounds-checked; the
/// destination must be non-overlapping (one stride at least as large as the other extent).
pub fn matmul<T: Real>(
    dst: MatMut<'_, T>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    matmul_scaled(dst, a, b, accumulate, T::one(), par)
}

/// `dst = scale * a * b`, or `dst += scale * a * b` when `accumulate`.
pub fn matmul_scaled<T: Real>(
    dst: MatMut<'_, T>,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    scale: T,
    par: Par,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || dst.rows != m || dst.cols != n {
        return Err(shape_err(format!(
            "cannot multiply {}x{} by {}x{} into {}x{}",
            a.rows, a.cols, b.rows, b.cols, dst.rows, dst.cols
        )));
    }
    check_view("lhs", a.data.len(), a.rows, a.cols, a.rs, a.cs)?;
    check_view("rhs", b.data.len(), b.rows, b.cols, b.rs, b.cs)?;
    check_view("dst", dst.data.len(), dst.rows, dst.cols, dst.rs, dst.cs)?;
    // Distinct destination elements must not alias, or gemm's writes would race.
    let distinct = m <= 1 && (n <= 1 || dst.cs >= 1)
        || n <= 1 && dst.rs >= 1
        || (dst.cs >= 1 && dst.rs >= n * dst.cs)
        || (dst.rs >= 1 && dst.cs >= m * dst.rs);
    if !distinct {
        return Err(shape_err(format!(
            "dst view {m}x{n} with strides ({}, {}) overlaps itself",
            dst.rs, dst.cs
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst.data[r * dst.rs + c * dst.cs] = T::zero();
                }
            }
        }
        return Ok(());
    }
    // SAFETY: every view was checked to lie inside its slice; dst is exclusively borrowed
    // and its elements are distinct; lhs/rhs are shared borrows that cannot alias dst
    // (Rust's borrow rules); T is f32 or f64 (the only `Real` types), which gemm supports.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            par.to_gemm(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn matches_naive_with_transposes_and_accumulate() {
        let (m, k, n) = (7, 5, 9);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
        let b: Vec<f64> = (0..k * n)
            .map(|i| ((i * 13 % 7) as f64) * 0.5 - 1.0)
            .collect();
        let want = naive(m, k, n, &a, &b);
        let mut got = vec![1.0; m * n];
        matmul(
            MatMut::new(&mut got, m, n),
            Mat::new(&a, m, k),
            Mat::new(&b, k, n),
            false,
            Par::Seq,
        )
        .unwrap();
        assert_eq!(got, want);
        // (b^T a^T)^T = a b, written through a column-major destination view.
        let mut got_t = vec![0.0; m * n];
        matmul(
            MatMut::strided(&mut got_t, n, m, 1, n),
            Mat::new(&b, k, n).t(),
            Mat::new(&a, m, k).t(),
            false,
            Par::Rayon,
        )
        .unwrap();
        assert_eq!(got_t, want);
        matmul(
            MatMut::new(&mut got, m, n),
            Mat::new(&a, m, k),
            Mat::new(&b, k, n),
            true,
            Par::Seq,
        )
        .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(*g, 2.0 * w);
        }
    }

    #[test]
    fn rejects_bad_views() {
        let a = vec![0.0f32; 6];
        let mut d = vec![0.0f32; 4];
        assert!(matmul(
            MatMut::new(&mut d, 2, 2),
            Mat::new(&a, 2, 4),
            Mat::new(&a, 4, 2),
            false,
            Par::Seq
        )
        .is_err());
        assert!(matmul(
            MatMut::new(&mut d, 2, 2),
            Mat::new(&a, 2, 3),
            Mat::new(&a, 2, 2),
            false,
            Par::Seq
        )
        .is_err());
        assert!(matmul(
            MatMut::strided(&mut d, 2, 2, 0, 1),
            Mat::new(&a, 2, 3),
            Mat::new(&a, 3, 2),
            false,
            Par::Seq
        )
        .is_err());
    }
}

/// `c = a * b` for contiguous row-major f32 matrices (`a` m x k, `b` k x n, `c` m x n) with
/// `n` a multiple of 16, by an AVX-512 register-blocked kernel (8 rows x 32 columns of `c`
/// in 16 registers, `b` read in place: no packing). For the many small products of one
/// Winograd block, whose right-hand side was just written and sits in the cache, where the
/// general product's packing and dispatch cost as much as the arithmetic. Returns false
/// (and does nothing) when the processor lacks AVX-512 or the shapes do not fit.
pub fn matmul_f32_rowmajor_small(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::isa() != super::simd::Isa::Avx512
            || !n.is_multiple_of(16)
            || a.len() < m * k
            || b.len() < k * n
            || c.len() < m * n
        {
            return false;
        }
        if m == 0 || n == 0 {
            return true;
        }
        // SAFETY: AVX-512F is present (isa), and the three slices hold the matrices
        // (lengths checked above).
        unsafe { avx512::matmul(m, n, k, a.as_ptr(), b.as_ptr(), c.as_mut_ptr()) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, n, k, a, b, c);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One `MR x (16*NV)` tile of `c` over the whole depth `k`.
    #[inline(always)]
    unsafe fn tile<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for kk in 0..k {
            let bp = b.add(kk * ldb);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, bvv) in bv.iter_mut().enumerate() {
                *bvv = _mm512_loadu_ps(bp.add(16 * v));
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for v in 0..NV {
                    accr[v] = _mm512_fmadd_ps(av, bv[v], accr[v]);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (v, accv) in accr.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + 16 * v), *accv);
            }
        }
    }

    #[inline(always)]
    unsafe fn rows<const NV: usize>(
        m: usize,
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
    ) {
        let mut r = 0;
        while r + 8 <= m {
            tile::<8, NV>(k, a.add(r * k), k, b, ldb, c.add(r * ldb), ldb);
            r += 8;
        }
        let (a, c) = (a.add(r * k), c.add(r * ldb));
        match m - r {
            0 => {}
            1 => tile::<1, NV>(k, a, k, b, ldb, c, ldb),
            2 => tile::<2, NV>(k, a, k, b, ldb, c, ldb),
            3 => tile::<3, NV>(k, a, k, b, ldb, c, ldb),
            4 => tile::<4, NV>(k, a, k, b, ldb, c, ldb),
            5 => tile::<5, NV>(k, a, k, b, ldb, c, ldb),
            6 => tile::<6, NV>(k, a, k, b, ldb, c, ldb),
            _ => tile::<7, NV>(k, a, k, b, ldb, c, ldb),
        }
    }

    /// # Safety
    /// AVX-512F must be available; `a` holds m*k, `b` k*n, `c` m*n floats; n % 16 == 0.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn matmul(m: usize, n: usize, k: usize, a: *const f32, b: *const f32, c: *mut f32) {
        let mut j = 0;
        while j + 32 <= n {
            rows::<2>(m, k, a, b.add(j), n, c.add(j));
            j += 32;
        }
        if j < n {
            rows::<1>(m, k, a, b.add(j), n, c.add(j));
        }
    }
}
