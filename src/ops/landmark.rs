//! landmark_attn and landmark_topk_blocks: argument checks and dispatch (CPU kernels only for
//! now; CUDA tensors raise).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_shape, expect_tensor,
    expect_unit_last_stride, read_cu_seqlens, value_error,
};
use crate::cpu::landmark::{self as kernels, LmArgs, LmBwd, LmFwd, LmSeq, LmTopk};
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;
const ANY: usize = usize::MAX;

const CUDA_MISSING: &str =
    "landmark_attn: the CUDA kernels are not implemented yet; use CPU tensors";

/// Validated problem sizes shared by every direction.
struct Problem {
    b: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    e: usize,
    dtype: DType,
    state_dtype: DType,
    seqs: Vec<LmSeq>,
}

fn check(
    q: &View,
    k: &View,
    v: Option<&View>,
    block_size: i64,
    cu: Option<&View>,
) -> Result<Problem, PyErr> {
    for (t, name) in [(Some(q), "q"), (Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            if t.ndim() != 4 {
                return Err(value_error(format!(
                    "{name}: expected rank 4 [B, T, H, D], got shape {:?}",
                    t.shape
                )));
            }
        }
    }
    let (b, tq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let device = q.device;
    expect_dtype(q, "q", &[DType::F64, DType::F32, DType::F16, DType::BF16])?;
    let dtype = q.dtype;
    let state_dtype = accumulator_dtype(dtype);
    expect_shape(
        k,
        "k",
        &[b, ANY, ANY, d],
        "[B, Tk, Hkv, D] with q's B and D",
    )?;
    let (tk, hkv) = (k.shape[1], k.shape[2]);
    let mut e = d;
    if let Some(v) = v {
        expect_shape(
            v,
            "v",
            &[b, tk, hkv, ANY],
            "[B, Tk, Hkv, E] with k's B, Tk, Hkv",
        )?;
        e = v.shape[3];
    }
    for (name, size) in [("q", d), ("v", e)] {
        if size == 0 || size > MAX_HEAD_DIM {
            return Err(value_error(format!(
                "{name}: head dim must be between 1 and {MAX_HEAD_DIM}, got {size}"
            )));
        }
    }
    if hq == 0 || hkv == 0 || hq % hkv != 0 {
        return Err(value_error(format!(
            "k: the number of kv heads must divide the number of query heads, got Hq = {hq} and Hkv = {hkv}"
        )));
    }
    if tk < tq {
        return Err(value_error(format!(
            "k: keys must be at least as long as queries (Tk >= Tq), got Tk = {tk} and Tq = {tq}"
        )));
    }
    if block_size < 2 {
        return Err(value_error(format!(
            "block_size: must be at least 2 (one ordinary token and the landmark), got {block_size}"
        )));
    }
    for (t, name) in [(Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            expect_dtype(t, name, &[dtype])?;
            expect_device(t, name, device)?;
        }
    }
    for (t, name) in [(Some(q), "q"), (Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            expect_unit_last_stride(t, name)?;
        }
    }
    let seqs = match cu {
        None => (0..b)
            .map(|i| LmSeq {
                batch: i,
                q_start: 0,
                q_len: tq,
                k_start: 0,
                k_len: tk,
            })
            .collect(),
        Some(cu) => {
            check_cu_seqlens(cu, device, b)?;
            if tk != tq {
                return Err(value_error(format!(
                    "cu_seqlens: packed sequences need as many keys as queries, got Tk = {tk} and Tq = {tq}"
                )));
            }
            if device != Device::Cpu {
                return Err(value_error(CUDA_MISSING));
            }
            let starts = read_cu_seqlens(cu, tq)?;
            starts
                .windows(2)
                .map(|w| LmSeq {
                    batch: 0,
                    q_start: w[0],
                    q_len: w[1] - w[0],
                    k_start: w[0],
                    k_len: w[1] - w[0],
                })
                .collect()
        }
    };
    if device != Device::Cpu {
        return Err(value_error(CUDA_MISSING));
    }
    Ok(Problem {
        b,
        tq,
        tk,
        hq,
        hkv,
        d,
        e,
        dtype,
        state_dtype,
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
        if t.ndim() == 4 {
            expect_unit_last_stride(t, name)?;
        }
        Ok(())
    }

    fn check_indices(&self, bi: Option<&View>) -> Result<(), PyErr> {
        if let Some(bi) = bi {
            expect_shape(
                bi,
                "block_indices",
                &[self.b, self.tq, self.hkv, ANY],
                "[B, Tq, Hkv, n] with q's B, Tq and k's Hkv",
            )?;
            expect_dtype(bi, "block_indices", &[DType::I32])?;
            expect_device(bi, "block_indices", Device::Cpu)?;
        }
        Ok(())
    }

    fn args<'a>(
        &'a self,
        q: &'a View,
        k: &'a View,
        v: &'a View,
        bi: Option<&'a View>,
        block_size: i64,
        scale: f64,
    ) -> LmArgs<'a> {
        LmArgs {
            q,
            k,
            v,
            block_indices: bi,
            seqs: &self.seqs,
            block: block_size as usize,
            scale,
            hq: self.hq,
            hkv: self.hkv,
        }
    }
}

