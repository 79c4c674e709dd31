//! Shared by the hostile-input regression tests (`tests/hostile.rs`) and the fuzz harness
//! (`tests/fuzz.rs`): seed files (a small head-CT-like volume as `.nii` and `.nii.gz`, a
//! DICOM series, a model file, a slice-label dataset), running the binary
//! under an address-space limit with its outcome classified, and the check that an output
//! folder holds only complete sets of outputs.
#![allow(dead_code)]

use ichcam::engine::cpu::CpuBackend;
use ichcam::io::{self, Volume};
use ichcam::model::checkpoint::{self, SaveOptions};
use ichcam::model::{IchNet, ModelConfig};
use ndarray::Array3;
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The address-space limit of the issue: 8 GB.
pub const AS_LIMIT: u64 = 8_000_000_000;

/// The files of one segmented volume's folder (with a stage-3 U-Net also
/// [`UNET_OUTPUT`]).
pub const OUTPUT_FILES: [&str; 5] = [
    "mask.nii.gz",
    "cam.nii.gz",
    "slices.csv",
    "overlay.png",
    "summary.json",
];

/// The U-Net's map, written only by models with a stage-3 U-Net.
pub const UNET_OUTPUT: &str = "unet.nii.gz";

/// A 16 x 48 x 48 head-CT-like volume: air, a skull ring, brain, and a bright lesion.
pub fn phantom(slices: usize) -> Volume {
    let (d, n) = (slices, 48usize);
    let mut a = Array3::<f32>::from_elem((d, n, n), -1000.0);
    let c = (n as f32 - 1.0) / 2.0;
    for z in 0..d {
        for y in 0..n {
            for x in 0..n {
                let r = ((y as f32 - c).powi(2) + (x as f32 - c).powi(2)).sqrt();
                let v = if r < 17.0 {
                    35.0 + ((x * 7 + y * 13 + z * 3) % 9) as f32
                } else if r < 21.0 {
                    1200.0
                } else {
                    -1000.0
                };
                a[[z, y, x]] = v;
            }
        }
    }
    for z in d / 3..(2 * d / 3).max(d / 3 + 1) {
        for y in 18..26 {
            for x in 14..22 {
                a[[z, y, x]] = 70.0;
            }
        }
    }
    Volume::from_array(a, [5.0, 0.45, 0.45], "phantom".into())
}

/// The phantom's lesion as a mask.
pub fn phantom_mask(v: &Volume) -> Volume {
    let m = v
        .data
        .mapv(|h| if (60.0..=80.0).contains(&h) { 1.0 } else { 0.0 });
    let mut out = v.clone();
    out.data = m;
    out
}

/// A stage-2 model file of the tiny config (random weights: they need not be trained to
/// exercise the files), with the metadata `ichcam train` writes.
pub fn write_model(path: &Path, input_size: usize) {
    let mut cfg = ModelConfig::tiny();
    cfg.base_width = 4;
    cfg.layers = vec![1, 1];
    cfg.lstm_hidden = 8;
    cfg.head = vec![8];
    let net = IchNet::new(CpuBackend::<f32>::new(), cfg, 7).unwrap();
    let mut extra = HashMap::new();
    extra.insert("ichcam.input_size".to_string(), input_size.to_string());
    extra.insert("ichcam.slices".to_string(), "8".to_string());
    extra.insert("ichcam.stage".to_string(), "2".to_string());
    extra.insert("ichcam.slice_threshold".to_string(), "0.5".to_string());
    checkpoint::save(
        &net,
        path,
        &SaveOptions {
            extra,
            ..Default::default()
        },
    )
    .unwrap();
}

