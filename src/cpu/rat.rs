//! RAT chunked attention on the CPU (docs/api/rat.md).
//!
//! Per sequence and head, with chunk size L, chunk c = ⌊t/L⌋, scale s:
//!
//!   k̃_t = g_t ⊙ k̃_{t−1} + (1 − g_t) ⊙ k_t   (same for ṽ; reset at every chunk start)
//!   K̃_j, Ṽ_j = the states at offset L − 1 of chunk j
//!   y_t = softmax_j([s·R_c q_t·R_j K̃_j]_{j<c} ∪ [s·q_t·k̃_t]) · ([Ṽ_j]_{j<c} ∪ [ṽ_t])
//!
//! (R_c = chunk RoPE; the own-state score needs no rotation, both sides turn by the same angle.)
//!
//! Forward: pass 1, rayon over (sequence, head), scans the sequence and writes every chunk's
//! final state (un-rotated, state dtype) to `ks`/`vs`; pass 2, rayon over (sequence, head,
//! tile of query chunks), rotates the visible final states once per tile, rescans its chunks
//! and, per query, takes an exact-max softmax over the earlier states plus its own state
//! (scores in a row buffer: max, exp, sum; so the max is the true one), writing y and the lse.
//!
//! Backward (from the saved final states and lse, partial states recomputed): pass 1, rayon
//! over (sequence, head, split of the query tiles), writes dq and accumulates dK̃_j, dṼ_j of
//! the earlier states into a buffer per split; pass 2, rayon over (sequence, head), sums the
//! splits, rescans each chunk (states kept for one chunk), adds the own-state gradients and
//! runs the reverse scan for dk, dv, dg.
//!
//! Memory: O(tile · D) per work item, O(T/L · D) per (sequence, head) for the state buffers;
//! never O(T²).

use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::num::{by_dtype, Acc, Input};
use crate::cpu::POOL;
use crate::tensor::View;
use rayon::prelude::*;

/// One sequence of a (possibly packed) batch: batch row, first token, length, and the index of
/// its first chunk in the chunk axis of the state tensors.
#[derive(Clone, Copy, Debug)]
pub struct Seq {
    pub batch: usize,
    pub start: usize,
    pub len: usize,
    pub chunk0: usize,
}

/// Arguments shared by the forward and the backward. Shapes were validated by the caller.
pub struct RatArgs<'a> {
    /// q, k, v: [B, T, H, D] input dtype; g: [B, T, H, D] input dtype or float32.
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub g: &'a View,
    /// [B, T, H, D] input dtype (written by the forward, read by the backward).
    pub out: &'a View,
    /// out's rounding residual, like out (16-bit outputs a backward will need), or None.
    pub out_lo: Option<&'a View>,
    /// [B, T, H], state dtype.
    pub lse: &'a View,
    /// Chunk-final states [B, C, H, D], state dtype.
    pub ks: &'a View,
    pub vs: &'a View,
    pub seqs: &'a [Seq],
    pub chunk: usize,
    pub scale: f64,
    pub rope_theta: Option<f64>,
}

/// Gradients written by the backward.
pub struct RatGrads<'a> {
    pub dout: &'a View,
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub dg: &'a View,
}

/// Queries per forward tile (rounded to whole chunks).
const TILE_QUERIES: usize = 64;

/// First element of row `idx` (all but the last index) of `v`.
///
/// # Safety
/// `idx` inside the view; `I` its dtype.
#[inline(always)]
unsafe fn row_start<I>(v: &View, idx: &[usize]) -> *mut I {
    let mut full = [0usize; 4];
    full[..idx.len()].copy_from_slice(idx);
    unsafe { v.at::<I>(&full[..idx.len() + 1]) }
}

/// dst = v[idx, 0..dst.len()] upcast, whatever v's dtype.
///
/// # Safety
/// `idx` (all but the last index) addresses a row of at least dst.len() elements whose last
/// stride is 1 (or the row has one element).
#[inline]
unsafe fn load<A: Acc>(v: &View, idx: &[usize], dst: &mut [A]) {
    let n = dst.len();
    by_dtype!(v.dtype, "rat", I => {
        let s = unsafe { std::slice::from_raw_parts(row_start::<I>(v, idx), n) };
        dst.iter_mut().zip(s).for_each(|(d, &x)| *d = x.load());
    })
}

/// v[idx, 0..src.len()] = src rounded to v's dtype.
///
/// # Safety
/// As for `load`, and no other thread touches that row.
#[inline]
unsafe fn store<A: Acc>(v: &View, idx: &[usize], src: &[A]) {
    let n = src.len();
    by_dtype!(v.dtype, "rat", I => {
        let d = unsafe { std::slice::from_raw_parts_mut(row_start::<I>(v, idx), n) };
        d.iter_mut().zip(src).for_each(|(d, &x)| *d = I::store(x));
    })
}

/// Output row `idx` = src rounded, and its rounding residual into out_lo when the forward keeps
/// one.
///
/// # Safety
/// As for `store`.
#[inline]
unsafe fn store_output<A: Acc>(p: &RatArgs, idx: &[usize], src: &[A]) {
    let Some(out_lo) = p.out_lo else {
        return unsafe { store(p.out, idx, src) };
    };
    let n = src.len();
    by_dtype!(p.out.dtype, "rat", I => {
        let hi = unsafe { std::slice::from_raw_parts_mut(row_start::<I>(p.out, idx), n) };
        let lo = unsafe { std::slice::from_raw_parts_mut(row_start::<I>(out_lo, idx), n) };
        for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(src) {
            (*h, *l) = I::store_split(x);
        }
    })
}

