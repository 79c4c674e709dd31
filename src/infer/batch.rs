//! Segmenting many volumes: a reader thread decodes the next volumes while the backend
//! computes the current one and a writer thread compresses and writes the previous one's
//! outputs. The queues between them hold at most two volumes each, and every volume holds
//! a reservation of its estimated peak from the memory budget ([`crate::io::budget::Pool`]):
//! taken before it is read (from its header), lowered to what writing needs once it is
//! segmented, given back once it is written. So the volumes in flight together stay within
//! the budget; a volume too large for it whole is segmented by slabs, or refused with its
//! size and the budget ([`super::memory`]). A bad volume is reported and skipped; the batch
//! goes on.

use super::inputs::InputItem;
use super::memory::{Costs, Estimate};
use super::outputs::{write_outputs_with, OutputOptions, VolumeSummary};
use super::segmenter::{RefineOnBackend, Segmentation, Segmenter};
use super::slabs::segment_planned;
use crate::io::budget::{Pool, Reservation};
use crate::io::{self, Volume};
use crossbeam_channel::bounded;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Instant;

/// What a batch did.
#[derive(Debug, Default)]
pub struct BatchReport {
    pub done: Vec<VolumeSummary>,
    /// (id, one-line reason).
    pub failed: Vec<(String, String)>,
    pub seconds: f64,
}

impl BatchReport {
    pub fn volumes_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.done.len() as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Segments `items` into `out/<id>/`.
pub fn segment_all<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    items: &[InputItem],
    out: &Path,
    progress: bool,
) -> BatchReport {
    segment_all_with(seg, items, out, progress, OutputOptions::default())
}

/// As [`segment_all`], writing the optional outputs `outputs` asks for; with
/// [`OutputOptions::dicom_seg`], the first volume not read from DICOM prints one note.
pub fn segment_all_with<B: RefineOnBackend>(
    seg: &mut Segmenter<B>,
    items: &[InputItem],
    out: &Path,
    progress: bool,
    outputs: OutputOptions,
) -> BatchReport {
    let start = Instant::now();
    let bar = if progress {
        let b = ProgressBar::new(items.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} volumes  {per_sec}  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let budget = io::budget::budget();
    let costs = Costs::of(seg, &budget);
    let pool = Pool::new((budget.bytes as u128).saturating_sub(costs.fixed) as u64);
    type Read<'p> = Result<(Volume, Estimate, Reservation<'p>), String>;
    let (read_tx, read_rx) = bounded::<(InputItem, Read<'_>)>(2);
    let (write_tx, write_rx) = bounded::<(InputItem, Volume, Segmentation, Reservation<'_>)>(2);
    let mut report = BatchReport::default();
    let (pool, costs) = (&pool, &costs);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for it in items {
                let v = read_planned(it, costs, pool, &budget);
                if read_tx.send((it.clone(), v)).is_err() {
                    break;
                }
            }
        });
        let wbar = bar.clone();
        let writer = scope.spawn(move || {
            let mut done = Vec::new();
            let mut failed = Vec::new();
            let mut noted = false;
            for (it, vol, s, held) in write_rx {
                match write_outputs_with(&out.join(&it.id), &it.id, &vol, &s, outputs) {
                    Ok(summary) => {
                        if let Some(why) = summary
                            .dicom_seg
                            .as_deref()
                            .and_then(|n| n.strip_prefix("not written: "))
                        {
                            if !noted {
                                noted = true;
                                wbar.suspend(|| {
                                    eprintln!(
                                        "note: {}: no seg.dcm ({why}): --dicom-seg writes one \
                                         only for DICOM inputs (each summary.json says)",
                                        it.id
                                    )
                                });
                            }
                        }
                        done.push(summary)
                    }
                    Err(e) => failed.push((it.id.clone(), e.to_string())),
                }
                drop(held);
            }
            (done, failed)
        });
        let mut compute_failed = Vec::new();
        for (it, vol) in read_rx {
            bar.set_message(it.id.clone());
            let result = vol.and_then(|(v, est, mut held)| {
                if let super::memory::Mode::Slabs(n) = est.mode {
                    let (d, h, w) = v.dims();
                    bar.suspend(|| {
                        eprintln!(
                            "note: {}: {w}x{h}x{d} voxels segmented by slabs of {n} slices to stay within the memory budget",
                            it.id
                        )
                    });
                }
                let s = segment_planned(seg, &v, &est).map_err(|e| e.to_string())?;
                held.shrink_to(est.write_bytes as u64);
                Ok((v, s, held))
            });
            match result {
                Ok((v, s, held)) => {
                    if write_tx.send((it, v, s, held)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    bar.suspend(|| eprintln!("error: {}: {e}", it.id));
                    compute_failed.push((it.id.clone(), e));
                }
            }
            bar.inc(1);
        }
        drop(write_tx);
        match writer.join() {
            Ok((done, failed)) => {
                report.done = done;
                report.failed = compute_failed;
                report.failed.extend(failed);
            }
            Err(_) => {
                report.failed = compute_failed;
                report.failed.push((
                    "(writer)".into(),
                    "the output writer thread panicked".into(),
                ));
            }
        }
    });
    bar.finish_and_clear();
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// Plans a volume from its header, waits for its bytes in the pool, and reads it (only the
/// item's series, when it names one).
fn read_planned<'p>(
    item: &InputItem,
    costs: &Costs,
    pool: &'p Pool,
    budget: &io::budget::Budget,
) -> Result<(Volume, Estimate, Reservation<'p>), String> {
    let path = item.path.as_path();
    let opts = io::ReadOptions {
        series: item.series.clone(),
        ..Default::default()
    };
    let dims = io::probe_dims_with(path, &opts).map_err(|e| e.to_string())?;
    let est = costs.plan(dims, pool.total() as u128).map_err(|reason| {
        format!(
            "{}: {reason} (memory budget {}, of which the model holds {})",
            path.display(),
            budget.describe(),
            io::error::human_bytes(costs.fixed)
        )
    })?;
    let held = pool
        .reserve(est.bytes as u64)
        .ok_or_else(|| format!("{}: internal: plan over the pool", path.display()))?;
    let v = io::read_volume_printing(path, &opts).map_err(|e| e.to_string())?;
    Ok((v, est, held))
}
