//! CUDA runtime: primary context per device (shared with torch), NVRTC compilation to CUBIN for
//! the device's exact architecture, an in-memory and on-disk module cache, and launches on the
//! caller's (torch's current) stream without any host synchronisation.

use cudarc::driver::{result as drv, sys as dsys, CudaContext, CudaFunction, CudaModule};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex};

use crate::tensor::{DType, View};

pub mod nvrtc;

pub type CudaResult<T> = Result<T, String>;

/// Shared kernel headers, embedded at build time and inlined by `source`, in dependency order
/// (each is included once, by the file or header before it).
const HEADERS: [(&str, &str); 5] = [
    (
        "attn_bwd_sm90.cuh",
        include_str!("../../cuda/attn_bwd_sm90.cuh"),
    ),
    ("attn_sm90.cuh", include_str!("../../cuda/attn_sm90.cuh")),
    ("sm90.cuh", include_str!("../../cuda/sm90.cuh")),
    ("sm90_wgmma.cuh", include_str!("../../cuda/sm90_wgmma.cuh")),
    ("common.cuh", include_str!("../../cuda/common.cuh")),
];

/// Full translation unit for a kernel source file (headers inlined once each, as `#pragma once`
/// would: NVRTC gets no include path). A header comes before the headers it includes.
pub fn source(body: &str) -> String {
    HEADERS.iter().fold(body.to_string(), |src, (name, text)| {
        let include = format!("#include \"{name}\"");
        match src.find(&include) {
            Some(at) => {
                let rest = src[at + include.len()..].replace(&include, "");
                format!("{}{text}{rest}", &src[..at])
            }
            None => src,
        }
    })
}

/// Whether Hopper GPUs run the attention engine when `LONGATTN_SM90` is unset. Off while the
/// engine's current kernels (the FA3-order forward, the range-branch backward, the compressed
/// branch) have not yet run on a GPU: they compile to wgmma/TMA code without spills and their
/// barrier protocols are model-checked (tests/test_sm90_protocol.py), but only a GPU run of the
/// CUDA tests and compute-sanitizer can turn them on for everyone.
const SM90_BY_DEFAULT: bool = false;

/// Whether a Hopper GPU runs the attention engine (cuda/attn_sm90.cuh, attn_bwd_sm90.cuh):
/// `LONGATTN_SM90=1` turns it on, `=0` off, unset leaves SM90_BY_DEFAULT;
/// `LONGATTN_FORCE_SM80` set (and not "0") forces the sm_80 (mma.sync) kernels, so that path is
/// tested on Hopper too. Read on every call.
pub fn sm90_enabled() -> bool {
    if std::env::var("LONGATTN_FORCE_SM80").is_ok_and(|v| !v.is_empty() && v != "0") {
        return false;
    }
    match std::env::var("LONGATTN_SM90").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => SM90_BY_DEFAULT,
    }
}

/// `LONGATTN_LANDMARK_SM90=1`: landmark_attn's forward runs on the Hopper engine. Off by default:
/// the engine's landmark policy is exact but was measured many times slower than the sm_80 kernel
/// on an H100 (docs/benchmarks.md; a launch-grid bug since fixed, not re-measured); the switch
/// keeps it tested until it is measured faster.
pub fn landmark_sm90_enabled() -> bool {
    std::env::var("LONGATTN_LANDMARK_SM90").is_ok_and(|v| v == "1")
}

/// `LONGATTN_SM90_PINGPONG=1`: the Hopper forward's consumer warpgroups take turns issuing their
/// GEMMs (SM90_PINGPONG in cuda/attn_sm90.cuh); off by default until measured faster. Read on
/// every call (each setting is its own module).
pub fn sm90_pingpong() -> bool {
    std::env::var("LONGATTN_SM90_PINGPONG").is_ok_and(|v| v == "1")
}

