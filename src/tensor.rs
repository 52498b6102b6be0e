//! DLPack import: every tensor argument arrives as a borrowed, strided view.
//!
//! `import` takes any Python object that speaks DLPack (torch tensors, numpy arrays),
//! negotiates the consumer stream, and returns a `Tensor` that keeps the producer's
//! managed tensor alive. Kernels work on the `View` it exposes: a raw pointer plus
//! shape and element strides, which is `Send` so that it can cross `py.detach`.

use dlpark::ffi::{DLDataTypeCode, DLDevice, DLDeviceType};
use dlpark::python::consumer::stream::{self, DlpackStream, StreamArg};
use dlpark::python::{ImportRequest, ImportedDlpack};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use std::ffi::c_void;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I32,
    I64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A borrowed tensor: pointer (byte offset applied), shape and strides in elements.
#[derive(Clone, Debug)]
pub struct View {
    pub ptr: *mut u8,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
    pub dtype: DType,
    pub device: Device,
}

// SAFETY: a View is only dereferenced by kernels while the owning `Tensor` (and the
// Python object behind it) is alive; the caller keeps that borrow for the whole call.
unsafe impl Send for View {}
unsafe impl Sync for View {}

impl View {
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Device address for CUDA kernels.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Element pointer at a multi-index (no bounds check: callers validated shapes).
    ///
    /// # Safety
    /// `idx` must be inside `shape`, and `T` must match `dtype`.
    #[inline]
    pub unsafe fn at<T>(&self, idx: &[usize]) -> *mut T {
        let mut off = 0isize;
        for (i, s) in idx.iter().zip(&self.strides) {
            off += *i as isize * s;
        }
        unsafe { (self.ptr as *mut T).offset(off) }
    }
}

/// A view plus the DLPack capsule that keeps its memory alive.
pub struct Tensor {
    pub view: View,
    _owner: ImportedDlpack,
}

impl std::ops::Deref for Tensor {
    type Target = View;
    fn deref(&self) -> &View {
        &self.view
    }
}

/// Consumer stream for `__dlpack__(stream=...)`: torch's current stream on CUDA.
struct ConsumerStream(usize);

unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        if device.device_type == DLDeviceType::CUDA {
            Ok(stream::cuda(self.0 as *mut c_void))
        } else {
            Ok(stream::none())
        }
    }

    /// Accepts the producer's stream (torch's C exchange API: no Python call per tensor) when
    /// nothing needs ordering: CPU memory, or a CUDA tensor whose producer stream is the one
    /// the kernels launch on (`native_call` passes torch's current stream). Any other stream
    /// declines, and the import falls back to `__dlpack__(stream=...)`, which orders the two.
    unsafe fn wait_for_producer(&self, device: DLDevice, producer: *mut c_void) -> PyResult<bool> {
        Ok(match device.device_type {
            DLDeviceType::CPU => true,
            DLDeviceType::CUDA => producer as usize == self.0,
            _ => false,
        })
    }
}

fn dtype_of(code: DLDataTypeCode, bits: u8, lanes: u16) -> Option<DType> {
    if lanes != 1 {
        return None;
    }
    match (code, bits) {
        (DLDataTypeCode::FLOAT, 64) => Some(DType::F64),
        (DLDataTypeCode::FLOAT, 32) => Some(DType::F32),
        (DLDataTypeCode::FLOAT, 16) => Some(DType::F16),
        (DLDataTypeCode::BFLOAT, 16) => Some(DType::BF16),
        (DLDataTypeCode::INT, 32) => Some(DType::I32),
        (DLDataTypeCode::INT, 64) => Some(DType::I64),
        _ => None,
    }
}

/// Imports `obj` zero-copy. `stream` is the consumer CUDA stream handle (ignored on CPU).
pub fn import(obj: &Bound<'_, PyAny>, name: &str, stream: usize) -> PyResult<Tensor> {
    let request = ImportRequest::new(obj.as_borrowed())
        .map_err(|e| PyTypeError::new_err(format!("{name}: not a DLPack tensor ({e})")))?;
    let consumer = ConsumerStream(stream);
    let owner = request.import(Some(&consumer), Some(false))?;
    let tensor = owner
        .validate()
        .map_err(|e| PyValueError::new_err(format!("{name}: invalid DLPack tensor: {e}")))?;
    let dl_device = tensor.device();
    let device = match dl_device.device_type {
        DLDeviceType::CPU => Device::Cpu,
        DLDeviceType::CUDA => Device::Cuda(dl_device.device_id),
        other => {
            return Err(PyValueError::new_err(format!(
                "{name}: unsupported device type {} (expected cpu or cuda)",
                other.0
            )))
        }
    };
    let dt = tensor.dtype();
    let dtype = dtype_of(dt.code, dt.bits, dt.lanes).ok_or_else(|| {
        PyTypeError::new_err(format!(
            "{name}: unsupported dtype (code {}, {} bits)",
            dt.code.0, dt.bits
        ))
    })?;
    let shape: Vec<usize> = tensor.shape().iter().map(|&s| s as usize).collect();
    let strides: Vec<isize> = tensor
        .strides_or_compact()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?
        .iter()
        .map(|&s| s as isize)
        .collect();
    // SAFETY: the pointer is only formed here; kernels dereference it within shape/strides.
    let ptr = unsafe { tensor.offset_bytes_ptr() }
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))? as *mut u8;
    let view = View {
        ptr,
        shape,
        strides,
        dtype,
        device,
    };
    Ok(Tensor {
        view,
        _owner: owner,
    })
}

/// Imports an optional argument (`None` stays `None`).
pub fn import_opt(
    obj: Option<&Bound<'_, PyAny>>,
    name: &str,
    stream: usize,
) -> PyResult<Option<Tensor>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(import(o, name, stream)?)),
        _ => Ok(None),
    }
}
