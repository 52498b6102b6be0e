//! longattn's native core: thin pyo3 bindings (`py/<family>.rs`) over CPU (rayon) and CUDA
//! (NVRTC) kernels. Each function imports its tensors zero-copy (DLPack), releases the GIL and
//! runs one kernel direction. Python (`longattn.ops`) allocates every output.

pub mod cpu;
pub mod cuda;
pub mod ops;
mod py;
pub mod tensor;

use pyo3::prelude::*;

/// Compiles every CUDA kernel variant for `arch` with NVRTC (no GPU needed); returns
/// (name, cubin bytes) per variant, raising on the first failure.
#[pyfunction]
fn compile_all_kernels(py: Python<'_>, arch: &str) -> PyResult<Vec<(String, usize)>> {
    use rayon::prelude::*;
    py.detach(|| {
        cpu::POOL.install(|| {
            let lightning = ops::lightning::Variant::all().into_par_iter().map(|v| {
                let name = format!("lightning.cu {:?}", v.defines());
                ops::lightning::compile_variant(&v, arch).map(|size| (name, size))
            });
            let rat = ops::rat::Variant::all().into_par_iter().map(|v| {
                let name = format!("rat.cu {:?}", v.defines());
                ops::rat::compile_variant(&v, arch).map(|size| (name, size))
            });
            let landmark = ops::landmark::Variant::all().into_par_iter().map(|v| {
                let name = format!("landmark.cu {:?}", v.defines());
                ops::landmark::compile_variant(&v, arch).map(|size| (name, size))
            });
            let nsa_select = ops::nsa::SelVariant::all().into_par_iter().map(|v| {
                let name = format!("nsa_select.cu {:?}", v.defines());
                ops::nsa::compile_sel_variant(&v, arch).map(|size| (name, size))
            });
            let nsa = ops::nsa::Variant::all().into_par_iter().map(|v| {
                let name = format!("nsa.cu {:?}", v.defines());
                ops::nsa::compile_variant(&v, arch).map(|size| (name, size))
            });
            lightning
                .chain(rat)
                .chain(landmark)
                .chain(nsa_select)
                .chain(nsa)
                .map(|r| r.map_err(ops::value_error))
                .collect()
        })
    })
}

/// Whether the CUDA driver and NVRTC libraries can be loaded (None), else the reason.
#[pyfunction]
fn cuda_unavailable_reason() -> Option<String> {
    cuda::ensure_libraries().err()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile_all_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    py::register(m)
}
