// Native Sparse Attention: the three attention branches (sliding window, compressed, selected)
// on tensor cores, forward and backward (docs/api/nsa.md, "Math").
//
// Every kernel works on ROW TILES (query rows = (token, query head) pairs, flattened as
// row = token·G + head-in-group, so the G heads of a kv group share every K/V tile) and KEY
// TILES of 64 consecutive key positions. Each row carries its own visible key range
// [lo, hi) in global key positions (window: [max(seq start, t−W+1), t+1); compressed:
// [cstart, cstart + visible windows); selected: [seq start, t+1) intersected with the block
// tile), so one masking rule serves every kind and every packed (varlen) layout.
//
// Kernels (NSA_ELEM: 0 f32 (3xTF32), 1 f16, 2 bf16; NSA_DK, NSA_DV: padded head dims 64/128):
//   nsa_fwd_{win,cmp}      query-tile outer (64 rows, 4 warps), key tiles streamed, online softmax
//   nsa_fwd_selq           selected, query-outer: one CTA (4 warps) per (token, kv head, 16
//                          heads), loops over the token's selected blocks (large G), the warps
//                          splitting every key tile by columns
//   nsa_fwd_selkv{1,2}     selected, KV-outer (FSA): one CTA per chunk of the list of queries
//                          that selected a block (block K/V stay in shared memory), writes
//                          float32 partials (o, lse) per (token, head, slot)
//   nsa_combine            exact log-sum-exp combination of the partials
//   nsa_delta              Δ = rowsum(dO ∘ (O + O_lo)), O_lo the output's rounding residual
//   nsa_dq_{win,cmp}, nsa_dq_selq    dQ, query-outer (deterministic)
//   nsa_dkdv_{win,cmp}     dK/dV per key tile over the query rows that can see it
//   nsa_dkdv_sel           dK/dV per (block, key tile, chunk of its query list); lists longer
//                          than one chunk write float32 partials reduced in order by
//   nsa_dkdv_reduce        (deterministic, no atomics anywhere). For small groups it also
//                          writes the float32 dQ partial of every (row, slot, key tile) from
//                          the dS it already holds (FSA's KV-outer dQ), summed in slot order by
//   nsa_dq_reduce          (replacing the query-outer dQ, which runs one token per CTA)
#include "common.cuh"

#ifndef NSA_SM90
#define NSA_SM90 0
#endif

#define NSA_BN 64
#define NSA_LDS (NSA_BN + 8) // row stride of the dSᵀ tile in shared memory (keys x queries)

struct NsaParams {
  const void *q, *k, *v, *o, *dout;
  void *out, *dq, *dk, *dv;
  float *lse;              // [B, T, Hq] (strides slse)
  float *delta;            // [B, T, Hq] contiguous
  const void *idx;         // [B, T, Hkv, n] int32/int64
  const void *counts;      // [B, T, Hkv] int32/int64 or null
  const void *cu;          // [N + 1] int32/int64 or null
  const long long *cmp_off; // [N + 1] compressed row offsets (varlen compressed only)
  const int *entries;      // sorted list entries e = ((b·T + t)·Hkv + g)·n + slot
  const int *list_off;     // [NL + 1]
  const int *chunk_off;    // [NL + 1]
  const int *split_off;    // [NL + 1]
  float *part_o;           // [B, T, Hq, n, DV]
  float *part_lse;         // [B, T, Hq, n]
  float *scratch;          // [slots, key tiles, 64, D + DV]
  float *part_dq;          // [B, T, Hq, n, key tiles, D] or null (selected backward, KV-outer dQ)
  void *out_lo;            // [B, T, Hq, DV] (strides slo) or null: the output's rounding
                           // residual, written by the forward (16-bit) and added to O in Δ
  float *rowinfo;          // [B·Hq, 4, Tp] (Hopper backward): lse·log2(e), Δ, key range lo, hi
  i64 sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3], sdk[3], sdv[3], slo[3], slse[3], sidx[4], scnt[3];
  int B, T, S, Hq, Hkv, G, D, DV, n;
  int N, cu_kind, idx_kind, cnt_kind, count_const;
  int window;                // window branch: W
  int cmp_size, cmp_stride;  // compressed branch: kernel size l, stride d
  int block;                 // selected branch: block size
  int NL, chunk_tokens, key_tiles;
  int vec_q, vec_k, vec_v, vec_o, vec_do;
  int Tp; // rowinfo's tokens per plane: T rounded up to 64
  float scale;
};
CHECK_MIRROR(NsaParams);

// ----------------------------------------------------------------------------- small helpers

__device__ __forceinline__ i64 nsa_cu(const NsaParams &p, int s) { return clamped_offset(p.cu, p.cu_kind, s, p.T); }

// Start and end (exclusive) of the sequence holding token t of batch row b.
__device__ __forceinline__ void nsa_seq_of(const NsaParams &p, int t, int &s, int &start, int &end) {
  if (p.cu_kind < 0) {
    s = 0;
    start = 0;
    end = p.T;
    return;
  }
  s = sequence_containing(p.cu, p.cu_kind, p.N, t);
  start = (int)nsa_cu(p, s);
  end = (int)nsa_cu(p, s + 1);
  if (end < start) end = start;
}

// The sequence holding compressed row k (varlen compressed keys).
__device__ __forceinline__ int nsa_cmp_seq(const NsaParams &p, int k) {
  return sequence_containing(p.cmp_off, 1, p.N, k);
}

__device__ __forceinline__ int nsa_nvis(int tl, int l, int d) {
  return tl + 1 >= l ? (tl + 1 - l) / d + 1 : 0;
}
__device__ __forceinline__ int nsa_nwin(int len, int l, int d) {
  return len >= l ? (len - l) / d + 1 : 0;
}

__device__ __forceinline__ i64 nsa_idx(const NsaParams &p, int b, int t, int g, int slot) {
  const i64 off = b * p.sidx[0] + t * p.sidx[1] + g * p.sidx[2] + slot * p.sidx[3];
  return p.idx_kind == 1 ? ((const i64 *)p.idx)[off] : (i64)((const int *)p.idx)[off];
}

// Number of used entries of the block-index row (b, t, g).
__device__ __forceinline__ int nsa_count(const NsaParams &p, int b, int t, int g) {
  if (p.cnt_kind < 0) return p.count_const < 0 ? p.n : min(p.count_const, p.n);
  const i64 off = b * p.scnt[0] + t * p.scnt[1] + g * p.scnt[2];
  i64 c = p.cnt_kind == 1 ? ((const i64 *)p.counts)[off] : (i64)((const int *)p.counts)[off];
  return c < 0 ? 0 : (c > p.n ? p.n : (int)c);
}

// Visible key range [lo, hi) of token t (global in its batch row) for the range kinds.
template <int KIND>
__device__ __forceinline__ void nsa_range(const NsaParams &p, int t, int &lo, int &hi) {
  int s, start, end;
  nsa_seq_of(p, t, s, start, end);
  if (KIND == 0) {
    lo = max(start, t - p.window + 1);
    hi = t + 1;
  } else {
    i64 cst = 0;
    int clen = p.S;
    if (p.cu_kind >= 0) {
      cst = p.cmp_off[s];
      clen = nsa_nwin(end - start, p.cmp_size, p.cmp_stride);
    }
    const int nv = min(nsa_nvis(t - start, p.cmp_size, p.cmp_stride), clen);
    i64 l0 = cst < 0 ? 0 : (cst > p.S ? p.S : cst);
    i64 h0 = cst + nv;
    h0 = h0 > p.S ? p.S : (h0 < l0 ? l0 : h0);
    lo = (int)l0;
    hi = (int)h0;
  }
}

// Decodes a list entry.
__device__ __forceinline__ void nsa_entry(const NsaParams &p, int e, int &b, int &t, int &g, int &slot) {
  slot = e % p.n;
  e /= p.n;
  g = e % p.Hkv;
  e /= p.Hkv;
  t = e % p.T;
  b = e / p.T;
}

// Loads ROWS gathered rows (per-row element offsets `off`, < 0: zero row) of COLS columns.
template <int ELEM, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void nsa_load_rows(typename Elem<ELEM>::T *s, int ld,
                                              const typename Elem<ELEM>::T *base, const i64 *off,
                                              int cols_valid, bool vec) {
  typedef typename Elem<ELEM>::T T;
  constexpr int V = 16 / sizeof(T);
  constexpr int GROUPS = COLS / V;
  for (int i = threadIdx.x; i < ROWS * GROUPS; i += THREADS) {
    const int r = i / GROUPS, c = (i % GROUPS) * V;
    T *dst = s + r * ld + c;
    const i64 o = off[r];
    if (o >= 0 && vec && c + V <= cols_valid) {
      cp_async16(dst, base + o + c);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) dst[j] = (o >= 0 && c + j < cols_valid) ? base[o + c + j] : T(0);
    }
  }
}

// Row bookkeeping of one row tile, in shared memory.
template <int M> struct Rows {
  int b[M], t[M], h[M], slot[M], lo[M], hi[M];
  float lse2[M], dl[M];
  i64 qo[M], oo[M];
};

// ----------------------------------------------------------------------------- tile math

