//! NSA compression (mean, or linear with an optional position embedding): checks and dispatch
//! to the CPU kernels or cuda/nsa_select.cu.

use super::*;

/// Tensors of one compression call on CUDA.
struct CmpArgs<'a> {
    x: &'a View,
    weight: Option<&'a View>,
    pe: Option<&'a View>,
    /// forward: out; backward: grad_out ([B, R, H, D_out])
    out_or_dout: &'a View,
    cu: Option<&'a View>,
    cu_cmp: Option<&'a View>,
    size: usize,
    stride: usize,
}

/// With cu_seqlens on CUDA, the compressed offsets [N + 1] (same dtype) are required.
fn expect_cu_cmp<'a>(
    cu: Option<&View>,
    cu_cmp: Option<&'a View>,
    x: &View,
) -> Result<Option<&'a View>, PyErr> {
    match (cu, cu_cmp) {
        (None, _) => Ok(None),
        (Some(cu), Some(cc)) => {
            expect_tensor(
                cc,
                "cu_seqlens_cmp",
                &cu.shape,
                "[N + 1] like cu_seqlens",
                cu.dtype,
                x.device,
            )?;
            Ok(Some(cc))
        }
        (Some(_), None) => Err(value_error(
            "cu_seqlens_cmp: required with cu_seqlens on CUDA (the compressed offsets)",
        )),
    }
}

/// The size define of `CmpParams` for cuda/nsa_select.cu's layout check.
pub(super) fn params_mirror_size() -> (String, String) {
    cuda::mirror_size::<CmpParams>("CmpParams")
}

/// Parameters of the compression kernels, laid out exactly like `CmpParams`.
#[repr(C)]
struct CmpParams {
    x: u64,
    w: u64,
    pe: u64,
    dout: u64,
    out: u64,
    dx: u64,
    dw: u64,
    dpe: u64,
    gbuf: u64,
    cu: u64,
    cu_cmp: u64,
    sx: [i64; 3],
    so: [i64; 3],
    sdx: [i64; 3],
    sw: [i64; 2],
    sdw: [i64; 2],
    sp: [i64; 2],
    sdp: [i64; 2],
    b: i32,
    t: i32,
    h: i32,
    d: i32,
    dout_dim: i32,
    l: i32,
    s: i32,
    r: i32,
    n_seq: i32,
    cu_kind: i32,
    has_pe: i32,
}

fn cmp_params(a: &CmpArgs) -> Result<CmpParams, PyErr> {
    let x = a.x;
    let (b, t, h, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let r = a.out_or_dout.shape[1];
    let dout_dim = a.out_or_dout.shape[3];
    if t > i32::MAX as usize / 2 || r > i32::MAX as usize / 2 || b * h > 65535 {
        return Err(value_error(
            "nsa_compress: T, the compressed rows and B·H are too large for the CUDA kernels",
        ));
    }
    Ok(CmpParams {
        x: x.addr(),
        w: a.weight.map_or(0, |w| w.addr()),
        pe: a.pe.map_or(0, |w| w.addr()),
        dout: a.out_or_dout.addr(),
        out: a.out_or_dout.addr(),
        dx: 0,
        dw: 0,
        dpe: 0,
        gbuf: 0,
        cu: a.cu.map_or(0, |c| c.addr()),
        cu_cmp: a.cu_cmp.map_or(0, |c| c.addr()),
        sx: cuda::strides(x),
        so: cuda::strides(a.out_or_dout),
        sdx: [0; 3],
        sw: cuda::opt_strides(a.weight),
        sdw: [0; 2],
        sp: cuda::opt_strides(a.pe),
        sdp: [0; 2],
        b: b as i32,
        t: t as i32,
        h: h as i32,
        d: d as i32,
        dout_dim: dout_dim as i32,
        l: a.size as i32,
        s: a.stride as i32,
        r: r as i32,
        n_seq: a.cu.map_or(b, |c| c.shape[0] - 1) as i32,
        cu_kind: cuda::int_kind(a.cu),
        has_pe: a.pe.is_some() as i32,
    })
}

const CMP_KERNELS: &[(&str, u32)] = &[
    ("nsa_cmp_mean_fwd", 0),
    ("nsa_cmp_linear_fwd", 0),
    ("nsa_cmp_linear_dg", 0),
    ("nsa_cmp_dx_mean", 0),
    ("nsa_cmp_dx_linear", 0),
    ("nsa_cmp_linear_dw", 0),
    ("nsa_cmp_linear_dpe", 0),
];

fn compress_forward_cuda(a: &CmpArgs, ordinal: i32, stream: usize) -> Result<(), PyErr> {
    let p = cmp_params(a)?;
    let (b, h, r) = (p.b as u32, p.h as u32, p.r as u32);
    if b == 0 || r == 0 || h == 0 || p.dout_dim == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal).map_err(cuda_err)?;
    let v = SelVariant::compress(a.x.dtype);
    let k = dev
        .kernels("nsa_select.cu", SEL_SOURCE, &v.defines(), CMP_KERNELS)
        .map_err(cuda_err)?;
    // SAFETY: p mirrors CmpParams; pointers come from validated tensors on this device.
    unsafe {
        if a.weight.is_none() {
            let f = k.get("nsa_cmp_mean_fwd").map_err(cuda_err)?;
            dev.launch(f, (r.div_ceil(8), h, b), CMP_THREADS, 0, stream, &p)
        } else {
            let f = k.get("nsa_cmp_linear_fwd").map_err(cuda_err)?;
            let grid = (r.div_ceil(64), (p.dout_dim as u32).div_ceil(64), b * h);
            dev.launch(f, grid, CMP_THREADS, 0, stream, &p)
        }
    }
    .map_err(cuda_err)
}