/// Forward: writes out [B, Tq, Hq, E] and lse [B, Tq, Hq].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    lse: &View,
    block_indices: Option<&View>,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check(q, k, Some(v), block_size, cu)?;
    p.check_indices(block_indices)?;
    p.expect(
        out,
        "out",
        &[p.b, p.tq, p.hq, p.e],
        "[B, Tq, Hq, E]",
        p.dtype,
    )?;
    p.expect(lse, "lse", &[p.b, p.tq, p.hq], "[B, Tq, Hq]", p.state_dtype)?;
    let a = p.args(q, k, v, block_indices, block_size, scale);
    kernels::forward(&a, &LmFwd { out, lse });
    Ok(())
}

/// Backward: writes dq, dk, dv from grad_out, lse and delta = Σ_e grad_out·out.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    dout: &View,
    lse: &View,
    delta: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    block_indices: Option<&View>,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check(q, k, Some(v), block_size, cu)?;
    p.check_indices(block_indices)?;
    p.expect(
        dout,
        "grad_out",
        &[p.b, p.tq, p.hq, p.e],
        "[B, Tq, Hq, E]",
        p.dtype,
    )?;
    p.expect(lse, "lse", &[p.b, p.tq, p.hq], "[B, Tq, Hq]", p.state_dtype)?;
    p.expect(
        delta,
        "delta",
        &[p.b, p.tq, p.hq],
        "[B, Tq, Hq]",
        p.state_dtype,
    )?;
    p.expect(dq, "dq", &[p.b, p.tq, p.hq, p.d], "like q", p.dtype)?;
    p.expect(dk, "dk", &[p.b, p.tk, p.hkv, p.d], "like k", p.dtype)?;
    p.expect(dv, "dv", &[p.b, p.tk, p.hkv, p.e], "like v", p.dtype)?;
    let a = p.args(q, k, v, block_indices, block_size, scale);
    let g = LmBwd {
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
    };
    kernels::backward(&a, &g);
    Ok(())
}

/// Top-k landmark blocks: writes out [B, Tq, Hkv, topk] int32.
pub fn topk_blocks(
    q: &View,
    k: &View,
    out: &View,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check(q, k, None, block_size, cu)?;
    expect_shape(
        out,
        "out",
        &[p.b, p.tq, p.hkv, ANY],
        "[B, Tq, Hkv, topk] with q's B, Tq and k's Hkv",
    )?;
    expect_dtype(out, "out", &[DType::I32])?;
    expect_device(out, "out", Device::Cpu)?;
    let a = LmTopk {
        q,
        k,
        out,
        seqs: &p.seqs,
        block: block_size as usize,
        scale,
        hq: p.hq,
        hkv: p.hkv,
    };
    kernels::topk_blocks(&a);
    Ok(())
}
