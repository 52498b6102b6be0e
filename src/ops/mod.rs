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

/// `out_lo` (when given: an output's rounding residual) is laid out exactly like `out`; the
/// kernels address both with out's strides.
pub fn expect_out_lo(out_lo: Option<&View>, out: &View) -> Result<(), PyErr> {
    let Some(lo) = out_lo else {
        return Ok(());
    };
    expect_tensor(lo, "out_lo", &out.shape, "like out", out.dtype, out.device)?;
    let same_layout = lo
        .shape
        .iter()
        .zip(lo.strides.iter().zip(&out.strides))
        .all(|(&n, (a, b))| n <= 1 || a == b);
    if same_layout {
        return Ok(());
    }
    Err(value_error(format!(
        "out_lo: expected out's strides {:?}, got {:?}",
        out.strides, lo.strides
    )))
}

/// `name` has exactly this shape and dtype and lives on `device`.
pub fn expect_tensor(
    t: &View,
    name: &str,
    shape: &[usize],
    what: &str,
    dtype: DType,
    device: Device,
) -> Result<(), PyErr> {
    expect_shape(t, name, shape, what)?;
    expect_dtype(t, name, &[dtype])?;
    expect_device(t, name, device)
}

/// Rank `rank`; `layout` names the dims in the error ("[B, T, H, D]").
pub fn expect_rank(t: &View, name: &str, rank: usize, layout: &str) -> Result<(), PyErr> {
    if t.ndim() == rank {
        return Ok(());
    }
    Err(value_error(format!(
        "{name}: expected rank {rank} {layout}, got shape {:?}",
        t.shape
    )))
}

/// The float dtypes a kernel input may have on `device`: float64 on the CPU only.
pub fn float_dtypes(device: Device) -> &'static [DType] {
    match device {
        Device::Cpu => &[DType::F64, DType::F32, DType::F16, DType::BF16],
        Device::Cuda(_) => &[DType::F32, DType::F16, DType::BF16],
    }
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
    if t.numel() == 0 {
        return Ok(()); // nothing is read; torch reports any strides for empty tensors
    }
    match (t.shape.last(), t.strides.last()) {
        (Some(&n), Some(&s)) if n > 1 && s != 1 => Err(value_error(format!(
            "{name}: the last dimension must have stride 1 (got strides {:?})",
            t.strides
        ))),
        _ => Ok(()),
    }
}

/// Accumulator / state / lse dtype for an input dtype: float64 stays float64, else float32.
pub fn accumulator_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks the metadata of packed sequences (device, integer dtype, rank, batch 1); the values
/// are read by `read_cu_seqlens` on the CPU only. Returns N, the number of sequences.
pub fn check_cu_seqlens(cu: &View, device: Device, batch: usize) -> Result<usize, PyErr> {
    expect_device(cu, "cu_seqlens", device)?;
    expect_dtype(cu, "cu_seqlens", &[DType::I32, DType::I64])?;
    if cu.ndim() != 1 || cu.shape[0] < 2 {
        return Err(value_error(format!(
            "cu_seqlens: expected a 1-D tensor [N + 1] with N >= 1, got shape {:?}",
            cu.shape
        )));
    }
    if batch != 1 {
        return Err(value_error(format!(
            "cu_seqlens: packed sequences need batch size 1, got B = {batch}"
        )));
    }
    Ok(cu.shape[0] - 1)
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
