//! The fuzz harness of issue 15, on stable Rust with no fuzzing engine: seeded mutations of
//! eight seed inputs (a NIfTI file, a `.nii.gz`, a DICOM series, a multi-frame DICOM file in
//! its folder, a model file, a slice-label CSV with its dataset, the NIfTI file as
//! NIfTI-2, and the NIfTI file as a `.hdr`/`.img` pair), each fed to the library's entry points in this
//! process and to the binary (`inspect`, `segment`, `eval`) in a child process, both under
//! an 8 GB address-space limit (`setrlimit(RLIMIT_AS)`). Every outcome must be clean: the
//! library returns `Ok` or an error without panicking; the binary exits 0, or 1 with an
//! `error:` line, within its deadline (no panic, no abort or other signal, no hang); and a
//! `segment` output folder holds complete sets of outputs only, an `eval --json` report is
//! whole JSON or absent.
//!
//! `ICHCAM_FUZZ_SECS` (default 20) bounds the run and `ICHCAM_FUZZ_SEED` (default 15) picks
//! the mutations: the same seed gives the same inputs. The counts are printed at the end
//! (`cargo test --release --test fuzz -- --nocapture`); failing inputs are kept in
//! `target/fuzz-failures/` with their description, and `target/fuzz-last-case.txt` names
//! the case being run (an abort of this process itself leaves it behind);
//! `ICHCAM_FUZZ_VERBOSE=1` prints every case and its outcome.

mod common;

use common::files::{run_limited, Outcome, Seeds, AS_LIMIT};
use common::rng::SplitMix64;
use ichcam::engine::cpu::CpuBackend;
use ichcam::infer::{segment_volume, SegmentOptions, Segmenter};
use ichcam::io;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Deadline of one binary run (a hang is a failure).
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Nifti,
    NiftiGz,
    Dicom,
    /// One Enhanced CT file: its folder or the file itself.
    DicomMf,
    Model,
    Csv,
    Nifti2,
    /// The NIfTI seed as a `.hdr`/`.img` pair (either gzipped): the header or the voxel
    /// file edited, or the voxel file gone; read by either name.
    Pair,
}

const KINDS: [Kind; 8] = [
    Kind::Nifti,
    Kind::NiftiGz,
    Kind::Dicom,
    Kind::DicomMf,
    Kind::Model,
    Kind::Csv,
    Kind::Nifti2,
    Kind::Pair,
];

/// The multi-frame seed: the DICOM seed's phantom as one Enhanced CT file (frames out of
/// order, per-frame rescale) in a folder of its own.
fn multiframe_seed(seeds: &Seeds) -> PathBuf {
    let dir = seeds.dir.join("seed_multiframe");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = common::enhanced::Enhanced {
        order: Some(vec![2, 0, 3, 1]),
        per_frame_rescale: true,
        ..Default::default()
    };
    common::enhanced::write_enhanced(&dir.join("enhanced.dcm"), &common::files::phantom(4), &spec);
    dir
}

