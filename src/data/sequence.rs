//! Slice sequences of a fixed length S for the ResNet-LSTM: the authors' mode (the first S
//! slices; shorter volumes padded by repeating the last slice) and a sliding-window mode
//! (windows of S with a stride, the last one flush with the top, so every slice is seen),
//! with the merge that averages per-slice predictions of overlapping windows.
//! A sequence is only a list of z indices: labels, images and predictions map through it.
//! Knows nothing about HU or the network.

use super::error::{DataError, Result};
use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis};

/// One sequence: position `p` of the model input holds slice `z[p]` of the volume.
/// Positions `n_real..` are padding (repeats of the last slice): their predictions are
/// dropped when merging, and a loss may mask them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqWindow {
    pub z: Vec<usize>,
    pub n_real: usize,
}

impl SeqWindow {
    /// S, the sequence length.
    pub fn len(&self) -> usize {
        self.z.len()
    }
    pub fn is_empty(&self) -> bool {
        self.z.is_empty()
    }
    /// Whether position `p` holds a real slice (not padding).
    pub fn is_real(&self, p: usize) -> bool {
        p < self.n_real
    }
    /// `(position, z)` of the real positions.
    pub fn real(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.z.iter().copied().enumerate().take(self.n_real)
    }
    /// 1 for real positions, 0 for padding (a loss weight).
    pub fn real_weights(&self) -> Vec<f32> {
        (0..self.len())
            .map(|p| if self.is_real(p) { 1.0 } else { 0.0 })
            .collect()
    }
}

/// How a volume becomes sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqMode {
    /// The authors' mode: one sequence, the first S slices (the rest are lost), or all
    /// slices padded by repeating the last one.
    CropPad,
    /// Windows of S every `stride` slices, the last one ending at the top slice; a volume
    /// shorter than S gets one padded window.
    Sliding { stride: usize },
}

fn check(n_slices: usize, s: usize) -> Result<()> {
    if s == 0 {
        return Err(DataError::Invalid(
            "sequence length must be at least 1".into(),
        ));
    }
    if n_slices == 0 {
        return Err(DataError::Invalid(
            "a volume with no slices has no sequence".into(),
        ));
    }
    Ok(())
}

/// The authors' sequence: positions `0..S` map to `min(p, n_slices - 1)`.
pub fn crop_pad(n_slices: usize, s: usize) -> Result<SeqWindow> {
    check(n_slices, s)?;
    Ok(SeqWindow {
        z: (0..s).map(|p| p.min(n_slices - 1)).collect(),
        n_real: n_slices.min(s),
    })
}

/// Sliding windows of `s` slices every `stride` (1..=s) slices; together they cover every
/// slice, the last window is shifted down to end at the top slice.
pub fn sliding(n_slices: usize, s: usize, stride: usize) -> Result<Vec<SeqWindow>> {
    check(n_slices, s)?;
    if stride == 0 || stride > s {
        return Err(DataError::Invalid(format!(
            "sliding-window stride {stride} must be in 1..={s} (the sequence length) so that \
             every slice is covered"
        )));
    }
    if n_slices <= s {
        return Ok(vec![crop_pad(n_slices, s)?]);
    }
    let mut starts: Vec<usize> = (0..n_slices - s).step_by(stride).collect();
    starts.push(n_slices - s);
    Ok(starts
        .into_iter()
        .map(|a| SeqWindow {
            z: (a..a + s).collect(),
            n_real: s,
        })
        .collect())
}

/// The sequences of a volume of `n_slices` slices in `mode`.
pub fn plan(n_slices: usize, s: usize, mode: SeqMode) -> Result<Vec<SeqWindow>> {
    match mode {
        SeqMode::CropPad => Ok(vec![crop_pad(n_slices, s)?]),
        SeqMode::Sliding { stride } => sliding(n_slices, s, stride),
    }
}

fn check_z(win: &SeqWindow, n: usize) -> Result<()> {
    match win.z.iter().find(|&&z| z >= n) {
        Some(z) => Err(DataError::Invalid(format!(
            "sequence refers to slice {z} of {n}"
        ))),
        None => Ok(()),
    }
}

