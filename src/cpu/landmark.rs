//! Landmark attention on the CPU (docs/api/landmark.md).
//!
//! The grouped softmax is a plain softmax over *effective logits* E, one per (query, key):
//!
//!   current block (p ∈ S_i):               E_{i,p} = s_{i,p}
//!   ordinary p of an earlier block j:      E_{i,p} = s_{i,ℓ_j} + s_{i,p} − L_{i,j},
//!                                          L_{i,j} = log Σ_{u∈j, u≠ℓ_j} exp(s_{i,u})
//!   landmarks, future keys, skipped blocks: E = −∞
//!
//! since Σ_{p∈j} exp(E_{i,p}) = exp(s_{i,ℓ_j}): exp(E − lse_i) are exactly the weights w of the
//! docs and lse_i = log Z_i. The forward is then FlashAttention's online softmax over key tiles;
//! the backward is FlashAttention's dE = P∘(dP − Δ) followed by the chain rule through E:
//!
//!   ds_{i,p} = dE_{i,p} − π_{i,p}·Σ_{u∈j} dE_{i,u}   (ordinary p of an earlier block j)
//!   ds_{i,ℓ_j} = Σ_{u∈j} dE_{i,u},                    ds_{i,p} = dE_{i,p} (current block)
//!
//! (the formulas of docs/api/landmark.md, "Backward", with
//! Σ_u dE_{i,u} = G_{i,j}(do_i·u_{i,j} − D_i)).
//!
//! Key tiles hold whole landmark blocks (⌈128 / block_size⌉ of them), so every
//! inner softmax is complete inside its tile and nothing of size [T, T/block] is ever stored;
//! query tiles are BQ rows. Work items: forward and dQ over (sequence, query head, query tile),
//! dK/dV over (sequence, kv head, key tile); f32 accumulation (f64 for f64), scores in f32.

use crate::cpu::gemm::{gemm, Mat};
use crate::cpu::num::{by_dtype, vmax, vsum, Acc, Input};
use crate::cpu::POOL;
use crate::tensor::View;
use rayon::prelude::*;

/// Query rows per tile.
pub const BQ: usize = 64;
/// Target number of keys per key tile (rounded to whole blocks).
pub const BK: usize = 128;

/// One sequence: batch row, first query token, queries, first key token, keys.
#[derive(Clone, Copy, Debug)]
pub struct LmSeq {
    pub batch: usize,
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

/// Arguments shared by every pass. Shapes were validated by the caller.
pub struct LmArgs<'a> {
    /// [B, Tq, Hq, D]
    pub q: &'a View,
    /// [B, Tk, Hkv, D]
    pub k: &'a View,
    /// [B, Tk, Hkv, E]
    pub v: &'a View,
    /// [B, Tq, Hkv, n] int32 (retrieval mode)
    pub block_indices: Option<&'a View>,
    pub seqs: &'a [LmSeq],
    pub block: usize,
    pub scale: f64,
    pub hq: usize,
    pub hkv: usize,
}

/// Forward outputs: out [B, Tq, Hq, E] (input dtype), when given out_lo (out's rounding residual,
/// like out), lse [B, Tq, Hq] (f32, f64 for f64).
pub struct LmFwd<'a> {
    pub out: &'a View,
    pub out_lo: Option<&'a View>,
    pub lse: &'a View,
}

/// Backward: grad_out [B, Tq, Hq, E], lse and delta = Σ do·o [B, Tq, Hq] (state dtype), and the
/// gradients dq, dk, dv (written, input dtype).
pub struct LmBwd<'a> {
    pub dout: &'a View,
    pub lse: &'a View,
    pub delta: &'a View,
    pub dq: &'a View,
    pub dk: &'a View,
    pub dv: &'a View,
}

// ---------------------------------------------------------------------------------------------
// strided access

/// Row `t`, head `h`, batch `b` of a [B, T, H, D] view as a slice (the last stride is 1).
///
/// # Safety
/// The index must be inside the view, `T` its dtype, and the last stride 1 (or D ≤ 1).
#[inline(always)]
unsafe fn row<'a, T>(v: &View, b: usize, t: usize, h: usize) -> &'a mut [T] {
    let d = v.shape[3];
    if d == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(v.at::<T>(&[b, t, h, 0]), d) }
}

