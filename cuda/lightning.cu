// Lightning attention: one generic blocked linear-attention pass (forward, or reverse for the
// backward), on tensor cores, plus a one-token decode kernel.
//
// Math of one pass (per sequence n of length L, head h, λ = exp(−slope_h), γ = scale_out,
// β = scale_kv, S_in = state_in[n, h] or 0):
//   forward: R_t = λ^(t+1) S_in + β Σ_{j≤t} λ^(t−j) k_j v_jᵀ,   state_out = R_(L−1)
//   reverse: R_t = λ^(L−1−t) S_in + β Σ_{j≥t} λ^(j−t) k_j v_jᵀ, state_out = λ R_0
//   out_t = γ q_tᵀ R_t;   dot: partial[n, h, tile] = Σ_t (t+1) ⟨x_t, out_t⟩ over the tile's columns
//
// One CTA owns (value tile, head, sequence) and walks the sequence in chunks of BK tokens,
// carrying the DK x DVT state in float32 registers. Per chunk (p = row, j = column in chunk):
//   O = γ·λ^(e_in(p)) Q C  +  γβ·[(Q Kᵀ) ⊙ decay mask] V          (C = carried state)
//   C = λ^m C + β Σ_p λ^(e_up(p)) k_p v_pᵀ
// with e_in = p+1, e_up = m−1−p forward and e_in = m−1−p, e_up = p+1 in reverse. Every exponent
// is ≥ 0, so no power of λ exceeds 1 and nothing overflows for any slope ≥ 0.
//
// The next chunk's tiles are prefetched with cp.async while the current one is computed
// (STAGES = 2 shared-memory buffers; 1 where two would not fit).
//
// Compile-time specialisation (-D): LA_ELEM (0 f32/tf32, 1 f16, 2 bf16), LA_DK (padded key dim,
// a multiple of 16), LA_DVT (value tile, 32 or 64), LA_REVERSE (0/1), LA_STAGES (1 or 2).
#include "common.cuh"

#define DECODE_THREADS 256

struct LaParams {
  const void *q, *k, *v;
  void *out;
  const void *x;
  const float *slopes;
  const float *state_in;
  float *state_out;
  float *partial;
  const void *cu_seqlens;
  i64 sq[3], sk[3], sv[3], so[3], sx[3]; // strides (elements) of batch, token, head
  i64 ssi[4], sso[4];                    // state strides: sequence, head, key dim, value dim
  i64 sp[3];                             // partial strides: sequence, head, slot
  int T;      // tokens per batch row (total tokens with cu_seqlens)
  int H, D, E;
  int cu_kind; // -1: no cu_seqlens, 0: int32, 1: int64
  int has_state_in, has_state_out, has_dot;
  int vec_q, vec_k, vec_v, vec_x;
  float scale_out, scale_kv;
};
CHECK_MIRROR(LaParams);

// Sequence n's batch row, first token and length.
__device__ __forceinline__ void sequence_of(const LaParams &p, int n, int &b, i64 &start, int &len) {
  if (p.cu_kind < 0) {
    b = n;
    start = 0;
    len = p.T;
    return;
  }
  i64 end;
  sequence_span(p.cu_seqlens, p.cu_kind, n, p.T, start, end);
  b = 0;
  len = (int)(end - start);
}

