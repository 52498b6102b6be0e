// Header-free helpers shared by every longattn kernel: element conversions, constants, quad and
// warp reductions, sequence offsets (cu_seqlens), ldmatrix fragment loads, tensor-core MMA
// fragments (mma.sync m16n8k16 for f16/bf16, m16n8k8 3xTF32 for f32), cp.async tile loads,
// exp2. NVRTC needs no include path for any of this.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define ELEM_F32 0
#define ELEM_F16 1
#define ELEM_BF16 2

template <int ELEM> struct Elem;
// f32 tensors run on tf32 tensor cores (3xTF32): fragments hold one float per register.
template <> struct Elem<ELEM_F32> {
  typedef float T;
  static constexpr int KS = 8;  // contraction depth of one MMA
  static constexpr int PAD = 4; // shared-memory row padding (elements) against bank conflicts
};
template <> struct Elem<ELEM_F16> {
  typedef u16 T;
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
};
template <> struct Elem<ELEM_BF16> {
  typedef u16 T;
  static constexpr int KS = 16;
  static constexpr int PAD = 8;
};

template <int ELEM> __device__ __forceinline__ float to_f32(u16 x);
template <> __device__ __forceinline__ float to_f32<ELEM_BF16>(u16 x) {
  return __uint_as_float(((u32)x) << 16);
}
template <> __device__ __forceinline__ float to_f32<ELEM_F16>(u16 x) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
  return r;
}

template <int ELEM> __device__ __forceinline__ typename Elem<ELEM>::T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<ELEM_F32>(float x) { return x; }
template <> __device__ __forceinline__ u16 from_f32<ELEM_BF16>(float x) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
template <> __device__ __forceinline__ u16 from_f32<ELEM_F16>(float x) {
  u16 r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}

template <int ELEM> __device__ __forceinline__ float load_f32(const typename Elem<ELEM>::T *p);
template <> __device__ __forceinline__ float load_f32<ELEM_F32>(const float *p) { return *p; }
template <> __device__ __forceinline__ float load_f32<ELEM_F16>(const u16 *p) {
  return to_f32<ELEM_F16>(*p);
}
template <> __device__ __forceinline__ float load_f32<ELEM_BF16>(const u16 *p) {
  return to_f32<ELEM_BF16>(*p);
}

// x rounded to the element type (hi) and its rounding residual rounded again (lo): hi + lo
// carries x to about twice the element's precision. Softmax forwards store the output's lo
// part for the backward's Δ = rowsum(dO ∘ O), which cancels where attention is nearly one-hot.
template <int ELEM>
__device__ __forceinline__ void split_f32(float x, typename Elem<ELEM>::T &hi, typename Elem<ELEM>::T &lo) {
  hi = from_f32<ELEM>(x);
  lo = ELEM == ELEM_F32 ? from_f32<ELEM>(0.f) : from_f32<ELEM>(x - load_f32<ELEM>(&hi));
}

// Two floats into one 32-bit register of 16-bit values (lo in the low half).
template <int ELEM> __device__ __forceinline__ u32 pack2(float lo, float hi);
template <> __device__ __forceinline__ u32 pack2<ELEM_BF16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ u32 pack2<ELEM_F16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <int ELEM> __device__ __forceinline__ float lo_f32(u32 x) { return to_f32<ELEM>((u16)(x & 0xffff)); }
template <int ELEM> __device__ __forceinline__ float hi_f32(u32 x) { return to_f32<ELEM>((u16)(x >> 16)); }