// Online-softmax update of one warp's 16 rows with columns col0 .. col0 + NC − 1 of one key
// tile (keys k0 .. k0 + nk − 1; columns >= nk are masked).
template <int ELEM, int DK, int DV, int NC = NSA_BN>
__device__ __forceinline__ void nsa_fwd_tile(const typename Elem<ELEM>::T *Qs,
                                             const typename Elem<ELEM>::T *Ks,
                                             const typename Elem<ELEM>::T *Vs, int row0, int col0,
                                             int k0, int nk, const int *rlo, const int *rhi,
                                             float sl2, float (*O)[4], float *m, float *l) {
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD, NT = NC / 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  float S[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.f;
#pragma unroll
  for (int kd = 0; kd < DK; kd += KS) {
    u32 a[4], bf[2];
    F::A_mk(a, Qs, LDK, row0, kd);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      F::B_nk(bf, Ks, LDK, kd, col0 + 8 * j);
      mma<ELEM>(S[j], a, bf);
    }
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = row0 + g + 8 * rr;
    const int lo = rlo[r], hi = rhi[r];
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int col = col0 + 8 * j + 2 * tq + cc, key = k0 + col;
        const bool ok = col < nk && key >= lo && key < hi;
        const float s = ok ? S[j][2 * rr + cc] * sl2 : NEG_INF;
        S[j][2 * rr + cc] = s;
        mx = fmaxf(mx, s);
      }
    mx = quad_max(mx);
    const float mnew = fmaxf(m[rr], mx);
    const float muse = mnew == NEG_INF ? 0.f : mnew;
    const float corr = fast_exp2(m[rr] - muse);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const float pv = fast_exp2(S[j][2 * rr + cc] - muse);
        S[j][2 * rr + cc] = pv;
        sum += pv;
      }
    l[rr] = l[rr] * corr + sum;
    m[rr] = mnew;
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      O[j][2 * rr] *= corr;
      O[j][2 * rr + 1] *= corr;
    }
  }
#pragma unroll
  for (int kk = 0; kk < NC / KS; ++kk) {
    u32 a[4], bf[2];
    F::A_from_acc(a, S, kk);
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      F::B_kn(bf, Vs, LDV, col0 + kk * KS, 8 * j);
      mma<ELEM>(O[j], a, bf);
    }
  }
}

// dQ update of one warp's 16 rows with columns col0 .. col0 + NC − 1 of one key tile.
template <int ELEM, int DK, int DV, int NC = NSA_BN>
__device__ __forceinline__ void nsa_dq_tile(const typename Elem<ELEM>::T *Qs,
                                            const typename Elem<ELEM>::T *dOs,
                                            const typename Elem<ELEM>::T *Ks,
                                            const typename Elem<ELEM>::T *Vs, int row0, int col0,
                                            int k0, int nk, const int *rlo, const int *rhi,
                                            const float *rlse2, const float *rdl, float sl2,
                                            float (*dQ)[4]) {
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD, NT = NC / 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  float S[NT][4], P[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) S[j][c] = P[j][c] = 0.f;
#pragma unroll
  for (int kd = 0; kd < DK; kd += KS) {
    u32 a[4], bf[2];
    F::A_mk(a, Qs, LDK, row0, kd);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      F::B_nk(bf, Ks, LDK, kd, col0 + 8 * j);
      mma<ELEM>(S[j], a, bf);
    }
  }
#pragma unroll
  for (int kd = 0; kd < DV; kd += KS) {
    u32 a[4], bf[2];
    F::A_mk(a, dOs, LDV, row0, kd);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      F::B_nk(bf, Vs, LDV, kd, col0 + 8 * j);
      mma<ELEM>(P[j], a, bf);
    }
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = row0 + g + 8 * rr;
    const int lo = rlo[r], hi = rhi[r];
    const float l2 = rlse2[r], dl = rdl[r];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int col = col0 + 8 * j + 2 * tq + cc, key = k0 + col;
        const bool ok = col < nk && key >= lo && key < hi;
        const float pv = ok ? fast_exp2(S[j][2 * rr + cc] * sl2 - l2) : 0.f;
        S[j][2 * rr + cc] = ok ? pv * (P[j][2 * rr + cc] - dl) : 0.f;
      }
  }
#pragma unroll
  for (int kk = 0; kk < NC / KS; ++kk) {
    u32 a[4], bf[2];
    F::A_from_acc(a, S, kk);
#pragma unroll
    for (int j = 0; j < DK / 8; ++j) {
      F::B_kn(bf, Ks, LDK, col0 + kk * KS, 8 * j);
      mma<ELEM>(dQ[j], a, bf);
    }
  }
}

// dK/dV update of one warp's 16 keys (rows 16·warp of the key tile) with one 64-row query tile.
template <int ELEM, int DK, int DV>
__device__ __forceinline__ void nsa_dkdv_tile(const typename Elem<ELEM>::T *Qs,
                                              const typename Elem<ELEM>::T *dOs,
                                              const typename Elem<ELEM>::T *Ks,
                                              const typename Elem<ELEM>::T *Vs, int key0, int k0,
                                              int nk, const int *rt, const int *rlo,
                                              const int *rhi, const float *rlse2,
                                              const float *rdl, float sl2, float (*dK)[4],
                                              float (*dV)[4], typename Elem<ELEM>::T *dSs) {
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD, NT = 64 / 8; // 64 query columns
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  float S[NT][4], P[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) S[j][c] = P[j][c] = 0.f;
  // Sᵀ = K Qᵀ (keys x queries), dPᵀ = V dOᵀ
#pragma unroll
  for (int kd = 0; kd < DK; kd += KS) {
    u32 a[4], bf[2];
    F::A_mk(a, Ks, LDK, key0, kd);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      F::B_nk(bf, Qs, LDK, kd, 8 * j);
      mma<ELEM>(S[j], a, bf);
    }
  }
#pragma unroll
  for (int kd = 0; kd < DV; kd += KS) {
    u32 a[4], bf[2];
    F::A_mk(a, Vs, LDV, key0, kd);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      F::B_nk(bf, dOs, LDV, kd, 8 * j);
      mma<ELEM>(P[j], a, bf);
    }
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int kr = key0 + g + 8 * rr, key = k0 + kr;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int qc = 8 * j + 2 * tq + cc;
        const bool ok = kr < nk && rt[qc] >= 0 && key >= rlo[qc] && key < rhi[qc];
        const float pv = ok ? fast_exp2(S[j][2 * rr + cc] * sl2 - rlse2[qc]) : 0.f;
        S[j][2 * rr + cc] = pv;
        P[j][2 * rr + cc] = ok ? pv * (P[j][2 * rr + cc] - rdl[qc]) : 0.f;
        if (dSs) dSs[kr * NSA_LDS + qc] = from_f32<ELEM>(P[j][2 * rr + cc]);
      }
  }
  // dV += Pᵀ dO, dK += dSᵀ Q
#pragma unroll
  for (int kk = 0; kk < 64 / KS; ++kk) {
    u32 a[4], bf[2];
    F::A_from_acc(a, S, kk);
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      F::B_kn(bf, dOs, LDV, kk * KS, 8 * j);
      mma<ELEM>(dV[j], a, bf);
    }
    F::A_from_acc(a, P, kk);
#pragma unroll
    for (int j = 0; j < DK / 8; ++j) {
      F::B_kn(bf, Qs, LDK, kk * KS, 8 * j);
      mma<ELEM>(dK[j], a, bf);
    }
  }
}

// dQ partial of one warp's 16 query rows from one key tile: dS (read back from its transpose
// dSᵀ in shared memory, written by every warp of the tile) times the tile's keys, scaled, stored
// float32 per (row, slot, key tile) for nsa_dq_reduce. Columns in passes of at most 64 keep the
// accumulators small beside the live dK/dV.
template <int ELEM, int DK, int M>
__device__ __forceinline__ void nsa_dq_partial(const NsaParams &p, const Rows<M> &R,
                                               const typename Elem<ELEM>::T *dSs,
                                               const typename Elem<ELEM>::T *Ks, int row0,
                                               int key_tile) {
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, LDK = DK + Elem<ELEM>::PAD;
  constexpr int NJ = DK / 8 < 8 ? DK / 8 : 8;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  if (R.t[row0] < 0) return; // valid rows form a prefix of the tile
#pragma unroll
  for (int c0 = 0; c0 < DK / 8; c0 += NJ) {
    float acc[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < NSA_BN / KS; ++kk) {
      u32 a[4], bf[2];
      F::A_km(a, dSs, NSA_LDS, row0, kk * KS);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        F::B_kn(bf, Ks, LDK, kk * KS, 8 * (c0 + j));
        mma<ELEM>(acc[j], a, bf);
      }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int r = row0 + g + 8 * rr, t = R.t[r];
      if (t < 0) continue;
      const i64 pi = ((((i64)R.b[r] * p.T + t) * p.Hq + R.h[r]) * p.n + R.slot[r]) * p.key_tiles;
      float *dst = p.part_dq + (pi + key_tile) * p.D;
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * (c0 + j) + 2 * tq + cc;
          if (col < p.D) dst[col] = acc[j][2 * rr + cc] * p.scale;
        }
    }
  }
}

// ----------------------------------------------------------------------------- row set-up

// Flattened row R (= t·G + head in group) of batch row b and kv head g, range kinds.
template <int KIND, int M>
__device__ __forceinline__ void nsa_row_range(const NsaParams &p, Rows<M> &R, int r, int b, int g,
                                              i64 flat, bool with_bwd) {
  int t = -1, h = 0, lo = 0, hi = 0;
  if (flat >= 0 && flat < (i64)p.T * p.G) {
    t = (int)(flat / p.G);
    h = g * p.G + (int)(flat % p.G);
    nsa_range<KIND>(p, t, lo, hi);
  }
  R.b[r] = b;
  R.t[r] = t;
  R.h[r] = h;
  R.slot[r] = 0;
  R.lo[r] = lo;
  R.hi[r] = hi;
  R.qo[r] = t >= 0 ? b * p.sq[0] + t * p.sq[1] + h * p.sq[2] : -1;
  R.oo[r] = t >= 0 ? b * p.sdo[0] + t * p.sdo[1] + h * p.sdo[2] : -1;
  if (with_bwd) {
    R.lse2[r] = t >= 0 ? p.lse[b * p.slse[0] + t * p.slse[1] + h * p.slse[2]] * LOG2E : 0.f;
    R.dl[r] = t >= 0 ? p.delta[((i64)b * p.T + t) * p.Hq + h] : 0.f;
  }
}

