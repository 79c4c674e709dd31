//! Compiles every `kernels/*.cu` with NVRTC (when libnvrtc loads) to PTX for Hopper
//! (`compute_90`) and a portable PTX (`compute_75`), and always writes `OUT_DIR/kernels.rs`,
//! a table of the kernel sources with their PTX (or `None` when the build had no NVRTC, in
//! which case the runtime compiles the source at first GPU use).
//!
//! A file of sm_90a code (one that tests `__CUDA_ARCH_FEAT_SM90_ALL`: `wgmma`, e.g.
//! `kernels/conv_wgmma.cu`) is compiled for `compute_90a` too (its `compute_90` /
//! `compute_75` PTX is the same source without the arch-specific instructions, never loaded);
//! the table lists such files in `SM90A_MODULES`, and module.rs loads their `compute_90a` PTX
//! on a device of compute capability 9.0.
//!
//! A kernel that does not compile fails the build with NVRTC's log. `ICHCAM_REQUIRE_NVRTC=1`
//! turns a missing NVRTC into a build error (CI sets it). NVRTC is found by cudarc's dynamic
//! loader through the library search path (`libnvrtc.so.13` on `LD_LIBRARY_PATH`).
//!
//! Tensor-core kernels (a file that includes `<mma.h>`, e.g. `kernels/conv_tc.cu`) need the
//! CUDA headers (`mma.h`, `crt/mma.h`, `cuda_bf16.h`: pip's nvidia-cuda-runtime and
//! nvidia-cuda-crt, or a CUDA toolkit), found in `ICHCAM_CUDA_INCLUDE`, `CUDA_HOME/include`,
//! `CUDA_PATH/include`, or `include/` beside a `libnvrtc.so.13` on `LD_LIBRARY_PATH`; they
//! are compiled for `compute_90` only (bf16/tf32 WMMA needs sm_80). Without the headers
//! such a file gets no PTX (a warning; an error under `ICHCAM_REQUIRE_NVRTC=1`) and the
//! precisions that use it report so at run time. The folder found is passed on to the
//! runtime's NVRTC as `ICHCAM_CUDA_INCLUDE`.

#[path = "src/engine/cuda/headers.rs"]
mod headers;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// (suffix of the PTX file, NVRTC architecture) for each precompiled target.
const TARGETS: [(&str, &str); 2] = [("sm90", "compute_90"), ("portable", "compute_75")];

/// The target of the sm_90a files (`SM90A_MARKER` in the source), besides [`TARGETS`].
const SM90A_TARGET: (&str, &str) = ("sm90a", "compute_90a");

