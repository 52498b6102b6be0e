//! Native Sparse Attention on the CPU (docs/api/nsa.md).
//!
//! The three attention branches (compressed, selected, sliding window) are one kernel: softmax
//! attention of every query over a per-query set of key ranges (`KeySet`). The forward runs an
//! online softmax over key chunks (true running maxima, f32 accumulators, f64 for f64); every
//! key chunk is converted once per query token and shared by the G query heads of its group.
//! The backward recomputes the probabilities from the saved lse; dq rows belong to one work
//! item, dk/dv are accumulated in per-(sequence, kv head, query part) buffers of O(T·D) and
//! summed at the end (no atomics, no O(T²) memory).
//!
//! Work items: forward (sequence, kv head, query tile); backward (sequence, kv head, query
//! part); selection (sequence, kv head, query tile); compression (sequence, head).

use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::num::{by_dtype, vmax, vsum, Acc, Input};
use crate::cpu::{has_avx2_fma, POOL};
use crate::tensor::{DType, View};
use rayon::prelude::*;

/// One sequence: batch row, first token, length, first compressed row, compressed rows.
#[derive(Clone, Copy, Debug)]
pub struct NsaSeq {
    pub batch: usize,
    pub start: usize,
    pub len: usize,
    pub cstart: usize,
    pub clen: usize,
}

/// Number of compression windows of a sequence of `len` tokens.
pub fn num_windows(len: usize, size: usize, stride: usize) -> usize {
    if len >= size {
        (len - size) / stride + 1
    } else {
        0
    }
}

/// Windows visible to local position t (t ≥ i·d + l − 1).
#[inline]
fn num_visible(t: usize, size: usize, stride: usize) -> usize {
    if t + 1 >= size {
        (t + 1 - size) / stride + 1
    } else {
        0
    }
}

/// How many entries of a row of block indices are used.
#[derive(Clone, Copy)]
pub enum Counts<'a> {
    All,
    Const(usize),
    /// [B, T, Hkv] int32/int64
    Per(&'a View),
}

/// Which keys a query attends to.
#[derive(Clone, Copy)]
pub enum KeySet<'a> {
    /// keys max(0, t − W + 1) ..= t
    Window(usize),
    /// compressed rows i with t ≥ i·stride + size − 1 (and i < clen)
    Compressed { size: usize, stride: usize },
    /// union of the selected blocks j ≤ t / block, positions ≤ t
    Selected {
        indices: &'a View,
        block: usize,
        counts: Counts<'a>,
    },
}

#[inline]
unsafe fn read_int(v: &View, idx: &[usize]) -> i64 {
    unsafe {
        match v.dtype {
            DType::I32 => *v.at::<i32>(idx) as i64,
            _ => *v.at::<i64>(idx),
        }
    }
}

impl KeySet<'_> {
    /// First key row of the sequence in the key tensor.
    fn base(&self, s: &NsaSeq) -> usize {
        match self {
            KeySet::Compressed { .. } => s.cstart,
            _ => s.start,
        }
    }

    /// Number of key rows of the sequence.
    fn key_len(&self, s: &NsaSeq) -> usize {
        match self {
            KeySet::Compressed { .. } => s.clen,
            _ => s.len,
        }
    }

    /// Key ranges [lo, hi) (local to the sequence's keys) of query t for kv head g.
    fn ranges(&self, s: &NsaSeq, t: usize, g: usize, out: &mut Vec<(usize, usize)>) {
        out.clear();
        match *self {
            KeySet::Window(w) => out.push(((t + 1).saturating_sub(w), t + 1)),
            KeySet::Compressed { size, stride } => {
                let n = num_visible(t, size, stride).min(s.clen);
                if n > 0 {
                    out.push((0, n));
                }
            }
            KeySet::Selected {
                indices,
                block,
                counts,
            } => {
                let n = indices.shape[3];
                let row = [s.batch, s.start + t, g];
                let count = match counts {
                    Counts::All => n,
                    Counts::Const(c) => c.min(n),
                    // SAFETY: [B, T, Hkv] validated by the caller.
                    Counts::Per(c) => unsafe { read_int(c, &row) }.clamp(0, n as i64) as usize,
                };
                let last = (t / block) as i64;
                for slot in 0..count {
                    // SAFETY: [B, T, Hkv, n] validated by the caller.
                    let j = unsafe { read_int(indices, &[row[0], row[1], row[2], slot]) };
                    if j < 0 || j > last {
                        continue;
                    }
                    let lo = j as usize * block;
                    out.push((lo, ((j as usize + 1) * block).min(t + 1)));
                }
            }
        }
    }
}

#[inline(always)]
fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let mut s = [A::ZERO; 4];
    let n = a.len().min(b.len());
    let (ac, bc) = (a[..n].chunks_exact(4), b[..n].chunks_exact(4));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..4 {
            s[i] += x[i] * y[i];
        }
    }
    let mut tail = A::ZERO;
    for (x, y) in ar.iter().zip(br) {
        tail += *x * *y;
    }
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

#[inline(always)]
fn axpy<A: Acc>(y: &mut [A], a: A, x: &[A]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * *xi;
    }
}

