//! CPU kernels: rayon over independent (sequence, head, tile) work items, f32 accumulation
//! (f64 for f64 inputs), f16/bf16 upcast per tile.

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
