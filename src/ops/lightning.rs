//! lightning_attn: argument checks and dispatch. The forward is one linear-attention pass; the
//! backward is three (dQ forward, dK and dV reverse: docs/api/lightning.md, "How it is
//! computed"), each with the same kernel.

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_rank, expect_shape,
    expect_tensor, expect_unit_last_stride, float_dtypes, read_cu_seqlens, value_error,
};
use crate::cpu::lightning::{la_pass, LaPass, Seq, DOT_SLOTS};
use crate::cuda;
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;
const ANY: usize = usize::MAX;

/// Validated problem sizes shared by the forward and the backward.
struct Problem {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    e: usize,
    device: Device,
    dtype: DType,
    state_dtype: DType,
    /// Number of sequences (B, or len(cu_seqlens) − 1).
    n: usize,
    /// CPU only: the sequences, from cu_seqlens or one per batch row.
    seqs: Vec<Seq>,
}

fn check(q: &View, k: &View, v: &View, slopes: &View, cu: Option<&View>) -> Result<Problem, PyErr> {
    expect_rank(q, "q", 4, "[B, T, H, D]")?;
    let (b, t, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let device = q.device;
    expect_dtype(q, "q", float_dtypes(device))?;
    let dtype = q.dtype;
    let state_dtype = accumulator_dtype(dtype);
    expect_shape(k, "k", &[b, t, h, d], "same as q")?;
    expect_shape(v, "v", &[b, t, h, ANY], "[B, T, H, E] with q's B, T, H")?;
    let e = v.shape[3];
    for (name, size) in [("q", d), ("v", e)] {
        if size == 0 || size > MAX_HEAD_DIM {
            return Err(value_error(format!(
                "{name}: head dim must be between 1 and {MAX_HEAD_DIM}, got {size}"
            )));
        }
    }
    if h == 0 {
        return Err(value_error("q: number of heads must be at least 1"));
    }
    for (t_, name) in [(k, "k"), (v, "v")] {
        expect_dtype(t_, name, &[dtype])?;
        expect_device(t_, name, device)?;
    }
    for (t_, name) in [(q, "q"), (k, "k"), (v, "v")] {
        expect_unit_last_stride(t_, name)?;
    }
    expect_shape(slopes, "slopes", &[h], "one decay slope per head")?;
    expect_dtype(slopes, "slopes", &[state_dtype])?;
    expect_device(slopes, "slopes", device)?;
    let (n, seqs) = match cu {
        None => (
            b,
            (0..b)
                .map(|i| Seq {
                    batch: i,
                    start: 0,
                    len: t,
                })
                .collect(),
        ),
        Some(cu) => {
            check_cu_seqlens(cu, device, b)?;
            let n = cu.shape[0] - 1;
            let seqs = if device == Device::Cpu {
                let starts = read_cu_seqlens(cu, t)?;
                starts
                    .windows(2)
                    .map(|w| Seq {
                        batch: 0,
                        start: w[0],
                        len: w[1] - w[0],
                    })
                    .collect()
            } else {
                Vec::new() // the kernel reads cu_seqlens on the device (no host synchronisation)
            };
            (n, seqs)
        }
    };
    if n > 65535 || h > 65535 {
        return Err(value_error(format!(
            "q: at most 65535 sequences and heads are supported, got {n} and {h}"
        )));
    }
    Ok(Problem {
        b,
        t,
        h,
        d,
        e,
        device,
        dtype,
        state_dtype,
        n,
        seqs,
    })
}

impl Problem {
    fn expect_like(
        &self,
        t: &View,
        name: &str,
        shape: &[usize],
        what: &str,
        dtype: DType,
    ) -> Result<(), PyErr> {
        expect_tensor(t, name, shape, what, dtype, self.device)?;
        Ok(())
    }

    /// A [B, T, H, dim] tensor in the input dtype (kernels need its last stride to be 1).
    fn expect_tokens(&self, t: &View, name: &str, dim: usize, what: &str) -> Result<(), PyErr> {
        self.expect_like(t, name, &self.tokens(dim), what, self.dtype)?;
        expect_unit_last_stride(t, name)
    }

    fn tokens(&self, dim: usize) -> [usize; 4] {
        [self.b, self.t, self.h, dim]
    }

    fn state(&self) -> [usize; 4] {
        [self.n, self.h, self.d, self.e]
    }

    fn run(&self, pass: &LaPass, cu: Option<&View>, stream: usize) -> Result<(), PyErr> {
        match self.device {
            Device::Cpu => {
                la_pass(pass);
                Ok(())
            }
            Device::Cuda(ordinal) => {
                launch(pass, ordinal, cu, self.n, self.t, stream).map_err(value_error)
            }
        }
    }
}

/// Same tensor with the last two dimensions swapped (a transposed state, no copy).
fn transposed(t: &View) -> View {
    let mut v = t.clone();
    let r = v.shape.len();
    v.shape.swap(r - 2, r - 1);
    v.strides.swap(r - 2, r - 1);
    v
}

#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &View,
    k: &View,
    v: &View,
    slopes: &View,
    out: &View,
    state_in: Option<&View>,
    state_out: &View,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, v, slopes, cu)?;
    p.expect_tokens(out, "out", p.e, "like v")?;
    if let Some(s) = state_in {
        p.expect_like(
            s,
            "initial_state",
            &p.state(),
            "[N, H, D, E]",
            p.state_dtype,
        )?;
    }
    p.expect_like(
        state_out,
        "final_state",
        &p.state(),
        "[N, H, D, E]",
        p.state_dtype,
    )?;
    let pass = LaPass {
        q,
        k,
        v,
        out,
        slopes,
        state_in,
        state_out: Some(state_out),
        dot: None,
        seqs: &p.seqs,
        reverse: false,
        scale_out: scale,
        scale_kv: 1.0,
    };
    p.run(&pass, cu, stream)
}

