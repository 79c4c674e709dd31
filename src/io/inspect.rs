//! A human-readable description of one volume (a NIfTI file or a DICOM folder): dims,
//! spacing, orientation, datatype, HU statistics and the NaN/Inf count.
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

/// Statistics over every voxel (`None` for an empty array).
pub fn stats(data: &Array3<f32>) -> Option<Stats> {
    let mut v: Vec<f32> = data.iter().copied().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f32::total_cmp);
    let n = v.len();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let at = |p: f64| v[((p / 100.0) * (n - 1) as f64).round() as usize];
    Some(Stats {
        min: v[0],
        max: v[n - 1],
        mean,
        percentiles: PERCENTILES.map(at),
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

/// Describes the volume at `path` (a `.nii`/`.nii.gz` file or a DICOM folder) in a few
/// lines of text.
pub fn describe(path: &Path) -> Result<String, IoError> {
    let (v, r) = super::read_volume_report(path)?;
    let h = &v.header;
    let (nz, ny, nx) = v.dims();
    let mut s = String::new();
    let kind = if path.is_dir() {
        "DICOM series"
    } else {
        "NIfTI-1"
    };
    let _ = writeln!(s, "file         {}", path.display());
    let _ = writeln!(s, "format       {kind}");
    let _ = write!(s, "datatype     {}", r.datatype);
    if !path.is_dir() && h.scl_slope != 0.0 && (h.scl_slope != 1.0 || h.scl_inter != 0.0) {
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