/// Outcomes per (input kind, entry point).
#[derive(Default)]
struct Tally {
    rows: BTreeMap<(Kind, &'static str), [usize; 3]>,
    failures: Vec<String>,
}

impl Tally {
    /// Counts an outcome: 0 = ok, 1 = clean error, 2 = failure (described).
    fn add(&mut self, kind: Kind, entry: &'static str, class: usize, what: Option<String>) {
        self.rows.entry((kind, entry)).or_default()[class] += 1;
        if let Some(w) = what {
            self.failures.push(w);
        }
    }
}

fn interesting_i16(rng: &mut SplitMix64) -> i16 {
    *rng.pick(&[0, 1, -1, 2, 255, 256, 4096, i16::MAX, i16::MIN, 348, 352])
}
fn interesting_i32(rng: &mut SplitMix64) -> i32 {
    *rng.pick(&[0, 1, -1, 348, 352, 540, 65536, i32::MAX, i32::MIN, 1 << 30])
}
fn interesting_f32(rng: &mut SplitMix64) -> f32 {
    *rng.pick(&[
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        352.0,
        1e-30,
        1e30,
        f32::MAX,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-7,
        1e4,
    ])
}

/// One to four random edits of `b`; `hot` bytes at the start (a header) get most of them.
fn mutate_bytes(b: &mut Vec<u8>, rng: &mut SplitMix64, hot: usize) -> String {
    let mut did = Vec::new();
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(0);
        }
        let n = b.len();
        let region = if rng.chance(0.7) {
            hot.min(n).max(1)
        } else {
            n
        };
        let at = rng.below(region);
        match rng.below(8) {
            0 => {
                let bit = rng.below(8);
                b[at] ^= 1 << bit;
                did.push(format!("flip {at}.{bit}"));
            }
            1 => {
                let v = *rng.pick(&[0u8, 1, 0x7F, 0x80, 0xFF]);
                b[at] = v;
                did.push(format!("byte {at}={v}"));
            }
            2 if at + 2 <= n => {
                let at = at & !1;
                let v = interesting_i16(rng);
                b[at..at + 2].copy_from_slice(&v.to_le_bytes());
                did.push(format!("i16 {at}={v}"));
            }
            3 if at + 4 <= n => {
                let at = at & !3;
                if rng.chance(0.5) {
                    let v = interesting_i32(rng);
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    did.push(format!("i32 {at}={v}"));
                } else {
                    let v = interesting_f32(rng);
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    did.push(format!("f32 {at}={v}"));
                }
            }
            4 => {
                let keep = rng.below(n);
                b.truncate(keep);
                did.push(format!("truncate {keep}"));
            }
            5 => {
                let k = 1 + rng.below(4096);
                let junk: Vec<u8> = (0..k).map(|_| rng.next_u64() as u8).collect();
                b.extend(junk);
                did.push(format!("append {k}"));
            }
            6 => {
                let len = 1 + rng.below((n - at).min(512));
                b.drain(at..at + len);
                did.push(format!("delete {at}+{len}"));
            }
            _ => {
                let len = 1 + rng.below((n - at).min(512));
                let chunk = b[at..at + len].to_vec();
                let to = rng.below(n);
                b.splice(to..to, chunk);
                did.push(format!("copy {at}+{len}->{to}"));
            }
        }
    }
    did.join(", ")
}

/// A 4-byte length field set to something a file cannot hold.
fn huge_length(b: &mut [u8], rng: &mut SplitMix64) -> String {
    if b.len() < 4 {
        return String::new();
    }
    let at = rng.below(b.len() - 3) & !1;
    let v = *rng.pick(&[
        0xFFFF_FFFFu32,
        0xFFFF_FFF0,
        0xF000_0000,
        0x7FFF_FFFF,
        0x0010_0000,
    ]);
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    format!("u32 {at}={v:#x}")
}

fn interesting_json(rng: &mut SplitMix64) -> serde_json::Value {
    use serde_json::json;
    rng.pick(&[
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(1_000_000),
        json!(u64::MAX),
        json!(1.5),
        json!(1e300),
        json!("7"),
        json!(null),
        json!(true),
        json!([]),
        json!([1_000_000_000, 1]),
        json!([1, 1, 1, 1, 1, 1, 1, 1, 1]),
        json!({"a": 1}),
        json!("bottleneck"),
    ])
    .clone()
}

const META_STRINGS: [&str; 14] = [
    "0",
    "1",
    "-1",
    "16",
    "4000",
    "100000",
    "18446744073709551615",
    "NaN",
    "inf",
    "",
    "0.5",
    "1e9",
    "abc",
    "2048",
];

