//! Voxel-to-world geometry from a NIfTI header: the affine (sform, else qform, else pixdim),
//! axis codes such as `RAS`/`LPS`, quaternion <-> rotation, and the header
//! [`Volume::from_array`] builds for synthetic volumes.
//! Voxel indices here are NIfTI's `(i, j, k) = (x, y, z)`; world axes are RAS+ (NIfTI).
//! Knows nothing about the network.

use super::volume::Volume;
use ndarray::Array3;
use std::path::PathBuf;

/// A 3x4 affine: `world = A[:, :3] * (i, j, k) + A[:, 3]`, rows are world x, y, z.
pub type Affine = [[f64; 4]; 3];

/// NIfTI `xyzt_units` for millimetres, no time unit.
pub const UNITS_MM: u8 = 2;
/// NIfTI xform code "scanner anatomical".
pub const XFORM_SCANNER: i16 = 1;

/// The header's voxel-to-world affine: the sform if its code is set, else the qform, else a
/// plain scaling by pixdim (NIfTI "method 1").
pub fn affine(h: &nifti::NiftiHeader) -> Affine {
    if h.sform_code > 0 {
        let r = |row: [f32; 4]| row.map(|v| v as f64);
        [r(h.srow_x), r(h.srow_y), r(h.srow_z)]
    } else if h.qform_code > 0 {
        qform_affine(h)
    } else {
        let p = |i: usize| h.pixdim[i] as f64;
        [
            [p(1), 0.0, 0.0, 0.0],
            [0.0, p(2), 0.0, 0.0],
            [0.0, 0.0, p(3), 0.0],
        ]
    }
}

/// Which affine [`affine`] uses, for display.
pub fn affine_source(h: &nifti::NiftiHeader) -> &'static str {
    if h.sform_code > 0 {
        "sform"
    } else if h.qform_code > 0 {
        "qform"
    } else {
        "pixdim"
    }
}

/// The qform affine (NIfTI-1 "method 2").
pub fn qform_affine(h: &nifti::NiftiHeader) -> Affine {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let s = [
        h.pixdim[1] as f64,
        h.pixdim[2] as f64,
        h.pixdim[3] as f64 * qfac,
    ];
    let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
    let mut out = [[0.0; 4]; 3];
    for row in 0..3 {
        for col in 0..3 {
            out[row][col] = r[row][col] * s[col];
        }
        out[row][3] = t[row];
    }
    out
}

