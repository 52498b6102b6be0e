// The Hopper attention forward mainloop shared by every softmax-attention family (sm_90a).
//
// A persistent grid (one CTA per SM) walks the work tiles (BM = 128 query rows of one head each)
// round-robin; a work tile runs against a sequence of key tiles of BN keys. Three warpgroups:
// warpgroup 0 produces (TMA loads of Q once and of K, V per key tile into an
// SM90_STAGES-deep shared-memory ring; full and empty mbarriers per stage, K and V apart so that
// K is refilled as soon as its scores are done), warpgroups 1 and 2 consume (64 query rows each:
// S = Q Kᵀ and O += P V with wgmma, the softmax in registers, overlapped with the previous
// tile's P·V). The two consumer warpgroups run independently, so one's softmax also overlaps the
// other's GEMMs. The key-tile ring runs on across work tiles, and Q is reloaded as soon as the
// last scores of a work tile are done, so the next tile's loads overlap this tile's epilogue.
//
// What differs between families is a compile-time policy `Fam` (landmark.cu, nsa.cu):
//   Fam::ELEM, DP (padded head dim: 64 or 128), BN (keys per tile: 64, 112 or 128)
//   Fam::Params, Fam::Cta, Fam::Shared, Fam::Rows (a consumer thread's row state)
//   int Fam::work_tiles(p)                   number of work tiles
//   bool Fam::cta(p, tile, c)                work tile `tile` (false: nothing to do)
//   Fam::q_coord(c, row, head, batch)        TMA coordinates of the query tile
//   Fam::kv_coord(c, k0, row, head, batch)   ... of the key tile starting at key k0
//   int Fam::first_tile(p, c, sh), next_tile(p, c, k0, sh)   the key tile schedule (k0, or −1
//                                            at the end), run by all 128 producer threads
//   Fam::init_rows(p, c, warp, rows)         a consumer thread's rows (16·warp + g, + 8)
//   Fam::probs(p, c, rows, S, k0, alpha, ps) scores → P against the new running maxima (in
//                                            place), alpha = rescale of l and O, ps = partial
//                                            row sums of P
//   Fam::store(p, c, rows, warp, O)          the epilogue (o = O / l, lse, out_lo)
// The producer publishes each tile's k0 in shared memory beside the barrier that completes it,
// so the consumers need no schedule of their own; k0 = −1 ends the loop.
#pragma once
#include "sm90.cuh"

// SM90_BM (query rows per CTA) and SM90_THREADS come from the launch side
// (cuda::sm90_common_defines), which sizes grids and tiles with the same numbers.
#define SM90_STAGES 2
#define SM90_PRODUCER_REGS 40
#define SM90_CONSUMER_REGS 232
// 1: the consumer warpgroups take turns issuing their GEMMs (FlashAttention-3's pingpong), so
// that one's softmax runs while the other's GEMMs hold the tensor cores.
#ifndef SM90_PINGPONG
#define SM90_PINGPONG 0
#endif

struct Sm90Maps {
  TmaMap q, k, v;
};

// Dynamic shared memory: Q, then the K and V rings, each tile as DP / 64 column blocks of rows
// of 128 bytes; then the barriers and the tile table. 1024 bytes of slack align the base.
template <int DP, int BN> struct Sm90Layout {
  static constexpr int Q_BLOCK = SM90_BM * 128, KV_BLOCK = BN * 128;
  static constexpr int Q_BYTES = Q_BLOCK * (DP / 64), KV_BYTES = KV_BLOCK * (DP / 64);
  static constexpr int K_OFF = Q_BYTES;
  static constexpr int V_OFF = K_OFF + SM90_STAGES * KV_BYTES;
  static constexpr int BAR_OFF = V_OFF + SM90_STAGES * KV_BYTES;
  static constexpr int BYTES = BAR_OFF + 8 * (2 + 4 * SM90_STAGES) + 4 * SM90_STAGES + 1024;
};

