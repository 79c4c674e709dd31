//! The training log: one record per epoch (stage, train loss, validation loss, AUC,
//! accuracy, seconds), written as JSON (`MODEL.log.json`) and drawn as a PNG plot
//! (`MODEL.plot.png`: loss on the left, AUC and accuracy on the right, grey lines where
//! stages 2 and 3 start). The plot is rasterised by hand into an RGB buffer: no plotting crate.
//! Knows nothing about the network.

use crate::io::IoError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One finished epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1 (ResNet-LSTM on sequences), 2 (fc head on single slices) or 3 (the U-Net; its
    /// losses are soft Dice + BCE against the pseudo-masks, no AUC).
    pub stage: u8,
    /// 1-based epoch within its stage.
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: Option<f64>,
    pub val_auc: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
    /// Whether this epoch became the stage's best checkpoint.
    pub best: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainLog {
    /// The preset's name and the backend, for the reader.
    pub config: String,
    pub device: String,
    pub epochs: Vec<EpochRecord>,
}

impl TrainLog {
    pub fn to_json(&self) -> String {
        // Serialising plain numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    pub fn write_json(&self, path: &Path) -> Result<(), IoError> {
        let json = self.to_json();
        crate::io::atomic::write_atomic(path, |w| w.write_all(json.as_bytes()))
    }

    pub fn write_plot(&self, path: &Path) -> Result<(), IoError> {
        let (w, h, rgb) = self.render_plot();
        crate::io::png::write_rgb(path, w, h, &rgb)
    }

    /// Draws the two panels into an RGB buffer: `(width, height, rgb)`.
    pub fn render_plot(&self) -> (usize, usize, Vec<u8>) {
        let (w, h) = (800usize, 320usize);
        let mut c = Canvas::new(w, h);
        let n = self.epochs.len();
        let stage_starts: Vec<usize> = [2u8, 3]
            .iter()
            .filter_map(|&st| self.epochs.iter().position(|r| r.stage == st))
            .collect();
        // Left panel: losses, from 0 to the largest finite loss.
        let losses: Vec<f64> = self
            .epochs
            .iter()
            .flat_map(|r| [Some(r.train_loss), r.val_loss])
            .flatten()
            .filter(|v| v.is_finite())
            .collect();
        let ymax = losses.iter().cloned().fold(0.0f64, f64::max).max(1e-6);
        let left = Panel {
            x0: 40,
            y0: 20,
            x1: 390,
            y1: 290,
        };
        let right = Panel {
            x0: 440,
            y0: 20,
            x1: 790,
            y1: 290,
        };
        for (p, top) in [(left, ymax), (right, 1.0)] {
            c.axes(&p);
            c.number(p.x0 as i64 - 36, p.y0 as i64 - 3, top);
            c.number(p.x0 as i64 - 36, p.y1 as i64 - 3, 0.0);
            for &s in &stage_starts {
                let x = p.x_of(s as f64 - 0.5, n);
                c.vline(x, p.y0, p.y1, [190, 190, 190]);
            }
        }
        // Chance level on the AUC panel.
        c.hline(right.x0, right.x1, right.y_of(0.5, 1.0), [220, 220, 220]);
        let series = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<Option<f64>> {
            self.epochs.iter().map(f).collect()
        };
        c.series(
            &left,
            &series(&|r| Some(r.train_loss)),
            ymax,
            n,
            [200, 40, 40],
        );
        c.series(&left, &series(&|r| r.val_loss), ymax, n, [40, 80, 200]);
        c.series(&right, &series(&|r| r.val_auc), 1.0, n, [30, 150, 60]);
        c.series(&right, &series(&|r| r.val_accuracy), 1.0, n, [230, 140, 20]);
        (w, h, c.rgb)
    }
}

#[derive(Clone, Copy)]
struct Panel {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

impl Panel {
    /// Epoch index (0-based, may be fractional) to pixel column.
    fn x_of(&self, i: f64, n: usize) -> usize {
        let span = (self.x1 - self.x0) as f64;
        let t = if n <= 1 {
            0.5
        } else {
            (i / (n - 1) as f64).clamp(0.0, 1.0)
        };
        self.x0 + (t * span).round() as usize
    }
    fn y_of(&self, v: f64, ymax: f64) -> usize {
        let t = (v / ymax).clamp(0.0, 1.0);
        self.y1 - (t * (self.y1 - self.y0) as f64).round() as usize
    }
}

struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            rgb: vec![255; w * h * 3],
        }
    }
    fn put(&mut self, x: i64, y: i64, col: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&col);
        }
    }
    fn hline(&mut self, x0: usize, x1: usize, y: usize, col: [u8; 3]) {
        for x in x0..=x1 {
            self.put(x as i64, y as i64, col);
        }
    }
    fn vline(&mut self, x: usize, y0: usize, y1: usize, col: [u8; 3]) {
        for y in y0..=y1 {
            self.put(x as i64, y as i64, col);
        }
    }
    fn axes(&mut self, p: &Panel) {
        self.hline(p.x0, p.x1, p.y1, [0, 0, 0]);
        self.vline(p.x0, p.y0, p.y1, [0, 0, 0]);
        for (y, _) in [(p.y0, ()), ((p.y0 + p.y1) / 2, ())] {
            self.hline(p.x0.saturating_sub(4), p.x0, y, [0, 0, 0]);
        }
    }
    /// A 2-px line (Bresenham) between consecutive points; gaps where a value is missing;
    /// a small square marks every point.
    fn series(&mut self, p: &Panel, vals: &[Option<f64>], ymax: f64, n: usize, col: [u8; 3]) {
        let pts: Vec<Option<(i64, i64)>> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.filter(|v| v.is_finite())
                    .map(|v| (p.x_of(i as f64, n) as i64, p.y_of(v, ymax) as i64))
            })
            .collect();
        for w in pts.windows(2) {
            if let (Some(a), Some(b)) = (w[0], w[1]) {
                self.line(a, b, col);
                self.line((a.0, a.1 + 1), (b.0, b.1 + 1), col);
            }
        }
        for (x, y) in pts.into_iter().flatten() {
            for dy in -2..=2 {
                for dx in -2..=2 {
                    self.put(x + dx, y + dy, col);
                }
            }
        }
    }
    fn line(&mut self, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), col: [u8; 3]) {
        let dx = (x1 - x0).abs();
        let dy = -(y1 - y0).abs();
        let sx = if x0 < x1 { 1 } else { -1 };
        let sy = if y0 < y1 { 1 } else { -1 };
        let mut err = dx + dy;
        loop {
            self.put(x0, y0, col);
            if x0 == x1 && y0 == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }
    /// A number with 3 significant digits in a 5x7 bitmap font.
    fn number(&mut self, x: i64, y: i64, v: f64) {
        let text = if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        for (k, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits >> (4 - col) & 1 == 1 {
                        self.put(x + k as i64 * 6 + col, y + row as i64, [0, 0, 0]);
                    }
                }
            }
        }
    }
}

