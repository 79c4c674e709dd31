//! `ichcam segment`: masks, CAMs, slice probabilities and overlays for volumes, with a
//! trained model. Keeps going past a bad volume and exits non-zero at the end if any failed.

use anyhow::Context;
use ichcam::infer::{
    expand_inputs_with, segment_all_with, BatchReport, ExpandOptions, Fuse, InputItem,
    OutputOptions, RefineOnBackend, SegmentOptions, Segmenter, SliceClassifier,
};
use ichcam::model::CamKind;
use ichcam::seg::ccl::Connectivity;
use ichcam::seg::RefineMode;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Model file written by `ichcam train`.
    #[arg(long)]
    model: PathBuf,
    /// NIfTI files (or a .hdr/.img pair by either file), DICOM series folders, folders of
    /// volumes or dataset folders.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Walk every folder under each input folder (patient/study/series trees; symbolic links
    /// to folders are not followed): each NIfTI file, and each CT series of each folder's
    /// DICOM images (Modality CT or absent, not a LOCALIZER, at least --min-slices slices),
    /// is a volume, named by its path below the input (`patient1_study2_series3`, plus
    /// `_s<SeriesNumber>` when a folder holds several such series). Skipped series are
    /// listed on stderr with the reason.
    #[arg(long)]
    recursive: bool,
    /// With --recursive: DICOM series with fewer slices are skipped.
    #[arg(long, default_value_t = ichcam::infer::inputs::DEFAULT_MIN_SLICES)]
    min_slices: usize,
    /// Read only this series (SeriesInstanceUID) of the one DICOM folder input (a folder
    /// holding several series: `ichcam inspect DIR` lists them).
    #[arg(long, conflicts_with = "recursive")]
    series: Option<String>,
    /// Output folder: one `<id>/` per volume (mask.nii.gz, cam.nii.gz, slices.csv,
    /// overlay.png, summary.json; seg.dcm with --dicom-seg).
    #[arg(long)]
    out: PathBuf,
    /// Also write `seg.dcm` beside the mask for each DICOM input: a DICOM Segmentation
    /// (Segmentation Storage, one "Hemorrhage" segment) of the source series, with the
    /// source's patient and study identifiers, for PACS and viewers. Off by default (it
    /// copies patient identifiers into the output folder); a NIfTI input gets a note.
    #[arg(long)]
    dicom_seg: bool,
    /// auto (a GPU when there is one), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution arithmetic on CUDA: f32 (the reference), tf32 or bf16 (tensor cores,
    /// f32 accumulation; compute capability 8.0+). The CPU takes f32 only.
    #[arg(long, default_value = "f32")]
    precision: ichcam::engine::Precision,
    /// CAM: vanilla (the authors') or gradcam.
    #[arg(long, default_value = "vanilla")]
    cam: String,
    /// Slice classifier: stage1 (the ResNet-LSTM over sliding windows of slices: the
    /// default, slice AUC 0.84 vs 0.83 and pooled slice Dice 0.175 vs 0.154 in 5-fold CV on
    /// ct-ich, docs/accuracy.md) or stage2 (the single-slice fc head, the authors' test-time
    /// net). The CAM always comes from the stage-2 head.
    #[arg(long)]
    classifier: Option<String>,
    /// A slice is positive when its probability reaches this (default: the threshold the
    /// training calibrated on its validation slices, stored in the model; else 0.5).
    #[arg(long)]
    slice_threshold: Option<f64>,
    /// Binary CAM = normalised CAM >= this: where k-means looks for the blood cluster (the
    /// authors: 0.7; our default for real CT: 0.4, chosen by cross-validation, see
    /// docs/accuracy.md).
    #[arg(long)]
    cam_threshold: Option<f32>,
    /// k-means clusters inside the CAM (the authors: 4).
    #[arg(long)]
    k: Option<usize>,
    /// Clusters whose centroid reaches this (80/200 window, 0..1) are not blood.
    #[arg(long)]
    saturation: Option<f32>,
    /// Keep the saturation level fixed even when the data is clipped below 180 HU.
    #[arg(long)]
    no_adapt_saturation: bool,
    /// The lesion may grow from the binary CAM into the CAM's region down to this level, in
    /// the intensity band (ours, default 0.1; set it to --cam-threshold for no growth).
    #[arg(long)]
    grow_cam_threshold: Option<f32>,
    /// Darkest cluster centroid (HU) taken for acute blood (ours, default 45).
    #[arg(long)]
    min_blood_hu: Option<f32>,
    /// In-plane box-filter radius before k-means (ours, default 1; 0 = the raw intensities).
    #[arg(long)]
    smooth: Option<usize>,
    /// Keep every voxel from this HU up to the saturation level in the grow region of the
    /// slices where k-means found a blood cluster (ours, default 55).
    #[arg(long)]
    band_floor_hu: Option<f32>,
    /// Use the k-means band's own lower edge (halfway to the next darker cluster) instead of
    /// --band-floor-hu.
    #[arg(long)]
    kmeans_band: bool,
    /// In-plane opening radius of the band mask (ours, default 2; 0 = off): drops what is thinner than
    /// 2r+1 pixels (cortical ribbon, partial volume along the skull).
    #[arg(long)]
    open: Option<usize>,
    /// Dilation radius (pixels) of the chosen cluster (default 1).
    #[arg(long)]
    dilate: Option<usize>,
    /// Components smaller than this (mL) are dropped (default 0.3).
    #[arg(long)]
    min_component_ml: Option<f64>,
    /// Fraction of a component that must lie where the CAM reaches --grow-cam-threshold
    /// (default 0.5).
    #[arg(long)]
    min_cam_support: Option<f32>,
    /// 3-D connectivity: 6, 18 or 26 (default 26).
    #[arg(long)]
    connectivity: Option<u32>,
    /// Slices per forward pass.
    #[arg(long, default_value_t = ct().batch_slices)]
    batch_slices: usize,
    /// Refinement: ours (the default) or authors (SWICH-Seg's code literally: Grad-CAM with
    /// ReLU, k-means on the whole slice of CAM x subdural window, the brightest cluster with
    /// mean < 140/255, two 4x4 dilations, no connected components; the threshold, growth,
    /// floor, smoothing and component options are then unused).
    #[arg(long, default_value = "ours")]
    refine: String,
    /// With a stage-3 U-Net in the model: unet (the refinement inside the U-Net's map: the
    /// default, see docs/accuracy.md), or (the U-Net's mask ORed with the CAM's, the
    /// authors' test time) or cam (the CAM's alone). Without a U-Net: cam.
    #[arg(long)]
    fuse: Option<String>,
    /// The U-Net's probability where its refinement looks for the blood cluster.
    #[arg(long, default_value_t = ichcam::infer::segmenter::DEFAULT_UNET_THRESHOLD)]
    unet_threshold: f32,
    /// The U-Net's probability the lesion may grow to, in the intensity band.
    #[arg(long, default_value_t = ichcam::infer::segmenter::DEFAULT_UNET_GROW)]
    unet_grow: f32,
    /// Average each slice's CAM and logit with those of its left-right mirror.
    #[arg(long)]
    flip_tta: bool,
    /// No positive slice in a volume whose most probable slice stays below this.
    #[arg(long)]
    volume_threshold: Option<f64>,
    /// With a stage-3 U-Net (--fuse unet or or): drop the components of which more than
    /// this fraction of voxels mirror, across the head's midline, onto another component
    /// (bilateral anatomy, not blood; see docs/accuracy.md); 1 = off (the default:
    /// after --outside-skull it removed nothing more).
    #[arg(long, default_value_t = 1.0)]
    mirror_pairs: f32,
    /// Drop the components of which more than this fraction of voxels lies outside the
    /// skull (scalp, temporal muscles; see docs/accuracy.md); 1 = off.
    #[arg(long, default_value_t = ichcam::seg::skull::DEFAULT_MAX_OUTSIDE_FRACTION)]
    outside_skull: f32,
    /// With a stage-3 U-Net (--fuse unet or or): drop the components on fewer slices than
    /// this (see docs/accuracy.md); 1 = off.
    #[arg(long, default_value_t = ichcam::infer::segmenter::DEFAULT_MIN_COMPONENT_SLICES)]
    min_component_slices: usize,
    /// Development: a folder of truth masks for --oracle.
    #[arg(long, hide = true)]
    oracle_truth: Option<PathBuf>,
    /// Development: cam, flags or both: replace the CAM and/or the slice flags with ones made
    /// from the truth masks of --oracle-truth (the refinement's ceiling).
    #[arg(long, hide = true, requires = "oracle_truth")]
    oracle: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn options(a: &Args) -> anyhow::Result<SegmentOptions> {
    let cam = match a.cam.to_ascii_lowercase().as_str() {
        "vanilla" | "cam" => CamKind::Vanilla,
        "gradcam" | "grad-cam" => CamKind::GradCam,
        other => anyhow::bail!("unknown --cam `{other}` (expected vanilla or gradcam)"),
    };
    // The defaults are the library's real-CT ones; every flag overrides one of them.
    let mut o = SegmentOptions { cam, ..ct() };
    if let Some(c) = &a.classifier {
        o.classifier = match c.to_ascii_lowercase().as_str() {
            "stage2" => SliceClassifier::Stage2,
            "stage1" => SliceClassifier::Stage1,
            other => anyhow::bail!("unknown --classifier `{other}` (expected stage2 or stage1)"),
        };
    }
    let unit = |v: Option<f32>, name: &str| -> anyhow::Result<()> {
        if let Some(v) = v {
            anyhow::ensure!((0.0..=1.0).contains(&v), "--{name} must be in [0, 1]");
        }
        Ok(())
    };
    if let Some(t) = a.slice_threshold {
        anyhow::ensure!(
            (0.0..=1.0).contains(&t),
            "--slice-threshold must be in [0, 1]"
        );
    }
    unit(a.cam_threshold, "cam-threshold")?;
    unit(a.grow_cam_threshold, "grow-cam-threshold")?;
    unit(Some(a.unet_threshold), "unet-threshold")?;
    unit(Some(a.unet_grow), "unet-grow")?;
    unit(Some(a.mirror_pairs), "mirror-pairs")?;
    unit(Some(a.outside_skull), "outside-skull")?;
    o.min_component_slices = a.min_component_slices.max(1);
    o.skull = (a.outside_skull < 1.0).then(|| ichcam::seg::SkullFilter {
        max_outside_fraction: a.outside_skull,
        ..ichcam::seg::SkullFilter::default()
    });
    o.mirror = (a.mirror_pairs < 1.0).then(|| ichcam::seg::MirrorFilter {
        max_pair_fraction: a.mirror_pairs,
        ..ichcam::seg::MirrorFilter::default()
    });
    if let Some(ml) = a.min_component_ml {
        anyhow::ensure!(ml >= 0.0, "--min-component-ml must be >= 0");
        o.min_component_ml = Some(ml);
    }
    o.slice_threshold = a.slice_threshold;
    o.flip_tta = a.flip_tta;
    if let Some(t) = a.volume_threshold {
        anyhow::ensure!(
            (0.0..=1.0).contains(&t),
            "--volume-threshold must be in [0, 1]"
        );
    }
    o.volume_threshold = a.volume_threshold;
    if let (Some(dir), Some(what)) = (&a.oracle_truth, &a.oracle) {
        let (cam, flags) = match what.as_str() {
            "cam" => (true, false),
            "flags" => (false, true),
            "both" => (true, true),
            other => anyhow::bail!("unknown --oracle `{other}` (expected cam, flags or both)"),
        };
        o.oracle = Some(ichcam::infer::Oracle {
            truth_dir: dir.clone(),
            cam,
            flags,
        });
    }
    o.adapt_saturation = !a.no_adapt_saturation;
    o.batch_slices = a.batch_slices.max(1);
    let r = &mut o.refine;
    if let Some(v) = a.cam_threshold {
        r.cam_threshold = v;
    }
    if let Some(v) = a.k {
        r.k = v;
    }
    if let Some(v) = a.saturation {
        r.saturation = v;
    }
    if let Some(v) = a.dilate {
        r.dilate_radius = v;
    }
    if let Some(v) = a.grow_cam_threshold {
        r.grow_cam_threshold = v;
    }
    if let Some(v) = a.min_blood_hu {
        r.min_blood_hu = v;
    }
    if let Some(v) = a.smooth {
        r.smooth_radius = v;
    }
    if let Some(v) = a.band_floor_hu {
        r.band_floor_hu = Some(v);
    }
    if a.kmeans_band {
        r.band_floor_hu = None;
    }
    if let Some(v) = a.open {
        r.open_radius = v;
    }
    if let Some(v) = a.min_cam_support {
        r.min_cam_support = v;
    }
    if let Some(v) = a.connectivity {
        r.connectivity = Connectivity::from_neighbours(v)?;
    }
    o.fuse =
        match &a.fuse {
            None => None,
            Some(f) => Some(Fuse::parse(f).ok_or_else(|| {
                anyhow::anyhow!("unknown --fuse `{f}` (expected unet, or or cam)")
            })?),
        };
    o.unet_threshold = a.unet_threshold;
    o.unet_grow = a.unet_grow;
    match a.refine.to_ascii_lowercase().as_str() {
        "ours" => {}
        "authors" => {
            o.refine.mode = RefineMode::Authors;
            o.cam = CamKind::GradCam;
            o.adapt_saturation = false;
            o.min_component_ml = None;
        }
        other => anyhow::bail!("unknown --refine `{other}` (expected ours or authors)"),
    }
    Ok(o)
}