/// The defines every Hopper-engine module gets beside its family's own: the schedule, and the
/// tile and thread counts that this side sizes grids, TMA boxes and row tables with (the kernels
/// take them from here, so the two sides agree by construction).
pub fn sm90_common_defines() -> Vec<(String, String)> {
    [
        ("SM90_PINGPONG", sm90_pingpong() as usize),
        ("SM90_BM", SM90_BM),
        ("SM90_THREADS", SM90_THREADS as usize),
        ("SM90_BWD_FIXED", SM90_BWD_FIXED),
        ("SM90_BWD_STREAM", SM90_BWD_STREAM),
        ("SM90_ROWINFO_PLANES", SM90_ROWINFO_PLANES),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Dynamic shared memory a CTA may use, by architecture (the opt-in maximum).
pub fn smem_limit(arch: &str) -> usize {
    if arch.starts_with("sm_90") || arch.starts_with("sm_100") {
        227 * 1024
    } else if arch == "sm_80" || arch == "sm_87" {
        163 * 1024
    } else {
        99 * 1024
    }
}

/// `<name>_BYTES`, the size of a `#[repr(C)]` kernel parameter struct, as a define for its kernel
/// source, which checks its own struct against it (`CHECK_MIRROR` in cuda/common.cuh): a field
/// added, dropped or resized on one side only fails to compile.
pub fn mirror_size<P>(name: &str) -> (String, String) {
    (
        format!("{name}_BYTES"),
        std::mem::size_of::<P>().to_string(),
    )
}

/// A TMA descriptor (the driver's CUtensorMap), passed by value inside kernel parameters.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct TmaMap([u64; 16]);

/// cuTensorMapEncodeTiled for a tensor at `ptr`: dims innermost first, byte strides of every
/// dim but the first, boxes of `boxes` elements, zeros past the ends. None where the driver
/// refuses the layout.
fn encode_tiled(
    ty: dsys::CUtensorMapDataType,
    ptr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: dsys::CUtensorMapSwizzle,
) -> Option<TmaMap> {
    use dsys::{
        CUtensorMapFloatOOBfill as Fill, CUtensorMapInterleave as Il, CUtensorMapL2promotion as L2,
    };
    let rank = dims.len();
    if strides.len() + 1 != rank || boxes.len() != rank {
        return None;
    }
    if dims.iter().any(|&n| n == 0 || n > u32::MAX as u64) {
        return None;
    }
    let steps = vec![1u32; rank];
    let mut map = std::mem::MaybeUninit::<dsys::CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length; the address is only recorded, not read.
    let rc = unsafe {
        dsys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ty,
            rank as u32,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            Il::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            L2::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            Fill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if rc != dsys::CUresult::CUDA_SUCCESS {
        return None;
    }
    // SAFETY: initialised by the successful encode; CUtensorMap is 128 bytes of plain data.
    Some(unsafe { std::mem::transmute::<dsys::CUtensorMap, TmaMap>(map.assume_init()) })
}

/// The TMA descriptor of a 16-bit [B, T, H, D] tensor for boxes of `rows` tokens × 64 elements
/// of one head, 128-byte swizzled (the layout wgmma reads), zeros past the tensor's ends. None
/// where TMA cannot describe the layout (unaligned base or strides): callers fall back to the
/// sm_80 kernels.
pub fn tma_map(t: &View, rows: u32) -> Option<TmaMap> {
    use dsys::{CUtensorMapDataType as Ty, CUtensorMapSwizzle as Sw};
    let ty = match t.dtype {
        DType::F16 => Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::BF16 => Ty::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => return None,
    };
    if t.ndim() != 4 || t.strides[3] != 1 || t.addr() % 16 != 0 {
        return None;
    }
    // innermost first: D, H, T, B
    let dims = [t.shape[3], t.shape[2], t.shape[1], t.shape[0]].map(|n| n as u64);
    let elem_strides = [t.strides[2], t.strides[1], t.strides[0]];
    let mut strides = [0u64; 3];
    let mut span = dims[0] * 2;
    for i in 0..3 {
        let bytes = if dims[i + 1] == 1 {
            span.div_ceil(16) * 16 // never stepped: any legal stride
        } else {
            u64::try_from(elem_strides[i]).ok()? * 2
        };
        if bytes == 0 || bytes % 16 != 0 || bytes >= 1 << 40 {
            return None;
        }
        strides[i] = bytes;
        span = bytes * dims[i + 1];
    }
    let boxes = [64u32, 1, rows, 1];
    encode_tiled(
        ty,
        t.ptr as u64,
        &dims,
        &strides,
        &boxes,
        Sw::CU_TENSOR_MAP_SWIZZLE_128B,
    )
}

/// The TMA descriptor of a float32 row table [rows, SM90_ROWINFO_PLANES, tp] (the Hopper
/// backward's lse, Δ and key range per row) for boxes of 64 rows × all planes, unswizzled. `tp`
/// is a multiple of 64.
pub fn rowinfo_map(t: &View) -> Option<TmaMap> {
    use dsys::{CUtensorMapDataType as Ty, CUtensorMapSwizzle as Sw};
    const PLANES: usize = SM90_ROWINFO_PLANES;
    let contiguous = t.ndim() == 3
        && t.shape[1] == PLANES
        && t.strides[2] == 1
        && t.strides[1] == t.shape[2] as isize
        && t.strides[0] == (PLANES * t.shape[2]) as isize;
    if t.dtype != DType::F32 || !contiguous || t.shape[2] % 64 != 0 || t.addr() % 16 != 0 {
        return None;
    }
    let dims = [t.shape[2] as u64, PLANES as u64, t.shape[0] as u64];
    let strides = [dims[0] * 4, dims[1] * dims[0] * 4];
    let boxes = [SM90_BWD_STREAM as u32, PLANES as u32, 1];
    let ty = Ty::CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
    encode_tiled(
        ty,
        t.ptr as u64,
        &dims,
        &strides,
        &boxes,
        Sw::CU_TENSOR_MAP_SWIZZLE_NONE,
    )
}

/// Kernel parameters of the Hopper backward (cuda/attn_bwd_sm90.cuh, Sm90BwdMaps): the fixed
/// tile's two maps, the streamed tiles' two, the row table's; then the family's parameters.
#[repr(C, align(64))]
pub struct Sm90BwdArgs<P> {
    pub maps: [TmaMap; 5],
    pub p: P,
}

/// Rows of the backward's fixed tile (SM90_BWD_FIXED) and of a streamed tile (SM90_BWD_STREAM).
pub const SM90_BWD_FIXED: usize = 128;
pub const SM90_BWD_STREAM: usize = 64;
/// Planes of the backward's row table (SM90_ROWINFO_PLANES): lse·log2(e), Δ, key range lo, hi.
pub const SM90_ROWINFO_PLANES: usize = 4;

/// Dynamic shared memory of the backward (Sm90BwdLayout): two fixed tiles, two stages of two
/// streamed tiles and a 1024-byte row-table slot, the barriers and the stage table, 1024 bytes
/// of alignment slack.
pub fn sm90_bwd_smem(dp: usize) -> u32 {
    const STAGES: usize = 2;
    let blocks = dp / 64;
    let fixed = SM90_BWD_FIXED * 128 * blocks;
    let stream = SM90_BWD_STREAM * 128 * blocks;
    (2 * fixed + STAGES * (2 * stream + 1024) + 8 * (2 + 2 * STAGES) + 8 * STAGES + 1024) as u32
}

/// Kernel parameters of the Hopper attention engine (cuda/attn_sm90.cuh): the q, k, v tensor
/// maps, then the family's own parameter struct.
#[repr(C, align(64))]
pub struct Sm90Args<P> {
    pub maps: [TmaMap; 3],
    pub p: P,
}

/// Dynamic shared memory of the engine (Sm90Layout in cuda/attn_sm90.cuh): the Q tile, two
/// stages of K and V, the barriers (Q full/empty; K, V full/empty per stage) and the tile table,
/// 1024 bytes of alignment slack.
pub fn sm90_smem(dp: usize, bn: usize) -> u32 {
    const BM: usize = 128;
    const STAGES: usize = 2;
    let blocks = dp / 64;
    (BM * 128 * blocks + 2 * STAGES * bn * 128 * blocks + 8 * (2 + 4 * STAGES) + 4 * STAGES + 1024)
        as u32
}

/// Threads of an engine CTA: a producer warpgroup and two consumer warpgroups.
pub const SM90_THREADS: u32 = 384;

/// Launches of Hopper-engine kernels in this process (tests check which path ran).
pub static SM90_LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Query rows per engine CTA.
pub const SM90_BM: usize = 128;

/// A tensor's first N strides (in elements) as kernel parameters.
pub fn strides<const N: usize>(t: &View) -> [i64; N] {
    let mut out = [0i64; N];
    for (o, s) in out.iter_mut().zip(&t.strides) {
        *o = *s as i64;
    }
    out
}

/// Strides of an optional tensor (zeros when absent: the kernel does not read it).
pub fn opt_strides<const N: usize>(t: Option<&View>) -> [i64; N] {
    t.map_or([0; N], strides)
}

/// Whether every row start of a [B, T, H, D] tensor is 16-byte aligned (vector loads).
pub fn rows_aligned(t: &View) -> bool {
    let elems = 16 / if t.dtype == DType::F32 { 4 } else { 2 };
    t.addr() % 16 == 0 && t.strides[..3].iter().all(|&s| s % elems == 0)
}

/// The dtype flag of an optional integer tensor (cu_seqlens, counts): −1 absent, 0 int32, 1 int64.
pub fn int_kind(t: Option<&View>) -> i32 {
    t.map_or(-1, |t| if t.dtype == DType::I64 { 1 } else { 0 })
}

/// Checks that NVRTC can be opened: CUDA 13's or CUDA 12's (`nvrtc`).
fn ensure_nvrtc() -> CudaResult<()> {
    nvrtc::get().map(|_| ())
}

/// Checks that the driver and NVRTC libraries can be opened (cudarc panics otherwise).
pub fn ensure_libraries() -> CudaResult<()> {
    // The probe opens and closes libcuda (dlopen): once found it stays found, so every launch
    // after the first skips it.
    static DRIVER_FOUND: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !DRIVER_FOUND.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: only probes dlopen.
        if !unsafe { dsys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) was not found".into());
        }
        DRIVER_FOUND.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    ensure_nvrtc()
}

pub fn nvrtc_version() -> CudaResult<(i32, i32)> {
    nvrtc::get().map(|n| n.version)
}

/// Compiles one translation unit to a CUBIN for `arch` (e.g. "sm_90a").
fn compile_cubin(
    name: &str,
    src: &str,
    defines: &[(String, String)],
    arch: &str,
) -> CudaResult<Vec<u8>> {
    compile_with_log(name, src, defines, arch, &[]).map(|(cubin, _)| cubin)
}

/// Compiles with extra NVRTC options; returns the CUBIN and the program log (ptxas's resource
/// report with `--ptxas-options=-v`). Not cached.
pub fn compile_with_log(
    name: &str,
    src: &str,
    defines: &[(String, String)],
    arch: &str,
    extra: &[&str],
) -> CudaResult<(Vec<u8>, String)> {
    let lib = nvrtc::get()?;
    let csrc = CString::new(src).map_err(|e| e.to_string())?;
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "--use_fast_math".to_string(),
    ];
    options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    options.extend(extra.iter().map(|o| o.to_string()));
    let coptions = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let refs: Vec<&CStr> = coptions.iter().map(|o| o.as_c_str()).collect();
    let (cubin, log) = lib.compile_cubin(&cname, &csrc, &refs)?;
    match cubin {
        Ok(c) if !c.is_empty() => Ok((c, log)),
        Ok(_) => Err(format!("NVRTC returned an empty CUBIN for {name}")),
        Err(e) => Err(format!(
            "NVRTC {}.{} failed to compile {name} ({e}) with {options:?}:\n{log}",
            lib.version.0, lib.version.1
        )),
    }
}

/// On-disk cache folder: `$LONGATTN_CACHE_DIR` (empty or "off" disables it), else
/// `~/.cache/longattn`.
fn cache_dir() -> Option<PathBuf> {
    match std::env::var("LONGATTN_CACHE_DIR") {
        Ok(v) if v.is_empty() || v == "off" => None,
        Ok(v) => Some(PathBuf::from(v)),
        Err(_) => {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("longattn"))
        }
    }
}

