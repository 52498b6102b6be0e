// Native Sparse Attention, selection stage: compression (nsa_compress, forward and backward) and
// the fused block selection (nsa_topk_blocks). docs/api/nsa.md, "Math".
//
// Notation: l = kernel_size (L), d = kernel_stride (S), B_K = block_size, a = l/d, bb = B_K/d.
// Window i of a sequence covers its tokens [i·d, i·d + l). With cu_seqlens the compressed rows
// are packed per sequence; `cu_cmp` (the compressed offsets, computed on the device by the
// Python wrapper) maps a compressed row to its sequence. No kernel reads anything on the host.
//
// Compression kernels (K = l·D, the flattened window length; all float32 accumulation):
//   cmp_mean_fwd   out[row] = mean of the l tokens of the window (thread per (row, channel)).
//   cmp_linear_fwd out[row] = xwin[row] · W + pe_flat · W (the pe term is the same for every
//                  window, accumulated from the shared W tiles). GEMM on tensor cores: CTA =
//                  64 rows x 64 output columns, K loop in steps of 32, 4 warps of 16 rows.
//   cmp_linear_dg  G[row] = dout[row] · Wᵀ into a float32 scratch [B, R, H, K] (GEMM, same tiles).
//   cmp_dx         dx[t] = Σ over the windows i that contain t of dout[i]/l (mean) or
//                  G[i][(t − i·d)·D + c] (linear): a gather per token, deterministic, no atomics.
//   cmp_linear_dw  dW[κ][n] = Σ_rows xwin[row][κ]·dout[row][n] + pe_flat[κ]·Σ_rows dout[row][n]:
//                  one CTA per (64 κ, 64 n, head) loops over every row of every batch in a fixed
//                  order (deterministic, no split and no atomics).
//   cmp_linear_dpe dpe[κ] = Σ_rows G[row][κ] (thread per κ, fixed order).
//
// Selection kernel nsa_topk: one CTA per (token tile, kv head, batch row). Its BM = 16·NW rows
// are (token, head) pairs, row = token·G + head, BT = BM / G tokens. Q stays in shared memory;
// the compressed keys stream through shared memory in tiles of 64 windows (cp.async, double
// buffered when it fits). Blocks are scored in chunks of NB = ⌊(64 − (a − 1)) / bb⌋ blocks:
// chunk j0 needs windows [bb·j0 − (a − 1), bb·(j0 + NB)) (≤ 64), so every chunk is one key tile.
// Per chunk: S = Q·K̃ᵀ on tensor cores (registers), p = exp2(S·scale·log2e − lse·log2e) for the
// visible windows (0 otherwise), summed over the G heads of a token (warp shuffles when G divides
// 16, else through shared memory) into P[token][window] (shared); block scores
// score[j] = Σ_{x<a} Σ_{y<bb} P[bb·j + y − x] with forced blocks = +inf; then one thread per token
// inserts the chunk's blocks in ascending order into its sorted top-n list (shared memory),
// exactly the CPU kernel's insertion rule (ties keep the lower block index). No [T, C] matrix is
// ever stored. With cu_seqlens a tile that straddles sequences runs one pass per sequence.
//
// Compile-time specialisation (-D): NS_ELEM (0 f32/3xTF32, 1 f16, 2 bf16), NS_DP (padded head
// dim of the selection kernel, a multiple of 32), NS_NW (warps of the selection kernel, 4 or 8).
#include "common.cuh"

#define CMP_THREADS 128
#define NS_BN 64

// ------------------------------------------------------------------------------ shared helpers

__device__ __forceinline__ i64 num_windows(i64 len, int L, int S) {
  return len >= L ? (len - L) / S + 1 : 0;
}

// ------------------------------------------------------------------------------ compression

struct CmpParams {
  const void *x, *w, *pe, *dout;
  void *out, *dx, *dw, *dpe;
  float *gbuf; // [B, R, H, K] float32 scratch (linear backward)
  const void *cu, *cu_cmp;
  i64 sx[3], so[3], sdx[3]; // x, out/dout, dx strides: batch, token/row, head
  i64 sw[2], sdw[2];        // weight / dweight strides: head, κ (unit last stride)
  i64 sp[2], sdp[2];        // pe / dpe strides: head, r
  int B, T, H, D, Dout, L, S, R, n_seq, cu_kind, has_pe;
};
CHECK_MIRROR(CmpParams);

