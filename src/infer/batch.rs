//! Segmenting many volumes: a reader thread decodes the next volumes while the backend
//! computes the current one and a writer thread compresses and writes the previous one's
//! outputs. The queues between them hold at most two volumes each, so memory stays flat
//! over an archive of any size. A bad volume is reported and skipped; the batch goes on.

use super::inputs::InputItem;
use super::outputs::{write_outputs, VolumeSummary};
use super::segmenter::{RefineOnBackend, Segmentation, Segmenter};
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
    let (read_tx, read_rx) = bounded::<(InputItem, Result<Volume, String>)>(2);
    let (write_tx, write_rx) = bounded::<(InputItem, Volume, Segmentation)>(2);
    let mut report = BatchReport::default();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for it in items {
                let v = io::read_volume(&it.path).map_err(|e| e.to_string());
                if read_tx.send((it.clone(), v)).is_err() {
                    break;
                }
            }
        });
        let writer = scope.spawn(move || {
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for (it, vol, s) in write_rx {
                match write_outputs(&out.join(&it.id), &it.id, &vol, &s) {
                    Ok(summary) => done.push(summary),
                    Err(e) => failed.push((it.id.clone(), e.to_string())),
                }
            }
            (done, failed)
        });
        let mut compute_failed = Vec::new();
        for (it, vol) in read_rx {
            bar.set_message(it.id.clone());
            let result =
                vol.and_then(|v| seg.segment(&v).map(|s| (v, s)).map_err(|e| e.to_string()));
            match result {
                Ok((v, s)) => {
                    if write_tx.send((it, v, s)).is_err() {
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
