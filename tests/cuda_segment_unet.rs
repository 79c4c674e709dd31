//! Segmentation with a stage-3 U-Net on the CUDA device against the CPU: `Segmenter` on the
//! device runs the U-Net there (its map is the CPU's within f32 rounding, and not flat), and
//! every `--fuse` gives the CPU's mask, the U-Net's refinement differing from the CAM's on
//! the device as it does on the CPU; by slabs as whole; and `ichcam segment --device cuda`
//! writes the CPU's U-Net map and mask. The model is the small random one of
//! tests/common/files.rs (ResNet of width 4; U-Net of depth 2 and 8 features: with 4, that
//! seed's map is flat) on a 6 x 48 x 48 phantom: the emulator is slow. Runs on a GPU or on
//! the emulated driver (`scripts/cuda-emu.sh test`); without either the tests are reported
//! as ignored (tests/common/cuda.rs).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::bin;
use common::cuda::device;
use ichcam::engine::cpu::CpuBackend;
use ichcam::engine::cuda::CudaBackend;
use ichcam::infer::{Fuse, RefineOnBackend, SegmentOptions, Segmentation, Segmenter};
use ichcam::io::{self, Volume};

fn main() {
    common::cuda::main(vec![
        device(
            "segment_runs_the_unet_on_the_device_as_on_the_cpu",
            segment_runs_the_unet_on_the_device_as_on_the_cpu,
        ),
        device(
            "the_segment_command_on_the_device_writes_the_cpus_unet_map_and_mask",
            the_segment_command_on_the_device_writes_the_cpus_unet_map_and_mask,
        ),
    ])
}

/// The model input size, the U-Net's features and the phantom's slices.
const SIZE: usize = 32;
const FEATURES: usize = 8;
const SLICES: usize = 6;

/// A model with a U-Net and the phantom, written once for both tests, and the U-Net's
/// threshold: the median of the CPU's U-Net map over the phantom (a random U-Net's map is
/// nearly flat around some level: the median cuts it in two, so its refinement differs from
/// the CAM's).
struct Work {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    volume: Volume,
    volume_path: PathBuf,
    threshold: f32,
}

fn work() -> &'static Work {
    static WORK: OnceLock<Work> = OnceLock::new();
    WORK.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let model = root.join("unet.safetensors");
        common::files::write_model_with_unet(&model, SIZE, FEATURES);
        let volume = common::files::phantom(SLICES);
        let volume_path = root.join("v.nii.gz");
        io::write_volume(&volume_path, &volume).expect("write the phantom");
        let s = segment(CpuBackend::<f32>::new(), &model, &volume, Fuse::Cam, 0.5);
        let mut u: Vec<f32> = s.unet.expect("a U-Net map").iter().copied().collect();
        u.sort_by(f32::total_cmp);
        let threshold = u[u.len() / 2];
        Work {
            _dir: dir,
            root,
            model,
            volume,
            volume_path,
            threshold,
        }
    })
}

/// Every slice positive, the whole slice in the CAM's region and no size filter: the
/// refinement has work everywhere; the U-Net's region is where its map reaches `t`.
fn options(fuse: Fuse, t: f32) -> SegmentOptions {
    let mut o = SegmentOptions {
        slice_threshold: Some(0.0),
        min_component_ml: Some(0.0),
        fuse: Some(fuse),
        unet_threshold: t,
        unet_grow: t,
        ..SegmentOptions::default()
    };
    o.refine.cam_threshold = 0.0;
    o.refine.grow_cam_threshold = 0.0;
    o.refine.min_cam_support = 0.0;
    o
}

fn segmenter<B: RefineOnBackend>(be: B, model: &Path, fuse: Fuse, t: f32) -> Segmenter<B> {
    let seg = Segmenter::load(be, model, options(fuse, t)).expect("load the model");
    assert!(seg.unet_config().is_some(), "the model has a U-Net");
    assert_eq!(seg.fuse(), fuse);
    seg
}

fn segment<B: RefineOnBackend>(
    be: B,
    model: &Path,
    vol: &Volume,
    fuse: Fuse,
    t: f32,
) -> Segmentation {
    segmenter(be, model, fuse, t)
        .segment(vol)
        .expect("segment the phantom")
}

fn cuda() -> CudaBackend {
    CudaBackend::new(0).expect("the CUDA device")
}

fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Voxels set in one mask and not the other, and the voxels of each.
fn mask_diff<'a>(
    a: impl IntoIterator<Item = &'a u8>,
    b: impl IntoIterator<Item = &'a u8>,
) -> (usize, usize, usize) {
    let (mut diff, mut na, mut nb) = (0, 0, 0);
    for (&x, &y) in a.into_iter().zip(b) {
        let (x, y) = (x != 0, y != 0);
        diff += (x != y) as usize;
        na += x as usize;
        nb += y as usize;
    }
    (diff, na, nb)
}

/// At most 0.5% of the larger mask's voxels (and at least one voxel of slack) may differ:
/// voxels whose map value lies within f32 rounding of a threshold may fall either way.
fn assert_masks_agree(what: &str, cpu: &[u8], dev: &[u8]) {
    let (diff, nc, nd) = mask_diff(cpu, dev);
    let allowed = (nc.max(nd) / 200).max(1);
    assert!(
        diff <= allowed,
        "{what}: {diff} voxels differ between the CPU's mask ({nc}) and the device's ({nd})"
    );
}

