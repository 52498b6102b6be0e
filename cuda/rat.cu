// RAT chunked attention (docs/api/rat.md): in-chunk gated scan, chunk RoPE, softmax over earlier
// chunk-final states plus the own partial state.
//
// Tiles: a query tile holds at most 64 tokens and never starts inside a chunk unless L > 64.
//   L <= 64: tile x covers tokens [x·TQ, x·TQ + TQ) of its sequence, TQ = ⌊64/L⌋·L.
//   L >  64: tile x = (chunk c = x / TPC, sub = x % TPC), TPC = ⌈L/64⌉, covers
//            [c·L + 64·sub, min(c·L + 64·sub + 64, c·L + L)); the scan state entering a sub-tile
//            > 0 is read from the carry scratch (slot chunk0·TPC + x) written by rat_states.
//
// Kernels (all 128 threads; the scan phases give thread i the channel pair (i, i + Dh),
// Dh = ⌈D/2⌉, so that RoPE pairs live in one thread):
//   rat_states  per (chunk, head, sequence): scans the chunk (float32), writes the chunk-final
//               states (float32, un-rotated; mode 0) or reads them (mode 1), and writes the
//               rotated elem copy kr and the elem copy ve used by the tensor-core kernels, and
//               the carries (L > 64).
//   rat_fwd     per (tile, head, sequence): rescans the tile, own logit as the first softmax
//               term (m = own, l = 1, O = v~), then blocks of 64 chunk states with mma.
//   rat_delta   Δ_t = dy_t·(y_t + y_lo_t) per row (y_lo: y's rounding residual, when stored).
//   rat_bwd_kv  per (block of 64 chunk states, head, sequence): dK~_j (un-rotated) and dV~_j over
//               every later query tile (no atomics).
//   rat_bwd_q   per tile (L <= 64) or per chunk (L > 64, its sub-tiles in reverse): dq, then the
//               reverse scan (own-state gradients + dK~/dV~ at offset L − 1) to dk, dv, dg.
//   rat_decode, rat_decode_combine  one token per sequence from a RATCache (see "decode").
//
// Defines: RAT_ELEM (0 f32, 1 f16, 2 bf16), RAT_DK (padded head dim, multiple of 16, <= 256).
#include "common.cuh"

#define RAT_THREADS 128
#define RAT_U 8 // rows whose scan inputs are loaded ahead of use

struct RatParams {
  const void *q, *k, *v, *g;
  void *out;
  void *out_lo;        // out's rounding residual (strides so), or null: not stored
  const void *dout;
  float *lse;
  float *ks, *vs;      // saved chunk-final states [B, C, H, D] f32
  void *kr, *ve;       // elem scratch [B, C, H, D] contiguous
  float *carry_k, *carry_v; // [B, C·TPC, H, D] f32 contiguous (L > 64)
  float *delta;        // [B, T, H] f32 contiguous
  float *dks, *dvs;    // [B, C, H, D] f32 contiguous
  void *dq, *dk, *dv, *dg;
  const void *cu_seqlens;
  i64 sq[3], sk[3], sv[3], sg[3], so[3], sdo[3], slse[3], sks[3], svs[3];
  i64 sdq[3], sdk[3], sdv[3], sdg[3];
  i64 srot[3]; // strides of kr, ve, dks, dvs (contiguous [B, C, H, D])
  i64 scar[3]; // strides of the carries
  double log2_base; // log2(rope_base)
  int rope;
  int T, H, D, L;
  int TQ, TPC;
  int cu_kind;
  int g_f32;
  int mode;          // rat_states: 0 scan, 1 read saved states
  int write_states;  // rat_states mode 0: write ks, vs
  int vec_rot, vec_do;
  int vec_q;         // q rows are 16-byte aligned (cp.async tile loads)
  float scale;
};
CHECK_MIRROR(RatParams);

struct Seq {
  int b;
  i64 start;
  int len;
  i64 chunk0;
};

__device__ __forceinline__ Seq seq_of(const RatParams &p, int n) {
  Seq s;
  if (p.cu_kind < 0) {
    s.b = n;
    s.start = 0;
    s.len = p.T;
    s.chunk0 = 0;
    return s;
  }
  i64 s0, s1;
  sequence_span(p.cu_seqlens, p.cu_kind, n, p.T, s0, s1);
  s.b = 0;
  s.start = s0;
  s.len = (int)(s1 - s0);
  s.chunk0 = (s0 + (i64)n * (p.L - 1)) / p.L;
  return s;
}

// Tile x of a sequence: first token (sequence-relative) and token count (<= 0: no tile).
__device__ __forceinline__ void tile_of(const RatParams &p, const Seq &s, int x, int &t0, int &m) {
  if (p.L <= 64) {
    t0 = x * p.TQ;
    m = min(p.TQ, s.len - t0);
  } else {
    const int c = x / p.TPC, sub = x % p.TPC;
    t0 = c * p.L + 64 * sub;
    const int end = min(c * p.L + p.L, s.len);
    m = min(64, min(c * p.L + p.L - t0, end - t0));
  }
}

template <int ELEM> __device__ __forceinline__ float ld(const void *base, i64 off) {
  return load_f32<ELEM>((const typename Elem<ELEM>::T *)base + off);
}
// ld_g and theta_of serve RatParams and RatDecodeParams (same field names).
template <class P> __device__ __forceinline__ float ld_g(const P &p, i64 off) {
  return p.g_f32 ? ((const float *)p.g)[off] : ld<RAT_ELEM>(p.g, off);
}
template <int ELEM> __device__ __forceinline__ void st(void *base, i64 off, float x) {
  ((typename Elem<ELEM>::T *)base)[off] = from_f32<ELEM>(x);
}
// x rounded into hi[off] and, when lo is set, its rounding residual into lo[off].
template <int ELEM> __device__ __forceinline__ void st_split(void *hi, void *lo, i64 off, float x) {
  typename Elem<ELEM>::T h, l;
  split_f32<ELEM>(x, h, l);
  ((typename Elem<ELEM>::T *)hi)[off] = h;
  if (lo) ((typename Elem<ELEM>::T *)lo)[off] = l;
}

// θ_i = base^(−2i/D) (float64), 0 without RoPE.
template <class P> __device__ __forceinline__ double theta_of(const P &p, int i) {
  return p.rope ? exp2(-2.0 * (double)i / (double)p.D * p.log2_base) : 0.0;
}
// cos/sin of c·θ (angle reduced in float64).
__device__ __forceinline__ void cs_of(double theta, i64 c, float &co, float &si) {
  double a = (double)c * theta;
  a -= 6.283185307179586 * rint(a * 0.15915494309189535);
  __sincosf((float)a, &si, &co);
}

