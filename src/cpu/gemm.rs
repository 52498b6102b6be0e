//! The CPU GEMM core: C = A·B + β·C on the small tiles of every family's kernels.
//!
//! One register-blocked micro-kernel: an MR-row × two-SIMD-vector block of C held in registers
//! while the shared dimension streams through (a broadcast of A, two vector loads of B, 2·MR
//! fused multiply-adds per step). AVX2+FMA (`__m256`, `__m256d`) where the CPU has them, else a
//! four-lane `Plain` vector the compiler maps to the baseline SIMD. `gemm` covers any m, n, k
//! (partial row blocks run the same kernel with fewer rows; partial column panels are packed
//! into a zero-padded panel and stored through a vector-sized buffer) and the operand layouts the
//! families need through `Mat`: row-major or transposed, with leading dimensions.
//!
//! Determinism: every element of C is the sum of a(i, p)·b(p, j) over p = 0..k in order, in one
//! register starting from zero (fused on the AVX2 path), combined once with β·C by the same
//! vector operation. So a result never depends on the tiling, on whether the element sits in a
//! full or a partial tile, or on threads (a product runs on one thread); the callers fix the
//! order of the products they accumulate. Accumulation is in the accumulator type `A` (f32, or
//! f64 for f64 inputs); callers upcast f16/bf16 tiles before calling.

use crate::cpu::num::Acc;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// One SIMD register of `W` accumulators. Explicit vectors, because LLVM's auto-vectoriser
/// produced shuffle-laden micro-kernels for some operand layouts.
pub trait Vector<A>: Copy {
    const W: usize;
    /// # Safety
    /// Only where the vector's target features are available.
    unsafe fn zero() -> Self;
    /// # Safety
    /// As for `zero`.
    unsafe fn splat(x: A) -> Self;
    /// # Safety
    /// As for `zero`; `p` addresses W readable elements.
    unsafe fn load(p: *const A) -> Self;
    /// # Safety
    /// As for `zero`; `p` addresses W writable elements.
    unsafe fn store(self, p: *mut A);
    /// self·b + c
    ///
    /// # Safety
    /// As for `zero`.
    unsafe fn fma(self, b: Self, c: Self) -> Self;
}

