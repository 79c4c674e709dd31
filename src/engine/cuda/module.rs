//! Kernel modules: the table of `kernels/*.cu` that build.rs embeds (source always, PTX when
//! the build had NVRTC), and a per-context cache that loads a module by name and its
//! functions. PTX is picked by the device's compute capability (>= 9.0: the `compute_90`
//! PTX, else the portable `compute_75` one; the sm_90a files, [`SM90A_MODULES`], their
//! `compute_90a` PTX on compute capability 9.0 and nothing elsewhere); without PTX, or when
//! the driver refuses it (an NVRTC newer than the driver), the source is compiled with the
//! runtime's NVRTC for the device's own architecture (`compute_90a` for an sm_90a file). Each function comes with its parameter list as the PTX
//! declares it ([`ParamKind`]), against which every launch's arguments are checked, and its
//! dynamic shared memory opt-in ([`DynSmem`], made once per function). Knows nothing about
//! what the kernels compute.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::device::nvrtc_present;
use crate::engine::{EngineError, Result};

/// One kernel file: its name (file stem), CUDA C source and precompiled PTX.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub ptx_sm90: Option<&'static str>,
    pub ptx_portable: Option<&'static str>,
    /// The `compute_90a` PTX of an sm_90a file ([`SM90A_MODULES`]), None for the others.
    pub ptx_sm90a: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Whether build.rs precompiled the kernels (it had NVRTC).
pub fn precompiled() -> bool {
    env!("ICHCAM_KERNELS_PRECOMPILED") == "yes"
}

/// Looks a kernel file up by name.
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

// `SM90A_MODULES` (in the table above, from build.rs): the kernel files of sm_90a code
// (`wgmma`), whose `compute_90a` PTX (`ptx_sm90a`, precompiled by build.rs; else NVRTC at
// run time, [`compile_for_arch`]) loads on a device of compute capability 9.0, the only one
// that runs sm_90a code; elsewhere their module does not load (an error naming the device).
// build.rs's `compute_90` / `compute_75` PTX of them (the same source without the
// arch-specific instructions: trapping stubs) is never loaded.

/// Whether `kernels/<name>.cu` is one of [`SM90A_MODULES`].
pub fn is_sm90a_module(name: &str) -> bool {
    SM90A_MODULES.contains(&name)
}

/// The folder of the CUDA headers (`mma.h`, `crt/mma.h`, `cuda_bf16.h`: the tensor-core
/// kernels include them) for a compilation at run time, searched as build.rs searches, on
/// this machine rather than the build's (a binary carried to a GPU machine finds them
/// there): the environment's candidates (`headers::env_candidates`),
/// `/usr/local/cuda/include`, then the folder the build used.
pub fn cuda_include_dir() -> Option<String> {
    use std::path::PathBuf;
    let mut candidates = super::headers::env_candidates();
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates.push(PathBuf::from(env!("ICHCAM_CUDA_INCLUDE")));
    candidates
        .into_iter()
        .find(|d| !d.as_os_str().is_empty() && super::headers::has_mma(d))
        .map(|d| d.to_string_lossy().into_owned())
}

/// Compiles a kernel's source with the NVRTC found at run time, for `compute_{major}{minor}`.
pub fn compile_at_runtime(k: &Kernel, cc: (i32, i32)) -> Result<Ptx> {
    compile_for_arch(k, &format!("compute_{}{}", cc.0, cc.1))
}

/// Compiles a kernel's source with the NVRTC found at run time for the virtual architecture
/// `arch` (`compute_90a`, `compute_86`...), with the CUDA headers build.rs found.
pub fn compile_for_arch(k: &Kernel, arch: &str) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(EngineError::NoCuda(format!(
            "kernel module `{}` was not precompiled (the build had no NVRTC) and libnvrtc was not found at run time",
            k.name
        )));
    }
    let opts = CompileOptions {
        name: Some(format!("{}.cu", k.name)),
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
        ],
        include_paths: cuda_include_dir().map(|d| vec![d]).unwrap_or_default(),
        ..Default::default()
    };
    let src = k.source;
    match std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(src, opts)) {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(CompileError::CompileError { log, .. })) => Err(EngineError::Compile {
            module: k.name.to_string(),
            log: log.to_string_lossy().into_owned(),
        }),
        Ok(Err(e)) => Err(EngineError::Compile {
            module: k.name.to_string(),
            log: e.to_string(),
        }),
        Err(_) => Err(EngineError::Compile {
            module: k.name.to_string(),
            log: "NVRTC panicked".into(),
        }),
    }
}

