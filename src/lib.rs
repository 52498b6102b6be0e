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
            // the Hopper engine's modules exist for sm_90a only
            let hopper = arch == "sm_90a";
            let landmark_sm90 = ops::landmark::Sm90Variant::all()
                .into_par_iter()
                .filter(move |_| hopper)
                .map(|v| {
                    let name = format!("landmark.cu {:?}", v.defines());
                    ops::landmark::compile_sm90_variant(&v, arch).map(|size| (name, size))
                });
            let nsa_sm90 = ops::nsa::Variant::all_sm90()
                .into_par_iter()
                .filter(move |_| hopper)
                .map(|v| {
                    let name = format!("nsa.cu {:?}", v.sm90_defines());
                    ops::nsa::compile_sm90_variant(&v, arch).map(|size| (name, size))
                });
            lightning
                .chain(rat)
                .chain(nsa_sm90)
                .chain(landmark_sm90)
                .chain(landmark)
                .chain(nsa_select)
                .chain(nsa)
                .map(|r| r.map_err(ops::value_error))
                .collect()
        })
    })
}

/// Compiles every Hopper-engine kernel variant for sm_90a with ptxas's resource report; writes
/// each CUBIN into `dir` and returns (variant, cubin path, NVRTC log) per variant, so that a
/// check without a GPU can read the machine code (HGMMA present) and the report (no spills).
#[pyfunction]
fn sm90_machine_code(py: Python<'_>, dir: &str) -> PyResult<Vec<(String, String, String)>> {
    use rayon::prelude::*;
    type Defines = Vec<(String, String)>;
    let mut jobs: Vec<(String, &str, Defines)> = Vec::new();
    for v in ops::landmark::Sm90Variant::all() {
        jobs.push((
            format!("landmark {v:?}"),
            ops::landmark::SOURCE,
            v.defines(),
        ));
    }
    for v in ops::nsa::Variant::all_sm90() {
        jobs.push((format!("window {v:?}"), ops::nsa::SOURCE, v.sm90_defines()));
    }
    py.detach(|| {
        cpu::POOL.install(|| {
            jobs.into_par_iter()
                .enumerate()
                .map(|(i, (name, body, defines))| {
                    let (cubin, log) = cuda::compile_with_log(
                        &name,
                        &cuda::source(body),
                        &defines,
                        "sm_90a",
                        &["--ptxas-options=-v"],
                    )?;
                    let path = std::path::Path::new(dir).join(format!("sm90_{i}.cubin"));
                    std::fs::write(&path, cubin).map_err(|e| e.to_string())?;
                    Ok((name, path.to_string_lossy().into_owned(), log))
                })
                .collect::<Result<Vec<_>, String>>()
                .map_err(ops::value_error)
        })
    })
}

/// Whether the CUDA driver and NVRTC libraries can be loaded (None), else the reason.
#[pyfunction]
fn cuda_unavailable_reason() -> Option<String> {
    cuda::ensure_libraries().err()
}

/// Opens NVRTC from the first of `candidates` (files or sonames) that is an NVRTC of one of
/// `majors`; returns (name, major, minor). The first NVRTC opened stays for the process. On
/// failure the RuntimeError (and every later use of CUDA) names each candidate tried, then `hint`.
#[pyfunction]
fn load_nvrtc(
    candidates: Vec<String>,
    majors: Vec<i32>,
    hint: &str,
) -> PyResult<(String, i32, i32)> {
    cuda::nvrtc::open(&candidates, &majors, hint)
        .map(|n| (n.name.clone(), n.version.0, n.version.1))
        .map_err(pyo3::exceptions::PyRuntimeError::new_err)
}

/// Compiles one self-contained source for `arch` with the NVRTC in use (tests: the binding
/// without a GPU); returns the CUBIN and the program log, or raises ValueError with the log.
#[pyfunction]
fn nvrtc_compile<'py>(
    py: Python<'py>,
    name: &str,
    src: &str,
    arch: &str,
) -> PyResult<(Bound<'py, pyo3::types::PyBytes>, String)> {
    let (cubin, log) =
        cuda::compile_with_log(name, src, &[], arch, &[]).map_err(ops::value_error)?;
    Ok((pyo3::types::PyBytes::new(py, &cubin), log))
}

/// The NVRTC in use: (name it was opened by, major, minor); opens one by soname when none was.
#[pyfunction]
fn nvrtc_library() -> PyResult<(String, i32, i32)> {
    cuda::nvrtc::get()
        .map(|n| (n.name.clone(), n.version.0, n.version.1))
        .map_err(pyo3::exceptions::PyRuntimeError::new_err)
}

/// Hopper-engine kernel launches so far in this process.
#[pyfunction]
fn sm90_launch_count() -> u64 {
    cuda::SM90_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile_all_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(load_nvrtc, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_library, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_compile, m)?)?;
    m.add_function(wrap_pyfunction!(sm90_launch_count, m)?)?;
    m.add_function(wrap_pyfunction!(sm90_machine_code, m)?)?;
    py::register(m)
}