// Row r of a list-gathered tile: entry e, head hin of the group; keys [seq start, t + 1).
template <int M>
__device__ __forceinline__ void nsa_row_entry(const NsaParams &p, Rows<M> &R, int r, int e,
                                              int hin, bool valid, bool with_bwd) {
  int b = 0, t = -1, g = 0, slot = 0, h = 0, lo = 0, hi = 0;
  if (valid) {
    nsa_entry(p, p.entries[e], b, t, g, slot);
    int s, start, end;
    nsa_seq_of(p, t, s, start, end);
    h = g * p.G + hin;
    lo = start;
    hi = t + 1;
  }
  R.b[r] = b;
  R.t[r] = t;
  R.h[r] = h;
  R.slot[r] = slot;
  R.lo[r] = lo;
  R.hi[r] = hi;
  R.qo[r] = t >= 0 ? b * p.sq[0] + t * p.sq[1] + h * p.sq[2] : -1;
  R.oo[r] = t >= 0 ? b * p.sdo[0] + t * p.sdo[1] + h * p.sdo[2] : -1;
  if (with_bwd) {
    R.lse2[r] = t >= 0 ? p.lse[b * p.slse[0] + t * p.slse[1] + h * p.slse[2]] * LOG2E : 0.f;
    R.dl[r] = t >= 0 ? p.delta[((i64)b * p.T + t) * p.Hq + h] : 0.f;
  }
}

// Key tile load: rows k0 .. k0 + nk − 1 of k and v (batch b, kv head g), zero-filled to 64.
template <int ELEM, int DK, int DV, int THREADS>
__device__ __forceinline__ void nsa_load_kv(const NsaParams &p, typename Elem<ELEM>::T *Ks,
                                            typename Elem<ELEM>::T *Vs, int b, int g, int k0,
                                            int nk) {
  typedef typename Elem<ELEM>::T T;
  constexpr int PAD = Elem<ELEM>::PAD;
  const T *kb = (const T *)p.k + b * p.sk[0] + (i64)k0 * p.sk[1] + g * p.sk[2];
  const T *vb = (const T *)p.v + b * p.sv[0] + (i64)k0 * p.sv[1] + g * p.sv[2];
  load_tile_async<ELEM, NSA_BN, DK, THREADS>(Ks, DK + PAD, kb, p.sk[1], nk, p.D, p.vec_k);
  load_tile_async<ELEM, NSA_BN, DV, THREADS>(Vs, DV + PAD, vb, p.sv[1], nk, p.DV, p.vec_v);
}

// Row (b, t, h) of the output's rounding residual, or null when the caller did not ask for it.
template <int ELEM>
__device__ __forceinline__ typename Elem<ELEM>::T *nsa_out_lo(const NsaParams &p, int b, int t, int h) {
  typedef typename Elem<ELEM>::T T;
  if (p.out_lo == nullptr) return nullptr;
  return (T *)p.out_lo + b * p.slo[0] + (i64)t * p.slo[1] + h * p.slo[2];
}

// One final output element: rounded into ob, its rounding residual into olo when not null.
template <int ELEM>
__device__ __forceinline__ void nsa_store_out(typename Elem<ELEM>::T *ob, typename Elem<ELEM>::T *olo,
                                              int col, float x) {
  typename Elem<ELEM>::T hi, lo;
  split_f32<ELEM>(x, hi, lo);
  ob[col] = hi;
  if (olo != nullptr) olo[col] = lo;
}

// Final output of a forward row tile (o normalised, natural-log lse), or partials.
template <int ELEM, int DV, int M>
__device__ __forceinline__ void nsa_fwd_store(const NsaParams &p, const Rows<M> &R, int row0,
                                              float (*O)[4], float *m, float *l, bool partial) {
  typedef typename Elem<ELEM>::T T;
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lt = l[rr];
    lt = quad_sum(lt);
    const int r = row0 + g + 8 * rr;
    const int t = R.t[r];
    if (t < 0) continue;
    const int b = R.b[r], h = R.h[r];
    const bool any = lt > 0.f;
    const float inv = any ? 1.f / lt : 0.f;
    const float lse = any ? m[rr] * LN2 + logf(lt) : NEG_INF;
    if (partial) {
      const i64 pi = (((i64)b * p.T + t) * p.Hq + h) * p.n + R.slot[r];
      float *po = p.part_o + pi * p.DV;
#pragma unroll
      for (int j = 0; j < DV / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.DV) po[col] = O[j][2 * rr + cc] * inv;
        }
      if (tq == 0) p.part_lse[pi] = lse;
    } else {
      T *ob = (T *)p.out + b * p.so[0] + (i64)t * p.so[1] + h * p.so[2];
      T *olo = nsa_out_lo<ELEM>(p, b, t, h);
#pragma unroll
      for (int j = 0; j < DV / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.DV) nsa_store_out<ELEM>(ob, olo, col, O[j][2 * rr + cc] * inv);
        }
      if (tq == 0) p.lse[b * p.slse[0] + t * p.slse[1] + h * p.slse[2]] = lse;
    }
  }
}

// ----------------------------------------------------------------------------- forward

// The union of the key ranges of a tile's rows that see any key (one thread; empty: lo > hi).
template <int M> __device__ __forceinline__ void nsa_tile_key_range(const Rows<M> &R, int &klo, int &khi) {
  int lo = 0x7fffffff, hi = 0;
  for (int r = 0; r < M; ++r)
    if (R.t[r] >= 0 && R.hi[r] > R.lo[r]) {
      lo = min(lo, R.lo[r]);
      hi = max(hi, R.hi[r]);
    }
  klo = lo;
  khi = hi;
}

// KIND 0 window, 1 compressed (grid: row tiles of 64, Hkv, B).
template <int ELEM, int DK, int DV, int KIND>
__device__ __forceinline__ void nsa_fwd_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int M = 64, THREADS = 128, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *Ks = Qs + M * LDK;
  T *Vs = Ks + NSA_BN * LDK;
  __shared__ Rows<M> R;
  __shared__ int s_klo, s_khi;
  const int g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x >> 5;
  const int row0 = 16 * warp;
  const float sl2 = p.scale * LOG2E;
  if (threadIdx.x < M)
    nsa_row_range<KIND, M>(p, R, threadIdx.x, b, g, (i64)blockIdx.x * M + threadIdx.x, false);
  __syncthreads();
  if (R.t[0] < 0) return; // valid rows form a prefix: an empty tile has nothing to do
  if (threadIdx.x == 0) nsa_tile_key_range(R, s_klo, s_khi);
  nsa_load_rows<ELEM, M, DK, THREADS>(Qs, LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
  cp_async_commit();

  float O[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) O[j][0] = O[j][1] = O[j][2] = O[j][3] = 0.f;
  const bool active = R.t[row0] >= 0;

  auto tile = [&](int k0, int nk) {
    __syncthreads(); // previous tile's reads are done
    nsa_load_kv<ELEM, DK, DV, THREADS>(p, Ks, Vs, b, g, k0, nk);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (active) nsa_fwd_tile<ELEM, DK, DV>(Qs, Ks, Vs, row0, 0, k0, nk, R.lo, R.hi, sl2, O, m, l);
  };

  __syncthreads();
  const int klo = s_klo, khi = s_khi;
  for (int k0 = klo; k0 < khi; k0 += NSA_BN) tile(k0, min(NSA_BN, khi - k0));
  cp_async_wait<0>(); // a tile with no key tiles still has its Q copies in flight
  if (active) nsa_fwd_store<ELEM, DV, M>(p, R, row0, O, m, l, false);
}