/// [`write_model`] with a stage-3 U-Net (features `features`, depth 2, the three windows)
/// under `unet.*`.
pub fn write_model_with_unet(path: &Path, input_size: usize, features: usize) {
    use ichcam::model::unet::{checkpoint as unet_ckpt, UNet, UNetConfig};
    write_model(path, input_size);
    let (net, loaded) = checkpoint::load(CpuBackend::<f32>::new(), path).unwrap();
    let unet = UNet::new(
        CpuBackend::<f32>::new(),
        UNetConfig {
            features,
            depth: 2,
            ..UNetConfig::authors(3)
        },
        9,
    )
    .unwrap();
    let mut extra = loaded.metadata.clone();
    extra.remove("config");
    checkpoint::save_with(
        &net,
        &[unet_ckpt::section(&unet).unwrap()],
        path,
        &SaveOptions {
            extra,
            ..Default::default()
        },
    )
    .unwrap();
}

/// A safetensors file's header JSON and its data section.
pub fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Joins a header JSON and a data section into safetensors bytes.
pub fn join_safetensors(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(data);
    out
}

/// Gzip of `bytes`.
pub fn gz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Every seed file of the harness, in `dir`.
pub struct Seeds {
    pub dir: PathBuf,
    pub nii: PathBuf,
    pub nii_gz: PathBuf,
    pub mask_gz: PathBuf,
    pub dicom: PathBuf,
    pub model: PathBuf,
    pub dataset: PathBuf,
}

impl Seeds {
    pub fn new(dir: &Path) -> Seeds {
        let v = phantom(16);
        let nii = dir.join("seed.nii");
        io::write_volume(&nii, &v).unwrap();
        let nii_gz = dir.join("seed.nii.gz");
        io::write_volume(&nii_gz, &v).unwrap();
        let mask_gz = dir.join("seed_mask.nii.gz");
        let m = phantom_mask(&v);
        io::write_mask(&mask_gz, &io::to_mask(&m), &v).unwrap();
        let dicom = dir.join("seed_dicom");
        io::dicom::write_series(&dicom, &phantom(4)).unwrap();
        let model = dir.join("seed_model.safetensors");
        write_model(&model, 32);
        let dataset = dir.join("seed_dataset");
        std::fs::create_dir_all(dataset.join("images")).unwrap();
        for id in ["a01", "a02"] {
            io::write_volume(&dataset.join(format!("images/{id}.nii.gz")), &phantom(6)).unwrap();
        }
        let mut csv = String::from("patient,z,any_hemorrhage\n");
        for id in ["a01", "a02"] {
            for z in 0..6 {
                csv.push_str(&format!("{id},{z},{}\n", u8::from((2..4).contains(&z))));
            }
        }
        std::fs::write(dataset.join("slice_labels.csv"), csv).unwrap();
        Seeds {
            dir: dir.to_path_buf(),
            nii,
            nii_gz,
            mask_gz,
            dicom,
            model,
            dataset,
        }
    }
}

/// How a run of the binary ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Ok,
    /// Exit 1 with an `error:` line naming the problem.
    CleanError(String),
    /// Exit 101 or a panic message.
    Panic(String),
    /// Killed by a signal (SIGABRT from a failed allocation, SIGSEGV, ...).
    Signal(i32),
    /// Still running at the deadline (then killed).
    Timeout,
    /// Another exit code, or exit 1 without an `error:` line.
    Unclear(String),
}

impl Outcome {
    pub fn is_clean(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::CleanError(_))
    }
}

/// What a run printed and how it ended.
pub struct Run {
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}

/// `ichcam segment --model MODEL --input INPUT --out OUT --device cpu`, then `extra`, then
/// `-q`, under [`AS_LIMIT`] and a 10-minute timeout.
pub fn segment_cpu(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> Run {
    let os = std::ffi::OsStr::new;
    let mut args = vec![
        os("segment"),
        os("--model"),
        model.as_os_str(),
        os("--input"),
        input.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--device"),
        os("cpu"),
    ];
    args.extend(extra.iter().map(|&a| os(a)));
    args.push(os("-q"));
    run_limited(&args, AS_LIMIT, Duration::from_secs(600))
}

/// Runs the `ichcam` binary with `args` under an address-space limit of `as_limit` bytes
/// (`setrlimit(RLIMIT_AS)` in the child before `exec`), killed after `timeout`.
pub fn run_limited(args: &[&std::ffi::OsStr], as_limit: u64, timeout: Duration) -> Run {
    let mut cmd = super::bin();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("ICHCAM_MAX_MEMORY")
        .env_remove("ICHCAM_MAX_VOLUME_BYTES")
        .env("RUST_BACKTRACE", "0");
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: as_limit as libc::rlim_t,
                rlim_max: as_limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn ichcam");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    let outcome = match status {
        None => Outcome::Timeout,
        Some(s) => classify(s, &stderr),
    };
    Run {
        outcome,
        stdout,
        stderr,
    }
}

