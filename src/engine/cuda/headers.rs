//! Where the CUDA headers the tensor-core kernels include (`mma.h`, `crt/mma.h`,
//! `cuda_bf16.h`) may be: the places named by the environment, in the order searched. Shared
//! by build.rs (which compiles the kernels to PTX; it includes this file by path) and the
//! run-time compilation of [`super::module`], so both search alike. Knows only paths and
//! environment variables: nothing of the crate (build.rs cannot import it).

use std::path::{Path, PathBuf};

/// Whether `dir` holds the headers (`mma.h` and `crt/mma.h`).
pub fn has_mma(dir: &Path) -> bool {
    dir.join("mma.h").is_file() && dir.join("crt").join("mma.h").is_file()
}

/// The candidate folders the environment names, in order: `ICHCAM_CUDA_INCLUDE`,
/// `CUDA_HOME/include`, `CUDA_PATH/include`, then `include/` beside each `libnvrtc.so.13`
/// on `LD_LIBRARY_PATH` (where pip's nvidia-cuda-runtime and nvidia-cuda-crt put them).
pub fn env_candidates() -> Vec<PathBuf> {
    let var = |v: &str| std::env::var_os(v).filter(|d| !d.is_empty());
    let mut out: Vec<PathBuf> = Vec::new();
    out.extend(var("ICHCAM_CUDA_INCLUDE").map(PathBuf::from));
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        out.extend(var(v).map(|d| PathBuf::from(d).join("include")));
    }
    if let Some(paths) = var("LD_LIBRARY_PATH") {
        for d in std::env::split_paths(&paths) {
            if d.join("libnvrtc.so.13").exists() {
                out.extend(d.parent().map(|p| p.join("include")));
            }
        }
    }
    out
}