/// y = output row `idx`: out plus out_lo when the forward kept it, so that Δ = dy·y carries the
/// output before its 16-bit rounding (which cancels badly for nearly one-hot rows).
///
/// # Safety
/// As for `load`.
#[inline]
unsafe fn load_output<A: Acc>(p: &RatArgs, idx: &[usize], y: &mut [A]) {
    unsafe { load(p.out, idx, y) };
    let Some(out_lo) = p.out_lo else {
        return;
    };
    let n = y.len();
    by_dtype!(out_lo.dtype, "rat", I => {
        let lo = unsafe { std::slice::from_raw_parts(row_start::<I>(out_lo, idx), n) };
        y.iter_mut().zip(lo).for_each(|(d, &x)| *d += x.load());
    })
}

/// A scalar of a [B, T, H] tensor in the state dtype.
///
/// # Safety
/// Index inside the view; `A` is its dtype.
#[inline(always)]
unsafe fn scalar<A: Acc>(v: &View, b: usize, t: usize, h: usize) -> *mut A {
    unsafe { v.at::<A>(&[b, t, h]) }
}

/// Σ a_i b_i with eight independent partial sums (so that it vectorises without fast-math).
#[inline(always)]
fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [A::ZERO; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = A::ZERO;
    for (&x, &y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// y += a·x
#[inline(always)]
fn axpy<A: Acc>(a: A, x: &[A], y: &mut [A]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x);
}

/// cos/sin of the chunk angles c·θ_i, θ_i = base^(−2i/D), for c < chunks, i < D/2
/// (computed in f64, then rounded).
struct Rope<A> {
    half: usize,
    cos: Vec<A>,
    sin: Vec<A>,
}

impl<A: Acc> Rope<A> {
    fn new(base: Option<f64>, d: usize, chunks: usize) -> Option<Self> {
        let base = base?;
        let half = d / 2;
        let mut cos = Vec::with_capacity(chunks * half);
        let mut sin = Vec::with_capacity(chunks * half);
        for c in 0..chunks {
            for i in 0..half {
                let theta = base.powf(-2.0 * i as f64 / d as f64);
                let (s, co) = (c as f64 * theta).sin_cos();
                cos.push(A::of(co));
                sin.push(A::of(s));
            }
        }
        Some(Rope { half, cos, sin })
    }

    /// out = R(c)·x (rotate_half convention), or R(c)ᵀ·x with `transpose`.
    #[inline]
    fn apply(&self, c: usize, x: &[A], out: &mut [A], transpose: bool) {
        let h = self.half;
        let cs = &self.cos[c * h..(c + 1) * h];
        let sn = &self.sin[c * h..(c + 1) * h];
        let (x1, x2) = x.split_at(h);
        let (o1, o2) = out.split_at_mut(h);
        if transpose {
            for i in 0..h {
                o1[i] = x1[i] * cs[i] + x2[i] * sn[i];
                o2[i] = x2[i] * cs[i] - x1[i] * sn[i];
            }
        } else {
            for i in 0..h {
                o1[i] = x1[i] * cs[i] - x2[i] * sn[i];
                o2[i] = x2[i] * cs[i] + x1[i] * sn[i];
            }
        }
    }
}

/// x rotated by chunk c (a copy when RoPE is off).
#[inline]
fn rotate<A: Acc>(rope: &Option<Rope<A>>, c: usize, x: &[A], out: &mut [A], transpose: bool) {
    match rope {
        Some(r) => r.apply(c, x, out, transpose),
        None => out.copy_from_slice(x),
    }
}

/// One gated scan step: h = g ⊙ h + (1 − g) ⊙ x.
#[inline(always)]
fn step<A: Acc>(h: &mut [A], g: &[A], x: &[A]) {
    for ((h, &g), &x) in h.iter_mut().zip(g).zip(x) {
        *h = g * *h + (A::ONE - g) * x;
    }
}

/// Rows of a query block in the blocked score products.
const ROWS: usize = 64;
/// States per block of the backward's score products.
const STATES: usize = 64;

/// dst[c × r] = srcᵀ for src[r × c] (row-major).
fn transpose<A: Copy>(src: &[A], r: usize, c: usize, dst: &mut [A]) {
    for i in 0..r {
        for j in 0..c {
            dst[j * r + i] = src[i * c + j];
        }
    }
}

fn chunks_of(len: usize, l: usize) -> usize {
    len.div_ceil(l)
}

fn max_chunks(p: &RatArgs) -> usize {
    p.seqs
        .iter()
        .map(|s| chunks_of(s.len, p.chunk))
        .max()
        .unwrap_or(0)
}

pub fn forward(p: &RatArgs) {
    by_dtype!(p.q.dtype, "rat", I, A => forward_on::<A>(p))
}

pub fn backward(p: &RatArgs, gr: &RatGrads) {
    by_dtype!(p.q.dtype, "rat", I, A => backward_on::<A>(p, gr))
}

/// Pass 1 of the forward: every chunk's final state of sequence n, head h.
///
/// # Safety
/// Validated views; (n, h) owns its state rows.
unsafe fn final_states<A: Acc>(p: &RatArgs, n: usize, h: usize) {
    let d = p.q.shape[3];
    let s = p.seqs[n];
    let (mut hk, mut hv) = (vec![A::ZERO; d], vec![A::ZERO; d]);
    let (mut x, mut g) = (vec![A::ZERO; d], vec![A::ZERO; d]);
    for c in 0..chunks_of(s.len, p.chunk) {
        hk.fill(A::ZERO);
        hv.fill(A::ZERO);
        let end = ((c + 1) * p.chunk).min(s.len);
        for t in c * p.chunk..end {
            let row = [s.batch, s.start + t, h];
            unsafe {
                load(p.g, &row, &mut g);
                load(p.k, &row, &mut x);
                step(&mut hk, &g, &x);
                load(p.v, &row, &mut x);
            }
            step(&mut hv, &g, &x);
        }
        let srow = [s.batch, s.chunk0 + c, h];
        unsafe {
            store(p.ks, &srow, &hk);
            store(p.vs, &srow, &hv);
        }
    }
}

/// Rotated keys and values of the final states 0..nstates (row-major nstates × D).
///
/// # Safety
/// Validated views.
unsafe fn load_states<A: Acc>(
    p: &RatArgs,
    rope: &Option<Rope<A>>,
    s: &Seq,
    h: usize,
    nstates: usize,
    kr: &mut Vec<A>,
    vf: &mut Vec<A>,
) {
    let d = p.q.shape[3];
    kr.resize(nstates * d, A::ZERO);
    vf.resize(nstates * d, A::ZERO);
    let mut tmp = vec![A::ZERO; d];
    for j in 0..nstates {
        let srow = [s.batch, s.chunk0 + j, h];
        unsafe {
            load(p.ks, &srow, &mut tmp);
            load(p.vs, &srow, &mut vf[j * d..(j + 1) * d]);
        }
        rotate(rope, j, &tmp, &mut kr[j * d..(j + 1) * d], false);
    }
}

/// Work items of tiles of whole chunks: (sequence, head, first chunk, end chunk).
fn tiles(p: &RatArgs, heads: usize) -> Vec<(usize, usize, usize, usize)> {
    let per = TILE_QUERIES.div_ceil(p.chunk).max(1);
    let mut items = Vec::new();
    for (n, s) in p.seqs.iter().enumerate() {
        let nc = chunks_of(s.len, p.chunk);
        for h in 0..heads {
            for c0 in (0..nc).step_by(per) {
                items.push((n, h, c0, (c0 + per).min(nc)));
            }
        }
    }
    // Later tiles see more states: largest first, so that work stealing evens out.
    items.sort_by_key(|&(_, _, c0, _)| std::cmp::Reverse(c0));
    items
}

fn forward_on<A: Acc>(p: &RatArgs) {
    let (heads, d) = (p.q.shape[2], p.q.shape[3]);
    if p.seqs.is_empty() || heads == 0 || d == 0 {
        return;
    }
    let rope = Rope::<A>::new(p.rope_theta, d, max_chunks(p));
    let pairs: Vec<(usize, usize)> = (0..p.seqs.len())
        .flat_map(|n| (0..heads).map(move |h| (n, h)))
        .collect();
    let items = tiles(p, heads);
    let sc = A::of(p.scale);
    let avx2 = super::has_avx2_fma();
    POOL.install(|| {
        // SAFETY: validated views; every (n, h) writes its own state rows.
        pairs
            .par_iter()
            .for_each(|&(n, h)| unsafe { final_states::<A>(p, n, h) });
        items.par_iter().for_each(|&(n, h, c0, c1)| {
            // SAFETY: validated views; tiles write disjoint rows of out and lse.
            unsafe { forward_tile::<A>(p, &rope, sc, n, h, c0, c1, avx2) }
        });
    });
}

/// Pass 2 of the forward for the query chunks c0..c1 of sequence n, head h.
///
/// # Safety
/// Validated views; the tile owns its out and lse rows.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_tile<A: Acc>(
    p: &RatArgs,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    c0: usize,
    c1: usize,
    avx2: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller checked the CPU features.
        return unsafe { forward_tile_avx2(p, rope, sc, n, h, c0, c1) };
    }
    let _ = avx2;
    unsafe { forward_tile_body(p, rope, sc, n, h, c0, c1) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_tile_avx2<A: Acc>(
    p: &RatArgs,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    c0: usize,
    c1: usize,
) {
    unsafe { forward_tile_body(p, rope, sc, n, h, c0, c1) }
}

/// The forward tile in blocks of `ROWS` queries: scores against every visible final state as
/// one product (exact row max, exp, sum), then the weighted values as a second product.
///
/// # Safety
/// As for `forward_tile`.
#[inline(always)]
unsafe fn forward_tile_body<A: Acc>(
    p: &RatArgs,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    c0: usize,
    c1: usize,
) {
    let d = p.q.shape[3];
    let s = p.seqs[n];
    let l = p.chunk;
    let nstates = c1 - 1; // states visible to the last chunk of the tile
    let (mut kr, mut vf) = (Vec::new(), Vec::new());
    unsafe { load_states(p, rope, &s, h, nstates, &mut kr, &mut vf) };
    let mut krt = vec![A::ZERO; nstates * d];
    transpose(&kr, nstates, d, &mut krt);
    let mut hk = vec![A::ZERO; d];
    let mut hv = vec![A::ZERO; d];
    let mut x = vec![A::ZERO; d];
    let mut g = vec![A::ZERO; d];
    let mut q = vec![A::ZERO; d];
    let mut qr = vec![A::ZERO; ROWS * d];
    let mut acc = vec![A::ZERO; ROWS * d];
    let mut own = [A::ZERO; ROWS];
    let mut rc = [0usize; ROWS];
    let mut inv = [A::ZERO; ROWS];
    let mut scores = vec![A::ZERO; ROWS * nstates];
    let t_end = (c1 * l).min(s.len);
    let mut t0 = c0 * l;
    while t0 < t_end {
        let m = ROWS.min(t_end - t0);
        for i in 0..m {
            let t = t0 + i;
            let c = t / l;
            if t % l == 0 {
                hk.fill(A::ZERO);
                hv.fill(A::ZERO);
            }
            let row = [s.batch, s.start + t, h];
            unsafe {
                load(p.g, &row, &mut g);
                load(p.k, &row, &mut x);
                step(&mut hk, &g, &x);
                load(p.v, &row, &mut x);
                step(&mut hv, &g, &x);
                load(p.q, &row, &mut q);
            }
            own[i] = sc * dot(&q, &hk);
            rc[i] = c;
            rotate(rope, c, &q, &mut qr[i * d..(i + 1) * d], false);
            // the own state's value goes in first, as the first term of the weighted sum
            acc[i * d..(i + 1) * d].copy_from_slice(&hv);
        }
        let nv = rc[m - 1]; // states visible to the block's last row
        if nv > 0 {
            let (qm, km) = (Mat::rows(&qr, d), Mat::rows(&krt, nstates));
            gemm(m, nv, d, qm, km, &mut scores, nv, None);
        }
        for i in 0..m {
            let c = rc[i];
            let srow = &mut scores[i * nv..(i + 1) * nv];
            let mut mx = own[i];
            for sj in srow[..c].iter_mut() {
                *sj = sc * *sj;
                mx = mx.maxf(*sj);
            }
            // exp(−inf − −inf) would be NaN: an all −inf row keeps m finite-free handling.
            let m_safe = if mx == A::NEG_INF { A::ZERO } else { mx };
            let p_own = (own[i] - m_safe).exp();
            let mut sum = p_own;
            for sj in srow[..c].iter_mut() {
                *sj = (*sj - m_safe).exp();
                sum += *sj;
            }
            srow[c..].fill(A::ZERO);
            acc[i * d..(i + 1) * d]
                .iter_mut()
                .for_each(|a| *a = p_own * *a);
            own[i] = m_safe + sum.ln();
            inv[i] = A::ONE / sum;
        }
        // Masked weights are exact zeros but 0·Inf = NaN: the product runs only over the states
        // every row sees, and each row adds its own later states one by one.
        let shared = rc[0];
        if shared > 0 {
            let (pm, vm) = (Mat::rows(&scores, nv), Mat::rows(&vf, d));
            gemm(m, d, shared, pm, vm, &mut acc, d, Some(A::ONE));
        }
        for i in 0..m {
            for j in shared..rc[i] {
                let w = scores[i * nv + j];
                axpy(w, &vf[j * d..(j + 1) * d], &mut acc[i * d..(i + 1) * d]);
            }
        }
        for i in 0..m {
            let tok = s.start + t0 + i;
            let row = [s.batch, tok, h];
            let out = &mut acc[i * d..(i + 1) * d];
            out.iter_mut().for_each(|a| *a = *a * inv[i]);
            unsafe {
                store_output(p, &row, out);
                *scalar::<A>(p.lse, s.batch, tok, h) = own[i];
            }
        }
        t0 += m;
    }
}

fn backward_on<A: Acc>(p: &RatArgs, gr: &RatGrads) {
    let (heads, d) = (p.q.shape[2], p.q.shape[3]);
    if p.seqs.is_empty() || heads == 0 || d == 0 {
        return;
    }
    let rope = Rope::<A>::new(p.rope_theta, d, max_chunks(p));
    let sc = A::of(p.scale);
    let pairs: Vec<(usize, usize)> = (0..p.seqs.len())
        .flat_map(|n| (0..heads).map(move |h| (n, h)))
        .collect();
    // Splits of each (sequence, head): enough items to fill the pool, each with its own
    // dK̃/dṼ buffer; tiles are dealt round-robin so that splits see similar work.
    let threads = POOL.current_num_threads();
    let splits = if pairs.len() >= threads {
        1
    } else {
        (2 * threads).div_ceil(pairs.len().max(1))
    };
    let per = TILE_QUERIES.div_ceil(p.chunk).max(1);
    let avx2 = super::has_avx2_fma();
    let items: Vec<(usize, usize, usize)> = pairs
        .iter()
        .flat_map(|&(n, h)| (0..splits).map(move |sp| (n, h, sp)))
        .collect();
    POOL.install(|| {
        let partial: Vec<(Vec<A>, Vec<A>)> = items
            .par_iter()
            .map(|&(n, h, sp)| {
                // SAFETY: validated views; splits write disjoint dq rows.
                unsafe { backward_queries::<A>(p, gr, &rope, sc, n, h, sp, splits, per, avx2) }
            })
            .collect();
        pairs.par_iter().enumerate().for_each(|(i, &(n, h))| {
            let parts = &partial[i * splits..(i + 1) * splits];
            // SAFETY: validated views; (n, h) owns its dk, dv, dg rows.
            unsafe { backward_scan::<A>(p, gr, &rope, sc, n, h, parts) }
        });
    });
}

/// Pass 1 of the backward: dq for the query tiles sp, sp + splits, … of (n, h), and this
/// split's dK̃ (rotated frame) and dṼ of the final states.
///
/// # Safety
/// Validated views; the split owns its dq rows.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_queries<A: Acc>(
    p: &RatArgs,
    gr: &RatGrads,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    sp: usize,
    splits: usize,
    per: usize,
    avx2: bool,
) -> (Vec<A>, Vec<A>) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller checked the CPU features.
        return unsafe { backward_queries_avx2(p, gr, rope, sc, n, h, sp, splits, per) };
    }
    let _ = avx2;
    unsafe { backward_queries_body(p, gr, rope, sc, n, h, sp, splits, per) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_queries_avx2<A: Acc>(
    p: &RatArgs,
    gr: &RatGrads,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    sp: usize,
    splits: usize,
    per: usize,
) -> (Vec<A>, Vec<A>) {
    unsafe { backward_queries_body(p, gr, rope, sc, n, h, sp, splits, per) }
}

/// The backward's query pass in blocks of `ROWS` queries × `STATES` final states: the scores
/// S = Q̃K̃ᵀ and dP = dY·Ṽᵀ, then dA = P ⊙ (dP − Δ) (zero where a query does not see the
/// state), dQ̃ += dA·K̃, dK̃ += dAᵀ·Q̃ and dṼ += Pᵀ·dY, each a small matrix product.
///
/// # Safety
/// As for `backward_queries`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_queries_body<A: Acc>(
    p: &RatArgs,
    gr: &RatGrads,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    sp: usize,
    splits: usize,
    per: usize,
) -> (Vec<A>, Vec<A>) {
    let d = p.q.shape[3];
    let s = p.seqs[n];
    let l = p.chunk;
    let nc = chunks_of(s.len, l);
    let nstates = nc.saturating_sub(1);
    let mut dkr = vec![A::ZERO; nstates * d];
    let mut dvf = vec![A::ZERO; nstates * d];
    let my_tiles: Vec<usize> = (0..nc).step_by(per).skip(sp).step_by(splits).collect();
    let Some(&last) = my_tiles.last() else {
        return (dkr, dvf);
    };
    let visible = ((last + per).min(nc)) - 1;
    let (mut kr, mut vf) = (Vec::new(), Vec::new());
    unsafe { load_states(p, rope, &s, h, visible, &mut kr, &mut vf) };
    let (mut krt, mut vft) = (vec![A::ZERO; visible * d], vec![A::ZERO; visible * d]);
    transpose(&kr, visible, d, &mut krt);
    transpose(&vf, visible, d, &mut vft);
    let v4 = || vec![A::ZERO; d];
    let (mut hk, mut hv, mut x, mut g) = (v4(), v4(), v4(), v4());
    let (mut q, mut y) = (v4(), v4());
    let vr = || vec![A::ZERO; ROWS * d];
    let (mut qr, mut dyb, mut dqo, mut dqr) = (vr(), vr(), vr(), vr());
    let vs = || vec![A::ZERO; ROWS * STATES];
    let (mut sbuf, mut dpbuf, mut pt, mut at) = (vs(), vs(), vs(), vs());
    let mut delta = [A::ZERO; ROWS];
    let mut lse = [A::ZERO; ROWS];
    let mut rc = [0usize; ROWS];
    for &c0 in &my_tiles {
        let t_end = ((c0 + per).min(nc) * l).min(s.len);
        let mut t0 = c0 * l;
        while t0 < t_end {
            let m = ROWS.min(t_end - t0);
            for i in 0..m {
                let t = t0 + i;
                let c = t / l;
                if t % l == 0 {
                    hk.fill(A::ZERO);
                    hv.fill(A::ZERO);
                }
                let tok = s.start + t;
                let row = [s.batch, tok, h];
                let dy = &mut dyb[i * d..(i + 1) * d];
                unsafe {
                    load(p.g, &row, &mut g);
                    load(p.k, &row, &mut x);
                    step(&mut hk, &g, &x);
                    load(p.v, &row, &mut x);
                    step(&mut hv, &g, &x);
                    load(p.q, &row, &mut q);
                    load(gr.dout, &row, dy);
                    load_output(p, &row, &mut y);
                    lse[i] = *scalar::<A>(p.lse, s.batch, tok, h);
                }
                delta[i] = dot(dy, &y);
                // chunk 0: the own state is the only term, P_own = 1 and dA_own = 0 exactly
                // (dy·v~ − Δ from a rounded y would leave a spurious dq)
                let da_own = if c == 0 {
                    A::ZERO
                } else {
                    let p_own = (sc * dot(&q, &hk) - lse[i]).exp();
                    p_own * (dot(dy, &hv) - delta[i])
                };
                dqo[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&hk)
                    .for_each(|(o, &k)| *o = sc * da_own * k);
                rc[i] = c;
                rotate(rope, c, &q, &mut qr[i * d..(i + 1) * d], false);
            }
            let nv = rc[m - 1]; // states visible to the block's last row
            dqr[..m * d].fill(A::ZERO);
            for j0 in (0..nv).step_by(STATES) {
                let nb = STATES.min(nv - j0);
                let (qm, km) = (Mat::rows(&qr, d), Mat::rows(&krt[j0..], visible));
                gemm(m, nb, d, qm, km, &mut sbuf, nb, None);
                let (dym, vm) = (Mat::rows(&dyb, d), Mat::rows(&vft[j0..], visible));
                gemm(m, nb, d, dym, vm, &mut dpbuf, nb, None);
                for i in 0..m {
                    // states j0 + jj with jj < w are visible to row i
                    let w = rc[i].saturating_sub(j0).min(nb);
                    let srow = &mut sbuf[i * nb..(i + 1) * nb];
                    let dprow = &dpbuf[i * nb..(i + 1) * nb];
                    let (li, di) = (lse[i], delta[i]);
                    for jj in 0..w {
                        let pj = (sc * srow[jj] - li).exp();
                        let da = sc * (pj * (dprow[jj] - di));
                        srow[jj] = da;
                        pt[jj * m + i] = pj;
                        at[jj * m + i] = da;
                    }
                    for jj in w..nb {
                        srow[jj] = A::ZERO;
                        pt[jj * m + i] = A::ZERO;
                        at[jj * m + i] = A::ZERO;
                    }
                }
                // As in the forward: products over the states every row sees, then each row's
                // own later states one by one (no 0·Inf across the causal mask).
                let shared = rc[0].saturating_sub(j0).min(nb);
                let one = Some(A::ONE);
                let (sm, km) = (Mat::rows(&sbuf, nb), Mat::rows(&kr[j0 * d..], d));
                gemm(m, d, shared, sm, km, &mut dqr, d, one);
                let (am, qm) = (Mat::rows(&at, m), Mat::rows(&qr, d));
                gemm(shared, d, m, am, qm, &mut dkr[j0 * d..], d, one);
                let (pm, dym) = (Mat::rows(&pt, m), Mat::rows(&dyb, d));
                gemm(shared, d, m, pm, dym, &mut dvf[j0 * d..], d, one);
                for i in 0..m {
                    let w = rc[i].saturating_sub(j0).min(nb);
                    let (qi, dyi) = (&qr[i * d..(i + 1) * d], &dyb[i * d..(i + 1) * d]);
                    for jj in shared..w {
                        let j = j0 + jj;
                        let (da, pj) = (at[jj * m + i], pt[jj * m + i]);
                        axpy(da, &kr[j * d..(j + 1) * d], &mut dqr[i * d..(i + 1) * d]);
                        axpy(da, qi, &mut dkr[j * d..(j + 1) * d]);
                        axpy(pj, dyi, &mut dvf[j * d..(j + 1) * d]);
                    }
                }
            }
            for i in 0..m {
                let tok = s.start + t0 + i;
                let row = [s.batch, tok, h];
                let dq = &mut dqo[i * d..(i + 1) * d];
                if rc[i] > 0 {
                    rotate(rope, rc[i], &dqr[i * d..(i + 1) * d], &mut x, true);
                    dq.iter_mut().zip(&x).for_each(|(o, &v)| *o += v);
                }
                unsafe { store(gr.dq, &row, dq) };
            }
            t0 += m;
        }
    }
    (dkr, dvf)
}