// Gates and inputs of the scan rows lb .. lb + RAT_U − 1 of the tile at t0 (m rows), channels ch0
// and ch1 (when has1), loaded ahead of their use; zero past the tile or for inactive lanes.
template <int ELEM>
__device__ __forceinline__ void load_scan_rows(const RatParams &p, const Seq &s, int h, int t0, int lb,
                                               int m, bool act, int ch0, int ch1, bool has1, float *G0,
                                               float *G1, float *XK0, float *XK1, float *XV0, float *XV1) {
#pragma unroll
  for (int u = 0; u < RAT_U; ++u) {
    G0[u] = G1[u] = XK0[u] = XK1[u] = XV0[u] = XV1[u] = 0.f;
    const int l = lb + u;
    if (l < m && act) {
      const i64 tok = s.start + t0 + l;
      const i64 og = s.b * p.sg[0] + tok * p.sg[1] + h * p.sg[2];
      const i64 ok = s.b * p.sk[0] + tok * p.sk[1] + h * p.sk[2];
      const i64 ov = s.b * p.sv[0] + tok * p.sv[1] + h * p.sv[2];
      G0[u] = ld_g(p, og + ch0);
      XK0[u] = ld<ELEM>(p.k, ok + ch0);
      XV0[u] = ld<ELEM>(p.v, ov + ch0);
      if (has1) {
        G1[u] = ld_g(p, og + ch1);
        XK1[u] = ld<ELEM>(p.k, ok + ch1);
        XV1[u] = ld<ELEM>(p.v, ov + ch1);
      }
    }
  }
}

// ------------------------------------------------------------------------------- states
template <int ELEM> __device__ void states_impl(const RatParams &p) {
  typedef typename Elem<ELEM>::T T;
  const int x = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const Seq s = seq_of(p, n);
  const int nc = (s.len + p.L - 1) / p.L;
  if (x >= nc) return;
  const int i = threadIdx.x, Dh = (p.D + 1) / 2;
  if (i >= Dh) return;
  const int ch0 = i, ch1 = i + Dh;
  const bool has1 = ch1 < p.D;
  const i64 slot = s.chunk0 + x;
  float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
  if (p.mode == 0) {
    const int c0 = x * p.L, m = min(p.L, s.len - c0);
    const i64 cbase = (i64)s.b * p.scar[0] + s.chunk0 * p.TPC * p.scar[1] + (i64)x * p.TPC * p.scar[1] +
                      (i64)h * p.scar[2];
#pragma unroll 4
    for (int l = 0; l < m; ++l) {
      if (p.L > 64 && l > 0 && (l & 63) == 0) {
        const i64 o = cbase + (i64)(l >> 6) * p.scar[1];
        p.carry_k[o + ch0] = k0;
        p.carry_v[o + ch0] = v0;
        if (has1) {
          p.carry_k[o + ch1] = k1;
          p.carry_v[o + ch1] = v1;
        }
      }
      const i64 tok = s.start + c0 + l;
      const i64 og = s.b * p.sg[0] + tok * p.sg[1] + h * p.sg[2];
      const i64 ok = s.b * p.sk[0] + tok * p.sk[1] + h * p.sk[2];
      const i64 ov = s.b * p.sv[0] + tok * p.sv[1] + h * p.sv[2];
      const float g0 = ld_g(p, og + ch0);
      k0 = g0 * k0 + (1.f - g0) * ld<ELEM>(p.k, ok + ch0);
      v0 = g0 * v0 + (1.f - g0) * ld<ELEM>(p.v, ov + ch0);
      if (has1) {
        const float g1 = ld_g(p, og + ch1);
        k1 = g1 * k1 + (1.f - g1) * ld<ELEM>(p.k, ok + ch1);
        v1 = g1 * v1 + (1.f - g1) * ld<ELEM>(p.v, ov + ch1);
      }
    }
    if (p.write_states) {
      const i64 oks = s.b * p.sks[0] + slot * p.sks[1] + h * p.sks[2];
      const i64 ovs = s.b * p.svs[0] + slot * p.svs[1] + h * p.svs[2];
      p.ks[oks + ch0] = k0;
      p.vs[ovs + ch0] = v0;
      if (has1) {
        p.ks[oks + ch1] = k1;
        p.vs[ovs + ch1] = v1;
      }
    }
  } else {
    const i64 oks = s.b * p.sks[0] + slot * p.sks[1] + h * p.sks[2];
    const i64 ovs = s.b * p.svs[0] + slot * p.svs[1] + h * p.svs[2];
    k0 = p.ks[oks + ch0];
    v0 = p.vs[ovs + ch0];
    if (has1) {
      k1 = p.ks[oks + ch1];
      v1 = p.vs[ovs + ch1];
    }
  }
  float r0 = k0, r1 = k1;
  if (p.rope) {
    float co, si;
    cs_of(theta_of(p, i), x, co, si);
    r0 = k0 * co - k1 * si;
    r1 = k1 * co + k0 * si;
  }
  const i64 orot = s.b * p.srot[0] + slot * p.srot[1] + h * p.srot[2];
  T *kr = (T *)p.kr, *ve = (T *)p.ve;
  kr[orot + ch0] = from_f32<ELEM>(r0);
  ve[orot + ch0] = from_f32<ELEM>(v0);
  if (has1) {
    kr[orot + ch1] = from_f32<ELEM>(r1);
    ve[orot + ch1] = from_f32<ELEM>(v1);
  }
}

