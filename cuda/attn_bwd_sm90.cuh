// The Hopper attention backward mainloops shared by the softmax-attention families (sm_90a).
//
// Two deterministic kernels (no atomics: every output element has one writer), each a persistent
// grid of three warpgroups like the forward (attn_sm90.cuh): warpgroup 0's leader thread loads a
// FIXED tile once per work tile and STREAMS tiles through an SM90_BWD_STAGES-deep ring (TMA,
// mbarriers: one full and one empty barrier per stage); warpgroups 1 and 2 compute, each on its
// own 64 rows of the fixed tile, so one's row math overlaps the other's GEMMs.
//
//   sm90_attn_dq    fixed: Q, dO (128 query rows); streamed: K, V (64 keys).
//                   S = Q Kᵀ, dP = dO Vᵀ, P, dS = P ∘ (dP − Δ), dQ += dS K.
//   sm90_attn_dkdv  fixed: K, V (128 keys); streamed: Q, dO (64 query rows) and the rows' lse,
//                   Δ and key range (one float32 [4, 64] box of the family's row table).
//                   Sᵀ = K Qᵀ, dPᵀ = V dOᵀ, Pᵀ, dSᵀ, dV += Pᵀ dO, dK += dSᵀ Q.
// Every GEMM is a wgmma; P and dS stay in registers (the accumulator layout of 16 columns is the
// A-operand layout of one k16 step), so nothing goes through shared memory but the TMA tiles.
// The backward's seven GEMMs per key-query tile pair (two more than a fused kernel with atomic
// dQ) buy bitwise-reproducible gradients.
//
// Policy `Fam` (the family's file):
//   Fam::ELEM, DP (padded head dim 64 / 128), Params, Cta
//   int  Fam::work_tiles(p);  Fam::cta(p, tile, c)   (every work tile runs: no skipping)
//   Fam::fixed_coord(c, row, head, batch)            TMA coordinates of the fixed tile
//   int  Fam::first_step(p, c, head), next_step(p, c, pos, head)   the streamed tiles: start
//        row (−1: no more) and, for the key-outer kernel, the query head
//   Fam::stream_coord(c, pos, head, row, hd, batch)  TMA coordinates of a streamed tile
//   int  Fam::rowinfo_plane(c, head)                 dkdv: the row table's plane of (batch, head)
//   dq:   Fam::Rows; Fam::init_rows(p, c, wg, warp, rows); Fam::dq_probs(p, rows, S, dP, k0)
//         (S → P, dP → dS = P ∘ (dP − Δ) in place); Fam::store_dq(p, c, rows, wg, warp, dQ)
//   dkdv: Fam::dkdv_probs(p, c, wg, warp, S, dP, q0, info) (Sᵀ → Pᵀ, dPᵀ → dSᵀ in place; info:
//         the stage's row table box); Fam::store_dkdv(p, c, wg, warp, dK, dV)
#pragma once
#include "sm90.cuh"

// From the launch side (cuda::sm90_common_defines), which sizes the TMA boxes and the row table
// with the same numbers: SM90_BWD_FIXED (rows of the fixed tile, 64 per consumer warpgroup),
// SM90_BWD_STREAM (rows of a streamed tile), SM90_ROWINFO_PLANES (lse·log2(e), Δ and the visible
// key range lo, hi per row).
#define SM90_BWD_STAGES 2
#define SM90_BWD_PRODUCER_REGS 24
#define SM90_BWD_CONSUMER_REGS 240

struct Sm90BwdMaps {
  TmaMap fixed[2];  // dq: q, dout; dkdv: k, v (boxes of SM90_BWD_FIXED rows)
  TmaMap stream[2]; // dq: k, v; dkdv: q, dout (boxes of SM90_BWD_STREAM rows)
  TmaMap rowinfo;   // dkdv: float32 [B·Hq][4][Tp], boxes of 64 × 4 (unused by dq)
};

// Dynamic shared memory: the two fixed tiles, then per stage the two streamed tiles and the row
// table box; the barriers and the stage table last. Tiles are DP / 64 column blocks of rows of
// 128 bytes (TMA's 128-byte swizzle); 1024 bytes of slack align the base.
template <int DP> struct Sm90BwdLayout {
  static constexpr int NCH = DP / 64;
  static constexpr int FIX_BLOCK = SM90_BWD_FIXED * 128, FIX_BYTES = FIX_BLOCK * NCH;
  static constexpr int STR_BLOCK = SM90_BWD_STREAM * 128, STR_BYTES = STR_BLOCK * NCH;
  static constexpr int INFO_BYTES = SM90_ROWINFO_PLANES * SM90_BWD_STREAM * 4;
  static constexpr int STAGE_BYTES = 2 * STR_BYTES + 1024; // the info box, padded to 1024
  static constexpr int STAGE_OFF = 2 * FIX_BYTES;
  static constexpr int BAR_OFF = STAGE_OFF + SM90_BWD_STAGES * STAGE_BYTES;
  static constexpr int BYTES = BAR_OFF + 8 * (2 + 2 * SM90_BWD_STAGES) + 8 * SM90_BWD_STAGES + 1024;
};