// Selected KV-outer: grid.x = chunk (of the per-block query lists). KT: key tiles per block.
template <int ELEM, int DK, int DV, int KT>
__device__ __forceinline__ void nsa_fwd_kv_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int NW = 4, M = 64, THREADS = 128, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *Ks = Qs + M * LDK;
  T *Vs = Ks + KT * NSA_BN * LDK;
  __shared__ Rows<M> R;
  const int chunk = blockIdx.x, warp = threadIdx.x >> 5, row0 = 16 * warp;
  if (chunk >= p.chunk_off[p.NL]) return;
  int lo = 0, hi = p.NL - 1; // list L: largest with chunk_off[L] <= chunk
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (p.chunk_off[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  const int L = lo, c = chunk - p.chunk_off[L];
  const int e_begin = p.list_off[L], e_end = p.list_off[L + 1];
  const int eb = e_begin + c * p.chunk_tokens;
  const int ee = min(e_end, eb + p.chunk_tokens);
  if (eb >= ee) return;
  int b, t0, g, slot0;
  nsa_entry(p, p.entries[e_begin], b, t0, g, slot0);
  int s, start, end;
  nsa_seq_of(p, t0, s, start, end);
  const i64 j = nsa_idx(p, b, t0, g, slot0);
  const int blo = start + (int)j * p.block;
  const int bhi = min(blo + p.block, end);
  const int nkb = bhi - blo;
  if (j < 0 || nkb <= 0) return;
  for (int kt = 0; kt < KT; ++kt)
    nsa_load_kv<ELEM, DK, DV, THREADS>(p, Ks + kt * NSA_BN * LDK, Vs + kt * NSA_BN * LDV, b, g,
                                       blo + kt * NSA_BN, min(NSA_BN, nkb - kt * NSA_BN));
  cp_async_commit();
  const float sl2 = p.scale * LOG2E;
  const int rows = (ee - eb) * p.G;
  for (int r0 = 0; r0 < rows; r0 += M) {
    __syncthreads(); // previous tile's reads of R and Qs are done
    if (threadIdx.x < M) {
      const int rr = r0 + threadIdx.x;
      nsa_row_entry<M>(p, R, threadIdx.x, eb + rr / p.G, rr % p.G, rr < rows, false);
    }
    __syncthreads();
    nsa_load_rows<ELEM, M, DK, THREADS>(Qs, LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (R.t[row0] >= 0) {
      float O[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
      for (int jj = 0; jj < DV / 8; ++jj) O[jj][0] = O[jj][1] = O[jj][2] = O[jj][3] = 0.f;
#pragma unroll
      for (int kt = 0; kt < KT; ++kt) {
        const int nk = min(NSA_BN, nkb - kt * NSA_BN);
        if (nk > 0)
          nsa_fwd_tile<ELEM, DK, DV>(Qs, Ks + kt * NSA_BN * LDK, Vs + kt * NSA_BN * LDV, row0, 0,
                                     blo + kt * NSA_BN, nk, R.lo, R.hi, sl2, O, m, l);
      }
      nsa_fwd_store<ELEM, DV, M>(p, R, row0, O, m, l, true);
    }
  }
}

// The (token, head) row of one warp in the one-warp-per-row kernels (4 warps a CTA), with its
// sequence, last visible block and selected-slot count. False past the last row.
struct NsaWarpRow {
  i64 row;
  int b, t, h, g, start, end, last, cnt;
};
__device__ __forceinline__ bool nsa_warp_row(const NsaParams &p, NsaWarpRow &w) {
  w.row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (w.row >= (i64)p.B * p.T * p.Hq) return false;
  w.h = (int)(w.row % p.Hq);
  w.t = (int)((w.row / p.Hq) % p.T);
  w.b = (int)(w.row / ((i64)p.Hq * p.T));
  w.g = w.h / p.G;
  int s;
  nsa_seq_of(p, w.t, s, w.start, w.end);
  w.last = (w.t - w.start) / p.block;
  w.cnt = nsa_count(p, w.b, w.t, w.g);
  return true;
}

// Combines the partials of every (token, head): one warp per row.
template <int ELEM> __device__ __forceinline__ void nsa_combine_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  const int lane = threadIdx.x & 31;
  NsaWarpRow w;
  if (!nsa_warp_row(p, w)) return;
  const i64 row = w.row;
  const int b = w.b, t = w.t, h = w.h, g = w.g, last = w.last, cnt = w.cnt;
  const float *pl = p.part_lse + row * p.n;
  float mx = NEG_INF;
  for (int slot = 0; slot < cnt; ++slot) {
    const i64 j = nsa_idx(p, b, t, g, slot);
    if (j >= 0 && j <= last) mx = fmaxf(mx, pl[slot]);
  }
  const float muse = mx == NEG_INF ? 0.f : mx;
  float sum = 0.f;
  for (int slot = 0; slot < cnt; ++slot) {
    const i64 j = nsa_idx(p, b, t, g, slot);
    if (j >= 0 && j <= last) sum += __expf(pl[slot] - muse);
  }
  const float lse = sum > 0.f ? muse + logf(sum) : NEG_INF;
  T *ob = (T *)p.out + b * p.so[0] + (i64)t * p.so[1] + h * p.so[2];
  T *olo = nsa_out_lo<ELEM>(p, b, t, h);
  for (int col = lane; col < p.DV; col += 32) {
    float acc = 0.f;
    for (int slot = 0; slot < cnt; ++slot) {
      const i64 j = nsa_idx(p, b, t, g, slot);
      if (j >= 0 && j <= last) acc += __expf(pl[slot] - lse) * p.part_o[(row * p.n + slot) * p.DV + col];
    }
    nsa_store_out<ELEM>(ob, olo, col, sum > 0.f ? acc : 0.f);
  }
  if (lane == 0) p.lse[b * p.slse[0] + t * p.slse[1] + h * p.slse[2]] = lse;
}

// ----------------------------------------------------------------------------- backward

// Δ of row (b, t, h) (row_delta), every lane of the warp gets it.
template <int ELEM> __device__ __forceinline__ float nsa_row_delta(const NsaParams &p, int b, int t, int h) {
  typedef typename Elem<ELEM>::T T;
  const T *ob = (const T *)p.o + b * p.so[0] + (i64)t * p.so[1] + h * p.so[2];
  const T *db = (const T *)p.dout + b * p.sdo[0] + (i64)t * p.sdo[1] + h * p.sdo[2];
  return row_delta<ELEM>(ob, nsa_out_lo<ELEM>(p, b, t, h), db, p.DV);
}

template <int ELEM> __device__ __forceinline__ void nsa_delta_impl(const NsaParams &p) {
  const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= (i64)p.B * p.T * p.Hq) return;
  const int h = (int)(row % p.Hq), t = (int)((row / p.Hq) % p.T), b = (int)(row / ((i64)p.Hq * p.T));
  const float d = nsa_row_delta<ELEM>(p, b, t, h);
  if ((threadIdx.x & 31) == 0) p.delta[row] = d;
}

// Stores one warp's 16 dQ rows (scaled by the softmax scale).
template <int ELEM, int DK, int M>
__device__ __forceinline__ void nsa_dq_store(const NsaParams &p, const Rows<M> &R, int row0,
                                             float (*dQ)[4]) {
  typedef typename Elem<ELEM>::T T;
  const int lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = row0 + gq + 8 * rr;
    const int t = R.t[r];
    if (t < 0) continue;
    T *db = (T *)p.dq + R.b[r] * p.sdq[0] + (i64)t * p.sdq[1] + R.h[r] * p.sdq[2];
#pragma unroll
    for (int j = 0; j < DK / 8; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int col = 8 * j + 2 * tq + cc;
        if (col < p.D) db[col] = from_f32<ELEM>(dQ[j][2 * rr + cc] * p.scale);
      }
  }
}

// dQ, query-outer; same grids as the forward (KIND 0, 1: row tiles).
template <int ELEM, int DK, int DV, int KIND>
__device__ __forceinline__ void nsa_dq_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int M = 64, THREADS = 128, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dOs = Qs + M * LDK;
  T *Ks = dOs + M * LDV;
  T *Vs = Ks + NSA_BN * LDK;
  __shared__ Rows<M> R;
  __shared__ int s_klo, s_khi;
  const int g = blockIdx.y, b = blockIdx.z, warp = threadIdx.x >> 5;
  const int row0 = 16 * warp;
  const float sl2 = p.scale * LOG2E;
  if (threadIdx.x < M)
    nsa_row_range<KIND, M>(p, R, threadIdx.x, b, g, (i64)blockIdx.x * M + threadIdx.x, true);
  __syncthreads();
  if (R.t[0] < 0) return;
  if (threadIdx.x == 0) nsa_tile_key_range(R, s_klo, s_khi);
  nsa_load_rows<ELEM, M, DK, THREADS>(Qs, LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
  nsa_load_rows<ELEM, M, DV, THREADS>(dOs, LDV, (const T *)p.dout, R.oo, p.DV, p.vec_do);
  cp_async_commit();
  float dQ[DK / 8][4];
#pragma unroll
  for (int j = 0; j < DK / 8; ++j) dQ[j][0] = dQ[j][1] = dQ[j][2] = dQ[j][3] = 0.f;
  const bool active = R.t[row0] >= 0;
  auto tile = [&](int k0, int nk) {
    __syncthreads();
    nsa_load_kv<ELEM, DK, DV, THREADS>(p, Ks, Vs, b, g, k0, nk);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (active)
      nsa_dq_tile<ELEM, DK, DV>(Qs, dOs, Ks, Vs, row0, 0, k0, nk, R.lo, R.hi, R.lse2, R.dl, sl2, dQ);
  };
  __syncthreads();
  const int klo = s_klo, khi = s_khi;
  for (int k0 = klo; k0 < khi; k0 += NSA_BN) tile(k0, min(NSA_BN, khi - k0));
  cp_async_wait<0>();
  if (active) nsa_dq_store<ELEM, DK, M>(p, R, row0, dQ);
}

// ----------------------------------------------------------------------------- selected, query-outer

// Large groups (G > KV_OUTER_MAX_GROUP) or blocks > 128. One CTA of 4 warps per (token, chunk
// of 16 heads of one kv group, kv head; grid: T · head chunks, Hkv, B): its 16 query rows are
// one m16 tile, so the CTA splits every 64-key tile by columns instead: warp w owns keys
// 16w .. 16w + 15 of each tile with its own online-softmax state (forward) or dQ partial, and the
// four are merged exactly at the end. The tiles of the token's selected blocks stream through
// STAGES K/V buffers, the next tile's copy in flight while the current one is used.

// Shared memory (mirrored by kernel_table in src/ops/nsa/attn_cuda.rs): 16 query rows (+ 16 dO rows in the
// backward) and STAGES K/V tile buffers: two unless they would take more than 96 KB (float32 with
// a 128 head dim), where one keeps more CTAs per SM.
template <int ELEM, int DK, int DV> struct NsaSel {
  typedef typename Elem<ELEM>::T T;
  static constexpr int LDK = DK + Elem<ELEM>::PAD, LDV = DV + Elem<ELEM>::PAD;
  static constexpr int STAGE = NSA_BN * (LDK + LDV); // elements of one K + V buffer
  static constexpr int STAGES = 2 * STAGE * (int)sizeof(T) <= 96 * 1024 ? 2 : 1;
  // The merge puts warps 1..3's float32 accumulators (16 rows x DK or DV) in the K/V buffers.
  static_assert(3 * 16 * (DK > DV ? DK : DV) * 4 <= STAGES * STAGE * (int)sizeof(T), "merge");
};

// The key tiles of one token's selected blocks in slot order (the slot loop of the reference:
// entries < 0 or past the token's last block skipped); the current tile is keys
// [k0, min(k0 + 64, bhi)).
struct NsaSelCursor {
  int b, g, tok, start, last, cnt;
  int slot, k0, bhi;
  // Moves to the next tile; false past the last one.
  __device__ __forceinline__ bool next(const NsaParams &p) {
    if (k0 + NSA_BN < bhi) {
      k0 += NSA_BN;
      return true;
    }
    while (++slot < cnt) {
      const i64 j = nsa_idx(p, b, tok, g, slot);
      if (j < 0 || j > last) continue;
      k0 = start + (int)j * p.block;
      bhi = min(k0 + p.block, tok + 1);
      if (k0 < bhi) return true; // (empty only for a token before its sequence's start)
    }
    return false;
  }
};