/// Per-slice values (labels) laid out as the sequence: `out[p] = values[z[p]]`.
pub fn gather<T: Copy>(values: &[T], win: &SeqWindow) -> Result<Vec<T>> {
    check_z(win, values.len())?;
    Ok(win.z.iter().map(|&z| values[z]).collect())
}

/// Slices of a `[z, y, x]` volume laid out as the sequence: `[S, y, x]`.
pub fn gather_slices<T: Clone>(vol: ArrayView3<T>, win: &SeqWindow) -> Result<Array3<T>> {
    check_z(win, vol.len_of(Axis(0)))?;
    Ok(vol.select(Axis(0), &win.z))
}

/// Planes of a `[z, c, y, x]` stack (windowed input) laid out as the sequence: `[S, c, y, x]`.
pub fn gather_stack(x: ArrayView4<f32>, win: &SeqWindow) -> Result<Array4<f32>> {
    check_z(win, x.len_of(Axis(0)))?;
    Ok(x.select(Axis(0), &win.z))
}

fn check_preds(windows: &[SeqWindow], lens: impl Iterator<Item = usize>, n: usize) -> Result<()> {
    let lens: Vec<usize> = lens.collect();
    if lens.len() != windows.len() {
        return Err(DataError::Invalid(format!(
            "{} predictions for {} sequences",
            lens.len(),
            windows.len()
        )));
    }
    for (w, l) in windows.iter().zip(lens) {
        if l != w.len() {
            return Err(DataError::Invalid(format!(
                "a prediction of length {l} for a sequence of {}",
                w.len()
            )));
        }
        check_z(w, n)?;
    }
    Ok(())
}

/// Per-slice scores of every sequence merged back onto the volume's `n_slices` slices: each
/// slice gets the mean over the real positions that hold it. Returns the merged scores and
/// whether each slice was covered at all (an uncovered slice, as past S in [`SeqMode::CropPad`],
/// scores 0 and `false`).
pub fn merge_scores(
    n_slices: usize,
    windows: &[SeqWindow],
    preds: &[Vec<f32>],
) -> Result<(Vec<f32>, Vec<bool>)> {
    check_preds(windows, preds.iter().map(Vec::len), n_slices)?;
    let mut sum = vec![0.0f64; n_slices];
    let mut count = vec![0u32; n_slices];
    for (w, p) in windows.iter().zip(preds) {
        for (pos, z) in w.real() {
            sum[z] += p[pos] as f64;
            count[z] += 1;
        }
    }
    let values = sum
        .iter()
        .zip(&count)
        .map(|(&s, &c)| if c > 0 { (s / c as f64) as f32 } else { 0.0 })
        .collect();
    Ok((values, count.iter().map(|&c| c > 0).collect()))
}

/// Per-slice maps (CAMs, `[S, h, w]` per sequence) merged onto `[n_slices, h, w]` by the same
/// averaging as [`merge_scores`]; uncovered slices are zero and `false`.
pub fn merge_maps(
    n_slices: usize,
    windows: &[SeqWindow],
    maps: &[ArrayView3<f32>],
) -> Result<(Array3<f32>, Vec<bool>)> {
    check_preds(windows, maps.iter().map(|m| m.len_of(Axis(0))), n_slices)?;
    let (h, w) = match maps.first() {
        Some(m) => (m.len_of(Axis(1)), m.len_of(Axis(2))),
        None => (0, 0),
    };
    if let Some(m) = maps
        .iter()
        .find(|m| (m.len_of(Axis(1)), m.len_of(Axis(2))) != (h, w))
    {
        return Err(DataError::Invalid(format!(
            "maps of different sizes: {:?} and {:?}",
            (h, w),
            m.dim()
        )));
    }
    let mut sum = Array3::<f32>::zeros((n_slices, h, w));
    let mut count = vec![0u32; n_slices];
    for (win, m) in windows.iter().zip(maps) {
        for (pos, z) in win.real() {
            let mut dst = sum.index_axis_mut(Axis(0), z);
            dst += &m.index_axis(Axis(0), pos);
            count[z] += 1;
        }
    }
    for (z, &c) in count.iter().enumerate() {
        if c > 1 {
            sum.index_axis_mut(Axis(0), z)
                .mapv_inplace(|v| v / c as f32);
        }
    }
    Ok((sum, count.iter().map(|&c| c > 0).collect()))
}
