//! CPU kernels: rayon over independent (sequence, head, tile) work items, f32 accumulation
//! (f64 for f64 inputs), f16/bf16 upcast per tile.

pub mod gemm;
pub mod landmark;
pub mod lightning;
pub mod nsa;
pub mod num;
pub mod rat;

use std::sync::LazyLock;

/// The crate's own pool, so kernels never contend with other rayon users in the process.
pub static POOL: LazyLock<rayon::ThreadPool> = LazyLock::new(|| {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("longattn-cpu-{i}"))
        .build()
        .expect("failed to build the longattn CPU thread pool")
});

/// Whether the AVX2 + FMA micro-kernels may run on this CPU (detected once).
pub fn has_avx2_fma() -> bool {
    static DETECTED: LazyLock<bool> = LazyLock::new(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    });
    *DETECTED
}