/// Read-only twin of `row` (inputs may be stride-0 expanded views shared by threads).
///
/// # Safety
/// As for `row`.
#[inline(always)]
unsafe fn row_ref<'a, T>(v: &View, b: usize, t: usize, h: usize) -> &'a [T] {
    let d = v.shape[3];
    if d == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(v.at::<T>(&[b, t, h, 0]), d) }
}

/// dst[..] = row upcast.
#[inline(always)]
unsafe fn load_row<I: Input>(v: &View, b: usize, t: usize, h: usize, dst: &mut [I::A]) {
    let src = unsafe { row_ref::<I>(v, b, t, h) };
    dst.iter_mut()
        .zip(src.iter())
        .for_each(|(d, s)| *d = s.load());
}

#[inline(always)]
unsafe fn store_row<I: Input>(v: &View, b: usize, t: usize, h: usize, src: &[I::A]) {
    let dst = unsafe { row::<I>(v, b, t, h) };
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = I::store(s));
}

/// `src` rounded into row (b, t, h) of `hi` and, when given, its rounding residual into `lo`.
#[inline(always)]
unsafe fn store_row_split<I: Input>(
    hi: &View,
    lo: Option<&View>,
    b: usize,
    t: usize,
    h: usize,
    src: &[I::A],
) {
    let Some(lo) = lo else {
        return unsafe { store_row::<I>(hi, b, t, h, src) };
    };
    let dst_hi = unsafe { row::<I>(hi, b, t, h) };
    let dst_lo = unsafe { row::<I>(lo, b, t, h) };
    for ((dh, dl), &s) in dst_hi.iter_mut().zip(dst_lo.iter_mut()).zip(src) {
        (*dh, *dl) = I::store_split(s);
    }
}

/// Element [b, t, h] of a rank-3 view.
#[inline(always)]
unsafe fn at3<T: Copy>(v: &View, b: usize, t: usize, h: usize) -> *mut T {
    unsafe { v.at::<T>(&[b, t, h]) }
}

// ---------------------------------------------------------------------------------------------
// tiles

/// Keys per key tile for a block size: whole blocks, about BK keys.
pub fn key_tile(block: usize) -> usize {
    let nb = BK.div_ceil(block).max(1);
    nb * block
}

/// What a query row does with one block of a key tile.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Skip,
    Current,
    Earlier,
}

/// A query tile: rows, positions and (retrieval) the listed blocks of each row.
struct QTile {
    b: usize,
    /// global query rows (token index in q)
    t0: usize,
    rows: usize,
    /// key position of row 0 (position of row r = pos0 + r)
    pos0: usize,
    /// retrieval: rows × nidx listed blocks
    idx: Option<Vec<i32>>,
    nidx: usize,
}

impl QTile {
    fn new(a: &LmArgs, s: &LmSeq, hkv: usize, i0: usize, rows: usize) -> QTile {
        let (idx, nidx) = match a.block_indices {
            None => (None, 0),
            Some(bi) => {
                let n = bi.shape[3];
                let mut idx = vec![-1i32; rows * n];
                for r in 0..rows {
                    for x in 0..n {
                        // SAFETY: validated [B, Tq, Hkv, n] int32 view.
                        idx[r * n + x] =
                            unsafe { *bi.at::<i32>(&[s.batch, s.q_start + i0 + r, hkv, x]) };
                    }
                }
                (Some(idx), n)
            }
        };
        QTile {
            b: s.batch,
            t0: s.q_start + i0,
            rows,
            pos0: i0 + s.k_len - s.q_len,
            idx,
            nidx,
        }
    }

    #[inline(always)]
    fn kind(&self, r: usize, j: usize, block: usize) -> Kind {
        let c = (self.pos0 + r) / block;
        if j > c {
            Kind::Skip
        } else if j == c {
            Kind::Current
        } else {
            match &self.idx {
                None => Kind::Earlier,
                Some(idx) => {
                    let l = &idx[r * self.nidx..(r + 1) * self.nidx];
                    if l.iter().any(|&x| x >= 0 && x as usize == j) {
                        Kind::Earlier
                    } else {
                        Kind::Skip
                    }
                }
            }
        }
    }