template <class Fam>
__device__ __forceinline__ void sm90_attn_fwd(const typename Fam::Params &p, const Sm90Maps &maps) {
  constexpr int ELEM = Fam::ELEM, DP = Fam::DP, BN = Fam::BN, ST = SM90_STAGES;
  constexpr int NF = BN / 8, NO = DP / 8, NCH = DP / 64;
  typedef Sm90Layout<DP, BN> L;
  extern __shared__ unsigned char smem_raw[];
  unsigned char *sm = (unsigned char *)(((u64)smem_raw + 1023) & ~(u64)1023);
  unsigned char *Qs = sm, *Ks = sm + L::K_OFF, *Vs = sm + L::V_OFF;
  u64 *q_full = (u64 *)(sm + L::BAR_OFF), *q_empty = q_full + 1;
  u64 *k_full = q_empty + 1, *v_full = k_full + ST, *k_empty = v_full + ST, *v_empty = k_empty + ST;
  int *tile_k0 = (int *)(v_empty + ST);
  __shared__ typename Fam::Shared fsh;

  const int tiles = Fam::work_tiles(p);
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, 2 * 128);
    for (int s = 0; s < ST; ++s) {
      mbar_init(&k_full[s], 1);
      mbar_init(&v_full[s], 1);
      mbar_init(&k_empty[s], 2 * 128);
      mbar_init(&v_empty[s], 2 * 128);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < 128) {
    // ------------------------------------------------------------------ producer warpgroup
    regs_dec<SM90_PRODUCER_REGS>();
    const bool leader = threadIdx.x == 0;
    int it = 0, done = 0; // key tiles posted (sentinels included); work tiles loaded
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      typename Fam::Cta c;
      if (!Fam::cta(p, tile, c)) continue; // uniform over the CTA
      if (leader) {
        if (done > 0) mbar_wait(q_empty, (done - 1) & 1);
        int row, head, batch;
        Fam::q_coord(c, row, head, batch);
        mbar_arrive_tx(q_full, L::Q_BYTES);
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch)
          tma_load_4d(Qs + ch * L::Q_BLOCK, &maps.q, q_full, 64 * ch, head, row, batch);
      }
      ++done;
      int k0 = Fam::first_tile(p, c, fsh);
      for (;; ++it) {
        const int s = it % ST;
        const u32 parity = ((it / ST) - 1) & 1; // the previous use of stage s
        // Every use of a stage, the end-of-tile sentinel included, completes each of its four
        // barriers exactly once, so their parities stay in step across work tiles; a barrier is
        // completed again only after the consumers have released its previous phase.
        if (leader) {
          int row = 0, head = 0, batch = 0;
          if (k0 >= 0) Fam::kv_coord(c, k0, row, head, batch);
          if (it >= ST) mbar_wait(&k_empty[s], parity);
          tile_k0[s] = k0;
          if (k0 < 0) {
            mbar_arrive(&k_full[s]);
          } else {
            mbar_arrive_tx(&k_full[s], L::KV_BYTES);
#pragma unroll
            for (int ch = 0; ch < NCH; ++ch)
              tma_load_4d(Ks + s * L::KV_BYTES + ch * L::KV_BLOCK, &maps.k, &k_full[s], 64 * ch,
                          head, row, batch);
          }
          if (it >= ST) mbar_wait(&v_empty[s], parity);
          if (k0 < 0) {
            mbar_arrive(&v_full[s]);
          } else {
            mbar_arrive_tx(&v_full[s], L::KV_BYTES);
#pragma unroll
            for (int ch = 0; ch < NCH; ++ch)
              tma_load_4d(Vs + s * L::KV_BYTES + ch * L::KV_BLOCK, &maps.v, &v_full[s], 64 * ch,
                          head, row, batch);
          }
        }
        if (k0 < 0) break;
        k0 = Fam::next_tile(p, c, k0, fsh);
      }
      ++it; // the sentinel
    }
  } else {
    // ------------------------------------------------------------------ consumer warpgroups
    // Software pipeline: S of tile j is issued, then O is rescaled and P·V of tile j − 1 issued,
    // so the softmax of tile j overlaps that GEMM; P is packed only once no wgmma reads it.
    regs_inc<SM90_CONSUMER_REGS>();
    const int tid = threadIdx.x - 128, half = tid >> 7, warp = tid >> 5;
    const u32 q_base = smem_addr(Qs) + half * 64 * 128;
    float S[NF][4];
    u32 P[BN / 16][4]; // P of the pending P·V, packed when no wgmma is in flight
    // S = Q Kᵀ of the tile in stage s (issued, not waited for)
    auto issue_scores = [&](int s) {
      const u32 k_base = smem_addr(Ks + s * L::KV_BYTES);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        const u32 off = (kk & 3) * 32; // 16 elements along K inside a 128-byte row
        Wgmma<ELEM, BN>::ss(&S[0][0], sw128_desc(q_base + (kk >> 2) * L::Q_BLOCK + off, 0),
                            sw128_desc(k_base + (kk >> 2) * L::KV_BLOCK + off, 0), kk > 0);
      }
      wgmma_commit();
    };
    // O += P V of the tile in stage s (issued, not waited for)
    auto issue_pv = [&](int s, float (*O)[4]) {
      const u32 v_base = smem_addr(Vs + s * L::KV_BYTES);
      wgmma_fence();
#pragma unroll
      for (int t = 0; t < BN / 16; ++t)
        Wgmma<ELEM, DP>::rs(&O[0][0], P[t], sw128_desc(v_base + t * 16 * 128, L::KV_BLOCK), 1);
      wgmma_commit();
    };
    // scores -> probabilities in S (in place); returns alpha, the rescale of l and O
    auto softmax = [&](const typename Fam::Cta &c, typename Fam::Rows &rows, int k0, float *alpha) {
      float ps[2];
      Fam::probs(p, c, rows, S, k0, alpha, ps);
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) rows.l[rr] = rows.l[rr] * alpha[rr] + ps[rr];
    };
    // S -> P (A-operand layout: the accumulator layout of 16 key columns is the mma.sync
    // A-fragment layout of one k16 step); only while no wgmma reads P
    auto pack = [&]() {
#pragma unroll
      for (int t = 0; t < BN / 16; ++t) {
        P[t][0] = pack2<ELEM>(S[2 * t][0], S[2 * t][1]);
        P[t][1] = pack2<ELEM>(S[2 * t][2], S[2 * t][3]);
        P[t][2] = pack2<ELEM>(S[2 * t + 1][0], S[2 * t + 1][1]);
        P[t][3] = pack2<ELEM>(S[2 * t + 1][2], S[2 * t + 1][3]);
      }
    };
    auto rescale = [&](float (*O)[4], const float *alpha) {
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int f = 0; f < NO; ++f) {
          O[f][2 * rr] *= alpha[rr];
          O[f][2 * rr + 1] *= alpha[rr];
        }
    };
    // The sentinel's stage is released like a key tile's. v_full's sentinel phase is awaited
    // first: released before the producer has posted it, v_empty could complete twice while
    // the producer waits for the first of the two (parity waits cannot tell them apart).
    auto release_sentinel = [&](int s, int it) {
      mbar_arrive(&k_empty[s]);
      mbar_wait(&v_full[s], (it / ST) & 1);
      mbar_arrive(&v_empty[s]);
    };
    // Pingpong turns: warpgroup `half` issues its GEMMs between turn_begin and turn_end;
    // warpgroup 1 hands warpgroup 0 the first turn. Both run the same sequence of turns.
    auto turn_begin = [&]() {
      if (SM90_PINGPONG) named_sync(1 + half, 256);
    };
    auto turn_end = [&]() {
      if (SM90_PINGPONG) named_arrive(2 - half, 256);
    };
    if (SM90_PINGPONG && half == 1) named_arrive(1, 256);
    int it = 0, done = 0; // key tiles consumed (sentinels included); work tiles done
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      typename Fam::Cta c;
      if (!Fam::cta(p, tile, c)) continue;
      typename Fam::Rows rows;
      Fam::init_rows(p, c, warp, rows);
      float O[NO][4];