__device__ __forceinline__ u32 tf32(float x) {
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ float fast_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ u32 smem_addr(const void *p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// Softmax runs in base 2 (exp2): scores are scaled by log2(e), a base-2 lse times ln 2 is the
// natural one.
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF __int_as_float(0xff800000)
#define FULL_MASK 0xffffffffu

// Reductions over a quad (the 4 lanes that hold one row of an MMA accumulator) and a warp.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 1));
  return fmaxf(x, __shfl_xor_sync(FULL_MASK, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(FULL_MASK, x, 1);
  return x + __shfl_xor_sync(FULL_MASK, x, 2);
}
template <class X> __device__ __forceinline__ X warp_sum(X x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
  return x;
}
__device__ __forceinline__ int warp_min(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(FULL_MASK, x, o));
  return x;
}

// Δ = dO · (O + O_lo) of one softmax row of n columns, one warp per row (every lane gets it).
// O_lo, the output's rounding residual (null when not stored): with 16-bit outputs the rounding
// of O alone would dominate dP − Δ where attention is nearly one-hot.
template <int ELEM>
__device__ __forceinline__ float row_delta(const typename Elem<ELEM>::T *o,
                                           const typename Elem<ELEM>::T *o_lo,
                                           const typename Elem<ELEM>::T *dout, int n) {
  float acc = 0.f;
  for (int col = threadIdx.x & 31; col < n; col += 32) {
    const float x = load_f32<ELEM>(o + col) + (o_lo != nullptr ? load_f32<ELEM>(o_lo + col) : 0.f);
    acc += x * load_f32<ELEM>(dout + col);
  }
  return warp_sum(acc);
}

// A kernel parameter struct has one size on both sides: the launch side passes <S>_BYTES, the
// size of its #[repr(C)] mirror, so a field added, dropped or resized on one side only fails to
// compile.
#define CHECK_MIRROR(S) static_assert(sizeof(S) == S##_BYTES, #S " differs from its Rust mirror")

// Entry i of an int32 (kind 0) or int64 (kind 1) index array: cu_seqlens, block indices.
__device__ __forceinline__ i64 read_index(const void *p, int kind, i64 i) {
  return kind == 1 ? ((const i64 *)p)[i] : (i64)((const int *)p)[i];
}

// Sequence offsets are not validated on the GPU (that would need a host synchronisation), so
// every reader clamps them into [0, T]: no offset, however wrong, reads outside the tensors.
__device__ __forceinline__ i64 clamped_offset(const void *cu, int kind, i64 i, i64 T) {
  const i64 x = read_index(cu, kind, i);
  return x < 0 ? 0 : (x > T ? T : x);
}

// Tokens [start, end) of sequence n, clamped into [0, T] with start <= end.
__device__ __forceinline__ void sequence_span(const void *cu, int kind, int n, i64 T, i64 &start,
                                              i64 &end) {
  start = clamped_offset(cu, kind, n, T);
  end = read_index(cu, kind, n + 1);
  end = end < start ? start : (end > T ? T : end);
}

// The sequence holding token t: the largest s in [0, n) with cu[s] <= t (cu has n + 1 entries).
__device__ __forceinline__ int sequence_containing(const void *cu, int kind, int n, i64 t) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (read_index(cu, kind, mid) <= t)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// 16-bit fragment loads (ldmatrix) from a 32-bit shared address; x4 loads fill an A fragment or
// the B fragments of two n-tiles, x2 one B fragment. "_t": transposed.
__device__ __forceinline__ void ldsm_x4(u32 *r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 *r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 *r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2_t(u32 *r, u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// D += A·B on one 16x8 tile. a: 4 registers, b: 2 registers, c: 4 floats.
template <int ELEM> __device__ __forceinline__ void mma(float *c, const u32 *a, const u32 *b);
template <> __device__ __forceinline__ void mma<ELEM_BF16>(float *c, const u32 *a, const u32 *b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma<ELEM_F16>(float *c, const u32 *a, const u32 *b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// f32 runs as 3xTF32: each operand is split into a tf32 head and a tf32 tail and the three
// significant products are accumulated, which keeps float32 accuracy on tensor cores.
__device__ __forceinline__ void mma_tf32(float *c, const u32 *a, const u32 *b) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void split_tf32(u32 x, u32 &hi, u32 &lo) {
  const float f = __uint_as_float(x);
  hi = tf32(f);
  lo = tf32(f - __uint_as_float(hi));
}
template <> __device__ __forceinline__ void mma<ELEM_F32>(float *c, const u32 *a, const u32 *b) {
  u32 ah[4], al[4], bh[2], bl[2];
#pragma unroll
  for (int i = 0; i < 4; ++i) split_tf32(a[i], ah[i], al[i]);
#pragma unroll
  for (int i = 0; i < 2; ++i) split_tf32(b[i], bh[i], bl[i]);
  // The tensor core truncates when it accumulates (round toward zero), which biases long sums
  // (the dK of a block that every token selects: about 1e-3 relative at 10^5 rows). Each
  // product is formed from zero here and added with a rounding FADD instead.
  float t[4] = {0.f, 0.f, 0.f, 0.f};
  mma_tf32(t, al, bh);
  mma_tf32(t, ah, bl);
  mma_tf32(t, ah, bh);
#pragma unroll
  for (int i = 0; i < 4; ++i) c[i] += t[i];
}

// Fragment loads from shared memory. Naming: A is the row operand (M x K), B the column
// operand (K x N). "_mk"/"_km" say which index is contiguous-major in memory:
// A_mk: A[m][k] = s[m*ld + k];  A_km: A[m][k] = s[k*ld + m];
// B_nk: B[k][n] = s[n*ld + k];  B_kn: B[k][n] = s[k*ld + n].
// Fragment layouts follow the PTX ISA (g = lane/4, t = lane%4).
template <int ELEM> struct Frag {
  typedef typename Elem<ELEM>::T T;

  static __device__ __forceinline__ void A_mk(u32 *a, const T *s, int ld, int m0, int k0) {
    const int lane = threadIdx.x & 31;
    const T *p = s + (m0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8;
    ldsm_x4(a, smem_addr(p));
  }
  static __device__ __forceinline__ void A_km(u32 *a, const T *s, int ld, int m0, int k0) {
    const int lane = threadIdx.x & 31;
    const T *p = s + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + m0 + ((lane >> 3) & 1) * 8;
    ldsm_x4_t(a, smem_addr(p));
  }
  static __device__ __forceinline__ void B_nk(u32 *b, const T *s, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    const T *p = s + (n0 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8;
    ldsm_x2(b, smem_addr(p));
  }
  static __device__ __forceinline__ void B_kn(u32 *b, const T *s, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    const T *p = s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0;
    ldsm_x2_t(b, smem_addr(p));
  }
  // Multiplies the A fragment's columns k by w[k] (k relative to the fragment's k0).
  static __device__ __forceinline__ void scale_A_cols(u32 *a, const float *w) {
    const int t = threadIdx.x & 3;
    const float w0 = w[2 * t], w1 = w[2 * t + 1], w8 = w[2 * t + 8], w9 = w[2 * t + 9];
    a[0] = pack2<ELEM>(lo_f32<ELEM>(a[0]) * w0, hi_f32<ELEM>(a[0]) * w1);
    a[1] = pack2<ELEM>(lo_f32<ELEM>(a[1]) * w0, hi_f32<ELEM>(a[1]) * w1);
    a[2] = pack2<ELEM>(lo_f32<ELEM>(a[2]) * w8, hi_f32<ELEM>(a[2]) * w9);
    a[3] = pack2<ELEM>(lo_f32<ELEM>(a[3]) * w8, hi_f32<ELEM>(a[3]) * w9);
  }
  // Accumulator tiles (16 x 8 each, c[n][4]) reused as the A operand of step kk (columns
  // 16kk .. 16kk+15): the m16n8k16 accumulator layout matches the A layout.
  static __device__ __forceinline__ void A_from_acc(u32 *a, float (*c)[4], int kk) {
    a[0] = pack2<ELEM>(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack2<ELEM>(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack2<ELEM>(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack2<ELEM>(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
};

template <> struct Frag<ELEM_F32> {
  typedef float T;
  static __device__ __forceinline__ void A_mk(u32 *a, const T *s, int ld, int m0, int k0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    a[0] = __float_as_uint(s[(m0 + g) * ld + k0 + t]);
    a[1] = __float_as_uint(s[(m0 + g + 8) * ld + k0 + t]);
    a[2] = __float_as_uint(s[(m0 + g) * ld + k0 + t + 4]);
    a[3] = __float_as_uint(s[(m0 + g + 8) * ld + k0 + t + 4]);
  }
  static __device__ __forceinline__ void A_km(u32 *a, const T *s, int ld, int m0, int k0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    a[0] = __float_as_uint(s[(k0 + t) * ld + m0 + g]);
    a[1] = __float_as_uint(s[(k0 + t) * ld + m0 + g + 8]);
    a[2] = __float_as_uint(s[(k0 + t + 4) * ld + m0 + g]);
    a[3] = __float_as_uint(s[(k0 + t + 4) * ld + m0 + g + 8]);
  }
  static __device__ __forceinline__ void B_nk(u32 *b, const T *s, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    b[0] = __float_as_uint(s[(n0 + g) * ld + k0 + t]);
    b[1] = __float_as_uint(s[(n0 + g) * ld + k0 + t + 4]);
  }
  static __device__ __forceinline__ void B_kn(u32 *b, const T *s, int ld, int k0, int n0) {
    const int g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    b[0] = __float_as_uint(s[(k0 + t) * ld + n0 + g]);
    b[1] = __float_as_uint(s[(k0 + t + 4) * ld + n0 + g]);
  }
  static __device__ __forceinline__ void scale_A_cols(u32 *a, const float *w) {
    const int t = threadIdx.x & 3;
    a[0] = __float_as_uint(__uint_as_float(a[0]) * w[t]);
    a[1] = __float_as_uint(__uint_as_float(a[1]) * w[t]);
    a[2] = __float_as_uint(__uint_as_float(a[2]) * w[t + 4]);
    a[3] = __float_as_uint(__uint_as_float(a[3]) * w[t + 4]);
  }
  // tf32 steps are 8 deep and the accumulator holds column pairs, so the A fragment of
  // step kk (= accumulator tile kk) is gathered from the quad with shuffles.
  static __device__ __forceinline__ void A_from_acc(u32 *a, float (*c)[4], int kk) {
    const int lane = threadIdx.x & 31, t = lane & 3;
    const int src0 = (lane & ~3) | (t >> 1), src1 = (lane & ~3) | (2 + (t >> 1));
    const bool odd = t & 1;
    float x0 = __shfl_sync(FULL_MASK, c[kk][0], src0);
    float x1 = __shfl_sync(FULL_MASK, c[kk][1], src0);
    float y0 = __shfl_sync(FULL_MASK, c[kk][2], src0);
    float y1 = __shfl_sync(FULL_MASK, c[kk][3], src0);
    a[0] = __float_as_uint(odd ? x1 : x0);
    a[1] = __float_as_uint(odd ? y1 : y0);
    x0 = __shfl_sync(FULL_MASK, c[kk][0], src1);
    x1 = __shfl_sync(FULL_MASK, c[kk][1], src1);
    y0 = __shfl_sync(FULL_MASK, c[kk][2], src1);
    y1 = __shfl_sync(FULL_MASK, c[kk][3], src1);
    a[2] = __float_as_uint(odd ? x1 : x0);
    a[3] = __float_as_uint(odd ? y1 : y0);
  }
};

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Starts copying a ROWS x COLS tile (row stride `row_stride` elements, unit column stride) from
// global to shared memory (row stride `ld`), zero-filling rows >= rows_valid and columns >=
// cols_valid. `vec`: every row start is 16-byte aligned, so full 16-byte groups go through
// cp.async (complete after cp_async_wait + barrier); the rest is copied synchronously.
template <int ELEM, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile_async(typename Elem<ELEM>::T *s, int ld,
                                                const typename Elem<ELEM>::T *g, i64 row_stride,
                                                int rows_valid, int cols_valid, bool vec) {
  typedef typename Elem<ELEM>::T T;
  constexpr int V = 16 / sizeof(T); // elements per 16-byte group
  constexpr int GROUPS = COLS / V;
  for (int i = threadIdx.x; i < ROWS * GROUPS; i += THREADS) {
    const int r = i / GROUPS, c = (i % GROUPS) * V;
    T *dst = s + r * ld + c;
    if (r < rows_valid && vec && c + V <= cols_valid) {
      cp_async16(dst, g + r * row_stride + c);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j)
        dst[j] = (r < rows_valid && c + j < cols_valid) ? g[r * row_stride + c + j] : T(0);
    }
  }
}
