// Landmark attention (docs/api/landmark.md): forward, backward (dQ; dK/dV), top-k retrieval.
//
// The grouped softmax is one flat softmax over effective logits (natural-log form; the kernels
// work in log2 units, s2 = log2(e)·scale·q·k):
//   current block (p ∈ S_i):            E_ip = s_ip
//   ordinary p of an earlier block j:   E_ip = s_ip − lse_ij + s_iℓj   (lse_ij over the ordinary
//                                       tokens of block j)
//   landmarks, future keys, skipped:    E = −∞
// Σ_{p∈j} exp(E_ip) = exp(s_iℓj), so exp(E − lse_i) are the weights w and lse_i = log Z_i.
//
// Key tiles hold whole landmark blocks (block_size ≤ KT; larger blocks: LM_MULTI below): nbt =
// KT / block_size blocks of one (sequence, kv head), starting at a block boundary, so every inner
// softmax is a segmented row reduction inside the tile (quad shuffles). A CTA has NW = 4 warps; warp w owns query rows
// 16w .. 16w + 15 of a BQ = 64 query tile (mma.sync m16n8k16 for f16/bf16, 3xTF32 for f32).
//
// Forward, per key tile: S = Q Kᵀ; a row bound M_i = max(landmark logits of earlier blocks,
// visible current logits) (every E of an earlier block is ≤ its landmark logit); per block:
// t = exp2(s − max_j), Σ t, and P = t · exp2(s_ℓj − M) / Σt (earlier) or exp2(s − M) (current);
// then FlashAttention's online rescaling with M and O += P V. Saves lse (natural log).
// Backward, per (query tile, key tile): P = exp(E − lse), dP = dO Vᵀ and per earlier block
// c_ij = Σ π dP (π the inner softmax), G_ij = exp(s_ℓj − lse_i):
//   ds = P (dP − c) (ordinary, earlier), ds_ℓ = G (c − Δ), ds = P (dP − Δ) (current).
// dQ: grid over query tiles (dQ += dS K); dK/dV: grid over key tiles, looping over the query
// tiles and heads of the kv group (dV += Pᵀ dO, dK += dSᵀ Q, P and dS through shared memory).
// No atomics: every output element is written by exactly one CTA (deterministic).
//
// Retrieval (block_indices): a query tile visits only key tiles that hold a listed earlier block
// or the current block of one of its rows (the next such tile is found by a CTA-wide minimum),
// and rows mask the blocks they did not list.
//
// Compile-time specialisation (-D): LM_ELEM (0 f32/3xTF32, 1 f16, 2 bf16), LM_DP (padded head
// dim of q/k and v: 32, 64 or 128), LM_KT (keys per tile: 64), LM_ONE (1: the launcher
// guarantees KT/2 < block_size ≤ KT, so a key tile is one landmark block and the fast row
// phases fwd_probs1/bwd_probs1 run; 0: the general segmented row phases, several blocks per
// tile), LM_MULTI (1: block_size > KT, a block spans several key tiles; kernels of the section
// "Blocks longer than a key tile" below). Separate modules keep the register allocation of each
// path tight.
#include "common.cuh"

#ifndef LM_ONE
#define LM_ONE 0
#endif
#ifndef LM_MULTI
#define LM_MULTI 0
#endif
#ifndef LM_SM90
#define LM_SM90 0
#endif
#ifndef LM_BS
#define LM_BS 0
#endif

#define LM_NW 4
#define LM_THREADS 128
#define LM_BQ 64
#define LM_BIG 0x7fffffff
#define TOPK_THREADS 128

#define K_SKIP 0
#define K_CUR 1
#define K_EARLY 2

struct LmParams {
  const void *q, *k, *v;
  void *out;
  void *out_lo; // out's rounding residual (strides so), or null: not stored
  float *lse;
  const void *dout;
  const float *delta;
  void *dq, *dk, *dv;
  const int *bidx;
  const void *cu_seqlens;
  int *topk_out;
  i64 sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3], sdk[3], sdv[3]; // batch, token, head (elements)
  i64 slse[3], sdl[3];                                             // lse, delta [B, Tq, Hq]
  i64 sbi[4];                                                      // block_indices [B, Tq, Hkv, n]
  i64 stk[4];                                                      // top-k output [B, Tq, Hkv, k]
  int Tq, Tk, Hq, Hkv, D, E, bs, nidx, topk, nseq;
  int cu_kind; // -1: none, 0: int32, 1: int64
  int vec_q, vec_k, vec_v, vec_do;
  float scale, scale_log2;
};
CHECK_MIRROR(LmParams);

struct LmSeq {
  int b;
  i64 qs, ks; // first query / key token
  int ql, kl; // queries, keys
};

// Sequence n (queries and keys share the offsets).
__device__ __forceinline__ LmSeq seq_of(const LmParams &p, int n) {
  LmSeq s;
  if (p.cu_kind < 0) {
    s.b = n;
    s.qs = 0;
    s.ks = 0;
    s.ql = p.Tq;
    s.kl = p.Tk;
    return s;
  }
  i64 s0, s1;
  sequence_span(p.cu_seqlens, p.cu_kind, n, p.Tq, s0, s1);
  s.b = 0;
  s.qs = s0;
  s.ks = s0;
  s.ql = (int)(s1 - s0);
  s.kl = s.ql;
  return s;
}

// The two query rows a thread owns in the mma accumulator layout (rows g and g + 8 of its warp).
struct Rows {
  int pos[2], c[2];
  bool valid[2];
  const int *bi[2];
};

__device__ __forceinline__ void make_rows(const LmParams &p, const LmSeq &s, int hk, int i0,
                                          int rows, int warp, int g, Rows &R) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    R.valid[rr] = r < rows;
    R.pos[rr] = i0 + r + (s.kl - s.ql);
    R.c[rr] = R.pos[rr] / p.bs;
    R.bi[rr] = (p.bidx != nullptr && R.valid[rr])
                   ? p.bidx + s.b * p.sbi[0] + (s.qs + i0 + r) * p.sbi[1] + hk * p.sbi[2]
                   : nullptr;
  }
}

// Bit jb set: block j0 + jb (jb < nbt ≤ 32) is an earlier block the row attends to. Called by
// all lanes (the quad splits the index list and ORs its findings).
__device__ __forceinline__ u32 early_mask(const LmParams &p, const Rows &R, int rr, int j0, int nbt,
                                          int t4) {
  u32 m = 0;
  if (R.valid[rr]) {
    const int hi = min(R.c[rr], j0 + nbt);
    if (hi > j0) {
      if (p.bidx == nullptr) {
        if (t4 == 0) m = (hi - j0 >= 32) ? FULL_MASK : ((1u << (hi - j0)) - 1u);
      } else {
        for (int x = t4; x < p.nidx; x += 4) {
          const int j = R.bi[rr][x * p.sbi[3]];
          if (j >= j0 && j < hi) m |= 1u << (j - j0);
        }
      }
    }
  }
  m |= __shfl_xor_sync(FULL_MASK, m, 1);
  m |= __shfl_xor_sync(FULL_MASK, m, 2);
  return m;
}

__device__ __forceinline__ int kind_of(const Rows &R, int rr, u32 em, int j0, int jb) {
  if (!R.valid[rr]) return K_SKIP;
  if (j0 + jb == R.c[rr]) return K_CUR;
  return ((em >> jb) & 1u) ? K_EARLY : K_SKIP;
}

// Smallest block index ≥ jlo that one of the thread's rows needs (LM_BIG if none); quad-reduced.
__device__ __forceinline__ int next_block(const LmParams &p, const Rows &R, int jlo, int t4) {
  int best = LM_BIG;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (!R.valid[rr]) continue;
    const int c = R.c[rr];
    if (c < jlo) continue;
    if (p.bidx == nullptr) {
      best = min(best, jlo);
    } else {
      best = min(best, c);
      for (int x = t4; x < p.nidx; x += 4) {
        const int j = R.bi[rr][x * p.sbi[3]];
        if (j >= jlo && j < c) best = min(best, j);
      }
    }
  }
  best = min(best, __shfl_xor_sync(FULL_MASK, best, 1));
  return min(best, __shfl_xor_sync(FULL_MASK, best, 2));
}

__device__ __forceinline__ int cta_min(int v, int *red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_min(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  int r = red[0];
#pragma unroll
  for (int w = 1; w < LM_NW; ++w) r = min(r, red[w]);
  __syncthreads();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Row phase of one key tile for a warp's 16 query rows. S holds log2-scaled scores of columns
// 8f + 2·t4 + e (rows g: S[f][e], g + 8: S[f][2 + e]); key tile [k0, k0 + nk), blocks j0 + jb.

// Forward: turns S into P relative to the new running maxima (mu, log2 units) and rescales the
// running state. Returns alpha per row (the rescale factor of l and O).
template <int NF>
__device__ __forceinline__ void fwd_probs(float (*S)[4], const Rows &R, const u32 *em, int j0,
                                          int nbt, int k0, int nk, int bs, float *m, float *mu,
                                          float *alpha) {
  const int t4 = threadIdx.x & 3;
  float mb[2] = {NEG_INF, NEG_INF};
  for (int jb = 0; jb < nbt; ++jb) {
    const int lo = jb * bs, lm = lo + bs - 1;
    if (lo >= nk) break;
    int kd[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) kd[rr] = kind_of(R, rr, em[rr], j0, jb);
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const bool use = kd[rr] == K_EARLY
                               ? col == lm
                               : (kd[rr] == K_CUR && col != lm && k0 + col <= R.pos[rr]);
          if (use) mb[rr] = fmaxf(mb[rr], S[f][2 * rr + e]);
        }
      }
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float bound = quad_max(mb[rr]);
    const float m_new = fmaxf(m[rr], bound);
    mu[rr] = m_new == NEG_INF ? 0.f : m_new;
    alpha[rr] = fast_exp2(m[rr] - mu[rr]); // 0 when m was −∞
    m[rr] = m_new;
  }
  // columns past the tile's keys
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (8 * f + 2 * t4 + e >= nk) S[f][e] = S[f][2 + e] = 0.f;
  for (int jb = 0; jb < nbt; ++jb) {
    const int lo = jb * bs, lm = lo + bs - 1;
    if (lo >= nk) break;
    int kd[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) kd[rr] = kind_of(R, rr, em[rr], j0, jb);
    float mx[2] = {NEG_INF, NEG_INF}, gl[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          if (col == lm) gl[rr] = fmaxf(gl[rr], S[f][2 * rr + e]);
          else mx[rr] = fmaxf(mx[rr], S[f][2 * rr + e]);
        }
      }
    float sm[2] = {0.f, 0.f};
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = quad_max(mx[rr]);
      gl[rr] = quad_max(gl[rr]);
    }
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float &x = S[f][2 * rr + e];
          if (kd[rr] == K_EARLY) {
            if (col == lm) {
              x = 0.f;
            } else {
              x = fast_exp2(x - mx[rr]);
              sm[rr] += x;
            }
          } else if (kd[rr] == K_CUR && col != lm && k0 + col <= R.pos[rr]) {
            x = fast_exp2(x - mu[rr]);
          } else {
            x = 0.f;
          }
        }
      }
    float fac[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      sm[rr] = quad_sum(sm[rr]);
      fac[rr] = kd[rr] == K_EARLY ? fast_exp2(gl[rr] - mu[rr]) / sm[rr] : 1.f;
    }
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr)
          if (kd[rr] == K_EARLY) S[f][2 * rr + e] *= fac[rr];
      }
  }
}

