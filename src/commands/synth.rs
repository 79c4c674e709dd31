//! `ichcam synth`: writes synthetic non-contrast head CTs with exact hemorrhage masks in the
//! ct-ich-dev layout (images/, labels/, slice_labels.csv, manifest.csv).

use anyhow::Context;
use ichcam::data::synth::{self, SynthConfig};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Output folder (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of volumes (about 40% without hemorrhage).
    #[arg(long, default_value_t = 20)]
    pub volumes: usize,
    /// Seed: the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// In-plane size in pixels (square); spacing is 230 mm / size.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Number of 5 mm slices.
    #[arg(long, default_value_t = 24)]
    pub slices: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = SynthConfig {
        size: a.size,
        slices: a.slices,
        clean: false,
    };
    // Memory, before anything is made: the phantoms in the making (one per thread, their HU,
    // its copy and the mask: about 12 bytes a voxel) and the slice rows kept for the CSVs.
    let voxels = a.slices as u128 * a.size as u128 * a.size as u128;
    let need = voxels * 12 * rayon::current_num_threads() as u128
        + a.volumes as u128 * (a.slices as u128 * 512 + 256);
    ichcam::io::budget::budget().check(&a.out, need, || {
        format!(
            "synthesising {} volumes of {}x{}x{}",
            a.volumes, a.size, a.size, a.slices
        )
    })?;
    let t = Instant::now();
    let recs = synth::write_dataset(&a.out, a.volumes, a.seed, &cfg)
        .with_context(|| format!("writing {} phantoms to {}", a.volumes, a.out.display()))?;
    let pos = recs.iter().filter(|r| r.mask_voxels > 0).count();
    let slices: usize = recs.iter().map(|r| r.n_slices).sum();
    let pos_slices: usize = recs.iter().map(|r| r.positive_slices).sum();
    println!(
        "wrote {} volumes ({} with hemorrhage; {} of {} slices positive), {}x{}x{} at {:.3} mm x 5 mm, to {} in {:.1} s",
        recs.len(),
        pos,
        pos_slices,
        slices,
        a.slices,
        a.size,
        a.size,
        cfg.pixel_mm(),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