fn cache_key(
    name: &str,
    src: &str,
    defines: &[(String, String)],
    arch: &str,
) -> CudaResult<String> {
    let (major, minor) = nvrtc_version()?;
    let mut h = Sha256::new();
    for part in [name, src, arch, env!("CARGO_PKG_VERSION")] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    for (k, v) in defines {
        h.update(format!("{k}={v};").as_bytes());
    }
    h.update(format!("nvrtc {major}.{minor}").as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// CUBIN from the disk cache, or compiled and stored there (atomically: temp file + rename).
pub fn cached_cubin(
    name: &str,
    src: &str,
    defines: &[(String, String)],
    arch: &str,
) -> CudaResult<Vec<u8>> {
    let key = cache_key(name, src, defines, arch)?;
    let path = cache_dir().map(|d| d.join(format!("{key}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            return Ok(bytes);
        }
    }
    let cubin = compile_cubin(name, src, defines, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
            let stored = std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::write(&tmp, &cubin))
                .and_then(|_| std::fs::rename(&tmp, p));
            if stored.is_err() {
                let _ = std::fs::remove_file(&tmp); // a read-only cache only costs recompiles
            }
        }
    }
    Ok(cubin)
}

/// A loaded module: functions by name, each with its dynamic shared memory limit raised.
pub struct Kernels {
    _module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

impl Kernels {
    pub fn get(&self, name: &str) -> CudaResult<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| format!("kernel {name} missing from module"))
    }
}