#[allow(clippy::too_many_arguments)]
fn compress_backward_cuda(
    a: &CmpArgs,
    dx: &View,
    dweight: Option<&View>,
    dpe: Option<&View>,
    scratch: Option<&View>,
    ordinal: i32,
    stream: usize,
) -> Result<(), PyErr> {
    let mut p = cmp_params(a)?;
    p.dx = dx.addr();
    p.sdx = cuda::strides(dx);
    p.dw = dweight.map_or(0, |w| w.addr());
    p.sdw = cuda::opt_strides(dweight);
    p.dpe = dpe.map_or(0, |w| w.addr());
    p.sdp = cuda::opt_strides(dpe);
    let (b, t, h, r) = (p.b as u32, p.t as u32, p.h as u32, p.r as u32);
    let kdim = (p.l * p.d) as u32;
    if h == 0 {
        return Ok(());
    }
    if a.weight.is_some() {
        let want = [b as usize, r as usize, h as usize, kdim as usize];
        let s = scratch.ok_or_else(|| {
            value_error("scratch: a float32 [B, C, H, kernel_size·D] buffer is required")
        })?;
        expect_tensor(
            s,
            "scratch",
            &want,
            "[B, C, H, kernel_size·D]",
            DType::F32,
            a.x.device,
        )?;
        if s.numel() > 0
            && s.strides
                != [
                    (r * h * kdim) as isize,
                    (h * kdim) as isize,
                    kdim as isize,
                    1,
                ]
        {
            return Err(value_error("scratch: must be contiguous"));
        }
        p.gbuf = s.addr();
    }
    let dev = cuda::device(ordinal).map_err(cuda_err)?;
    let v = SelVariant::compress(a.x.dtype);
    let k = dev
        .kernels("nsa_select.cu", SEL_SOURCE, &v.defines(), CMP_KERNELS)
        .map_err(cuda_err)?;
    let launch = |name: &str, grid: (u32, u32, u32)| -> Result<(), PyErr> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = k.get(name).map_err(cuda_err)?;
        // SAFETY: p mirrors CmpParams; pointers come from validated tensors on this device.
        unsafe { dev.launch(f, grid, CMP_THREADS, 0, stream, &p) }.map_err(cuda_err)
    };
    if a.weight.is_none() {
        return launch("nsa_cmp_dx_mean", (t.div_ceil(8), h, b));
    }
    launch(
        "nsa_cmp_linear_dg",
        (r.div_ceil(64), kdim.div_ceil(64), b * h),
    )?;
    launch("nsa_cmp_dx_linear", (t.div_ceil(8), h, b))?;
    if dweight.is_some() {
        launch(
            "nsa_cmp_linear_dw",
            (kdim.div_ceil(64), (p.dout_dim as u32).div_ceil(64), h),
        )?;
    }
    if dpe.is_some() {
        launch("nsa_cmp_linear_dpe", (kdim.div_ceil(CMP_THREADS), h, 1))?;
    }
    Ok(())
}

struct CompressProblem {
    seqs: Vec<NsaSeq>,
    dout: usize,
}