// Rows of the CTA (heads of the chunk; heads >= G are invalid rows, t = −1) and the cursor
// before the token's first tile. False (uniformly) for a CTA past the last token.
__device__ __forceinline__ bool nsa_sel_setup(const NsaParams &p, Rows<16> &R, NsaSelCursor &cur,
                                              bool with_bwd) {
  const int hc = (p.G + 15) / 16;
  const int tok = blockIdx.x / hc, hin0 = (blockIdx.x % hc) * 16;
  const int g = blockIdx.y, b = blockIdx.z;
  if (tok >= p.T) return false;
  int s, start, end;
  nsa_seq_of(p, tok, s, start, end);
  if (threadIdx.x < 16) {
    const int r = threadIdx.x, hin = hin0 + r, h = g * p.G + hin;
    const bool ok = hin < p.G;
    R.b[r] = b;
    R.t[r] = ok ? tok : -1;
    R.h[r] = h;
    R.slot[r] = 0;
    R.lo[r] = start;
    R.hi[r] = tok + 1;
    R.qo[r] = ok ? b * p.sq[0] + (i64)tok * p.sq[1] + h * p.sq[2] : -1;
    R.oo[r] = ok && with_bwd ? b * p.sdo[0] + (i64)tok * p.sdo[1] + h * p.sdo[2] : -1;
    if (with_bwd) {
      R.lse2[r] = ok ? p.lse[b * p.slse[0] + tok * p.slse[1] + h * p.slse[2]] * LOG2E : 0.f;
      R.dl[r] = ok ? p.delta[((i64)b * p.T + tok) * p.Hq + h] : 0.f;
    }
  }
  cur.b = b;
  cur.g = g;
  cur.tok = tok;
  cur.start = start;
  cur.last = (tok - start) / p.block;
  cur.cnt = nsa_count(p, b, tok, g);
  cur.slot = -1;
  cur.k0 = cur.bhi = 0;
  __syncthreads();
  return true;
}

// Calls tile(Ks, Vs, k0, nk) for every key tile of the token (all 128 threads), the next tile's
// K/V copy in flight meanwhile when STAGES = 2. Ends with every copy landed and the K/V buffers
// free (after a barrier) for the warps' merge.
template <int ELEM, int DK, int DV, typename TileFn>
__device__ __forceinline__ void nsa_sel_tiles(const NsaParams &p, NsaSelCursor cur,
                                              typename Elem<ELEM>::T *kv, TileFn &&tile) {
  typedef NsaSel<ELEM, DK, DV> S;
  auto load = [&](int st, const NsaSelCursor &c) {
    typename Elem<ELEM>::T *Ks = kv + st * S::STAGE;
    nsa_load_kv<ELEM, DK, DV, 128>(p, Ks, Ks + NSA_BN * S::LDK, c.b, c.g, c.k0,
                                   min(NSA_BN, c.bhi - c.k0));
  };
  bool have = cur.next(p);
  if (S::STAGES == 2 && have) load(0, cur);
  cp_async_commit();
  int st = 0;
  while (have) {
    NsaSelCursor nxt = cur;
    const bool more = nxt.next(p);
    __syncthreads(); // the buffer loaded below was last read by the previous tile
    if (S::STAGES == 1) load(0, cur);
    else if (more) load(st ^ 1, nxt);
    cp_async_commit(); // (possibly empty) group: the wait below leaves only the prefetch pending
    if (S::STAGES == 2) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const typename Elem<ELEM>::T *Ks = kv + st * S::STAGE;
    tile(Ks, Ks + NSA_BN * S::LDK, cur.k0, min(NSA_BN, cur.bhi - cur.k0));
    cur = nxt;
    have = more;
    if (S::STAGES == 2) st ^= 1;
  }
  cp_async_wait<0>(); // also the Q (and dO) copies of a token without tiles
  __syncthreads();
}

// Element c of accumulator tile j (16 x 8) of a warp's fragments in shared memory, interleaved
// by lane (conflict-free); the same (j, c) of every warp holds the same row and column.
__device__ __forceinline__ float &nsa_frag(float *buf, int j, int c) {
  return buf[(j * 4 + c) * 32 + (threadIdx.x & 31)];
}

template <int ELEM, int DK, int DV>
__device__ __forceinline__ void nsa_fwd_selq_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef NsaSel<ELEM, DK, DV> S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *kv = Qs + 16 * S::LDK;
  __shared__ Rows<16> R;
  __shared__ float s_m[4][16], s_l[4][16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int col0 = 16 * warp;
  NsaSelCursor cur;
  if (!nsa_sel_setup(p, R, cur, false)) return;
  nsa_load_rows<ELEM, 16, DK, 128>(Qs, S::LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
  cp_async_commit();
  const float sl2 = p.scale * LOG2E;
  float O[DV / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) O[j][0] = O[j][1] = O[j][2] = O[j][3] = 0.f;
  nsa_sel_tiles<ELEM, DK, DV>(p, cur, kv, [&](const T *Ks, const T *Vs, int k0, int nk) {
    if (col0 < nk) // a warp whose columns are all past the tile has nothing to add
      nsa_fwd_tile<ELEM, DK, DV, 16>(Qs, Ks, Vs, 0, col0, k0, nk, R.lo, R.hi, sl2, O, m, l);
  });
  // Exact merge of the warps' (m, l, O) (log-sum-exp), warp 0 summing in warp order.
  float *part = reinterpret_cast<float *>(kv);
  constexpr int PART = DV / 8 * 4 * 32; // floats of one warp's O
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    float lt = l[rr];
    lt = quad_sum(lt);
    if (tq == 0) {
      s_m[warp][gq + 8 * rr] = m[rr];
      s_l[warp][gq + 8 * rr] = lt;
    }
  }
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < DV / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) nsa_frag(part + (warp - 1) * PART, j, c) = O[j][c];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = gq + 8 * rr;
    float mx = NEG_INF;
#pragma unroll
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, s_m[w][r]);
    const float muse = mx == NEG_INF ? 0.f : mx;
    float f[4], lt = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      f[w] = fast_exp2(s_m[w][r] - muse); // 0 for a warp that saw no key of the row
      lt += f[w] * s_l[w][r];
    }
#pragma unroll
    for (int j = 0; j < DV / 8; ++j)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        const int c = 2 * rr + cc;
        float o = O[j][c] * f[0];
#pragma unroll
        for (int w = 1; w < 4; ++w) o += f[w] * nsa_frag(part + (w - 1) * PART, j, c);
        O[j][c] = o;
      }
    m[rr] = mx;
    l[rr] = tq == 0 ? lt : 0.f; // nsa_fwd_store sums l over the quad
  }
  nsa_fwd_store<ELEM, DV, 16>(p, R, 0, O, m, l, false);
}

// dQ for the same CTAs: each warp's dQ partial over its key columns, summed in warp order.
template <int ELEM, int DK, int DV>
__device__ __forceinline__ void nsa_dq_selq_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef NsaSel<ELEM, DK, DV> S;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dOs = Qs + 16 * S::LDK;
  T *kv = dOs + 16 * S::LDV;
  __shared__ Rows<16> R;
  const int warp = threadIdx.x >> 5, col0 = 16 * warp;
  NsaSelCursor cur;
  if (!nsa_sel_setup(p, R, cur, true)) return;
  nsa_load_rows<ELEM, 16, DK, 128>(Qs, S::LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
  nsa_load_rows<ELEM, 16, DV, 128>(dOs, S::LDV, (const T *)p.dout, R.oo, p.DV, p.vec_do);
  cp_async_commit();
  const float sl2 = p.scale * LOG2E;
  float dQ[DK / 8][4];
#pragma unroll
  for (int j = 0; j < DK / 8; ++j) dQ[j][0] = dQ[j][1] = dQ[j][2] = dQ[j][3] = 0.f;
  nsa_sel_tiles<ELEM, DK, DV>(p, cur, kv, [&](const T *Ks, const T *Vs, int k0, int nk) {
    if (col0 < nk)
      nsa_dq_tile<ELEM, DK, DV, 16>(Qs, dOs, Ks, Vs, 0, col0, k0, nk, R.lo, R.hi, R.lse2, R.dl,
                                    sl2, dQ);
  });
  float *part = reinterpret_cast<float *>(kv);
  constexpr int PART = DK / 8 * 4 * 32;
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < DK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) nsa_frag(part + (warp - 1) * PART, j, c) = dQ[j][c];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int w = 1; w < 4; ++w)
#pragma unroll
    for (int j = 0; j < DK / 8; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) dQ[j][c] += nsa_frag(part + (w - 1) * PART, j, c);
  nsa_dq_store<ELEM, DK, 16>(p, R, 0, dQ);
}