/// Gradients of lightning_attn. `partial_q`/`partial_k` ([N, H, DOT_SLOTS], zeroed) receive the
/// slope-gradient sums Σ_t (t+1)⟨q_t, dq_t⟩ and Σ_t (t+1)⟨k_t, dk_t⟩ (the caller finishes
/// dslopes from them and the final-state term).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    slopes: &View,
    dout: &View,
    state_in: Option<&View>,
    d_state_out: Option<&View>,
    dq: &View,
    dk: &View,
    dv: &View,
    d_state_in: &View,
    partial_q: &View,
    partial_k: &View,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, v, slopes, cu)?;
    p.expect_tokens(dout, "grad_out", p.e, "like v")?;
    if let Some(s) = state_in {
        p.expect_like(
            s,
            "initial_state",
            &p.state(),
            "[N, H, D, E]",
            p.state_dtype,
        )?;
    }
    if let Some(s) = d_state_out {
        p.expect_like(
            s,
            "grad_final_state",
            &p.state(),
            "[N, H, D, E]",
            p.state_dtype,
        )?;
    }
    p.expect_tokens(dq, "dq", p.d, "like q")?;
    p.expect_tokens(dk, "dk", p.d, "like k")?;
    p.expect_tokens(dv, "dv", p.e, "like v")?;
    p.expect_like(
        d_state_in,
        "grad_initial_state",
        &p.state(),
        "[N, H, D, E]",
        p.state_dtype,
    )?;
    for (t, name) in [(partial_q, "partial_q"), (partial_k, "partial_k")] {
        p.expect_like(t, name, &[p.n, p.h, DOT_SLOTS], "[N, H, 8]", p.state_dtype)?;
    }
    let s0_t = state_in.map(transposed);
    let ds_t = d_state_out.map(transposed);
    // dq_t = scale · S_t do_t: a forward pass with (q, k, v) = (do, v, k) from S0ᵀ.
    let pass_q = LaPass {
        q: dout,
        k: v,
        v: k,
        out: dq,
        slopes,
        state_in: s0_t.as_ref(),
        state_out: None,
        dot: Some((q, partial_q)),
        seqs: &p.seqs,
        reverse: false,
        scale_out: scale,
        scale_kv: 1.0,
    };
    // dk_j = G_j v_j, G the reverse state of scale·q doᵀ from dS_T: (q, k, v) = (v, do, q).
    let pass_k = LaPass {
        q: v,
        k: dout,
        v: q,
        out: dk,
        state_in: ds_t.as_ref(),
        dot: Some((k, partial_k)),
        reverse: true,
        scale_out: 1.0,
        scale_kv: scale,
        ..pass_q
    };
    // dv_j = G_jᵀ k_j: (q, k, v) = (k, q, do); its final state is dS0 = λ G_0.
    let pass_v = LaPass {
        q: k,
        k: q,
        v: dout,
        out: dv,
        state_in: d_state_out,
        state_out: Some(d_state_in),
        dot: None,
        ..pass_k
    };
    for pass in [&pass_q, &pass_k, &pass_v] {
        p.run(pass, cu, stream)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CUDA

const SOURCE: &str = include_str!("../../cuda/lightning.cu");
const BLOCK: usize = 64;
/// Threads of the decode kernel (DECODE_THREADS in cuda/lightning.cu).
const DECODE_THREADS: u32 = 256;

/// Kernel parameters, laid out exactly like `LaParams` in cuda/lightning.cu.
#[repr(C)]
struct LaParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    x: u64,
    slopes: u64,
    state_in: u64,
    state_out: u64,
    partial: u64,
    cu_seqlens: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sv: [i64; 3],
    so: [i64; 3],
    sx: [i64; 3],
    ssi: [i64; 4],
    sso: [i64; 4],
    sp: [i64; 3],
    t: i32,
    h: i32,
    d: i32,
    e: i32,
    cu_kind: i32,
    has_state_in: i32,
    has_state_out: i32,
    has_dot: i32,
    vec_q: i32,
    vec_k: i32,
    vec_v: i32,
    vec_x: i32,
    scale_out: f32,
    scale_kv: f32,
}