macro_rules! x86_vector {
    ($v:ty, $a:ty, $w:expr, $feat:literal, $zero:ident, $splat:ident, $load:ident, $store:ident, $fma:ident) => {
        #[cfg(target_arch = "x86_64")]
        impl Vector<$a> for $v {
            const W: usize = $w;
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn zero() -> Self {
                $zero()
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn splat(x: $a) -> Self {
                $splat(x)
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn load(p: *const $a) -> Self {
                unsafe { $load(p) }
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn store(self, p: *mut $a) {
                unsafe { $store(p, self) }
            }
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn fma(self, b: Self, c: Self) -> Self {
                $fma(self, b, c)
            }
        }
    };
}

x86_vector!(
    __m256,
    f32,
    8,
    "avx,fma",
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps
);
x86_vector!(
    __m256d,
    f64,
    4,
    "avx,fma",
    _mm256_setzero_pd,
    _mm256_set1_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_fmadd_pd
);

/// Portable fallback: four lanes the compiler vectorises for the baseline target (no FMA,
/// whose `mul_add` would call libm there).
#[derive(Clone, Copy)]
pub struct Plain<A>([A; 4]);

impl<A: Acc> Vector<A> for Plain<A> {
    const W: usize = 4;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Plain([A::ZERO; 4])
    }
    #[inline(always)]
    unsafe fn splat(x: A) -> Self {
        Plain([x; 4])
    }
    #[inline(always)]
    unsafe fn load(p: *const A) -> Self {
        Plain(unsafe { p.cast::<[A; 4]>().read_unaligned() })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut A) {
        unsafe { p.cast::<[A; 4]>().write_unaligned(self.0) }
    }
    #[inline(always)]
    unsafe fn fma(self, b: Self, c: Self) -> Self {
        Plain(std::array::from_fn(|i| self.0[i] * b.0[i] + c.0[i]))
    }
}

/// Micro-kernel rows on AVX2: 6 × two ymm accumulators plus three operands fill its 16
/// registers.
#[cfg(target_arch = "x86_64")]
pub const MR_AVX2: usize = 6;
/// Micro-kernel rows of the baseline path: its four-lane pairs take two SSE registers each.
pub const MR_BASE: usize = 4;

/// acc += a[0..MR, 0..kc] · b[0..kc, 0..2W], with a(i, k) = `a[i·ra + k·ka]` and b row-major
/// with leading dim `ldb`. Callers pass a constant `ra` or `ka`, so that the inlined loop keeps
/// one stride in a register.
///
/// # Safety
/// Only where `V`'s target features are available.
#[inline(always)]
pub unsafe fn tile_acc<A: Acc, V: Vector<A>, const MR: usize>(
    acc: &mut [[V; 2]; MR],
    (a, ra, ka): (&[A], usize, usize),
    b: &[A],
    ldb: usize,
    kc: usize,
) {
    if kc == 0 {
        return;
    }
    assert!(a.len() > (MR - 1) * ra + (kc - 1) * ka && b.len() >= (kc - 1) * ldb + 2 * V::W);
    for k in 0..kc {
        // SAFETY: in bounds by the assert above.
        unsafe {
            let bp = b.as_ptr().add(k * ldb);
            let (b0, b1) = (V::load(bp), V::load(bp.add(V::W)));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = V::splat(*a.get_unchecked(i * ra + k * ka));
                row[0] = ai.fma(b0, row[0]);
                row[1] = ai.fma(b1, row[1]);
            }
        }
    }
}

/// c[0..MR, 0..2W] = β·c + acc (β None: c = acc, so that stale values never matter).
///
/// # Safety
/// As for `tile_acc`.
#[inline(always)]
pub unsafe fn tile_store<A: Acc, V: Vector<A>, const MR: usize>(
    acc: &[[V; 2]; MR],
    c: &mut [A],
    ldc: usize,
    beta: Option<A>,
) {
    assert!(c.len() >= (MR - 1) * ldc + 2 * V::W);
    for (i, row) in acc.iter().enumerate() {
        for (half, &x) in row.iter().enumerate() {
            // SAFETY: in bounds by the assert above.
            unsafe {
                let p = c.as_mut_ptr().add(i * ldc + half * V::W);
                let y = match beta {
                    Some(f) => V::load(p).fma(V::splat(f), x),
                    None => x,
                };
                y.store(p);
            }
        }
    }
}

/// `tile_store` of the first `cols` < 2W columns, through a vector-sized buffer so that every
/// element sees the same operations as in a full tile.
///
/// # Safety
/// As for `tile_acc`.
#[inline(always)]
unsafe fn tile_store_cols<A: Acc, V: Vector<A>, const MR: usize>(
    acc: &[[V; 2]; MR],
    c: &mut [A],
    ldc: usize,
    cols: usize,
    beta: Option<A>,
) {
    const MAX_NR: usize = 16;
    debug_assert!(2 * V::W <= MAX_NR && cols < 2 * V::W);
    let mut buf = [A::ZERO; MAX_NR];
    for (i, row) in acc.iter().enumerate() {
        let dst = &mut c[i * ldc..i * ldc + cols];
        buf[..cols].copy_from_slice(dst);
        for (half, &x) in row.iter().enumerate() {
            // SAFETY: buf holds 2W elements.
            unsafe {
                let p = buf.as_mut_ptr().add(half * V::W);
                let y = match beta {
                    Some(f) => V::load(p).fma(V::splat(f), x),
                    None => x,
                };
                y.store(p);
            }
        }
        dst.copy_from_slice(&buf[..cols]);
    }
}

/// A read-only matrix operand: element (i, j) at `data[i·rs + j·cs]`, one of the strides 1.
#[derive(Clone, Copy)]
pub struct Mat<'a, A> {
    data: &'a [A],
    rs: usize,
    cs: usize,
}

impl<'a, A> Mat<'a, A> {
    /// A row-major matrix whose rows are `ld` apart.
    pub fn rows(data: &'a [A], ld: usize) -> Self {
        Mat {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of the row-major matrix in `data` whose rows are `ld` apart.
    pub fn transposed(data: &'a [A], ld: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: ld,
        }
    }
}

/// C[m × n] = A[m × k] · B[k × n] + β·C, C row-major with leading dim `ldc` (β None: C is only
/// written). Summation order in the module doc.
#[allow(clippy::too_many_arguments)]
pub fn gemm<A: Acc>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<A>,
    b: Mat<A>,
    c: &mut [A],
    ldc: usize,
    beta: Option<A>,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((a.rs == 1 || a.cs == 1) && (b.rs == 1 || b.cs == 1));
    assert!(k == 0 || a.data.len() > (m - 1) * a.rs + (k - 1) * a.cs);
    assert!(k == 0 || b.data.len() > (k - 1) * b.rs + (n - 1) * b.cs);
    assert!(c.len() >= (m - 1) * ldc + n);
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { gemm_avx2(m, n, k, a, b, c, ldc, beta) };
        return;
    }
    // SAFETY: the baseline vector needs no target feature.
    unsafe { gemm_on::<A, Plain<A>, MR_BASE>(m, n, k, a, b, c, ldc, beta) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2<A: Acc>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<A>,
    b: Mat<A>,
    c: &mut [A],
    ldc: usize,
    beta: Option<A>,
) {
    unsafe { gemm_on::<A, A::V256, MR_AVX2>(m, n, k, a, b, c, ldc, beta) }
}

