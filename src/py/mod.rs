//! Python bindings, one file per op family: each `#[pyfunction]` imports its tensors, releases
//! the GIL and calls `ops::<family>`.

/// `tensors!(stream; q, k, initial_state?, ...)` imports the named tensor arguments in order
/// (`?`: optional), each under its own name in error messages, and rebinds each name to its
/// `&View` (`Option<&View>` for an optional one); the imported tensors stay alive, shadowed,
/// until the end of the enclosing block.
macro_rules! tensors {
    ($stream:expr;) => {};
    ($stream:expr; $name:ident ? $(, $($rest:tt)*)?) => {
        let $name = $crate::tensor::import_opt($name, stringify!($name), $stream)?;
        let $name = $name.as_ref().map(|t| &t.view);
        tensors!($stream; $($($rest)*)?);
    };
    ($stream:expr; $name:ident $(, $($rest:tt)*)?) => {
        let $name = $crate::tensor::import($name, stringify!($name), $stream)?;
        let $name = &$name.view;
        tensors!($stream; $($($rest)*)?);
    };
}

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