// Forward row phase for a block size BS known at compile time (the Hopper path's common sizes):
// a tile of NF·8 columns holds NB = NF·8 / BS whole blocks, so which block a column belongs to is
// a compile-time choice between at most two (BS need not be a multiple of 8), and the row state
// per block lives in registers. One pass masks the scores (a column is visible iff it lies below
// its block's limit: ordinary keys of an earlier block, visible ordinary keys of the current
// one) and takes per-block maxima; one pass exponentiates and sums per block; one scales the
// earlier blocks by exp2(s_ℓ − M) / Σ. S holds log2-scaled scores.
template <int NF, int BS> struct FixedBlocks {
  static constexpr int NB = NF * 8 / BS;
  // block of the column 8f + e + 2·t4 for t4 = 0 and t4 = 3 (NB: past the tile's blocks)
  static __device__ __forceinline__ constexpr int lo(int f, int e) {
    return (8 * f + e) / BS < NB ? (8 * f + e) / BS : NB;
  }
  static __device__ __forceinline__ constexpr int hi(int f, int e) {
    return (8 * f + e + 6) / BS < NB ? (8 * f + e + 6) / BS : NB;
  }
};

template <int NF, int BS>
__device__ __forceinline__ void fwd_probs_fixed(float (*S)[4], const Rows &R, const u32 *em, int j0, int k0,
                                                int nk, float *m, float *alpha, float *ps) {
  typedef FixedBlocks<NF, BS> FB;
  constexpr int NB = FB::NB;
  const int lane = threadIdx.x & 31, t4 = lane & 3;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    // limit (exclusive, tile column) of the visible keys of each block; kind per block
    int lim[NB + 1];
    bool early[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      const int kd = kind_of(R, rr, em[rr], j0, jb);
      early[jb] = kd == K_EARLY;
      int l = jb * BS + BS - 1; // the landmark column is never visible
      l = min(l, nk);
      if (kd == K_CUR) l = min(l, R.pos[rr] - k0 + 1);
      lim[jb] = kd == K_SKIP ? 0 : l;
    }
    lim[NB] = 0;
    // landmark logits, before masking (each owned by one lane of the quad)
    float gl[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      const int lc = jb * BS + BS - 1;
      gl[jb] = __shfl_sync(FULL_MASK, S[lc >> 3][2 * rr + (lc & 1)], (lane & ~3) | ((lc & 7) >> 1));
    }
    float mx[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) mx[jb] = NEG_INF;
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        const int a = FB::lo(f, e), b = FB::hi(f, e);
        float &x = S[f][2 * rr + e];
        if (a == b) {
          x = col < lim[a] ? x : NEG_INF;
          if (a < NB) mx[a] = fmaxf(mx[a], x);
        } else {
          const bool up = col >= b * BS;
          x = col < (up ? lim[b] : lim[a]) ? x : NEG_INF;
          if (up) {
            if (b < NB) mx[b] = fmaxf(mx[b], x);
          } else {
            mx[a] = fmaxf(mx[a], x);
          }
        }
      }
    // the row bound M: landmark logits of earlier blocks, visible logits of the current one
    float bound = NEG_INF;
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      mx[jb] = quad_max(mx[jb]);
      bound = fmaxf(bound, early[jb] ? gl[jb] : mx[jb]);
    }
    const float m_new = fmaxf(m[rr], bound);
    const float mu = m_new == NEG_INF ? 0.f : m_new;
    alpha[rr] = fast_exp2(m[rr] - mu); // 0 when m was −∞
    m[rr] = m_new;
    float ref[NB + 1], sum[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      ref[jb] = early[jb] ? mx[jb] : mu;
      sum[jb] = 0.f;
    }
    ref[NB] = mu;
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        const int a = FB::lo(f, e), b = FB::hi(f, e);
        float &x = S[f][2 * rr + e];
        const bool up = a != b && col >= b * BS;
        x = fast_exp2(x - (up ? ref[b] : ref[a])); // masked: exp2(−∞) = 0
        if (up) {
          if (b < NB) sum[b] += x;
        } else if (a < NB) {
          sum[a] += x;
        }
      }
    float fac[NB + 1];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      const float total = quad_sum(sum[jb]); // every lane shuffles, whatever its rows' kinds
      fac[jb] = early[jb] ? fast_exp2(gl[jb] - mu) / total : 1.f;
    }
    fac[NB] = 0.f;
    float acc = 0.f;
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        const int a = FB::lo(f, e), b = FB::hi(f, e);
        float &x = S[f][2 * rr + e];
        const bool up = a != b && col >= b * BS;
        x *= up ? fac[b] : fac[a];
        acc += x;
      }
    ps[rr] = acc;
  }
}

// Forward fast path for tiles of one landmark block (nbt == 1, 33 ≤ block_size ≤ 64): a row's
// whole tile is of one kind, so each score needs one masked max, one exp2 and one multiply.
// S holds raw scores (scaled here). Columns: ordinary keys col < lim (lim = bs − 1 for an
// earlier block, clipped by the causal bound and nk for the current one), landmark col == lm.
// One block per tile (fwd_probs1, bwd_probs1): the scores in log2 units with the columns a row
// does not attend at −∞, each row's kind (kd), this lane's part of the row's ordinary maximum
// (mx) and landmark score (gl), to be reduced over the quad, and the landmark column relative to
// this lane's (lmr; −1 when outside the tile).
template <int NF>
__device__ __forceinline__ void one_block_scores(float (*S)[4], const Rows &R, const u32 *em,
                                                 int j0, int k0, int nk, int bs, float scale_log2,
                                                 int *kd, float *mx, float *gl, int &lmr) {
  const int t4 = threadIdx.x & 3;
  const int lm = bs - 1;
  int lim[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    kd[rr] = kind_of(R, rr, em[rr], j0, 0);
    const int ord = min(lm, nk);
    lim[rr] = kd[rr] == K_EARLY ? ord
              : kd[rr] == K_CUR ? min(ord, R.pos[rr] - k0 + 1)
                                : 0;
    lim[rr] -= 2 * t4; // compared with the compile-time part 8f + e of the column
  }
  lmr = lm < nk ? lm - 2 * t4 : -1; // the landmark column, relative likewise
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) mx[rr] = gl[rr] = NEG_INF;
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int cc = 8 * f + e; // column 8f + 2·t4 + e
      const bool is_lm = cc == lmr;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float x = S[f][2 * rr + e] * scale_log2;
        if (is_lm) gl[rr] = x;
        x = cc < lim[rr] ? x : NEG_INF;
        mx[rr] = fmaxf(mx[rr], x);
        S[f][2 * rr + e] = x;
      }
    }
}

// Earlier block: π = exp2(s − mx) / Σ, P = π · exp2(s_ℓ − M); current: P = exp2(s − M).
// Returns alpha (rescale of l and O) and ps (this thread's partial row sum of P).
template <int NF>
__device__ __forceinline__ void fwd_probs1(float (*S)[4], const Rows &R, const u32 *em, int j0,
                                           int k0, int nk, int bs, float scale_log2, float *m,
                                           float *alpha, float *ps) {
  int kd[2], lmr;
  float mx[2], gl[2], ref[2];
  one_block_scores<NF>(S, R, em, j0, k0, nk, bs, scale_log2, kd, mx, gl, lmr);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    mx[rr] = quad_max(mx[rr]);
    gl[rr] = quad_max(gl[rr]);
    const bool early = kd[rr] == K_EARLY;
    const float bound = early ? gl[rr] : mx[rr];
    const float m_new = fmaxf(m[rr], bound);
    const float mu = m_new == NEG_INF ? 0.f : m_new;
    alpha[rr] = fast_exp2(m[rr] - mu); // 0 when m was −∞
    m[rr] = m_new;
    // earlier block: exponents relative to the block's ordinary maximum (finite: bs − 1 ≥ 1
    // ordinary keys); otherwise relative to the running maximum
    ref[rr] = early ? (mx[rr] == NEG_INF ? 0.f : mx[rr]) : mu;
    gl[rr] = early ? fast_exp2(gl[rr] - mu) : 1.f; // exp2(s_ℓ − M): the block's total weight
  }
  float sm[2] = {0.f, 0.f};
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float t = fast_exp2(S[f][2 * rr + e] - ref[rr]); // masked: exp2(−∞) = 0
        S[f][2 * rr + e] = t;
        sm[rr] += t;
      }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float tot = quad_sum(sm[rr]);
    const float fac = kd[rr] == K_EARLY ? gl[rr] / tot : 1.f;
    ps[rr] = sm[rr] * fac;
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      S[f][2 * rr] *= fac;
      S[f][2 * rr + 1] *= fac;
    }
  }
}