/// A model file edit: its config, metadata, tensor table or bytes.
fn mutate_model(seed: &[u8], rng: &mut SplitMix64) -> (Vec<u8>, String) {
    let (mut h, mut data) = common::files::split_safetensors(seed);
    let names: Vec<String> = h
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let what = match rng.below(6) {
        0 | 1 => {
            let mut cfg: serde_json::Value =
                serde_json::from_str(h["__metadata__"]["config"].as_str().unwrap()).unwrap();
            let k = *rng.pick(&[
                "base_width",
                "layers",
                "lstm_hidden",
                "lstm_layers",
                "head",
                "in_channels",
                "bn_eps",
                "bn_momentum",
                "block",
            ]);
            let v = interesting_json(rng);
            let d = format!("config.{k}={v}");
            cfg[k] = v;
            h["__metadata__"]["config"] = cfg.to_string().into();
            d
        }
        2 => {
            let k = *rng.pick(&[
                "ichcam.input_size",
                "ichcam.slices",
                "ichcam.slice_threshold",
                "config",
            ]);
            let v = *rng.pick(&META_STRINGS);
            h["__metadata__"][k] = v.into();
            format!("meta {k}={v:?}")
        }
        3 => {
            let name = rng.pick(&names).clone();
            let t = &mut h[&name];
            match rng.below(4) {
                0 => {
                    let d = *rng.pick(&["F16", "BF16", "F64", "I64", "U8", "BOOL", "X"]);
                    t["dtype"] = d.into();
                    format!("{name}.dtype={d}")
                }
                1 => {
                    let v = interesting_json(rng);
                    t["shape"] = serde_json::json!([v.clone()]);
                    format!("{name}.shape=[{v}]")
                }
                2 => {
                    let v = interesting_json(rng);
                    t["data_offsets"] = serde_json::json!([0, v.clone()]);
                    format!("{name}.data_offsets=[0,{v}]")
                }
                _ => {
                    h.as_object_mut().unwrap().remove(&name);
                    format!("removed {name}")
                }
            }
        }
        4 => {
            // Non-finite weights here and there.
            let k = 1 + rng.below(8);
            for _ in 0..k {
                if data.len() >= 4 {
                    let at = rng.below(data.len() - 3) & !3;
                    let v = *rng.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e38]);
                    data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            format!("{k} non-finite weights")
        }
        _ => {
            let mut b = common::files::join_safetensors(&h, &data);
            let d = mutate_bytes(&mut b, rng, 64);
            return (b, format!("bytes: {d}"));
        }
    };
    (common::files::join_safetensors(&h, &data), what)
}

/// A slice-label CSV edit.
fn mutate_csv(seed: &str, rng: &mut SplitMix64) -> (Vec<u8>, String) {
    let mut lines: Vec<String> = seed.lines().map(String::from).collect();
    let mut did = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let n = lines.len().max(1);
        let i = rng.below(n);
        if lines.is_empty() {
            lines.push(String::new());
        }
        match rng.below(9) {
            0..=3 => {
                let mut f: Vec<String> = lines[i].split(',').map(String::from).collect();
                let j = rng.below(f.len().max(1));
                let v = rng
                    .pick(&[
                        "",
                        "-1",
                        "1e12",
                        "999999999999",
                        "4294967296",
                        "18446744073709551616",
                        "NaN",
                        "2",
                        "x",
                        "0.5",
                        "true",
                        "\"",
                        "a,b",
                        "0",
                        "1",
                        "32767",
                    ])
                    .to_string();
                if j < f.len() {
                    f[j] = v.clone();
                }
                lines[i] = f.join(",");
                did.push(format!("line {i} field {j}={v:?}"));
            }
            4 => {
                lines.remove(i.min(lines.len() - 1));
                did.push(format!("delete line {i}"));
            }
            5 => {
                let l = lines[i].clone();
                lines.insert(i, l);
                did.push(format!("duplicate line {i}"));
            }
            6 => {
                lines[i] = "x".repeat(1 + rng.below(20000));
                did.push(format!("long line {i}"));
            }
            7 => {
                let h = rng.pick(&[
                    "z,patient,label",
                    "patient,slice,No_Hemorrhage",
                    "a,b,c",
                    "",
                ]);
                lines[0] = h.to_string();
                did.push(format!("header {h:?}"));
            }
            _ => {
                let p = rng.pick(&["a01", "a02", "zz", ""]);
                let z = rng.next_u64() >> rng.below(64);
                let l = rng.below(3);
                lines.push(format!("{p},{z},{l}"));
                did.push(format!("row {p},{z},{l}"));
            }
        }
    }
    let mut b = lines.join("\n").into_bytes();
    if rng.chance(0.1) {
        b.extend([0xFF, 0xFE, 0x00]);
        did.push("non-UTF-8".into());
    }
    (b, did.join(", "))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Writes one mutant of `kind` under `dir`; returns the input path and the edit.