/// What identifies a loaded module: source name, defines, and the functions loaded from it with
/// their shared-memory caps.
struct ModuleKey {
    name: String,
    defines: Vec<(String, String)>,
    functions: Vec<(String, u32)>,
}

impl ModuleKey {
    fn matches(&self, name: &str, defines: &[(String, String)], functions: &[(&str, u32)]) -> bool {
        self.name == name
            && self.defines == defines
            && self.functions.len() == functions.len()
            && self
                .functions
                .iter()
                .zip(functions)
                .all(|((f, s), (g, t))| f == g && s == t)
    }
}

/// The hash of a module's key, computed from the borrowed arguments (no allocation per launch).
fn module_hash(name: &str, defines: &[(String, String)], functions: &[(&str, u32)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (name, defines, functions).hash(&mut h);
    h.finish()
}

/// Loaded modules by `module_hash`; a bucket holds every key of that hash.
type ModuleMap = HashMap<u64, Vec<(ModuleKey, Arc<Kernels>)>>;

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub arch: String,
    pub sm_count: u32,
    modules: Mutex<ModuleMap>,
}

static DEVICES: LazyLock<Mutex<HashMap<i32, Arc<Device>>>> = LazyLock::new(Default::default);

/// Compute-capability target for NVRTC: the exact arch, with the `a` suffix on Hopper so that
/// wgmma/setmaxnreg are available.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