/// Loads row `[i0, i1, i2, :]` of a unit-last-stride tensor into `out` (optionally scaled).
#[inline]
unsafe fn load_row<E: Input, A: Acc>(v: &View, i: [usize; 3], out: &mut [A], scale: A) {
    let p = unsafe { v.at::<E>(&[i[0], i[1], i[2], 0]) } as *const E;
    for (c, o) in out.iter_mut().enumerate() {
        *o = unsafe { *p.add(c) }.load::<A>() * scale;
    }
}

#[inline]
unsafe fn store_row<E: Input, A: Acc>(v: &View, i: [usize; 3], src: &[A], scale: A) {
    let p = unsafe { v.at::<E>(&[i[0], i[1], i[2], 0]) };
    for (c, s) in src.iter().enumerate() {
        unsafe { *p.add(c) = E::store(*s * scale) };
    }
}

/// Like `store_row`, and the rounding residual of every element into `lo` when given (the
/// backward's Δ adds it back: see `AttnFwd::o_lo`).
#[inline]
unsafe fn store_row_split<E: Input, A: Acc>(
    v: &View,
    lo: Option<&View>,
    i: [usize; 3],
    src: &[A],
    scale: A,
) {
    let Some(lo) = lo else {
        return unsafe { store_row::<E, A>(v, i, src, scale) };
    };
    let p = unsafe { v.at::<E>(&[i[0], i[1], i[2], 0]) };
    let pl = unsafe { lo.at::<E>(&[i[0], i[1], i[2], 0]) };
    for (c, s) in src.iter().enumerate() {
        let (hi, rest) = E::store_split(*s * scale);
        unsafe {
            *p.add(c) = hi;
            *pl.add(c) = rest;
        }
    }
}

/// Keys per chunk of the online softmax.
const CHUNK: usize = 64;
/// Query rows per attention tile; with the G heads of their kv group they are the GEMM rows.
const TQ: usize = 16;
/// Queries per selection work item.
const TILE: usize = 16;
/// Backward work items to aim for, whatever the thread count: the query parts, and with them
/// the summation order of dk and dv, depend on the problem only.
const BWD_ITEMS: usize = 16;

/// Arguments of the attention forward. `o` [B, T, Hq, Dv] and `lse` [B, T, Hq] are written.
pub struct AttnFwd<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub o: &'a View,
    /// like `o`, or None: the rounding residual of o (16-bit), so that the backward's
    /// Δ = rowsum(dO ∘ O) does not cancel to the rounding of o where attention is nearly one-hot
    pub o_lo: Option<&'a View>,
    pub lse: &'a View,
    pub keys: KeySet<'a>,
    pub seqs: &'a [NsaSeq],
    pub scale: f64,
}

/// Arguments of the attention backward; dq, dk, dv are fully written.
pub struct AttnBwd<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub o: &'a View,
    /// the forward's `o_lo` (None: Δ from o alone)
    pub o_lo: Option<&'a View>,
    pub lse: &'a View,
    pub dout: &'a View,
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
    pub keys: KeySet<'a>,
    pub seqs: &'a [NsaSeq],
    pub scale: f64,
}

/// Calls `$f::<E, A>` for the input type E of `$dtype` and its accumulator A.
macro_rules! dispatch {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        by_dtype!($dtype, "nsa", E, A => $f::<E, A>($($arg),*))
    };
}

pub fn attn_fwd(p: &AttnFwd) {
    dispatch!(p.q.dtype, attn_fwd_t, p)
}

pub fn attn_bwd(p: &AttnBwd) {
    dispatch!(p.q.dtype, attn_bwd_t, p)
}

fn tiles(seqs: &[NsaSeq], hkv: usize, tile: usize) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for g in 0..hkv {
            let mut t0 = 0;
            while t0 < s.len {
                items.push((si, g, t0));
                t0 += tile;
            }
        }
    }
    items
}

/// Whether every element is finite (x·0 is 0 only for finite x); eight lanes, so that it
/// vectorises.
fn all_finite<A: Acc>(x: &[A]) -> bool {
    let mut acc = [A::ZERO; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += c[l] * A::ZERO;
        }
    }
    let tail = it.remainder().iter().fold(A::ZERO, |s, &v| s + v * A::ZERO);
    acc.iter().fold(tail, |s, &v| s + v) == A::ZERO
}

/// The key structure of one query tile: the rows t0..t0 + rows of (sequence, kv head), their
/// key ranges, the key chunks covering their union and, per chunk, the rows that see some of
/// it with their visible segments.
struct Tile {
    ranges: Vec<Vec<(usize, usize)>>,
    chunks: Vec<(usize, usize)>,
    /// rows of the current chunk that see any of its keys
    act: Vec<usize>,
    /// segments [lo, hi) (local to the chunk) of act[x]: segs[seg_at[x]..seg_at[x + 1]]
    seg_at: Vec<usize>,
    segs: Vec<(usize, usize)>,
}

impl Tile {
    fn new() -> Self {
        Tile {
            ranges: vec![Vec::new(); TQ],
            chunks: Vec::new(),
            act: Vec::new(),
            seg_at: Vec::new(),
            segs: Vec::new(),
        }
    }

