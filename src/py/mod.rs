//! Python bindings, one file per op family: each `#[pyfunction]` imports its tensors, releases
//! the GIL and calls `ops::<family>`.

mod lightning;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    lightning::register(m)?;
    Ok(())
}