// Backward: S (log2-scaled scores) -> P, dP (= dO·vᵀ) -> dS (natural units), given lse2 (log2
// units) and delta per row.
template <int NF>
__device__ __forceinline__ void bwd_probs(float (*S)[4], float (*dP)[4], const Rows &R,
                                          const u32 *em, int j0, int nbt, int k0, int nk, int bs,
                                          const float *lse2, const float *dl) {
  const int t4 = threadIdx.x & 3;
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (8 * f + 2 * t4 + e >= nk) S[f][e] = S[f][2 + e] = dP[f][e] = dP[f][2 + e] = 0.f;
  for (int jb = 0; jb < nbt; ++jb) {
    const int lo = jb * bs, lm = lo + bs - 1;
    if (lo >= nk) break;
    int kd[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) kd[rr] = kind_of(R, rr, em[rr], j0, jb);
    float mx[2] = {NEG_INF, NEG_INF}, gl[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          if (col == lm) gl[rr] = fmaxf(gl[rr], S[f][2 * rr + e]);
          else mx[rr] = fmaxf(mx[rr], S[f][2 * rr + e]);
        }
      }
    float sm[2] = {0.f, 0.f}, cs[2] = {0.f, 0.f};
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = quad_max(mx[rr]);
      gl[rr] = quad_max(gl[rr]);
    }
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk || col == lm) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          if (kd[rr] == K_EARLY) {
            const float t = fast_exp2(S[f][2 * rr + e] - mx[rr]);
            S[f][2 * rr + e] = t;
            sm[rr] += t;
            cs[rr] += t * dP[f][2 * rr + e];
          }
        }
      }
    float G[2], c[2], gs[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      sm[rr] = quad_sum(sm[rr]);
      cs[rr] = quad_sum(cs[rr]);
      const bool early = kd[rr] == K_EARLY;
      G[rr] = early ? fast_exp2(gl[rr] - lse2[rr]) : 0.f;
      c[rr] = early ? cs[rr] / sm[rr] : 0.f;
      gs[rr] = early ? G[rr] / sm[rr] : 0.f;
    }
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * f + 2 * t4 + e;
        if (col < lo || col > lm || col >= nk) continue;
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float &x = S[f][2 * rr + e];
          float &d = dP[f][2 * rr + e];
          if (kd[rr] == K_EARLY) {
            if (col == lm) {
              x = 0.f;
              d = G[rr] * (c[rr] - dl[rr]);
            } else {
              const float pr = x * gs[rr];
              x = pr;
              d = pr * (d - c[rr]);
            }
          } else if (kd[rr] == K_CUR && col != lm && k0 + col <= R.pos[rr]) {
            const float pr = fast_exp2(x - lse2[rr]);
            x = pr;
            d = pr * (d - dl[rr]);
          } else {
            x = 0.f;
            d = 0.f;
          }
        }
      }
  }
}

// Backward fast path for tiles of one landmark block (nbt == 1, 33 ≤ block_size ≤ 64), same
// column classes as fwd_probs1. S: raw scores (scaled here) -> P; dP -> dS (natural units).
// Earlier block: t = exp2(s − mx), Σt, c = Σ t·dP / Σt, G = exp2(s_ℓ − lse), P = t·G/Σt,
// dS = P (dP − c), landmark dS = G (c − Δ); current: P = exp2(s − lse), dS = P (dP − Δ).
// Masked columns get t = 0, hence P = 0 and dS = 0 (dP is finite there: zero-filled V rows).
template <int NF>
__device__ __forceinline__ void bwd_probs1(float (*S)[4], float (*dP)[4], const Rows &R,
                                           const u32 *em, int j0, int k0, int nk, int bs,
                                           float scale_log2, const float *lse2, const float *dl) {
  int kd[2], lmr;
  float mx[2], gl[2], ref[2];
  one_block_scores<NF>(S, R, em, j0, k0, nk, bs, scale_log2, kd, mx, gl, lmr);
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    mx[rr] = quad_max(mx[rr]);
    gl[rr] = quad_max(gl[rr]);
    ref[rr] = kd[rr] == K_EARLY ? (mx[rr] == NEG_INF ? 0.f : mx[rr]) : lse2[rr];
  }
  float sm[2] = {0.f, 0.f}, cs[2] = {0.f, 0.f};
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float t = fast_exp2(S[f][2 * rr + e] - ref[rr]); // masked: exp2(−∞) = 0
        S[f][2 * rr + e] = t;
        sm[rr] += t;
        cs[rr] += t * dP[f][2 * rr + e];
      }
  float G[2], gs[2], cc[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const bool early = kd[rr] == K_EARLY;
    const float smt = quad_sum(sm[rr]), cst = quad_sum(cs[rr]);
    G[rr] = early ? fast_exp2(gl[rr] - lse2[rr]) : 0.f;
    gs[rr] = early ? G[rr] / smt : 1.f;
    cc[rr] = early ? cst / smt : dl[rr];
  }
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool is_lm = 8 * f + e == lmr;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float pr = S[f][2 * rr + e] * gs[rr];
        S[f][2 * rr + e] = pr;
        float d = pr * (dP[f][2 * rr + e] - cc[rr]);
        if (is_lm && kd[rr] == K_EARLY) d = G[rr] * (cc[rr] - dl[rr]);
        dP[f][2 * rr + e] = d;
      }
    }
}

// The GEMMs below load 16-bit fragments from 32-bit shared addresses (ldsm_x4): the per-lane
// part of the address is computed once per GEMM and every fragment adds a compile-time offset
// (no 64-bit generic pointer per fragment, which the compiler would otherwise hoist out of the
// key loop and keep, or spill, as 64 live address registers).

// C[16 x 8·NF] += A(rows m0.., smem row-major, ld) · B(smem [n][k] row-major, ld), k over KD.
// Every column tile is computed (no data-dependent branch between the fragment loads and the
// MMAs, so the loads can be scheduled ahead): B rows past the valid keys are zero-filled in
// shared memory, and the callers mask those columns anyway. `ncols` is kept for the interface.
template <int ELEM, int NF, int KD>
__device__ __forceinline__ void gemm_nk(float (*C)[4], const typename Elem<ELEM>::T *As, int lda,
                                        int m0, const typename Elem<ELEM>::T *Bs, int ldb,
                                        int ncols) {
  constexpr int KS = Elem<ELEM>::KS;
  if constexpr (ELEM != ELEM_F32) {
    static_assert(NF % 2 == 0, "B fragments are loaded in pairs of n-tiles");
    const int lane = threadIdx.x & 31;
    // A (16 x 16 at rows m0.., k0..): lanes 0-7 rows 0-7 / k 0-7, 8-15 rows 8-15 / k 0-7,
    // 16-23 rows 0-7 / k 8-15, 24-31 rows 8-15 / k 8-15 (the order of a0..a3).
    const u32 abase =
        smem_addr(As) + 2u * ((m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * lda + (lane >> 4) * 8);
    // B[k][n] = Bs[n][k] for n-tiles f, f + 1: lanes 0-7 n 0-7 / k 0-7, 8-15 n 0-7 / k 8-15,
    // 16-23 n 8-15 / k 0-7, 24-31 n 8-15 / k 8-15 (b of tile f, then b of tile f + 1).
    const u32 bbase = smem_addr(Bs) + 2u * (((lane & 7) + (lane >> 4) * 8) * ldb + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += KS) {
      u32 a[4];
      ldsm_x4(a, abase + 2u * k0);
#pragma unroll
      for (int f = 0; f < NF; f += 2) {
        u32 b[4];
        ldsm_x4(b, bbase + 2u * (8 * f * ldb + k0));
        mma<ELEM>(C[f], a, b);
        mma<ELEM>(C[f + 1], a, b + 2);
      }
    }
  } else {
#pragma unroll
    for (int k0 = 0; k0 < KD; k0 += KS) {
      u32 a[4], b[2];
      Frag<ELEM>::A_mk(a, As, lda, m0, k0);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        Frag<ELEM>::B_nk(b, Bs, ldb, k0, 8 * f);
        mma<ELEM>(C[f], a, b);
      }
    }
  }
}