    /// Ranges of rows t0..t0 + rows and the chunks (≤ CHUNK keys) of their union.
    fn set(&mut self, keys: &KeySet, s: &NsaSeq, g: usize, t0: usize, rows: usize) {
        let mut all = Vec::new();
        for r in 0..rows {
            keys.ranges(s, t0 + r, g, &mut self.ranges[r]);
            all.extend_from_slice(&self.ranges[r]);
        }
        all.sort_unstable();
        self.chunks.clear();
        let mut cur: Option<(usize, usize)> = None;
        for (lo, hi) in all.into_iter().chain([(usize::MAX, usize::MAX)]) {
            match cur {
                Some((a, b)) if lo <= b => cur = Some((a, b.max(hi))),
                _ => {
                    if let Some((a, b)) = cur {
                        let mut c0 = a;
                        while c0 < b {
                            let c1 = (c0 + CHUNK).min(b);
                            self.chunks.push((c0, c1));
                            c0 = c1;
                        }
                    }
                    cur = Some((lo, hi));
                }
            }
        }
    }

    /// The rows of chunk [c0, c1) and their visible segments, merged (a key listed twice
    /// counts once).
    fn select(&mut self, rows: usize, c0: usize, c1: usize) {
        self.act.clear();
        self.segs.clear();
        self.seg_at.clear();
        self.seg_at.push(0);
        for r in 0..rows {
            let first = self.segs.len();
            for &(lo, hi) in &self.ranges[r] {
                let (lo, hi) = (lo.max(c0), hi.min(c1));
                if lo < hi {
                    self.segs.push((lo - c0, hi - c0));
                }
            }
            if self.segs.len() == first {
                continue;
            }
            let row = &mut self.segs[first..];
            row.sort_unstable();
            let mut k = first;
            for x in first + 1..self.segs.len() {
                let (lo, hi) = self.segs[x];
                if lo <= self.segs[k].1 {
                    self.segs[k].1 = self.segs[k].1.max(hi);
                } else {
                    k += 1;
                    self.segs[k] = (lo, hi);
                }
            }
            self.segs.truncate(k + 1);
            self.act.push(r);
            self.seg_at.push(self.segs.len());
        }
    }

    fn row_segs(&self, x: usize) -> &[(usize, usize)] {
        &self.segs[self.seg_at[x]..self.seg_at[x + 1]]
    }
}

/// Per-thread buffers of the attention kernels: tile rows are stacked (row, head of the
/// group), `compact` buffers hold the active rows of a chunk only.
struct Work<A> {
    tile: Tile,
    /// scaled q of the tile rows, [TQ·G, D]
    q: Vec<A>,
    /// forward: output accumulators [TQ·G, Dv]; backward: dO [TQ·G, Dv]
    rows_v: Vec<A>,
    /// backward: dq accumulators [TQ·G, D]
    dq: Vec<A>,
    /// forward: running max, sum; backward: lse, Δ (per stacked row)
    m: Vec<A>,
    l: Vec<A>,
    kb: Vec<A>,
    vb: Vec<A>,
    /// active rows of q (and dO) gathered
    qa: Vec<A>,
    doa: Vec<A>,
    /// scores, then P (forward and backward)
    s: Vec<A>,
    /// forward: rescale factor per compact row; backward: dP, then dE
    dp: Vec<A>,
    corr: Vec<A>,
    /// product rows before scattering into the tile
    o: Vec<A>,
}

impl<A: Acc> Work<A> {
    fn new(grp: usize, d: usize, dv: usize) -> Self {
        let mr = TQ * grp;
        Work {
            tile: Tile::new(),
            q: vec![A::ZERO; mr * d],
            rows_v: vec![A::ZERO; mr * dv],
            dq: vec![A::ZERO; mr * d],
            m: vec![A::ZERO; mr],
            l: vec![A::ZERO; mr],
            kb: vec![A::ZERO; CHUNK * d],
            vb: vec![A::ZERO; CHUNK * dv],
            qa: vec![A::ZERO; mr * d],
            doa: vec![A::ZERO; mr * dv],
            s: vec![A::ZERO; mr * CHUNK],
            dp: vec![A::ZERO; mr * CHUNK],
            corr: vec![A::ZERO; mr],
            o: vec![A::ZERO; mr * d.max(dv)],
        }
    }

    /// Selects the rows of chunk `ci` of the tile and loads its keys of (sequence, kv head g)
    /// into kb, vb: (first key, keys, whether all are finite).
    fn chunk<E: Input>(
        &mut self,
        ci: usize,
        rows: usize,
        (k, v): (&View, &View),
        s: &NsaSeq,
        (base, g): (usize, usize),
    ) -> (usize, usize, bool) {
        let (c0, c1) = self.tile.chunks[ci];
        let n = c1 - c0;
        self.tile.select(rows, c0, c1);
        let (d, dv) = (k.shape[3], v.shape[3]);
        for j in 0..n {
            let key = [s.batch, base + c0 + j, g];
            // SAFETY: validated shapes; the key is inside the sequence's keys.
            unsafe {
                load_row::<E, A>(k, key, &mut self.kb[j * d..][..d], A::ONE);
                load_row::<E, A>(v, key, &mut self.vb[j * dv..][..dv], A::ONE);
            }
        }
        let finite = all_finite(&self.kb[..n * d]) && all_finite(&self.vb[..n * dv]);
        (c0, n, finite)
    }
}

/// dst = the `width`-long blocks of `src` at the indices `act`, in order.
fn gather<A: Copy>(src: &[A], act: &[usize], width: usize, dst: &mut [A]) {
    for (x, &r) in act.iter().enumerate() {
        dst[x * width..][..width].copy_from_slice(&src[r * width..][..width]);
    }
}