// First (packed) token of compressed row r of batch row b, or -1 if the row has no full window.
__device__ __forceinline__ i64 row_base(const CmpParams &p, int r) {
  if (r < 0 || r >= p.R) return -1;
  if (p.cu_kind < 0) {
    const i64 base = (i64)r * p.S;
    return base + p.L <= p.T ? base : -1;
  }
  const int s = sequence_containing(p.cu_cmp, p.cu_kind, p.n_seq, r);
  const i64 c0 = read_index(p.cu_cmp, p.cu_kind, s), c1 = read_index(p.cu_cmp, p.cu_kind, s + 1);
  if (r < c0 || r >= c1) return -1;
  const i64 st = clamped_offset(p.cu, p.cu_kind, s, p.T), en = clamped_offset(p.cu, p.cu_kind, s + 1, p.T);
  const i64 i = r - c0;
  if (i * p.S + p.L > en - st) return -1;
  return st + i * p.S;
}

template <int ELEM> __device__ void cmp_mean_fwd_impl(const CmpParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int ROWS = 8;
  __shared__ i64 rb[ROWS];
  const int h = blockIdx.y, b = blockIdx.z, r0 = blockIdx.x * ROWS;
  if (threadIdx.x < ROWS) rb[threadIdx.x] = row_base(p, r0 + threadIdx.x);
  __syncthreads();
  const T *xb = (const T *)p.x + b * p.sx[0] + h * p.sx[2];
  T *ob = (T *)p.out + b * p.so[0] + h * p.so[2];
  const float inv = 1.f / (float)p.L;
  for (int idx = threadIdx.x; idx < ROWS * p.D; idx += CMP_THREADS) {
    const int rr = idx / p.D, c = idx % p.D, row = r0 + rr;
    if (row >= p.R) continue;
    const i64 base = rb[rr];
    float acc = 0.f;
    if (base >= 0)
      for (int r = 0; r < p.L; ++r) acc += load_f32<ELEM>(xb + (base + r) * p.sx[1] + c);
    ob[row * p.so[1] + c] = from_f32<ELEM>(acc * inv);
  }
}

// out = xwin · W (+ pe_flat · W). grid (ceil(R/64), ceil(Dout/64), B·H).
template <int ELEM> __device__ void cmp_linear_fwd_impl(const CmpParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int BM = 64, BN = 64, BK = 32, KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDA = BK + PAD, LDW = BN + PAD;
  __shared__ __align__(16) T As[BM * LDA];
  __shared__ __align__(16) T Ws[BK * LDW];
  __shared__ i64 rb[BM];
  __shared__ float pes[BK];
  __shared__ float bias[BN];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int r0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int b = blockIdx.z / p.H, h = blockIdx.z % p.H;
  const int K = p.L * p.D;
  if (threadIdx.x < BM) rb[threadIdx.x] = row_base(p, r0 + threadIdx.x);
  if (threadIdx.x < BN) bias[threadIdx.x] = 0.f;
  const T *xb = (const T *)p.x + b * p.sx[0] + h * p.sx[2];
  const T *wb = (const T *)p.w + h * p.sw[0];
  const T *peb = p.has_pe ? (const T *)p.pe + h * p.sp[0] : nullptr;
  float acc[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  __syncthreads();
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += CMP_THREADS) {
      const int m = idx / BK, kk = idx % BK, kap = k0 + kk;
      const i64 base = rb[m];
      T v = T(0);
      if (base >= 0 && kap < K) v = xb[(base + kap / p.D) * p.sx[1] + kap % p.D];
      As[m * LDA + kk] = v;
    }
    for (int idx = threadIdx.x; idx < BK * BN; idx += CMP_THREADS) {
      const int kk = idx / BN, n = idx % BN, kap = k0 + kk;
      Ws[kk * LDW + n] = (kap < K && n0 + n < p.Dout) ? wb[kap * p.sw[1] + n0 + n] : T(0);
    }
    if (p.has_pe && threadIdx.x < BK) {
      const int kap = k0 + threadIdx.x;
      pes[threadIdx.x] =
          kap < K ? load_f32<ELEM>(peb + (kap / p.D) * p.sp[1] + kap % p.D) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += KS) {
      u32 a[4], bf[2];
      F::A_mk(a, As, LDA, 16 * warp, ks);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        F::B_kn(bf, Ws, LDW, ks, 8 * j);
        mma<ELEM>(acc[j], a, bf);
      }
    }
    if (p.has_pe && threadIdx.x < BN) {
      float s = 0.f;
      for (int kk = 0; kk < BK; ++kk) s += pes[kk] * load_f32<ELEM>(&Ws[kk * LDW + threadIdx.x]);
      bias[threadIdx.x] += s;
    }
    __syncthreads();
  }
  T *ob = (T *)p.out + b * p.so[0] + h * p.so[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + 16 * warp + g + 8 * half;
    if (row >= p.R) continue;
    const bool ok = rb[16 * warp + g + 8 * half] >= 0;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = 8 * j + 2 * tq + e;
        if (n0 + n < p.Dout) {
          const float v = ok ? acc[j][2 * half + e] + (p.has_pe ? bias[n] : 0.f) : 0.f;
          ob[row * p.so[1] + n0 + n] = from_f32<ELEM>(v);
        }
      }
  }
}