template <int ELEM, int DK, int DVT, bool REVERSE, int STAGES>
__device__ __forceinline__ void la_pass_impl(const LaParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int BK = 64, NW = 4, THREADS = 32 * NW;
  constexpr int KS = Elem<ELEM>::KS, PAD = Elem<ELEM>::PAD;
  constexpr int LDQ = DK + PAD, LDV = DVT + PAD, LDS = DK + PAD;
  constexpr int NT = DVT / 8, PT = BK / 8;
  // State tiles (MT x NT mma tiles) spread over the warps.
  constexpr int MT = DK / 16;
  constexpr int WM = (MT % 4 == 0) ? 4 : ((MT % 2 == 0) ? 2 : 1);
  constexpr int WN = NW / WM;
  constexpr int SMT = MT / WM, SNT = NT / WN;
  static_assert(DK % 16 == 0 && DVT % 32 == 0 && NT % WN == 0, "bad tile configuration");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  // One stage holds a chunk's Q, K, V tiles, and the X tile of the dot product when asked for.
  const int STAGE = 2 * BK * LDQ + (p.has_dot ? 2 : 1) * BK * LDV;
  T *Ss = reinterpret_cast<T *>(smem_raw); // carried state, [value][key], input precision
  T *stages = Ss + DVT * LDS;
  __shared__ float wts[BK];
  __shared__ float red[NW];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int tile = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const int e0 = tile * DVT;
  int b, L;
  i64 start;
  sequence_of(p, n, b, start, L);
  const float nl2 = -p.slopes[h] * LOG2E; // log2 λ
  const float gb = p.scale_out * p.scale_kv;

  const T *qb = (const T *)p.q + b * p.sq[0] + start * p.sq[1] + h * p.sq[2];
  const T *kb = (const T *)p.k + b * p.sk[0] + start * p.sk[1] + h * p.sk[2];
  const T *vb = (const T *)p.v + b * p.sv[0] + start * p.sv[1] + h * p.sv[2] + e0;
  T *ob = (T *)p.out + b * p.so[0] + start * p.so[1] + h * p.so[2] + e0;
  const T *xb = p.has_dot ? (const T *)p.x + b * p.sx[0] + start * p.sx[1] + h * p.sx[2] + e0 : nullptr;

  const int wm = warp % WM, wn = warp / WM;
  float S[SMT][SNT][4];
#pragma unroll
  for (int i = 0; i < SMT; ++i)
#pragma unroll
    for (int j = 0; j < SNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int d = (wm + WM * i) * 16 + g + 8 * (r >> 1);
        const int e = e0 + (wn * SNT + j) * 8 + 2 * tq + (r & 1);
        S[i][j][r] = (p.has_state_in && d < p.D && e < p.E)
                         ? p.state_in[n * p.ssi[0] + h * p.ssi[1] + d * p.ssi[2] + e * p.ssi[3]]
                         : 0.f;
      }

  float dot_acc = 0.f;
  const int nchunks = (L + BK - 1) / BK;
  auto prefetch = [&](int ci) {
    const int c = REVERSE ? nchunks - 1 - ci : ci;
    const int c0 = c * BK, m = min(BK, L - c0);
    T *Qs = stages + (ci % STAGES) * STAGE, *Ks = Qs + BK * LDQ, *Vs = Ks + BK * LDQ;
    load_tile_async<ELEM, BK, DK, THREADS>(Qs, LDQ, qb + (i64)c0 * p.sq[1], p.sq[1], m, p.D, p.vec_q);
    load_tile_async<ELEM, BK, DK, THREADS>(Ks, LDQ, kb + (i64)c0 * p.sk[1], p.sk[1], m, p.D, p.vec_k);
    load_tile_async<ELEM, BK, DVT, THREADS>(Vs, LDV, vb + (i64)c0 * p.sv[1], p.sv[1], m, p.E - e0,
                                            p.vec_v);
    if (p.has_dot)
      load_tile_async<ELEM, BK, DVT, THREADS>(Vs + BK * LDV, LDV, xb + (i64)c0 * p.sx[1], p.sx[1], m,
                                              p.E - e0, p.vec_x);
    cp_async_commit();
  };
  if (nchunks > 0) prefetch(0);
  for (int ci = 0; ci < nchunks; ++ci) {
    const int c = REVERSE ? nchunks - 1 - ci : ci;
    const int c0 = c * BK, m = min(BK, L - c0);
    const T *Qs = stages + (ci % STAGES) * STAGE, *Ks = Qs + BK * LDQ, *Vs = Ks + BK * LDQ;
    const T *Xs = Vs + BK * LDV;

    // Carried state -> shared memory (input precision), as the B operand of Q·C.
#pragma unroll
    for (int i = 0; i < SMT; ++i)
#pragma unroll
      for (int j = 0; j < SNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = (wm + WM * i) * 16 + g + 8 * (r >> 1);
          const int e = (wn * SNT + j) * 8 + 2 * tq + (r & 1);
          Ss[e * LDS + d] = from_f32<ELEM>(S[i][j][r]);
        }
    if (threadIdx.x < BK) {
      const int r = threadIdx.x;
      wts[r] = r < m ? p.scale_kv * fast_exp2(nl2 * (float)(REVERSE ? r + 1 : m - 1 - r)) : 0.f;
    }
    if (STAGES == 2 && ci + 1 < nchunks) {
      prefetch(ci + 1); // into the other buffer, freed by the barrier that ended chunk ci − 1
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Row phase: warp owns chunk rows [16 warp, 16 warp + 16).
    const int row0 = 16 * warp;
    // Causal: forward rows see columns <= row, reverse rows see columns >= row (tile-uniform).
    const int pt_lo = REVERSE ? 2 * warp : 0, pt_hi = REVERSE ? PT : 2 * warp + 2;
    float O[NT][4], P[PT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) O[j][0] = O[j][1] = O[j][2] = O[j][3] = 0.f;
#pragma unroll
    for (int j = 0; j < PT; ++j) P[j][0] = P[j][1] = P[j][2] = P[j][3] = 0.f;
    if (row0 < m) {
#pragma unroll
      for (int k0 = 0; k0 < DK; k0 += KS) {
        u32 a[4], bf[2];
        F::A_mk(a, Qs, LDQ, row0, k0);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          F::B_nk(bf, Ss, LDS, k0, 8 * j);
          mma<ELEM>(O[j], a, bf);
        }
#pragma unroll
        for (int j = 0; j < PT; ++j) {
          if (j >= pt_lo && j < pt_hi) {
            F::B_nk(bf, Ks, LDQ, k0, 8 * j);
            mma<ELEM>(P[j], a, bf);
          }
        }
      }
      // Inter-chunk rows scaled by γ λ^(e_in(p)); intra scores by γβ λ^|p−j| under the mask.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int pr = row0 + g + 8 * r;
        const float f =
            pr < m ? p.scale_out * fast_exp2(nl2 * (float)(REVERSE ? m - 1 - pr : pr + 1)) : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          O[j][2 * r] *= f;
          O[j][2 * r + 1] *= f;
        }
#pragma unroll
        for (int j = 0; j < PT; ++j)
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            const int col = 8 * j + 2 * tq + cc;
            const int dist = REVERSE ? col - pr : pr - col;
            const bool ok = pr < m && col < m && dist >= 0;
            P[j][2 * r + cc] = ok ? P[j][2 * r + cc] * gb * fast_exp2(nl2 * (float)dist) : 0.f;
          }
      }
