//! rat_attn: argument checks and dispatch (specs/rat.md). CPU only for now: CUDA tensors get a
//! NotImplementedError before anything runs.

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_shape, expect_tensor,
    expect_unit_last_stride, read_cu_seqlens, value_error,
};
use crate::cpu::rat::{RatArgs, RatGrads, Seq};
use crate::tensor::{DType, Device, View};
use pyo3::exceptions::PyNotImplementedError;
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;

/// Validated problem sizes shared by the forward and the backward.
struct Problem {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    dtype: DType,
    state_dtype: DType,
    /// Chunk slots of the state tensors: ⌈T/L⌉, or (T + N(L − 1)) / L with cu_seqlens.
    chunks: usize,
    seqs: Vec<Seq>,
}

/// Number of chunk slots of the `k_states`/`v_states` tensors ([B, C, H, D]). With cu_seqlens,
/// sequence n's chunks start at slot (cu[n] + n(L − 1)) / L, which needs no prefix sum.
pub fn state_chunks(t: usize, chunk: usize, num_seqs: Option<usize>) -> usize {
    match num_seqs {
        None => t.div_ceil(chunk),
        Some(n) => (t + n * (chunk - 1)) / chunk,
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    chunk: i64,
    scale: f64,
    rope_base: Option<f64>,
    cu: Option<&View>,
) -> Result<Problem, PyErr> {
    if q.ndim() != 4 {
        return Err(value_error(format!(
            "q: expected rank 4 [B, T, H, D], got shape {:?}",
            q.shape
        )));
    }
    let (b, t, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let device = q.device;
    expect_dtype(q, "q", &[DType::F64, DType::F32, DType::F16, DType::BF16])?;
    let dtype = q.dtype;
    let state_dtype = accumulator_dtype(dtype);
    for (t_, name) in [(k, "k"), (v, "v"), (g, "g")] {
        expect_shape(t_, name, &[b, t, h, d], "[B, T, H, D] like q")?;
        expect_device(t_, name, device)?;
    }
    expect_dtype(k, "k", &[dtype])?;
    expect_dtype(v, "v", &[dtype])?;
    if dtype == DType::F32 {
        expect_dtype(g, "g", &[DType::F32])?;
    } else {
        expect_dtype(g, "g", &[dtype, DType::F32])?;
    }
    for (t_, name) in [(q, "q"), (k, "k"), (v, "v"), (g, "g")] {
        expect_unit_last_stride(t_, name)?;
    }
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(value_error(format!(
            "q: head dim must be between 1 and {MAX_HEAD_DIM}, got {d}"
        )));
    }
    if chunk < 1 {
        return Err(value_error(format!(
            "chunk_size: must be at least 1, got {chunk}"
        )));
    }
    let chunk = chunk as usize;
    if !scale.is_finite() {
        return Err(value_error(format!(
            "scale: must be a finite number, got {scale}"
        )));
    }
    if let Some(base) = rope_base {
        if !(base.is_finite() && base > 0.0) {
            return Err(value_error(format!(
                "rope_base: must be a positive number or None, got {base}"
            )));
        }
        if d % 2 != 0 {
            return Err(value_error(format!(
                "q: RoPE (rope_base set) needs an even head dim, got {d}; pass rope_base=None"
            )));
        }
    }
    if let Device::Cuda(_) = device {
        return Err(PyNotImplementedError::new_err(
            "rat_attn: the CUDA kernels are not implemented yet; use CPU tensors",
        ));
    }
    let (chunks, seqs) = match cu {
        None => (
            state_chunks(t, chunk, None),
            (0..b)
                .map(|i| Seq {
                    batch: i,
                    start: 0,
                    len: t,
                    chunk0: 0,
                })
                .collect(),
        ),
        Some(cu) => {
            check_cu_seqlens(cu, device, b)?;
            let n = cu.shape[0] - 1;
            let starts = read_cu_seqlens(cu, t)?;
            let seqs = starts
                .windows(2)
                .enumerate()
                .map(|(i, w)| Seq {
                    batch: 0,
                    start: w[0],
                    len: w[1] - w[0],
                    chunk0: (w[0] + i * (chunk - 1)) / chunk,
                })
                .collect();
            (state_chunks(t, chunk, Some(n)), seqs)
        }
    };
    Ok(Problem {
        b,
        t,
        h,
        d,
        dtype,
        state_dtype,
        chunks,
        seqs,
    })
}

impl Problem {
    fn expect(
        &self,
        t: &View,
        name: &str,
        shape: &[usize],
        what: &str,
        dtype: DType,
    ) -> Result<(), PyErr> {
        expect_tensor(t, name, shape, what, dtype, Device::Cpu)?;
        expect_unit_last_stride(t, name)
    }

    fn tokens(&self) -> [usize; 4] {
        [self.b, self.t, self.h, self.d]
    }

    /// out, lse, k_states, v_states.
    fn expect_saved(&self, out: &View, lse: &View, ks: &View, vs: &View) -> Result<(), PyErr> {
        self.expect(
            out,
            "out",
            &self.tokens(),
            "[B, T, H, D] like q",
            self.dtype,
        )?;
        self.expect(
            lse,
            "lse",
            &[self.b, self.t, self.h],
            "[B, T, H]",
            self.state_dtype,
        )?;
        let st = [self.b, self.chunks, self.h, self.d];
        self.expect(ks, "k_states", &st, "[B, C, H, D]", self.state_dtype)?;
        self.expect(vs, "v_states", &st, "[B, C, H, D]", self.state_dtype)
    }
}

/// Forward: writes out, lse and the chunk-final states.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    out: &View,
    lse: &View,
    ks: &View,
    vs: &View,
    chunk: i64,
    scale: f64,
    rope_base: Option<f64>,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check(q, k, v, g, chunk, scale, rope_base, cu)?;
    p.expect_saved(out, lse, ks, vs)?;
    crate::cpu::rat::forward(&RatArgs {
        q,
        k,
        v,
        g,
        out,
        lse,
        ks,
        vs,
        seqs: &p.seqs,
        chunk: chunk as usize,
        scale,
        rope_base,
    });
    Ok(())
}

/// Backward: writes dq, dk, dv (input dtype) and dg (g's dtype) from the forward's saved out,
/// lse and chunk-final states.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    out: &View,
    lse: &View,
    ks: &View,
    vs: &View,
    dout: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    dg: &View,
    chunk: i64,
    scale: f64,
    rope_base: Option<f64>,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check(q, k, v, g, chunk, scale, rope_base, cu)?;
    p.expect_saved(out, lse, ks, vs)?;
    let tok = p.tokens();
    p.expect(dout, "grad_out", &tok, "[B, T, H, D] like q", p.dtype)?;
    p.expect(dq, "dq", &tok, "like q", p.dtype)?;
    p.expect(dk, "dk", &tok, "like k", p.dtype)?;
    p.expect(dv, "dv", &tok, "like v", p.dtype)?;
    p.expect(dg, "dg", &tok, "like g", g.dtype)?;
    crate::cpu::rat::backward(
        &RatArgs {
            q,
            k,
            v,
            g,
            out,
            lse,
            ks,
            vs,
            seqs: &p.seqs,
            chunk: chunk as usize,
            scale,
            rope_base,
        },
        &RatGrads {
            dout,
            dq,
            dk,
            dv,
            dg,
        },
    );
    Ok(())
}