fn make_mutant(
    kind: Kind,
    seeds: &Seeds,
    multiframe: &Path,
    rng: &mut SplitMix64,
    dir: &Path,
) -> (PathBuf, String) {
    match kind {
        Kind::Nifti => {
            let mut b = std::fs::read(&seeds.nii).unwrap();
            let d = mutate_bytes(&mut b, rng, 352);
            let p = dir.join("m.nii");
            std::fs::write(&p, b).unwrap();
            (p, d)
        }
        Kind::NiftiGz => {
            let p = dir.join("m.nii.gz");
            let d = if rng.chance(0.5) {
                let mut b = std::fs::read(&seeds.nii).unwrap();
                let d = mutate_bytes(&mut b, rng, 352);
                std::fs::write(&p, common::files::gz(&b)).unwrap();
                format!("inner: {d}")
            } else {
                let mut b = std::fs::read(&seeds.nii_gz).unwrap();
                let n = b.len();
                let d = mutate_bytes(&mut b, rng, n);
                std::fs::write(&p, b).unwrap();
                format!("stream: {d}")
            };
            (p, d)
        }
        Kind::Dicom => {
            let p = dir.join("series");
            copy_dir(&seeds.dicom, &p);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            files.sort();
            let f = rng.pick(&files).clone();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let d = match rng.below(10) {
                0 => {
                    std::fs::remove_file(&f).unwrap();
                    format!("removed {name}")
                }
                1 => {
                    std::fs::copy(&f, p.join("dup.dcm")).unwrap();
                    format!("duplicated {name}")
                }
                k => {
                    let mut b = std::fs::read(&f).unwrap();
                    let d = if k < 5 {
                        huge_length(&mut b, rng)
                    } else {
                        mutate_bytes(&mut b, rng, 1024)
                    };
                    std::fs::write(&f, b).unwrap();
                    format!("{name}: {d}")
                }
            };
            (p, d)
        }
        Kind::DicomMf => {
            let p = dir.join("series");
            copy_dir(multiframe, &p);
            let f = p.join("enhanced.dcm");
            let mut b = std::fs::read(&f).unwrap();
            // The header (meta and functional groups) is the first ~1.2 KB.
            let hot = b.len().min(1200);
            let d = match rng.below(10) {
                0 => {
                    std::fs::copy(&f, p.join("dup.dcm")).unwrap();
                    "duplicated".into()
                }
                k if k < 5 => huge_length(&mut b[..hot], rng),
                _ => mutate_bytes(&mut b, rng, hot),
            };
            std::fs::write(&f, b).unwrap();
            if rng.chance(0.5) {
                (f, format!("file: {d}"))
            } else {
                (p, format!("folder: {d}"))
            }
        }
        Kind::Model => {
            let seed = std::fs::read(&seeds.model).unwrap();
            let (b, d) = mutate_model(&seed, rng);
            let p = dir.join("m.safetensors");
            std::fs::write(&p, b).unwrap();
            (p, d)
        }
        Kind::Csv => {
            let p = dir.join("dataset");
            copy_dir(&seeds.dataset, &p);
            let seed = std::fs::read_to_string(p.join("slice_labels.csv")).unwrap();
            let (b, d) = mutate_csv(&seed, rng);
            std::fs::write(p.join("slice_labels.csv"), b).unwrap();
            (p, d)
        }
        Kind::Nifti2 => {
            // The NIfTI seed as NIfTI-2, in either byte order.
            let big = rng.chance(0.5);
            let seed = std::fs::read(&seeds.nii).unwrap();
            let mut b = common::nifti2::from_nifti1_file(&seed, big);
            let d = mutate_bytes(&mut b, rng, 544);
            let p = dir.join("m2.nii");
            std::fs::write(&p, b).unwrap();
            (p, format!("big-endian {big}: {d}"))
        }
        Kind::Pair => {
            let seed = std::fs::read(&seeds.nii).unwrap();
            let (mut hdr, mut img) = common::pair::split_nii(&seed);
            let d = match rng.below(8) {
                0 => "no .img".to_string(),
                1 | 2 => format!(".img: {}", mutate_bytes(&mut img, rng, 0)),
                _ => format!(".hdr: {}", mutate_bytes(&mut hdr, rng, 348)),
            };
            let gz = rng.chance(0.3);
            let ext = if gz { ".gz" } else { "" };
            let wrap = |b: &[u8]| if gz { common::files::gz(b) } else { b.to_vec() };
            let (h, i) = (
                dir.join(format!("m.hdr{ext}")),
                dir.join(format!("m.img{ext}")),
            );
            std::fs::write(&h, wrap(&hdr)).unwrap();
            if !d.starts_with("no .img") {
                std::fs::write(&i, wrap(&img)).unwrap();
            }
            let by_img = rng.chance(0.3);
            (
                if by_img { i } else { h },
                format!("gz {gz}, read by .img {by_img}: {d}"),
            )
        }
    }
}

