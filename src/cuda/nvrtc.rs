//! NVRTC opened at run time, CUDA 13's or CUDA 12's, so that one binary (the abi3 wheel) serves
//! torch builds of either CUDA major version. The functions bound here have the same C
//! signatures and result codes in every NVRTC from 12.0 to 13.x (nvrtc.h), so they are looked up
//! by name in whichever library was opened; each library's symbols are versioned by its soname,
//! so a second NVRTC already in the process (torch's) does not interpose.
//!
//! Which library: the caller names candidates (`open`; longattn's Python side passes the files
//! of torch's CUDA wheels, then toolkit folders, then sonames); without that, `get` opens
//! `libnvrtc.so.13` or `libnvrtc.so.12` through the loader path, restricted to the major
//! version that `LONGATTN_NVRTC` names.

use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

/// The NVRTC major versions this build can drive, in the order tried when nothing else decides.
pub const MAJORS: [i32; 2] = [13, 12];
/// Environment variable that picks the NVRTC major version ("12" or "13").
pub const ENV: &str = "LONGATTN_NVRTC";

pub type Program = *mut c_void;
type Status = c_int;
const SUCCESS: Status = 0;

type CreateFn = unsafe extern "C" fn(
    *mut Program,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> Status;
type CompileFn = unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status;
type SizeFn = unsafe extern "C" fn(Program, *mut usize) -> Status;
type BytesFn = unsafe extern "C" fn(Program, *mut c_char) -> Status;
type DestroyFn = unsafe extern "C" fn(*mut Program) -> Status;
type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status;
type ErrorStringFn = unsafe extern "C" fn(Status) -> *const c_char;

/// An opened NVRTC: the name it was opened by, its version, the functions used.
pub struct Nvrtc {
    pub name: String,
    pub version: (i32, i32),
    create: CreateFn,
    compile: CompileFn,
    log_size: SizeFn,
    log: BytesFn,
    cubin_size: SizeFn,
    cubin: BytesFn,
    destroy: DestroyFn,
    error_string: ErrorStringFn,
    // the function pointers above live as long as this (never closed: held in a static)
    _lib: Library,
}

enum State {
    Unset,
    Open(&'static Nvrtc),
    Failed(String),
}

static STATE: Mutex<State> = Mutex::new(State::Unset);

/// The major versions `LONGATTN_NVRTC` allows: the one it names, else all of `MAJORS`.
pub fn env_majors() -> Result<Vec<i32>, String> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<i32>() {
            Ok(m) if MAJORS.contains(&m) => Ok(vec![m]),
            _ => Err(format!("{ENV}={v:?}: expected 12 or 13")),
        },
        _ => Ok(MAJORS.to_vec()),
    }
}

fn open_one(name: &str, majors: &[i32]) -> Result<Nvrtc, String> {
    // SAFETY: NVRTC's initialisers have no preconditions; every symbol is bound with the type
    // of its nvrtc.h declaration (identical in NVRTC 12 and 13).
    unsafe {
        let lib = Library::new(name).map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name).map_err(|e| e.to_string())?
            };
        }
        let version: VersionFn = sym!(b"nvrtcVersion\0");
        let (mut major, mut minor) = (0, 0);
        if version(&mut major, &mut minor) != SUCCESS {
            return Err("nvrtcVersion failed".into());
        }
        if !majors.contains(&major) {
            return Err(format!("NVRTC {major}.{minor}, wanted major {majors:?}"));
        }
        Ok(Nvrtc {
            name: name.to_string(),
            version: (major, minor),
            create: sym!(b"nvrtcCreateProgram\0"),
            compile: sym!(b"nvrtcCompileProgram\0"),
            log_size: sym!(b"nvrtcGetProgramLogSize\0"),
            log: sym!(b"nvrtcGetProgramLog\0"),
            cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
            cubin: sym!(b"nvrtcGetCUBIN\0"),
            destroy: sym!(b"nvrtcDestroyProgram\0"),
            error_string: sym!(b"nvrtcGetErrorString\0"),
            _lib: lib,
        })
    }
}