// dK/dV. KIND 0, 1: grid (key tiles, Hkv, B), rows = the flattened rows that can see the tile.
// KIND 3 (selected): grid (chunks, key tiles per block), rows = the chunk of the block's list.
template <int ELEM, int DK, int DV, int KIND>
__device__ __forceinline__ void nsa_dkdv_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int M = 64, THREADS = 128, PAD = Elem<ELEM>::PAD;
  constexpr int LDK = DK + PAD, LDV = DV + PAD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dOs = Qs + M * LDK;
  T *Ks = dOs + M * LDV;
  T *Vs = Ks + NSA_BN * LDK;
  __shared__ Rows<M> R;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, key0 = 16 * warp;
  const float sl2 = p.scale * LOG2E;
  int b, g, k0, nk;
  i64 R0 = 0, R1 = 0; // flattened rows (range kinds) or list rows (selected)
  int eb = 0, L = 0, c = 0, nch = 1;
  if (KIND <= 1) {
    b = blockIdx.z;
    g = blockIdx.y;
    k0 = blockIdx.x * NSA_BN;
    nk = min(NSA_BN, p.S - k0);
    if (nk <= 0) return;
    i64 tlo, thi;
    if (KIND == 0) {
      tlo = k0;
      thi = min((i64)p.T - 1, (i64)k0 + nk - 1 + p.window - 1);
    } else {
      if (p.cu_kind < 0) {
        tlo = (i64)k0 * p.cmp_stride + p.cmp_size - 1;
      } else {
        const int lo = nsa_cmp_seq(p, k0);
        tlo = nsa_cu(p, lo) + (i64)(k0 - p.cmp_off[lo]) * p.cmp_stride + p.cmp_size - 1;
      }
      thi = p.T - 1;
    }
    R0 = tlo * p.G;
    R1 = thi >= tlo ? (thi + 1) * p.G : R0;
  } else {
    const int chunk = blockIdx.x;
    if (chunk >= p.chunk_off[p.NL]) return;
    int lo = 0, hi = p.NL - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (p.chunk_off[mid] <= chunk) lo = mid;
      else hi = mid - 1;
    }
    L = lo;
    c = chunk - p.chunk_off[L];
    nch = p.chunk_off[L + 1] - p.chunk_off[L];
    const int e_begin = p.list_off[L], e_end = p.list_off[L + 1];
    eb = e_begin + c * p.chunk_tokens;
    const int ee = min(e_end, eb + p.chunk_tokens);
    if (eb >= ee) return;
    int t0, slot0;
    nsa_entry(p, p.entries[e_begin], b, t0, g, slot0);
    int s, start, end;
    nsa_seq_of(p, t0, s, start, end);
    const i64 j = nsa_idx(p, b, t0, g, slot0);
    if (j < 0) return;
    const int blo = start + (int)j * p.block;
    const int bhi = min(blo + p.block, end);
    k0 = blo + blockIdx.y * NSA_BN;
    nk = min(NSA_BN, bhi - k0);
    if (nk <= 0) return;
    R0 = 0;
    R1 = (i64)(ee - eb) * p.G;
  }
  nsa_load_kv<ELEM, DK, DV, THREADS>(p, Ks, Vs, b, g, k0, nk);
  cp_async_commit();
  T *dSs = KIND == 3 && p.part_dq ? Vs + NSA_BN * LDV : nullptr;
  float dK[DK / 8][4], dV[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DK / 8; ++j) dK[j][0] = dK[j][1] = dK[j][2] = dK[j][3] = 0.f;
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) dV[j][0] = dV[j][1] = dV[j][2] = dV[j][3] = 0.f;
  for (i64 r0 = R0; r0 < R1; r0 += M) {
    __syncthreads();
    if (threadIdx.x < M) {
      const i64 rr = r0 + threadIdx.x;
      if (KIND <= 1) {
        nsa_row_range<KIND, M>(p, R, threadIdx.x, b, g, rr < R1 ? rr : -1, true);
      } else {
        nsa_row_entry<M>(p, R, threadIdx.x, eb + (int)(rr / p.G), (int)(rr % p.G), rr < R1, true);
      }
    }
    __syncthreads();
    nsa_load_rows<ELEM, M, DK, THREADS>(Qs, LDK, (const T *)p.q, R.qo, p.D, p.vec_q);
    nsa_load_rows<ELEM, M, DV, THREADS>(dOs, LDV, (const T *)p.dout, R.oo, p.DV, p.vec_do);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    if (key0 < nk) {
      nsa_dkdv_tile<ELEM, DK, DV>(Qs, dOs, Ks, Vs, key0, k0, nk, R.t, R.lo, R.hi, R.lse2, R.dl, sl2,
                                  dK, dV, dSs);
    } else if (dSs) {
      for (int i = lane; i < 16 * NSA_BN; i += 32)
        dSs[(key0 + i / NSA_BN) * NSA_LDS + i % NSA_BN] = from_f32<ELEM>(0.f);
    }
    if (dSs) { // uniform over the CTA
      __syncthreads();
      nsa_dq_partial<ELEM, DK, M>(p, R, dSs, Ks, 16 * warp, blockIdx.y);
    }
  }
  cp_async_wait<0>();
  const int gq = lane >> 2, tq = lane & 3;
  const bool to_scratch = KIND == 3 && nch > 1;
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int kr = key0 + gq + 8 * rr;
    if (kr >= nk) continue;
    const int key = k0 + kr;
    if (to_scratch) {
      const i64 slot = (i64)p.split_off[L] + c;
      float *sb = p.scratch + ((slot * p.key_tiles + blockIdx.y) * NSA_BN + kr) * (i64)(p.D + p.DV);
#pragma unroll
      for (int j = 0; j < DK / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.D) sb[col] = dK[j][2 * rr + cc] * p.scale;
        }
#pragma unroll
      for (int j = 0; j < DV / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.DV) sb[p.D + col] = dV[j][2 * rr + cc];
        }
    } else {
      T *kb = (T *)p.dk + b * p.sdk[0] + (i64)key * p.sdk[1] + g * p.sdk[2];
      T *vb = (T *)p.dv + b * p.sdv[0] + (i64)key * p.sdv[1] + g * p.sdv[2];
#pragma unroll
      for (int j = 0; j < DK / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.D) kb[col] = from_f32<ELEM>(dK[j][2 * rr + cc] * p.scale);
        }
#pragma unroll
      for (int j = 0; j < DV / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.DV) vb[col] = from_f32<ELEM>(dV[j][2 * rr + cc]);
        }
    }
  }
}

// Sums the scratch partials of the lists split over several chunks, in chunk order.
// grid (NL, key tiles per block), 128 threads.
template <int ELEM> __device__ __forceinline__ void nsa_dkdv_reduce_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  const int L = blockIdx.x;
  const int nch = p.chunk_off[L + 1] - p.chunk_off[L];
  if (nch <= 1) return;
  const int e_begin = p.list_off[L];
  int b, t0, g, slot0;
  nsa_entry(p, p.entries[e_begin], b, t0, g, slot0);
  int s, start, end;
  nsa_seq_of(p, t0, s, start, end);
  const i64 j = nsa_idx(p, b, t0, g, slot0);
  if (j < 0) return;
  const int blo = start + (int)j * p.block;
  const int bhi = min(blo + p.block, end);
  const int k0 = blo + blockIdx.y * NSA_BN;
  const int nk = min(NSA_BN, bhi - k0);
  if (nk <= 0) return;
  const int W = p.D + p.DV;
  const i64 s0 = p.split_off[L];
  for (int i = threadIdx.x; i < nk * W; i += blockDim.x) {
    const int kr = i / W, col = i % W;
    float acc = 0.f;
    for (int cc = 0; cc < nch; ++cc)
      acc += p.scratch[(((s0 + cc) * p.key_tiles + blockIdx.y) * NSA_BN + kr) * (i64)W + col];
    const int key = k0 + kr;
    if (col < p.D)
      ((T *)p.dk)[b * p.sdk[0] + (i64)key * p.sdk[1] + g * p.sdk[2] + col] = from_f32<ELEM>(acc);
    else
      ((T *)p.dv)[b * p.sdv[0] + (i64)key * p.sdv[1] + g * p.sdv[2] + col - p.D] = from_f32<ELEM>(acc);
  }
}

// dQ of every (token, head) from the KV-outer partials, in slot and key-tile order (the same
// valid slots as nsa_combine; key tiles that nsa_dkdv_sel launched). One warp per row.
template <int ELEM> __device__ __forceinline__ void nsa_dq_reduce_impl(const NsaParams &p) {
  typedef typename Elem<ELEM>::T T;
  const int lane = threadIdx.x & 31;
  NsaWarpRow w;
  if (!nsa_warp_row(p, w)) return;
  const i64 row = w.row;
  const int b = w.b, t = w.t, h = w.h, g = w.g, start = w.start, end = w.end;
  const int last = w.last, cnt = w.cnt;
  T *qb = (T *)p.dq + b * p.sdq[0] + (i64)t * p.sdq[1] + h * p.sdq[2];
  for (int col = lane; col < p.D; col += 32) {
    float acc = 0.f;
    for (int slot = 0; slot < cnt; ++slot) {
      const i64 j = nsa_idx(p, b, t, g, slot);
      if (j < 0 || j > last) continue;
      const int blo = start + (int)j * p.block, bhi = min(blo + p.block, end);
      const float *src = p.part_dq + (row * p.n + slot) * p.key_tiles * (i64)p.D + col;
      for (int kt = 0; kt < p.key_tiles && blo + kt * NSA_BN < bhi; ++kt) acc += src[(i64)kt * p.D];
    }
    qb[col] = from_f32<ELEM>(acc);
  }
}

// ----------------------------------------------------------------------------- entry points

#if NSA_SM90
#include "attn_sm90.cuh"
#include "attn_bwd_sm90.cuh"

// The range branches on the Hopper engine (attn_sm90.cuh, attn_bwd_sm90.cuh), 16-bit, DK == DV:
// KIND 0 the sliding window, KIND 1 the compressed branch. Token t (global in its batch row)
// sees keys [lo(t), hi(t)) (nsa_range); lo and hi are nondecreasing in t, across packed
// sequences too, so a tile of consecutive tokens sees keys [lo(first), hi(last)).