fn attn_fwd_t<E: Input, A: Acc>(p: &AttnFwd) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let items = tiles(p.seqs, hkv, TQ);
    POOL.install(|| {
        items.par_iter().for_each_init(
            || Work::<A>::new(grp, d, dv),
            |w, &(si, g, t0)| {
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { fwd_tile_avx2::<E, A>(p, w, si, g, t0) };
                }
                fwd_tile::<E, A>(p, w, si, g, t0)
            },
        )
    });
}

/// `fwd_tile` compiled for AVX2+FMA, so that its softmax loops vectorise 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile_avx2<E: Input, A: Acc>(
    p: &AttnFwd,
    w: &mut Work<A>,
    si: usize,
    g: usize,
    t0: usize,
) {
    fwd_tile::<E, A>(p, w, si, g, t0)
}

/// One query tile of the forward: an online softmax over its key chunks.
#[inline(always)]
fn fwd_tile<E: Input, A: Acc>(p: &AttnFwd, w: &mut Work<A>, si: usize, g: usize, t0: usize) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let s = &p.seqs[si];
    let rows = TQ.min(s.len - t0);
    let mr = rows * grp;
    let base = p.keys.base(s);
    for r in 0..rows {
        for h in 0..grp {
            let dst = &mut w.q[(r * grp + h) * d..][..d];
            let idx = [s.batch, s.start + t0 + r, g * grp + h];
            // SAFETY: validated shapes; t < len, head < Hq.
            unsafe { load_row::<E, A>(p.q, idx, dst, A::of(p.scale)) };
        }
    }
    w.m[..mr].fill(A::NEG_INF);
    w.l[..mr].fill(A::ZERO);
    w.rows_v[..mr * dv].fill(A::ZERO);
    w.tile.set(&p.keys, s, g, t0, rows);
    for ci in 0..w.tile.chunks.len() {
        let (_, n, finite) = w.chunk::<E>(ci, rows, (p.k, p.v), s, (base, g));
        let ma = w.tile.act.len() * grp;
        gather(&w.q, &w.tile.act, grp * d, &mut w.qa);
        let kt = Mat::transposed(&w.kb, d);
        gemm(ma, n, d, Mat::rows(&w.qa, d), kt, &mut w.s, n, None);
        // P over the visible keys only, with the true running maxima.
        for (x, &r) in w.tile.act.iter().enumerate() {
            let segs = w.tile.row_segs(x);
            for h in 0..grp {
                let (i, ti) = (x * grp + h, r * grp + h);
                let srow = &mut w.s[i * n..][..n];
                let mx = segs
                    .iter()
                    .fold(A::NEG_INF, |m, &(lo, hi)| m.maxf(vmax(&srow[lo..hi])));
                // No early exit when m_new = −∞: every score here belongs to a visible key, so
                // that only comes from NaN/−∞ data, and the NaN of exp(−∞ − −∞) must reach l
                // and o like in the reference.
                let m_new = w.m[ti].max(mx);
                let corr = (w.m[ti] - m_new).exp();
                let mut sum = A::ZERO;
                let mut prev = 0;
                for &(lo, hi) in segs {
                    srow[prev..lo].fill(A::ZERO);
                    let pr = &mut srow[lo..hi];
                    pr.iter_mut().for_each(|v| *v = (*v - m_new).fexp());
                    sum += vsum(pr);
                    prev = hi;
                }
                srow[prev..].fill(A::ZERO);
                w.l[ti] = w.l[ti] * corr + sum;
                w.m[ti] = m_new;
                w.corr[i] = corr;
            }
        }
        // O = P·V; with a non-finite key or value, over the visible segments only (a masked
        // zero times Inf/NaN would leak into rows that never see it).
        if finite {
            gemm(
                ma,
                dv,
                n,
                Mat::rows(&w.s, n),
                Mat::rows(&w.vb, dv),
                &mut w.o,
                dv,
                None,
            );
        } else {
            w.o[..ma * dv].fill(A::ZERO);
            for x in 0..w.tile.act.len() {
                for &(lo, hi) in w.tile.row_segs(x) {
                    for i in x * grp..(x + 1) * grp {
                        let (pr, vr) = (
                            Mat::rows(&w.s[i * n + lo..], n),
                            Mat::rows(&w.vb[lo * dv..], dv),
                        );
                        gemm(1, dv, hi - lo, pr, vr, &mut w.o[i * dv..], dv, Some(A::ONE));
                    }
                }
            }
        }
        for (x, &r) in w.tile.act.iter().enumerate() {
            for h in 0..grp {
                let (i, ti) = (x * grp + h, r * grp + h);
                let corr = w.corr[i];
                let acc = &mut w.rows_v[ti * dv..][..dv];
                for (a, &o) in acc.iter_mut().zip(&w.o[i * dv..][..dv]) {
                    *a = *a * corr + o;
                }
            }
        }
    }
    for r in 0..rows {
        for h in 0..grp {
            let ti = r * grp + h;
            let (m, l) = (w.m[ti], w.l[ti]);
            // l is 0 only for a row without keys; NaN (from NaN/Inf data) propagates
            let (inv, lse) = if l != A::ZERO {
                (A::ONE / l, m + l.ln())
            } else {
                (A::ZERO, A::NEG_INF)
            };
            let idx = [s.batch, s.start + t0 + r, g * grp + h];
            let acc = &w.rows_v[ti * dv..][..dv];
            // SAFETY: validated shapes; this tile's rows are written by this item only.
            unsafe {
                store_row_split::<E, A>(p.o, p.o_lo, idx, acc, inv);
                *p.lse.at::<A>(&idx) = lse;
            }
        }
    }
}