/// Opens the first of `candidates` (file paths or sonames) that loads as an NVRTC of one of
/// `majors`. An NVRTC already open stays open and is returned (its version may be another than
/// asked for: callers compare). On failure the error names every candidate and why it failed,
/// then `hint`; `get` returns that error until an `open` succeeds.
pub fn open(candidates: &[String], majors: &[i32], hint: &str) -> Result<&'static Nvrtc, String> {
    let mut state = STATE.lock().map_err(|e| e.to_string())?;
    if let State::Open(n) = *state {
        return Ok(n);
    }
    let mut tried = Vec::new();
    for name in candidates {
        match open_one(name, majors) {
            Ok(n) => {
                let n: &'static Nvrtc = Box::leak(Box::new(n));
                *state = State::Open(n);
                return Ok(n);
            }
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    let wanted = majors
        .iter()
        .map(|m| format!("libnvrtc.so.{m}"))
        .collect::<Vec<_>>()
        .join(" or ");
    let msg = format!(
        "the NVRTC library ({wanted}) was not found; {hint} (tried: {})",
        if tried.is_empty() {
            "nothing".into()
        } else {
            tried.join("; ")
        }
    );
    *state = State::Failed(msg.clone());
    Err(msg)
}

/// The open NVRTC; when none was opened or tried yet, `libnvrtc.so.13` or `libnvrtc.so.12` by
/// soname (the loader path), as `LONGATTN_NVRTC` allows.
pub fn get() -> Result<&'static Nvrtc, String> {
    {
        let state = STATE.lock().map_err(|e| e.to_string())?;
        match &*state {
            State::Open(n) => return Ok(n),
            State::Failed(msg) => return Err(msg.clone()),
            State::Unset => {}
        }
    }
    let majors = env_majors()?;
    let sonames: Vec<String> = majors.iter().map(|m| format!("libnvrtc.so.{m}")).collect();
    open(
        &sonames,
        &majors,
        "install torch's CUDA wheels (nvidia-cuda-nvrtc-cu12 for CUDA 12, nvidia-cuda-nvrtc for \
         CUDA 13) or put a CUDA toolkit's lib64 folder on LD_LIBRARY_PATH",
    )
}

impl Nvrtc {
    fn check(&self, what: &str, rc: Status) -> Result<(), String> {
        if rc == SUCCESS {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any code.
        let text = unsafe { (self.error_string)(rc) };
        let text = if text.is_null() {
            format!("error {rc}")
        } else {
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(format!("{what}: {text}"))
    }

    /// Compiles `src` with `options`; returns the result of the compilation (Ok or the NVRTC
    /// error) and the program log; the CUBIN when it compiled.
    pub fn compile_cubin(
        &self,
        name: &CStr,
        src: &CStr,
        options: &[&CStr],
    ) -> Result<(Result<Vec<u8>, String>, String), String> {
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings; no headers.
        let rc = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        self.check("nvrtcCreateProgram", rc)?;
        let opts: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: prog is live until the destroy below; opts outlive the call.
        let compiled = self.check("nvrtcCompileProgram", unsafe {
            (self.compile)(prog, opts.len() as c_int, opts.as_ptr())
        });
        let log = self
            .bytes(prog, self.log_size, self.log, "log")
            .map(|mut l| {
                while l.last() == Some(&0) {
                    l.pop();
                }
                String::from_utf8_lossy(&l).into_owned()
            });
        let cubin = compiled.and_then(|()| self.bytes(prog, self.cubin_size, self.cubin, "CUBIN"));
        // SAFETY: prog is not used after this.
        unsafe { (self.destroy)(&mut prog) };
        Ok((cubin, log.unwrap_or_default()))
    }

    fn bytes(
        &self,
        prog: Program,
        size: SizeFn,
        read: BytesFn,
        what: &str,
    ) -> Result<Vec<u8>, String> {
        let mut n = 0usize;
        // SAFETY: prog is live; the buffer has the size NVRTC reported.
        self.check(what, unsafe { size(prog, &mut n) })?;
        let mut buf = vec![0u8; n];
        if n > 0 {
            self.check(what, unsafe { read(prog, buf.as_mut_ptr() as *mut c_char) })?;
        }
        Ok(buf)
    }
}