/// The library's entry points for the input; `Err` describes a panic.
fn library(kind: Kind, input: &Path, seeds: &Seeds) -> Result<bool, String> {
    let call = || -> bool {
        match kind {
            Kind::Nifti
            | Kind::NiftiGz
            | Kind::Dicom
            | Kind::DicomMf
            | Kind::Nifti2
            | Kind::Pair => {
                let _ = io::probe_dims(input);
                io::read_volume_report(input).is_ok()
            }
            Kind::Model => {
                let _ = ichcam::model::checkpoint::read_tensors(input);
                match Segmenter::load(CpuBackend::<f32>::new(), input, SegmentOptions::default()) {
                    Ok(mut seg) => {
                        let v = io::read_volume(&seeds.nii).unwrap();
                        segment_volume(&mut seg, &v).is_ok()
                    }
                    Err(_) => false,
                }
            }
            Kind::Csv => {
                let a = ichcam::data::dataset::read_label_csv(&input.join("slice_labels.csv"));
                let b = ichcam::data::Dataset::open(input);
                a.is_ok() && b.is_ok()
            }
        }
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())
    })
}

/// The binary on the input; returns the entry name, the outcome, and a problem with the
/// files it left, if any.
fn binary(
    kind: Kind,
    input: &Path,
    seeds: &Seeds,
    dir: &Path,
    rng: &mut SplitMix64,
) -> (&'static str, Outcome, Option<String>) {
    let os = OsStr::new;
    let out = dir.join("out");
    let json = dir.join("eval.json");
    let segment = |model: &Path, vol: &Path| {
        run_limited(
            &[
                os("segment"),
                os("--model"),
                model.as_os_str(),
                os("--input"),
                vol.as_os_str(),
                os("--out"),
                out.as_os_str(),
                os("--device"),
                os("cpu"),
                os("-q"),
            ],
            AS_LIMIT,
            RUN_TIMEOUT,
        )
    };
    let (entry, run) = match kind {
        Kind::Model => ("segment", segment(input, &seeds.nii_gz)),
        Kind::Csv => (
            "inspect",
            run_limited(&[os("inspect"), input.as_os_str()], AS_LIMIT, RUN_TIMEOUT),
        ),
        _ => match rng.below(4) {
            0 => ("segment", segment(&seeds.model, input)),
            // (`eval` copies one file: not a DICOM folder, nor a pair.)
            1 if !matches!(kind, Kind::Dicom | Kind::DicomMf | Kind::Pair) => {
                let (p, t) = (dir.join("pred"), dir.join("truth"));
                std::fs::create_dir_all(&p).unwrap();
                std::fs::create_dir_all(&t).unwrap();
                let name = if matches!(kind, Kind::Nifti | Kind::Nifti2) {
                    "v.nii"
                } else {
                    "v.nii.gz"
                };
                std::fs::copy(input, p.join(name)).unwrap();
                std::fs::copy(&seeds.mask_gz, t.join("v.nii.gz")).unwrap();
                (
                    "eval",
                    run_limited(
                        &[
                            os("eval"),
                            os("--pred"),
                            p.as_os_str(),
                            os("--truth"),
                            t.as_os_str(),
                            os("--json"),
                            json.as_os_str(),
                        ],
                        AS_LIMIT,
                        RUN_TIMEOUT,
                    ),
                )
            }
            _ => (
                "inspect",
                run_limited(&[os("inspect"), input.as_os_str()], AS_LIMIT, RUN_TIMEOUT),
            ),
        },
    };
    let mut files = common::files::check_outputs(&out).err();
    if json.exists() {
        let whole = std::fs::read(&json)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some();
        if !whole {
            files = Some(format!("{}: not whole JSON", json.display()));
        }
    }
    let problem = files.or_else(|| (!run.outcome.is_clean()).then(|| run.stderr.clone()));
    (entry, run.outcome, problem)
}