    /// Whether any row of this tile sees any key of the tile [k0, k0 + n).
    fn needs(&self, k0: usize, n: usize, block: usize) -> bool {
        if k0 > self.pos0 + self.rows - 1 {
            return false;
        }
        if self.idx.is_none() {
            return true;
        }
        let (j0, j1) = (k0 / block, (k0 + n).div_ceil(block));
        (0..self.rows).any(|r| (j0..j1).any(|j| self.kind(r, j, block) != Kind::Skip))
    }
}

/// Pass 1 over scaled scores `s` (rows × n, ld n): per (row, block of the tile) the kind and,
/// for earlier blocks, the block's largest effective logit g − log Σ exp(s − mb) (in `bmax`);
/// `e` gets s (current block, −∞ where invisible) or t = exp(s − mb) (ordinary tokens of
/// earlier blocks, 0 on the landmark). With `pi`, π = t / Σ t overwrites `s` on earlier blocks.
/// Returns nothing; the row maxima of the effective logits go to `rmax`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scores_pass1<A: Acc>(
    qt: &QTile,
    k0: usize,
    n: usize,
    block: usize,
    s: &mut [A],
    e: &mut [A],
    kinds: &mut [Kind],
    bmax: &mut [A],
    rmax: &mut [A],
    pi: bool,
) {
    let nbt = n.div_ceil(block);
    let j0 = k0 / block;
    for r in 0..qt.rows {
        let pos = qt.pos0 + r;
        let sr = &mut s[r * n..(r + 1) * n];
        let er = &mut e[r * n..(r + 1) * n];
        let mut row_max = A::NEG_INF;
        for jb in 0..nbt {
            let (c0, c1) = (jb * block, ((jb + 1) * block).min(n));
            let kind = qt.kind(r, j0 + jb, block);
            kinds[r * nbt + jb] = kind;
            let (sb, eb) = (&mut sr[c0..c1], &mut er[c0..c1]);
            match kind {
                Kind::Skip => {}
                Kind::Current => {
                    // keys k0 + c0 + x ≤ pos, landmark (x = block − 1) excluded
                    let visible = (pos + 1 - (k0 + c0)).min(block - 1).min(c1 - c0);
                    eb[..visible].copy_from_slice(&sb[..visible]);
                    eb[visible..].fill(A::NEG_INF);
                    row_max = row_max.maxf(vmax(&sb[..visible]));
                }
                Kind::Earlier => {
                    // a full block: ordinary 0..block−1, landmark at block − 1
                    let ord = &sb[..block - 1];
                    let mb = vmax(ord);
                    for (ev, &x) in eb[..block - 1].iter_mut().zip(ord) {
                        *ev = (x - mb).fexp();
                    }
                    eb[block - 1] = A::ZERO;
                    let l = vsum(&eb[..block - 1]);
                    let g = sb[block - 1];
                    let bm = g - l.ln();
                    bmax[r * nbt + jb] = bm;
                    row_max = row_max.maxf(bm);
                    if pi {
                        let inv = A::of(1.0 / l.f64());
                        for (sv, &t) in sb[..block - 1].iter_mut().zip(eb[..block - 1].iter()) {
                            *sv = t * inv;
                        }
                    }
                }
            }
        }
        rmax[r] = row_max;
    }
}

/// Pass 2: `e` ← exp(E − m_r) per row (0 where E = −∞), with m_r = `m[r]` finite.
#[inline(always)]
fn scores_pass2<A: Acc>(
    rows: usize,
    n: usize,
    block: usize,
    e: &mut [A],
    kinds: &[Kind],
    bmax: &[A],
    m: &[A],
) {
    let nbt = n.div_ceil(block);
    for r in 0..rows {
        let er = &mut e[r * n..(r + 1) * n];
        let mr = m[r];
        for jb in 0..nbt {
            let (c0, c1) = (jb * block, ((jb + 1) * block).min(n));
            let eb = &mut er[c0..c1];
            match kinds[r * nbt + jb] {
                Kind::Skip => eb.fill(A::ZERO),
                Kind::Current => eb.iter_mut().for_each(|x| *x = (*x - mr).fexp()),
                Kind::Earlier => {
                    let f = (bmax[r * nbt + jb] - mr).fexp();
                    eb.iter_mut().for_each(|x| *x = *x * f);
                }
            }
        }
    }
}