/// 5x7 glyphs of the digits and the decimal point, one row per byte (5 low bits).
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stage: u8, epoch: usize, loss: f64, auc: Option<f64>) -> EpochRecord {
        EpochRecord {
            stage,
            epoch,
            train_loss: loss,
            val_loss: Some(loss * 1.1),
            val_auc: auc,
            val_accuracy: auc.map(|a| a * 0.9),
            seconds: 1.0,
            best: false,
        }
    }

    #[test]
    fn json_roundtrip_and_plot() {
        let log = TrainLog {
            config: "tiny".into(),
            device: "cpu".into(),
            epochs: vec![
                rec(1, 1, 0.7, Some(0.6)),
                rec(1, 2, 0.5, None),
                rec(2, 1, 0.4, Some(0.9)),
            ],
        };
        let back: TrainLog = serde_json::from_str(&log.to_json()).unwrap();
        assert_eq!(back, log);
        let (w, h, rgb) = log.render_plot();
        assert_eq!(rgb.len(), w * h * 3);
        // Each series colour appears somewhere.
        let has = |c: [u8; 3]| rgb.chunks_exact(3).any(|p| p == c);
        assert!(has([200, 40, 40]) && has([40, 80, 200]) && has([30, 150, 60]));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.plot.png");
        log.write_plot(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // An empty log still draws (axes only).
        TrainLog::default().write_plot(&p).unwrap();
    }
}