// ------------------------------------------------------------------------------- forward
template <int ELEM, int DK> __device__ void fwd_impl(const RatParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, LD = DK + Elem<ELEM>::PAD, NJ = DK / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *Ks = Qs + 64 * LD, *Vs = Ks + 64 * LD;
  float *VT = reinterpret_cast<float *>(Ks); // [64][DK] own v~ (before the key loop)
  __shared__ float red[64][4];
  __shared__ float own2[64];

  const int x = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const Seq s = seq_of(p, n);
  int t0, m;
  tile_of(p, s, x, t0, m);
  if (m <= 0) return;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int Dh = (p.D + 1) / 2;
  const float sl2 = p.scale * LOG2E;

  // Zero the padding columns of VT (Qs is zero-filled by its tile load).
  for (int e = tid; e < 64 * (DK - p.D); e += RAT_THREADS) {
    const int r = e / (DK - p.D), c = p.D + e % (DK - p.D);
    VT[r * DK + c] = 0.f;
  }
  // Raw q tile to Qs (rows >= m and columns >= D zero-filled), all loads in flight at once.
  load_tile_async<ELEM, 64, DK, RAT_THREADS>(
      Qs, LD, (const T *)p.q + s.b * p.sq[0] + (s.start + t0) * p.sq[1] + h * p.sq[2], p.sq[1], m, p.D,
      p.vec_q);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // In-tile scan: g, k, v of RAT_U rows are loaded before they are used (memory-level
  // parallelism); q comes from Qs and is rotated in place (each element by its own thread).
  {
    const int i = tid, ch0 = i, ch1 = i + Dh;
    const bool act = i < Dh, has1 = act && ch1 < p.D;
    const double th = theta_of(p, i);
    float k0 = 0.f, k1 = 0.f, v0 = 0.f, v1 = 0.f;
    if (p.L > 64 && (x % p.TPC) != 0 && act) {
      const i64 o = (i64)s.b * p.scar[0] + (s.chunk0 * p.TPC + x) * p.scar[1] + (i64)h * p.scar[2];
      k0 = p.carry_k[o + ch0];
      v0 = p.carry_v[o + ch0];
      if (has1) {
        k1 = p.carry_k[o + ch1];
        v1 = p.carry_v[o + ch1];
      }
    }
    for (int lb = 0; lb < 64; lb += RAT_U) {
      float G0[RAT_U], G1[RAT_U], XK0[RAT_U], XK1[RAT_U], XV0[RAT_U], XV1[RAT_U];
      load_scan_rows<ELEM>(p, s, h, t0, lb, m, act, ch0, ch1, has1, G0, G1, XK0, XK1, XV0, XV1);
#pragma unroll
      for (int u = 0; u < RAT_U; ++u) {
        const int l = lb + u;
        float part = 0.f;
        if (l < m && act) {
          const int pos = t0 + l;
          if (pos % p.L == 0) k0 = k1 = v0 = v1 = 0.f;
          const float g0 = G0[u];
          k0 = g0 * k0 + (1.f - g0) * XK0[u];
          v0 = g0 * v0 + (1.f - g0) * XV0[u];
          const float q0 = load_f32<ELEM>(Qs + l * LD + ch0);
          float q1 = 0.f;
          if (has1) {
            const float g1 = G1[u];
            k1 = g1 * k1 + (1.f - g1) * XK1[u];
            v1 = g1 * v1 + (1.f - g1) * XV1[u];
            q1 = load_f32<ELEM>(Qs + l * LD + ch1);
          }
          part = q0 * k0 + (has1 ? q1 * k1 : 0.f);
          VT[l * DK + ch0] = v0;
          float r0 = q0, r1 = q1;
          if (p.rope) {
            float co, si;
            cs_of(th, pos / p.L, co, si);
            r0 = q0 * co - q1 * si;
            r1 = q1 * co + q0 * si;
          }
          Qs[l * LD + ch0] = from_f32<ELEM>(r0);
          if (has1) {
            VT[l * DK + ch1] = v1;
            Qs[l * LD + ch1] = from_f32<ELEM>(r1);
          }
        } else if (act) {
          VT[l * DK + ch0] = 0.f;
          if (has1) VT[l * DK + ch1] = 0.f;
        }
        part = warp_sum(part);
        if (lane == 0) red[l][warp] = part;
      }
    }
  }
  __syncthreads();
  if (tid < 64) own2[tid] = (red[tid][0] + red[tid][1] + red[tid][2] + red[tid][3]) * sl2;
  __syncthreads();

  const int r0 = 16 * warp;
  float O[NJ][4], mrow[2], lrow[2];
  int crow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + g + 8 * r;
    mrow[r] = own2[row];
    lrow[r] = tq == 0 ? 1.f : 0.f;
    crow[r] = row < m ? (t0 + row) / p.L : 0;
  }
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[j][e] = VT[(r0 + g + 8 * (e >> 1)) * DK + 8 * j + 2 * tq + (e & 1)];
  __syncthreads(); // VT is dead; Ks/Vs take its place

  const int nstates = (t0 + m - 1) / p.L; // states visible to the last row
  const T *krb = (const T *)p.kr + s.b * p.srot[0] + s.chunk0 * p.srot[1] + h * p.srot[2];
  const T *veb = (const T *)p.ve + s.b * p.srot[0] + s.chunk0 * p.srot[1] + h * p.srot[2];
  for (int jb = 0; jb < nstates; jb += 64) {
    const int rows = min(64, nstates - jb);
    load_tile_async<ELEM, 64, DK, RAT_THREADS>(Ks, LD, krb + (i64)jb * p.srot[1], p.srot[1], rows, p.D,
                                               p.vec_rot);
    load_tile_async<ELEM, 64, DK, RAT_THREADS>(Vs, LD, veb + (i64)jb * p.srot[1], p.srot[1], rows, p.D,
                                               p.vec_rot);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    float S[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) S[j][0] = S[j][1] = S[j][2] = S[j][3] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < DK; k0 += KS) {
      u32 a[4], bf[2];
      F::A_mk(a, Qs, LD, r0, k0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        F::B_nk(bf, Ks, LD, k0, 8 * j);
        mma<ELEM>(S[j], a, bf);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = jb + 8 * j + 2 * tq + cc;
          float v = col < crow[r] ? S[j][2 * r + cc] * sl2 : NEG_INF;
          S[j][2 * r + cc] = v;
          mx = fmaxf(mx, v);
        }
      mx = quad_max(mx);
      const float mnew = fmaxf(mrow[r], mx);
      const float alpha = (mnew == mrow[r]) ? 1.f : fast_exp2(mrow[r] - mnew);
      mrow[r] = mnew;
      lrow[r] *= alpha;
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        O[j][2 * r] *= alpha;
        O[j][2 * r + 1] *= alpha;
      }
      float ls = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const float v = S[j][2 * r + cc];
          const float pr = v == NEG_INF ? 0.f : fast_exp2(v - mnew);
          S[j][2 * r + cc] = pr;
          ls += pr;
        }
      lrow[r] += ls;
    }
#pragma unroll
    for (int kk = 0; kk < 64 / KS; ++kk) {
      u32 a[4], bf[2];
      F::A_from_acc(a, S, kk);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        F::B_kn(bf, Vs, LD, kk * KS, 8 * j);
        mma<ELEM>(O[j], a, bf);
      }
    }
    __syncthreads();
  }
  // Write y and the lse.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l = quad_sum(l);
    const int row = r0 + g + 8 * r;
    if (row < m) {
      const i64 tok = s.start + t0 + row;
      const float inv = 1.f / l;
      const i64 oo = s.b * p.so[0] + tok * p.so[1] + h * p.so[2];
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          if (col < p.D) st_split<ELEM>(p.out, p.out_lo, oo + col, O[j][2 * r + cc] * inv);
        }
      if (tq == 0) p.lse[s.b * p.slse[0] + tok * p.slse[1] + h * p.slse[2]] = (mrow[r] + __log2f(l)) * LN2;
    }
  }
}

// ------------------------------------------------------------------------------- Δ
template <int ELEM> __device__ void delta_impl(const RatParams &p) {
  const i64 rowid = (i64)blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const i64 rows = (i64)gridDim.y * p.T * p.H; // gridDim.y = B
  (void)rows;
  const int b = blockIdx.y;
  if (rowid >= (i64)p.T * p.H) return;
  const i64 t = rowid / p.H, h = rowid % p.H;
  typedef typename Elem<ELEM>::T T;
  const i64 oy = b * p.so[0] + t * p.so[1] + h * p.so[2];
  const i64 od = b * p.sdo[0] + t * p.sdo[1] + h * p.sdo[2];
  // y + y_lo when the forward kept y's rounding residual: Δ then carries the unrounded output
  const T *y_lo = p.out_lo != nullptr ? (const T *)p.out_lo + oy : nullptr;
  const float acc = row_delta<ELEM>((const T *)p.out + oy, y_lo, (const T *)p.dout + od, p.D);
  if (lane == 0) p.delta[((i64)b * p.T + t) * p.H + h] = acc;
}