fn segment_runs_the_unet_on_the_device_as_on_the_cpu() {
    let w = work();
    let t = w.threshold;
    let mut masks = Vec::new();
    for fuse in [Fuse::Cam, Fuse::Unet, Fuse::Or] {
        let c = segment(CpuBackend::<f32>::new(), &w.model, &w.volume, fuse, t);
        let g = segment(cuda(), &w.model, &w.volume, fuse, t);
        let what = format!("--fuse {}", fuse.name());
        let (uc, ug) = (
            c.unet.as_ref().expect("the CPU's U-Net map"),
            g.unet.as_ref().expect("the device's U-Net map"),
        );
        assert_eq!(uc.dim(), (SLICES, 48, 48));
        assert_eq!(uc.dim(), ug.dim());
        let (lo, hi) = uc
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(
            hi - lo > 1e-3,
            "{what}: the U-Net's map is flat ({lo}..{hi}): nothing to compare"
        );
        let e = max_abs_diff(uc, ug);
        assert!(e < 1e-4, "{what}: U-Net map differs by {e:e}");
        let e = max_abs_diff(&c.cam, &g.cam);
        assert!(e < 1e-3, "{what}: CAM differs by {e:e}");
        for (z, (a, b)) in c.probabilities.iter().zip(&g.probabilities).enumerate() {
            assert!((a - b).abs() < 1e-4, "{what}: slice {z}: {a} vs {b}");
        }
        let (cm, gm) = (
            c.mask.as_slice().expect("standard layout"),
            g.mask.as_slice().expect("standard layout"),
        );
        assert!(
            cm.iter().any(|&v| v != 0),
            "{what}: the CPU's mask is empty: nothing to compare"
        );
        assert_masks_agree(&what, cm, gm);
        masks.push((c.mask, g.mask));
    }
    // The fuse matters, on the device as on the CPU: the U-Net's refinement is not the
    // CAM's, and the union holds both.
    let [cam, unet, or] = [0, 1, 2].map(|i| &masks[i]);
    for (dev, (a, u, o)) in [
        ("CPU", (&cam.0, &unet.0, &or.0)),
        ("device", (&cam.1, &unet.1, &or.1)),
    ] {
        let (diff, nc, nu) = mask_diff(a, u);
        assert!(
            diff > 0 && nu > 0,
            "{dev}: --fuse unet ({nu} voxels) gives the CAM's mask ({nc})"
        );
        for ((&a, &u), &o) in a.iter().zip(u).zip(o) {
            assert_eq!(
                o != 0,
                a != 0 || u != 0,
                "{dev}: --fuse or is not the union"
            );
        }
    }
    // By slabs on the device: the whole pass's result.
    let mut seg = segmenter(cuda(), &w.model, Fuse::Or, t);
    let whole = seg.segment(&w.volume).expect("segment");
    let by = ichcam::infer::slabs::segment_by_slabs(&mut seg, &w.volume, 4).expect("by slabs");
    assert_eq!(by.unet, whole.unet);
    assert_eq!(by.cam, whole.cam);
    assert_eq!(by.mask, whole.mask);
}

fn segment_with_the_binary(device: &str, out: &Path) {
    let w = work();
    let t = format!("{}", w.threshold);
    let mut cmd = bin();
    cmd.args([
        "segment",
        "--quiet",
        "--slice-threshold",
        "0",
        "--cam-threshold",
        "0",
        "--grow-cam-threshold",
        "0",
        "--min-cam-support",
        "0",
        "--min-component-ml",
        "0",
        "--min-blood-hu",
        "20",
        "--fuse",
        "or",
        "--unet-threshold",
        &t,
        "--unet-grow",
        &t,
        "--device",
        device,
        "--model",
    ])
    .arg(&w.model)
    .arg("--input")
    .arg(&w.volume_path)
    .arg("--out")
    .arg(out);
    let o = cmd.output().expect("the ichcam binary runs");
    assert!(
        o.status.success(),
        "{cmd:?} failed ({:?}):\n{}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn the_segment_command_on_the_device_writes_the_cpus_unet_map_and_mask() {
    let w = work();
    let (cpu_out, dev_out) = (w.root.join("bin-cpu"), w.root.join("bin-cuda"));
    segment_with_the_binary("cpu", &cpu_out);
    segment_with_the_binary("cuda", &dev_out);
    let read = |dir: &Path, f: &str| {
        io::read_volume(&dir.join("v").join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .data
    };
    let (uc, ug) = (read(&cpu_out, "unet.nii.gz"), read(&dev_out, "unet.nii.gz"));
    assert_eq!(uc.dim(), (SLICES, 48, 48));
    assert_eq!(uc.dim(), ug.dim());
    let (lo, hi) = uc
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    assert!(hi - lo > 1e-3, "the U-Net's map is flat ({lo}..{hi})");
    let e = max_abs_diff(&uc, &ug);
    assert!(e < 1e-4, "unet.nii.gz differs by {e:e}");
    let (mc, mg) = (
        io::to_mask(&io::read_mask(&cpu_out.join("v/mask.nii.gz")).expect("the CPU's mask")),
        io::to_mask(&io::read_mask(&dev_out.join("v/mask.nii.gz")).expect("the device's mask")),
    );
    let (mc, mg) = (
        mc.as_slice().expect("standard layout"),
        mg.as_slice().expect("standard layout"),
    );
    assert!(
        mc.iter().any(|&v| v != 0),
        "the CPU's mask is empty: nothing to compare"
    );
    assert_masks_agree("ichcam segment --fuse or", mc, mg);
}