// G[b, row, h, κ] = Σ_n dout[b, row, h, n] · W[h, κ, n]. grid (ceil(R/64), ceil(K/64), B·H).
template <int ELEM> __device__ void cmp_linear_dg_impl(const CmpParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int BM = 64, BN = 64, BK = 32, KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDA = BK + PAD;
  __shared__ __align__(16) T As[BM * LDA]; // dout [row][n]
  __shared__ __align__(16) T Ws[BN * LDA]; // W [κ][n]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int r0 = blockIdx.x * BM, c0 = blockIdx.y * BN;
  const int b = blockIdx.z / p.H, h = blockIdx.z % p.H;
  const int K = p.L * p.D;
  const T *db = (const T *)p.dout + b * p.so[0] + h * p.so[2];
  const T *wb = (const T *)p.w + h * p.sw[0];
  float acc[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int k0 = 0; k0 < p.Dout; k0 += BK) {
    for (int idx = threadIdx.x; idx < BM * BK; idx += CMP_THREADS) {
      const int m = idx / BK, kk = idx % BK;
      As[m * LDA + kk] =
          (r0 + m < p.R && k0 + kk < p.Dout) ? db[(i64)(r0 + m) * p.so[1] + k0 + kk] : T(0);
    }
    for (int idx = threadIdx.x; idx < BN * BK; idx += CMP_THREADS) {
      const int n = idx / BK, kk = idx % BK;
      Ws[n * LDA + kk] = (c0 + n < K && k0 + kk < p.Dout) ? wb[(i64)(c0 + n) * p.sw[1] + k0 + kk]
                                                          : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < BK; ks += KS) {
      u32 a[4], bf[2];
      F::A_mk(a, As, LDA, 16 * warp, ks);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        F::B_nk(bf, Ws, LDA, ks, 8 * j);
        mma<ELEM>(acc[j], a, bf);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = r0 + 16 * warp + g + 8 * half;
    if (row >= p.R) continue;
    float *gb = p.gbuf + (((i64)b * p.R + row) * p.H + h) * K;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = c0 + 8 * j + 2 * tq + e;
        if (c < K) gb[c] = acc[j][2 * half + e];
      }
  }
}