fn check_compress(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> Result<CompressProblem, PyErr> {
    let dev = x.device;
    expect_sel_tokens(x, "x", "[B, T, H, D]", dev)?;
    expect_positive("kernel_size", size)?;
    expect_positive("kernel_stride", stride)?;
    let (b, t, h, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    expect_head_dim("x", d)?;
    let mut dout = d;
    if let Some(w) = weight {
        expect_shape(
            w,
            "weight",
            &[h, size * d, ANY],
            "[H, kernel_size·D, D_out]",
        )?;
        expect_dtype(w, "weight", &[x.dtype])?;
        expect_device(w, "weight", dev)?;
        expect_unit_last_stride(w, "weight")?;
        dout = w.shape[2];
        expect_head_dim("weight", dout)?;
    }
    if let Some(pe) = pe {
        if weight.is_none() {
            return Err(value_error(
                "pe: only used with weight (linear compression)",
            ));
        }
        expect_tensor(pe, "pe", &[h, size, d], "[H, kernel_size, D]", x.dtype, dev)?;
        expect_unit_last_stride(pe, "pe")?;
    }
    let seqs = if dev == Device::Cpu {
        sequences(b, t, cu, Some((size, stride)), num_windows(t, size, stride))?
    } else {
        if let Some(cu) = cu {
            check_cu_seqlens(cu, dev, b)?;
        }
        Vec::new() // CUDA: the kernels read cu_seqlens and cu_seqlens_cmp on the device
    };
    Ok(CompressProblem { seqs, dout })
}

fn out_rows(seqs: &[NsaSeq], cu: Option<&View>, batch_windows: usize) -> usize {
    if cu.is_some() {
        seqs.iter().map(|s| s.clen).sum()
    } else {
        batch_windows
    }
}

/// Compressed rows of the output: on CUDA with cu_seqlens the count comes from the output
/// tensor (the wrapper sized it from cu_seqlens_cmp), which the kernels never read past.
fn compress_rows(
    p: &CompressProblem,
    x: &View,
    out: &View,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> usize {
    if x.device != Device::Cpu && cu.is_some() {
        out.shape.get(1).copied().unwrap_or(0)
    } else {
        out_rows(&p.seqs, cu, num_windows(x.shape[1], size, stride))
    }
}

#[allow(clippy::too_many_arguments)]
pub fn compress_forward(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    out: &View,
    size: usize,
    stride: usize,
    cu: Option<&View>,
    cu_cmp: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let c = compress_rows(&p, x, out, size, stride, cu);
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_tensor(out, "out", &shape, "[B, C, H, D_out]", x.dtype, x.device)?;
    expect_unit_last_stride(out, "out")?;
    if let Device::Cuda(ordinal) = x.device {
        let cmp = CmpArgs {
            x,
            weight,
            pe,
            out_or_dout: out,
            cu,
            cu_cmp: expect_cu_cmp(cu, cu_cmp, x)?,
            size,
            stride,
        };
        return compress_forward_cuda(&cmp, ordinal, stream);
    }
    compress_fwd(&Compress {
        x,
        weight,
        pe,
        out,
        seqs: &p.seqs,
        size,
        stride,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn compress_backward(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    dout: &View,
    dx: &View,
    dweight: Option<&View>,
    dpe: Option<&View>,
    size: usize,
    stride: usize,
    cu: Option<&View>,
    cu_cmp: Option<&View>,
    scratch: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let dev = x.device;
    let c = compress_rows(&p, x, dout, size, stride, cu);
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_tensor(dout, "grad_out", &shape, "[B, C, H, D_out]", x.dtype, dev)?;
    expect_unit_last_stride(dout, "grad_out")?;
    expect_tensor(dx, "dx", &x.shape, "like x", x.dtype, dev)?;
    expect_unit_last_stride(dx, "dx")?;
    if let Some(dw) = dweight {
        let w = weight.ok_or_else(|| value_error("dweight: given without weight"))?;
        expect_tensor(dw, "dweight", &w.shape, "like weight", x.dtype, dev)?;
        expect_unit_last_stride(dw, "dweight")?;
    }
    if let Some(dp) = dpe {
        let pe = pe.ok_or_else(|| value_error("dpe: given without pe"))?;
        expect_tensor(dp, "dpe", &pe.shape, "like pe", x.dtype, dev)?;
        expect_unit_last_stride(dp, "dpe")?;
    }
    if let Device::Cuda(ordinal) = dev {
        let cmp = CmpArgs {
            x,
            weight,
            pe,
            out_or_dout: dout,
            cu,
            cu_cmp: expect_cu_cmp(cu, cu_cmp, x)?,
            size,
            stride,
        };
        return compress_backward_cuda(&cmp, dx, dweight, dpe, scratch, ordinal, stream);
    }
    compress_bwd(&CompressBwd {
        x,
        weight,
        pe,
        dout,
        dx,
        dweight,
        dpe,
        seqs: &p.seqs,
        size,
        stride,
    });
    Ok(())
}
