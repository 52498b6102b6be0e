//! Lightning attention on the CPU: one generic blocked "linear-attention pass" that serves
//! the forward (one pass) and the backward (three passes, see `ops::lightning`).
//!
//! Math of one pass, per sequence n (length L, batch row b, first token t0), head h,
//! λ = exp(−slopes[h]), γ = scale_out, β = scale_kv, S_in = state_in[n, h] (0 if absent):
//!
//!   forward: R_t = λ^(t+1)·S_in + β·Σ_{j≤t} λ^(t−j)·k_j v_jᵀ,   state_out = R_(L−1)  (S_in if L = 0)
//!   reverse: R_t = λ^(L−1−t)·S_in + β·Σ_{j≥t} λ^(j−t)·k_j v_jᵀ, state_out = λ·R_0    (S_in if L = 0)
//!   out_t = γ·q_tᵀ R_t                                    (t = 0..L−1, position in the sequence)
//!   dot:  partial[n, h, slot] = Σ_t (t+1)·⟨x_t, out_t⟩ over the value columns of one slot
//!
//! Implementation: every sequence is walked in chunks of BK = 64 tokens (from its end in the
//! reverse direction, so local row p is the p-th token visited; the reverse pass is then the
//! forward recurrence with S_in entering one power of λ later). With S the state before a chunk
//! of m rows and e = 1 (e = 0 on the first reverse chunk, where S is S_in itself):
//!
//!   O = γβ·[(Q Kᵀ) ⊙ M] V + γ·diag(λ^(p+e))·Q S,   M[p, j] = λ^(p−j) for j ≤ p, else 0
//!   S ← λ^(m−1+e)·S + β·Σ_j λ^(m−1−j)·k_j v_jᵀ,     reverse state_out = λ·S at the end
//!
//! so every power of λ has a non-negative exponent and nothing overflows for any slope ≥ 0.
//! Work items are (sequence, head, group of 32-column value tiles): state columns are
//! independent, and a group spans several tiles when there are enough (sequence, head) pairs
//! to fill the pool, so that Q Kᵀ is computed once for all of them. Tile products run in the
//! GEMM core's micro-kernel (`cpu::gemm`), on buffers padded to whole register blocks, called
//! directly because the causal products skip the blocks above the diagonal.

#[cfg(target_arch = "x86_64")]
use crate::cpu::gemm::MR_AVX2;
use crate::cpu::gemm::{tile_acc, tile_store, Plain, Vector, MR_BASE};
use crate::cpu::num::{by_dtype, Acc, Input};
use crate::cpu::POOL;
use crate::tensor::View;
use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};

/// One sequence of a (possibly packed) batch: batch row, first token, length.
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub batch: usize,
    pub start: usize,
    pub len: usize,
}

/// Arguments of one pass. Shapes were validated by the caller.
pub struct LaPass<'a> {
    /// [B, T, H, Dk]
    pub q: &'a View,
    /// [B, T, H, Dk]
    pub k: &'a View,
    /// [B, T, H, Dv]
    pub v: &'a View,
    /// [B, T, H, Dv], written (same dtype as q, k, v)
    pub out: &'a View,
    /// [H], state dtype (f64 for f64 inputs, else f32)
    pub slopes: &'a View,
    /// [N, H, Dk, Dv], state dtype, any strides (transposed views are common)
    pub state_in: Option<&'a View>,
    /// [N, H, Dk, Dv], state dtype, written
    pub state_out: Option<&'a View>,
    /// (x [B, T, H, Dv] input dtype, partial [N, H, SLOTS] state dtype, pre-zeroed)
    pub dot: Option<(&'a View, &'a View)>,
    pub seqs: &'a [Seq],
    pub reverse: bool,
    pub scale_out: f64,
    pub scale_kv: f64,
}

/// Number of partial slots of the `dot` output, shared by the CPU and CUDA passes.
pub const DOT_SLOTS: usize = 8;

/// Tokens per chunk.
const BK: usize = 64;
/// Value columns per dot slot.
const TILE: usize = 32;
/// Row capacity of the chunk buffers: BK rounded up to any micro-kernel height.
const ROWS: usize = BK + 8;

pub fn la_pass(p: &LaPass) {
    la_pass_on(p, Isa::detect());
}

fn la_pass_on(p: &LaPass, isa: Isa) {
    by_dtype!(p.q.dtype, "la_pass", I => run::<I>(p, isa))
}

/// A strided 2-D window of a tensor, element strides.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *mut T,
    rs: isize,
    cs: isize,
}

impl<T: Copy> Mat<T> {
    /// Rows = tokens from `t0`, columns = last dim of a [B, T, H, D] view.
    ///
    /// # Safety
    /// The index must be inside the view and `T` its dtype.
    unsafe fn tokens(v: &View, b: usize, t0: usize, h: usize) -> Self {
        Mat {
            ptr: unsafe { v.at(&[b, t0, h, 0]) },
            rs: v.strides[1],
            cs: v.strides[3],
        }
    }

    /// Rows = Dk, columns = Dv of an [N, H, Dk, Dv] view.
    ///
    /// # Safety
    /// As for `tokens`.
    unsafe fn state(v: &View, n: usize, h: usize) -> Self {
        Mat {
            ptr: unsafe { v.at(&[n, h, 0, 0]) },
            rs: v.strides[2],
            cs: v.strides[3],
        }
    }