/// Pass 2 of the backward for (n, h): own-state gradients, the final-state gradients at offset
/// L − 1, and the reverse scan to dk, dv, dg.
///
/// # Safety
/// Validated views; (n, h) owns its dk, dv, dg rows.
unsafe fn backward_scan<A: Acc>(
    p: &RatArgs,
    gr: &RatGrads,
    rope: &Option<Rope<A>>,
    sc: A,
    n: usize,
    h: usize,
    parts: &[(Vec<A>, Vec<A>)],
) {
    let d = p.q.shape[3];
    let s = p.seqs[n];
    let l = p.chunk;
    let nc = chunks_of(s.len, l);
    let nstates = nc.saturating_sub(1);
    // Sum the splits, and turn dK̃ back to the un-rotated frame.
    let mut dks = vec![A::ZERO; nstates * d];
    let mut dvs = vec![A::ZERO; nstates * d];
    for (pk, pv) in parts {
        axpy(A::ONE, pk, &mut dks);
        axpy(A::ONE, pv, &mut dvs);
    }
    let mut tmp = vec![A::ZERO; d];
    for j in 0..nstates {
        tmp.copy_from_slice(&dks[j * d..(j + 1) * d]);
        rotate(rope, j, &tmp, &mut dks[j * d..(j + 1) * d], true);
    }
    let cl = l.min(s.len.max(1));
    // States of one chunk: hk[l], hv[l] for l in the chunk.
    let mut hks = vec![A::ZERO; cl * d];
    let mut hvs = vec![A::ZERO; cl * d];
    let v4 = || vec![A::ZERO; d];
    let (mut x, mut g, mut q, mut dy, mut y) = (v4(), v4(), v4(), v4(), v4());
    let (mut lk, mut lv, mut gnext) = (v4(), v4(), v4());
    let (mut dxk, mut dxv, mut dgr) = (v4(), v4(), v4());
    let zero = v4();
    for c in 0..nc {
        let t0 = c * l;
        let m = ((c + 1) * l).min(s.len) - t0;
        // forward rescan
        let (mut pk, mut pv) = (v4(), v4());
        for i in 0..m {
            let row = [s.batch, s.start + t0 + i, h];
            unsafe {
                load(p.g, &row, &mut g);
                load(p.k, &row, &mut x);
                step(&mut pk, &g, &x);
                load(p.v, &row, &mut x);
                step(&mut pv, &g, &x);
            }
            hks[i * d..(i + 1) * d].copy_from_slice(&pk);
            hvs[i * d..(i + 1) * d].copy_from_slice(&pv);
        }
        // reverse scan: λ_i = dh_i + g_{i+1} λ_{i+1}
        lk.fill(A::ZERO);
        lv.fill(A::ZERO);
        gnext.fill(A::ZERO);
        for i in (0..m).rev() {
            let tok = s.start + t0 + i;
            let row = [s.batch, tok, h];
            let lse;
            unsafe {
                load(p.q, &row, &mut q);
                load(gr.dout, &row, &mut dy);
                load_output(p, &row, &mut y);
                lse = *scalar::<A>(p.lse, s.batch, tok, h);
            }
            let hk = &hks[i * d..(i + 1) * d];
            let hv = &hvs[i * d..(i + 1) * d];
            // chunk 0: P_own = 1 and dA_own = 0 exactly (see pass 1)
            let (p_own, da_own) = if c == 0 {
                (A::ONE, A::ZERO)
            } else {
                let delta = dot(&dy, &y);
                let p_own = (sc * dot(&q, hk) - lse).exp();
                (p_own, p_own * (dot(&dy, hv) - delta))
            };
            // λ ← g_{i+1} λ + own-state gradient (+ final-state gradient at offset L − 1)
            for e in 0..d {
                lk[e] = gnext[e] * lk[e] + sc * da_own * q[e];
                lv[e] = gnext[e] * lv[e] + p_own * dy[e];
            }
            if i == l - 1 && c < nstates {
                axpy(A::ONE, &dks[c * d..(c + 1) * d], &mut lk);
                axpy(A::ONE, &dvs[c * d..(c + 1) * d], &mut lv);
            }
            unsafe { load(p.g, &row, &mut g) };
            let (hk_prev, hv_prev) = if i > 0 {
                (&hks[(i - 1) * d..i * d], &hvs[(i - 1) * d..i * d])
            } else {
                (&zero[..], &zero[..])
            };
            unsafe { load(p.k, &row, &mut x) };
            for e in 0..d {
                dxk[e] = (A::ONE - g[e]) * lk[e];
                dgr[e] = lk[e] * (hk_prev[e] - x[e]);
            }
            unsafe { load(p.v, &row, &mut x) };
            for e in 0..d {
                dxv[e] = (A::ONE - g[e]) * lv[e];
                dgr[e] += lv[e] * (hv_prev[e] - x[e]);
            }
            unsafe {
                store(gr.dk, &row, &dxk);
                store(gr.dv, &row, &dxv);
                store(gr.dg, &row, &dgr);
            }
            gnext.copy_from_slice(&g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, Device};

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

    fn view(buf: &mut [f64], shape: &[usize]) -> View {
        let mut st = vec![1isize; shape.len()];
        for i in (0..shape.len() - 1).rev() {
            st[i] = st[i + 1] * shape[i + 1] as isize;
        }
        View {
            ptr: buf.as_mut_ptr().cast(),
            shape: shape.to_vec(),
            strides: st,
            dtype: DType::F64,
            device: Device::Cpu,
        }
    }

    /// Naive per-token formula (one sequence, one head, [T, D] row-major).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        g: &[f64],
        t: usize,
        d: usize,
        l: usize,
        rope: Option<f64>,
    ) -> Vec<f64> {
        let s = 1.0 / (d as f64).sqrt();
        let rot = |x: &[f64], c: usize| -> Vec<f64> {
            let Some(b) = rope else { return x.to_vec() };
            let h = d / 2;
            let mut o = vec![0.0; d];
            for i in 0..h {
                let a = c as f64 * b.powf(-2.0 * i as f64 / d as f64);
                o[i] = x[i] * a.cos() - x[i + h] * a.sin();
                o[i + h] = x[i + h] * a.cos() + x[i] * a.sin();
            }
            o
        };
        let (mut hk, mut hv) = (vec![vec![0.0; d]; t], vec![vec![0.0; d]; t]);
        for i in 0..t {
            for e in 0..d {
                let (pk, pv) = if i % l == 0 {
                    (0.0, 0.0)
                } else {
                    (hk[i - 1][e], hv[i - 1][e])
                };
                let gg = g[i * d + e];
                hk[i][e] = gg * pk + (1.0 - gg) * k[i * d + e];
                hv[i][e] = gg * pv + (1.0 - gg) * v[i * d + e];
            }
        }
        let mut y = vec![0.0; t * d];
        for i in 0..t {
            let c = i / l;
            let qr = rot(&q[i * d..(i + 1) * d], c);
            let kr = rot(&hk[i], c);
            let mut sc: Vec<(f64, &Vec<f64>)> = vec![(
                s * qr.iter().zip(&kr).map(|(a, b)| a * b).sum::<f64>(),
                &hv[i],
            )];
            for j in 0..c {
                let kj = rot(&hk[j * l + l - 1], j);
                let a = s * qr.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>();
                sc.push((a, &hv[j * l + l - 1]));
            }
            let m = sc.iter().map(|x| x.0).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = sc.iter().map(|x| (x.0 - m).exp()).sum();
            for (a, vv) in &sc {
                for e in 0..d {
                    y[i * d + e] += (a - m).exp() / z * vv[e];
                }
            }
        }
        y
    }

    struct Bufs {
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        g: Vec<f64>,
    }

    fn run_fwd(b: &mut Bufs, t: usize, d: usize, l: usize, rope: Option<f64>) -> Vec<f64> {
        let c = t.div_ceil(l);
        let shape = [1, t, 1, d];
        let (mut out, mut lse) = (vec![0.0; t * d], vec![0.0; t]);
        let (mut ks, mut vs) = (vec![0.0; c * d], vec![0.0; c * d]);
        let seqs = [Seq {
            batch: 0,
            start: 0,
            len: t,
            chunk0: 0,
        }];
        let (qv, kv, vv, gv) = (
            view(&mut b.q, &shape),
            view(&mut b.k, &shape),
            view(&mut b.v, &shape),
            view(&mut b.g, &shape),
        );
        let (ov, lv) = (view(&mut out, &shape), view(&mut lse, &[1, t, 1]));
        let (ksv, vsv) = (view(&mut ks, &[1, c, 1, d]), view(&mut vs, &[1, c, 1, d]));
        forward(&RatArgs {
            q: &qv,
            k: &kv,
            v: &vv,
            g: &gv,
            out: &ov,
            out_lo: None,
            lse: &lv,
            ks: &ksv,
            vs: &vsv,
            seqs: &seqs,
            chunk: l,
            scale: 1.0 / (d as f64).sqrt(),
            rope_theta: rope,
        });
        out
    }

    fn inputs(rng: &mut Rng, t: usize, d: usize) -> Bufs {
        Bufs {
            q: rng.vec(t * d),
            k: rng.vec(t * d),
            v: rng.vec(t * d),
            g: rng.vec(t * d).iter().map(|x| 0.5 + 0.45 * x).collect(),
        }
    }

    #[test]
    fn rat_forward_matches_naive() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for &(t, d, l, rope) in &[
            (37, 8, 4, Some(10000.0)),
            (37, 6, 1, None),
            (20, 4, 20, Some(100.0)),
            (70, 8, 16, Some(10.0)),
        ] {
            let mut b = inputs(&mut rng, t, d);
            let want = naive(&b.q, &b.k, &b.v, &b.g, t, d, l, rope);
            let got = run_fwd(&mut b, t, d, l, rope);
            let err = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "t={t} d={d} l={l}: max err {err}");
        }
    }

    #[test]
    fn rat_backward_matches_finite_differences() {
        let (t, d, l, rope) = (11, 4, 3, Some(10.0));
        let mut rng = Rng(42);
        let mut b = inputs(&mut rng, t, d);
        let w = rng.vec(t * d);
        let loss = |b: &mut Bufs| -> f64 {
            run_fwd(b, t, d, l, rope)
                .iter()
                .zip(&w)
                .map(|(a, b)| a * b)
                .sum()
        };
        // analytic
        let c = t.div_ceil(l);
        let shape = [1, t, 1, d];
        let (mut out, mut lse) = (vec![0.0; t * d], vec![0.0; t]);
        let (mut ks, mut vs) = (vec![0.0; c * d], vec![0.0; c * d]);
        let mut grads = vec![vec![0.0; t * d]; 4];
        let mut dout = w.clone();
        let seqs = [Seq {
            batch: 0,
            start: 0,
            len: t,
            chunk0: 0,
        }];
        {
            let (qv, kv, vv, gv) = (
                view(&mut b.q, &shape),
                view(&mut b.k, &shape),
                view(&mut b.v, &shape),
                view(&mut b.g, &shape),
            );
            let (ov, lv) = (view(&mut out, &shape), view(&mut lse, &[1, t, 1]));
            let (ksv, vsv) = (view(&mut ks, &[1, c, 1, d]), view(&mut vs, &[1, c, 1, d]));
            let args = RatArgs {
                q: &qv,
                k: &kv,
                v: &vv,
                g: &gv,
                out: &ov,
                out_lo: None,
                lse: &lv,
                ks: &ksv,
                vs: &vsv,
                seqs: &seqs,
                chunk: l,
                scale: 1.0 / (d as f64).sqrt(),
                rope_theta: rope,
            };
            forward(&args);
            let dov = view(&mut dout, &shape);
            let gv: Vec<View> = grads.iter_mut().map(|g| view(g, &shape)).collect();
            backward(
                &args,
                &RatGrads {
                    dout: &dov,
                    dq: &gv[0],
                    dk: &gv[1],
                    dv: &gv[2],
                    dg: &gv[3],
                },
            );
        }
        for (which, grad) in grads.iter().enumerate() {
            for (i, &want) in grad.iter().enumerate() {
                let eps = 1e-6;
                let bump = |b: &mut Bufs, by: f64| match which {
                    0 => b.q[i] += by,
                    1 => b.k[i] += by,
                    2 => b.v[i] += by,
                    _ => b.g[i] += by,
                };
                bump(&mut b, eps);
                let up = loss(&mut b);
                bump(&mut b, -2.0 * eps);
                let down = loss(&mut b);
                bump(&mut b, eps);
                let fd = (up - down) / (2.0 * eps);
                assert!(
                    (fd - want).abs() < 1e-6 * (1.0 + fd.abs()),
                    "grad {which} [{i}]: analytic {want} vs fd {fd}"
                );
            }
        }
    }
}