fn attn_bwd_t<E: Input, A: Acc>(p: &AttnBwd) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let one = A::ONE;
    // Split long sequences into query parts when there are too few (sequence, kv head) pairs
    // for BWD_ITEMS work items; each part has its own dk/dv buffer.
    let pairs = (p.seqs.len() * hkv).max(1);
    let want = BWD_ITEMS.div_ceil(pairs).clamp(1, 8);
    let mut items = Vec::new();
    for (si, s) in p.seqs.iter().enumerate() {
        let parts = want.min(s.len.div_ceil(128)).max(1);
        let step = s.len.div_ceil(parts).max(1);
        for g in 0..hkv {
            for part in 0..parts {
                let lo = (part * step).min(s.len);
                items.push((si, g, lo, ((part + 1) * step).min(s.len)));
            }
        }
    }
    let partials: Vec<(usize, usize, Vec<A>, Vec<A>)> = POOL.install(|| {
        items
            .par_iter()
            .map_init(
                || Work::<A>::new(grp, d, dv),
                |w, &(si, g, tlo, thi)| {
                    let klen = p.keys.key_len(&p.seqs[si]);
                    let mut dkb = vec![A::ZERO; klen * d];
                    let mut dvb = vec![A::ZERO; klen * dv];
                    let mut t0 = tlo;
                    while t0 < thi {
                        let rows = TQ.min(thi - t0);
                        let at = (si, g, t0, rows);
                        #[cfg(target_arch = "x86_64")]
                        if has_avx2_fma() {
                            // SAFETY: the CPU has AVX2 and FMA.
                            unsafe { bwd_tile_avx2::<E, A>(p, w, at, &mut dkb, &mut dvb) };
                            t0 += rows;
                            continue;
                        }
                        bwd_tile::<E, A>(p, w, at, &mut dkb, &mut dvb);
                        t0 += rows;
                    }
                    (si, g, dkb, dvb)
                },
            )
            .collect()
    });
    // Sum the parts of every (sequence, kv head) and write dk, dv.
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); p.seqs.len() * hkv];
    for (i, (si, g, _, _)) in partials.iter().enumerate() {
        groups[si * hkv + g].push(i);
    }
    POOL.install(|| {
        groups.par_iter().enumerate().for_each(|(pair, list)| {
            let (si, g) = (pair / hkv, pair % hkv);
            let s = &p.seqs[si];
            let base = p.keys.base(s);
            let klen = p.keys.key_len(s);
            for (dst, width, pick) in [(p.dk, d, 2usize), (p.dv, dv, 3usize)] {
                let mut sum = vec![A::ZERO; width];
                for key in 0..klen {
                    sum.fill(A::ZERO);
                    for &i in list {
                        let buf = if pick == 2 {
                            &partials[i].2
                        } else {
                            &partials[i].3
                        };
                        for (x, y) in sum.iter_mut().zip(&buf[key * width..][..width]) {
                            *x += *y;
                        }
                    }
                    unsafe { store_row::<E, A>(dst, [s.batch, base + key, g], &sum, one) };
                }
            }
        })
    });
}

/// `bwd_tile` compiled for AVX2+FMA, so that its softmax loops vectorise 8 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_tile_avx2<E: Input, A: Acc>(
    p: &AttnBwd,
    w: &mut Work<A>,
    at: (usize, usize, usize, usize),
    dkb: &mut [A],
    dvb: &mut [A],
) {
    bwd_tile::<E, A>(p, w, at, dkb, dvb)
}