    #[inline(always)]
    fn elem(&self, r: usize, c: usize) -> *mut T {
        self.ptr
            .wrapping_offset(r as isize * self.rs + c as isize * self.cs)
    }

    /// # Safety
    /// (r, c) inside the window.
    #[inline(always)]
    unsafe fn get(&self, r: usize, c: usize) -> T {
        unsafe { *self.elem(r, c) }
    }

    /// # Safety
    /// (r, c) inside the window, and no other thread touches it.
    #[inline(always)]
    unsafe fn set(&self, r: usize, c: usize, x: T) {
        unsafe { *self.elem(r, c) = x }
    }
}

/// dst[c·ldd + r] = src[r·lds + c] for the src.len() / lds rows of src. Column by column, so
/// that stores are contiguous (row by row, LLVM emits slow scatters).
#[inline(always)]
fn transpose<A: Copy>(src: &[A], lds: usize, dst: &mut [A], ldd: usize) {
    let rows = src.len() / lds;
    for c in 0..lds {
        let col = &mut dst[c * ldd..c * ldd + rows];
        col.iter_mut()
            .zip(src[c..].iter().step_by(lds))
            .for_each(|(d, &x)| *d = x);
    }
}

/// dst = row `r`, columns `c0..` of `m`, upcast.
///
/// # Safety
/// The row segment is inside the view.
#[inline(always)]
unsafe fn load_row<I: Input>(m: &Mat<I>, r: usize, c0: usize, dst: &mut [I::A]) {
    if m.cs == 1 {
        // SAFETY: contiguous, inside the view.
        let src = unsafe { std::slice::from_raw_parts(m.elem(r, c0), dst.len()) };
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.load());
    } else {
        for (c, d) in dst.iter_mut().enumerate() {
            *d = unsafe { m.get(r, c0 + c) }.load();
        }
    }
}

/// Row `r`, columns `c0..` of `m` = src, rounded to the input dtype.
///
/// # Safety
/// The row segment is inside the view, and no other thread touches it.
#[inline(always)]
unsafe fn store_row<I: Input>(m: &Mat<I>, r: usize, c0: usize, src: &[I::A]) {
    if m.cs == 1 {
        // SAFETY: contiguous, inside the view, ours alone.
        let dst = unsafe { std::slice::from_raw_parts_mut(m.elem(r, c0), src.len()) };
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = I::store(s));
    } else {
        for (c, &x) in src.iter().enumerate() {
            unsafe { m.set(r, c0 + c, I::store(x)) };
        }
    }
}

/// Asks for the cache lines of row `r`, columns `c0..c1` of `m`. Token rows of one head are
/// usually H·D elements apart, a page or more, out of reach of the hardware prefetchers, and
/// waiting on them cost as much as the arithmetic.
#[inline(always)]
fn prefetch_row<T: Copy>(m: &Mat<T>, r: usize, c0: usize, c1: usize) {
    #[cfg(target_arch = "x86_64")]
    if m.cs.unsigned_abs() == 1 && c1 > c0 {
        let line = (64 / std::mem::size_of::<T>()).max(1);
        for c in (c0..c1).step_by(line).chain([c1 - 1]) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(m.elem(r, c).cast::<i8>()) };
        }
    }
}

/// Prefetches the rows of the next chunk while this one computes, in even portions, one per
/// micro-kernel block: a burst of prefetches stalls on the cache's miss buffers.
struct Ahead<I> {
    /// (view, first column, end column): q, k, v, out, x.
    streams: [(Mat<I>, usize, usize); 5],
    /// Streams in use (x only with `dot`).
    n: usize,
    /// Rows to fetch.
    rows: usize,
    steps: usize,
    step: usize,
    /// Token of the next chunk's row 0.
    first: usize,
    reverse: bool,
}

impl<I: Copy> Ahead<I> {
    #[inline(always)]
    fn step(&mut self) {
        let (lo, hi) = (self.step * self.rows, (self.step + 1) * self.rows);
        for r in lo / self.steps..hi / self.steps {
            let t = if self.reverse {
                self.first - r
            } else {
                self.first + r
            };
            for (m, c0, c1) in &self.streams[..self.n] {
                prefetch_row(m, t, *c0, *c1);
            }
        }
        self.step += 1;
    }
}

#[derive(Clone, Copy, Debug)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Base,
}

impl Isa {
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            return Isa::Avx2;
        }
        Isa::Base
    }

    /// Micro-kernel rows of the GEMM core's vectors.
    fn mr(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => MR_AVX2,
            Isa::Base => MR_BASE,
        }
    }

    /// Micro-kernel columns: two vectors.
    fn nr<A: Acc>(self) -> usize {
        2 * match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => A::V256::W,
            Isa::Base => Plain::<A>::W,
        }
    }
}

/// One work item: sequence `n`, head `h`, value columns `c0..c1` (whole tiles).
#[derive(Clone, Copy)]
struct Item {
    n: usize,
    h: usize,
    c0: usize,
    c1: usize,
}

/// Per-thread tile buffers, row-major, padded to whole micro-kernel blocks.
struct Scratch<A> {
    /// Q rows, BK × dk, staged for the transpose.
    q: Vec<A>,
    /// K rows, BK × dk, likewise.
    k: Vec<A>,
    /// Qᵀ, dk × ROWS (later scaled by γλ^(p+e)).
    qt: Vec<A>,
    /// Kᵀ, dkp × BK (later scaled by βλ^(m−1−j)).
    kt: Vec<A>,
    /// V, BK × ep.
    v: Vec<A>,
    /// Masked Q Kᵀ, ROWS × BK.
    a: Vec<A>,
    /// Output rows, ROWS × ep.
    o: Vec<A>,
    /// State, dkp × ep.
    s: Vec<A>,
    /// One row of x for the dot partials.
    x: Vec<A>,
}