template <int DP> struct Sm90BwdSmem {
  typedef Sm90BwdLayout<DP> L;
  unsigned char *base;
  u64 *fix_full, *fix_empty, *full, *empty;
  int *step_pos, *step_head;
  __device__ __forceinline__ Sm90BwdSmem() {
    extern __shared__ unsigned char smem_raw[];
    base = (unsigned char *)(((u64)smem_raw + 1023) & ~(u64)1023);
    fix_full = (u64 *)(base + L::BAR_OFF);
    fix_empty = fix_full + 1;
    full = fix_empty + 1;
    empty = full + SM90_BWD_STAGES;
    step_pos = (int *)(empty + SM90_BWD_STAGES);
    step_head = step_pos + SM90_BWD_STAGES;
  }
  __device__ __forceinline__ unsigned char *fixed(int i) const { return base + i * L::FIX_BYTES; }
  __device__ __forceinline__ unsigned char *stream(int s, int i) const {
    return base + L::STAGE_OFF + s * L::STAGE_BYTES + i * L::STR_BYTES;
  }
  __device__ __forceinline__ const float *info(int s) const {
    return (const float *)(base + L::STAGE_OFF + s * L::STAGE_BYTES + 2 * L::STR_BYTES);
  }
};

// The CTA's round of work tile `tile` (0 for its first): the fixed tile's barrier phase. Every
// work tile goes through the pipeline (one with no streamed tile stores zeros), so rounds need no
// counter of their own.
__device__ __forceinline__ int sm90_bwd_round(int tile) { return (tile - blockIdx.x) / gridDim.x; }

// The producer (one thread) and the barrier set-up, common to both kernels. Every use of a stage,
// the end-of-work-tile sentinel (pos −1) included, completes its full barrier once and waits for
// the consumers' release of the previous use, so the parities stay in step across work tiles.
template <class Fam, bool ROWINFO>
__device__ __forceinline__ void sm90_bwd_produce(const typename Fam::Params &p, const Sm90BwdMaps &maps,
                                                 const Sm90BwdSmem<Fam::DP> &sm) {
  typedef Sm90BwdLayout<Fam::DP> L;
  constexpr int ST = SM90_BWD_STAGES, NCH = L::NCH;
  const int tiles = Fam::work_tiles(p);
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    typename Fam::Cta c;
    Fam::cta(p, tile, c);
    if (tile != blockIdx.x) mbar_wait(sm.fix_empty, (sm90_bwd_round(tile) - 1) & 1);
    int row, head, batch;
    Fam::fixed_coord(c, row, head, batch);
    mbar_arrive_tx(sm.fix_full, 2 * L::FIX_BYTES);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int ch = 0; ch < NCH; ++ch)
        tma_load_4d(sm.fixed(i) + ch * L::FIX_BLOCK, &maps.fixed[i], sm.fix_full, 64 * ch, head, row, batch);
    int hd = 0;
    int pos = Fam::first_step(p, c, hd);
    for (;; ++it) {
      const int s = it % ST;
      if (it >= ST) mbar_wait(&sm.empty[s], ((it / ST) - 1) & 1);
      sm.step_pos[s] = pos;
      sm.step_head[s] = hd;
      if (pos < 0) {
        mbar_arrive(&sm.full[s]);
        break;
      }
      mbar_arrive_tx(&sm.full[s], 2 * L::STR_BYTES + (ROWINFO ? L::INFO_BYTES : 0));
      Fam::stream_coord(c, pos, hd, row, head, batch);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch)
          tma_load_4d(sm.stream(s, i) + ch * L::STR_BLOCK, &maps.stream[i], &sm.full[s], 64 * ch, head,
                      row, batch);
      if constexpr (ROWINFO)
        tma_load_3d((void *)sm.info(s), &maps.rowinfo, &sm.full[s], pos, 0, Fam::rowinfo_plane(c, hd));
      pos = Fam::next_step(p, c, pos, hd);
    }
    ++it; // the sentinel
  }
}

template <int DP> __device__ __forceinline__ void sm90_bwd_init(const Sm90BwdSmem<DP> &sm) {
  if (threadIdx.x == 0) {
    mbar_init(sm.fix_full, 1);
    mbar_init(sm.fix_empty, 2 * 128);
    for (int s = 0; s < SM90_BWD_STAGES; ++s) {
      mbar_init(&sm.full[s], 1);
      mbar_init(&sm.empty[s], 2 * 128);
    }
    fence_barrier_init();
  }
  __syncthreads();
}

