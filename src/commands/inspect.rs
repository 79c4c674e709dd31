//! `ichcam inspect PATH`: describes a NIfTI file or a DICOM folder (`io::inspect`), or a
//! dataset folder (`data::dataset::summary`: volumes, slices and positive slices). A folder
//! is a dataset when it holds `images/` or `data/`, or volume files (`.nii`, `.nii.gz`,
//! `.hdr` of a pair: [`ichcam::io::volume_stem`]) directly. A DICOM folder holding several
//! series lists them; `--series UID` describes one.

use anyhow::Context;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// A `.nii`/`.nii.gz` file, a `.hdr`/`.img` pair (either file), a DICOM file or folder of
    /// slices, or a dataset folder.
    pub path: PathBuf,
    /// A DICOM folder holding several series: describe this one (SeriesInstanceUID).
    #[arg(long)]
    pub series: Option<String>,
}

fn is_dataset(p: &Path) -> bool {
    if !p.is_dir() {
        return false;
    }
    if ["images", "data"].iter().any(|d| p.join(d).is_dir()) {
        return true;
    }
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .any(|e| ichcam::io::volume_stem(&e.file_name().to_string_lossy()).is_some())
        })
        .unwrap_or(false)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let p = &args.path;
    ichcam::io::metadata(p)?;
    if is_dataset(p) && args.series.is_none() {
        let s = ichcam::data::dataset::summary(p)
            .with_context(|| format!("{}: cannot summarise the dataset", p.display()))?;
        println!("{s}");
    } else {
        let opts = ichcam::io::ReadOptions {
            series: args.series.clone(),
            ..Default::default()
        };
        print!("{}", ichcam::io::inspect::describe_with(p, &opts)?);
    }
    Ok(())
}