/// The class and width in bytes of one kernel parameter, as its PTX `.param` declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// `.u32`, `.s64`, `.b64`... (pointers are 64-bit integers).
    Int(u32),
    /// `.f32`, `.f64`.
    Float(u32),
    /// `.b8 name[N]` and other aggregates.
    Bytes(u32),
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamKind::Int(8) => write!(f, "a 64-bit integer or pointer"),
            ParamKind::Int(n) => write!(f, "a {}-bit integer", n * 8),
            ParamKind::Float(n) => write!(f, "a {}-bit float", n * 8),
            ParamKind::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

/// The parameters of `.entry name` in PTX text, or None when the PTX has no such entry (or
/// an unreadable parameter list).
pub fn ptx_params(ptx: &str, name: &str) -> Option<Vec<ParamKind>> {
    let needle = format!(".entry {name}(");
    let start = ptx.find(&needle)? + needle.len();
    let end = start + ptx[start..].find(')')?;
    ptx[start..end]
        .split(',')
        .filter(|d| d.contains(".param"))
        .map(param_kind)
        .collect()
}

fn param_kind(decl: &str) -> Option<ParamKind> {
    let mut width = None;
    let mut float = false;
    let mut count = 1u32;
    for tok in decl.split_whitespace() {
        if let Some(t) = tok.strip_prefix('.') {
            let (class, bits) = t.split_at(1.min(t.len()));
            if matches!(class, "u" | "s" | "b" | "f") {
                if let Ok(b @ (8 | 16 | 32 | 64)) = bits.parse::<u32>() {
                    width = Some(b / 8);
                    float = class == "f";
                }
            }
        } else if let Some(i) = tok.find('[') {
            count = tok[i + 1..].trim_end_matches(']').parse().ok()?;
        }
    }
    let w = width?;
    Some(match (float, count) {
        (true, 1) => ParamKind::Float(w),
        (false, 1) => ParamKind::Int(w),
        _ => ParamKind::Bytes(w * count),
    })
}

/// A loaded module and the PTX it was loaded from.
type LoadedModule = (Arc<CudaModule>, Arc<str>);
/// A function, its parameters as its PTX declares them, and its dynamic shared memory
/// opt-in (shared by every [`super::launch::Kernel`] and raw launch of the function).
type LoadedFunction = (CudaFunction, Arc<[ParamKind]>, Arc<DynSmem>);

/// The dynamic shared memory a function may be launched with, as far as this process has
/// asked the driver: 0 until a launch asks for some, then at least the default allowance
/// (48 KiB less the function's static shared memory), or what
/// `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)` opted it in for. One per function
/// handle: the opt-in is made once, by the first launch that needs it, not per launch.
#[derive(Default)]
pub struct DynSmem {
    allowed: AtomicU32,
    opt_in: Mutex<()>,
}

/// Dynamic plus static shared memory a block may use without the opt-in.
pub const DEFAULT_SHARED_BYTES: u32 = 48 * 1024;

impl DynSmem {
    /// Makes `f` launchable with `bytes` of dynamic shared memory: nothing when an earlier
    /// launch already did (one atomic load), else the function's static shared memory is
    /// read and, above the default allowance, the opt-in raised to `bytes`. Not a stream
    /// operation (a function attribute): safe while a stream captures a graph, and the
    /// opt-in holds for the graph's replays. The driver refuses more than the device allows
    /// per block (227 KiB on sm_90) with `CUDA_ERROR_INVALID_VALUE`.
    pub fn ensure(&self, f: &CudaFunction, bytes: u32) -> std::result::Result<(), DriverError> {
        if bytes == 0 || bytes <= self.allowed.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.opt_in.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.allowed.load(Ordering::Acquire);
        if bytes <= now {
            return Ok(());
        }
        let stat = f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
        let default = DEFAULT_SHARED_BYTES.saturating_sub(u32::try_from(stat).unwrap_or(0));
        if bytes > default {
            let v = i32::try_from(bytes).unwrap_or(i32::MAX);
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                v,
            )?;
        }
        self.allowed
            .store(bytes.max(default).max(now), Ordering::Release);
        Ok(())
    }
}

/// Modules and functions loaded into one context, loaded on first use and kept.
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    cc: (i32, i32),
    modules: Mutex<HashMap<String, LoadedModule>>,
    functions: Mutex<HashMap<(String, String), LoadedFunction>>,
}