pub fn device(ordinal: i32) -> CudaResult<Arc<Device>> {
    ensure_libraries()?;
    let mut map = DEVICES.lock().map_err(|e| e.to_string())?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let ctx = CudaContext::new(ordinal as usize).map_err(|e| format!("cuda:{ordinal}: {e:?}"))?;
    let (major, minor) = ctx.compute_capability().map_err(|e| format!("{e:?}"))?;
    if major < 8 {
        return Err(format!(
            "cuda:{ordinal} has compute capability {major}.{minor}; longattn's CUDA kernels need 8.0 or newer"
        ));
    }
    let sm_count = ctx
        .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| format!("{e:?}"))? as u32;
    let dev = Arc::new(Device {
        ctx,
        arch: arch_for(major, minor),
        sm_count,
        modules: Mutex::new(HashMap::new()),
    });
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

impl Device {
    /// The module for (source, defines), compiled on first use.
    pub fn kernels(
        &self,
        name: &str,
        body: &str,
        defines: &[(String, String)],
        functions: &[(&str, u32)],
    ) -> CudaResult<Arc<Kernels>> {
        // Callers may load different kernels of one module (and different shared-memory caps):
        // each list gets its own loaded module.
        let hash = module_hash(name, defines, functions);
        let mut modules = self.modules.lock().map_err(|e| e.to_string())?;
        let bucket = modules.entry(hash).or_default();
        if let Some((_, k)) = bucket
            .iter()
            .find(|(key, _)| key.matches(name, defines, functions))
        {
            return Ok(k.clone());
        }
        let cubin = cached_cubin(name, &source(body), defines, &self.arch)?;
        self.ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| format!("loading {name}: {e:?}"))?;
        let mut map = HashMap::new();
        for &(fname, smem_bytes) in functions {
            let f = module
                .load_function(fname)
                .map_err(|e| format!("{fname}: {e:?}"))?;
            f.set_attribute(
                dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
            .map_err(|e| format!("{fname}: shared memory {smem_bytes} B: {e:?}"))?;
            map.insert(fname.to_string(), f);
        }
        let k = Arc::new(Kernels {
            _module: module,
            functions: map,
        });
        let key = ModuleKey {
            name: name.to_string(),
            defines: defines.to_vec(),
            functions: functions.iter().map(|&(f, s)| (f.to_string(), s)).collect(),
        };
        bucket.push((key, k.clone()));
        Ok(k)
    }