// ------------------------------------------------------------------------------- dK~, dV~
template <int ELEM, int DK> __device__ void bwd_kv_impl(const RatParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, LD = DK + Elem<ELEM>::PAD, NJ = DK / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Ks = reinterpret_cast<T *>(smem_raw);
  T *Vs = Ks + 64 * LD, *Qs = Vs + 64 * LD, *dYs = Qs + 64 * LD;
  __shared__ float lse2[64], dlt[64];
  __shared__ int crow[64];
  __shared__ double ths[128]; // θ per RoPE pair

  const int x = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const Seq s = seq_of(p, n);
  const int nc = (s.len + p.L - 1) / p.L;
  const int j0 = 64 * x;
  if (j0 >= nc - 1) return; // nothing attends these states
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int Dh = (p.D + 1) / 2;
  const float sl2 = p.scale * LOG2E;
  const int nrows = min(64, nc - j0);
  const T *krb = (const T *)p.kr + s.b * p.srot[0] + (s.chunk0 + j0) * p.srot[1] + h * p.srot[2];
  const T *veb = (const T *)p.ve + s.b * p.srot[0] + (s.chunk0 + j0) * p.srot[1] + h * p.srot[2];
  load_tile_async<ELEM, 64, DK, RAT_THREADS>(Ks, LD, krb, p.srot[1], nrows, p.D, p.vec_rot);
  load_tile_async<ELEM, 64, DK, RAT_THREADS>(Vs, LD, veb, p.srot[1], nrows, p.D, p.vec_rot);
  cp_async_commit();
  if (tid < Dh) ths[tid] = theta_of(p, tid); // read after the first __syncthreads below
  const int i = tid, ch0 = i, ch1 = i + Dh;
  const bool act = i < Dh, has1 = act && ch1 < p.D;
  const double th = theta_of(p, i);
  const int r0 = 16 * warp;
  float dK[NJ][4], dV[NJ][4];
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[j][e] = dV[j][e] = 0.f;
  const T *dob = (const T *)p.dout + s.b * p.sdo[0] + s.start * p.sdo[1] + h * p.sdo[2];
  const T *qb = (const T *)p.q + s.b * p.sq[0] + s.start * p.sq[1] + h * p.sq[2];
  for (int tb = (j0 + 1) * p.L; tb < s.len; tb += 64) {
    const int m = min(64, s.len - tb);
    // Raw q and dy tiles (rows >= m and columns >= D zero-filled), all loads in flight at once.
    load_tile_async<ELEM, 64, DK, RAT_THREADS>(Qs, LD, qb + (i64)tb * p.sq[1], p.sq[1], m, p.D, p.vec_q);
    load_tile_async<ELEM, 64, DK, RAT_THREADS>(dYs, LD, dob + (i64)tb * p.sdo[1], p.sdo[1], m, p.D, p.vec_do);
    cp_async_commit();
    if (tid < 64) {
      const int l = tid;
      if (l < m) {
        const i64 tok = s.start + tb + l;
        lse2[l] = p.lse[s.b * p.slse[0] + tok * p.slse[1] + h * p.slse[2]] * LOG2E;
        dlt[l] = p.delta[((i64)s.b * p.T + tok) * p.H + h];
        crow[l] = (tb + l) / p.L;
      } else {
        lse2[l] = 0.f;
        dlt[l] = 0.f;
        crow[l] = -1;
      }
    }
    cp_async_wait<0>();
    __syncthreads();
    // Rotate q in place: item (row l, pair i) is read and written by one thread only.
    if (p.rope) {
      for (int e = tid; e < 64 * Dh; e += RAT_THREADS) {
        const int l = e / Dh, pi = e % Dh, c1 = pi + Dh;
        if (l < m) {
          const float q0 = load_f32<ELEM>(Qs + l * LD + pi);
          const float q1 = c1 < p.D ? load_f32<ELEM>(Qs + l * LD + c1) : 0.f;
          float co, si;
          cs_of(ths[pi], (tb + l) / p.L, co, si);
          Qs[l * LD + pi] = from_f32<ELEM>(q0 * co - q1 * si);
          if (c1 < p.D) Qs[l * LD + c1] = from_f32<ELEM>(q1 * co + q0 * si);
        }
      }
      __syncthreads();
    }
    float P[8][4], dP[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) P[j][e] = dP[j][e] = 0.f;
#pragma unroll
    for (int k0 = 0; k0 < DK; k0 += KS) {
      u32 a[4], av[4], bf[2];
      F::A_mk(a, Ks, LD, r0, k0);
      F::A_mk(av, Vs, LD, r0, k0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        F::B_nk(bf, Qs, LD, k0, 8 * j);
        mma<ELEM>(P[j], a, bf);
        F::B_nk(bf, dYs, LD, k0, 8 * j);
        mma<ELEM>(dP[j], av, bf);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int js = j0 + r0 + g + 8 * r;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = 8 * j + 2 * tq + cc;
          const bool ok = js < crow[col];
          const float pr = ok ? fast_exp2(P[j][2 * r + cc] * sl2 - lse2[col]) : 0.f;
          P[j][2 * r + cc] = pr;
          dP[j][2 * r + cc] = ok ? pr * (dP[j][2 * r + cc] - dlt[col]) : 0.f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < 64 / KS; ++kk) {
      u32 a[4], ad[4], bf[2];
      F::A_from_acc(a, P, kk);
      F::A_from_acc(ad, dP, kk);
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        F::B_kn(bf, dYs, LD, kk * KS, 8 * j);
        mma<ELEM>(dV[j], a, bf);
        F::B_kn(bf, Qs, LD, kk * KS, 8 * j);
        mma<ELEM>(dK[j], ad, bf);
      }
    }
    __syncthreads();
  }
  // Stash to shared memory as float32 (Qs/dYs region for dK, Ks/Vs for dV), un-rotate, write.
  float *FK = reinterpret_cast<float *>(Qs), *FV = reinterpret_cast<float *>(Ks);
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = r0 + g + 8 * (e >> 1), col = 8 * j + 2 * tq + (e & 1);
      FK[row * DK + col] = dK[j][e] * p.scale;
      FV[row * DK + col] = dV[j][e];
    }
  __syncthreads();
  if (act) {
    for (int l = 0; l < nrows; ++l) {
      const int jj = j0 + l;
      const i64 o = s.b * p.srot[0] + (s.chunk0 + jj) * p.srot[1] + h * p.srot[2];
      const float x0 = FK[l * DK + ch0], x1 = has1 ? FK[l * DK + ch1] : 0.f;
      float o0 = x0, o1 = x1;
      if (p.rope) {
        float co, si;
        cs_of(th, jj, co, si);
        o0 = x0 * co + x1 * si;
        o1 = x1 * co - x0 * si;
      }
      p.dks[o + ch0] = o0;
      p.dvs[o + ch0] = FV[l * DK + ch0];
      if (has1) {
        p.dks[o + ch1] = o1;
        p.dvs[o + ch1] = FV[l * DK + ch1];
      }
    }
  }
}

