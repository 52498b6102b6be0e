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

use crate::cpu::num::{by_dtype, Acc, Input};
use crate::cpu::POOL;
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
/// Queries per forward / selection work item.
const TILE: usize = 16;

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

fn attn_fwd_t<E: Input, A: Acc>(p: &AttnFwd) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let scale = A::of(p.scale);
    let items = tiles(p.seqs, hkv, TILE);
    POOL.install(|| {
        items.par_iter().for_each(|&(si, g, t0)| {
            let s = &p.seqs[si];
            let base = p.keys.base(s);
            let mut ranges = Vec::new();
            let mut qb = vec![A::ZERO; grp * d];
            let mut acc = vec![A::ZERO; grp * dv];
            let mut kb = vec![A::ZERO; CHUNK * d];
            let mut vb = vec![A::ZERO; CHUNK * dv];
            let mut sc = [A::ZERO; CHUNK];
            let mut m = vec![A::NEG_INF; grp];
            let mut l = vec![A::ZERO; grp];
            for t in t0..(t0 + TILE).min(s.len) {
                let row = s.start + t;
                for h in 0..grp {
                    // SAFETY: validated shapes; t < len, head < Hq.
                    unsafe {
                        load_row::<E, A>(
                            p.q,
                            [s.batch, row, g * grp + h],
                            &mut qb[h * d..][..d],
                            scale,
                        )
                    };
                }
                acc.fill(A::ZERO);
                m.fill(A::NEG_INF);
                l.fill(A::ZERO);
                p.keys.ranges(s, t, g, &mut ranges);
                for &(lo, hi) in &ranges {
                    let mut c0 = lo;
                    while c0 < hi {
                        let n = (hi - c0).min(CHUNK);
                        for j in 0..n {
                            let key = [s.batch, base + c0 + j, g];
                            unsafe {
                                load_row::<E, A>(p.k, key, &mut kb[j * d..][..d], A::of(1.0));
                                load_row::<E, A>(p.v, key, &mut vb[j * dv..][..dv], A::of(1.0));
                            }
                        }
                        for h in 0..grp {
                            let qh = &qb[h * d..][..d];
                            let mut mx = A::NEG_INF;
                            for j in 0..n {
                                sc[j] = dot(qh, &kb[j * d..][..d]);
                                mx = mx.max(sc[j]);
                            }
                            // No early exit when m_new = −∞: every score here belongs to a real
                            // key, so that only comes from NaN/−∞ data, and the NaN of
                            // exp(−∞ − −∞) must reach l and o like in the reference.
                            let m_new = m[h].max(mx);
                            let corr = (m[h] - m_new).exp();
                            let ah = &mut acc[h * dv..][..dv];
                            if corr != A::of(1.0) {
                                for x in ah.iter_mut() {
                                    *x = *x * corr;
                                }
                            }
                            let mut sum = A::ZERO;
                            for j in 0..n {
                                let pj = (sc[j] - m_new).exp();
                                sum += pj;
                                axpy(ah, pj, &vb[j * dv..][..dv]);
                            }
                            l[h] = l[h] * corr + sum;
                            m[h] = m_new;
                        }
                        c0 += n;
                    }
                }
                for h in 0..grp {
                    let head = g * grp + h;
                    // l is 0 only for a row without keys; NaN (from NaN/Inf data) propagates
                    let (inv, lse) = if l[h] != A::ZERO {
                        (A::of(1.0) / l[h], m[h] + l[h].ln())
                    } else {
                        (A::ZERO, A::NEG_INF)
                    };
                    unsafe {
                        let idx = [s.batch, row, head];
                        store_row_split::<E, A>(p.o, p.o_lo, idx, &acc[h * dv..][..dv], inv);
                        *p.lse.at::<A>(&[s.batch, row, head]) = lse;
                    }
                }
            }
        })
    });
}