fn classify(s: std::process::ExitStatus, stderr: &str) -> Outcome {
    if stderr.contains("panicked") {
        return Outcome::Panic(first_line(stderr, "panicked"));
    }
    if stderr.contains("memory allocation of") {
        return Outcome::Signal(libc::SIGABRT);
    }
    match (s.code(), s.signal()) {
        (Some(0), _) => Outcome::Ok,
        (Some(1), _) => match stderr.lines().find(|l| l.starts_with("error: ")) {
            Some(l) if l.len() > "error: ".len() + 5 => Outcome::CleanError(l.to_string()),
            _ => Outcome::Unclear(format!("exit 1 without an error line: {stderr}")),
        },
        (Some(101), _) => Outcome::Panic(stderr.to_string()),
        (Some(c), _) => Outcome::Unclear(format!("exit {c}: {stderr}")),
        (None, Some(sig)) => Outcome::Signal(sig),
        (None, None) => Outcome::Unclear("no exit status".into()),
    }
}

fn first_line(s: &str, containing: &str) -> String {
    s.lines()
        .find(|l| l.contains(containing))
        .unwrap_or("")
        .to_string()
}

/// An error unless every entry of `out` (if it exists) is a folder holding exactly the
/// complete, non-empty outputs of one volume (no hidden temporary leftovers, no partial set).
pub fn check_outputs(out: &Path) -> Result<usize, String> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        if !p.is_dir() {
            return Err(format!("{}: not an output folder", p.display()));
        }
        let mut files: Vec<String> = std::fs::read_dir(&p)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut want: Vec<String> = OUTPUT_FILES.iter().map(|s| s.to_string()).collect();
        if files.iter().any(|f| f == UNET_OUTPUT) {
            want.push(UNET_OUTPUT.to_string());
        }
        want.sort();
        if name.starts_with('.') || files != want {
            return Err(format!(
                "{}: partial or stray output: {files:?}",
                p.display()
            ));
        }
        for f in &files {
            let len = std::fs::metadata(p.join(f)).map(|m| m.len()).unwrap_or(0);
            if len == 0 {
                return Err(format!("{}: empty {f}", p.display()));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Writes a NIfTI file whose header claims `(nx, ny, nz)` `uint8` voxels, all `fill`,
/// gzip-compressed (a few hundred KB for hundreds of MB of voxels).
pub fn write_big_u8_gz(path: &Path, dims: (usize, usize, usize), fill: u8) {
    use std::io::Write;
    let (nx, ny, nz) = dims;
    let mut v = Volume::from_array(Array3::zeros((1, 1, 1)), [1.0, 0.5, 0.5], "big".into());
    v.header.dim = [3, nx as u16, ny as u16, nz as u16, 1, 1, 1, 1];
    v.header.datatype = 2;
    v.header.bitpix = 8;
    v.header.pixdim = [1.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0];
    v.header.scl_slope = 1.0;
    v.header.scl_inter = 0.0;
    let head = io::nii::header_bytes(&v.header);
    let f = std::fs::File::create(path).unwrap();
    let mut e =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::fast());
    e.write_all(&head).unwrap();
    let plane = vec![fill; nx * ny];
    for _ in 0..nz {
        e.write_all(&plane).unwrap();
    }
    e.finish().unwrap().flush().unwrap();
}