impl ModuleCache {
    pub fn new(ctx: Arc<CudaContext>, cc: (i32, i32)) -> Self {
        ModuleCache {
            ctx,
            cc,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The function `name` of the kernel file `module` (`kernels/<module>.cu`).
    pub fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        Ok(self.function_with_params(module, name)?.0)
    }

    /// The function `name` of `kernels/<module>.cu` and its parameters as its PTX declares them.
    pub fn function_with_params(&self, module: &str, name: &str) -> Result<LoadedFunction> {
        let key = (module.to_string(), name.to_string());
        if let Some(f) = self.functions.lock().map_err(poisoned)?.get(&key) {
            return Ok(f.clone());
        }
        let (m, ptx) = self.module_with_ptx(module)?;
        let params: Arc<[ParamKind]> = ptx_params(&ptx, name)
            .ok_or_else(|| EngineError::Cuda {
                op: format!("load function {module}::{name}"),
                msg: format!("the PTX of kernels/{module}.cu has no readable `.entry {name}`"),
            })?
            .into();
        let f = m.load_function(name).map_err(|e| EngineError::Cuda {
            op: format!("load function {module}::{name}"),
            msg: e.to_string(),
        })?;
        let smem = Arc::new(DynSmem::default());
        let mut map = self.functions.lock().map_err(poisoned)?;
        // Another thread may have loaded it meanwhile: keep one opt-in per function.
        let entry = map.entry(key).or_insert((f, params, smem));
        Ok(entry.clone())
    }

    /// Loads (once) the module of `kernels/<name>.cu`.
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>> {
        Ok(self.module_with_ptx(name)?.0)
    }

    fn module_with_ptx(&self, name: &str) -> Result<LoadedModule> {
        if let Some(m) = self.modules.lock().map_err(poisoned)?.get(name) {
            return Ok(m.clone());
        }
        let k = kernel(name).ok_or_else(|| EngineError::Cuda {
            op: "load module".into(),
            msg: format!("no kernel file kernels/{name}.cu was built into this binary"),
        })?;
        let sm90a = is_sm90a_module(name);
        if sm90a && self.cc != (9, 0) {
            return Err(EngineError::Cuda {
                op: format!("load module {name}"),
                msg: format!(
                    "kernels/{name}.cu is sm_90a code (wgmma), which runs on compute capability 9.0 only; this device is {}.{}",
                    self.cc.0, self.cc.1
                ),
            });
        }
        let pre = if sm90a {
            k.ptx_sm90a
        } else if self.cc.0 >= 9 {
            k.ptx_sm90
        } else {
            k.ptx_portable
        };
        let mut first_err = None;
        if let Some(ptx) = pre {
            match self.ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => return Ok(self.keep(name, m, Arc::from(ptx))),
                // e.g. CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the build's NVRTC is newer than the driver.
                Err(e) => first_err = Some(e.to_string()),
            }
        }
        let compiled = if sm90a {
            compile_for_arch(k, "compute_90a")
        } else {
            compile_at_runtime(k, self.cc)
        };
        let ptx = match compiled {
            Ok(p) => p,
            Err(e) => {
                return Err(match first_err {
                    Some(load) => EngineError::Cuda {
                        op: format!("load module {name}"),
                        msg: format!("the driver refused the precompiled PTX ({load}) and run-time compilation failed: {e}"),
                    },
                    None => e,
                })
            }
        };
        let text: Arc<str> = Arc::from(ptx.to_src());
        let m = self.ctx.load_module(ptx).map_err(|e| EngineError::Cuda {
            op: format!("load module {name}"),
            msg: e.to_string(),
        })?;
        Ok(self.keep(name, m, text))
    }

    /// The PTX the module of `kernels/<name>.cu` was loaded from, None before it is loaded
    /// (diagnostics and tests: the precompiled PTX or a run-time compile).
    pub fn loaded_ptx(&self, name: &str) -> Option<Arc<str>> {
        let map = self.modules.lock().ok()?;
        map.get(name).map(|(_, ptx)| ptx.clone())
    }

    fn keep(&self, name: &str, m: Arc<CudaModule>, ptx: Arc<str>) -> (Arc<CudaModule>, Arc<str>) {
        if let Ok(mut map) = self.modules.lock() {
            map.insert(name.to_string(), (m.clone(), ptx.clone()));
        }
        (m, ptx)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> EngineError {
    EngineError::Cuda {
        op: "module cache".into(),
        msg: "a thread panicked while loading a kernel".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{ptx_params, ParamKind};

    #[test]
    fn reads_the_parameter_lists_nvrtc_writes() {
        let ptx = "
.visible .entry fill_f32(
	.param .u64 .ptr .align 1 fill_f32_param_0,
	.param .f32 fill_f32_param_1,
	.param .u32 fill_f32_param_2
)
{
	ret;
}
.visible .entry fill(
	.param .align 8 .b8 fill_param_0[16],
	.param .f64 fill_param_1,
	.param .s64 fill_param_2
)
{ ret; }
.visible .entry none()
{ ret; }
";
        use ParamKind::*;
        assert_eq!(
            ptx_params(ptx, "fill_f32"),
            Some(vec![Int(8), Float(4), Int(4)])
        );
        assert_eq!(
            ptx_params(ptx, "fill"),
            Some(vec![Bytes(16), Float(8), Int(8)])
        );
        assert_eq!(ptx_params(ptx, "none"), Some(vec![]));
        assert_eq!(ptx_params(ptx, "fil"), None);
    }
}