// ------------------------------------------------------------------------------- dq, dk, dv, dg
template <int ELEM, int DK> __device__ void bwd_q_impl(const RatParams &p) {
  typedef typename Elem<ELEM>::T T;
  typedef Frag<ELEM> F;
  constexpr int KS = Elem<ELEM>::KS, LD = DK + Elem<ELEM>::PAD, NJ = DK / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T *Qs = reinterpret_cast<T *>(smem_raw);
  T *dYs = Qs + 64 * LD, *Ks = dYs + 64 * LD, *Vs = Ks + 64 * LD;
  float *F1 = reinterpret_cast<float *>(Qs); // after the key loop: hv [64][DK]
  float *F2 = reinterpret_cast<float *>(Ks); // after the key loop: dq_rot, then hk [64][DK]
  __shared__ float redq[64][4], redv[64][4];
  __shared__ float lse2[64], dlt[64], pst[64], dast[64];
  __shared__ int crow[64];

  const int x = blockIdx.x, h = blockIdx.y, n = blockIdx.z;
  const Seq s = seq_of(p, n);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tq = lane & 3;
  const int Dh = (p.D + 1) / 2;
  const float sl2 = p.scale * LOG2E;
  const int i = tid, ch0 = i, ch1 = i + Dh;
  const bool act = i < Dh, has1 = act && ch1 < p.D;
  const double th = theta_of(p, i);
  const int nc = (s.len + p.L - 1) / p.L;
  // Tiles of this CTA, processed last to first.
  int xfirst, xlast;
  if (p.L <= 64) {
    xfirst = xlast = x;
  } else {
    if (x >= nc) return;
    xfirst = x * p.TPC;
    xlast = xfirst + (min(p.L, s.len - x * p.L) + 63) / 64 - 1;
  }
  {
    int t0, m;
    tile_of(p, s, xlast, t0, m);
    if (m <= 0) return;
  }
  float lk0 = 0.f, lk1 = 0.f, lv0 = 0.f, lv1 = 0.f, gn0 = 0.f, gn1 = 0.f; // reverse-scan carry
  const T *krb = (const T *)p.kr + s.b * p.srot[0] + s.chunk0 * p.srot[1] + h * p.srot[2];
  const T *veb = (const T *)p.ve + s.b * p.srot[0] + s.chunk0 * p.srot[1] + h * p.srot[2];
  for (int xt = xlast; xt >= xfirst; --xt) {
    int t0, m;
    tile_of(p, s, xt, t0, m);
    float ck0 = 0.f, ck1 = 0.f, cv0 = 0.f, cv1 = 0.f; // scan state entering the tile
    if (p.L > 64 && (xt % p.TPC) != 0 && act) {
      const i64 o = (i64)s.b * p.scar[0] + (s.chunk0 * p.TPC + xt) * p.scar[1] + (i64)h * p.scar[2];
      ck0 = p.carry_k[o + ch0];
      cv0 = p.carry_v[o + ch0];
      if (has1) {
        ck1 = p.carry_k[o + ch1];
        cv1 = p.carry_v[o + ch1];
      }
    }
    // Phase 1: raw q and dy tiles to Qs and dYs (rows >= m and columns >= D zero-filled, all
    // loads in flight at once), then the scan (g, k, v of RAT_U rows loaded ahead of use), the
    // own-state dot products, q rotated in place (each element by its own thread).
    {
      const i64 trow = s.start + t0;
      load_tile_async<ELEM, 64, DK, RAT_THREADS>(
          Qs, LD, (const T *)p.q + s.b * p.sq[0] + trow * p.sq[1] + h * p.sq[2], p.sq[1], m, p.D, p.vec_q);
      load_tile_async<ELEM, 64, DK, RAT_THREADS>(
          dYs, LD, (const T *)p.dout + s.b * p.sdo[0] + trow * p.sdo[1] + h * p.sdo[2], p.sdo[1], m, p.D,
          p.vec_do);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float k0 = ck0, k1 = ck1, v0 = cv0, v1 = cv1;
      for (int lb = 0; lb < 64; lb += RAT_U) {
        float G0[RAT_U], G1[RAT_U], XK0[RAT_U], XK1[RAT_U], XV0[RAT_U], XV1[RAT_U];
        load_scan_rows<ELEM>(p, s, h, t0, lb, m, act, ch0, ch1, has1, G0, G1, XK0, XK1, XV0, XV1);
#pragma unroll
        for (int u = 0; u < RAT_U; ++u) {
          const int l = lb + u;
          float pq = 0.f, pv = 0.f;
          if (l < m && act) {
            const int pos = t0 + l;
            if (pos % p.L == 0) k0 = k1 = v0 = v1 = 0.f;
            const float g0 = G0[u];
            k0 = g0 * k0 + (1.f - g0) * XK0[u];
            v0 = g0 * v0 + (1.f - g0) * XV0[u];
            const float q0 = load_f32<ELEM>(Qs + l * LD + ch0), y0 = load_f32<ELEM>(dYs + l * LD + ch0);
            float q1 = 0.f, y1 = 0.f;
            if (has1) {
              const float g1 = G1[u];
              k1 = g1 * k1 + (1.f - g1) * XK1[u];
              v1 = g1 * v1 + (1.f - g1) * XV1[u];
              q1 = load_f32<ELEM>(Qs + l * LD + ch1);
              y1 = load_f32<ELEM>(dYs + l * LD + ch1);
            }
            pq = q0 * k0 + (has1 ? q1 * k1 : 0.f);
            pv = y0 * v0 + (has1 ? y1 * v1 : 0.f);
            if (p.rope) {
              float co, si;
              cs_of(th, pos / p.L, co, si);
              Qs[l * LD + ch0] = from_f32<ELEM>(q0 * co - q1 * si);
              if (has1) Qs[l * LD + ch1] = from_f32<ELEM>(q1 * co + q0 * si);
            }
          }
          pq = warp_sum(pq);
          pv = warp_sum(pv);
          if (lane == 0) {
            redq[l][warp] = pq;
            redv[l][warp] = pv;
          }
        }
      }
    }
    __syncthreads();
    if (tid < 64) {
      const int l = tid;
      if (l < m) {
        const i64 tok = s.start + t0 + l;
        const float L2 = p.lse[s.b * p.slse[0] + tok * p.slse[1] + h * p.slse[2]] * LOG2E;
        const float dl = p.delta[((i64)s.b * p.T + tok) * p.H + h];
        const float own = (redq[l][0] + redq[l][1] + redq[l][2] + redq[l][3]) * sl2;
        const float dyv = redv[l][0] + redv[l][1] + redv[l][2] + redv[l][3];
        // Chunk 0 (no earlier state): the own state is the only softmax term, so P_own = 1 and
        // dA_own = 0 exactly (dy·v~ − Δ with Δ from the rounded y is not exactly 0).
        const bool c0 = (t0 + l) / p.L == 0;
        const float ps = c0 ? 1.f : fast_exp2(own - L2);
        lse2[l] = L2;
        dlt[l] = dl;
        pst[l] = ps;
        dast[l] = c0 ? 0.f : ps * (dyv - dl);
        crow[l] = (t0 + l) / p.L;
      } else {
        lse2[l] = dlt[l] = pst[l] = dast[l] = 0.f;
        crow[l] = 0;
      }
    }
    __syncthreads();
    // Phase 2: dq_rot = s Σ_j dA_tj K~_j over the earlier chunk states.
    const int r0 = 16 * warp;
    float dQ[NJ][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) dQ[j][0] = dQ[j][1] = dQ[j][2] = dQ[j][3] = 0.f;
    const int nstates = (t0 + m - 1) / p.L;
    for (int jb = 0; jb < nstates; jb += 64) {
      const int rows = min(64, nstates - jb);
      load_tile_async<ELEM, 64, DK, RAT_THREADS>(Ks, LD, krb + (i64)jb * p.srot[1], p.srot[1], rows, p.D,
                                                 p.vec_rot);
      load_tile_async<ELEM, 64, DK, RAT_THREADS>(Vs, LD, veb + (i64)jb * p.srot[1], p.srot[1], rows, p.D,
                                                 p.vec_rot);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      float S[8][4], dP[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[j][e] = dP[j][e] = 0.f;
#pragma unroll
      for (int k0 = 0; k0 < DK; k0 += KS) {
        u32 a[4], ay[4], bf[2];
        F::A_mk(a, Qs, LD, r0, k0);
        F::A_mk(ay, dYs, LD, r0, k0);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          F::B_nk(bf, Ks, LD, k0, 8 * j);
          mma<ELEM>(S[j], a, bf);
          F::B_nk(bf, Vs, LD, k0, 8 * j);
          mma<ELEM>(dP[j], ay, bf);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = r0 + g + 8 * r;
        const int cr = row < m ? crow[row] : 0;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            const int col = jb + 8 * j + 2 * tq + cc;
            const bool ok = col < cr;
            const float pr = ok ? fast_exp2(S[j][2 * r + cc] * sl2 - lse2[row]) : 0.f;
            S[j][2 * r + cc] = ok ? pr * (dP[j][2 * r + cc] - dlt[row]) : 0.f;
          }
      }
#pragma unroll
      for (int kk = 0; kk < 64 / KS; ++kk) {
        u32 a[4], bf[2];
        F::A_from_acc(a, S, kk);
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
          F::B_kn(bf, Ks, LD, kk * KS, 8 * j);
          mma<ELEM>(dQ[j], a, bf);
        }
      }
      __syncthreads();
    }
    // Phase 2b: dq_rot (scaled) to F2, un-rotated in place.
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        F2[(r0 + g + 8 * (e >> 1)) * DK + 8 * j + 2 * tq + (e & 1)] = dQ[j][e] * p.scale;
    __syncthreads();
    // Phase 3: un-rotate, rescan, write dq; keep hk (F2) and hv (F1) per token.
    if (act) {
      float k0 = ck0, k1 = ck1, v0 = cv0, v1 = cv1;
      for (int l = 0; l < m; ++l) {
        const int pos = t0 + l;
        if (pos % p.L == 0) k0 = k1 = v0 = v1 = 0.f;
        const i64 tok = s.start + pos;
        const i64 og = s.b * p.sg[0] + tok * p.sg[1] + h * p.sg[2];
        const i64 ok = s.b * p.sk[0] + tok * p.sk[1] + h * p.sk[2];
        const i64 ov = s.b * p.sv[0] + tok * p.sv[1] + h * p.sv[2];
        const float g0 = ld_g(p, og + ch0);
        k0 = g0 * k0 + (1.f - g0) * ld<ELEM>(p.k, ok + ch0);
        v0 = g0 * v0 + (1.f - g0) * ld<ELEM>(p.v, ov + ch0);
        if (has1) {
          const float g1 = ld_g(p, og + ch1);
          k1 = g1 * k1 + (1.f - g1) * ld<ELEM>(p.k, ok + ch1);
          v1 = g1 * v1 + (1.f - g1) * ld<ELEM>(p.v, ov + ch1);
        }
        const float x0 = F2[l * DK + ch0], x1 = has1 ? F2[l * DK + ch1] : 0.f;
        float o0 = x0, o1 = x1;
        if (p.rope) {
          float co, si;
          cs_of(th, pos / p.L, co, si);
          o0 = x0 * co + x1 * si;
          o1 = x1 * co - x0 * si;
        }
        const float da = p.scale * dast[l];
        const i64 oq = s.b * p.sdq[0] + tok * p.sdq[1] + h * p.sdq[2];
        st<ELEM>(p.dq, oq + ch0, o0 + da * k0);
        F2[l * DK + ch0] = k0;
        F1[l * DK + ch0] = v0;
        if (has1) {
          st<ELEM>(p.dq, oq + ch1, o1 + da * k1);
          F2[l * DK + ch1] = k1;
          F1[l * DK + ch1] = v1;
        }
      }
      // Phase 4: reverse scan.
      for (int l = m - 1; l >= 0; --l) {
        const int pos = t0 + l;
        const int c = pos / p.L;
        if (pos % p.L == p.L - 1 || pos == s.len - 1) gn0 = gn1 = 0.f; // chunk end: no successor
        const i64 tok = s.start + pos;
        const i64 og = s.b * p.sg[0] + tok * p.sg[1] + h * p.sg[2];
        const i64 ok = s.b * p.sk[0] + tok * p.sk[1] + h * p.sk[2];
        const i64 ov = s.b * p.sv[0] + tok * p.sv[1] + h * p.sv[2];
        const i64 oq = s.b * p.sq[0] + tok * p.sq[1] + h * p.sq[2];
        const i64 od = s.b * p.sdo[0] + tok * p.sdo[1] + h * p.sdo[2];
        const float da = p.scale * dast[l], ps = pst[l];
        lk0 = gn0 * lk0 + da * ld<ELEM>(p.q, oq + ch0);
        lv0 = gn0 * lv0 + ps * ld<ELEM>(p.dout, od + ch0);
        if (has1) {
          lk1 = gn1 * lk1 + da * ld<ELEM>(p.q, oq + ch1);
          lv1 = gn1 * lv1 + ps * ld<ELEM>(p.dout, od + ch1);
        }
        if (pos % p.L == p.L - 1 && c < nc - 1) {
          const i64 o = s.b * p.srot[0] + (s.chunk0 + c) * p.srot[1] + h * p.srot[2];
          lk0 += p.dks[o + ch0];
          lv0 += p.dvs[o + ch0];
          if (has1) {
            lk1 += p.dks[o + ch1];
            lv1 += p.dvs[o + ch1];
          }
        }
        const bool first = pos % p.L == 0;
        const float hk0 = first ? 0.f : (l > 0 ? F2[(l - 1) * DK + ch0] : ck0);
        const float hv0 = first ? 0.f : (l > 0 ? F1[(l - 1) * DK + ch0] : cv0);
        const float g0 = ld_g(p, og + ch0);
        const float xk0 = ld<ELEM>(p.k, ok + ch0), xv0 = ld<ELEM>(p.v, ov + ch0);
        const i64 odk = s.b * p.sdk[0] + tok * p.sdk[1] + h * p.sdk[2];
        const i64 odv = s.b * p.sdv[0] + tok * p.sdv[1] + h * p.sdv[2];
        const i64 odg = s.b * p.sdg[0] + tok * p.sdg[1] + h * p.sdg[2];
        st<ELEM>(p.dk, odk + ch0, (1.f - g0) * lk0);
        st<ELEM>(p.dv, odv + ch0, (1.f - g0) * lv0);
        const float dg0 = lk0 * (hk0 - xk0) + lv0 * (hv0 - xv0);
        if (p.g_f32) ((float *)p.dg)[odg + ch0] = dg0; else st<ELEM>(p.dg, odg + ch0, dg0);
        gn0 = g0;
        if (has1) {
          const float hk1 = first ? 0.f : (l > 0 ? F2[(l - 1) * DK + ch1] : ck1);
          const float hv1 = first ? 0.f : (l > 0 ? F1[(l - 1) * DK + ch1] : cv1);
          const float g1 = ld_g(p, og + ch1);
          const float xk1 = ld<ELEM>(p.k, ok + ch1), xv1 = ld<ELEM>(p.v, ov + ch1);
          st<ELEM>(p.dk, odk + ch1, (1.f - g1) * lk1);
          st<ELEM>(p.dv, odv + ch1, (1.f - g1) * lv1);
          const float dg1 = lk1 * (hk1 - xk1) + lv1 * (hv1 - xv1);
          if (p.g_f32) ((float *)p.dg)[odg + ch1] = dg1; else st<ELEM>(p.dg, odg + ch1, dg1);
          gn1 = g1;
        }
      }
    }
    __syncthreads(); // shared memory is reused by the previous tile
  }
}

