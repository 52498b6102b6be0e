//! Per-op argument checking and dispatch to the CPU or CUDA kernels.

pub mod landmark;
pub mod lightning;
pub mod nsa;
pub mod rat;

use crate::tensor::{DType, Device, View};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::PyErr;

pub fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

pub fn type_error(msg: impl Into<String>) -> PyErr {
    PyTypeError::new_err(msg.into())
}

/// `name` has exactly `expected` (usize::MAX = any size in that dimension).
pub fn expect_shape(t: &View, name: &str, expected: &[usize], what: &str) -> Result<(), PyErr> {
    let ok = t.shape.len() == expected.len()
        && t.shape
            .iter()
            .zip(expected)
            .all(|(&s, &e)| e == usize::MAX || s == e);
    if ok {
        return Ok(());
    }
    let fmt: Vec<String> = expected
        .iter()
        .map(|&e| {
            if e == usize::MAX {
                "*".into()
            } else {
                e.to_string()
            }
        })
        .collect();
    Err(value_error(format!(
        "{name}: expected shape [{}] ({what}), got {:?}",
        fmt.join(", "),
        t.shape
    )))
}

pub fn expect_dtype(t: &View, name: &str, allowed: &[DType]) -> Result<(), PyErr> {
    if allowed.contains(&t.dtype) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
    Err(type_error(format!(
        "{name}: expected dtype {}, got {}",
        names.join(" or "),
        t.dtype.name()
    )))
}

pub fn expect_device(t: &View, name: &str, device: Device) -> Result<(), PyErr> {
    if t.device == device {
        return Ok(());
    }
    Err(value_error(format!(
        "{name}: expected a tensor on {device} like the other arguments, got {}",
        t.device
    )))
}

pub fn expect_unit_last_stride(t: &View, name: &str) -> Result<(), PyErr> {
    match (t.shape.last(), t.strides.last()) {
        (Some(&n), Some(&s)) if n > 1 && s != 1 => Err(value_error(format!(
            "{name}: the last dimension must have stride 1 (got strides {:?})",
            t.strides
        ))),
        _ => Ok(()),
    }
}

/// Packed sequences: `(N, host copy)` for CPU cu_seqlens, validated.
pub fn read_cu_seqlens(cu: &View, total: usize) -> Result<Vec<usize>, PyErr> {
    let n = cu.shape[0];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: CPU tensor of n elements with validated integer dtype.
        let v = unsafe {
            match cu.dtype {
                DType::I32 => *cu.at::<i32>(&[i]) as i64,
                _ => *cu.at::<i64>(&[i]),
            }
        };
        let prev = out.last().copied().unwrap_or(0) as i64;
        if (i == 0 && v != 0) || v < prev || v > total as i64 {
            return Err(value_error(format!(
                "cu_seqlens: must start at 0, be non-decreasing and end at the number of tokens ({total}); entry {i} is {v}"
            )));
        }
        out.push(v as usize);
    }
    if out.last().copied() != Some(total) {
        return Err(value_error(format!(
            "cu_seqlens: last entry must equal the number of tokens ({total}), got {:?}",
            out.last()
        )));
    }
    Ok(out)
}