#pragma unroll
      for (int kk = 0; kk < BK / KS; ++kk) {
        if (kk * KS / 8 + KS / 8 > pt_lo && kk * KS / 8 < pt_hi) {
          u32 a[4], bf[2];
          F::A_from_acc(a, P, kk);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            F::B_kn(bf, Vs, LDV, kk * KS, 8 * j);
            mma<ELEM>(O[j], a, bf);
          }
        }
      }
      // Store (and accumulate the slope-gradient dot product in float32).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int pr = row0 + g + 8 * r;
        if (pr < m) {
          const i64 t = c0 + pr;
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
              const int e = 8 * j + 2 * tq + cc;
              if (e0 + e < p.E) {
                ob[t * p.so[1] + e] = from_f32<ELEM>(O[j][2 * r + cc]);
                if (p.has_dot)
                  dot_acc += (float)(t + 1) * load_f32<ELEM>(Xs + pr * LDV + e) * O[j][2 * r + cc];
              }
            }
        }
      }
    }
    __syncthreads(); // Ss, Ks, Vs reads of the row phase are done

    // State update: C = λ^m C + Kᵀ diag(w) V, state tiles spread over the warps.
    const float decay_m = fast_exp2(nl2 * (float)m);
#pragma unroll
    for (int i = 0; i < SMT; ++i)