#pragma unroll
      for (int f = 0; f < NO; ++f) O[f][0] = O[f][1] = O[f][2] = O[f][3] = 0.f;
      mbar_wait(q_full, done & 1);
      ++done;
      int s = it % ST;
      mbar_wait(&k_full[s], (it / ST) & 1);
      const int first = tile_k0[s];
      if (first >= 0) {
        turn_begin();
        issue_scores(s);
        turn_end();
        wgmma_wait<0>();
        fence_regs<NF * 4>(&S[0][0]);
        mbar_arrive(&k_empty[s]);
        float alpha[2];
        softmax(c, rows, first, alpha);
        pack();
        int prev = it; // the key tile whose P·V is pending, after O is rescaled by alpha
        for (++it;; ++it) {
          s = it % ST;
          mbar_wait(&k_full[s], (it / ST) & 1);
          const int k0 = tile_k0[s];
          if (k0 < 0) break;
          turn_begin();
          issue_scores(s);
          rescale(O, alpha);
          mbar_wait(&v_full[prev % ST], (prev / ST) & 1);
          issue_pv(prev % ST, O);
          turn_end();
          wgmma_wait<1>(); // the scores
          fence_regs<NF * 4>(&S[0][0]);
          mbar_arrive(&k_empty[s]);
          softmax(c, rows, k0, alpha);
          wgmma_wait<0>(); // P·V of the previous tile
          fence_regs<NO * 4>(&O[0][0]);
          mbar_arrive(&v_empty[prev % ST]);
          pack();
          prev = it;
        }
        mbar_arrive(q_empty); // every score of this work tile is done
        release_sentinel(s, it);
        rescale(O, alpha);
        mbar_wait(&v_full[prev % ST], (prev / ST) & 1);
        turn_begin();
        issue_pv(prev % ST, O);
        turn_end();
        wgmma_wait<0>();
        fence_regs<NO * 4>(&O[0][0]);
        mbar_arrive(&v_empty[prev % ST]);
      } else {
        mbar_arrive(q_empty);
        release_sentinel(s, it);
      }
      ++it; // the sentinel
      Fam::store(p, c, rows, warp, O);
    }
  }
}