impl<A: Acc> Scratch<A> {
    fn new(dk: usize, dkp: usize, ep: usize) -> Self {
        Scratch {
            q: vec![A::ZERO; BK * dk],
            qt: vec![A::ZERO; dk * ROWS],
            k: vec![A::ZERO; BK * dk],
            kt: vec![A::ZERO; dkp * BK],
            v: vec![A::ZERO; BK * ep],
            a: vec![A::ZERO; ROWS * BK],
            o: vec![A::ZERO; ROWS * ep],
            s: vec![A::ZERO; dkp * ep],
            x: vec![A::ZERO; ep],
        }
    }
}

fn run<I: Input>(p: &LaPass, isa: Isa) {
    let dk = p.q.shape[3];
    let dv = p.v.shape[3];
    let heads = p.q.shape[2];
    let pairs = p.seqs.len() * heads;
    if pairs == 0 || dk == 0 || dv == 0 {
        return;
    }
    let nr = isa.nr::<I::A>();

    // Split the value tiles only when there are too few (sequence, head) pairs for the pool:
    // each split recomputes Q Kᵀ.
    let threads = POOL.current_num_threads();
    let ntiles = dv.div_ceil(TILE);
    let groups = if pairs >= threads {
        1
    } else {
        (2 * threads).div_ceil(pairs).min(ntiles)
    };
    let per = ntiles.div_ceil(groups) * TILE;
    let mut items = Vec::with_capacity(pairs * groups);
    for (n, seq) in p.seqs.iter().enumerate() {
        if seq.len == 0 && p.state_out.is_none() {
            continue;
        }
        for h in 0..heads {
            for c0 in (0..dv).step_by(per) {
                let c1 = (c0 + per).min(dv);
                items.push(Item { n, h, c0, c1 });
            }
        }
    }
    // Longest sequences first, so that work stealing evens out ragged batches.
    items.sort_by_key(|it| std::cmp::Reverse(p.seqs[it.n].len));

    let dkp = dk.next_multiple_of(isa.mr());
    let ep = per.min(dv).next_multiple_of(nr);
    POOL.install(|| {
        items.par_iter().for_each_init(
            || Scratch::<I::A>::new(dk, dkp, ep),
            |sc, it| {
                // SAFETY: shapes and dtypes were validated by the caller; items write disjoint
                // columns of out, state_out and distinct slots of partial.
                unsafe {
                    match isa {
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => item_avx2::<I>(p, it, sc),
                        Isa::Base => item::<I, Plain<I::A>, MR_BASE>(p, it, sc),
                    }
                }
            },
        )
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn item_avx2<I: Input>(p: &LaPass, it: &Item, sc: &mut Scratch<I::A>) {
    unsafe { item::<I, <I::A as Acc>::V256, MR_AVX2>(p, it, sc) }
}

/// One (sequence, head, column group) of the pass.
///
/// # Safety
/// The views of `p` match its shapes and dtypes, and no other item covers the same columns.
#[inline(always)]
unsafe fn item<I: Input, V: Vector<I::A>, const MR: usize>(
    p: &LaPass,
    it: &Item,
    sc: &mut Scratch<I::A>,
) {
    let dk = p.q.shape[3];
    let dkp = dk.next_multiple_of(MR);
    let (n, h, c0) = (it.n, it.h, it.c0);
    let ew = it.c1 - c0;
    let nr = 2 * V::W;
    let ep = ew.next_multiple_of(nr);
    let seq = p.seqs[n];
    let len = seq.len;

    let s = &mut sc.s[..dkp * ep];
    s.fill(I::A::ZERO);
    if let Some(si) = p.state_in {
        let si = unsafe { Mat::<I::A>::state(si, n, h) };
        for r in 0..dk {
            for c in 0..ew {
                s[r * ep + c] = unsafe { si.get(r, c0 + c) };
            }
        }
    }

    if len > 0 {
        let slope = unsafe { *p.slopes.at::<I::A>(&[h]) }.f64();
        // pw[i] = λ^i, i = 0..=BK, in f64: for a large slope it underflows cleanly to 0.
        let lambda = (-slope).exp();
        let mut pw = [1f64; BK + 1];
        for i in 1..=BK {
            pw[i] = pw[i - 1] * lambda;
        }
        let (gamma, beta) = (p.scale_out, p.scale_kv);
        // Reversed, so that the per-row factors λ^(r−j) and λ^(m−1−j) are forward slices.
        let mask: [I::A; BK] = std::array::from_fn(|i| I::A::of(gamma * beta * pw[BK - 1 - i]));
        let kscale: [I::A; BK] = std::array::from_fn(|i| I::A::of(beta * pw[BK - 1 - i]));

        let (qm, km, vm, om) = unsafe {
            (
                Mat::<I>::tokens(p.q, seq.batch, seq.start, h),
                Mat::<I>::tokens(p.k, seq.batch, seq.start, h),
                Mat::<I>::tokens(p.v, seq.batch, seq.start, h),
                Mat::<I>::tokens(p.out, seq.batch, seq.start, h),
            )
        };
        let xm = p
            .dot
            .map(|(x, _)| unsafe { Mat::<I>::tokens(x, seq.batch, seq.start, h) });
        let mut dots = [0f64; DOT_SLOTS];
        let streams = [
            (qm, 0, dk),
            (km, 0, dk),
            (vm, c0, it.c1),
            (om, c0, it.c1),
            (xm.unwrap_or(om), c0, it.c1),
        ];
        let nstreams = if xm.is_some() { 5 } else { 4 };

        let (qb, kb, qt, kt, vb, ab, ob, xb) = (
            &mut sc.q[..],
            &mut sc.k[..],
            &mut sc.qt[..],
            &mut sc.kt[..dkp * BK],
            &mut sc.v[..BK * ep],
            &mut sc.a[..],
            &mut sc.o[..ROWS * ep],
            &mut sc.x[..],
        );
        // Pad columns of V may hold another item's values (another leading dim); they only
        // reach pad columns of S and O, but keep them zero so that those stay small.
        for r in 0..BK {
            vb[r * ep + ew..(r + 1) * ep].fill(I::A::ZERO);
        }
        // The first reverse chunk sees S_in one power of λ earlier than the others.
        let mut e = usize::from(!p.reverse);
        let mut u0 = 0;
        while u0 < len {
            let m = BK.min(len - u0);
            let tok = |r: usize| if p.reverse { len - 1 - u0 - r } else { u0 + r };
            let rows = m.next_multiple_of(MR);
            let mut ahead = Ahead {
                streams,
                n: nstreams,
                rows: BK.min(len - u0 - m),
                steps: (m.div_ceil(MR) + dkp / MR) * (ep / nr),
                step: 0,
                // Unused when there is no next chunk.
                first: if p.reverse {
                    (len - u0 - m).saturating_sub(1)
                } else {
                    u0 + m
                },
                reverse: p.reverse,
            };

            for r in 0..m {
                let t = tok(r);
                unsafe {
                    load_row(&qm, t, 0, &mut qb[r * dk..(r + 1) * dk]);
                    load_row(&km, t, 0, &mut kb[r * dk..(r + 1) * dk]);
                    load_row(&vm, t, c0, &mut vb[r * ep..r * ep + ew]);
                }
            }
            transpose(&qb[..m * dk], dk, qt, ROWS);
            transpose(&kb[..m * dk], dk, kt, BK);
            // Pad rows of a ragged chunk only feed discarded output rows; keep them finite.
            for c in 0..dk {
                qt[c * ROWS + m..c * ROWS + rows].fill(I::A::ZERO);
            }

            // ab = γβ·(Q Kᵀ ⊙ M), causal: row block i needs columns < min(i + MR, m).
            for i in (0..m).step_by(MR) {
                let jend = (i + MR).min(m);
                for j in (0..jend).step_by(nr) {
                    let mut acc = [[unsafe { V::zero() }; 2]; MR];
                    tile_acc::<_, V, MR>(&mut acc, (&qt[i..], 1, ROWS), &kt[j..], BK, dk);
                    tile_store(&acc, &mut ab[i * BK + j..], BK, None);
                }
                // Pad rows (≥ m) hold zeros: Q's pad rows are zero.
                for r in i..(i + MR).min(m) {
                    let (lower, upper) = ab[r * BK..r * BK + jend].split_at_mut((r + 1).min(jend));
                    let f = &mask[BK - 1 - r..];
                    lower.iter_mut().zip(f).for_each(|(x, &f)| *x = *x * f);
                    upper.fill(I::A::ZERO);
                }
            }

            let d: [I::A; BK] = std::array::from_fn(|r| I::A::of(gamma * pw[r + e]));
            for c in 0..dk {
                let col = &mut qt[c * ROWS..c * ROWS + m];
                col.iter_mut().zip(&d).for_each(|(x, &d)| *x = *x * d);
            }
            // O = ab·V + diag(γλ^(p+e))·Q·S
            for i in (0..m).step_by(MR) {
                let kc = (i + MR).min(m);
                for j in (0..ep).step_by(nr) {
                    ahead.step();
                    let mut acc = [[unsafe { V::zero() }; 2]; MR];
                    // Columns before the row block only: every row of the block sees them.
                    tile_acc::<_, V, MR>(&mut acc, (&ab[i * BK..], BK, 1), &vb[j..], ep, i);
                    tile_acc::<_, V, MR>(&mut acc, (&qt[i..], 1, ROWS), &s[j..], ep, dk);
                    tile_store(&acc, &mut ob[i * ep + j..], ep, None);
                }
                // The diagonal block row by row, causal columns only: a masked (zero) weight
                // times a NaN/Inf value of a later token would leak it back in time.
                for r in i..kc {
                    let orow = &mut ob[r * ep..(r + 1) * ep];
                    for c in i..=r {
                        let a = ab[r * BK + c];
                        let vrow = &vb[c * ep..(c + 1) * ep];
                        orow.iter_mut().zip(vrow).for_each(|(o, &v)| *o += a * v);
                    }
                }
            }

            for r in 0..m {
                let t = tok(r);
                let orow = &ob[r * ep..r * ep + ew];
                unsafe { store_row(&om, t, c0, orow) };
                if let Some(xm) = &xm {
                    unsafe { load_row(xm, t, c0, &mut xb[..ew]) };
                    // c0 is a multiple of TILE: the chunks are the slots.
                    let slots = xb[..ew].chunks(TILE).zip(orow.chunks(TILE));
                    for (d, (xs, os)) in dots[c0 / TILE..].iter_mut().zip(slots) {
                        let sum = xs.iter().zip(os).fold(I::A::ZERO, |a, (&x, &o)| a + x * o);
                        *d += (t + 1) as f64 * sum.f64();
                    }
                }
            }

            // S ← λ^(m−1+e)·S + Kᵀ·diag(βλ^(m−1−j))·V
            for c in 0..dk {
                let row = &mut kt[c * BK..c * BK + m];
                row.iter_mut()
                    .zip(&kscale[BK - m..])
                    .for_each(|(x, &f)| *x = *x * f);
            }
            let keep = I::A::of(pw[m - 1 + e]);
            for i in (0..dkp).step_by(MR) {
                for j in (0..ep).step_by(nr) {
                    ahead.step();
                    let mut acc = [[unsafe { V::zero() }; 2]; MR];
                    tile_acc::<_, V, MR>(&mut acc, (&kt[i * BK..], BK, 1), &vb[j..], ep, m);
                    tile_store(&acc, &mut s[i * ep + j..], ep, Some(keep));
                }
            }
            e = 1;
            u0 += m;
        }
        if p.reverse {
            let lam = I::A::of(pw[1]);
            s.iter_mut().for_each(|x| *x = *x * lam);
        }
        if let Some((_, part)) = p.dot {
            for (slot, &d) in dots
                .iter()
                .enumerate()
                .take(it.c1.div_ceil(TILE))
                .skip(c0 / TILE)
            {
                let ptr = unsafe { part.at::<I::A>(&[n, h, slot]) };
                unsafe { *ptr = I::A::of((*ptr).f64() + d) };
            }
        }
    }

    if let Some(so) = p.state_out {
        let so = unsafe { Mat::<I::A>::state(so, n, h) };
        for r in 0..dk {
            for c in 0..ew {
                unsafe { so.set(r, c0 + c, s[r * ep + c]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

    /// xorshift64*, uniform in [−1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
            x as f64 / (1u64 << 52) as f64 - 1.0
        }

        fn vec(&mut self, n: usize) -> Vec<f64> {
            (0..n).map(|_| self.next()).collect()
        }
    }

    fn view<T>(buf: &mut [T], dtype: DType, shape: &[usize], strides: &[isize]) -> View {
        View {
            ptr: buf.as_mut_ptr().cast(),
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            dtype,
            device: Device::Cpu,
        }
    }

    fn contiguous(shape: &[usize]) -> Vec<isize> {
        let mut st = vec![1isize; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            st[i] = st[i + 1] * shape[i + 1] as isize;
        }
        st
    }

    #[derive(Clone)]
    struct Case {
        dk: usize,
        dv: usize,
        slopes: Vec<f64>,
        /// Sequences packed into one batch row.
        lens: Vec<usize>,
        reverse: bool,
        state_in: bool,
        /// state_in stored as [N, H, Dv, Dk] and viewed transposed.
        transposed: bool,
        state_out: bool,
        dot: bool,
        /// k shared by all heads through a head stride of 0.
        shared_k: bool,
        /// One batch row per sequence instead of all packed into one.
        batched: bool,
        gamma: f64,
        beta: f64,
    }

    impl Case {
        fn new(dk: usize, dv: usize, slopes: &[f64], lens: &[usize]) -> Self {
            Case {
                dk,
                dv,
                slopes: slopes.to_vec(),
                lens: lens.to_vec(),
                reverse: false,
                state_in: false,
                transposed: false,
                state_out: false,
                dot: false,
                shared_k: false,
                batched: false,
                gamma: 0.7,
                beta: 1.3,
            }
        }

        fn heads(&self) -> usize {
            self.slopes.len()
        }

        fn t(&self) -> usize {
            self.lens.iter().sum()
        }

        fn seqs(&self) -> Vec<Seq> {
            let mut start = 0;
            self.lens
                .iter()
                .map(|&len| {
                    let s = Seq {
                        batch: 0,
                        start,
                        len,
                    };
                    start += len;
                    s
                })
                .collect()
        }
    }

    /// Logical inputs: q, k [T, H, Dk]; v, x [T, H, Dv]; s_in [N, H, Dk, Dv].
    struct Data {
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        x: Vec<f64>,
        s_in: Vec<f64>,
    }

    /// out [T, H, Dv], state_out [N, H, Dk, Dv], partial [N, H, DOT_SLOTS].
    struct Outs {
        out: Vec<f64>,
        state: Vec<f64>,
        partial: Vec<f64>,
    }

    fn data(c: &Case, seed: u64, round: fn(f64) -> f64) -> Data {
        let mut rng = Rng(seed);
        let (t, h, n) = (c.t(), c.heads(), c.lens.len());
        let mut k = rng.vec(t * h * c.dk);
        if c.shared_k {
            for i in 0..t * h * c.dk {
                k[i] = k[(i / (h * c.dk)) * h * c.dk + i % c.dk];
            }
        }
        let mut d = Data {
            q: rng.vec(t * h * c.dk),
            k,
            v: rng.vec(t * h * c.dv),
            x: rng.vec(t * h * c.dv),
            s_in: rng.vec(n * h * c.dk * c.dv),
        };
        for a in [&mut d.q, &mut d.k, &mut d.v, &mut d.x] {
            a.iter_mut().for_each(|x| *x = round(*x));
        }
        d
    }

    /// The per-token recurrence of the module doc.
    fn reference(c: &Case, d: &Data) -> Outs {
        let (hs, dk, dv, n) = (c.heads(), c.dk, c.dv, c.lens.len());
        let mut o = Outs {
            out: vec![0.0; c.t() * hs * dv],
            state: vec![0.0; n * hs * dk * dv],
            partial: vec![0.0; n * hs * DOT_SLOTS],
        };
        for (si, seq) in c.seqs().iter().enumerate() {
            for h in 0..hs {
                let lam = (-c.slopes[h]).exp();
                let sbase = (si * hs + h) * dk * dv;
                let mut r = if c.state_in {
                    d.s_in[sbase..sbase + dk * dv].to_vec()
                } else {
                    vec![0.0; dk * dv]
                };
                let order: Vec<usize> = if c.reverse {
                    (0..seq.len).rev().collect()
                } else {
                    (0..seq.len).collect()
                };
                for (step, &u) in order.iter().enumerate() {
                    let t = seq.start + u;
                    let (qo, vo) = ((t * hs + h) * dk, (t * hs + h) * dv);
                    let decay = if c.reverse && step == 0 { 1.0 } else { lam };
                    for a in 0..dk {
                        for e in 0..dv {
                            r[a * dv + e] =
                                decay * r[a * dv + e] + c.beta * d.k[qo + a] * d.v[vo + e];
                        }
                    }
                    for e in 0..dv {
                        let y: f64 =
                            (0..dk).map(|a| d.q[qo + a] * r[a * dv + e]).sum::<f64>() * c.gamma;
                        o.out[vo + e] = y;
                        o.partial[(si * hs + h) * DOT_SLOTS + e / TILE] +=
                            (u + 1) as f64 * d.x[vo + e] * y;
                    }
                }
                if c.reverse && seq.len > 0 {
                    r.iter_mut().for_each(|x| *x *= lam);
                }
                o.state[sbase..sbase + dk * dv].copy_from_slice(&r);
            }
        }
        o
    }

    /// Runs la_pass with inputs of type I (f64 data converted) and returns f64 outputs.
    fn kernel<I: Input>(c: &Case, d: &Data, dtype: DType, sdtype: DType, isa: Isa) -> Outs {
        let (hs, dk, dv, n) = (c.heads(), c.dk, c.dv, c.lens.len());
        let packed = c.seqs();
        let (bsz, tp, seqs) = if c.batched {
            let seqs: Vec<Seq> = (c.lens.iter().enumerate())
                .map(|(batch, &len)| Seq {
                    batch,
                    start: 0,
                    len,
                })
                .collect();
            (n, c.lens.iter().copied().max().unwrap_or(0), seqs)
        } else {
            (1, c.t(), packed.clone())
        };
        // Physical row (batch·T + t) of each logical token.
        let rows: Vec<usize> = (packed.iter().zip(&seqs))
            .flat_map(|(_, s)| (0..s.len).map(move |u| s.batch * tp + s.start + u))
            .collect();
        let place = |a: &[f64], dd: usize| -> Vec<I> {
            let mut p = vec![I::store(I::A::ZERO); bsz * tp * hs * dd];
            for (t, &r) in rows.iter().enumerate() {
                for i in 0..hs * dd {
                    p[r * hs * dd + i] = I::store(I::A::of(a[t * hs * dd + i]));
                }
            }
            p
        };
        let scvt = |a: &[f64]| a.iter().map(|&x| I::A::of(x)).collect::<Vec<I::A>>();
        let (mut q, mut k, mut v, mut x) = (
            place(&d.q, dk),
            place(&d.k, dk),
            place(&d.v, dv),
            place(&d.x, dv),
        );
        let mut out = place(&vec![0.0; c.t() * hs * dv], dv);
        let mut slopes = scvt(&c.slopes);
        let sshape = [n, hs, dk, dv];
        let (mut s_in, sin_strides) = if c.transposed {
            let mut tr = vec![0.0; n * hs * dk * dv];
            for nh in 0..n * hs {
                for a in 0..dk {
                    for e in 0..dv {
                        tr[(nh * dv + e) * dk + a] = d.s_in[(nh * dk + a) * dv + e];
                    }
                }
            }
            let st = contiguous(&[n, hs, dv, dk]);
            (scvt(&tr), vec![st[0], st[1], st[3], st[2]])
        } else {
            (scvt(&d.s_in), contiguous(&sshape))
        };
        let mut s_out = scvt(&vec![0.0; n * hs * dk * dv]);
        let mut partial = scvt(&vec![0.0; n * hs * DOT_SLOTS]);

        let (qshape, vshape) = ([bsz, tp, hs, dk], [bsz, tp, hs, dv]);
        let (tq, tv) = (contiguous(&qshape), contiguous(&vshape));
        // All heads of k hold the same values in this case, so head 0 can serve them all.
        let tk = if c.shared_k {
            vec![tq[0], tq[1], 0, tq[3]]
        } else {
            tq.clone()
        };
        let qv = view(&mut q, dtype, &qshape, &tq);
        let kv = view(&mut k, dtype, &qshape, &tk);
        let vv = view(&mut v, dtype, &vshape, &tv);
        let ov = view(&mut out, dtype, &vshape, &tv);
        let xv = view(&mut x, dtype, &vshape, &tv);
        let slv = view(&mut slopes, sdtype, &[hs], &[1]);
        let siv = view(&mut s_in, sdtype, &sshape, &sin_strides);
        let sov = view(&mut s_out, sdtype, &sshape, &contiguous(&sshape));
        let pshape = [n, hs, DOT_SLOTS];
        let pv = view(&mut partial, sdtype, &pshape, &contiguous(&pshape));
        let pass = LaPass {
            q: &qv,
            k: &kv,
            v: &vv,
            out: &ov,
            slopes: &slv,
            state_in: c.state_in.then_some(&siv),
            state_out: c.state_out.then_some(&sov),
            dot: c.dot.then_some((&xv, &pv)),
            seqs: &seqs,
            reverse: c.reverse,
            scale_out: c.gamma,
            scale_kv: c.beta,
        };
        la_pass_on(&pass, isa);
        let mut got = vec![0.0; c.t() * hs * dv];
        for (t, &r) in rows.iter().enumerate() {
            for i in 0..hs * dv {
                got[t * hs * dv + i] = out[r * hs * dv + i].load::<f64>();
            }
        }
        Outs {
            out: got,
            state: s_out.iter().map(|x| x.f64()).collect(),
            partial: partial.iter().map(|x| x.f64()).collect(),
        }
    }

    fn close(what: &str, got: &[f64], want: &[f64], tol: f64) {
        let scale = want.iter().fold(1e-30f64, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
        assert!(
            err <= tol * scale,
            "{what}: max error {err:e} vs scale {scale:e}"
        );
    }

    /// Every micro-kernel flavour this machine can run.
    fn isas() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Base];
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2_fma() {
            isas.push(Isa::Avx2);
        }
        isas
    }

    fn check<I: Input>(c: &Case, dtype: DType, sdtype: DType, round: fn(f64) -> f64, tol: f64) {
        let d = data(c, 0x9e37_79b9_7f4a_7c15 ^ c.dk as u64, round);
        let want = reference(c, &d);
        for isa in isas() {
            let got = kernel::<I>(c, &d, dtype, sdtype, isa);
            let what = |name: &str| format!("{name} ({isa:?}, {dtype:?}, reverse {})", c.reverse);
            close(&what("out"), &got.out, &want.out, tol);
            if c.state_out {
                close(&what("state_out"), &got.state, &want.state, tol);
            }
            if c.dot {
                close(&what("partial"), &got.partial, &want.partial, tol);
            }
        }
    }

    const SLOPES: [f64; 5] = [0.0, 1e-5, 0.05, 0.7, 5.0];
    const LENS: [usize; 3] = [2 * BK + 3, 0, 45];

    #[test]
    fn f64_matches_recurrence() {
        for reverse in [false, true] {
            for (state_in, transposed, state_out, dot) in [
                (false, false, false, false),
                (true, false, true, true),
                (true, true, true, false),
                (false, false, true, true),
            ] {
                let c = Case {
                    reverse,
                    state_in,
                    transposed,
                    state_out,
                    dot,
                    ..Case::new(5, 37, &SLOPES, &LENS)
                };
                check::<f64>(&c, DType::F64, DType::F64, |x| x, 1e-10);
            }
        }
    }

    #[test]
    fn f64_shapes_and_strides() {
        for reverse in [false, true] {
            let cases = [
                // One (sequence, head) pair: the value tiles are split over the pool.
                Case::new(3, 200, &[0.05], &[3 * BK]),
                Case::new(1, 1, &[0.3], &[1]),
                Case::new(1, 1, &[0.3], &[BK, 2, BK + 1]),
                Case {
                    shared_k: true,
                    transposed: true,
                    ..Case::new(33, 16, &[0.0, 50.0, 0.2], &[BK + 7, 20])
                },
                Case {
                    batched: true,
                    ..Case::new(7, 33, &[0.1, 2.0], &[BK + 5, 3, 0, 2 * BK])
                },
            ];
            for c in cases {
                let c = Case {
                    reverse,
                    state_in: true,
                    state_out: true,
                    dot: true,
                    ..c
                };
                check::<f64>(&c, DType::F64, DType::F64, |x| x, 1e-10);
            }
        }
    }

    #[test]
    fn low_precision_matches_recurrence() {
        for reverse in [false, true] {
            let c = Case {
                reverse,
                state_in: true,
                transposed: true,
                state_out: true,
                dot: true,
                ..Case::new(16, 40, &SLOPES, &LENS)
            };
            check::<f32>(&c, DType::F32, DType::F32, |x| x, 1e-5);
            let bf = |x: f64| half::bf16::from_f64(x).to_f64();
            check::<half::bf16>(&c, DType::BF16, DType::F32, bf, 1e-2);
            let f16 = |x: f64| half::f16::from_f64(x).to_f64();
            check::<half::f16>(&c, DType::F16, DType::F32, f16, 2e-3);
        }
    }

    /// The four pass flavours of forward and backward, f32, B=1, H=8, D=E=64:
    /// `cargo test --release --lib lightning::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_backward_passes_f32() {
        let (hs, d) = (8, 64);
        for t in [2048, 512] {
            let mut rng = Rng(11);
            let shape = [1, t, hs, d];
            let st = contiguous(&shape);
            let sshape = [1, hs, d, d];
            let sst = contiguous(&sshape);
            let mut bufs: Vec<Vec<f32>> = (0..5)
                .map(|_| rng.vec(t * hs * d).iter().map(|&x| x as f32).collect())
                .collect();
            let mut states: Vec<Vec<f32>> = (0..2)
                .map(|_| rng.vec(hs * d * d).iter().map(|&x| x as f32).collect())
                .collect();
            let mut partial = vec![0f32; hs * DOT_SLOTS];
            let mut slopes: Vec<f32> = (0..hs)
                .map(|h| (-8.0 * (h + 1) as f32 / hs as f32).exp2())
                .collect();
            let [q, k, v, o, x] = &mut bufs[..] else {
                unreachable!()
            };
            let [s_in, s_out] = &mut states[..] else {
                unreachable!()
            };
            let (qv, kv, vv, ov, xv) = (
                view(q, DType::F32, &shape, &st),
                view(k, DType::F32, &shape, &st),
                view(v, DType::F32, &shape, &st),
                view(o, DType::F32, &shape, &st),
                view(x, DType::F32, &shape, &st),
            );
            let siv = view(s_in, DType::F32, &sshape, &sst);
            let sit = view(s_in, DType::F32, &sshape, &[sst[0], sst[1], sst[3], sst[2]]);
            let sov = view(s_out, DType::F32, &sshape, &sst);
            let pshape = [1, hs, DOT_SLOTS];
            let pv = view(&mut partial, DType::F32, &pshape, &contiguous(&pshape));
            let slv = view(&mut slopes, DType::F32, &[hs], &[1]);
            let seqs = [Seq {
                batch: 0,
                start: 0,
                len: t,
            }];
            let fwd = LaPass {
                q: &qv,
                k: &kv,
                v: &vv,
                out: &ov,
                slopes: &slv,
                state_in: None,
                state_out: None,
                dot: None,
                seqs: &seqs,
                reverse: false,
                scale_out: 1.0,
                scale_kv: 1.0,
            };
            let fwd_dot = LaPass {
                dot: Some((&xv, &pv)),
                ..fwd
            };
            let rev_dot_t = LaPass {
                state_in: Some(&sit),
                reverse: true,
                ..fwd_dot
            };
            let rev_dot = LaPass {
                state_in: None,
                ..rev_dot_t
            };
            let rev_state = LaPass {
                state_in: Some(&siv),
                state_out: Some(&sov),
                dot: None,
                ..rev_dot_t
            };
            let rev_plain = LaPass {
                reverse: true,
                ..fwd
            };
            let passes = [
                ("fwd", &fwd),
                ("fwd+dot", &fwd_dot),
                ("rev+dot", &rev_dot),
                ("rev+dot+S_inT", &rev_dot_t),
                ("rev", &rev_plain),
                ("rev+S_in+S_out", &rev_state),
            ];
            for (name, pass) in passes {
                la_pass(pass);
                let mut times: Vec<f64> = (0..25)
                    .map(|_| {
                        let t0 = std::time::Instant::now();
                        la_pass(pass);
                        t0.elapsed().as_secs_f64()
                    })
                    .collect();
                times.sort_by(f64::total_cmp);
                println!(
                    "T={t} {name:>16}: best {:.2} ms, median {:.2} ms ({} threads)",
                    times[0] * 1e3,
                    times[times.len() / 2] * 1e3,
                    POOL.current_num_threads(),
                );
            }
        }
    }

    /// `cargo test --release --lib lightning::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_forward_f32() {
        let (t, hs, d) = (4096, 8, 128);
        let mut rng = Rng(7);
        let shape = [1, t, hs, d];
        let st = contiguous(&shape);
        let mut bufs: Vec<Vec<f32>> = (0..4)
            .map(|_| rng.vec(t * hs * d).iter().map(|&x| x as f32).collect())
            .collect();
        let mut slopes: Vec<f32> = (0..hs)
            .map(|h| (-8.0 * (h + 1) as f32 / hs as f32).exp2())
            .collect();
        let [q, k, v, o] = &mut bufs[..] else {
            unreachable!()
        };
        let (qv, kv, vv, ov) = (
            view(q, DType::F32, &shape, &st),
            view(k, DType::F32, &shape, &st),
            view(v, DType::F32, &shape, &st),
            view(o, DType::F32, &shape, &st),
        );
        let slv = view(&mut slopes, DType::F32, &[hs], &[1]);
        let seqs = [Seq {
            batch: 0,
            start: 0,
            len: t,
        }];
        let pass = LaPass {
            q: &qv,
            k: &kv,
            v: &vv,
            out: &ov,
            slopes: &slv,
            state_in: None,
            state_out: None,
            dot: None,
            seqs: &seqs,
            reverse: false,
            scale_out: 1.0,
            scale_kv: 1.0,
        };
        la_pass(&pass);
        let mut times: Vec<f64> = (0..15)
            .map(|_| {
                let t0 = std::time::Instant::now();
                la_pass(&pass);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        // Per head: intra Q Kᵀ and A V (2·T·BK·D each), inter Q S and state update (4·T·D·E).
        let flops = (hs * (2 * t * BK * d * 2 + 4 * t * d * d)) as f64;
        println!(
            "la_pass fwd f32 B=1 H={hs} T={t} D=E={d}, {} threads: best {:.2} ms, median {:.2} ms, {:.1} GFLOP/s (best)",
            POOL.current_num_threads(),
            times[0] * 1e3,
            times[times.len() / 2] * 1e3,
            flops / times[0] / 1e9
        );
    }
}