/// Compile-time configuration of one kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub elem: u32,
    pub dk: usize,
    pub dvt: usize,
    pub reverse: bool,
    pub stages: usize,
}

/// Benchmark-only overrides of the tile choice: LONGATTN_LA_DVT (32 or 64) and
/// LONGATTN_LA_STAGES (1 or 2).
struct Tuning {
    dvt: Option<usize>,
    stages: Option<usize>,
}

static TUNING: std::sync::LazyLock<Tuning> = std::sync::LazyLock::new(|| {
    let read = |name: &str, allowed: &[usize]| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|v| allowed.contains(v))
    };
    Tuning {
        dvt: read("LONGATTN_LA_DVT", &[32, 64]),
        stages: read("LONGATTN_LA_STAGES", &[1, 2]),
    }
});

impl Variant {
    /// The variant for one pass. `ctas_per_value_tile` is sequences × heads: the grid has that
    /// many CTAs per value tile, and wide (64) tiles pay off only when they still fill the GPU.
    fn new(
        dtype: DType,
        d: usize,
        e: usize,
        reverse: bool,
        ctas_per_value_tile: usize,
        sm_count: u32,
    ) -> Variant {
        let elem = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        };
        let dk = match d {
            0..=64 => d.div_ceil(16) * 16,
            65..=96 => 96,
            97..=128 => 128,
            129..=192 => 192,
            _ => 256,
        };
        // The state tile (dk x dvt floats) lives in registers, so large dk takes 32.
        let wide_fills = 2 * ctas_per_value_tile * e.div_ceil(64) >= 3 * sm_count as usize;
        let dvt = TUNING.dvt.unwrap_or(if dk <= 128 && e > 32 && wide_fills {
            64
        } else {
            32
        });
        Variant::with(elem, dk, dvt, reverse)
    }

    /// One stage by default: measured on the H200, the extra CTA per SM that a single buffer
    /// allows beats prefetching the next chunk.
    fn with(elem: u32, dk: usize, dvt: usize, reverse: bool) -> Variant {
        let mut v = Variant {
            elem,
            dk,
            dvt,
            reverse,
            stages: TUNING.stages.unwrap_or(1),
        };
        // the stage override is for benchmarks on Hopper; the driver refuses what the device lacks
        if v.smem_bytes(true) as usize > cuda::smem_limit("sm_90a") {
            v.stages = 1;
        }
        v
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        vec![
            ("LA_ELEM".into(), self.elem.to_string()),
            ("LA_DK".into(), self.dk.to_string()),
            ("LA_DVT".into(), self.dvt.to_string()),
            ("LA_REVERSE".into(), (self.reverse as u32).to_string()),
            ("LA_STAGES".into(), self.stages.to_string()),
            cuda::mirror_size::<LaParams>("LaParams"),
        ]
    }

    /// Dynamic shared memory: the state tile plus `stages` buffers of Q, K, V (and X with `dot`).
    fn smem_bytes(&self, dot: bool) -> u32 {
        let (size, pad) = if self.elem == 0 { (4, 4) } else { (2, 8) };
        let value_tiles = if dot { 2 } else { 1 };
        let stage = 2 * BLOCK * (self.dk + pad) + value_tiles * BLOCK * (self.dvt + pad);
        ((self.stages * stage + self.dvt * (self.dk + pad)) * size) as u32
    }

    /// Every variant the dispatcher can choose (compiled by CI for sm_80 and sm_90a).
    pub fn all() -> Vec<Variant> {
        let mut out = Vec::new();
        for elem in 0..3 {
            for dk in [16, 32, 48, 64, 96, 128, 192, 256] {
                let widths: &[usize] = if dk <= 128 { &[32, 64] } else { &[32] };
                for &dvt in widths {
                    for reverse in [false, true] {
                        out.push(Variant::with(elem, dk, dvt, reverse));
                    }
                }
            }
        }
        out
    }
}