/// `gemm` with vector `V` and MR-row blocks: column panels outside (a panel of B stays in L1
/// while A streams), row blocks inside.
///
/// # Safety
/// Only where `V`'s target features are available; `gemm` checked the bounds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on<A: Acc, V: Vector<A>, const MR: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: Mat<A>,
    b: Mat<A>,
    c: &mut [A],
    ldc: usize,
    beta: Option<A>,
) {
    let nr = 2 * V::W;
    let mut panel: Vec<A> = Vec::new();
    for j0 in (0..n).step_by(nr) {
        let cols = nr.min(n - j0);
        // A full panel of a row-major B is read in place; others are packed, zero-padded.
        let (bp, ldb) = if k > 0 && b.cs == 1 && cols == nr {
            (&b.data[j0..], b.rs)
        } else {
            panel.clear();
            panel.resize(k * nr, A::ZERO);
            for p in 0..k {
                for x in 0..cols {
                    panel[p * nr + x] = b.data[p * b.rs + (j0 + x) * b.cs];
                }
            }
            (&panel[..], nr)
        };
        let mut i0 = 0;
        while i0 < m {
            let rows = MR.min(m - i0);
            let blk = Block {
                a,
                i0,
                k,
                b: bp,
                ldb,
                j0,
                cols,
                beta,
            };
            // SAFETY: as for this function.
            unsafe {
                match rows {
                    1 => blk.run::<V, 1>(c, ldc),
                    2 => blk.run::<V, 2>(c, ldc),
                    3 => blk.run::<V, 3>(c, ldc),
                    4 => blk.run::<V, 4>(c, ldc),
                    5 => blk.run::<V, 5>(c, ldc),
                    _ => blk.run::<V, 6>(c, ldc),
                }
            }
            i0 += rows;
        }
    }
}

/// One register block: rows i0.. of A against the panel `b` of columns j0..j0 + cols.
struct Block<'a, A> {
    a: Mat<'a, A>,
    i0: usize,
    k: usize,
    b: &'a [A],
    ldb: usize,
    j0: usize,
    cols: usize,
    beta: Option<A>,
}

impl<A: Acc> Block<'_, A> {
    /// # Safety
    /// As for `gemm_on`; R is the number of rows left (≤ 6).
    #[inline(always)]
    unsafe fn run<V: Vector<A>, const R: usize>(&self, c: &mut [A], ldc: usize) {
        let mut acc = [[unsafe { V::zero() }; 2]; R];
        if self.k > 0 {
            let (a, b) = (self.a, self.b);
            let rest = &a.data[self.i0 * a.rs..];
            unsafe {
                if a.cs == 1 {
                    tile_acc::<A, V, R>(&mut acc, (rest, a.rs, 1), b, self.ldb, self.k);
                } else {
                    tile_acc::<A, V, R>(&mut acc, (rest, 1, a.cs), b, self.ldb, self.k);
                }
            }
        }
        let c = &mut c[self.i0 * ldc + self.j0..];
        unsafe {
            if self.cols == 2 * V::W {
                tile_store::<A, V, R>(&acc, c, ldc, self.beta);
            } else {
                tile_store_cols::<A, V, R>(&acc, c, ldc, self.cols, self.beta);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout and remainder against a naive product, and bitwise equal to the element's
    /// own 1 × 1 product (the summation order does not depend on the tile).
    fn check<A: Acc>(tol: f64) {
        for &(m, n, k) in &[(1, 1, 1), (7, 19, 5), (6, 16, 64), (13, 33, 17), (3, 8, 0)] {
            let a: Vec<A> = (0..m * k).map(|i| A::of((i as f64 * 0.37).sin())).collect();
            let b: Vec<A> = (0..k * n).map(|i| A::of((i as f64 * 0.11).cos())).collect();
            let at: Vec<A> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            let bt: Vec<A> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let c0: Vec<A> = (0..m * n).map(|i| A::of(i as f64 * 0.5)).collect();
            for (am, bm) in [
                (Mat::rows(&a, k), Mat::rows(&b, n)),
                (Mat::transposed(&at, m), Mat::transposed(&bt, k)),
            ] {
                let mut c = c0.clone();
                gemm(m, n, k, am, bm, &mut c, n, Some(A::ONE));
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = c0[i * n + j].f64()
                            + (0..k)
                                .map(|p| a[i * k + p].f64() * b[p * n + j].f64())
                                .sum::<f64>();
                        assert!((c[i * n + j].f64() - want).abs() < tol, "{m} {n} {k}");
                        let mut one = [c0[i * n + j]];
                        let (ar, bc) = (&a[i * k..], &bt[j * k..]);
                        gemm(
                            1,
                            1,
                            k,
                            Mat::rows(ar, k),
                            Mat::transposed(bc, k),
                            &mut one,
                            1,
                            Some(A::ONE),
                        );
                        assert_eq!(one[0].f64().to_bits(), c[i * n + j].f64().to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_matches_naive_f64() {
        check::<f64>(1e-12);
    }

    #[test]
    fn gemm_matches_naive_f32() {
        check::<f32>(1e-4);
    }
}