// ------------------------------------------------------------------------------- decode
// One new token per sequence continuing from a RATCache (python/longattn/nn/rat.py). The cached
// chunk-final states are stored already rotated by their chunk index, in the input dtype; the
// running state of the current chunk is float32 and is updated in place.
//   rat_decode          per (split, head, sequence): split s takes the states
//                       [s·split_len, min(C, (s + 1)·split_len)); split 0 also owns the running
//                       state: the gated update, the own softmax term and, when the token ends
//                       its chunk, the rotated final state appended at slot C (never read here).
//                       With one split it writes y, otherwise its partial (O, m, l).
//   rat_decode_combine  per (head, sequence): merges the partials by log-sum-exp into y.
// States are read as 16-byte vectors: a row group of LPR = DK / V lanes holds one state row
// (V elements per lane), so a warp reads 32 / LPR rows at once.
struct RatDecodeParams {
  const void *q, *k, *v, *g; // [B, 1, H, D]
  void *out;                 // [B, 1, H, D]
  float *k_run, *v_run;      // [B, H, D] float32
  void *ks, *vs;             // [B, H, capacity, D] rotated chunk-final states, input dtype
  float *partial;            // [B, H, S, D + 2] contiguous (O, m, l) when S > 1
  i64 sq[2], sk[2], sv[2], sg[2], so[2]; // (batch, head) strides
  i64 skr[2], svr[2];                    // (batch, head) strides of k_run, v_run
  i64 sks[3], svs[3];                    // (batch, head, chunk) strides of ks, vs
  double log2_base;
  int rope, H, D;
  int chunks;    // C: completed chunks, the chunk index of the new token
  int fresh;     // the token starts its chunk (the running state is taken as 0)
  int completes; // the token ends its chunk (its state goes to slot C)
  int g_f32;
  int vec;       // every ks, vs row starts 16-byte aligned
  int splits;    // S
  int split_len; // states per split
  float scale;
};
CHECK_MIRROR(RatDecodeParams);