// C[16 x 8·NO] += P(accumulator tiles, 16 x KT) · B(smem [k][n] row-major), every k step (P is
// 0 and the zero-filled B rows are 0 past the valid keys; `nk` is kept for the interface).
template <int ELEM, int NF, int NO>
__device__ __forceinline__ void gemm_acc_kn(float (*C)[4], float (*P)[4],
                                            const typename Elem<ELEM>::T *Bs, int ldb, int nk) {
  constexpr int KS = Elem<ELEM>::KS;
  if constexpr (ELEM != ELEM_F32) {
    static_assert(NO % 2 == 0, "B fragments are loaded in pairs of n-tiles");
    const int lane = threadIdx.x & 31;
    // B[k][n] = Bs[k][n] (transposed loads) for n-tiles f, f + 1: lanes 0-7 k 0-7 / n 0-7,
    // 8-15 k 8-15 / n 0-7, 16-23 k 0-7 / n 8-15, 24-31 k 8-15 / n 8-15.
    const u32 bbase = smem_addr(Bs) + 2u * (((lane & 7) + ((lane >> 3) & 1) * 8) * ldb + (lane >> 4) * 8);
#pragma unroll
    for (int kk = 0; kk < (8 * NF) / KS; ++kk) {
      u32 a[4];
      Frag<ELEM>::A_from_acc(a, P, kk);
#pragma unroll
      for (int f = 0; f < NO; f += 2) {
        u32 b[4];
        ldsm_x4_t(b, bbase + 2u * (kk * KS * ldb + 8 * f));
        mma<ELEM>(C[f], a, b);
        mma<ELEM>(C[f + 1], a, b + 2);
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < (8 * NF) / KS; ++kk) {
      u32 a[4], b[2];
      Frag<ELEM>::A_from_acc(a, P, kk);
#pragma unroll
      for (int f = 0; f < NO; ++f) {
        Frag<ELEM>::B_kn(b, Bs, ldb, kk * KS, 8 * f);
        mma<ELEM>(C[f], a, b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward

// Forward epilogue: o = O / l (and its rounding residual when p.out_lo is set) and
// lse = ln 2 · (m + log2 l) of the thread's rows (l is the thread's partial row sum, summed over
// the quad here).
template <int ELEM, int NO>
__device__ __forceinline__ void fwd_store(const LmParams &p, const LmSeq &s, int h, int i0, int rows,
                                          int warp, float (*O)[4], const float *m, const float *l) {
  typedef typename Elem<ELEM>::T T;
  const int g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
  const i64 off = s.b * p.so[0] + (s.qs + i0) * p.so[1] + h * p.so[2];
  T *ob = (T *)p.out + off;
  T *olb = p.out_lo ? (T *)p.out_lo + off : nullptr;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float lt = quad_sum(l[rr]);
    const int r = 16 * warp + g + 8 * rr;
    if (r < rows) {
      const float inv = 1.f / lt;
#pragma unroll
      for (int f = 0; f < NO; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + 2 * t4 + e;
          if (col < p.E) ob[(i64)r * p.so[1] + col] = from_f32<ELEM>(O[f][2 * rr + e] * inv);
        }
      // a separate pass keeps the hi stores' code (and the kernel's registers) as without out_lo
      if (olb)
#pragma unroll
        for (int f = 0; f < NO; ++f)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * f + 2 * t4 + e;
            T hi, lo;
            split_f32<ELEM>(O[f][2 * rr + e] * inv, hi, lo);
            if (col < p.E) olb[(i64)r * p.so[1] + col] = lo;
          }
      if (t4 == 0) {
        const float mm = m[rr] == NEG_INF ? 0.f : m[rr];
        p.lse[s.b * p.slse[0] + (s.qs + i0 + r) * p.slse[1] + h * p.slse[2]] =
            (mm + __log2f(lt)) * LN2;
      }
    }
  }
}

// dQ epilogue: dq = scale · dQ of the thread's rows.
template <int ELEM, int NO>
__device__ __forceinline__ void dq_store(const LmParams &p, const LmSeq &s, int h, int i0, int rows,
                                         float (*dQ)[4]) {
  typedef typename Elem<ELEM>::T T;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
  T *dqb = (T *)p.dq + s.b * p.sdq[0] + (s.qs + i0) * p.sdq[1] + h * p.sdq[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    if (r < rows) {
#pragma unroll
      for (int f = 0; f < NO; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + 2 * t4 + e;
          if (col < p.D) dqb[(i64)r * p.sdq[1] + col] = from_f32<ELEM>(dQ[f][2 * rr + e] * p.scale);
        }
    }
  }
}

// dK/dV epilogue: dk = scale · dK and dv = dV of the key tile's rows [k0, k0 + nk).
template <int ELEM, int NO>
__device__ __forceinline__ void dkdv_store(const LmParams &p, const LmSeq &s, int hk, int k0, int nk,
                                           float (*dK)[4], float (*dV)[4]) {
  typedef typename Elem<ELEM>::T T;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
  T *dkb = (T *)p.dk + s.b * p.sdk[0] + (s.ks + k0) * p.sdk[1] + hk * p.sdk[2];
  T *dvb = (T *)p.dv + s.b * p.sdv[0] + (s.ks + k0) * p.sdv[1] + hk * p.sdv[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    if (r < nk) {
#pragma unroll
      for (int f = 0; f < NO; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + 2 * t4 + e;
          if (col < p.D) dkb[(i64)r * p.sdk[1] + col] = from_f32<ELEM>(dK[f][2 * rr + e] * p.scale);
          if (col < p.E) dvb[(i64)r * p.sdv[1] + col] = from_f32<ELEM>(dV[f][2 * rr + e]);
        }
    }
  }
}

template <int ELEM, int DP, int KT> __device__ __forceinline__ void lm_fwd_impl(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int BQ = LM_BQ, PAD = Elem<ELEM>::PAD, LD = DP + PAD;
  constexpr int NF = KT / 8, NO = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *Ks = Qs + BQ * LD;
  T *Vs = Ks + KT * LD;
  __shared__ int red[LM_NW];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const LmSeq s = seq_of(p, n);
  const int i0 = qt * BQ;
  if (i0 >= s.ql) return;
  const int rows = min(BQ, s.ql - i0);
  const int hk = h / (p.Hq / p.Hkv);
  const int bs = p.bs, nbt = KT / bs, TW = nbt * bs;

  const T *qb = (const T *)p.q + s.b * p.sq[0] + (s.qs + i0) * p.sq[1] + h * p.sq[2];
  const T *kb = (const T *)p.k + s.b * p.sk[0] + s.ks * p.sk[1] + hk * p.sk[2];
  const T *vb = (const T *)p.v + s.b * p.sv[0] + s.ks * p.sv[1] + hk * p.sv[2];
  load_tile_async<ELEM, BQ, DP, LM_THREADS>(Qs, LD, qb, p.sq[1], rows, p.D, p.vec_q);
  cp_async_commit();

  Rows R;
  make_rows(p, s, hk, i0, rows, warp, g, R);
  const bool active = 16 * warp < rows;
  float O[NO][4];
#pragma unroll
  for (int f = 0; f < NO; ++f) O[f][0] = O[f][1] = O[f][2] = O[f][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};

  // Key tiles: without block_indices every tile from 0 to the one holding the current block
  // of the CTA's last row (the largest position); with them, the next tile one of the rows
  // needs (a CTA-wide minimum). K of the next tile is loaded while the current tile's P·V runs,
  // V of the current tile while its scores are computed.
  const bool dense = p.bidx == nullptr;
  const int cmax = (i0 + rows - 1 + (s.kl - s.ql)) / bs; // block of the last row
  int jn = dense ? (cmax >= 0 ? 0 : LM_BIG) : cta_min(next_block(p, R, 0, t4), red);
  if (jn != LM_BIG) {
    const int k0 = (jn / nbt) * nbt * bs;
    load_tile_async<ELEM, KT, DP, LM_THREADS>(Ks, LD, kb + (i64)k0 * p.sk[1], p.sk[1],
                                              min(TW, s.kl - k0), p.D, p.vec_k);
    cp_async_commit();
  }
  while (jn != LM_BIG) {
    const int j0 = (jn / nbt) * nbt, k0 = j0 * bs;
    const int nk = min(TW, s.kl - k0);
    const int jlo = j0 + nbt;
    u32 em[2];
    em[0] = early_mask(p, R, 0, j0, nbt, t4);
    em[1] = early_mask(p, R, 1, j0, nbt, t4);
    cp_async_wait<0>(); // K of this tile
    __syncthreads();    // ... visible to all; every warp is done with Vs of the previous tile
    load_tile_async<ELEM, KT, DP, LM_THREADS>(Vs, LD, vb + (i64)k0 * p.sv[1], p.sv[1], nk, p.E,
                                              p.vec_v);
    cp_async_commit();
    float S[NF][4];
#pragma unroll
    for (int f = 0; f < NF; ++f) S[f][0] = S[f][1] = S[f][2] = S[f][3] = 0.f;
    if (active) {
      gemm_nk<ELEM, NF, DP>(S, Qs, LD, 16 * warp, Ks, LD, nk);
      float alpha[2], ps[2];
      if constexpr (LM_ONE) {
        fwd_probs1<NF>(S, R, em, j0, k0, nk, bs, p.scale_log2, m, alpha, ps);
      } else {
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
          for (int r = 0; r < 4; ++r) S[f][r] *= p.scale_log2;
        float mu[2];
        fwd_probs<NF>(S, R, em, j0, nbt, k0, nk, bs, m, mu, alpha);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          ps[rr] = 0.f;
#pragma unroll
          for (int f = 0; f < NF; ++f) ps[rr] += S[f][2 * rr] + S[f][2 * rr + 1];
        }
      }
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        l[rr] = l[rr] * alpha[rr] + ps[rr];
#pragma unroll
        for (int f = 0; f < NO; ++f) {
          O[f][2 * rr] *= alpha[rr];
          O[f][2 * rr + 1] *= alpha[rr];
        }
      }
    }
    const int jnext = dense ? (jlo <= cmax ? jlo : LM_BIG) : cta_min(next_block(p, R, jlo, t4), red);
    cp_async_wait<0>(); // V of this tile
    __syncthreads();    // ... visible to all; every warp is done with Ks
    if (jnext != LM_BIG) {
      const int k1 = (jnext / nbt) * nbt * bs;
      load_tile_async<ELEM, KT, DP, LM_THREADS>(Ks, LD, kb + (i64)k1 * p.sk[1], p.sk[1],
                                                min(TW, s.kl - k1), p.D, p.vec_k);
      cp_async_commit();
    }
    if (active) gemm_acc_kn<ELEM, NF, NO>(O, S, Vs, LD, nk);
    jn = jnext;
  }
  cp_async_wait<0>(); // nothing in flight at exit (e.g. no key tile at all)

  fwd_store<ELEM, NO>(p, s, h, i0, rows, warp, O, m, l);
}

// ---------------------------------------------------------------------------------------------
// backward

// Loads lse (as log2 units) and delta of the thread's rows.
__device__ __forceinline__ void load_row_stats(const LmParams &p, const LmSeq &s, int h, int i0,
                                               const Rows &R, int warp, int g, float *lse2,
                                               float *dl) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    if (R.valid[rr]) {
      const i64 t = s.qs + i0 + r;
      lse2[rr] = p.lse[s.b * p.slse[0] + t * p.slse[1] + h * p.slse[2]] * LOG2E;
      dl[rr] = p.delta[s.b * p.sdl[0] + t * p.sdl[1] + h * p.sdl[2]];
    } else {
      lse2[rr] = 0.f;
      dl[rr] = 0.f;
    }
  }
}

template <int ELEM, int DP, int KT>
__device__ __forceinline__ void lm_bwd_dq_impl(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int BQ = LM_BQ, PAD = Elem<ELEM>::PAD, LD = DP + PAD;
  constexpr int NF = KT / 8, NO = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dOs = Qs + BQ * LD;
  T *Ks = dOs + BQ * LD;
  T *Vs = Ks + KT * LD;
  __shared__ int red[LM_NW];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const LmSeq s = seq_of(p, n);
  const int i0 = qt * BQ;
  if (i0 >= s.ql) return;
  const int rows = min(BQ, s.ql - i0);
  const int hk = h / (p.Hq / p.Hkv);
  const int bs = p.bs, nbt = KT / bs, TW = nbt * bs;

  const T *qb = (const T *)p.q + s.b * p.sq[0] + (s.qs + i0) * p.sq[1] + h * p.sq[2];
  const T *dob = (const T *)p.dout + s.b * p.sdo[0] + (s.qs + i0) * p.sdo[1] + h * p.sdo[2];
  const T *kb = (const T *)p.k + s.b * p.sk[0] + s.ks * p.sk[1] + hk * p.sk[2];
  const T *vb = (const T *)p.v + s.b * p.sv[0] + s.ks * p.sv[1] + hk * p.sv[2];
  load_tile_async<ELEM, BQ, DP, LM_THREADS>(Qs, LD, qb, p.sq[1], rows, p.D, p.vec_q);
  load_tile_async<ELEM, BQ, DP, LM_THREADS>(dOs, LD, dob, p.sdo[1], rows, p.E, p.vec_do);
  cp_async_commit();

  Rows R;
  make_rows(p, s, hk, i0, rows, warp, g, R);
  const bool active = 16 * warp < rows;
  float lse2[2], dl[2];
  load_row_stats(p, s, h, i0, R, warp, g, lse2, dl);
  float dQ[NO][4];
#pragma unroll
  for (int f = 0; f < NO; ++f) dQ[f][0] = dQ[f][1] = dQ[f][2] = dQ[f][3] = 0.f;

  // key tiles as in the forward (dense: 0 .. the tile of the last row's block, no CTA reduction)
  const bool dense = p.bidx == nullptr;
  const int cmax = (i0 + rows - 1 + (s.kl - s.ql)) / bs; // block of the last row
  int jlo = 0;
  while (true) {
    const int jn = dense ? (jlo <= cmax ? jlo : LM_BIG) : cta_min(next_block(p, R, jlo, t4), red);
    if (jn == LM_BIG) break;
    const int j0 = (jn / nbt) * nbt, k0 = j0 * bs;
    const int nk = min(TW, s.kl - k0);
    jlo = j0 + nbt;
    load_tile_async<ELEM, KT, DP, LM_THREADS>(Ks, LD, kb + (i64)k0 * p.sk[1], p.sk[1], nk, p.D,
                                              p.vec_k);
    load_tile_async<ELEM, KT, DP, LM_THREADS>(Vs, LD, vb + (i64)k0 * p.sv[1], p.sv[1], nk, p.E,
                                              p.vec_v);
    cp_async_commit();
    u32 em[2];
    em[0] = early_mask(p, R, 0, j0, nbt, t4);
    em[1] = early_mask(p, R, 1, j0, nbt, t4);
    cp_async_wait<0>();
    __syncthreads();
    if (active) {
      float S[NF][4], dP[NF][4];
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int r = 0; r < 4; ++r) S[f][r] = dP[f][r] = 0.f;
      gemm_nk<ELEM, NF, DP>(S, Qs, LD, 16 * warp, Ks, LD, nk);
      gemm_nk<ELEM, NF, DP>(dP, dOs, LD, 16 * warp, Vs, LD, nk);
      if constexpr (LM_ONE) {
        bwd_probs1<NF>(S, dP, R, em, j0, k0, nk, bs, p.scale_log2, lse2, dl);
      } else {
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
          for (int r = 0; r < 4; ++r) S[f][r] *= p.scale_log2;
        bwd_probs<NF>(S, dP, R, em, j0, nbt, k0, nk, bs, lse2, dl);
      }
      gemm_acc_kn<ELEM, NF, NO>(dQ, dP, Ks, LD, nk);
    }
    __syncthreads(); // Ks, Vs free for the next tile
  }

  T *dqb = (T *)p.dq + s.b * p.sdq[0] + (s.qs + i0) * p.sdq[1] + h * p.sdq[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    if (r < rows) {
#pragma unroll
      for (int f = 0; f < NO; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + 2 * t4 + e;
          if (col < p.D) dqb[(i64)r * p.sdq[1] + col] = from_f32<ELEM>(dQ[f][2 * rr + e] * p.scale);
        }
    }
  }
}

