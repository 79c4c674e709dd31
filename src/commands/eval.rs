//! `ichcam eval`: compares predicted masks with the ground truth, prints the table and
//! writes the JSON report. Exits non-zero when a truth volume has no prediction or a volume
//! could not be evaluated (after printing and writing everything else).

use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Predictions: `DIR/<id>/mask.nii.gz` or `DIR/<id>.nii.gz`.
    #[arg(long)]
    pub pred: PathBuf,
    /// Truth masks: `DIR/<id>.nii.gz` (or `.nii`, or a `<id>.hdr`/`.img` pair), or a dataset
    /// folder with `labels/` (or `label/`).
    #[arg(long)]
    pub truth: PathBuf,
    /// Write the report (summary + per-volume metrics) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also read each prediction's `cam.nii.gz` and report how well the CAM points at the
    /// truth (truth voxels inside CAM >= 0.7, CAM peaks on the truth) on flagged slices.
    #[arg(long)]
    pub cam: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (report, orphans) =
        ichcam::eval::dirs::evaluate_dirs_with(&args.pred, &args.truth, args.cam).with_context(
            || {
                format!(
                    "evaluating {} against {}",
                    args.pred.display(),
                    args.truth.display()
                )
            },
        )?;
    for id in &orphans {
        eprintln!("warning: prediction {id} has no truth mask; ignored");
    }
    // With `--json -` the JSON alone goes to stdout.
    if args.json.as_deref() == Some(std::path::Path::new("-")) {
        eprint!("{}", report.table());
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.json {
        let json = report.to_json().context("serialising the report")?;
        ichcam::io::atomic::write_atomic(path, |w| {
            w.write_all(json.as_bytes())?;
            w.write_all(b"\n")
        })
        .context("writing the JSON report")?;
        if path.as_os_str() != "-" {
            eprintln!("wrote {}", path.display());
        }
    }
    let s = &report.summary;
    if !report.missing.is_empty() {
        anyhow::bail!(
            "{} truth volume(s) without a prediction: {}",
            report.missing.len(),
            report.missing.join(", ")
        );
    }
    if s.n_errors > 0 {
        let bad: Vec<&str> = report
            .volumes
            .iter()
            .filter(|v| v.error.is_some())
            .map(|v| v.id.as_str())
            .collect();
        anyhow::bail!(
            "{} volume(s) could not be evaluated: {}",
            s.n_errors,
            bad.join(", ")
        );
    }
    Ok(())
}