// dx gather. grid (ceil(T/8), H, B); linear reads gbuf, mean reads dout.
template <int ELEM> __device__ void cmp_dx_impl(const CmpParams &p, bool linear) {
  typedef typename Elem<ELEM>::T T;
  constexpr int TOK = 8;
  __shared__ i64 info[TOK][4]; // local position, first window, last window, first row
  const int h = blockIdx.y, b = blockIdx.z, t0 = blockIdx.x * TOK;
  if (threadIdx.x < TOK) {
    const i64 t = t0 + threadIdx.x;
    i64 tl = -1, lo = 0, hi = -1, cs = 0;
    if (t < p.T) {
      i64 st = 0, len = p.T, nw;
      if (p.cu_kind >= 0) {
        const int s = sequence_containing(p.cu, p.cu_kind, p.n_seq, t);
        st = clamped_offset(p.cu, p.cu_kind, s, p.T);
        len = clamped_offset(p.cu, p.cu_kind, s + 1, p.T) - st;
        cs = read_index(p.cu_cmp, p.cu_kind, s);
        nw = num_windows(len, p.L, p.S);
      } else {
        nw = num_windows(p.T, p.L, p.S);
      }
      if (nw > p.R - cs) nw = p.R - cs; // never read past the compressed rows
      tl = t - st;
      if (tl >= 0 && tl < len) {
        lo = tl >= p.L ? (tl - p.L) / p.S + 1 : 0;
        hi = tl / p.S;
        if (hi > nw - 1) hi = nw - 1;
      } else {
        tl = -1;
      }
    }
    info[threadIdx.x][0] = tl;
    info[threadIdx.x][1] = lo;
    info[threadIdx.x][2] = hi;
    info[threadIdx.x][3] = cs;
  }
  __syncthreads();
  const int K = p.L * p.D;
  const float inv = 1.f / (float)p.L;
  T *dxb = (T *)p.dx + b * p.sdx[0] + h * p.sdx[2];
  const T *db = (const T *)p.dout + b * p.so[0] + h * p.so[2];
  for (int idx = threadIdx.x; idx < TOK * p.D; idx += CMP_THREADS) {
    const int tt = idx / p.D, c = idx % p.D;
    const i64 t = t0 + tt;
    if (t >= p.T) continue;
    const i64 tl = info[tt][0], lo = info[tt][1], hi = info[tt][2], cs = info[tt][3];
    float acc = 0.f;
    if (tl >= 0) {
      for (i64 i = lo; i <= hi; ++i) {
        const i64 row = cs + i;
        if (linear)
          acc += p.gbuf[(((i64)b * p.R + row) * p.H + h) * K + (tl - i * p.S) * p.D + c];
        else
          acc += load_f32<ELEM>(db + row * p.so[1] + c) * inv;
      }
    }
    dxb[t * p.sdx[1] + c] = from_f32<ELEM>(acc);
  }
}

// dW (+ the pe term). grid (ceil(K/64), ceil(Dout/64), H).
template <int ELEM> __device__ void cmp_linear_dw_impl(const CmpParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int BM = 64, BN = 64, BK = 32, KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LD = BM + PAD;
  __shared__ __align__(16) T Xs[BK * LD]; // [row][κ]
  __shared__ __align__(16) T Ds[BK * LD]; // [row][n]
  __shared__ i64 rb[BK];
  __shared__ float colsum[BN];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN, h = blockIdx.z;
  const int K = p.L * p.D;
  if (threadIdx.x < BN) colsum[threadIdx.x] = 0.f;
  float acc[BN / 8][4];
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  for (int b = 0; b < p.B; ++b) {
    const T *xb = (const T *)p.x + b * p.sx[0] + h * p.sx[2];
    const T *db = (const T *)p.dout + b * p.so[0] + h * p.so[2];
    for (int r0 = 0; r0 < p.R; r0 += BK) {
      if (threadIdx.x < BK) rb[threadIdx.x] = row_base(p, r0 + threadIdx.x);
      __syncthreads();
      for (int idx = threadIdx.x; idx < BK * BM; idx += CMP_THREADS) {
        const int rr = idx / BM, m = idx % BM, kap = m0 + m;
        const i64 base = rb[rr];
        Xs[rr * LD + m] =
            (base >= 0 && kap < K) ? xb[(base + kap / p.D) * p.sx[1] + kap % p.D] : T(0);
        const int n = m; // same loop shape for the dout tile
        Ds[rr * LD + n] = (base >= 0 && n0 + n < p.Dout) ? db[(i64)(r0 + rr) * p.so[1] + n0 + n]
                                                         : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < BK; ks += KS) {
        u32 a[4], bf[2];
        F::A_km(a, Xs, LD, 16 * warp, ks);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          F::B_kn(bf, Ds, LD, ks, 8 * j);
          mma<ELEM>(acc[j], a, bf);
        }
      }
      if (p.has_pe && threadIdx.x < BN) {
        float s = 0.f;
        for (int rr = 0; rr < BK; ++rr) s += load_f32<ELEM>(&Ds[rr * LD + threadIdx.x]);
        colsum[threadIdx.x] += s;
      }
      __syncthreads();
    }
  }
  const T *peb = p.has_pe ? (const T *)p.pe + h * p.sp[0] : nullptr;
  T *dwb = (T *)p.dw + h * p.sdw[0];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int kap = m0 + 16 * warp + g + 8 * half;
    if (kap >= K) continue;
    const float pv = p.has_pe ? load_f32<ELEM>(peb + (kap / p.D) * p.sp[1] + kap % p.D) : 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int n = 8 * j + 2 * tq + e;
        if (n0 + n < p.Dout)
          dwb[(i64)kap * p.sdw[1] + n0 + n] =
              from_f32<ELEM>(acc[j][2 * half + e] + (p.has_pe ? pv * colsum[n] : 0.f));
      }
  }
}