// acc += Xᵀ B for one (query tile, key tile): X (the warp's 16 query rows of accumulator tiles,
// [query][key]) goes through shared memory (PSs); warp w then owns keys 16w .. 16w + 15 and
// contracts over the tile's queries with B ([query][dim], Q or dO). Ends with a barrier.
template <int ELEM, int NF, int NO, int LD, int LDP>
__device__ __forceinline__ void tile_gemm_t(float (*X)[4], typename Elem<ELEM>::T *PSs,
                                            const typename Elem<ELEM>::T *Bs, float (*acc)[4],
                                            bool kactive) {
  constexpr int BQ = LM_BQ, KS = Elem<ELEM>::KS;
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      PSs[(16 * warp + g + 8 * (r >> 1)) * LDP + 8 * f + 2 * t4 + (r & 1)] =
          from_f32<ELEM>(X[f][r]);
  __syncthreads();
  if (kactive) {
#pragma unroll
    for (int kq = 0; kq < BQ; kq += KS) {
      u32 a[4], b[2];
      Frag<ELEM>::A_km(a, PSs, LDP, 16 * warp, kq);
#pragma unroll
      for (int f = 0; f < NO; ++f) {
        Frag<ELEM>::B_kn(b, Bs, LD, kq, 8 * f);
        mma<ELEM>(acc[f], a, b);
      }
    }
  }
  __syncthreads();
}

// dK/dV of one (query tile, key tile): dV += Pᵀ dO, dK += dSᵀ Q (P in S, dS in dP; rows of
// warps without queries are zeros). Ends with a barrier (Qs, dOs, PSs free afterwards).
template <int ELEM, int NF, int NO, int LD, int LDP>
__device__ __forceinline__ void dkdv_accumulate(float (*S)[4], float (*dP)[4],
                                                typename Elem<ELEM>::T *PSs,
                                                const typename Elem<ELEM>::T *Qs,
                                                const typename Elem<ELEM>::T *dOs, float (*dK)[4],
                                                float (*dV)[4], bool kactive) {
  tile_gemm_t<ELEM, NF, NO, LD, LDP>(S, PSs, dOs, dV, kactive);
  tile_gemm_t<ELEM, NF, NO, LD, LDP>(dP, PSs, Qs, dK, kactive);
}

template <int ELEM, int DP, int KT>
__device__ __forceinline__ void lm_bwd_dkdv_impl(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int BQ = LM_BQ, PAD = Elem<ELEM>::PAD, LD = DP + PAD, LDP = KT + PAD;
  constexpr int NF = KT / 8, NO = DP / 8;
  static_assert(KT == 16 * LM_NW, "one warp per 16 keys of the tile");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Ks = reinterpret_cast<T *>(smem_raw);
  T *Vs = Ks + KT * LD;
  T *Qs = Vs + KT * LD;
  T *dOs = Qs + BQ * LD;
  T *PSs = dOs + BQ * LD; // P, then dS: [query][key]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int tt = blockIdx.x, hk = blockIdx.y, n = blockIdx.z;
  const LmSeq s = seq_of(p, n);
  const int bs = p.bs, nbt = KT / bs, TW = nbt * bs;
  const int j0 = tt * nbt, k0 = j0 * bs;
  if (k0 >= s.kl) return;
  const int nk = min(TW, s.kl - k0);
  const int G = p.Hq / p.Hkv;

  const T *kb = (const T *)p.k + s.b * p.sk[0] + (s.ks + k0) * p.sk[1] + hk * p.sk[2];
  const T *vb = (const T *)p.v + s.b * p.sv[0] + (s.ks + k0) * p.sv[1] + hk * p.sv[2];
  load_tile_async<ELEM, KT, DP, LM_THREADS>(Ks, LD, kb, p.sk[1], nk, p.D, p.vec_k);
  load_tile_async<ELEM, KT, DP, LM_THREADS>(Vs, LD, vb, p.sv[1], nk, p.E, p.vec_v);
  cp_async_commit();

  float dK[NO][4], dV[NO][4];
#pragma unroll
  for (int f = 0; f < NO; ++f)
#pragma unroll
    for (int r = 0; r < 4; ++r) dK[f][r] = dV[f][r] = 0.f;
  const bool kactive = 16 * warp < nk;

  const int off = s.kl - s.ql;
  const int first = max(0, k0 - off); // first query row whose position reaches k0
  for (int hh = 0; hh < G; ++hh) {
    const int h = hk * G + hh;
    for (int i0 = (first / BQ) * BQ; i0 < s.ql; i0 += BQ) {
      const int rows = min(BQ, s.ql - i0);
      Rows R;
      make_rows(p, s, hk, i0, rows, warp, g, R);
      u32 em[2];
      em[0] = early_mask(p, R, 0, j0, nbt, t4);
      em[1] = early_mask(p, R, 1, j0, nbt, t4);
      bool need = false;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
        need |= R.valid[rr] && (em[rr] != 0u || (R.c[rr] >= j0 && R.c[rr] < j0 + nbt));
      if (!__syncthreads_or(need)) continue;

      const T *qb = (const T *)p.q + s.b * p.sq[0] + (s.qs + i0) * p.sq[1] + h * p.sq[2];
      const T *dob = (const T *)p.dout + s.b * p.sdo[0] + (s.qs + i0) * p.sdo[1] + h * p.sdo[2];
      load_tile_async<ELEM, BQ, DP, LM_THREADS>(Qs, LD, qb, p.sq[1], rows, p.D, p.vec_q);
      load_tile_async<ELEM, BQ, DP, LM_THREADS>(dOs, LD, dob, p.sdo[1], rows, p.E, p.vec_do);
      cp_async_commit();
      float lse2[2], dl[2];
      load_row_stats(p, s, h, i0, R, warp, g, lse2, dl);
      cp_async_wait<0>();
      __syncthreads();

      float S[NF][4], dP[NF][4];
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int r = 0; r < 4; ++r) S[f][r] = dP[f][r] = 0.f;
      if (16 * warp < rows) {
        gemm_nk<ELEM, NF, DP>(S, Qs, LD, 16 * warp, Ks, LD, nk);
        gemm_nk<ELEM, NF, DP>(dP, dOs, LD, 16 * warp, Vs, LD, nk);
        if constexpr (LM_ONE) {
          bwd_probs1<NF>(S, dP, R, em, j0, k0, nk, bs, p.scale_log2, lse2, dl);
        } else {
#pragma unroll
          for (int f = 0; f < NF; ++f)
#pragma unroll
            for (int r = 0; r < 4; ++r) S[f][r] *= p.scale_log2;
          bwd_probs<NF>(S, dP, R, em, j0, nbt, k0, nk, bs, lse2, dl);
        }
      }
      dkdv_accumulate<ELEM, NF, NO, LD, LDP>(S, dP, PSs, Qs, dOs, dK, dV, kactive);
    }
  }

  cp_async_wait<0>(); // K, V copies complete even when no query tile needed them

  T *dkb = (T *)p.dk + s.b * p.sdk[0] + (s.ks + k0) * p.sdk[1] + hk * p.sdk[2];
  T *dvb = (T *)p.dv + s.b * p.sdv[0] + (s.ks + k0) * p.sdv[1] + hk * p.sdv[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = 16 * warp + g + 8 * rr;
    if (r < nk) {
#pragma unroll
      for (int f = 0; f < NO; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + 2 * t4 + e;
          if (col < p.D) dkb[(i64)r * p.sdk[1] + col] = from_f32<ELEM>(dK[f][2 * rr + e] * p.scale);
          if (col < p.E) dvb[(i64)r * p.sdv[1] + col] = from_f32<ELEM>(dV[f][2 * rr + e]);
        }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Blocks longer than a key tile (LM_MULTI: KT < block_size, any size).
//
// A block of bs keys spans NT = ⌈bs / KT⌉ key tiles aligned to the block's start: tile t of block
// j holds keys j·bs + KT·t .. min(j·bs + KT·(t + 1), (j + 1)·bs) − 1, so no tile crosses a block
// boundary (the block's last tile may be short; it holds the landmark). The inner normaliser of
// an earlier block depends on all of its tiles, so it is computed first. Per (row i, earlier
// block j), log2 units (s = log2(e)·scale·q·k, dP_iu = do_i·v_u), over the ordinary keys u of j:
//   mx_ij = max_u s_iu,   Y_ij = Σ_u exp2(s_iu − mx_ij),   C_ij = Σ_u exp2(s_iu − mx_ij)·dP_iu,
//   gl_ij = s_{i,ℓj}  (the landmark logit),
// so π_iu = exp2(s_iu − mx_ij) / Y_ij and c_ij = Σ_u π_iu dP_iu = C_ij / Y_ij (a statistics pass
// over the block's tiles, online in mx like a softmax: stats_tile). The main pass over the same
// tiles then does what the single-tile kernels do, with the bias known:
//   forward, earlier block: P = exp2(s − mx)·exp2(gl − M)/Y (every weight of the block is below
//            its gate, so the row bound is M = max(M, gl)); current block (p ∈ S_i, no inner
//            normaliser): P = exp2(s − M); FlashAttention's online rescaling over M and
//            lse = ln 2·(M + log2 l), as in the other paths;
//   backward, earlier block: G = exp2(gl − lse2), P = exp2(s − mx)·G/Y, dS = P (dP − c),
//            landmark dS = G (c − Δ); current block: P = exp2(s − lse2), dS = P (dP − Δ).
// The statistics pass is skipped for blocks that no row of the query tile sees as an earlier
// block (e.g. the diagonal block).
// Cost in MMAs against the single-pass kernels: forward (S twice, P·V once) about 1.5×; dQ (S and
// dP twice, dS·K once) about 5/3×; dK/dV (key-tile outer, grid over the tiles of every block):
// for each query tile the CTA recomputes its rows' statistics of its block with a pass over the
// block's NT tiles (K and V reloaded from L2), visiting its own tile last so that its S and dP are
// still in registers for dS: 2·NT + 2 MMAs per (query tile, key tile) instead of 4, i.e. about
// (NT + 1)/2 × (1.5× at block 128, 2× at 200 to 256, 8.5× at 1000). No [T, T / block] buffer.

// Tile t of block j: first key k0, keys nk, ordinary columns col < nord (the landmark is the
// block's last key, so it is excluded), landmark column lmc (−1 when not in the tile).
struct LmTile {
  int k0, nk, nord, lmc;
};

__device__ __forceinline__ LmTile block_tile(int j, int t, int bs, int kl) {
  LmTile x;
  const int lo = LM_KT * t; // first key of the tile inside the block
  x.k0 = j * bs + lo;
  x.nk = min(min(LM_KT, bs - lo), kl - x.k0); // ≤ 0 when the tile lies past the keys
  x.nord = min(x.nk, bs - 1 - lo);
  x.lmc = bs - 1 - lo < x.nk ? bs - 1 - lo : -1;
  return x;
}

// Per-row statistics of one earlier block (see above), for the thread's two rows.
struct LmStats {
  float mx[2], y[2], cs[2], gl[2];
};

__device__ __forceinline__ void stats_init(LmStats &st) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    st.mx[rr] = st.gl[rr] = NEG_INF;
    st.y[rr] = st.cs[rr] = 0.f;
  }
}

