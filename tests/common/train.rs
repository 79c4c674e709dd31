//! Training cases for the training tests: synthetic phantoms with their slice labels.

use ichcam::data::synth::{phantom, plan_positive, SynthConfig};
use ichcam::train::TrainCase;

/// `n` phantoms of `slices` slices at `size`^2 from `seed` (positives as `plan_positive`
/// draws them), each its own patient.
pub fn phantoms(n: usize, size: usize, slices: usize, seed: u64) -> Vec<TrainCase> {
    let cfg = SynthConfig {
        size,
        slices,
        clean: false,
    };
    let pos = plan_positive(n, seed);
    (0..n)
        .map(|i| {
            let p = phantom(&cfg, seed, i, pos[i]).expect("phantom");
            TrainCase {
                id: format!("{i:03}"),
                patient: format!("p{i:03}"),
                labels: p.slice_labels().iter().map(|&l| l > 0).collect(),
                hu: p.hu,
                spacing: p.spacing,
            }
        })
        .collect()
}