/// What makes a kernel file sm_90a code: it tests the feature macro NVRTC defines for
/// `compute_90a` only (around its `wgmma` asm).
const SM90A_MARKER: &str = "__CUDA_ARCH_FEAT_SM90_ALL";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=ICHCAM_REQUIRE_NVRTC");
    // A build without NVRTC is redone once the library appears on the search path.
    println!("cargo:rerun-if-env-changed=LD_LIBRARY_PATH");
    for v in ["ICHCAM_CUDA_INCLUDE", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_dir = manifest.join("kernels");

    let mut sources: Vec<PathBuf> = match std::fs::read_dir(&kernel_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect(),
        Err(_) => Vec::new(),
    };
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let require = std::env::var("ICHCAM_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    let have_nvrtc = nvrtc_present();
    if !have_nvrtc {
        if require {
            fail("ICHCAM_REQUIRE_NVRTC=1 but libnvrtc could not be loaded: put libnvrtc.so.13 (CUDA 13.0, e.g. pip's nvidia-cuda-nvrtc==13.0.88, lib dir nvidia/cu13/lib) on LD_LIBRARY_PATH");
        }
        println!(
            "cargo:warning=libnvrtc not found: CUDA kernels are embedded as source only and will be compiled at first GPU use (set LD_LIBRARY_PATH to a CUDA 13.0 libnvrtc to precompile)"
        );
    }

    let include = cuda_include_dir();
    if let Some(dir) = &include {
        println!("cargo:rerun-if-changed={}", dir.join("mma.h").display());
    }
    println!(
        "cargo:rustc-env=ICHCAM_CUDA_INCLUDE={}",
        include.as_deref().map(path_str).unwrap_or_default()
    );

    let mut table = String::from("pub const KERNELS: &[Kernel] = &[\n");
    let mut sm90a_modules = Vec::new();
    for src_path in &sources {
        let name = src_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_else(|| {
                fail(&format!(
                    "kernel file name is not UTF-8: {}",
                    src_path.display()
                ))
            })
            .to_string();
        let source = std::fs::read_to_string(src_path)
            .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", src_path.display())));
        let tensor_cores = source.contains("#include <mma.h>");
        let sm90a = source.contains(SM90A_MARKER);
        if sm90a {
            sm90a_modules.push(name.clone());
        }
        if tensor_cores && have_nvrtc && include.is_none() {
            if require {
                fail(&format!("kernels/{name}.cu needs the CUDA headers (mma.h) and none were found: install pip's nvidia-cuda-runtime==13.0.96 and nvidia-cuda-crt==13.0.88 beside NVRTC (as .ci/run does), or set ICHCAM_CUDA_INCLUDE or CUDA_HOME"));
            }
            println!("cargo:warning=kernels/{name}.cu not precompiled: no CUDA headers (mma.h) found; set ICHCAM_CUDA_INCLUDE or CUDA_HOME, or install pip's nvidia-cuda-runtime and nvidia-cuda-crt beside NVRTC");
        }
        let mut ptx_fields = Vec::new();
        for (suffix, arch) in TARGETS {
            // Tensor-core files: Hopper PTX only, and only with the headers.
            let build_it = if tensor_cores {
                include.is_some() && arch == "compute_90"
            } else {
                true
            };
            if have_nvrtc && build_it {
                let ptx = compile(&name, &source, arch, include.as_deref());
                let ptx_path = out_dir.join(format!("{name}.{suffix}.ptx"));
                std::fs::write(&ptx_path, ptx)
                    .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", ptx_path.display())));
                ptx_fields.push(format!("Some(include_str!({:?}))", path_str(&ptx_path)));
            } else {
                ptx_fields.push("None".to_string());
            }
        }
        // The sm_90a PTX of an sm_90a file (its headers as the tensor-core files').
        let ptx_sm90a = if sm90a && have_nvrtc && (!tensor_cores || include.is_some()) {
            let (suffix, arch) = SM90A_TARGET;
            let ptx = compile(&name, &source, arch, include.as_deref());
            let ptx_path = out_dir.join(format!("{name}.{suffix}.ptx"));
            std::fs::write(&ptx_path, ptx)
                .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", ptx_path.display())));
            format!("Some(include_str!({:?}))", path_str(&ptx_path))
        } else {
            "None".to_string()
        };
        let _ = writeln!(
            table,
            "    Kernel {{ name: {name:?}, source: include_str!({:?}), ptx_sm90: {}, ptx_portable: {}, ptx_sm90a: {ptx_sm90a} }},",
            path_str(src_path),
            ptx_fields[0],
            ptx_fields[1]
        );
    }
    table.push_str("];\n");
    let mut archs: Vec<&str> = TARGETS.iter().map(|(_, a)| *a).collect();
    if !sm90a_modules.is_empty() {
        archs.push(SM90A_TARGET.1);
    }
    let _ = writeln!(
        table,
        "/// NVRTC architectures of the precompiled PTX (empty when the build had no NVRTC;\n/// `compute_90a` for the [`SM90A_MODULES`] only).\npub const PRECOMPILED_TARGETS: &[&str] = &[{}];",
        if have_nvrtc {
            archs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        table,
        "/// The kernel files of sm_90a code (they test `{SM90A_MARKER}`): `ptx_sm90a` is their\n/// `compute_90a` PTX, which runs on compute capability 9.0 only.\npub const SM90A_MODULES: &[&str] = &[{}];",
        sm90a_modules.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    );
    let table_path = out_dir.join("kernels.rs");
    std::fs::write(&table_path, table)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", table_path.display())));
    println!(
        "cargo:rustc-env=ICHCAM_KERNELS_PRECOMPILED={}",
        if have_nvrtc { "yes" } else { "no" }
    );
}

fn path_str(p: &Path) -> String {
    p.to_str()
        .unwrap_or_else(|| fail(&format!("path is not UTF-8: {}", p.display())))
        .to_string()
}

/// Whether libnvrtc loads; cudarc panics on first use of a missing library, so ask first,
/// and treat a panic while asking as "absent".
fn nvrtc_present() -> bool {
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// The folder of the CUDA headers that holds `mma.h` (see the module comment), if any: the
/// first of `headers::env_candidates` that has them; a named `ICHCAM_CUDA_INCLUDE` without
/// them is an error.
fn cuda_include_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("ICHCAM_CUDA_INCLUDE").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        if !headers::has_mma(&d) {
            fail(&format!(
                "ICHCAM_CUDA_INCLUDE={} has no mma.h and crt/mma.h",
                d.display()
            ));
        }
        return Some(d);
    }
    headers::env_candidates()
        .into_iter()
        .find(|d| headers::has_mma(d))
}

fn compile(name: &str, source: &str, arch: &'static str, include: Option<&Path>) -> String {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(format!("{name}.cu")),
        options: vec!["--std=c++17".to_string()],
        include_paths: include.map(|d| vec![path_str(d)]).unwrap_or_default(),
        ..Default::default()
    };
    let result = std::panic::catch_unwind(|| compile_ptx_with_opts(source, opts));
    match result {
        Ok(Ok(ptx)) => ptx.to_src(),
        Ok(Err(CompileError::CompileError { log, .. })) => fail(&format!(
            "kernels/{name}.cu failed to compile with NVRTC ({arch}):\n{}",
            log.to_string_lossy()
        )),
        Ok(Err(e)) => fail(&format!("kernels/{name}.cu: NVRTC error ({arch}): {e}")),
        Err(_) => fail(&format!(
            "kernels/{name}.cu: NVRTC panicked while compiling ({arch})"
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={}", msg.lines().next().unwrap_or(msg));
    std::process::exit(1);
}