/// One query tile (sequence, kv head, first row, rows) of the backward: writes its dq rows and
/// accumulates dk, dv of the keys it sees into `dkb`, `dvb` (local key rows).
#[inline(always)]
fn bwd_tile<E: Input, A: Acc>(
    p: &AttnBwd,
    w: &mut Work<A>,
    (si, g, t0, rows): (usize, usize, usize, usize),
    dkb: &mut [A],
    dvb: &mut [A],
) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let s = &p.seqs[si];
    let mr = rows * grp;
    let base = p.keys.base(s);
    let (one, scale) = (A::ONE, A::of(p.scale));
    // q is scaled at load: dK = dEᵀ·(scale·Q), dQ = scale·dE·K with dE = P∘(dP − Δ).
    for r in 0..rows {
        for h in 0..grp {
            let ti = r * grp + h;
            let idx = [s.batch, s.start + t0 + r, g * grp + h];
            let ob = &mut w.o[..dv];
            // SAFETY: validated shapes; t < len, head < Hq.
            unsafe {
                load_row::<E, A>(p.q, idx, &mut w.q[ti * d..][..d], scale);
                load_row::<E, A>(p.dout, idx, &mut w.rows_v[ti * dv..][..dv], one);
                load_row::<E, A>(p.o, idx, ob, one);
                w.m[ti] = *p.lse.at::<A>(&idx);
                if let Some(o_lo) = p.o_lo {
                    let lo = &mut w.dq[..dv];
                    load_row::<E, A>(o_lo, idx, lo, one);
                    for (x, y) in ob.iter_mut().zip(lo.iter()) {
                        *x += *y;
                    }
                }
            }
            w.l[ti] = dot(&w.rows_v[ti * dv..][..dv], &w.o[..dv]);
        }
    }
    let tile_finite = all_finite(&w.q[..mr * d]) && all_finite(&w.rows_v[..mr * dv]);
    w.dq[..mr * d].fill(A::ZERO);
    w.tile.set(&p.keys, s, g, t0, rows);
    for ci in 0..w.tile.chunks.len() {
        let (c0, n, finite) = w.chunk::<E>(ci, rows, (p.k, p.v), s, (base, g));
        let finite = finite && tile_finite;
        let ma = w.tile.act.len() * grp;
        gather(&w.q, &w.tile.act, grp * d, &mut w.qa);
        gather(&w.rows_v, &w.tile.act, grp * dv, &mut w.doa);
        let (qa, doa) = (Mat::rows(&w.qa, d), Mat::rows(&w.doa, dv));
        gemm(ma, n, d, qa, Mat::transposed(&w.kb, d), &mut w.s, n, None);
        gemm(
            ma,
            n,
            dv,
            doa,
            Mat::transposed(&w.vb, dv),
            &mut w.dp,
            n,
            None,
        );
        // P = exp(S − lse) and dE = P∘(dP − Δ) on the visible keys, 0 elsewhere.
        for (x, &r) in w.tile.act.iter().enumerate() {
            let segs = w.tile.row_segs(x);
            for h in 0..grp {
                let (i, ti) = (x * grp + h, r * grp + h);
                let (lse, delta) = (w.m[ti], w.l[ti]);
                let srow = &mut w.s[i * n..][..n];
                let drow = &mut w.dp[i * n..][..n];
                let mut prev = 0;
                for &(lo, hi) in segs {
                    srow[prev..lo].fill(A::ZERO);
                    drow[prev..lo].fill(A::ZERO);
                    for (sv, dv) in srow[lo..hi].iter_mut().zip(&mut drow[lo..hi]) {
                        *sv = (*sv - lse).fexp();
                        *dv = *sv * (*dv - delta);
                    }
                    prev = hi;
                }
                srow[prev..].fill(A::ZERO);
                drow[prev..].fill(A::ZERO);
            }
        }
        // dQ = dE·K, dK += dEᵀ·Q, dV += Pᵀ·dO; with a non-finite operand, over the visible
        // segments only (a masked zero times Inf/NaN would leak).
        let (dks, dvs) = (&mut dkb[c0 * d..], &mut dvb[c0 * dv..]);
        if finite {
            let k = Mat::rows(&w.kb, d);
            gemm(ma, d, n, Mat::rows(&w.dp, n), k, &mut w.o, d, None);
            gemm(n, d, ma, Mat::transposed(&w.dp, n), qa, dks, d, Some(one));
            gemm(n, dv, ma, Mat::transposed(&w.s, n), doa, dvs, dv, Some(one));
        } else {
            w.o[..ma * d].fill(A::ZERO);
            for x in 0..w.tile.act.len() {
                for &(lo, hi) in w.tile.row_segs(x) {
                    let len = hi - lo;
                    let k = Mat::rows(&w.kb[lo * d..], d);
                    for i in x * grp..(x + 1) * grp {
                        let (de, pr) = (&w.dp[i * n + lo..], &w.s[i * n + lo..]);
                        let (qi, doi) = (
                            Mat::rows(&w.qa[i * d..], d),
                            Mat::rows(&w.doa[i * dv..], dv),
                        );
                        gemm(
                            1,
                            d,
                            len,
                            Mat::rows(de, n),
                            k,
                            &mut w.o[i * d..],
                            d,
                            Some(one),
                        );
                        let dkr = &mut dks[lo * d..];
                        gemm(len, d, 1, Mat::transposed(de, n), qi, dkr, d, Some(one));
                        let dvr = &mut dvs[lo * dv..];
                        gemm(len, dv, 1, Mat::transposed(pr, n), doi, dvr, dv, Some(one));
                    }
                }
            }
        }
        for (x, &r) in w.tile.act.iter().enumerate() {
            let (src, dst) = (
                &w.o[x * grp * d..][..grp * d],
                &mut w.dq[r * grp * d..][..grp * d],
            );
            for (a, &b) in dst.iter_mut().zip(src) {
                *a += b;
            }
        }
    }
    for r in 0..rows {
        for h in 0..grp {
            let idx = [s.batch, s.start + t0 + r, g * grp + h];
            let dq = &w.dq[(r * grp + h) * d..][..d];
            // SAFETY: validated shapes; this tile's rows are written by this item only.
            unsafe { store_row::<E, A>(p.dq, idx, dq, scale) };
        }
    }
}

// ----------------------------------------------------------------------------- block selection

/// Arguments of the fused block selection. `out` [B, T, Hkv, n] int32 is written.
pub struct TopK<'a> {
    pub q: &'a View,
    pub k_cmp: &'a View,
    pub lse: &'a View,
    pub out: &'a View,
    pub seqs: &'a [NsaSeq],
    pub size: usize,
    pub stride: usize,
    pub block: usize,
    pub topk: usize,
    pub init_blocks: usize,
    pub local_blocks: usize,
    pub scale: f64,
}

pub fn topk_blocks(p: &TopK) {
    dispatch!(p.q.dtype, topk_t, p)
}