// Sets the columns row rr does not use in tile x to −∞ (it uses every ordinary key of an earlier
// block, the visible ordinary keys of its current block, nothing else) and returns the thread's
// maximum per row in tm (not quad-reduced).
template <int NF>
__device__ __forceinline__ void mask_cols(float (*S)[4], const Rows &R, const int *kd,
                                          const LmTile &x, float *tm) {
  const int t4 = threadIdx.x & 3;
  int lim[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    lim[rr] = kd[rr] == K_EARLY ? x.nord
              : kd[rr] == K_CUR ? min(x.nord, R.pos[rr] - x.k0 + 1)
                                : 0;
    lim[rr] -= 2 * t4; // compared with the compile-time part 8f + e of the column
    tm[rr] = NEG_INF;
  }
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float v = 8 * f + e < lim[rr] ? S[f][2 * rr + e] : NEG_INF;
        S[f][2 * rr + e] = v;
        tm[rr] = fmaxf(tm[rr], v);
      }
}

// Adds tile x (S: log2-scaled scores; dP: do·vᵀ when WITH_DP) to the block statistics. Only the
// statistics of rows for which the block is earlier are used later.
template <int NF, bool WITH_DP>
__device__ __forceinline__ void stats_tile(const float (*S)[4], const float (*dP)[4],
                                           const LmTile &x, LmStats &st) {
  const int t4 = threadIdx.x & 3;
  const int lim = x.nord - 2 * t4, lmr = x.lmc - 2 * t4; // lmc = −1: lmr < 0, never a column
  float tm[2] = {NEG_INF, NEG_INF}, gl[2] = {NEG_INF, NEG_INF};
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float v = S[f][2 * rr + e];
        if (8 * f + e == lmr) gl[rr] = v;
        if (8 * f + e < lim) tm[rr] = fmaxf(tm[rr], v);
      }
  float ref[2], resc[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float mnew = fmaxf(st.mx[rr], quad_max(tm[rr]));
    ref[rr] = mnew == NEG_INF ? 0.f : mnew;
    resc[rr] = fast_exp2(st.mx[rr] - ref[rr]); // 0 while mx was −∞
    st.mx[rr] = mnew;
    st.gl[rr] = fmaxf(st.gl[rr], quad_max(gl[rr]));
  }
  float sy[2] = {0.f, 0.f}, sc[2] = {0.f, 0.f};
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float t = 8 * f + e < lim ? fast_exp2(S[f][2 * rr + e] - ref[rr]) : 0.f;
        sy[rr] += t;
        if constexpr (WITH_DP) sc[rr] += t * dP[f][2 * rr + e];
      }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    st.y[rr] = st.y[rr] * resc[rr] + quad_sum(sy[rr]);
    if constexpr (WITH_DP) st.cs[rr] = st.cs[rr] * resc[rr] + quad_sum(sc[rr]);
  }
}

// Forward main pass on tile x: S (log2-scaled) -> P relative to the new running maxima m; returns
// alpha (rescale of l and O) and ps (the thread's partial row sum of P).
template <int NF>
__device__ __forceinline__ void fwd_probs_multi(float (*S)[4], const Rows &R, const int *kd,
                                                const LmTile &x, const LmStats &st, float *m,
                                                float *alpha, float *ps) {
  float tm[2];
  mask_cols<NF>(S, R, kd, x, tm);
  float ref[2], fac[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const bool early = kd[rr] == K_EARLY;
    const float tmax = quad_max(tm[rr]); // all lanes shuffle, whatever the row's kind
    const float bound = early ? st.gl[rr] : tmax;
    const float m_new = fmaxf(m[rr], bound);
    const float mu = m_new == NEG_INF ? 0.f : m_new;
    alpha[rr] = fast_exp2(m[rr] - mu); // 0 when m was −∞
    m[rr] = m_new;
    // earlier block: mx is finite (bs − 1 ≥ KT ordinary keys) and Y ≥ 1
    ref[rr] = early ? st.mx[rr] : mu;
    fac[rr] = early ? fast_exp2(st.gl[rr] - mu) / st.y[rr] : 1.f;
    ps[rr] = 0.f;
  }
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float t = fast_exp2(S[f][2 * rr + e] - ref[rr]) * fac[rr]; // masked: exp2(−∞) = 0
        S[f][2 * rr + e] = t;
        ps[rr] += t;
      }
}

// Backward main pass on tile x: S (log2-scaled) -> P, dP -> dS (natural units).
template <int NF>
__device__ __forceinline__ void bwd_probs_multi(float (*S)[4], float (*dP)[4], const Rows &R,
                                                const int *kd, const LmTile &x, const LmStats &st,
                                                const float *lse2, const float *dl) {
  const int lmr = x.lmc - 2 * (threadIdx.x & 3);
  float tm[2];
  mask_cols<NF>(S, R, kd, x, tm);
  float ref[2], gs[2], cc[2], G[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const bool early = kd[rr] == K_EARLY;
    G[rr] = early ? fast_exp2(st.gl[rr] - lse2[rr]) : 0.f;
    gs[rr] = early ? G[rr] / st.y[rr] : 1.f;
    cc[rr] = early ? st.cs[rr] / st.y[rr] : dl[rr];
    ref[rr] = early ? st.mx[rr] : lse2[rr];
  }
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const float pr = fast_exp2(S[f][2 * rr + e] - ref[rr]) * gs[rr]; // masked: 0 (dP is finite)
        S[f][2 * rr + e] = pr;
        float d = pr * (dP[f][2 * rr + e] - cc[rr]);
        if (8 * f + e == lmr && kd[rr] == K_EARLY) d = G[rr] * (cc[rr] - dl[rr]);
        dP[f][2 * rr + e] = d;
      }
}

// Row kinds for block j (K_EARLY, K_CUR or K_SKIP); called by all lanes.
__device__ __forceinline__ void block_kinds(const LmParams &p, const Rows &R, int j, int t4,
                                            int *kd) {
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) kd[rr] = kind_of(R, rr, early_mask(p, R, rr, j, 1, t4), j, 0);
}

// The next block a query tile needs after block j (LM_BIG when none): dense, every block up to
// the last row's; retrieval, the CTA-wide minimum over the rows' listed and current blocks.
__device__ __forceinline__ int next_needed(const LmParams &p, const Rows &R, int j, int cmax,
                                           int t4, int *red) {
  if (p.bidx == nullptr) return j + 1 <= cmax ? j + 1 : LM_BIG;
  return cta_min(next_block(p, R, j + 1, t4), red);
}

// S = Q Kᵀ (log2-scaled) and, with DO, dP = dO Vᵀ, for the warp's 16 rows of tile x; rows of
// warps without queries stay zero.
template <int ELEM, int NF, int DP, int LD, bool DO>
__device__ __forceinline__ void tile_scores(float (*S)[4], float (*dP)[4],
                                            const typename Elem<ELEM>::T *Qs,
                                            const typename Elem<ELEM>::T *dOs,
                                            const typename Elem<ELEM>::T *Ks,
                                            const typename Elem<ELEM>::T *Vs, int rows, int nk,
                                            float scale_log2) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int r = 0; r < 4; ++r) S[f][r] = dP[f][r] = 0.f;
  if (16 * warp >= rows) return;
  gemm_nk<ELEM, NF, DP>(S, Qs, LD, 16 * warp, Ks, LD, nk);
  if constexpr (DO) gemm_nk<ELEM, NF, DP>(dP, dOs, LD, 16 * warp, Vs, LD, nk);
#pragma unroll
  for (int f = 0; f < NF; ++f)
#pragma unroll
    for (int r = 0; r < 4; ++r) S[f][r] *= scale_log2;
}