    /// Launches a Hopper-engine kernel over `work_tiles` work tiles and counts it. The engine is
    /// persistent (each CTA walks the tiles blockIdx.x, + gridDim.x, ...), so the grid is one
    /// dimension of at most one CTA per SM.
    ///
    /// # Safety
    /// As `launch`: `args` must match the kernel's parameters.
    pub unsafe fn launch_sm90<A>(
        &self,
        f: &CudaFunction,
        work_tiles: usize,
        smem_bytes: u32,
        stream: usize,
        args: &A,
    ) -> CudaResult<()> {
        if work_tiles == 0 {
            return Ok(());
        }
        if work_tiles > i32::MAX as usize {
            return Err("the Hopper attention kernels take at most 2^31 - 1 query tiles".into());
        }
        let grid = (work_tiles.min(self.sm_count as usize) as u32, 1, 1);
        SM90_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        unsafe { self.launch(f, grid, SM90_THREADS, smem_bytes, stream, args) }
    }

    /// Launches `f` with one by-value parameter struct on a borrowed stream handle.
    ///
    /// # Safety
    /// `params` must match the kernel's parameter layout and every pointer in it must be valid
    /// device memory of this device for the kernel's accesses.
    pub unsafe fn launch<P>(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        smem_bytes: u32,
        stream: usize,
        params: &P,
    ) -> CudaResult<()> {
        self.ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        let mut args = [params as *const P as *mut c_void];
        unsafe {
            drv::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem_bytes,
                stream as dsys::CUstream,
                &mut args,
            )
        }
        .map_err(|e| format!("kernel launch failed: {e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defines(stages: &str) -> Vec<(String, String)> {
        vec![
            ("LA_DK".into(), "64".into()),
            ("LA_STAGES".into(), stages.into()),
        ]
    }

    #[test]
    fn a_module_key_matches_only_its_own_arguments() {
        let functions = [("la_pass", 1024u32), ("la_decode", 0)];
        let key = ModuleKey {
            name: "lightning.cu".into(),
            defines: defines("1"),
            functions: functions.iter().map(|&(f, s)| (f.to_string(), s)).collect(),
        };
        assert!(key.matches("lightning.cu", &defines("1"), &functions));
        assert_eq!(
            module_hash("lightning.cu", &defines("1"), &functions),
            module_hash("lightning.cu", &defines("1"), &functions)
        );
        assert!(!key.matches("rat.cu", &defines("1"), &functions));
        assert!(!key.matches("lightning.cu", &defines("2"), &functions));
        assert!(!key.matches(
            "lightning.cu",
            &defines("1"),
            &[("la_pass", 2048), ("la_decode", 0)]
        ));
        assert!(!key.matches("lightning.cu", &defines("1"), &functions[..1]));
    }
}
