//! A human-readable description of one volume (a NIfTI file or `.hdr`/`.img` pair, a DICOM
//! folder or a multi-frame DICOM file): format (NIfTI-1, NIfTI-2, either as a pair, DICOM
//! series or multi-frame image), dims, spacing, orientation, datatype, HU statistics and the
//! NaN/Inf count. A DICOM folder holding several series is described by its list of series
//! (`dicom::list_series`, headers only), or one of them when asked for by UID.
//! Dataset folders are summarised by `crate::data` (io must not know dataset layouts).
//! Knows nothing about the network.

use super::geometry;
use super::IoError;
use ndarray::Array3;
use std::fmt::Write as _;
use std::path::Path;

/// Percentiles reported by [`describe`].
pub const PERCENTILES: [f64; 5] = [1.0, 5.0, 50.0, 95.0, 99.0];

/// Summary statistics of a volume's voxels.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    pub min: f32,
    pub max: f32,
    pub mean: f64,
    /// Values at [`PERCENTILES`] (nearest rank).
    pub percentiles: [f32; 5],
}

/// Statistics over every voxel (`None` for an empty array). The percentiles are exact
/// without a sorted copy of the voxels (which would double a large volume's memory): a
/// histogram of the high 16 bits of each value's order-preserving key finds the bin of each
/// rank, a second pass over the low 16 bits of the values in those bins finds the value.
pub fn stats(data: &Array3<f32>) -> Option<Stats> {
    let n = data.len();
    if n == 0 {
        return None;
    }
    // Keys sort like `f32::total_cmp`.
    let key = |v: f32| {
        let b = v.to_bits();
        if b & 0x8000_0000 != 0 {
            !b
        } else {
            b | 0x8000_0000
        }
    };
    let value = |k: u32| {
        f32::from_bits(if k & 0x8000_0000 != 0 {
            k & 0x7FFF_FFFF
        } else {
            !k
        })
    };
    let mut hi = vec![0u64; 1 << 16];
    let (mut min, mut max, mut sum) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f64);
    for &v in data.iter() {
        hi[(key(v) >> 16) as usize] += 1;
        min = min.min(v);
        max = max.max(v);
        sum += v as f64;
    }
    let ranks = PERCENTILES.map(|p| ((p / 100.0) * (n - 1) as f64).round() as u64);
    // The bin of each rank and the rank within it.
    let locate = |hist: &[u64], r: u64| {
        let mut acc = 0u64;
        for (b, &c) in hist.iter().enumerate() {
            if r < acc + c {
                return (b, r - acc);
            }
            acc += c;
        }
        (hist.len() - 1, 0)
    };
    let bins = ranks.map(|r| locate(&hi, r));
    let mut lo: Vec<Vec<u64>> = bins.iter().map(|_| vec![0u64; 1 << 16]).collect();
    for &v in data.iter() {
        let k = key(v);
        for (t, &(b, _)) in bins.iter().enumerate() {
            if (k >> 16) as usize == b {
                lo[t][(k & 0xFFFF) as usize] += 1;
            }
        }
    }
    let percentiles = std::array::from_fn(|t| {
        let (b, r) = bins[t];
        let (l, _) = locate(&lo[t], r);
        value(((b as u32) << 16) | l as u32)
    });
    Some(Stats {
        min,
        max,
        mean: sum / n as f64,
        percentiles,
    })
}

fn xform_name(code: i16) -> &'static str {
    match code {
        0 => "unknown",
        1 => "scanner",
        2 => "aligned",
        3 => "talairach",
        4 => "mni",
        5 => "template",
        _ => "invalid",
    }
}

/// Describes the volume at `path` (a `.nii`/`.nii.gz` file, either file of a `.hdr`/`.img`
/// pair, a DICOM file or folder) in a few lines of text; a DICOM folder holding several
/// series: the list of its series.
pub fn describe(path: &Path) -> Result<String, IoError> {
    describe_with(path, &super::ReadOptions::default())
}

