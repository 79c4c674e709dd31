//! What the integration tests (and, by path, the benches) share: [`rng`] (the one seeded
//! generator of tests and benches), [`files`] (seed files, the binary under an address-space
//! limit, output checks: the hostile-input tests and the fuzz harness), [`shapes`] (op shapes),
//! [`nhwc`] (the channels-last eval forward's cases and CPU reference),
//! [`cuda`] (the harness of the CUDA test binaries: device tests ignored at run time
//! without a device), [`enhanced`] (a multi-frame DICOM writer), [`train`] (phantom training
//! cases), [`nifti2`] (NIfTI-2 files written by hand), [`pair`] (NIfTI-1 `.hdr`/`.img` pairs
//! split by hand from a `.nii`), [`archive`] (a DICOM folder holding several series) and
//! [`bin`] (the `ichcam` binary the tests run, found on a GPU machine too).
#![allow(dead_code)]

pub mod archive;
pub mod cuda;
pub mod enhanced;
pub mod files;
pub mod nhwc;
pub mod nifti2;
pub mod pair;
pub mod rng;
pub mod shapes;
pub mod train;

/// The ichcam binary: `ICHCAM_BIN`, else cargo's, else `gpu-bin/ichcam` or
/// `target/release/ichcam` under the working directory (a test binary carried to a GPU
/// machine, as scripts/gpu-check.sh does, runs from a copy of the repository).
pub fn bin() -> std::process::Command {
    let candidates = [
        std::env::var_os("ICHCAM_BIN").map(std::path::PathBuf::from),
        Some(std::path::PathBuf::from(env!("CARGO_BIN_EXE_ichcam"))),
        Some(std::path::PathBuf::from("gpu-bin/ichcam")),
        Some(std::path::PathBuf::from("target/release/ichcam")),
    ];
    let exe = candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect("the ichcam binary (set ICHCAM_BIN)");
    std::process::Command::new(exe)
}