// dpe[h, κ] = Σ over valid rows of G[b, row, h, κ]. grid (ceil(K/128), H).
template <int ELEM> __device__ void cmp_linear_dpe_impl(const CmpParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int RB = 64;
  __shared__ int valid[RB];
  const int h = blockIdx.y, kap = blockIdx.x * CMP_THREADS + threadIdx.x;
  const int K = p.L * p.D;
  float acc = 0.f;
  for (int b = 0; b < p.B; ++b) {
    for (int r0 = 0; r0 < p.R; r0 += RB) {
      __syncthreads();
      if (threadIdx.x < RB) valid[threadIdx.x] = row_base(p, r0 + threadIdx.x) >= 0;
      __syncthreads();
      if (kap < K) {
        const int m = min(RB, p.R - r0);
        for (int rr = 0; rr < m; ++rr)
          if (valid[rr]) acc += p.gbuf[(((i64)b * p.R + r0 + rr) * p.H + h) * K + kap];
      }
    }
  }
  if (kap < K) {
    T *dp = (T *)p.dpe + h * p.sdp[0];
    dp[(kap / p.D) * p.sdp[1] + kap % p.D] = from_f32<ELEM>(acc);
  }
}

// ------------------------------------------------------------------------------ selection

struct TopkParams {
  const void *q, *k, *cu;
  const float *lse;
  int *out;
  i64 sq[3], sk[3], sl[3], so[4];
  int T, C, Hq, Hkv, G, D;
  int L, S, BK, a, bb, topk, init_blocks, local_blocks;
  int n_seq, cu_kind;
  int bt;     // tokens per tile (BM / G)
  int nb;     // blocks per chunk
  int gmode;  // G when G divides 16 (shuffle reduction over heads), else 0 (shared memory)
  int stages; // key tile buffers (1 or 2)
  int vec_q, vec_k;
  float scale_log2; // scale · log2(e)
};
CHECK_MIRROR(TopkParams);

// Shared-memory layout of nsa_topk (the host computes the same size in src/ops/nsa/select.rs).
template <int ELEM, int DP, int NW> struct TopkSmem {
  typedef typename Elem<ELEM>::T T;
  static constexpr int BM = 16 * NW, LD = DP + Elem<ELEM>::PAD, LDP = NS_BN + 4;
  T *Qs, *Ks;
  float *lse2, *P, *E, *SC, *TS;
  int *TI, *cnt, *tloc, *nvis;
  __device__ TopkSmem(unsigned char *raw, const TopkParams &p) {
    Qs = (T *)raw;
    Ks = Qs + BM * LD;
    float *f = (float *)(Ks + p.stages * NS_BN * LD);
    lse2 = f;
    P = lse2 + BM;
    E = P + p.bt * LDP;
    SC = E + (p.gmode == 0 ? BM * LDP : 0);
    TS = SC + p.bt * p.nb;
    TI = (int *)(TS + p.bt * p.topk);
    cnt = TI + p.bt * p.topk;
    tloc = cnt + p.bt;
    nvis = tloc + p.bt;
  }
};