#pragma unroll
      for (int j = 0; j < SNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) S[i][j][r] *= decay_m;
#pragma unroll
    for (int k0 = 0; k0 < BK; k0 += KS) {
      if (k0 < m) {
        u32 a[SMT][4];
#pragma unroll
        for (int i = 0; i < SMT; ++i) {
          F::A_km(a[i], Ks, LDQ, (wm + WM * i) * 16, k0);
          F::scale_A_cols(a[i], wts + k0);
        }
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
          u32 bf[2];
          F::B_kn(bf, Vs, LDV, k0, (wn * SNT + j) * 8);
#pragma unroll
          for (int i = 0; i < SMT; ++i) mma<ELEM>(S[i][j], a[i], bf);
        }
      }
    }
    __syncthreads(); // this chunk's buffer is free
    if (STAGES == 1 && ci + 1 < nchunks) prefetch(ci + 1);
  }

  if (p.has_state_out) {
#pragma unroll
    for (int i = 0; i < SMT; ++i)
#pragma unroll
      for (int j = 0; j < SNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = (wm + WM * i) * 16 + g + 8 * (r >> 1);
          const int e = e0 + (wn * SNT + j) * 8 + 2 * tq + (r & 1);
          if (d < p.D && e < p.E)
            p.state_out[n * p.sso[0] + h * p.sso[1] + d * p.sso[2] + e * p.sso[3]] = S[i][j][r];
        }
  }
  if (p.has_dot) {
    dot_acc = warp_sum(dot_acc);
    if (lane == 0) red[warp] = dot_acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) s += red[w];
      p.partial[n * p.sp[0] + h * p.sp[1] + tile * p.sp[2]] = s;
    }
  }
}

// One token per sequence (T == 1, forward): R = λ S_in + β k vᵀ, out = γ qᵀ R, state_out = R.
// A CTA owns 32 value columns; its 8 warps split the key rows, each warp reading whole 128-byte
// rows of the state, and combine their partial dot products through shared memory.
template <int ELEM> __device__ __forceinline__ void la_decode_impl(const LaParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int WARPS = DECODE_THREADS / 32;
  __shared__ float qs[256], ks[256], part[WARPS][32];
  const int h = blockIdx.y, n = blockIdx.z, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * 32 + lane;
  const T *qb = (const T *)p.q + n * p.sq[0] + h * p.sq[2];
  const T *kb = (const T *)p.k + n * p.sk[0] + h * p.sk[2];
  for (int d = threadIdx.x; d < p.D; d += DECODE_THREADS) {
    qs[d] = load_f32<ELEM>(qb + d);
    ks[d] = load_f32<ELEM>(kb + d);
  }
  __syncthreads();
  float acc = 0.f;
  if (e < p.E) {
    const float lam = fast_exp2(-p.slopes[h] * LOG2E);
    const float bv = p.scale_kv * load_f32<ELEM>((const T *)p.v + n * p.sv[0] + h * p.sv[2] + e);
    const float *si = p.state_in + n * p.ssi[0] + h * p.ssi[1] + e * p.ssi[3];
    float *so = p.state_out + n * p.sso[0] + h * p.sso[1] + e * p.sso[3];
#pragma unroll 4
    for (int d = warp; d < p.D; d += WARPS) {
      const float s = (p.has_state_in ? lam * si[d * p.ssi[2]] : 0.f) + ks[d] * bv;
      if (p.has_state_out) so[d * p.sso[2]] = s;
      acc += qs[d] * s;
    }
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && e < p.E) {
#pragma unroll
    for (int w = 1; w < WARPS; ++w) acc += part[w][lane];
    T *ob = (T *)p.out + n * p.so[0] + h * p.so[2];
    ob[e] = from_f32<ELEM>(p.scale_out * acc);
  }
}

extern "C" __global__ void __launch_bounds__(128) la_pass(const LaParams p) {
  la_pass_impl<LA_ELEM, LA_DK, LA_DVT, (LA_REVERSE != 0), LA_STAGES>(p);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS) la_decode(const LaParams p) {
  la_decode_impl<LA_ELEM>(p);
}