pub fn compile_variant(v: &Variant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin("lightning.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

fn launch(
    p: &LaPass,
    ordinal: i32,
    cu: Option<&View>,
    n: usize,
    t: usize,
    stream: usize,
) -> Result<(), String> {
    let dev = cuda::device(ordinal)?;
    let (b, h, dk, dv) = (p.q.shape[0], p.q.shape[2], p.q.shape[3], p.v.shape[3]);
    let variant = Variant::new(p.q.dtype, dk, dv, p.reverse, n * h, dev.sm_count);
    let smem = variant.smem_bytes(p.dot.is_some());
    let kernels = dev.kernels(
        "lightning.cu",
        SOURCE,
        &variant.defines(),
        &[("la_pass", variant.smem_bytes(true)), ("la_decode", 0)],
    )?;
    let params = LaParams {
        q: p.q.addr(),
        k: p.k.addr(),
        v: p.v.addr(),
        out: p.out.addr(),
        x: p.dot.map_or(0, |(x, _)| x.addr()),
        slopes: p.slopes.addr(),
        state_in: p.state_in.map_or(0, |s| s.addr()),
        state_out: p.state_out.map_or(0, |s| s.addr()),
        partial: p.dot.map_or(0, |(_, part)| part.addr()),
        cu_seqlens: cu.map_or(0, |c| c.addr()),
        sq: cuda::strides(p.q),
        sk: cuda::strides(p.k),
        sv: cuda::strides(p.v),
        so: cuda::strides(p.out),
        sx: p.dot.map_or([0; 3], |(x, _)| cuda::strides(x)),
        ssi: cuda::opt_strides(p.state_in),
        sso: cuda::opt_strides(p.state_out),
        sp: p.dot.map_or([0; 3], |(_, part)| {
            [
                part.strides[0] as i64,
                part.strides[1] as i64,
                part.strides[2] as i64,
            ]
        }),
        t: t as i32,
        h: h as i32,
        d: dk as i32,
        e: dv as i32,
        cu_kind: cu.map_or(-1, |c| if c.dtype == DType::I64 { 1 } else { 0 }),
        has_state_in: p.state_in.is_some() as i32,
        has_state_out: p.state_out.is_some() as i32,
        has_dot: p.dot.is_some() as i32,
        vec_q: cuda::rows_aligned(p.q) as i32,
        vec_k: cuda::rows_aligned(p.k) as i32,
        vec_v: cuda::rows_aligned(p.v) as i32,
        vec_x: p.dot.is_some_and(|(x, _)| cuda::rows_aligned(x)) as i32,
        scale_out: p.scale_out as f32,
        scale_kv: p.scale_kv as f32,
    };
    if n == 0 || (t == 0 && cu.is_none() && p.state_out.is_none() && p.dot.is_none()) {
        return Ok(());
    }
    let decode = t == 1 && cu.is_none() && !p.reverse && p.dot.is_none();
    // SAFETY: params mirrors LaParams; all pointers come from validated tensors on this device.
    unsafe {
        if decode {
            let grid = (dv.div_ceil(32) as u32, h as u32, b as u32);
            dev.launch(
                kernels.get("la_decode")?,
                grid,
                DECODE_THREADS,
                0,
                stream,
                &params,
            )
        } else {
            let grid = (dv.div_ceil(variant.dvt) as u32, h as u32, n as u32);
            dev.launch(kernels.get("la_pass")?, grid, 128, smem, stream, &params)
        }
    }
}