/// Limits this process's own address space, as the binary's.
fn limit_self(bytes: u64) {
    let r = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &r);
    }
}

#[test]
fn fuzz_hostile_inputs() {
    let secs: u64 = std::env::var("ICHCAM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("ICHCAM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let verbose = std::env::var_os("ICHCAM_FUZZ_VERBOSE").is_some();
    limit_self(AS_LIMIT);
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("..");
    let keep = target.join("fuzz-failures");
    let _ = std::fs::remove_dir_all(&keep);
    let breadcrumb = target.join("fuzz-last-case.txt");
    let tmp = tempfile::tempdir().unwrap();
    let seeds = Seeds::new(&tmp.path().join("seeds"));
    let multiframe = multiframe_seed(&seeds);
    let mut rng = SplitMix64(seed);
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < Duration::from_secs(secs) {
        let kind = KINDS[i % KINDS.len()];
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (input, what) = make_mutant(kind, &seeds, &multiframe, &mut rng, &dir);
        let case = format!("seed {seed} case {i} {kind:?}: {what}");
        let _ = std::fs::write(&breadcrumb, &case);
        let (entry, outcome, problem) = binary(kind, &input, &seeds, &dir, &mut rng);
        let class = match (&outcome, &problem) {
            (_, Some(_)) => 2,
            (Outcome::Ok, None) => 0,
            _ => 1,
        };
        let failed = problem.map(|p| format!("{case}: binary {entry}: {outcome:?}: {p}"));
        tally.add(kind, entry, class, failed.clone());
        let lib = library(kind, &input, &seeds);
        let lclass = match &lib {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(_) => 2,
        };
        let lfailed = lib
            .as_ref()
            .err()
            .map(|p| format!("{case}: library panicked: {p}"));
        tally.add(kind, "library", lclass, lfailed.clone());
        if verbose {
            let line = format!("{case} -> {entry} {outcome:?}, library {lib:?}");
            println!("{}", line.chars().take(400).collect::<String>());
        }
        if failed.is_some() || lfailed.is_some() {
            let k = keep.join(format!("case{i}"));
            copy_dir(&dir, &k);
            let _ = std::fs::write(k.join("CASE.txt"), &case);
        }
        let _ = std::fs::remove_dir_all(&dir);
        i += 1;
    }
    let _ = std::fs::remove_file(&breadcrumb);
    let secs_run = start.elapsed().as_secs_f64();
    println!(
        "fuzz: seed {seed}, {i} inputs in {secs_run:.0} s, each through the library and the binary under an {} GB address-space limit",
        AS_LIMIT / 1_000_000_000
    );
    println!(
        "{:<8} {:<8} {:>6} {:>6} {:>12} {:>8}",
        "input", "entry", "runs", "ok", "clean error", "failed"
    );
    for ((kind, entry), [ok, err, bad]) in &tally.rows {
        println!(
            "{:<8} {:<8} {:>6} {:>6} {:>12} {:>8}",
            format!("{kind:?}"),
            entry,
            ok + err + bad,
            ok,
            err,
            bad
        );
    }
    for f in tally.failures.iter().take(20) {
        println!("FAILED {f}");
    }
    assert!(i >= KINDS.len(), "too few inputs in {secs} s");
    assert!(
        tally.failures.is_empty(),
        "{} of {i} inputs were not handled cleanly (kept in {})",
        tally.failures.len(),
        keep.display()
    );
}