fn attn_bwd_t<E: Input, A: Acc>(p: &AttnBwd) {
    let (hq, d) = (p.q.shape[2], p.q.shape[3]);
    let (hkv, dv) = (p.k.shape[2], p.v.shape[3]);
    let grp = hq / hkv;
    let scale = A::of(p.scale);
    let one = A::of(1.0);
    // Split long sequences into query parts when there are too few (sequence, kv head) pairs
    // to fill the pool; each part has its own dk/dv buffer.
    let pairs = (p.seqs.len() * hkv).max(1);
    let threads = POOL.current_num_threads();
    let want = (2 * threads).div_ceil(pairs).clamp(1, 8);
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
            .map(|&(si, g, tlo, thi)| {
                let s = &p.seqs[si];
                let base = p.keys.base(s);
                let klen = p.keys.key_len(s);
                let mut dkb = vec![A::ZERO; klen * d];
                let mut dvb = vec![A::ZERO; klen * dv];
                let mut ranges = Vec::new();
                let mut qb = vec![A::ZERO; grp * d];
                let mut dob = vec![A::ZERO; grp * dv];
                let mut ob = vec![A::ZERO; dv];
                let mut ob_lo = vec![A::ZERO; dv];
                let mut dqb = vec![A::ZERO; grp * d];
                let mut delta = vec![A::ZERO; grp];
                let mut lse = vec![A::ZERO; grp];
                let mut kb = vec![A::ZERO; CHUNK * d];
                let mut vb = vec![A::ZERO; CHUNK * dv];
                for t in tlo..thi {
                    let row = s.start + t;
                    for h in 0..grp {
                        let idx = [s.batch, row, g * grp + h];
                        unsafe {
                            load_row::<E, A>(p.q, idx, &mut qb[h * d..][..d], one);
                            load_row::<E, A>(p.dout, idx, &mut dob[h * dv..][..dv], one);
                            load_row::<E, A>(p.o, idx, &mut ob, one);
                            lse[h] = *p.lse.at::<A>(&idx);
                            if let Some(o_lo) = p.o_lo {
                                load_row::<E, A>(o_lo, idx, &mut ob_lo, one);
                                for (x, y) in ob.iter_mut().zip(&ob_lo) {
                                    *x += *y;
                                }
                            }
                        }
                        delta[h] = dot(&dob[h * dv..][..dv], &ob);
                    }
                    dqb.fill(A::ZERO);
                    p.keys.ranges(s, t, g, &mut ranges);
                    for &(lo, hi) in &ranges {
                        let mut c0 = lo;
                        while c0 < hi {
                            let n = (hi - c0).min(CHUNK);
                            for j in 0..n {
                                let key = [s.batch, base + c0 + j, g];
                                unsafe {
                                    load_row::<E, A>(p.k, key, &mut kb[j * d..][..d], one);
                                    load_row::<E, A>(p.v, key, &mut vb[j * dv..][..dv], one);
                                }
                            }
                            for h in 0..grp {
                                let qh = &qb[h * d..][..d];
                                let doh = &dob[h * dv..][..dv];
                                for j in 0..n {
                                    let kj = &kb[j * d..][..d];
                                    let pj = (dot(qh, kj) * scale - lse[h]).exp();
                                    let key = c0 + j;
                                    axpy(&mut dvb[key * dv..][..dv], pj, doh);
                                    let dp = dot(doh, &vb[j * dv..][..dv]);
                                    let ds = pj * (dp - delta[h]) * scale;
                                    axpy(&mut dqb[h * d..][..d], ds, kj);
                                    axpy(&mut dkb[key * d..][..d], ds, qh);
                                }
                            }
                            c0 += n;
                        }
                    }
                    for h in 0..grp {
                        unsafe {
                            store_row::<E, A>(
                                p.dq,
                                [s.batch, row, g * grp + h],
                                &dqb[h * d..][..d],
                                one,
                            )
                        };
                    }
                }
                (si, g, dkb, dvb)
            })
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