// Loads K (and V with WITH_V) of tile x into shared memory and waits for it (and for every copy
// committed before). Starts with a barrier: every warp is done with the previous tile.
template <int ELEM, int DP, int LD, bool WITH_V>
__device__ __forceinline__ void load_kv(const LmParams &p, typename Elem<ELEM>::T *Ks,
                                        typename Elem<ELEM>::T *Vs,
                                        const typename Elem<ELEM>::T *kb,
                                        const typename Elem<ELEM>::T *vb, const LmTile &x) {
  __syncthreads();
  load_tile_async<ELEM, LM_KT, DP, LM_THREADS>(Ks, LD, kb + (i64)x.k0 * p.sk[1], p.sk[1], x.nk,
                                               p.D, p.vec_k);
  if constexpr (WITH_V)
    load_tile_async<ELEM, LM_KT, DP, LM_THREADS>(Vs, LD, vb + (i64)x.k0 * p.sv[1], p.sv[1], x.nk,
                                                 p.E, p.vec_v);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// Forward (BWD = false: o, lse) or dQ (BWD = true) of one query tile over the blocks it needs.
template <int ELEM, int DP, bool BWD>
__device__ __forceinline__ void lm_qtile_multi(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int BQ = LM_BQ, KT = LM_KT, PAD = Elem<ELEM>::PAD, LD = DP + PAD;
  constexpr int NF = KT / 8, NO = DP / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dOs = Qs + BQ * LD; // backward only
  T *Ks = dOs + (BWD ? BQ * LD : 0);
  T *Vs = Ks + KT * LD;
  __shared__ int red[LM_NW];

  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
  const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const LmSeq s = seq_of(p, n);
  const int i0 = qt * BQ;
  if (i0 >= s.ql) return;
  const int rows = min(BQ, s.ql - i0);
  const int hk = h / (p.Hq / p.Hkv);
  const int bs = p.bs, NT = (bs + KT - 1) / KT;

  const T *qb = (const T *)p.q + s.b * p.sq[0] + (s.qs + i0) * p.sq[1] + h * p.sq[2];
  const T *kb = (const T *)p.k + s.b * p.sk[0] + s.ks * p.sk[1] + hk * p.sk[2];
  const T *vb = (const T *)p.v + s.b * p.sv[0] + s.ks * p.sv[1] + hk * p.sv[2];
  load_tile_async<ELEM, BQ, DP, LM_THREADS>(Qs, LD, qb, p.sq[1], rows, p.D, p.vec_q);
  if constexpr (BWD) {
    const T *dob = (const T *)p.dout + s.b * p.sdo[0] + (s.qs + i0) * p.sdo[1] + h * p.sdo[2];
    load_tile_async<ELEM, BQ, DP, LM_THREADS>(dOs, LD, dob, p.sdo[1], rows, p.E, p.vec_do);
  }
  cp_async_commit(); // completed by the first load_kv

  Rows R;
  make_rows(p, s, hk, i0, rows, warp, g, R);
  float lse2[2], dl[2];
  if constexpr (BWD) load_row_stats(p, s, h, i0, R, warp, g, lse2, dl);
  float acc[NO][4]; // O (forward) or dQ
#pragma unroll
  for (int f = 0; f < NO; ++f) acc[f][0] = acc[f][1] = acc[f][2] = acc[f][3] = 0.f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f}; // forward: running max, partial row sum

  const int pmax = i0 + rows - 1 + (s.kl - s.ql); // position of the last row
  const int cmax = pmax / bs;
  int j = p.bidx == nullptr ? 0 : cta_min(next_block(p, R, 0, t4), red);
  while (j != LM_BIG) {
    int kd[2];
    block_kinds(p, R, j, t4, kd);
    LmStats st;
    stats_init(st);
    if (__syncthreads_or(kd[0] == K_EARLY || kd[1] == K_EARLY)) {
      for (int t = 0; t < NT; ++t) {
        const LmTile x = block_tile(j, t, bs, s.kl);
        if (x.nk <= 0) break;
        load_kv<ELEM, DP, LD, BWD>(p, Ks, Vs, kb, vb, x);
        float S[NF][4], dP[NF][4];
        tile_scores<ELEM, NF, DP, LD, BWD>(S, dP, Qs, dOs, Ks, Vs, rows, x.nk, p.scale_log2);
        stats_tile<NF, BWD>(S, dP, x, st);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const LmTile x = block_tile(j, t, bs, s.kl);
      if (x.nk <= 0 || x.k0 > pmax) break; // past the keys, or no row reaches the tile
      load_kv<ELEM, DP, LD, true>(p, Ks, Vs, kb, vb, x);
      float S[NF][4], dP[NF][4];
      tile_scores<ELEM, NF, DP, LD, BWD>(S, dP, Qs, dOs, Ks, Vs, rows, x.nk, p.scale_log2);
      if constexpr (BWD) {
        bwd_probs_multi<NF>(S, dP, R, kd, x, st, lse2, dl);
        gemm_acc_kn<ELEM, NF, NO>(acc, dP, Ks, LD, x.nk); // dQ += dS K
      } else {
        float alpha[2], ps[2];
        fwd_probs_multi<NF>(S, R, kd, x, st, m, alpha, ps);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          l[rr] = l[rr] * alpha[rr] + ps[rr];
#pragma unroll
          for (int f = 0; f < NO; ++f) {
            acc[f][2 * rr] *= alpha[rr];
            acc[f][2 * rr + 1] *= alpha[rr];
          }
        }
        gemm_acc_kn<ELEM, NF, NO>(acc, S, Vs, LD, x.nk); // O += P V
      }
    }
    j = next_needed(p, R, j, cmax, t4, red);
  }
  cp_async_wait<0>(); // nothing in flight at exit

  if constexpr (BWD) dq_store<ELEM, NO>(p, s, h, i0, rows, acc);
  else fwd_store<ELEM, NO>(p, s, h, i0, rows, warp, acc, m, l);
}

template <int ELEM, int DP> __device__ __forceinline__ void lm_bwd_dkdv_multi(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int BQ = LM_BQ, KT = LM_KT, PAD = Elem<ELEM>::PAD, LD = DP + PAD, LDP = KT + PAD;
  constexpr int NF = KT / 8, NO = DP / 8;
  static_assert(KT == 16 * LM_NW, "one warp per 16 keys of the tile");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Ks = reinterpret_cast<T *>(smem_raw);
  T *Vs = Ks + KT * LD;
  T *Qs = Vs + KT * LD;
  T *dOs = Qs + BQ * LD;
  T *PSs = dOs + BQ * LD; // P, then dS: [query][key]

  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t4 = threadIdx.x & 3;
  const int hk = blockIdx.y, n = blockIdx.z;
  const LmSeq s = seq_of(p, n);
  const int bs = p.bs, NT = (bs + KT - 1) / KT;
  const int j = blockIdx.x / NT, own = blockIdx.x % NT; // this CTA's tile: tile `own` of block j
  const LmTile xo = block_tile(j, own, bs, s.kl);
  if (xo.nk <= 0) return;
  const int G = p.Hq / p.Hkv;
  const T *kb = (const T *)p.k + s.b * p.sk[0] + s.ks * p.sk[1] + hk * p.sk[2];
  const T *vb = (const T *)p.v + s.b * p.sv[0] + s.ks * p.sv[1] + hk * p.sv[2];

  float dK[NO][4], dV[NO][4];
#pragma unroll
  for (int f = 0; f < NO; ++f)
#pragma unroll
    for (int r = 0; r < 4; ++r) dK[f][r] = dV[f][r] = 0.f;
  const bool kactive = 16 * warp < xo.nk;

  const int first = max(0, j * bs - (s.kl - s.ql)); // first query row whose block is ≥ j
  for (int hh = 0; hh < G; ++hh) {
    const int h = hk * G + hh;
    for (int i0 = (first / BQ) * BQ; i0 < s.ql; i0 += BQ) {
      const int rows = min(BQ, s.ql - i0);
      Rows R;
      make_rows(p, s, hk, i0, rows, warp, g, R);
      int kd[2];
      block_kinds(p, R, j, t4, kd);
      if (!__syncthreads_or(kd[0] != K_SKIP || kd[1] != K_SKIP)) continue;
      const bool any_early = __syncthreads_or(kd[0] == K_EARLY || kd[1] == K_EARLY);

      const T *qb = (const T *)p.q + s.b * p.sq[0] + (s.qs + i0) * p.sq[1] + h * p.sq[2];
      const T *dob = (const T *)p.dout + s.b * p.sdo[0] + (s.qs + i0) * p.sdo[1] + h * p.sdo[2];
      load_tile_async<ELEM, BQ, DP, LM_THREADS>(Qs, LD, qb, p.sq[1], rows, p.D, p.vec_q);
      load_tile_async<ELEM, BQ, DP, LM_THREADS>(dOs, LD, dob, p.sdo[1], rows, p.E, p.vec_do);
      cp_async_commit(); // completed by the first load_kv below
      float lse2[2], dl[2];
      load_row_stats(p, s, h, i0, R, warp, g, lse2, dl);

      // The block's tiles, this CTA's own tile last (only that one without earlier rows): S and
      // dP of the own tile are left in registers. Earlier blocks are full, so every tile of the
      // statistics pass holds keys.
      LmStats st;
      stats_init(st);
      float S[NF][4], dP[NF][4];
      for (int step = any_early ? 1 : NT; step <= NT; ++step) {
        const LmTile x = block_tile(j, (own + step) % NT, bs, s.kl);
        if (x.nk <= 0) continue; // CTA-uniform (defensive: only a partial block has such tiles)
        load_kv<ELEM, DP, LD, true>(p, Ks, Vs, kb, vb, x);
        tile_scores<ELEM, NF, DP, LD, true>(S, dP, Qs, dOs, Ks, Vs, rows, x.nk, p.scale_log2);
        if (any_early) stats_tile<NF, true>(S, dP, x, st);
      }
      if (16 * warp < rows) bwd_probs_multi<NF>(S, dP, R, kd, xo, st, lse2, dl);
      dkdv_accumulate<ELEM, NF, NO, LD, LDP>(S, dP, PSs, Qs, dOs, dK, dV, kactive);
    }
  }

  dkdv_store<ELEM, NO>(p, s, hk, xo.k0, xo.nk, dK, dV);
}

// ---------------------------------------------------------------------------------------------
// top-k blocks: one CTA per (token, kv head). Landmark scores max_g scale·q_g·k_ℓj in float64
// (as the CPU path), kept as order-preserving 64-bit keys in shared memory; k rounds of a
// CTA-wide argmax (ties to the lower block) mark the winners, which are then written in
// ascending order. Dynamic shared memory: G·D doubles of q and one key per candidate block.

