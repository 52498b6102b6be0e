//! Numeric plumbing shared by the CPU kernels: the input element types, the accumulator type
//! and the dispatch from a tensor dtype to them.
//!
//! Inputs are f64, f32, f16 or bf16; they are accumulated in f64 for f64 inputs and in f32 for
//! the others (`Input::A`). Every conversion goes through f32 except f64 ↔ f64, so an f64
//! accumulator storing into f16 rounds twice, as the kernels always did.

use std::ops::{Add, AddAssign, Div, Mul, Sub};

/// Storage element of a float tensor.
pub trait Input: Copy + Send + Sync + 'static {
    /// Accumulator of this input dtype: f64 for f64, else f32.
    type A: Acc;
    /// Upcast (through f32 unless `self` is f64).
    fn load<A: Acc>(self) -> A;
    /// Round to this dtype (through f32 unless `Self` is f64).
    fn store<A: Acc>(a: A) -> Self;
    /// `a` rounded (hi) and its rounding residual rounded again (lo): hi + lo carries `a` to about
    /// twice this dtype's precision. Softmax forwards store the output's lo part for the
    /// backward's Δ = rowsum(dO ∘ O), which cancels where attention is nearly one-hot.
    #[inline(always)]
    fn store_split<A: Acc>(a: A) -> (Self, Self) {
        let hi = Self::store(a);
        (hi, Self::store(a - hi.load::<A>()))
    }
}

impl Input for f64 {
    type A = f64;
    #[inline(always)]
    fn load<A: Acc>(self) -> A {
        A::of(self)
    }
    #[inline(always)]
    fn store<A: Acc>(a: A) -> Self {
        a.f64()
    }
}

impl Input for f32 {
    type A = f32;
    #[inline(always)]
    fn load<A: Acc>(self) -> A {
        A::of32(self)
    }
    #[inline(always)]
    fn store<A: Acc>(a: A) -> Self {
        a.f32()
    }
}

impl Input for half::f16 {
    type A = f32;
    #[inline(always)]
    fn load<A: Acc>(self) -> A {
        A::of32(self.to_f32())
    }
    #[inline(always)]
    fn store<A: Acc>(a: A) -> Self {
        half::f16::from_f32(a.f32())
    }
}

impl Input for half::bf16 {
    type A = f32;
    #[inline(always)]
    fn load<A: Acc>(self) -> A {
        A::of32(self.to_f32())
    }
    #[inline(always)]
    fn store<A: Acc>(a: A) -> Self {
        half::bf16::from_f32(a.f32())
    }
}

/// Accumulator: f32, or f64 for f64 inputs (also the dtype of states, lse and slopes).
pub trait Acc:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + AddAssign
{
    /// The AVX2 vector of the GEMM core's micro-kernel.
    #[cfg(target_arch = "x86_64")]
    type V256: crate::cpu::gemm::Vector<Self>;
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of(x: f64) -> Self;
    fn of32(x: f32) -> Self;
    fn f64(self) -> f64;
    fn f32(self) -> f32;
    /// The standard library's exp.
    fn exp(self) -> Self;
    /// exp, vectorisable (polynomial, `exp_f32`) for f32; exp(−∞) = 0, NaN stays NaN.
    fn fexp(self) -> Self;
    fn ln(self) -> Self;
    /// The standard library's max: a NaN operand yields the other one.
    fn max(self, o: Self) -> Self;
    /// `o` if o > self, else self (so a NaN `o` yields self, a NaN self stays).
    #[inline(always)]
    fn maxf(self, o: Self) -> Self {
        if o > self {
            o
        } else {
            self
        }
    }
    /// a·b + c, fused (the standard library's mul_add) with `F`.
    fn fma<const F: bool>(a: Self, b: Self, c: Self) -> Self;
}

macro_rules! acc {
    ($t:ident, $v256:ty, $fexp:expr) => {
        impl Acc for $t {
            #[cfg(target_arch = "x86_64")]
            type V256 = $v256;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = $t::NEG_INFINITY;
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn of32(x: f32) -> Self {
                x as $t
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $t::exp(self)
            }
            #[inline(always)]
            fn fexp(self) -> Self {
                $fexp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $t::ln(self)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                $t::max(self, o)
            }
            #[inline(always)]
            fn fma<const F: bool>(a: Self, b: Self, c: Self) -> Self {
                if F {
                    $t::mul_add(a, b, c)
                } else {
                    a * b + c
                }
            }
        }
    };
}

// (the vector paths are only resolved on x86_64)
acc!(f32, std::arch::x86_64::__m256, exp_f32);
acc!(f64, std::arch::x86_64::__m256d, f64::exp);

/// exp(x) for f32 within ~2 ulp, branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    // NaN compares false both ways and stays NaN.
    let xc = x.clamp(LO, HI);
    // round to nearest with the 1.5·2^23 trick (vectorises, unlike f32::round)
    const MAGIC: f32 = 12_582_912.0;
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    p = p * r * r + r + 1.0;
    // 2^n from the bits of t = MAGIC + n (integer ops only, so that loops vectorise)
    let scale = f32::from_bits(t.to_bits().wrapping_add(127u32.wrapping_sub(0x4B40_0000)) << 23);
    let y = p * scale;
    if x < LO {
        0.0
    } else {
        y
    }
}

/// Σ x with 8 independent lanes (vectorises).
#[inline(always)]
pub fn vsum<A: Acc>(x: &[A]) -> A {
    let mut acc = [A::ZERO; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    let mut s = A::ZERO;
    for &v in it.remainder() {
        s += v;
    }
    for a in acc {
        s += a;
    }
    s
}

/// max x (−∞ for an empty slice; NaN ignored) with 8 lanes.
#[inline(always)]
pub fn vmax<A: Acc>(x: &[A]) -> A {
    let mut acc = [A::NEG_INF; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] = acc[l].maxf(c[l]);
        }
    }
    let mut m = A::NEG_INF;
    for &v in it.remainder() {
        m = m.maxf(v);
    }
    for a in acc {
        m = m.maxf(a);
    }
    m
}

/// `by_dtype!(dtype, "who", I => expr)` evaluates `expr` with the type `I` the `Input` of a
/// float `dtype`; `by_dtype!(dtype, "who", I, A => expr)` also names its accumulator `A`.
/// Integer dtypes are unreachable: the callers validated a float dtype.
macro_rules! by_dtype {
    ($dtype:expr, $who:literal, $I:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F64 => {
                type $I = f64;
                $body
            }
            $crate::tensor::DType::F32 => {
                type $I = f32;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $I = half::f16;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $I = half::bf16;
                $body
            }
            $crate::tensor::DType::I32 | $crate::tensor::DType::I64 => {
                unreachable!(concat!($who, ": the caller validated a float dtype"))
            }
        }
    };
    ($dtype:expr, $who:literal, $I:ident, $A:ident => $body:expr) => {
        $crate::cpu::num::by_dtype!($dtype, $who, $I => {
            type $A = <$I as $crate::cpu::num::Input>::A;
            $body
        })
    };
}
pub(crate) use by_dtype;