/// Per-thread scratch buffers of one tile pair.
struct Scratch<A> {
    q: Vec<A>,
    dout: Vec<A>,
    kt: Vec<A>,
    kr: Vec<A>,
    vt: Vec<A>,
    vr: Vec<A>,
    s: Vec<A>,
    e: Vec<A>,
    dp: Vec<A>,
    kinds: Vec<Kind>,
    bmax: Vec<A>,
    rmax: Vec<A>,
    lse: Vec<A>,
    delta: Vec<A>,
}

impl<A: Acc> Scratch<A> {
    fn new(d: usize, ev: usize, tk: usize, nbt: usize) -> Self {
        Scratch {
            q: vec![A::ZERO; BQ * d],
            dout: vec![A::ZERO; BQ * ev],
            kt: vec![A::ZERO; d * tk],
            kr: vec![A::ZERO; tk * d],
            vt: vec![A::ZERO; ev * tk],
            vr: vec![A::ZERO; tk * ev],
            s: vec![A::ZERO; BQ * tk],
            e: vec![A::ZERO; BQ * tk],
            dp: vec![A::ZERO; BQ * tk],
            kinds: vec![Kind::Skip; BQ * nbt],
            bmax: vec![A::ZERO; BQ * nbt],
            rmax: vec![A::ZERO; BQ],
            lse: vec![A::ZERO; BQ],
            delta: vec![A::ZERO; BQ],
        }
    }
}

/// The scaled scores scale·Q·Kᵀ of the loaded tiles (q, kt) into `w.s` (rows × n).
#[inline(always)]
fn tile_scores<A: Acc>(w: &mut Scratch<A>, rows: usize, n: usize, d: usize, scale: A) {
    let sbuf = &mut w.s[..rows * n];
    gemm(
        rows,
        n,
        d,
        Mat::rows(&w.q, d),
        Mat::rows(&w.kt, n),
        sbuf,
        n,
        None,
    );
    sbuf.iter_mut().for_each(|x| *x = *x * scale);
}