// acc (the accumulator of 16·T columns) → the A operand of T k16 steps, 16-bit.
template <int ELEM, int T> __device__ __forceinline__ void sm90_pack_a(const float (*acc)[4], u32 (*a)[4]) {
#pragma unroll
  for (int t = 0; t < T; ++t) {
    a[t][0] = pack2<ELEM>(acc[2 * t][0], acc[2 * t][1]);
    a[t][1] = pack2<ELEM>(acc[2 * t][2], acc[2 * t][3]);
    a[t][2] = pack2<ELEM>(acc[2 * t + 1][0], acc[2 * t + 1][1]);
    a[t][3] = pack2<ELEM>(acc[2 * t + 1][2], acc[2 * t + 1][3]);
  }
}

// C[64 × N] (=|+=) A[64 rows from a_base] · B[N rows from b_base]ᵀ, both K-major over DP columns.
template <int ELEM, int N, int DP, int A_BLOCK, int B_BLOCK>
__device__ __forceinline__ void sm90_gemm_ss(float (*c)[4], u32 a_base, u32 b_base) {
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    const u32 off = (kk & 3) * 32; // 16 elements along K inside a 128-byte row
    Wgmma<ELEM, N>::ss(&c[0][0], sw128_desc(a_base + (kk >> 2) * A_BLOCK + off, 0),
                       sw128_desc(b_base + (kk >> 2) * B_BLOCK + off, 0), kk > 0);
  }
}

// C[64 × DP] += A (registers, K = 16·T) · B (T·16 rows of an MN-major tile at b_base, column
// blocks B_BLOCK bytes apart).
template <int ELEM, int DP, int T, int B_BLOCK>
__device__ __forceinline__ void sm90_gemm_rs(float (*c)[4], const u32 (*a)[4], u32 b_base) {
#pragma unroll
  for (int t = 0; t < T; ++t) Wgmma<ELEM, DP>::rs(&c[0][0], a[t], sw128_desc(b_base + t * 16 * 128, B_BLOCK), 1);
}

template <int N> __device__ __forceinline__ void zero_acc(float (*c)[4]) {
#pragma unroll
  for (int f = 0; f < N / 8; ++f) c[f][0] = c[f][1] = c[f][2] = c[f][3] = 0.f;
}

// ------------------------------------------------------------------------------------ dQ
template <class Fam>
__device__ __forceinline__ void sm90_attn_dq(const typename Fam::Params &p, const Sm90BwdMaps &maps) {
  constexpr int ELEM = Fam::ELEM, DP = Fam::DP, BN = SM90_BWD_STREAM, ST = SM90_BWD_STAGES;
  typedef Sm90BwdLayout<DP> L;
  const Sm90BwdSmem<DP> sm;
  sm90_bwd_init(sm);
  if (threadIdx.x < 128) {
    regs_dec<SM90_BWD_PRODUCER_REGS>();
    if (threadIdx.x == 0) sm90_bwd_produce<Fam, false>(p, maps, sm);
    return;
  }
  regs_inc<SM90_BWD_CONSUMER_REGS>();
  const int tid = threadIdx.x - 128, wg = tid >> 7, warp = (tid >> 5) & 3;
  const u32 q_base = smem_addr(sm.fixed(0)) + wg * 64 * 128, do_base = smem_addr(sm.fixed(1)) + wg * 64 * 128;
  const int tiles = Fam::work_tiles(p);
  float S[BN / 8][4], dP[BN / 8][4], dQ[DP / 8][4];
  u32 dS[BN / 16][4];
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    typename Fam::Cta c;
    Fam::cta(p, tile, c);
    typename Fam::Rows rows;
    Fam::init_rows(p, c, wg, warp, rows);
    zero_acc<DP>(dQ);
    mbar_wait(sm.fix_full, sm90_bwd_round(tile) & 1);
    int prev = -1; // the stage whose dQ GEMM is in flight
    for (;; ++it) {
      const int s = it % ST;
      mbar_wait(&sm.full[s], (it / ST) & 1);
      const int k0 = sm.step_pos[s];
      if (k0 < 0) break;
      wgmma_fence();
      sm90_gemm_ss<ELEM, BN, DP, L::FIX_BLOCK, L::STR_BLOCK>(S, q_base, smem_addr(sm.stream(s, 0)));
      wgmma_commit();
      sm90_gemm_ss<ELEM, BN, DP, L::FIX_BLOCK, L::STR_BLOCK>(dP, do_base, smem_addr(sm.stream(s, 1)));
      wgmma_commit();
      wgmma_wait<0>(); // the previous dQ GEMM, S and dP
      fence_regs<BN / 2>(&S[0][0]);
      fence_regs<BN / 2>(&dP[0][0]);
      fence_regs<DP / 2>(&dQ[0][0]);
      if (prev >= 0) mbar_arrive(&sm.empty[prev]);
      Fam::dq_probs(p, rows, S, dP, k0);
      sm90_pack_a<ELEM, BN / 16>(dP, dS);
      wgmma_fence();
      sm90_gemm_rs<ELEM, DP, BN / 16, L::STR_BLOCK>(dQ, dS, smem_addr(sm.stream(s, 0)));
      wgmma_commit();
      prev = s;
    }
    wgmma_wait<0>();
    fence_regs<DP / 2>(&dQ[0][0]);
    if (prev >= 0) mbar_arrive(&sm.empty[prev]);
    mbar_arrive(&sm.empty[it % ST]); // the sentinel's stage
    ++it;
    mbar_arrive(sm.fix_empty);
    Fam::store_dq(p, c, rows, wg, warp, dQ);
  }
}