/// The defaults of `ichcam segment` (its options start from them; see
/// [`SegmentOptions::real_ct`]).
fn ct() -> SegmentOptions {
    SegmentOptions::real_ct()
}

/// Segments the expanded inputs with an already chosen backend.
pub fn run_with<B: RefineOnBackend>(
    backend: B,
    model: &Path,
    items: &[InputItem],
    out: &Path,
    opts: SegmentOptions,
    outputs: OutputOptions,
    progress: bool,
) -> anyhow::Result<BatchReport> {
    let mut seg = Segmenter::load(backend, model, opts)
        .with_context(|| format!("loading the model {}", model.display()))?;
    if progress {
        eprintln!(
            "segmenting {} volume(s) on {} at {}x{} model input, slice threshold {:.3}, {}",
            items.len(),
            seg.backend().name(),
            seg.input_size(),
            seg.input_size(),
            seg.slice_threshold(),
            match seg.unet_config() {
                Some(_) => format!("stage-3 U-Net, --fuse {}", seg.fuse().name()),
                None => "no stage-3 U-Net".into(),
            }
        );
    }
    let report = segment_all_with(&mut seg, items, out, progress, outputs);
    Ok(report)
}

pub fn print_report(report: &BatchReport) {
    println!(
        "{:<24} {:>10} {:>6} {:>9}",
        "volume", "blood mL", "comps", "pos.sl."
    );
    for s in &report.done {
        println!(
            "{:<24} {:>10.2} {:>6} {:>9}",
            s.id,
            s.hemorrhage_ml,
            s.components,
            s.positive_slices.len()
        );
    }
    println!(
        "{} segmented, {} failed, {:.1} s ({:.2} volumes/s)",
        report.done.len(),
        report.failed.len(),
        report.seconds,
        report.volumes_per_second()
    );
    for (id, e) in &report.failed {
        eprintln!("failed: {id}: {e}");
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = options(&a)?;
    let mut device = super::open_device(&a.device, a.quiet)?;
    device.set_precision(a.precision)?;
    let expand = ExpandOptions {
        recursive: a.recursive,
        min_slices: a.min_slices,
        series: a.series.clone(),
    };
    let found = expand_inputs_with(&a.input, &expand)?;
    for s in &found.skipped {
        eprintln!("skipped: {s}");
    }
    let outputs = OutputOptions {
        dicom_seg: a.dicom_seg,
    };
    let report = ichcam::on_device!(device, be => run_with(be, &a.model, &found.items, &a.out, opts, outputs, !a.quiet))?;
    print_report(&report);
    if !report.failed.is_empty() {
        anyhow::bail!(
            "{} of {} volume(s) failed",
            report.failed.len(),
            report.failed.len() + report.done.len()
        );
    }
    Ok(())
}