// V = 16 / sizeof(T) elements of 16 bytes as floats (element 0 at the lowest address).
template <int ELEM> struct Vec16 {
  static constexpr int V = 8;
  static __device__ __forceinline__ void unpack(const uint4 &u, float *x) {
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = lo_f32<ELEM>(w[i]);
      x[2 * i + 1] = hi_f32<ELEM>(w[i]);
    }
  }
};
template <> struct Vec16<ELEM_F32> {
  static constexpr int V = 4;
  static __device__ __forceinline__ void unpack(const uint4 &u, float *x) {
    x[0] = __uint_as_float(u.x);
    x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z);
    x[3] = __uint_as_float(u.w);
  }
};

// Columns [col, col + V) of a row, zero past D; one 16-byte load when `vec` and the group is whole.
template <int ELEM>
__device__ __forceinline__ uint4 load_row16(const typename Elem<ELEM>::T *row, int col, int D, bool vec) {
  typedef typename Elem<ELEM>::T T;
  constexpr int V = Vec16<ELEM>::V;
  if (vec && col + V <= D) return __ldg(reinterpret_cast<const uint4 *>(row + col));
  union {
    uint4 u;
    T e[V];
  } r;
#pragma unroll
  for (int j = 0; j < V; ++j) r.e[j] = col + j < D ? row[col + j] : T(0);
  return r.u;
}