// Forward: a CTA is 128 consecutive tokens of one query head of one batch row.
template <int KIND> struct RangeSm90 {
  static constexpr int ELEM = NSA_ELEM, DP = NSA_DK, BN = 128;
  typedef NsaParams Params;
  struct Shared {
    int unused;
  };
  struct Cta {
    int b, h, hk, t0, rows, klo, khi;
  };
  struct Rows {
    int lo[2], hi[2]; // an empty range for a missing row
    float m[2], l[2];
    bool valid[2];
  };

  // (token tile, head, batch row), heads fastest (the heads of a kv group share K/V in L2)
  static __device__ __forceinline__ int work_tiles(const NsaParams &p) {
    return (p.T + SM90_BM - 1) / SM90_BM * p.Hq * p.B;
  }
  static __device__ __forceinline__ bool cta(const NsaParams &p, int tile, Cta &c) {
    const int nt = (p.T + SM90_BM - 1) / SM90_BM;
    c.h = tile % p.Hq;
    c.t0 = (tile / p.Hq) % nt * SM90_BM;
    c.b = tile / (p.Hq * nt);
    c.hk = c.h / p.G;
    c.rows = min(SM90_BM, p.T - c.t0);
    int hi, lo;
    nsa_range<KIND>(p, c.t0, c.klo, hi);
    nsa_range<KIND>(p, c.t0 + c.rows - 1, lo, c.khi);
    return true;
  }
  static __device__ __forceinline__ void q_coord(const Cta &c, int &row, int &head, int &batch) {
    row = c.t0;
    head = c.h;
    batch = c.b;
  }
  static __device__ __forceinline__ void kv_coord(const Cta &c, int k0, int &row, int &head, int &batch) {
    row = k0;
    head = c.hk;
    batch = c.b;
  }
  static __device__ __forceinline__ int first_tile(const NsaParams &, const Cta &c, Shared &) {
    return c.klo < c.khi ? c.klo : -1;
  }
  static __device__ __forceinline__ int next_tile(const NsaParams &, const Cta &c, int k0, Shared &) {
    return k0 + BN < c.khi ? k0 + BN : -1;
  }

  static __device__ __forceinline__ void init_rows(const NsaParams &p, const Cta &c, int warp, Rows &r) {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = 16 * warp + ((threadIdx.x & 31) >> 2) + 8 * rr;
      r.valid[rr] = row < c.rows;
      r.lo[rr] = 0;
      r.hi[rr] = 0;
      if (r.valid[rr]) nsa_range<KIND>(p, c.t0 + row, r.lo[rr], r.hi[rr]);
      r.m[rr] = NEG_INF;
      r.l[rr] = 0.f;
    }
  }
  static __device__ __forceinline__ void probs(const NsaParams &p, const Cta &, Rows &r, float (*S)[4],
                                               int k0, float *alpha, float *ps) {
    constexpr int NF = BN / 8;
    const int t4 = threadIdx.x & 3;
    const float sl2 = p.scale * LOG2E;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      // visible columns: lo − k0 <= col < hi − k0
      const int a = r.lo[rr] - k0 - 2 * t4, z = r.hi[rr] - 1 - k0 - 2 * t4;
      float bound = NEG_INF;
      if (__all_sync(FULL_MASK, a <= -2 * t4 && z >= BN - 1 - 2 * t4)) { // inside the range
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float &x = S[f][2 * rr + e];
            x *= sl2;
            bound = fmaxf(bound, x);
          }
      } else {
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * f + e; // minus 2·t4, folded into a and z
            float &x = S[f][2 * rr + e];
            x = (col >= a && col <= z) ? x * sl2 : NEG_INF;
            bound = fmaxf(bound, x);
          }
      }
      bound = quad_max(bound);
      const float m_new = fmaxf(r.m[rr], bound);
      const float mu = m_new == NEG_INF ? 0.f : m_new;
      alpha[rr] = fast_exp2(r.m[rr] - mu); // 0 when m was −∞
      r.m[rr] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float &x = S[f][2 * rr + e];
          x = fast_exp2(x - mu);
          sum += x;
        }
      ps[rr] = sum;
    }
  }
  static __device__ __forceinline__ void store(const NsaParams &p, const Cta &c, const Rows &r, int warp,
                                               float (*O)[4]) {
    typedef typename Elem<ELEM>::T T;
    const int t4 = threadIdx.x & 3;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float lt = r.l[rr];
      lt = quad_sum(lt);
      if (!r.valid[rr]) continue;
      const int t = c.t0 + 16 * warp + ((threadIdx.x & 31) >> 2) + 8 * rr;
      const bool any = lt > 0.f;
      const float inv = any ? 1.f / lt : 0.f;
      T *ob = (T *)p.out + c.b * p.so[0] + (i64)t * p.so[1] + c.h * p.so[2];
      T *olo = nsa_out_lo<ELEM>(p, c.b, t, c.h);
#pragma unroll
      for (int j = 0; j < DP / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * t4 + cc;
          if (col < p.DV) nsa_store_out<ELEM>(ob, olo, col, O[j][2 * rr + cc] * inv);
        }
      if (t4 == 0)
        p.lse[c.b * p.slse[0] + t * p.slse[1] + c.h * p.slse[2]] =
            any ? r.m[rr] * LN2 + logf(lt) : NEG_INF;
    }
  }
};

struct RangeSm90Args {
  Sm90Maps maps;
  NsaParams p;
};
CHECK_MIRROR(RangeSm90Args);

// ---------------------------------------------------------------- backward
// The row table, one warp per (batch, head, token < Tp) row, planes: lse·log2(e) (+∞ for a row
// that sees no key, so its P is 0), Δ, and the row's key range lo, hi (int bits; an empty range
// past T, so that padded query columns are masked).
template <int KIND> __device__ __forceinline__ void nsa_rowinfo_impl(const NsaParams &p) {
  const i64 row = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= (i64)p.B * p.Hq * p.Tp) return;
  const int t = (int)(row % p.Tp), h = (int)((row / p.Tp) % p.Hq), b = (int)(row / ((i64)p.Tp * p.Hq));
  float lse2 = 0.f, d = 0.f;
  int lo = 0x7fffffff, hi = 0;
  if (t < p.T) {
    d = nsa_row_delta<NSA_ELEM>(p, b, t, h);
    const float l = p.lse[b * p.slse[0] + (i64)t * p.slse[1] + h * p.slse[2]];
    lse2 = l == NEG_INF ? -NEG_INF : l * LOG2E;
    nsa_range<KIND>(p, t, lo, hi);
  }
  if ((threadIdx.x & 31) == 0) {
    float *base = p.rowinfo + (row / p.Tp) * SM90_ROWINFO_PLANES * p.Tp + t;
    base[0] = lse2;
    base[p.Tp] = d;
    base[2 * p.Tp] = __int_as_float(lo);
    base[3 * p.Tp] = __int_as_float(hi);
  }
}

// dQ, query-outer: the forward's work tiles, key tiles of 64 from the tile's first visible key.
// P = exp2(s·scale·log2 e − lse₂) on the row's range, dS = P (dP − Δ).
template <int KIND> struct RangeDqSm90 : RangeSm90<KIND> {
  typedef RangeSm90<KIND> F;
  typedef typename F::Cta Cta;
  using F::DP;
  using F::ELEM;
  struct Rows {
    int t[2], lo[2], hi[2]; // t = −1: no such row
    float lse2[2], delta[2];
  };
  static __device__ __forceinline__ void fixed_coord(const Cta &c, int &row, int &head, int &batch) {
    F::q_coord(c, row, head, batch);
  }
  static __device__ __forceinline__ int first_step(const NsaParams &, const Cta &c, int &) {
    return c.klo < c.khi ? c.klo : -1;
  }
  static __device__ __forceinline__ int next_step(const NsaParams &, const Cta &c, int k0, int &) {
    return k0 + SM90_BWD_STREAM < c.khi ? k0 + SM90_BWD_STREAM : -1;
  }
  static __device__ __forceinline__ void stream_coord(const Cta &c, int k0, int, int &row, int &head, int &batch) {
    F::kv_coord(c, k0, row, head, batch);
  }
  static __device__ __forceinline__ void init_rows(const NsaParams &p, const Cta &c, int wg, int warp, Rows &r) {
    const float *info = p.rowinfo + ((i64)c.b * p.Hq + c.h) * SM90_ROWINFO_PLANES * p.Tp;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int row = 64 * wg + 16 * warp + ((threadIdx.x & 31) >> 2) + 8 * rr;
      const int t = c.t0 + row;
      const bool valid = row < c.rows;
      r.t[rr] = valid ? t : -1;
      r.lse2[rr] = valid ? info[t] : 0.f;
      r.delta[rr] = valid ? info[p.Tp + t] : 0.f;
      r.lo[rr] = valid ? __float_as_int(info[2 * p.Tp + t]) : 0;
      r.hi[rr] = valid ? __float_as_int(info[3 * p.Tp + t]) : 0;
    }
  }
  static __device__ __forceinline__ void dq_probs(const NsaParams &p, const Rows &r, float (*S)[4],
                                                  float (*dP)[4], int k0) {
    constexpr int NF = SM90_BWD_STREAM / 8;
    const int t4 = threadIdx.x & 3;
    const float sl2 = p.scale * LOG2E;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      // visible columns: lo − k0 <= col < hi − k0
      const int a = r.lo[rr] - k0 - 2 * t4, z = r.hi[rr] - 1 - k0 - 2 * t4;
      const bool inside = __all_sync(FULL_MASK, a <= -2 * t4 && z >= SM90_BWD_STREAM - 1 - 2 * t4);
#pragma unroll
      for (int f = 0; f < NF; ++f)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * f + e; // minus 2·t4, folded into a and z
          const float pr = fast_exp2(S[f][2 * rr + e] * sl2 - r.lse2[rr]);
          const float pv = inside || (col >= a && col <= z) ? pr : 0.f;
          dP[f][2 * rr + e] = pv * (dP[f][2 * rr + e] - r.delta[rr]);
        }
    }
  }
  static __device__ __forceinline__ void store_dq(const NsaParams &p, const Cta &c, const Rows &r, int, int,
                                                  float (*dQ)[4]) {
    typedef typename Elem<ELEM>::T T;
    const int t4 = threadIdx.x & 3;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      if (r.t[rr] < 0) continue;
      T *qb = (T *)p.dq + c.b * p.sdq[0] + (i64)r.t[rr] * p.sdq[1] + c.h * p.sdq[2];
#pragma unroll
      for (int j = 0; j < DP / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * t4 + cc;
          if (col < p.D) qb[col] = from_f32<ELEM>(dQ[j][2 * rr + cc] * p.scale);
        }
    }
  }
};