/// As [`describe`], reading with `opts` (one series of a DICOM folder:
/// [`super::ReadOptions::series`]).
pub fn describe_with(path: &Path, opts: &super::ReadOptions) -> Result<String, IoError> {
    if opts.series.is_none() && path.is_dir() {
        let found = super::dicom::list_series(path)?;
        if found.len() > 1 {
            let mut s = String::new();
            let _ = writeln!(s, "folder       {}", path.display());
            let _ = writeln!(
                s,
                "format       DICOM folder holding {} series (pick one by its UID: \
                 inspect/segment --series UID)",
                found.len()
            );
            for x in &found {
                let _ = writeln!(s, "series       {}", x.line());
            }
            return Ok(s);
        }
    }
    let (v, r) = super::read_volume_with(path, opts)?;
    let h = &v.header;
    let (nz, ny, nx) = v.dims();
    let mut s = String::new();
    // A NIfTI-2 header is kept in NIfTI-1 form with its size, 540, in `sizeof_hdr`; a pair's
    // keeps its magic `ni1`/`ni2`.
    let dicom_file =
        !path.is_dir() && !super::nii::is_pair_name(path) && super::dicom::is_dicom_file(path);
    let pair = [*b"ni1\0", *b"ni2\0"].contains(&h.magic);
    let kind = if path.is_dir() {
        "DICOM series"
    } else if dicom_file {
        "DICOM multi-frame image"
    } else if h.sizeof_hdr == super::nii::HEADER_SIZE_2 as i32 {
        if pair {
            "NIfTI-2 pair (.hdr/.img)"
        } else {
            "NIfTI-2"
        }
    } else if pair {
        "NIfTI-1 pair (.hdr/.img)"
    } else {
        "NIfTI-1"
    };
    let _ = writeln!(s, "file         {}", path.display());
    let _ = writeln!(s, "format       {kind}");
    let _ = write!(s, "datatype     {}", r.datatype);
    if !path.is_dir()
        && !dicom_file
        && h.scl_slope != 0.0
        && (h.scl_slope != 1.0 || h.scl_inter != 0.0)
    {
        let _ = write!(s, " (scl_slope {}, scl_inter {})", h.scl_slope, h.scl_inter);
    }
    s.push('\n');
    let _ = writeln!(s, "dims x,y,z   {nx} x {ny} x {nz}");
    let _ = writeln!(
        s,
        "spacing mm   {} x {} x {}",
        v.spacing[2], v.spacing[1], v.spacing[0]
    );
    let _ = writeln!(
        s,
        "orientation  {} (from {}; sform code {} {}, qform code {} {})",
        v.orientation(),
        geometry::affine_source(h),
        h.sform_code,
        xform_name(h.sform_code),
        h.qform_code,
        xform_name(h.qform_code)
    );
    if let Some(st) = stats(&v.data) {
        let _ = writeln!(
            s,
            "HU           min {:.1}  max {:.1}  mean {:.2}",
            st.min, st.max, st.mean
        );
        let p: Vec<String> = PERCENTILES
            .iter()
            .zip(st.percentiles.iter())
            .map(|(p, x)| format!("p{p} {x:.1}"))
            .collect();
        let _ = writeln!(s, "percentiles  {}", p.join("  "));
    }
    let _ = writeln!(s, "NaN/Inf      {}", r.nonfinite);
    for w in super::report_warnings(path, &r) {
        let _ = writeln!(s, "warning      {w}");
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_those_of_the_sorted_values() {
        let mut x: u64 = 7;
        let vals: Vec<f32> = (0..3001)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((x >> 33) as f32 / 1e6) - 1000.0;
                if i % 7 == 0 {
                    -v
                } else {
                    v
                }
            })
            .chain([0.0, -0.0, 3.5, 3.5, -1024.0])
            .collect();
        let a = Array3::from_shape_vec((1, 1, vals.len()), vals.clone()).unwrap();
        let st = stats(&a).unwrap();
        let mut sorted = vals.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        let n = sorted.len();
        for (p, got) in PERCENTILES.iter().zip(st.percentiles) {
            let want = sorted[((p / 100.0) * (n - 1) as f64).round() as usize];
            assert_eq!(got.to_bits(), want.to_bits(), "p{p}");
        }
        assert_eq!((st.min, st.max), (sorted[0], sorted[n - 1]));
    }
}