template <int ELEM, int DK> __device__ void decode_impl(const RatDecodeParams &p) {
  typedef typename Elem<ELEM>::T T;
  constexpr int V = Vec16<ELEM>::V, LPR = DK / V, RPW = 32 / LPR, NW = RAT_THREADS / 32;
  constexpr int NG = NW * RPW; // row groups of the CTA
  constexpr int U = 4;         // rows per group whose loads are in flight together
  static_assert(LPR >= 2 && LPR <= 32 && 32 % LPR == 0, "a state row must tile part of a warp");
  __shared__ float qs[DK], vown[DK], red[NW];
  __shared__ float gm[NG], gl[NG], gO[NG * DK];
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool own = split == 0;
  const float sl2 = p.scale * LOG2E;

  // Thread i takes the channel pair (i, i + Dh): q rotated by the token's chunk C; on split 0
  // the running-state update, the own logit (un-rotated q·k~: both would turn by the same
  // angle) and the appended state.
  {
    const int Dh = (p.D + 1) / 2, ch0 = tid, ch1 = tid + Dh;
    const bool act = tid < Dh, has1 = act && ch1 < p.D;
    float q[2] = {0.f, 0.f}, co = 1.f, si = 0.f;
    if (act) {
      const i64 oq = b * p.sq[0] + h * p.sq[1];
      q[0] = ld<ELEM>(p.q, oq + ch0);
      if (has1) q[1] = ld<ELEM>(p.q, oq + ch1);
      if (p.rope) {
        cs_of(theta_of(p, tid), p.chunks, co, si);
        qs[ch0] = q[0] * co - q[1] * si;
        qs[ch1] = q[1] * co + q[0] * si; // RoPE needs an even D: has1
      } else {
        qs[ch0] = q[0];
        if (has1) qs[ch1] = q[1];
      }
    }
    for (int d = p.D + tid; d < DK; d += RAT_THREADS) qs[d] = vown[d] = 0.f;
    float part = 0.f;
    if (own && act) {
      const i64 og = b * p.sg[0] + h * p.sg[1], ok = b * p.sk[0] + h * p.sk[1];
      const i64 ov = b * p.sv[0] + h * p.sv[1];
      const i64 okr = b * p.skr[0] + h * p.skr[1], ovr = b * p.svr[0] + h * p.svr[1];
      float kn[2] = {0.f, 0.f}, vn[2] = {0.f, 0.f};
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ch = e ? ch1 : ch0;
        if (e == 1 && !has1) continue;
        const float gg = ld_g(p, og + ch);
        const float kp = p.fresh ? 0.f : p.k_run[okr + ch];
        const float vp = p.fresh ? 0.f : p.v_run[ovr + ch];
        kn[e] = gg * kp + (1.f - gg) * ld<ELEM>(p.k, ok + ch);
        vn[e] = gg * vp + (1.f - gg) * ld<ELEM>(p.v, ov + ch);
        p.k_run[okr + ch] = kn[e];
        p.v_run[ovr + ch] = vn[e];
        vown[ch] = vn[e];
        part += q[e] * kn[e];
      }
      if (p.completes) {
        const i64 oks = b * p.sks[0] + h * p.sks[1] + (i64)p.chunks * p.sks[2];
        const i64 ovs = b * p.svs[0] + h * p.svs[1] + (i64)p.chunks * p.svs[2];
        if (p.rope) {
          st<ELEM>(p.ks, oks + ch0, kn[0] * co - kn[1] * si);
          st<ELEM>(p.ks, oks + ch1, kn[1] * co + kn[0] * si);
        } else {
          st<ELEM>(p.ks, oks + ch0, kn[0]);
          if (has1) st<ELEM>(p.ks, oks + ch1, kn[1]);
        }
        st<ELEM>(p.vs, ovs + ch0, vn[0]);
        if (has1) st<ELEM>(p.vs, ovs + ch1, vn[1]);
      }
    }
    part = warp_sum(part);
    if (lane == 0) red[warp] = part;
  }
  __syncthreads();

  // Online softmax of this split's states, per row group (all its lanes hold the same m, l).
  const int lo = split * p.split_len, hi = min(p.chunks, lo + p.split_len);
  const int col = (lane % LPR) * V, gid = warp * RPW + lane / LPR;
  float qv[V], O[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    qv[e] = qs[col + e];
    O[e] = 0.f;
  }
  float m = NEG_INF, l = 0.f;
  const T *kb = (const T *)p.ks + b * p.sks[0] + h * p.sks[1];
  const T *vb = (const T *)p.vs + b * p.svs[0] + h * p.svs[1];
  for (int j0 = lo; j0 < hi; j0 += NG * U) { // uniform over the CTA: the shuffles see every lane
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * NG + gid;
      if (j < hi) {
        kr[u] = load_row16<ELEM>(kb + (i64)j * p.sks[2], col, p.D, p.vec);
        vr[u] = load_row16<ELEM>(vb + (i64)j * p.svs[2], col, p.D, p.vec);
      } else {
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    float sc[U], mx = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float x[V];
      Vec16<ELEM>::unpack(kr[u], x);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e) dot += qv[e] * x[e];
#pragma unroll
      for (int o = LPR / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
      sc[u] = j0 + u * NG + gid < hi ? dot * sl2 : NEG_INF;
      mx = fmaxf(mx, sc[u]);
    }
    const float alpha = mx == m ? 1.f : fast_exp2(m - mx);
    m = mx;
    l *= alpha;
#pragma unroll
    for (int e = 0; e < V; ++e) O[e] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float pr = sc[u] == NEG_INF ? 0.f : fast_exp2(sc[u] - m);
      float x[V];
      Vec16<ELEM>::unpack(vr[u], x);
      l += pr;
#pragma unroll
      for (int e = 0; e < V; ++e) O[e] += pr * x[e];
    }
  }

  // Merge the row groups (and the own term on split 0) through shared memory.
  if (lane % LPR == 0) {
    gm[gid] = m;
    gl[gid] = l;
  }
#pragma unroll
  for (int e = 0; e < V; ++e) gO[gid * DK + col + e] = O[e];
  __syncthreads();
  float own_logit = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) own_logit += red[w];
  own_logit *= sl2;
  float mt = own ? own_logit : NEG_INF;
  for (int gi = 0; gi < NG; ++gi) mt = fmaxf(mt, gm[gi]);
  __syncthreads(); // every thread has read gm: it now becomes the group weight
  if (tid < NG) gm[tid] = gm[tid] == NEG_INF ? 0.f : fast_exp2(gm[tid] - mt);
  __syncthreads();
  const float w_own = own ? fast_exp2(own_logit - mt) : 0.f;
  float lt = w_own;
  for (int gi = 0; gi < NG; ++gi) lt += gm[gi] * gl[gi];
  float *part = p.splits > 1 ? p.partial + (((i64)b * p.H + h) * p.splits + split) * (p.D + 2) : nullptr;
  for (int d = tid; d < p.D; d += RAT_THREADS) {
    float o = own ? w_own * vown[d] : 0.f;
    for (int gi = 0; gi < NG; ++gi) o += gm[gi] * gO[gi * DK + d];
    if (p.splits == 1) {
      st<ELEM>(p.out, b * p.so[0] + h * p.so[1] + d, o / lt);
    } else {
      part[d] = o;
    }
  }
  if (p.splits > 1 && tid == 0) {
    part[p.D] = mt;
    part[p.D + 1] = lt;
  }
}

template <int ELEM> __device__ void decode_combine_impl(const RatDecodeParams &p) {
  const int h = blockIdx.x, b = blockIdx.y, W = p.D + 2;
  const float *part = p.partial + ((i64)b * p.H + h) * p.splits * W;
  float mt = NEG_INF;
  for (int s = 0; s < p.splits; ++s) mt = fmaxf(mt, part[s * W + p.D]);
  float lt = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float ms = part[s * W + p.D];
    if (ms != NEG_INF) lt += fast_exp2(ms - mt) * part[s * W + p.D + 1];
  }
  for (int d = threadIdx.x; d < p.D; d += RAT_THREADS) {
    float o = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const float ms = part[s * W + p.D];
      if (ms != NEG_INF) o += fast_exp2(ms - mt) * part[s * W + d];
    }
    st<ELEM>(p.out, b * p.so[0] + h * p.so[1] + d, o / lt);
  }
}

extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_states(const RatParams p) {
  states_impl<RAT_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_fwd(const RatParams p) {
  fwd_impl<RAT_ELEM, RAT_DK>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_delta(const RatParams p) {
  delta_impl<RAT_ELEM>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_bwd_kv(const RatParams p) {
  bwd_kv_impl<RAT_ELEM, RAT_DK>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_bwd_q(const RatParams p) {
  bwd_q_impl<RAT_ELEM, RAT_DK>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_decode(const RatDecodeParams p) {
  decode_impl<RAT_ELEM, RAT_DK>(p);
}
extern "C" __global__ void __launch_bounds__(RAT_THREADS) rat_decode_combine(const RatDecodeParams p) {
  decode_combine_impl<RAT_ELEM>(p);
}