// The tokens whose ranges can reach key k: from the first (T if none) to the end of k's
// sequence (window: the W tokens from k). A compressed row k of sequence s is first seen by the
// token that completes its window.
template <int KIND> __device__ __forceinline__ int nsa_first_query(const NsaParams &p, int k) {
  if (KIND == 0) return k;
  if (p.cu_kind < 0) return (int)min((i64)p.T, (i64)k * p.cmp_stride + p.cmp_size - 1);
  const int s = nsa_cmp_seq(p, k);
  return (int)min((i64)p.T, nsa_cu(p, s) + (i64)(k - p.cmp_off[s]) * p.cmp_stride + p.cmp_size - 1);
}
template <int KIND> __device__ __forceinline__ int nsa_query_end(const NsaParams &p, int k) {
  if (KIND == 0) return (int)min((i64)p.T, (i64)k + p.window);
  return p.cu_kind < 0 ? p.T : (int)nsa_cu(p, nsa_cmp_seq(p, k) + 1);
}

// dK, dV, key-outer: a work tile is 128 keys of one kv head of one batch row; it streams the
// 64-token query tiles from the first that sees its first key (rounded down to 64: the row
// table's boxes stay inside it) to the last that can see its last key, for every query head of
// the group in head order (a fixed summation order: deterministic).
template <int KIND> struct RangeDkdvSm90 {
  static constexpr int ELEM = NSA_ELEM, DP = NSA_DK;
  typedef NsaParams Params;
  struct Cta {
    int b, hk, k0, nk, q0, qhi, G, Hq;
  };
  static __device__ __forceinline__ int key_tiles(const NsaParams &p) {
    return (p.S + SM90_BWD_FIXED - 1) / SM90_BWD_FIXED;
  }
  static __device__ __forceinline__ int work_tiles(const NsaParams &p) { return key_tiles(p) * p.Hkv * p.B; }
  static __device__ __forceinline__ void cta(const NsaParams &p, int tile, Cta &c) {
    const int nkt = key_tiles(p);
    c.k0 = tile % nkt * SM90_BWD_FIXED;
    c.hk = tile / nkt % p.Hkv;
    c.b = tile / (nkt * p.Hkv);
    c.nk = min(SM90_BWD_FIXED, p.S - c.k0);
    c.q0 = nsa_first_query<KIND>(p, c.k0) & ~(SM90_BWD_STREAM - 1);
    c.qhi = nsa_query_end<KIND>(p, c.k0 + c.nk - 1);
    c.G = p.G;
    c.Hq = p.Hq;
  }
  static __device__ __forceinline__ void fixed_coord(const Cta &c, int &row, int &head, int &batch) {
    row = c.k0;
    head = c.hk;
    batch = c.b;
  }
  static __device__ __forceinline__ int first_step(const NsaParams &, const Cta &c, int &hd) {
    hd = 0;
    return c.q0 < c.qhi ? c.q0 : -1;
  }
  static __device__ __forceinline__ int next_step(const NsaParams &, const Cta &c, int q0, int &hd) {
    q0 += SM90_BWD_STREAM;
    if (q0 < c.qhi) return q0;
    return ++hd < c.G ? c.q0 : -1;
  }
  static __device__ __forceinline__ void stream_coord(const Cta &c, int q0, int hd, int &row, int &head, int &batch) {
    row = q0;
    head = c.hk * c.G + hd;
    batch = c.b;
  }
  static __device__ __forceinline__ int rowinfo_plane(const Cta &c, int hd) { return c.b * c.Hq + c.hk * c.G + hd; }

  // Sᵀ (keys × queries) → Pᵀ and dPᵀ → dSᵀ = Pᵀ ∘ (dPᵀ − Δ), in place; info: the streamed
  // tile's row table box.
  static __device__ __forceinline__ void dkdv_probs(const NsaParams &p, const Cta &c, int wg, int warp,
                                                    float (*S)[4], float (*dP)[4], int, const float *info) {
    constexpr int NF = SM90_BWD_STREAM / 8, BQ = SM90_BWD_STREAM;
    const int lane = threadIdx.x & 31, t4 = lane & 3;
    const float sl2 = p.scale * LOG2E;
    const int kw = c.k0 + 64 * wg + 16 * warp; // the warp's first key
    const int *lo = (const int *)(info + 2 * BQ), *hi = (const int *)(info + 3 * BQ);
    // every key of the warp is in every query's range (lo, hi nondecreasing; padding: empty)
    const bool inside = lo[BQ - 1] <= kw && kw + 15 < min(hi[0], hi[BQ - 1]);
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int col = 8 * f + 2 * t4;
      const float2 l2 = *(const float2 *)(info + col);
      const float2 d2 = *(const float2 *)(info + BQ + col);
      const int2 lo2 = *(const int2 *)(lo + col), hi2 = *(const int2 *)(hi + col);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int k = kw + (lane >> 2) + 8 * rr;
        float x0 = fast_exp2(S[f][2 * rr] * sl2 - l2.x), x1 = fast_exp2(S[f][2 * rr + 1] * sl2 - l2.y);
        if (!inside) {
          if (!(lo2.x <= k && k < hi2.x)) x0 = 0.f;
          if (!(lo2.y <= k && k < hi2.y)) x1 = 0.f;
        }
        S[f][2 * rr] = x0;
        S[f][2 * rr + 1] = x1;
        dP[f][2 * rr] = x0 * (dP[f][2 * rr] - d2.x);
        dP[f][2 * rr + 1] = x1 * (dP[f][2 * rr + 1] - d2.y);
      }
    }
  }
  static __device__ __forceinline__ void store_dkdv(const NsaParams &p, const Cta &c, int wg, int warp,
                                                    float (*dK)[4], float (*dV)[4]) {
    typedef typename Elem<ELEM>::T T;
    const int lane = threadIdx.x & 31, t4 = lane & 3;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int kr = 64 * wg + 16 * warp + (lane >> 2) + 8 * rr;
      if (kr >= c.nk) continue;
      const int key = c.k0 + kr;
      T *kb = (T *)p.dk + c.b * p.sdk[0] + (i64)key * p.sdk[1] + c.hk * p.sdk[2];
      T *vb = (T *)p.dv + c.b * p.sdv[0] + (i64)key * p.sdv[1] + c.hk * p.sdv[2];
#pragma unroll
      for (int j = 0; j < DP / 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * t4 + cc;
          if (col < p.D) kb[col] = from_f32<ELEM>(dK[j][2 * rr + cc] * p.scale);
          if (col < p.DV) vb[col] = from_f32<ELEM>(dV[j][2 * rr + cc]);
        }
    }
  }
};

struct RangeBwdSm90Args {
  Sm90BwdMaps maps;
  NsaParams p;
};
CHECK_MIRROR(RangeBwdSm90Args);

#define NSA_SM90_KERNELS(NAME, KIND)                                                                  \
  extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1)                                     \
      nsa_fwd_##NAME##_sm90(const __grid_constant__ RangeSm90Args a) {                                \
    sm90_attn_fwd<RangeSm90<KIND>>(a.p, a.maps);                                                      \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(128) nsa_rowinfo_##NAME##_sm90(const NsaParams p) {    \
    nsa_rowinfo_impl<KIND>(p);                                                                        \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1)                                     \
      nsa_dq_##NAME##_sm90(const __grid_constant__ RangeBwdSm90Args a) {                              \
    sm90_attn_dq<RangeDqSm90<KIND>>(a.p, a.maps);                                                     \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(SM90_THREADS, 1)                                     \
      nsa_dkdv_##NAME##_sm90(const __grid_constant__ RangeBwdSm90Args a) {                            \
    sm90_attn_dkdv<RangeDkdvSm90<KIND>>(a.p, a.maps);                                                 \
  }
NSA_SM90_KERNELS(win, 0)
NSA_SM90_KERNELS(cmp, 1)
#else
#define NSA_E NSA_ELEM, NSA_DK, NSA_DV
extern "C" __global__ void __launch_bounds__(128) nsa_fwd_win(const NsaParams p) { nsa_fwd_impl<NSA_E, 0>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_fwd_cmp(const NsaParams p) { nsa_fwd_impl<NSA_E, 1>(p); }
// Three 16-bit CTAs of nsa_fwd_selq fit an SM's shared memory: registers capped to match (ptxas
// otherwise picked 128 and spilled); float32's 3xTF32 fragments need two CTAs' worth.
#define NSA_SELQ_FWD_CTAS (NSA_ELEM == ELEM_F32 ? 2 : 3)
extern "C" __global__ void __launch_bounds__(128, NSA_SELQ_FWD_CTAS) nsa_fwd_selq(const NsaParams p) { nsa_fwd_selq_impl<NSA_E>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_fwd_selkv1(const NsaParams p) { nsa_fwd_kv_impl<NSA_E, 1>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_fwd_selkv2(const NsaParams p) { nsa_fwd_kv_impl<NSA_E, 2>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_combine(const NsaParams p) { nsa_combine_impl<NSA_ELEM>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_delta(const NsaParams p) { nsa_delta_impl<NSA_ELEM>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dq_win(const NsaParams p) { nsa_dq_impl<NSA_E, 0>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dq_cmp(const NsaParams p) { nsa_dq_impl<NSA_E, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 2) nsa_dq_selq(const NsaParams p) { nsa_dq_selq_impl<NSA_E>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dkdv_win(const NsaParams p) { nsa_dkdv_impl<NSA_E, 0>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dkdv_cmp(const NsaParams p) { nsa_dkdv_impl<NSA_E, 1>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dkdv_sel(const NsaParams p) { nsa_dkdv_impl<NSA_E, 3>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dkdv_reduce(const NsaParams p) { nsa_dkdv_reduce_impl<NSA_ELEM>(p); }
extern "C" __global__ void __launch_bounds__(128) nsa_dq_reduce(const NsaParams p) { nsa_dq_reduce_impl<NSA_ELEM>(p); }
#endif