/// Loads key rows [k0, k0 + n) of (sequence, kv head): K transposed (d × n) and/or row-major.
#[allow(clippy::too_many_arguments)]
unsafe fn load_keys<I: Input>(
    x: &View,
    s: &LmSeq,
    h: usize,
    k0: usize,
    n: usize,
    tr: Option<&mut [I::A]>,
    rm: Option<&mut [I::A]>,
) {
    let d = x.shape[3];
    let mut tmp = vec![I::A::ZERO; d];
    let (mut tr, mut rm) = (tr, rm);
    for c in 0..n {
        let dst = match rm.as_deref_mut() {
            Some(rm) => &mut rm[c * d..(c + 1) * d],
            None => &mut tmp[..],
        };
        unsafe { load_row::<I>(x, s.batch, s.k_start + k0 + c, h, dst) };
        if let Some(tr) = tr.as_deref_mut() {
            for (dd, &val) in dst.iter().enumerate() {
                tr[dd * n + c] = val;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// forward

/// Runs the forward: writes out and lse.
pub fn forward(a: &LmArgs, f: &LmFwd) {
    by_dtype!(a.q.dtype, "landmark", I => forward_t::<I>(a, f))
}

/// (sequence, head, query tile) items, heaviest (last) tiles first.
fn q_items(a: &LmArgs, heads: usize) -> Vec<(usize, usize, usize)> {
    let mut items = Vec::new();
    for (si, s) in a.seqs.iter().enumerate() {
        for h in 0..heads {
            for t in 0..s.q_len.div_ceil(BQ) {
                items.push((si, h, t));
            }
        }
    }
    items
        .sort_by_key(|&(si, _, t)| std::cmp::Reverse(a.seqs[si].k_len - a.seqs[si].q_len + t * BQ));
    items
}

fn forward_t<I: Input>(a: &LmArgs, f: &LmFwd) {
    let fma = super::has_avx2_fma();
    let items = q_items(a, a.hq);
    POOL.install(|| {
        items.par_iter().for_each(|&(si, h, t)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { fwd_item_fma::<I>(a, f, si, h, t) };
                return;
            }
            let _ = fma;
            fwd_item::<I>(a, f, si, h, t);
        })
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_item_fma<I: Input>(a: &LmArgs, f: &LmFwd, si: usize, h: usize, t: usize) {
    fwd_item::<I>(a, f, si, h, t)
}

#[inline(always)]
fn fwd_item<I: Input>(a: &LmArgs, f: &LmFwd, si: usize, h: usize, t: usize) {
    let s = &a.seqs[si];
    let (d, ev, bs) = (a.q.shape[3], a.v.shape[3], a.block);
    let hk = h / (a.hq / a.hkv);
    let tk = key_tile(bs).min(s.k_len.max(1));
    let tk = tk.div_ceil(bs) * bs;
    let nbt_max = tk / bs;
    let i0 = t * BQ;
    let rows = BQ.min(s.q_len - i0);
    let qt = QTile::new(a, s, hk, i0, rows);
    let mut w = Scratch::<I::A>::new(d, ev, tk, nbt_max);
    let scale = I::A::of(a.scale);
    for r in 0..rows {
        unsafe { load_row::<I>(a.q, qt.b, qt.t0 + r, h, &mut w.q[r * d..(r + 1) * d]) };
    }
    let mut m = vec![I::A::NEG_INF; rows];
    let mut z = vec![I::A::ZERO; rows];
    let mut acc = vec![I::A::ZERO; rows * ev];
    let last_pos = qt.pos0 + rows - 1;
    let mut k0 = 0;
    while k0 <= last_pos && k0 < s.k_len {
        let n = tk.min(s.k_len - k0);
        if qt.needs(k0, n, bs) {
            unsafe {
                load_keys::<I>(a.k, s, hk, k0, n, Some(&mut w.kt[..d * n]), None);
                load_keys::<I>(a.v, s, hk, k0, n, None, Some(&mut w.vr[..n * ev]));
            }
            tile_scores(&mut w, rows, n, d, scale);
            let sbuf = &mut w.s[..rows * n];
            scores_pass1(
                &qt,
                k0,
                n,
                bs,
                sbuf,
                &mut w.e,
                &mut w.kinds,
                &mut w.bmax,
                &mut w.rmax,
                false,
            );
            let mut alpha = vec![I::A::ZERO; rows];
            for r in 0..rows {
                let m_new = m[r].maxf(w.rmax[r]);
                w.rmax[r] = m_new;
                alpha[r] = if m_new == I::A::NEG_INF {
                    I::A::of(1.0)
                } else {
                    (m[r] - m_new).fexp()
                };
            }
            scores_pass2(rows, n, bs, &mut w.e, &w.kinds, &w.bmax, &w.rmax);
            for r in 0..rows {
                let er = &mut w.e[r * n..(r + 1) * n];
                if w.rmax[r] == I::A::NEG_INF {
                    er.fill(I::A::ZERO);
                    continue;
                }
                z[r] = z[r] * alpha[r] + vsum(er);
                m[r] = w.rmax[r];
                if alpha[r] != I::A::of(1.0) {
                    let a_r = alpha[r];
                    acc[r * ev..(r + 1) * ev]
                        .iter_mut()
                        .for_each(|x| *x = *x * a_r);
                }
            }
            let (e, vr) = (Mat::rows(&w.e, n), Mat::rows(&w.vr, ev));
            gemm(rows, ev, n, e, vr, &mut acc, ev, Some(I::A::ONE));
        }
        k0 += tk;
    }
    let one = I::A::of(1.0);
    for r in 0..rows {
        let inv = I::A::of(one.f64() / z[r].f64());
        let ar = &mut acc[r * ev..(r + 1) * ev];
        ar.iter_mut().for_each(|x| *x = *x * inv);
        unsafe {
            store_row_split::<I>(f.out, f.out_lo, qt.b, qt.t0 + r, h, ar);
            *at3::<I::A>(f.lse, qt.b, qt.t0 + r, h) = m[r] + z[r].ln();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// backward

/// Runs the backward: writes dq, dk, dv.
pub fn backward(a: &LmArgs, g: &LmBwd) {
    by_dtype!(a.q.dtype, "landmark", I => backward_t::<I>(a, g))
}

fn backward_t<I: Input>(a: &LmArgs, g: &LmBwd) {
    let fma = super::has_avx2_fma();
    let qi = q_items(a, a.hq);
    let mut ki = Vec::new();
    for (si, s) in a.seqs.iter().enumerate() {
        let tk = key_tile(a.block);
        for h in 0..a.hkv {
            for t in 0..s.k_len.div_ceil(tk) {
                ki.push((si, h, t));
            }
        }
    }
    // earliest key tiles see the most queries
    ki.sort_by_key(|&(_, _, t)| t);
    POOL.install(|| {
        qi.par_iter().for_each(|&(si, h, t)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { dq_item_fma::<I>(a, g, si, h, t) };
                return;
            }
            let _ = fma;
            dq_item::<I>(a, g, si, h, t);
        });
        ki.par_iter().for_each(|&(si, h, t)| {
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { dkv_item_fma::<I>(a, g, si, h, t) };
                return;
            }
            dkv_item::<I>(a, g, si, h, t);
        });
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dq_item_fma<I: Input>(a: &LmArgs, g: &LmBwd, si: usize, h: usize, t: usize) {
    dq_item::<I>(a, g, si, h, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dkv_item_fma<I: Input>(a: &LmArgs, g: &LmBwd, si: usize, h: usize, t: usize) {
    dkv_item::<I>(a, g, si, h, t)
}

/// Loads q, do, lse and delta of a query tile into the scratch.
#[inline(always)]
fn load_q_tile<I: Input>(a: &LmArgs, g: &LmBwd, qt: &QTile, h: usize, w: &mut Scratch<I::A>) {
    let (d, ev) = (a.q.shape[3], a.v.shape[3]);
    for r in 0..qt.rows {
        unsafe {
            load_row::<I>(a.q, qt.b, qt.t0 + r, h, &mut w.q[r * d..(r + 1) * d]);
            load_row::<I>(
                g.dout,
                qt.b,
                qt.t0 + r,
                h,
                &mut w.dout[r * ev..(r + 1) * ev],
            );
            w.lse[r] = *at3::<I::A>(g.lse, qt.b, qt.t0 + r, h);
            w.delta[r] = *at3::<I::A>(g.delta, qt.b, qt.t0 + r, h);
        }
    }
}

/// With q, do, lse, delta and the key tile (kt, vt) loaded: P in `e`, dS (unscaled by `scale`)
/// in `dp`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_grads<A: Acc>(
    qt: &QTile,
    k0: usize,
    n: usize,
    bs: usize,
    d: usize,
    ev: usize,
    scale: A,
    w: &mut Scratch<A>,
) {
    let rows = qt.rows;
    tile_scores(w, rows, n, d, scale);
    let sbuf = &mut w.s[..rows * n];
    // P = exp(E − lse); π overwrites s on earlier blocks
    scores_pass1(
        qt,
        k0,
        n,
        bs,
        sbuf,
        &mut w.e,
        &mut w.kinds,
        &mut w.bmax,
        &mut w.rmax,
        true,
    );
    scores_pass2(rows, n, bs, &mut w.e, &w.kinds, &w.bmax, &w.lse);
    let dp = &mut w.dp[..rows * n];
    gemm(
        rows,
        n,
        ev,
        Mat::rows(&w.dout, ev),
        Mat::rows(&w.vt, n),
        dp,
        n,
        None,
    );
    let nbt = n.div_ceil(bs);
    for r in 0..rows {
        let er = &w.e[r * n..(r + 1) * n];
        let dr = &mut w.dp[r * n..(r + 1) * n];
        let delta = w.delta[r];
        // dE = P∘(dP − Δ)
        dr.iter_mut()
            .zip(er.iter())
            .for_each(|(dv, &p)| *dv = p * (*dv - delta));
        let pr = &w.s[r * n..(r + 1) * n];
        for jb in 0..nbt {
            let (c0, c1) = (jb * bs, ((jb + 1) * bs).min(n));
            match w.kinds[r * nbt + jb] {
                Kind::Skip => dr[c0..c1].fill(A::ZERO),
                Kind::Current => {}
                Kind::Earlier => {
                    let db = &mut dr[c0..c1];
                    let sum = vsum(&db[..bs - 1]);
                    for (dv, &p) in db[..bs - 1].iter_mut().zip(&pr[c0..c0 + bs - 1]) {
                        *dv = *dv - p * sum;
                    }
                    db[bs - 1] = sum;
                }
            }
        }
    }
}

#[inline(always)]
fn dq_item<I: Input>(a: &LmArgs, g: &LmBwd, si: usize, h: usize, t: usize) {
    let s = &a.seqs[si];
    let (d, ev, bs) = (a.q.shape[3], a.v.shape[3], a.block);
    let hk = h / (a.hq / a.hkv);
    let tk = key_tile(bs);
    let i0 = t * BQ;
    let rows = BQ.min(s.q_len - i0);
    let qt = QTile::new(a, s, hk, i0, rows);
    let mut w = Scratch::<I::A>::new(d, ev, tk, tk / bs);
    let scale = I::A::of(a.scale);
    load_q_tile::<I>(a, g, &qt, h, &mut w);
    let mut dq = vec![I::A::ZERO; rows * d];
    let last_pos = qt.pos0 + rows - 1;
    let mut k0 = 0;
    while k0 <= last_pos && k0 < s.k_len {
        let n = tk.min(s.k_len - k0);
        if qt.needs(k0, n, bs) {
            unsafe {
                load_keys::<I>(
                    a.k,
                    s,
                    hk,
                    k0,
                    n,
                    Some(&mut w.kt[..d * n]),
                    Some(&mut w.kr[..n * d]),
                );
                load_keys::<I>(a.v, s, hk, k0, n, Some(&mut w.vt[..ev * n]), None);
            }
            tile_grads::<I::A>(&qt, k0, n, bs, d, ev, scale, &mut w);
            let (ds, kr) = (Mat::rows(&w.dp, n), Mat::rows(&w.kr, d));
            gemm(rows, d, n, ds, kr, &mut dq, d, Some(I::A::ONE));
        }
        k0 += tk;
    }
    for r in 0..rows {
        let x = &mut dq[r * d..(r + 1) * d];
        x.iter_mut().for_each(|y| *y = *y * scale);
        unsafe { store_row::<I>(g.dq, qt.b, qt.t0 + r, h, x) };
    }
}

#[inline(always)]
fn dkv_item<I: Input>(a: &LmArgs, g: &LmBwd, si: usize, hk: usize, t: usize) {
    let s = &a.seqs[si];
    let (d, ev, bs) = (a.q.shape[3], a.v.shape[3], a.block);
    let groups = a.hq / a.hkv;
    let tk = key_tile(bs);
    let k0 = t * tk;
    let n = tk.min(s.k_len - k0);
    let mut w = Scratch::<I::A>::new(d, ev, tk, tk / bs);
    let scale = I::A::of(a.scale);
    let mut dk = vec![I::A::ZERO; n * d];
    let mut dv = vec![I::A::ZERO; n * ev];
    unsafe {
        load_keys::<I>(a.k, s, hk, k0, n, Some(&mut w.kt[..d * n]), None);
        load_keys::<I>(a.v, s, hk, k0, n, Some(&mut w.vt[..ev * n]), None);
    }
    let off = s.k_len - s.q_len;
    // first query row whose position reaches k0
    let first = k0.saturating_sub(off);
    for h in hk * groups..(hk + 1) * groups {
        let mut i0 = first / BQ * BQ;
        while i0 < s.q_len {
            let rows = BQ.min(s.q_len - i0);
            let qt = QTile::new(a, s, hk, i0, rows);
            if qt.needs(k0, n, bs) {
                load_q_tile::<I>(a, g, &qt, h, &mut w);
                tile_grads::<I::A>(&qt, k0, n, bs, d, ev, scale, &mut w);
                // dV += Pᵀ dO, dK += dSᵀ Q
                let (pt, dst) = (Mat::transposed(&w.e, n), Mat::transposed(&w.dp, n));
                gemm(
                    n,
                    ev,
                    rows,
                    pt,
                    Mat::rows(&w.dout, ev),
                    &mut dv,
                    ev,
                    Some(I::A::ONE),
                );
                gemm(
                    n,
                    d,
                    rows,
                    dst,
                    Mat::rows(&w.q, d),
                    &mut dk,
                    d,
                    Some(I::A::ONE),
                );
            }
            i0 += BQ;
        }
    }
    for c in 0..n {
        let x = &mut dk[c * d..(c + 1) * d];
        x.iter_mut().for_each(|y| *y = *y * scale);
        unsafe {
            store_row::<I>(g.dk, s.batch, s.k_start + k0 + c, hk, x);
            store_row::<I>(
                g.dv,
                s.batch,
                s.k_start + k0 + c,
                hk,
                &dv[c * ev..(c + 1) * ev],
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// top-k blocks

/// Arguments of `topk_blocks`: q [B, Tq, Hq, D], k [B, Tk, Hkv, D], out [B, Tq, Hkv, topk]
/// int32 (written).
pub struct LmTopk<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub out: &'a View,
    pub seqs: &'a [LmSeq],
    pub block: usize,
    pub scale: f64,
    pub hq: usize,
    pub hkv: usize,
}

/// For every (query, kv head): the `topk` earlier full blocks with the largest landmark logit
/// (max over the kv group's query heads), sorted ascending, −1 padded. Ties keep the lower
/// block index.
pub fn topk_blocks(a: &LmTopk) {
    by_dtype!(a.q.dtype, "landmark", I => topk_t::<I>(a))
}

fn topk_t<I: Input>(a: &LmTopk) {
    let mut items = Vec::new();
    for (si, s) in a.seqs.iter().enumerate() {
        for h in 0..a.hkv {
            for t in 0..s.q_len.div_ceil(BQ) {
                items.push((si, h, t));
            }
        }
    }
    POOL.install(|| {
        items
            .par_iter()
            .for_each(|&(si, hk, t)| topk_item::<I>(a, si, hk, t));
    });
}

fn topk_item<I: Input>(a: &LmTopk, si: usize, hk: usize, t: usize) {
    let s = &a.seqs[si];
    let (d, bs, kk) = (a.q.shape[3], a.block, a.out.shape[3]);
    let groups = a.hq / a.hkv;
    let i0 = t * BQ;
    let rows = BQ.min(s.q_len - i0);
    let off = s.k_len - s.q_len;
    let last_c = (i0 + rows - 1 + off) / bs;
    // landmark keys of blocks 0..last_c (all full)
    let mut lk = vec![0f64; last_c * d];
    let mut tmp = vec![I::A::ZERO; d];
    for j in 0..last_c {
        unsafe { load_row::<I>(a.k, s.batch, s.k_start + j * bs + bs - 1, hk, &mut tmp) };
        for x in 0..d {
            lk[j * d + x] = tmp[x].f64();
        }
    }
    let mut qv = vec![0f64; groups * d];
    let mut scores: Vec<(f64, usize)> = Vec::with_capacity(last_c);
    for r in 0..rows {
        let c = (i0 + r + off) / bs;
        for gi in 0..groups {
            unsafe { load_row::<I>(a.q, s.batch, s.q_start + i0 + r, hk * groups + gi, &mut tmp) };
            for x in 0..d {
                qv[gi * d + x] = tmp[x].f64();
            }
        }
        scores.clear();
        for j in 0..c {
            let kj = &lk[j * d..(j + 1) * d];
            let mut best = f64::NEG_INFINITY;
            for gi in 0..groups {
                let qg = &qv[gi * d..(gi + 1) * d];
                let dot: f64 = qg.iter().zip(kj).map(|(x, y)| x * y).sum();
                let sc = dot * a.scale;
                if sc > best || best.is_nan() {
                    best = sc;
                }
            }
            // NaN scores rank last
            scores.push((
                if best.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    best
                },
                j,
            ));
        }
        let keep = kk.min(scores.len());
        if keep < scores.len() {
            scores.select_nth_unstable_by(keep, |x, y| {
                y.0.partial_cmp(&x.0).unwrap().then(x.1.cmp(&y.1))
            });
        }
        let mut sel: Vec<usize> = scores[..keep].iter().map(|x| x.1).collect();
        sel.sort_unstable();
        for x in 0..kk {
            let val = if x < sel.len() { sel[x] as i32 } else { -1 };
            unsafe { *a.out.at::<i32>(&[s.batch, s.q_start + i0 + r, hk, x]) = val };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::num::exp_f32;

    #[test]
    fn landmark_exp_f32_accuracy() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn landmark_key_tiles_hold_whole_blocks() {
        for bs in [2, 4, 5, 51, 64, 100, 1000] {
            let t = key_tile(bs);
            assert!(t % bs == 0 && t >= BK.min(bs));
        }
    }
}
