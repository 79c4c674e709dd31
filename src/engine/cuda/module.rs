//! Kernel modules: the table of `kernels/*.cu` that build.rs embeds (source always, PTX when
//! the build had NVRTC), and a per-context cache that loads a module by name and its
//! functions. PTX is picked by the device's compute capability (>= 9.0: the `compute_90`
//! PTX, else the portable `compute_75` one); without PTX, or when the driver refuses it
//! (an NVRTC newer than the driver), the source is compiled with the runtime's NVRTC for
//! the device's own architecture. Knows nothing about what the kernels compute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
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

/// Compiles a kernel's source with the NVRTC found at run time, for `compute_{major}{minor}`.
pub fn compile_at_runtime(k: &Kernel, cc: (i32, i32)) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(EngineError::NoCuda(format!(
            "kernel module `{}` was not precompiled (the build had no NVRTC) and libnvrtc was not found at run time",
            k.name
        )));
    }
    let opts = CompileOptions {
        name: Some(format!("{}.cu", k.name)),
        options: vec![
            format!("--gpu-architecture=compute_{}{}", cc.0, cc.1),
            "--std=c++17".to_string(),
        ],
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

/// Modules and functions loaded into one context, loaded on first use and kept.
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    cc: (i32, i32),
    modules: Mutex<HashMap<String, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(String, String), CudaFunction>>,
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
        let key = (module.to_string(), name.to_string());
        if let Some(f) = self.functions.lock().map_err(poisoned)?.get(&key) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m.load_function(name).map_err(|e| EngineError::Cuda {
            op: format!("load function {module}::{name}"),
            msg: e.to_string(),
        })?;
        self.functions
            .lock()
            .map_err(poisoned)?
            .insert(key, f.clone());
        Ok(f)
    }

    /// Loads (once) the module of `kernels/<name>.cu`.
    pub fn module(&self, name: &str) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.lock().map_err(poisoned)?.get(name) {
            return Ok(m.clone());
        }
        let k = kernel(name).ok_or_else(|| EngineError::Cuda {
            op: "load module".into(),
            msg: format!("no kernel file kernels/{name}.cu was built into this binary"),
        })?;
        let pre = if self.cc.0 >= 9 {
            k.ptx_sm90
        } else {
            k.ptx_portable
        };
        let mut first_err = None;
        if let Some(ptx) = pre {
            match self.ctx.load_module(Ptx::from_src(ptx)) {
                Ok(m) => return Ok(self.keep(name, m)),
                // e.g. CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the build's NVRTC is newer than the driver.
                Err(e) => first_err = Some(e.to_string()),
            }
        }
        let ptx = match compile_at_runtime(k, self.cc) {
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
        let m = self.ctx.load_module(ptx).map_err(|e| EngineError::Cuda {
            op: format!("load module {name}"),
            msg: e.to_string(),
        })?;
        Ok(self.keep(name, m))
    }

    fn keep(&self, name: &str, m: Arc<CudaModule>) -> Arc<CudaModule> {
        if let Ok(mut map) = self.modules.lock() {
            map.insert(name.to_string(), m.clone());
        }
        m
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> EngineError {
    EngineError::Cuda {
        op: "module cache".into(),
        msg: "a thread panicked while loading a kernel".into(),
    }
}