__device__ __forceinline__ unsigned long long order_key(double x) {
  const unsigned long long b = (unsigned long long)__double_as_longlong(x);
  return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

template <int ELEM> __device__ __forceinline__ void lm_topk_impl(const LmParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int NWT = TOPK_THREADS / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = p.Hq / p.Hkv;
  double *qsm = reinterpret_cast<double *>(smem_raw);
  unsigned long long *keys = reinterpret_cast<unsigned long long *>(qsm + G * p.D);
  __shared__ unsigned long long wk[NWT];
  __shared__ int wj[NWT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = blockIdx.x, hk = blockIdx.y, bb = blockIdx.z;
  int *out = p.topk_out + bb * p.stk[0] + (i64)i * p.stk[1] + hk * p.stk[2];
  const int K = p.topk;

  // the token's sequence
  int b = bb, il = i, ql = p.Tq, kl = p.Tk;
  i64 qs = 0, ks = 0;
  bool inside = true;
  if (p.cu_kind >= 0) {
    const LmSeq s = seq_of(p, sequence_containing(p.cu_seqlens, p.cu_kind, p.nseq, i));
    b = 0;
    qs = s.qs;
    ks = s.ks;
    ql = s.ql;
    kl = s.kl;
    il = (int)(i - qs);
    inside = il >= 0 && il < ql;
  }
  int cand = 0;
  if (inside) {
    const int pos = il + kl - ql;
    cand = min(pos / p.bs, kl / p.bs);
  }
  if (cand <= K) {
    for (int x = threadIdx.x; x < K; x += TOPK_THREADS) out[x * p.stk[3]] = x < cand ? x : -1;
    return;
  }
  const T *qrow = (const T *)p.q + b * p.sq[0] + (qs + il) * p.sq[1];
  for (int x = threadIdx.x; x < G * p.D; x += TOPK_THREADS) {
    const int gi = x / p.D, d = x % p.D;
    qsm[x] = (double)load_f32<ELEM>(qrow + (hk * G + gi) * p.sq[2] + d);
  }
  __syncthreads();
  const T *kb = (const T *)p.k + b * p.sk[0] + ks * p.sk[1] + hk * p.sk[2];
  for (int j = warp; j < cand; j += NWT) {
    const T *krow = kb + ((i64)j * p.bs + p.bs - 1) * p.sk[1];
    double kv[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int d = lane + 32 * u;
      kv[u] = d < p.D ? (double)load_f32<ELEM>(krow + d) : 0.0;
    }
    double best = __longlong_as_double(0xfff0000000000000ll);
    for (int gi = 0; gi < G; ++gi) {
      double dot = 0.0;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int d = lane + 32 * u;
        if (d < p.D) dot += qsm[gi * p.D + d] * kv[u];
      }
      dot = warp_sum(dot);
      best = fmax(best, dot * (double)p.scale); // NaN scores are ignored (rank as −∞)
    }
    if (lane == 0) keys[j] = order_key(best);
  }
  __syncthreads();
  // K rounds of argmax; a taken key becomes 0 (every real key is above 2^52)
  for (int round = 0; round < K; ++round) {
    unsigned long long bk = 0;
    int bj = LM_BIG;
    for (int j = threadIdx.x; j < cand; j += TOPK_THREADS) {
      const unsigned long long kk = keys[j];
      if (kk > bk) {
        bk = kk;
        bj = j;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long ok = __shfl_xor_sync(FULL_MASK, bk, o);
      const int oj = __shfl_xor_sync(FULL_MASK, bj, o);
      if (ok > bk || (ok == bk && oj < bj)) {
        bk = ok;
        bj = oj;
      }
    }
    if (lane == 0) {
      wk[warp] = bk;
      wj[warp] = bj;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long k2 = wk[0];
      int j2 = wj[0];
      for (int w = 1; w < NWT; ++w)
        if (wk[w] > k2 || (wk[w] == k2 && wj[w] < j2)) {
          k2 = wk[w];
          j2 = wj[w];
        }
      if (j2 < cand) keys[j2] = 0;
    }
    __syncthreads();
  }
  if (warp == 0) {
    int written = 0;
    for (int base = 0; base < cand; base += 32) {
      const int j = base + lane;
      const bool sel = j < cand && keys[j] == 0;
      const u32 bal = __ballot_sync(FULL_MASK, sel);
      if (sel) {
        const int at = written + __popc(bal & ((1u << lane) - 1u));
        if (at < K) out[at * p.stk[3]] = j;
      }
      written += __popc(bal);
    }
    for (int x = written + lane; x < K; x += 32) out[x * p.stk[3]] = -1;
  }
}

#if LM_SM90
#include "attn_sm90.cuh"

// Landmark attention on the Hopper engine (attn_sm90.cuh), 16-bit only, for a compile-time block
// size LM_BS (the launcher passes p.bs == LM_BS). A key tile holds nbt = BN / LM_BS whole blocks
// (BN = LM_BN: 128; 112 for block 51, two blocks of 102 keys; 64 for block 16), so the row phase
// is fwd_probs_fixed.
struct LmSm90 {
  static constexpr int ELEM = LM_ELEM, DP = LM_DP, BN = LM_BN;
  typedef LmParams Params;
  struct Shared {
    int red[4];
  };
  struct Cta {
    LmSeq s;
    int h, hk, i0, rows, nbt, cmax;
  };
  struct Rows {
    ::Rows R;
    float m[2], l[2];
  };

  // (query tile, head, sequence), the query tiles of the most keys first, heads fastest
  static __device__ __forceinline__ int work_tiles(const LmParams &p) {
    return (p.Tq + SM90_BM - 1) / SM90_BM * p.Hq * p.nseq;
  }
  static __device__ __forceinline__ bool cta(const LmParams &p, int tile, Cta &c) {
    const int nqt = (p.Tq + SM90_BM - 1) / SM90_BM, rest = tile % (p.Hq * p.nseq);
    c.s = seq_of(p, rest / p.Hq);
    c.i0 = (nqt - 1 - tile / (p.Hq * p.nseq)) * SM90_BM;
    if (c.i0 >= c.s.ql) return false;
    c.h = rest % p.Hq;
    c.hk = c.h / (p.Hq / p.Hkv);
    c.rows = min(SM90_BM, c.s.ql - c.i0);
    c.nbt = BN / p.bs;
    c.cmax = (c.i0 + c.rows - 1 + (c.s.kl - c.s.ql)) / p.bs;
    return true;
  }
  static __device__ __forceinline__ void q_coord(const Cta &c, int &row, int &head, int &batch) {
    row = (int)(c.s.qs + c.i0);
    head = c.h;
    batch = c.s.b;
  }
  static __device__ __forceinline__ void kv_coord(const Cta &c, int k0, int &row, int &head, int &batch) {
    row = (int)(c.s.ks + k0);
    head = c.hk;
    batch = c.s.b;
  }

  // Retrieval: the smallest block >= jlo that producer thread r's query row needs.
  static __device__ __forceinline__ int row_next(const LmParams &p, const Cta &c, int jlo) {
    const int r = threadIdx.x;
    if (r >= c.rows) return LM_BIG;
    const int cb = (c.i0 + r + (c.s.kl - c.s.ql)) / p.bs;
    if (cb < jlo) return LM_BIG;
    int best = cb;
    const int *bi = p.bidx + c.s.b * p.sbi[0] + (c.s.qs + c.i0 + r) * p.sbi[1] + c.hk * p.sbi[2];
    for (int x = 0; x < p.nidx; ++x) {
      const int j = bi[x * p.sbi[3]];
      if (j >= jlo && j < cb) best = min(best, j);
    }
    return best;
  }
  // First key of the tile holding the next block >= jlo that some row needs, or -1.
  static __device__ __forceinline__ int tile_at(const LmParams &p, const Cta &c, int jlo, Shared &sh) {
    int jn;
    if (p.bidx == nullptr) {
      jn = jlo <= c.cmax ? jlo : LM_BIG;
    } else {
      const int v = warp_min(row_next(p, c, jlo));
      if ((threadIdx.x & 31) == 0) sh.red[threadIdx.x >> 5] = v;
      named_sync(1, 128);
      jn = min(min(sh.red[0], sh.red[1]), min(sh.red[2], sh.red[3]));
      named_sync(1, 128);
    }
    return jn == LM_BIG ? -1 : (jn / c.nbt) * c.nbt * p.bs;
  }
  static __device__ __forceinline__ int first_tile(const LmParams &p, const Cta &c, Shared &sh) {
    return tile_at(p, c, 0, sh);
  }
  static __device__ __forceinline__ int next_tile(const LmParams &p, const Cta &c, int k0, Shared &sh) {
    return tile_at(p, c, k0 / p.bs + c.nbt, sh);
  }

  static __device__ __forceinline__ void init_rows(const LmParams &p, const Cta &c, int warp, Rows &r) {
    make_rows(p, c.s, c.hk, c.i0, c.rows, warp, (threadIdx.x & 31) >> 2, r.R);
    r.m[0] = r.m[1] = NEG_INF;
    r.l[0] = r.l[1] = 0.f;
  }
  static __device__ __forceinline__ void probs(const LmParams &p, const Cta &c, Rows &r, float (*S)[4],
                                               int k0, float *alpha, float *ps) {
    constexpr int NF = BN / 8;
    const int t4 = threadIdx.x & 3, j0 = k0 / LM_BS, nk = min(c.nbt * LM_BS, c.s.kl - k0);
    const u32 em[2] = {early_mask(p, r.R, 0, j0, c.nbt, t4), early_mask(p, r.R, 1, j0, c.nbt, t4)};
#pragma unroll
    for (int f = 0; f < NF; ++f)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[f][e] *= p.scale_log2;
    fwd_probs_fixed<NF, LM_BS>(S, r.R, em, j0, k0, nk, r.m, alpha, ps);
  }
  static __device__ __forceinline__ void store(const LmParams &p, const Cta &c, const Rows &r, int warp,
                                               float (*O)[4]) {
    fwd_store<ELEM, DP / 8>(p, c.s, c.h, c.i0, c.rows, warp, O, r.m, r.l);
  }
};

struct LmSm90Args {
  Sm90Maps maps;
  LmParams p;
};
CHECK_MIRROR(LmSm90Args);

extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1) lm_fwd_sm90(const __grid_constant__ LmSm90Args a) {
  sm90_attn_fwd<LmSm90>(a.p, a.maps);
}
#elif LM_MULTI
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_fwd(const LmParams p) {
  lm_qtile_multi<LM_ELEM, LM_DP, false>(p);
}
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_bwd_dq(const LmParams p) {
  lm_qtile_multi<LM_ELEM, LM_DP, true>(p);
}
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_bwd_dkdv(const LmParams p) {
  lm_bwd_dkdv_multi<LM_ELEM, LM_DP>(p);
}
#else
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_fwd(const LmParams p) {
  lm_fwd_impl<LM_ELEM, LM_DP, LM_KT>(p);
}
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_bwd_dq(const LmParams p) {
  lm_bwd_dq_impl<LM_ELEM, LM_DP, LM_KT>(p);
}
extern "C" __global__ void __launch_bounds__(LM_THREADS) lm_bwd_dkdv(const LmParams p) {
  lm_bwd_dkdv_impl<LM_ELEM, LM_DP, LM_KT>(p);
}
#endif
#if !LM_SM90
extern "C" __global__ void __launch_bounds__(TOPK_THREADS) lm_topk(const LmParams p) {
  lm_topk_impl<LM_ELEM>(p);
}
#endif
