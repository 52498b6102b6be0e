//! Python bindings, one file per op family: each `#[pyfunction]` imports its tensors, releases
//! the GIL and calls `ops::<family>`.

mod landmark;
mod lightning;
mod nsa;
mod rat;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    lightning::register(m)?;
    rat::register(m)?;
    nsa::register(m)?;
    landmark::register(m)?;
    Ok(())
}