// ------------------------------------------------------------------------------------ dK, dV
template <class Fam>
__device__ __forceinline__ void sm90_attn_dkdv(const typename Fam::Params &p, const Sm90BwdMaps &maps) {
  constexpr int ELEM = Fam::ELEM, DP = Fam::DP, BQ = SM90_BWD_STREAM, ST = SM90_BWD_STAGES;
  typedef Sm90BwdLayout<DP> L;
  const Sm90BwdSmem<DP> sm;
  sm90_bwd_init(sm);
  if (threadIdx.x < 128) {
    regs_dec<SM90_BWD_PRODUCER_REGS>();
    if (threadIdx.x == 0) sm90_bwd_produce<Fam, true>(p, maps, sm);
    return;
  }
  regs_inc<SM90_BWD_CONSUMER_REGS>();
  const int tid = threadIdx.x - 128, wg = tid >> 7, warp = (tid >> 5) & 3;
  const u32 k_base = smem_addr(sm.fixed(0)) + wg * 64 * 128, v_base = smem_addr(sm.fixed(1)) + wg * 64 * 128;
  const int tiles = Fam::work_tiles(p);
  float S[BQ / 8][4], dP[BQ / 8][4], dK[DP / 8][4], dV[DP / 8][4];
  u32 Pa[BQ / 16][4], dSa[BQ / 16][4];
  int it = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    typename Fam::Cta c;
    Fam::cta(p, tile, c);
    zero_acc<DP>(dK);
    zero_acc<DP>(dV);
    mbar_wait(sm.fix_full, sm90_bwd_round(tile) & 1);
    for (;; ++it) {
      const int s = it % ST;
      mbar_wait(&sm.full[s], (it / ST) & 1);
      const int q0 = sm.step_pos[s];
      if (q0 < 0) break;
      const u32 q_tile = smem_addr(sm.stream(s, 0)), do_tile = smem_addr(sm.stream(s, 1));
      wgmma_fence();
      sm90_gemm_ss<ELEM, BQ, DP, L::FIX_BLOCK, L::STR_BLOCK>(S, k_base, q_tile);
      wgmma_commit();
      sm90_gemm_ss<ELEM, BQ, DP, L::FIX_BLOCK, L::STR_BLOCK>(dP, v_base, do_tile);
      wgmma_commit();
      wgmma_wait<0>(); // Sᵀ, dPᵀ
      fence_regs<BQ / 2>(&S[0][0]);
      fence_regs<BQ / 2>(&dP[0][0]);
      Fam::dkdv_probs(p, c, wg, warp, S, dP, q0, sm.info(s));
      sm90_pack_a<ELEM, BQ / 16>(S, Pa);
      sm90_pack_a<ELEM, BQ / 16>(dP, dSa);
      wgmma_fence();
      sm90_gemm_rs<ELEM, DP, BQ / 16, L::STR_BLOCK>(dV, Pa, do_tile);
      sm90_gemm_rs<ELEM, DP, BQ / 16, L::STR_BLOCK>(dK, dSa, q_tile);
      wgmma_commit();
      wgmma_wait<0>(); // dV, dK: Pa and dSa are free again, the stage is read
      fence_regs<DP / 2>(&dK[0][0]);
      fence_regs<DP / 2>(&dV[0][0]);
      mbar_arrive(&sm.empty[s]);
    }
    mbar_arrive(&sm.empty[it % ST]); // the sentinel's stage
    ++it;
    mbar_arrive(sm.fix_empty);
    Fam::store_dkdv(p, c, wg, warp, dK, dV);
  }
}