template <int ELEM, int DP, int NW> __device__ void nsa_topk_impl(const TopkParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int THREADS = 32 * NW, BM = 16 * NW, BN = NS_BN, KS = Elem<ELEM>::KS;
  constexpr int LD = TopkSmem<ELEM, DP, NW>::LD, LDP = TopkSmem<ELEM, DP, NW>::LDP;
  constexpr int V = 16 / sizeof(T);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TopkSmem<ELEM, DP, NW> sm(smem_raw, p);
  __shared__ int red[NW];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int BT = p.bt, G = p.G, n = p.topk;
  const i64 t0 = (i64)blockIdx.x * BT;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const i64 t_end = min((i64)p.T, t0 + BT); // exclusive
  if (t0 >= p.T) return;

  // Q tile (rows = token·G + head) and lse·log2e, loaded once.
  {
    const T *qb = (const T *)p.q + b * p.sq[0] + (i64)kvh * G * p.sq[2];
    constexpr int GROUPS = DP / V;
    for (int i = threadIdx.x; i < BM * GROUPS; i += THREADS) {
      const int r = i / GROUPS, c = (i % GROUPS) * V;
      const int tok = r / G, hh = r % G;
      const bool rok = r < BT * G && t0 + tok < t_end;
      T *dst = sm.Qs + r * LD + c;
      const T *src = qb + (t0 + tok) * p.sq[1] + hh * p.sq[2] + c;
      if (rok && p.vec_q && c + V <= p.D) {
        cp_async16(dst, src);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) dst[j] = (rok && c + j < p.D) ? src[j] : T(0);
      }
    }
    cp_async_commit();
    for (int r = threadIdx.x; r < BM; r += THREADS) {
      const int tok = r / G, hh = r % G;
      float v = 0.f;
      if (r < BT * G && t0 + tok < t_end)
        v = p.lse[b * p.sl[0] + (t0 + tok) * p.sl[1] + (i64)(kvh * G + hh) * p.sl[2]] *
            LOG2E;
      sm.lse2[r] = v;
    }
    for (int i = threadIdx.x; i < BT; i += THREADS) sm.cnt[i] = 0;
  }

  // Sequences intersecting the tile.
  int s_first = 0, s_last = 0;
  i64 cs = 0;
  if (p.cu_kind >= 0) {
    s_first = sequence_containing(p.cu, p.cu_kind, p.n_seq, t0);
    s_last = sequence_containing(p.cu, p.cu_kind, p.n_seq, t_end - 1);
    // compressed offset of s_first: Σ_{s < s_first} num_windows(len_s), reduced over the CTA
    i64 part = 0;
    for (int s = threadIdx.x; s < s_first; s += THREADS)
      part += num_windows(clamped_offset(p.cu, p.cu_kind, s + 1, p.T) - clamped_offset(p.cu, p.cu_kind, s, p.T),
                          p.L, p.S);
    // partial sums fit in int: rows of k_cmp are addressed with int64 below
    part = warp_sum(part);
    if (lane == 0) red[warp] = (int)part;
    __syncthreads();
    for (int w = 0; w < NW; ++w) cs += red[w];
  }

  const T *kb = (const T *)p.k + b * p.sk[0] + (i64)kvh * p.sk[2];
  const float sl2 = p.scale_log2;
  const int a1 = p.a - 1;

  for (int s = s_first; s <= s_last; ++s) {
    i64 st = 0, len = p.T, clen = p.C;
    if (p.cu_kind >= 0) {
      st = clamped_offset(p.cu, p.cu_kind, s, p.T);
      len = clamped_offset(p.cu, p.cu_kind, s + 1, p.T) - st;
      if (len < 0) len = 0;
      clen = num_windows(len, p.L, p.S);
    }
    const i64 cstart = cs;
    cs += clen;
    if (clen > p.C - cstart) clen = max((i64)0, p.C - cstart); // never read past k_cmp
    // tokens of this pass: [lo, hi) ∩ tile
    const i64 lo = max(t0, st), hi = min(t_end, st + len);
    if (hi <= lo) continue; // uniform over the CTA
    __syncthreads();        // previous pass done with tloc/nvis
    for (int i = threadIdx.x; i < BT; i += THREADS) {
      const i64 t = t0 + i;
      int tl = -1, nv = 0;
      if (t >= lo && t < hi) {
        tl = (int)(t - st);
        i64 v = (tl + 1 >= p.L) ? (tl + 1 - p.L) / p.S + 1 : 0;
        nv = (int)min(v, clen);
      }
      sm.tloc[i] = tl;
      sm.nvis[i] = nv;
    }
    const i64 tl_last = hi - 1 - st;
    const int jmax = (int)(tl_last / p.BK);
    const int nvis_max =
        (int)min((tl_last + 1 >= p.L) ? (tl_last + 1 - p.L) / p.S + 1 : (i64)0, clen);

    auto need = [&](int j0) { return max(p.bb * j0 - a1, 0) < nvis_max; };
    auto issue = [&](int j0, int buf) {
      if (!need(j0)) return;
      const int w0 = p.bb * j0 - a1;
      T *ks = sm.Ks + buf * BN * LD;
      constexpr int GROUPS = DP / V;
      for (int i = threadIdx.x; i < BN * GROUPS; i += THREADS) {
        const int r = i / GROUPS, c = (i % GROUPS) * V;
        const int w = w0 + r;
        const bool rok = w >= 0 && w < nvis_max;
        T *dst = ks + r * LD + c;
        const T *src = kb + (cstart + (rok ? w : 0)) * p.sk[1] + c;
        if (rok && p.vec_k && c + V <= p.D) {
          cp_async16(dst, src);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) dst[j] = (rok && c + j < p.D) ? src[j] : T(0);
        }
      }
    };

    int buf = 0;
    issue(0, 0);
    cp_async_commit();
    for (int j0 = 0; j0 <= jmax; j0 += p.nb) {
      cp_async_wait<0>();
      __syncthreads(); // keys (and Q) in shared memory; the previous chunk is done with P/SC
      const bool has_next = j0 + p.nb <= jmax;
      if (p.stages == 2 && has_next) {
        issue(j0 + p.nb, buf ^ 1);
        cp_async_commit();
      }
      const int w0 = p.bb * j0 - a1;
      const int nwin = p.nb * p.bb + a1; // windows of this chunk (<= BN)
      if (need(j0)) {
        const T *ks = sm.Ks + buf * BN * LD;
        float c[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
#pragma unroll
        for (int k0 = 0; k0 < DP; k0 += KS) {
          u32 af[4], bf[2];
          F::A_mk(af, sm.Qs, LD, 16 * warp, k0);
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            F::B_nk(bf, ks, LD, k0, 8 * j);
            mma<ELEM>(c[j], af, bf);
          }
        }
        // probabilities of the visible windows (0 elsewhere)
        int rtok[2], rnv[2];
        float rl[2];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = 16 * warp + g + 8 * hf;
          const int tok = r / G;
          const bool ok = r < BT * G && sm.tloc[tok < BT ? tok : 0] >= 0 && tok < BT;
          rtok[hf] = tok;
          rnv[hf] = ok ? sm.nvis[tok] : 0;
          rl[hf] = sm.lse2[r];
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * j + 2 * tq + e;
            const int w = w0 + col;
            float v[2];
#pragma unroll
            for (int hf = 0; hf < 2; ++hf)
              v[hf] = (w >= 0 && w < rnv[hf] && col < nwin)
                          ? fast_exp2(c[j][2 * hf + e] * sl2 - rl[hf])
                          : 0.f;
            if (p.gmode == 16) {
              float x = v[0] + v[1];
              x += __shfl_xor_sync(FULL_MASK, x, 4);
              x += __shfl_xor_sync(FULL_MASK, x, 8);
              x += __shfl_xor_sync(FULL_MASK, x, 16);
              if (g == 0) sm.P[warp * LDP + col] = x;
            } else if (p.gmode > 0) {
              for (int o = 4; o < 4 * p.gmode; o <<= 1) {
                v[0] += __shfl_xor_sync(FULL_MASK, v[0], o);
                v[1] += __shfl_xor_sync(FULL_MASK, v[1], o);
              }
              if (g % p.gmode == 0) {
                sm.P[rtok[0] * LDP + col] = v[0];
                sm.P[rtok[1] * LDP + col] = v[1];
              }
            } else {
              sm.E[(16 * warp + g) * LDP + col] = v[0];
              sm.E[(16 * warp + g + 8) * LDP + col] = v[1];
            }
          }
      } else {
        for (int i = threadIdx.x; i < BT * BN; i += THREADS)
          sm.P[(i / BN) * LDP + i % BN] = 0.f;
      }
      __syncthreads(); // P (or E) written; this key buffer is free
      if (p.stages == 1 && has_next) {
        issue(j0 + p.nb, 0);
        cp_async_commit();
      }
      if (p.gmode == 0 && need(j0)) {
        for (int i = threadIdx.x; i < BT * BN; i += THREADS) {
          const int tok = i / BN, col = i % BN;
          float x = 0.f;
          for (int hh = 0; hh < G; ++hh) x += sm.E[(tok * G + hh) * LDP + col];
          sm.P[tok * LDP + col] = x;
        }
        __syncthreads();
      }
      // block scores of the chunk
      for (int i = threadIdx.x; i < BT * p.nb; i += THREADS) {
        const int tok = i / p.nb, jj = i % p.nb, j = j0 + jj;
        const int tl = sm.tloc[tok];
        if (tl < 0) continue;
        const int tb = tl / p.BK;
        if (j > tb) continue;
        float sc;
        if (j < p.init_blocks || j + p.local_blocks > tb) {
          sc = __int_as_float(0x7f800000);
        } else {
          const float *pr = sm.P + tok * LDP + p.bb * jj + a1;
          sc = 0.f;
          for (int x = 0; x < p.a; ++x)
            for (int y = 0; y < p.bb; ++y) sc += pr[y - x];
        }
        sm.SC[tok * p.nb + jj] = sc;
      }
      __syncthreads();
      // online top-n, one thread per token, blocks in ascending order (the CPU's rule)
      for (int tok = threadIdx.x; tok < BT; tok += THREADS) {
        const int tl = sm.tloc[tok];
        if (tl < 0) continue;
        const int tb = tl / p.BK;
        int m = sm.cnt[tok];
        for (int jj = 0; jj < p.nb && j0 + jj <= tb; ++jj) {
          const float sc = sm.SC[tok * p.nb + jj];
          if (m == n) {
            if (!(sc > sm.TS[(n - 1) * BT + tok])) continue;
            --m;
          }
          int pos = m;
          for (int q = 0; q < m; ++q)
            if (sm.TS[q * BT + tok] < sc) {
              pos = q;
              break;
            }
          for (int q = m; q > pos; --q) {
            sm.TS[q * BT + tok] = sm.TS[(q - 1) * BT + tok];
            sm.TI[q * BT + tok] = sm.TI[(q - 1) * BT + tok];
          }
          sm.TS[pos * BT + tok] = sc;
          sm.TI[pos * BT + tok] = j0 + jj;
          ++m;
        }
        sm.cnt[tok] = m;
      }
      buf ^= (p.stages == 2) ? 1 : 0;
    }
    cp_async_wait<0>();
  }
  cp_async_wait<0>(); // the Q tile, when no pass ran
  __syncthreads();

  // sort each token's selection ascending and write it, -1 padded
  for (int tok = threadIdx.x; tok < BT; tok += THREADS) {
    const i64 t = t0 + tok;
    if (t >= t_end) continue;
    const int m = sm.cnt[tok];
    for (int i = 1; i < m; ++i) {
      const int v = sm.TI[i * BT + tok];
      int q = i - 1;
      while (q >= 0 && sm.TI[q * BT + tok] > v) {
        sm.TI[(q + 1) * BT + tok] = sm.TI[q * BT + tok];
        --q;
      }
      sm.TI[(q + 1) * BT + tok] = v;
    }
    int *o = p.out + b * p.so[0] + t * p.so[1] + (i64)kvh * p.so[2];
    for (int slot = 0; slot < n; ++slot) o[slot * p.so[3]] = slot < m ? sm.TI[slot * BT + tok] : -1;
  }
}

// ------------------------------------------------------------------------------ entry points

extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_mean_fwd(const CmpParams p) {
  cmp_mean_fwd_impl<NS_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_linear_fwd(const CmpParams p) {
  cmp_linear_fwd_impl<NS_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_linear_dg(const CmpParams p) {
  cmp_linear_dg_impl<NS_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_dx_mean(const CmpParams p) {
  cmp_dx_impl<NS_ELEM>(p, false);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_dx_linear(const CmpParams p) {
  cmp_dx_impl<NS_ELEM>(p, true);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_linear_dw(const CmpParams p) {
  cmp_linear_dw_impl<NS_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(CMP_THREADS) nsa_cmp_linear_dpe(const CmpParams p) {
  cmp_linear_dpe_impl<NS_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(32 * NS_NW) nsa_topk(const TopkParams p) {
  nsa_topk_impl<NS_ELEM, NS_DP, NS_NW>(p);
}