/// Sets the qform (quaternion, offsets, qfac in `pixdim[0]`, spacings in `pixdim[1..4]`) from an
/// affine whose 3x3 part is a rotation (or reflection) times a diagonal scaling.
pub fn set_qform(h: &mut nifti::NiftiHeader, aff: &Affine, code: i16) {
    let mut r = [[0.0f64; 3]; 3];
    let mut s = [0.0f64; 3];
    for col in 0..3 {
        let n = (0..3).map(|row| aff[row][col].powi(2)).sum::<f64>().sqrt();
        s[col] = if n > 0.0 { n } else { 1.0 };
        for row in 0..3 {
            r[row][col] = if n > 0.0 {
                aff[row][col] / n
            } else if row == col {
                1.0
            } else {
                0.0
            };
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    // Quaternion from a rotation matrix (as nifti_mat44_to_quatern does).
    let (a, b, c, d);
    let tr = r[0][0] + r[1][1] + r[2][2] + 1.0;
    if tr > 0.5 {
        let a0 = 0.5 * tr.sqrt();
        a = a0;
        b = 0.25 * (r[2][1] - r[1][2]) / a0;
        c = 0.25 * (r[0][2] - r[2][0]) / a0;
        d = 0.25 * (r[1][0] - r[0][1]) / a0;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            let b0 = 0.5 * xd.sqrt();
            b = b0;
            c = 0.25 * (r[0][1] + r[1][0]) / b0;
            d = 0.25 * (r[0][2] + r[2][0]) / b0;
            a = 0.25 * (r[2][1] - r[1][2]) / b0;
        } else if yd > 1.0 {
            let c0 = 0.5 * yd.sqrt();
            c = c0;
            b = 0.25 * (r[0][1] + r[1][0]) / c0;
            d = 0.25 * (r[1][2] + r[2][1]) / c0;
            a = 0.25 * (r[0][2] - r[2][0]) / c0;
        } else {
            let d0 = 0.5 * zd.sqrt();
            d = d0;
            b = 0.25 * (r[0][2] + r[2][0]) / d0;
            c = 0.25 * (r[1][2] + r[2][1]) / d0;
            a = 0.25 * (r[1][0] - r[0][1]) / d0;
        }
    }
    // NIfTI stores b, c, d with a >= 0.
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    h.quatern_b = (sign * b) as f32;
    h.quatern_c = (sign * c) as f32;
    h.quatern_d = (sign * d) as f32;
    h.quatern_x = aff[0][3] as f32;
    h.quatern_y = aff[1][3] as f32;
    h.quatern_z = aff[2][3] as f32;
    h.pixdim[0] = qfac as f32;
    h.pixdim[1] = s[0] as f32;
    h.pixdim[2] = s[1] as f32;
    h.pixdim[3] = s[2] as f32;
    h.qform_code = code;
}

/// Sets the sform rows and code.
pub fn set_sform(h: &mut nifti::NiftiHeader, aff: &Affine, code: i16) {
    let f = |row: [f64; 4]| row.map(|v| v as f32);
    h.srow_x = f(aff[0]);
    h.srow_y = f(aff[1]);
    h.srow_z = f(aff[2]);
    h.sform_code = code;
}

/// Axis codes of the voxel axes `(x, y, z)` in RAS+ world, as nibabel's `aff2axcodes`:
/// `"RAS"` means x runs to the right, y to the front, z up; `"LPS"` is DICOM's order.
#[allow(clippy::needless_range_loop)] // matrix indexing reads better by index
pub fn axis_codes(aff: &Affine) -> String {
    const POS: [char; 3] = ['R', 'A', 'S'];
    const NEG: [char; 3] = ['L', 'P', 'I'];
    let mut used = [false; 3];
    let mut out = String::new();
    for col in 0..3 {
        let mut best: Option<usize> = None;
        for row in 0..3 {
            if used[row] {
                continue;
            }
            if best.is_none_or(|b| aff[row][col].abs() > aff[b][col].abs()) {
                best = Some(row);
            }
        }
        match best {
            Some(row) if aff[row][col] != 0.0 && aff[row][col].is_finite() => {
                used[row] = true;
                out.push(if aff[row][col] > 0.0 {
                    POS[row]
                } else {
                    NEG[row]
                });
            }
            _ => out.push('?'),
        }
    }
    out
}

/// A NIfTI-1 header for an `f32` volume of `[z, y, x]` shape `dim` and spacing
/// `spacing_zyx` (mm): axes RAS, centred on the world origin, sform and qform "scanner".
pub fn synthetic_header(dim: (usize, usize, usize), spacing_zyx: [f64; 3]) -> nifti::NiftiHeader {
    let (nz, ny, nx) = dim;
    let sp = |s: f64| if s.is_finite() && s > 0.0 { s } else { 1.0 };
    let (sx, sy, sz) = (sp(spacing_zyx[2]), sp(spacing_zyx[1]), sp(spacing_zyx[0]));
    let half = |n: usize, s: f64| -(n.saturating_sub(1) as f64) * s / 2.0;
    let aff: Affine = [
        [sx, 0.0, 0.0, half(nx, sx)],
        [0.0, sy, 0.0, half(ny, sy)],
        [0.0, 0.0, sz, half(nz, sz)],
    ];
    let clamp = |n: usize| n.min(i16::MAX as usize) as u16;
    let mut h = nifti::NiftiHeader {
        dim: [3, clamp(nx), clamp(ny), clamp(nz), 1, 1, 1, 1],
        datatype: 16,
        bitpix: 32,
        vox_offset: 352.0,
        scl_slope: 1.0,
        scl_inter: 0.0,
        xyzt_units: UNITS_MM,
        magic: *b"n+1\0",
        endianness: nifti::Endianness::Little,
        ..Default::default()
    };
    set_sform(&mut h, &aff, XFORM_SCANNER);
    set_qform(&mut h, &aff, XFORM_SCANNER);
    h
}

impl Volume {
    /// A volume from `[z, y, x]` HU data and `[z, y, x]` spacing in mm, with a consistent
    /// NIfTI header (RAS axes centred on the origin, sform and qform code 1, units mm):
    /// used for synthetic phantoms and anything else that has no file of origin.
    pub fn from_array(data: Array3<f32>, spacing_zyx: [f64; 3], source: PathBuf) -> Volume {
        let header = synthetic_header(data.dim(), spacing_zyx);
        let spacing = [
            header.pixdim[3] as f64,
            header.pixdim[2] as f64,
            header.pixdim[1] as f64,
        ];
        // Keep the caller's exact spacing when it is valid (pixdim is only f32).
        let spacing = std::array::from_fn(|i| {
            let s = spacing_zyx[i];
            if s.is_finite() && s > 0.0 {
                s
            } else {
                spacing[i]
            }
        });
        Volume {
            data,
            spacing,
            header,
            source,
            dicom: None,
        }
    }

    /// The voxel-to-world (RAS+) affine of this volume's header.
    pub fn affine(&self) -> Affine {
        affine(&self.header)
    }

    /// Axis codes such as `"RAS"` of the `(x, y, z)` voxel axes.
    pub fn orientation(&self) -> String {
        axis_codes(&self.affine())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qform_round_trips_rotation_and_reflection() {
        let c = 30f64.to_radians().cos();
        let s = 30f64.to_radians().sin();
        for flip in [1.0, -1.0] {
            let aff: Affine = [
                [0.7 * c, -0.8 * s, 0.0, 10.0],
                [0.7 * s, 0.8 * c, 0.0, -20.0],
                [0.0, 0.0, 5.0 * flip, 30.0],
            ];
            let mut h = nifti::NiftiHeader::default();
            set_qform(&mut h, &aff, 1);
            let back = qform_affine(&h);
            for r in 0..3 {
                for k in 0..4 {
                    assert!((back[r][k] - aff[r][k]).abs() < 1e-5, "{back:?} vs {aff:?}");
                }
            }
        }
    }

    #[test]
    fn axis_codes_of_ras_and_lps() {
        let ras: Affine = [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ];
        assert_eq!(axis_codes(&ras), "RAS");
        let lps: Affine = [
            [-1.0, 0.0, 0.0, 0.0],
            [0.0, -1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
        ];
        assert_eq!(axis_codes(&lps), "LPS");
        let swapped: Affine = [
            [0.0, 0.0, 2.0, 0.0],
            [-1.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
        ];
        assert_eq!(axis_codes(&swapped), "PSR");
    }
}