fn topk_t<E: Input, A: Acc>(p: &TopK) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let hkv = p.k_cmp.shape[2];
    let grp = hq / hkv;
    let scale = A::of(p.scale);
    let (a, b) = (p.size / p.stride, p.block / p.stride);
    let n = p.topk;
    let items = tiles(p.seqs, hkv, TILE);
    POOL.install(|| {
        items.par_iter().for_each(|&(si, g, t0)| {
            let s = &p.seqs[si];
            let mut qb = vec![A::ZERO; grp * d];
            let mut lse = vec![A::ZERO; grp];
            let mut kb = vec![A::ZERO; d];
            let mut prob: Vec<A> = Vec::new();
            let mut best: Vec<(A, usize)> = Vec::with_capacity(n + 1);
            let mut sel: Vec<usize> = Vec::with_capacity(n);
            for t in t0..(t0 + TILE).min(s.len) {
                let row = s.start + t;
                for h in 0..grp {
                    let idx = [s.batch, row, g * grp + h];
                    unsafe {
                        load_row::<E, A>(p.q, idx, &mut qb[h * d..][..d], scale);
                        lse[h] = *p.lse.at::<A>(&idx);
                    }
                }
                // P[i]: compressed probabilities summed over the group (one row, O(C)).
                let nvis = num_visible(t, p.size, p.stride).min(s.clen);
                prob.clear();
                prob.resize(nvis, A::ZERO);
                for (i, pi) in prob.iter_mut().enumerate() {
                    unsafe {
                        load_row::<E, A>(p.k_cmp, [s.batch, s.cstart + i, g], &mut kb, A::of(1.0))
                    };
                    for h in 0..grp {
                        *pi += (dot(&qb[h * d..][..d], &kb) - lse[h]).exp();
                    }
                }
                // Online top-n over the blocks that exist at t (ties: lower index first).
                let tb = t / p.block;
                best.clear();
                for j in 0..=tb {
                    let forced = j < p.init_blocks || j + p.local_blocks > tb;
                    let score = if forced {
                        A::of(f64::INFINITY)
                    } else {
                        let mut acc = A::ZERO;
                        for x in 0..a {
                            for y in 0..b {
                                let i = (b * j + y) as isize - x as isize;
                                if i >= 0 && (i as usize) < nvis {
                                    acc += prob[i as usize];
                                }
                            }
                        }
                        acc
                    };
                    if best.len() == n {
                        match best.last() {
                            Some(&(worst, _)) if score > worst => {
                                best.pop();
                            }
                            _ => continue,
                        }
                    }
                    let pos = best
                        .iter()
                        .position(|&(sc, _)| sc < score)
                        .unwrap_or(best.len());
                    best.insert(pos, (score, j));
                }
                sel.clear();
                sel.extend(best.iter().map(|&(_, j)| j));
                sel.sort_unstable();
                for slot in 0..n {
                    let val = sel.get(slot).map_or(-1, |&j| j as i32);
                    unsafe { *p.out.at::<i32>(&[s.batch, row, g, slot]) = val };
                }
            }
        })
    });
}

// ----------------------------------------------------------------------------- compression

/// Arguments of the compression forward: `out` [B, C, H, Dout] written.
pub struct Compress<'a> {
    pub x: &'a View,
    /// linear: [H, l·D, Dout]; None: mean pooling
    pub weight: Option<&'a View>,
    /// [H, l, D]
    pub pe: Option<&'a View>,
    pub out: &'a View,
    pub seqs: &'a [NsaSeq],
    pub size: usize,
    pub stride: usize,
}

/// Gradients of the compression: dx [B, T, H, D] fully written; dweight/dpe when present.
pub struct CompressBwd<'a> {
    pub x: &'a View,
    pub weight: Option<&'a View>,
    pub pe: Option<&'a View>,
    pub dout: &'a View,
    pub dx: &'a View,
    pub dweight: Option<&'a View>,
    pub dpe: Option<&'a View>,
    pub seqs: &'a [NsaSeq],
    pub size: usize,
    pub stride: usize,
}

pub fn compress_fwd(p: &Compress) {
    dispatch!(p.x.dtype, compress_fwd_t, p)
}

pub fn compress_bwd(p: &CompressBwd) {
    dispatch!(p.x.dtype, compress_bwd_t, p)
}

/// The flattened window i of sequence s, head h: x rows (+ pe) as [l·D].
#[allow(clippy::too_many_arguments)]
unsafe fn load_window<E: Input, A: Acc>(
    x: &View,
    pe: Option<&View>,
    s: &NsaSeq,
    h: usize,
    i: usize,
    size: usize,
    stride: usize,
    flat: &mut [A],
) {
    let d = x.shape[3];
    let one = A::of(1.0);
    for r in 0..size {
        let dst = &mut flat[r * d..][..d];
        unsafe { load_row::<E, A>(x, [s.batch, s.start + i * stride + r, h], dst, one) };
        if let Some(pe) = pe {
            let pp = unsafe { pe.at::<E>(&[h, r, 0]) } as *const E;
            for (c, y) in dst.iter_mut().enumerate() {
                *y += unsafe { *pp.add(c) }.load::<A>();
            }
        }
    }
}

fn compress_fwd_t<E: Input, A: Acc>(p: &Compress) {
    let (h, d) = (p.x.shape[2], p.x.shape[3]);
    let dout = p.out.shape[3];
    let (size, stride) = (p.size, p.stride);
    let items: Vec<(usize, usize)> = (0..p.seqs.len())
        .flat_map(|si| (0..h).map(move |hh| (si, hh)))
        .collect();
    POOL.install(|| {
        items.par_iter().for_each(|&(si, hh)| {
            let s = &p.seqs[si];
            let mut flat = vec![A::ZERO; size * d];
            let mut acc = vec![A::ZERO; dout];
            for i in 0..s.clen {
                unsafe { load_window::<E, A>(p.x, p.pe, s, hh, i, size, stride, &mut flat) };
                acc.fill(A::ZERO);
                let mul = match p.weight {
                    None => {
                        for r in 0..size {
                            for (a, x) in acc.iter_mut().zip(&flat[r * d..][..d]) {
                                *a += *x;
                            }
                        }
                        A::of(1.0 / size as f64)
                    }
                    Some(w) => {
                        for (rc, &xv) in flat.iter().enumerate() {
                            let wp = unsafe { w.at::<E>(&[hh, rc, 0]) } as *const E;
                            for (o, a) in acc.iter_mut().enumerate() {
                                *a += xv * unsafe { *wp.add(o) }.load::<A>();
                            }
                        }
                        A::of(1.0)
                    }
                };
                unsafe { store_row::<E, A>(p.out, [s.batch, s.cstart + i, hh], &acc, mul) };
            }
        })
    });
}

fn compress_bwd_t<E: Input, A: Acc>(p: &CompressBwd) {
    let (h, d) = (p.x.shape[2], p.x.shape[3]);
    let dout_w = p.dout.shape[3];
    let (size, stride) = (p.size, p.stride);
    let one = A::of(1.0);
    // Work items are heads (dweight/dpe are per head); sequences run inside.
    POOL.install(|| {
        (0..h).into_par_iter().for_each(|hh| {
            let mut dw = vec![
                A::ZERO;
                if p.dweight.is_some() {
                    size * d * dout_w
                } else {
                    0
                }
            ];
            let mut dpe = vec![A::ZERO; size * d];
            let mut flat = vec![A::ZERO; size * d];
            let mut gvec = vec![A::ZERO; size * d];
            let mut go = vec![A::ZERO; dout_w];
            for s in p.seqs {
                let mut dx = vec![A::ZERO; s.len * d];
                for i in 0..s.clen {
                    unsafe { load_row::<E, A>(p.dout, [s.batch, s.cstart + i, hh], &mut go, one) };
                    match p.weight {
                        None => {
                            let inv = A::of(1.0 / size as f64);
                            for r in 0..size {
                                for c in 0..d {
                                    gvec[r * d + c] = go[c] * inv;
                                }
                            }
                        }
                        Some(w) => {
                            unsafe {
                                load_window::<E, A>(p.x, p.pe, s, hh, i, size, stride, &mut flat)
                            };
                            for rc in 0..size * d {
                                let wp = unsafe { w.at::<E>(&[hh, rc, 0]) } as *const E;
                                let mut acc = A::ZERO;
                                for (o, g) in go.iter().enumerate() {
                                    acc += *g * unsafe { *wp.add(o) }.load::<A>();
                                }
                                gvec[rc] = acc;
                                if !dw.is_empty() {
                                    axpy(&mut dw[rc * dout_w..][..dout_w], flat[rc], &go);
                                }
                            }
                        }
                    }
                    for r in 0..size {
                        let t = i * stride + r;
                        axpy(&mut dx[t * d..][..d], one, &gvec[r * d..][..d]);
                    }
                    for (a, g) in dpe.iter_mut().zip(&gvec) {
                        *a += *g;
                    }
                }
                for t in 0..s.len {
                    unsafe {
                        store_row::<E, A>(p.dx, [s.batch, s.start + t, hh], &dx[t * d..][..d], one)
                    };
                }
            }
            if let Some(dwv) = p.dweight {
                for rc in 0..size * d {
                    unsafe {
                        store_row::<E, A>(dwv, [hh, rc, 0], &dw[rc * dout_w..][..dout_w], one)
                    };
                }
            }
            if let Some(dpv) = p.dpe {
                for r in 0..size {
                    unsafe { store_row::<E, A>(dpv, [hh, r, 0], &dpe[r * d..][..d], one) };
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsa_window_counts() {
        assert_eq!(num_windows(5, 8, 4), 0);
        assert_eq!(num_windows(8, 8, 4), 1);
        assert_eq!(num_windows(11, 8, 4), 1);
        assert_eq!(num_windows(12, 8, 4), 2);
        assert_eq!(num_visible(6, 8, 4), 0);
        assert_eq!(num_visible(7, 8, 4), 1);
        assert_eq!(num_visible(11, 8, 4), 2);
    }

    #[test]
    fn nsa_window_ranges() {
        let s = NsaSeq {
            batch: 0,
            start: 0,
            len: 10,
            cstart: 0,
            clen: 1,
        };
        let mut r = Vec::new();
        KeySet::Window(3).ranges(&s, 1, 0, &mut r);
        assert_eq!(r, vec![(0, 2)]);
        KeySet::Window(3).ranges(&s, 7, 0, &mut r);
        assert_eq!(r, vec![(5, 8)]);
        let cmp = KeySet::Compressed { size: 4, stride: 2 };
        cmp.ranges(&s, 9, 0, &mut r);
        assert_eq!(r, vec![(0, 1)]); // 4 windows visible, capped by clen
    }
}
