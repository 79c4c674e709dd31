//! Synthetic non-contrast head CT with exact hemorrhage masks: an ellipsoidal head (scalp,
//! skull with diploe, CSF rim, cortex with sulci, white matter, deep gray nuclei, lateral
//! and third ventricles, interhemispheric fissure, petrous bone at the base), bright
//! distractors that are not blood (pineal and choroid plexus calcifications, streak
//! artefacts near the skull base), and hemorrhages of the five subtypes with their shapes:
//! intraparenchymal blobs with an edema rim, epidural lenses and subdural crescents against
//! the inner skull, intraventricular blood in the dependent (posterior) horns, subarachnoid
//! blood in the sulci of a sector. Acute blood is 50-90 HU before blur and noise.
//!
//! Every number comes from a seeded PRNG ([`crate::rng`]): the volume's parameters from the
//! stream (seed, index), each slice's noise from its own stream, so the output is the same
//! bytes whatever the thread count. Slices are 5 mm; in-plane spacing is 230 mm / size so the
//! ~180 mm head fills the field of view at any size. z = 0 is the most inferior slice.
//! Knows nothing about the network.

use super::csv;
use super::error::{DataError, Result};
use crate::io::{self, Mask, Volume};
use crate::rng::{derive_seed, Rng};
use ndarray::{Array3, Axis};
use rayon::prelude::*;
use std::f64::consts::{PI, TAU};
use std::path::{Path, PathBuf};

/// Slice thickness of every phantom (mm).
pub const SLICE_MM: f64 = 5.0;
/// In-plane field of view (mm): spacing is `FOV_MM / size`.
pub const FOV_MM: f64 = 230.0;
/// Fraction of volumes with no hemorrhage.
pub const NEGATIVE_FRACTION: f64 = 0.4;

/// Size and realism switches of a phantom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynthConfig {
    /// In-plane size (square), pixels.
    pub size: usize,
    /// Number of 5 mm slices.
    pub slices: usize,
    /// Skip streak artefacts, blur and noise, and do not round: every voxel is exactly its
    /// tissue's value (for tests of the HU model).
    pub clean: bool,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            size: 256,
            slices: 24,
            clean: false,
        }
    }
}

impl SynthConfig {
    /// In-plane spacing in mm, rounded to f32 so that it survives the NIfTI header (pixdim
    /// is f32) exactly.
    pub fn pixel_mm(&self) -> f64 {
        (FOV_MM / self.size.max(1) as f64) as f32 as f64
    }
    /// `[z, y, x]` spacing in mm.
    pub fn spacing(&self) -> [f64; 3] {
        [SLICE_MM, self.pixel_mm(), self.pixel_mm()]
    }
    fn check(&self) -> Result<()> {
        if !(16..=2048).contains(&self.size) {
            return Err(DataError::Invalid(format!(
                "phantom size {} is not in 16..=2048",
                self.size
            )));
        }
        if !(1..=1024).contains(&self.slices) {
            return Err(DataError::Invalid(format!(
                "phantom slice count {} is not in 1..=1024",
                self.slices
            )));
        }
        Ok(())
    }
}

/// Hemorrhage subtypes, in the column order of ct-ich's `slice_labels.csv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subtype {
    Intraventricular = 0,
    Intraparenchymal = 1,
    Subarachnoid = 2,
    Epidural = 3,
    Subdural = 4,
}

impl Subtype {
    pub const ALL: [Subtype; 5] = [
        Subtype::Intraventricular,
        Subtype::Intraparenchymal,
        Subtype::Subarachnoid,
        Subtype::Epidural,
        Subtype::Subdural,
    ];
    /// The abbreviation used in `manifest.csv` (`IPH;EDH`).
    pub fn short(self) -> &'static str {
        ["IVH", "IPH", "SAH", "EDH", "SDH"][self as usize]
    }
    /// The `slice_labels.csv` column name.
    pub fn column(self) -> &'static str {
        [
            "intraventricular",
            "intraparenchymal",
            "subarachnoid",
            "epidural",
            "subdural",
        ][self as usize]
    }
}

/// What each voxel of a phantom is (before blur), for tests and inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Tissue {
    Air = 0,
    Scalp = 1,
    /// Outer and inner tables of the skull, and petrous bone.
    Bone = 2,
    Diploe = 3,
    Csf = 4,
    Gray = 5,
    White = 6,
    /// Basal ganglia and thalami.
    DeepGray = 7,
    Calcification = 8,
    Blood = 9,
    Edema = 10,
}

impl Tissue {
    pub const ALL: [Tissue; 11] = [
        Tissue::Air,
        Tissue::Scalp,
        Tissue::Bone,
        Tissue::Diploe,
        Tissue::Csf,
        Tissue::Gray,
        Tissue::White,
        Tissue::DeepGray,
        Tissue::Calcification,
        Tissue::Blood,
        Tissue::Edema,
    ];
    /// The range every clean voxel of this tissue lies in (HU).
    pub fn hu_range(self) -> (f32, f32) {
        match self {
            Tissue::Air => (-1000.0, -1000.0),
            Tissue::Scalp => (40.0, 60.0),
            Tissue::Bone => (700.0, 1500.0),
            Tissue::Diploe => (700.0, 1000.0),
            Tissue::Csf => (0.0, 15.0),
            Tissue::Gray => (37.0, 43.0),
            Tissue::White => (24.0, 31.0),
            Tissue::DeepGray => (32.0, 40.0),
            Tissue::Calcification => (100.0, 400.0),
            Tissue::Blood => (50.0, 90.0),
            Tissue::Edema => (14.0, 24.0),
        }
    }
}

/// One synthetic volume.
#[derive(Clone, Debug)]
pub struct Phantom {
    /// HU `[z, y, x]`; integers unless the config is `clean`.
    pub hu: Array3<f32>,
    /// Hemorrhage mask `[z, y, x]`, 0/1: exactly the blood voxels.
    pub mask: Mask,
    /// [`Tissue`] codes `[z, y, x]`.
    pub tissue: Array3<u8>,
    /// `[z, y, x]` spacing, mm.
    pub spacing: [f64; 3],
    /// Per slice, which subtypes have blood on it.
    pub slice_subtypes: Vec<[bool; 5]>,
    /// The subtypes of the lesions placed (empty for a negative volume).
    pub lesions: Vec<Subtype>,
}

impl Phantom {
    /// 0/1 per slice: any blood on it.
    pub fn slice_labels(&self) -> Vec<u8> {
        super::dataset::slice_labels_from_mask(&self.mask)
    }
}

// ---- anatomy ------------------------------------------------------------------------------

/// Vertical semi-axis of the head ellipsoid (mm); the head centre is at h = 0.
const HEAD_CZ: f64 = 72.0;

/// A smooth field in [-1, 1]: three plane waves with random directions, wavelengths 25-70 mm.
#[derive(Clone, Copy, Debug)]
struct Smooth {
    k: [[f64; 3]; 3],
    phase: [f64; 3],
}

impl Smooth {
    fn new(rng: &mut Rng) -> Self {
        let mut k = [[0.0; 3]; 3];
        let mut phase = [0.0; 3];
        for i in 0..3 {
            let (th, ph) = (rng.range(0.0, TAU), rng.range(-1.0, 1.0f64).acos());
            let m = TAU / rng.range(25.0, 70.0);
            k[i] = [
                m * ph.sin() * th.cos(),
                m * ph.sin() * th.sin(),
                m * ph.cos(),
            ];
            phase[i] = rng.range(0.0, TAU);
        }
        Smooth { k, phase }
    }
    #[inline]
    fn at(&self, x: f64, y: f64, h: f64) -> f64 {
        let mut s = 0.0;
        for i in 0..3 {
            s += (self.k[i][0] * x + self.k[i][1] * y + self.k[i][2] * h + self.phase[i]).sin();
        }
        s / 3.0
    }
}

/// Axis-aligned ellipsoid in head coordinates (x lateral, y anterior -> posterior, h up).
#[derive(Clone, Copy, Debug)]
struct Ell {
    c: [f64; 3],
    s: [f64; 3],
}

impl Ell {
    /// Squared normalised distance: < 1 inside.
    #[inline]
    fn q(&self, x: f64, y: f64, h: f64) -> f64 {
        let a = (x - self.c[0]) / self.s[0];
        let b = (y - self.c[1]) / self.s[1];
        let c = (h - self.c[2]) / self.s[2];
        a * a + b * b + c * c
    }
    #[inline]
    fn spans(&self, h: f64) -> bool {
        (h - self.c[2]).abs() < self.s[2]
    }
}

/// The anatomy of one head: sizes, HU bases, structures.
#[derive(Clone, Debug)]
struct Head {
    ax: f64,
    ay: f64,
    off: [f64; 2],
    rot: f64,
    harm: [(f64, f64); 3],
    scalp_t: f64,
    skull_t: f64,
    gyri: f64,
    gyri_phase: f64,
    gyri_wobble: f64,
    sulc_depth: f64,
    cortex_t: f64,
    ventricles: Vec<(Ell, i8)>,
    third_ventricle: Ell,
    deep: Vec<Ell>,
    calcs: Vec<(Ell, f64)>,
    // HU bases
    hu_scalp: f64,
    hu_table: f64,
    hu_diploe: f64,
    hu_csf: f64,
    hu_gray: f64,
    hu_white: f64,
    hu_deep: f64,
    hu_edema: f64,
    hu_petrous: f64,
    texture: Smooth,
    noise_sigma: f64,
    streak: (f64, f64, f64),
}

impl Head {
    fn new(rng: &mut Rng) -> Self {
        let vs = rng.range(0.8, 1.35); // ventricle size (atrophy)
        let mut ventricles = Vec::new();
        for side in [-1.0f64, 1.0] {
            let sd = side as i8;
            // Body and frontal horn, then the trigone / occipital horn behind it.
            ventricles.push((
                Ell {
                    c: [side * 8.0, -6.0, 14.0],
                    s: [5.5 * vs, 24.0, 13.0],
                },
                sd,
            ));
            ventricles.push((
                Ell {
                    c: [side * 15.0, 20.0, 6.0],
                    s: [6.0 * vs, 14.0, 11.0],
                },
                sd,
            ));
        }
        let third_ventricle = Ell {
            c: [0.0, 4.0, -3.0],
            s: [1.6 * vs, 11.0, 9.0],
        };
        let mut deep = Vec::new();
        for side in [-1.0f64, 1.0] {
            deep.push(Ell {
                c: [side * 21.0, -4.0, 2.0],
                s: [7.0, 14.0, 11.0],
            }); // lentiform
            deep.push(Ell {
                c: [side * 9.5, 9.0, -1.0],
                s: [7.5, 10.0, 9.0],
            }); // thalamus
        }
        let mut calcs = Vec::new();
        if rng.chance(0.75) {
            let r = rng.range(2.5, 4.0);
            calcs.push((
                Ell {
                    c: [0.0, 17.0, -4.0],
                    s: [r, r, r],
                },
                rng.range(150.0, 380.0),
            ));
        }
        if rng.chance(0.65) {
            for side in [-1.0f64, 1.0] {
                let r = rng.range(2.2, 3.5);
                calcs.push((
                    Ell {
                        c: [side * 15.0, 20.0, 6.0],
                        s: [r, r * 1.3, r],
                    },
                    rng.range(110.0, 300.0),
                ));
            }
        }
        Head {
            ax: rng.range(84.0, 91.0),
            ay: rng.range(94.0, 101.0),
            off: [rng.range(-5.0, 5.0), rng.range(-5.0, 5.0)],
            rot: rng.range(-8.0, 8.0).to_radians(),
            harm: [
                (rng.range(0.0, 0.02), rng.range(0.0, TAU)),
                (rng.range(0.0, 0.015), rng.range(0.0, TAU)),
                (rng.range(0.0, 0.01), rng.range(0.0, TAU)),
            ],
            scalp_t: rng.range(4.0, 6.0),
            skull_t: rng.range(6.0, 7.5),
            gyri: rng.range(28.0, 36.0).round(),
            gyri_phase: rng.range(0.0, TAU),
            gyri_wobble: rng.range(0.0, TAU),
            sulc_depth: rng.range(12.0, 17.0),
            cortex_t: rng.range(2.5, 3.5),
            ventricles,
            third_ventricle,
            deep,
            calcs,
            hu_scalp: rng.range(46.0, 54.0),
            hu_table: rng.range(1150.0, 1350.0),
            hu_diploe: rng.range(780.0, 900.0),
            hu_csf: rng.range(4.0, 10.0),
            hu_gray: rng.range(39.0, 41.0),
            hu_white: rng.range(26.5, 28.5),
            hu_deep: rng.range(34.5, 37.0),
            hu_edema: rng.range(18.0, 21.0),
            hu_petrous: rng.range(1000.0, 1400.0),
            texture: Smooth::new(rng),
            noise_sigma: rng.range(4.0, 10.0),
            streak: (
                rng.range(25.0, 55.0),
                rng.range(10.0, 18.0).round(),
                rng.range(0.0, TAU),
            ),
        }
    }

    /// Cross-section scale of the head at height h (0 above the vertex).
    fn scale_at(&self, h: f64) -> f64 {
        (1.0 - (h / HEAD_CZ).powi(2)).max(0.0).sqrt()
    }

    fn skull_at(&self, h: f64) -> f64 {
        self.skull_t + 1.5 * (-h / 50.0).max(0.0)
    }

    /// Distance (mm) from the outer scalp surface inward along the ray from the centre,
    /// and the ray's polar angle; negative outside the head.
    #[inline]
    fn depth(&self, x: f64, y: f64, f: f64) -> (f64, f64, f64) {
        let th = y.atan2(x);
        let b = 1.0
            + self.harm[0].0 * (2.0 * th + self.harm[0].1).cos()
            + self.harm[1].0 * (3.0 * th + self.harm[1].1).cos()
            + self.harm[2].0 * (5.0 * th + self.harm[2].1).cos();
        let rho = (x * x + y * y).sqrt();
        let r = ((x / (self.ax * f)).powi(2) + (y / (self.ay * f)).powi(2)).sqrt() / b;
        let d = if r > 1e-9 { rho * (1.0 / r - 1.0) } else { 1e9 };
        (d, th, rho)
    }

    /// Distance from the inner skull surface at angle `th` to the centre: how far inward
    /// a lesion may be placed.
    fn inner_radius(&self, th: f64, h: f64) -> f64 {
        let f = self.scale_at(h);
        let (c, s) = (th.cos(), th.sin());
        let b = 1.0
            + self.harm[0].0 * (2.0 * th + self.harm[0].1).cos()
            + self.harm[1].0 * (3.0 * th + self.harm[1].1).cos()
            + self.harm[2].0 * (5.0 * th + self.harm[2].1).cos();
        let outer = b / ((c / (self.ax * f)).powi(2) + (s / (self.ay * f)).powi(2)).sqrt();
        outer - self.scalp_t - self.skull_at(h)
    }
}

/// What a voxel's anatomy says, for the lesions to look at.
struct Vox {
    x: f64,
    y: f64,
    h: f64,
    th: f64,
    rho: f64,
    /// Depth below the inner skull surface (mm).
    din: f64,
    /// Gyral phase in [0, 1]: 1 at a sulcus.
    g: f64,
    ventricle_side: Option<i8>,
}

// ---- lesions ------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Lesion {
    Iph {
        ell: Ell,
        harm: [(f64, f64); 3],
        edema_mm: f64,
    },
    Edh {
        th: f64,
        h: f64,
        half_len: f64,
        half_h: f64,
        tmax: f64,
    },
    Sdh {
        th: f64,
        h: f64,
        half_ang: f64,
        half_h: f64,
        tmax: f64,
    },
    Ivh {
        y_level: f64,
        sides: [bool; 2],
    },
    Sah {
        th: f64,
        half_ang: f64,
        h: f64,
        half_h: f64,
    },
}

#[derive(Clone, Debug)]
struct Bleed {
    lesion: Lesion,
    subtype: Subtype,
    hu: f64,
    texture: Smooth,
}

fn ang_dist(a: f64, b: f64) -> f64 {
    let d = (a - b).rem_euclid(TAU);
    d.min(TAU - d)
}

impl Lesion {
    /// Vertical extent `(lo, hi)` in h, to skip slices quickly.
    fn h_range(&self, head: &Head) -> (f64, f64) {
        match self {
            Lesion::Iph { ell, edema_mm, .. } => (
                ell.c[2] - 1.4 * ell.s[2] - edema_mm,
                ell.c[2] + 1.4 * ell.s[2] + edema_mm,
            ),
            Lesion::Edh { h, half_h, .. }
            | Lesion::Sdh { h, half_h, .. }
            | Lesion::Sah { h, half_h, .. } => (h - half_h, h + half_h),
            Lesion::Ivh { .. } => {
                let lo = head
                    .ventricles
                    .iter()
                    .map(|(e, _)| e.c[2] - e.s[2])
                    .fold(f64::MAX, f64::min);
                let hi = head
                    .ventricles
                    .iter()
                    .map(|(e, _)| e.c[2] + e.s[2])
                    .fold(f64::MIN, f64::max);
                (lo, hi)
            }
        }
    }

    /// 2 = blood, 1 = edema (IPH rim), 0 = neither.
    #[inline]
    fn test(&self, v: &Vox, head: &Head) -> u8 {
        match self {
            Lesion::Iph {
                ell,
                harm,
                edema_mm,
            } => {
                let a = (v.x - ell.c[0]) / ell.s[0];
                let b = (v.y - ell.c[1]) / ell.s[1];
                let c = (v.h - ell.c[2]) / ell.s[2];
                let q = (a * a + b * b + c * c).sqrt();
                if q > 1.6 {
                    return 0;
                }
                let az = b.atan2(a);
                let el = if q > 1e-9 { c / q } else { 0.0 };
                let p = 1.0
                    + harm[0].0 * (3.0 * az + harm[0].1).sin()
                    + harm[1].0 * (5.0 * az + harm[1].1).sin()
                    + harm[2].0 * (2.0 * PI * el + harm[2].1).sin();
                if q < p {
                    2
                } else if q < p + edema_mm / ell.s[0].min(ell.s[1]) {
                    1
                } else {
                    0
                }
            }
            Lesion::Edh {
                th,
                h,
                half_len,
                half_h,
                tmax,
            } => {
                let s = ang_dist(v.th, *th) * v.rho;
                let t = tmax * (1.0 - (s / half_len).powi(2) - ((v.h - h) / half_h).powi(2));
                u8::from(v.din < t) * 2
            }
            Lesion::Sdh {
                th,
                h,
                half_ang,
                half_h,
                tmax,
            } => {
                let u = 1.0 - (ang_dist(v.th, *th) / half_ang).powi(2);
                let w = 1.0 - ((v.h - h) / half_h).powi(2);
                if u <= 0.0 || w <= 0.0 {
                    return 0;
                }
                let t = tmax * u.powf(0.35) * w.powf(0.35);
                u8::from(v.din < t) * 2
            }
            Lesion::Ivh { y_level, sides } => match v.ventricle_side {
                Some(sd) if sides[usize::from(sd > 0)] && v.y > *y_level => 2,
                _ => 0,
            },
            Lesion::Sah {
                th,
                half_ang,
                h,
                half_h,
            } => {
                if ang_dist(v.th, *th) > *half_ang || (v.h - h).abs() > *half_h {
                    return 0;
                }
                // Blood fills and widens the sulci of the sector, and the CSF rim.
                let w = 0.14 * (1.0 - v.din / (head.sulc_depth + 3.0));
                u8::from(v.din < 1.3 || (v.din < head.sulc_depth + 3.0 && v.g > 1.0 - w)) * 2
            }
        }
    }
}

/// The scan's h (mm, head frame) of slice k: 5 mm slices from near the skull base
/// (24 slices span h = -50..70); shorter scans keep the same proportions around the
/// ventricles.
fn slice_h(k: usize, slices: usize) -> f64 {
    let z_total = slices as f64 * SLICE_MM;
    let start = -z_total * 50.0 / 120.0;
    start + (k as f64 + 0.5) * SLICE_MM
}

fn choose_subtype(rng: &mut Rng) -> Subtype {
    let u = rng.f64();
    match u {
        u if u < 0.34 => Subtype::Intraparenchymal,
        u if u < 0.56 => Subtype::Subdural,
        u if u < 0.72 => Subtype::Epidural,
        u if u < 0.86 => Subtype::Intraventricular,
        _ => Subtype::Subarachnoid,
    }
}

/// A lesion of `subtype` placed inside the scan's coverage `[lo, hi]` (h, mm).
fn make_lesion(rng: &mut Rng, head: &Head, subtype: Subtype, lo: f64, hi: f64) -> Bleed {
    let pick_h = |rng: &mut Rng, a: f64, b: f64| {
        let (a, b) = (a.max(lo + 2.0), b.min(hi - 2.0));
        if a < b {
            rng.range(a, b)
        } else {
            0.5 * (lo + hi)
        }
    };
    let lesion = match subtype {
        Subtype::Intraparenchymal => {
            let h = pick_h(rng, -30.0, 40.0);
            let th = rng.range(0.0, TAU);
            let rin = head.inner_radius(th, h).max(10.0);
            let q = rng.range(0.25, 0.6);
            let s = [
                rng.range(8.0, 22.0),
                rng.range(8.0, 22.0),
                rng.range(7.0, 16.0),
            ];
            let ell = Ell {
                c: [q * rin * th.cos(), q * rin * th.sin(), h],
                s,
            };
            let harm = [
                (rng.range(0.04, 0.14), rng.range(0.0, TAU)),
                (rng.range(0.02, 0.08), rng.range(0.0, TAU)),
                (rng.range(0.02, 0.1), rng.range(0.0, TAU)),
            ];
            Lesion::Iph {
                ell,
                harm,
                edema_mm: rng.range(1.5, 4.0),
            }
        }
        Subtype::Epidural => Lesion::Edh {
            th: rng.range(0.0, TAU),
            h: pick_h(rng, -15.0, 45.0),
            half_len: rng.range(28.0, 45.0),
            half_h: rng.range(14.0, 24.0),
            tmax: rng.range(10.0, 20.0),
        },
        Subtype::Subdural => Lesion::Sdh {
            th: rng.range(0.0, TAU),
            h: pick_h(rng, -10.0, 35.0),
            half_ang: rng.range(45.0, 80.0).to_radians(),
            half_h: rng.range(25.0, 45.0),
            tmax: rng.range(8.0, 15.0),
        },
        Subtype::Intraventricular => {
            let both = rng.chance(0.5);
            let left = rng.chance(0.5);
            Lesion::Ivh {
                y_level: rng.range(8.0, 20.0),
                sides: [both || left, both || !left],
            }
        }
        Subtype::Subarachnoid => Lesion::Sah {
            th: rng.range(0.0, TAU),
            half_ang: rng.range(35.0, 70.0).to_radians(),
            h: pick_h(rng, -10.0, 45.0),
            half_h: rng.range(15.0, 28.0),
        },
    };
    Bleed {
        lesion,
        subtype,
        hu: rng.range(58.0, 82.0),
        texture: Smooth::new(rng),
    }
}

/// Which volumes of a set of `n` have hemorrhage: round(60%) of them, chosen by the seed
/// (at least one of each kind when `n >= 2`).
pub fn plan_positive(n: usize, seed: u64) -> Vec<bool> {
    let mut n_neg = (NEGATIVE_FRACTION * n as f64).round() as usize;
    if n >= 2 {
        n_neg = n_neg.clamp(1, n - 1);
    }
    let mut v: Vec<bool> = (0..n).map(|i| i >= n_neg).collect();
    Rng::derived(seed, 0xB1EED).shuffle(&mut v);
    v
}

// ---- rendering ----------------------------------------------------------------------------

/// Renders one slice into `hu`, `mask`, `tissue` (each `size * size`); returns the subtypes
/// present on it.
#[allow(clippy::too_many_arguments)]
fn render_slice(
    head: &Head,
    bleeds: &[Bleed],
    h: f64,
    cfg: &SynthConfig,
    hu: &mut [f32],
    mask: &mut [u8],
    tissue: &mut [u8],
) -> [bool; 5] {
    let n = cfg.size;
    let sp = cfg.pixel_mm();
    let f = head.scale_at(h);
    let mut flags = [false; 5];
    hu.fill(-1000.0);
    mask.fill(0);
    tissue.fill(Tissue::Air as u8);
    if f < 0.12 {
        return flags;
    }
    let active: Vec<&Bleed> = bleeds
        .iter()
        .filter(|b| {
            let (lo, hi) = b.lesion.h_range(head);
            h >= lo && h <= hi
        })
        .collect();
    let vents: Vec<&(Ell, i8)> = head.ventricles.iter().filter(|(e, _)| e.spans(h)).collect();
    let deep: Vec<&Ell> = head.deep.iter().filter(|e| e.spans(h)).collect();
    let calcs: Vec<&(Ell, f64)> = head.calcs.iter().filter(|(e, _)| e.spans(h)).collect();
    let third = head
        .third_ventricle
        .spans(h)
        .then_some(&head.third_ventricle);
    let skull = head.skull_at(h);
    let petrous = h < -33.0;
    let (cr, sr) = (head.rot.cos(), head.rot.sin());
    for iy in 0..n {
        let ys = (iy as f64 + 0.5 - n as f64 / 2.0) * sp - head.off[1];
        for ix in 0..n {
            let xs = (ix as f64 + 0.5 - n as f64 / 2.0) * sp - head.off[0];
            let x = cr * xs + sr * ys;
            let y = -sr * xs + cr * ys;
            let (d, th, rho) = head.depth(x, y, f);
            if d <= 0.0 {
                continue;
            }
            let i = iy * n + ix;
            let tex = head.texture.at(x, y, h);
            let (t, v) = if d < head.scalp_t {
                (Tissue::Scalp, head.hu_scalp + 3.0 * tex)
            } else if d < head.scalp_t + skull {
                let u = (d - head.scalp_t) / skull;
                if (0.3..0.7).contains(&u) {
                    (Tissue::Diploe, head.hu_diploe + 50.0 * tex)
                } else {
                    (Tissue::Bone, head.hu_table + 100.0 * tex)
                }
            } else {
                let din = d - head.scalp_t - skull;
                // Only the cortex and sulci need the gyral phase; deeper it is not evaluated (speed).
                let g = if din < head.sulc_depth + 3.0 {
                    gyral_phase(head, th, din, h)
                } else {
                    0.0
                };
                let ventricle_side = vents
                    .iter()
                    .find(|(e, _)| e.q(x, y, h) < 1.0)
                    .map(|(_, s)| *s);
                let vox = Vox {
                    x,
                    y,
                    h,
                    th,
                    rho,
                    din,
                    g,
                    ventricle_side,
                };
                let in_petrous = petrous && {
                    let side = if x < 0.0 { -1.0 } else { 1.0 };
                    let (px, py) = (x - side * 30.0, y - 6.0);
                    let a = side * 0.6;
                    let (u, w) = (a.cos() * px + a.sin() * py, -a.sin() * px + a.cos() * py);
                    (u / 18.0).powi(2) + (w / 6.5).powi(2) < 1.0
                };
                if in_petrous {
                    (Tissue::Bone, head.hu_petrous)
                } else {
                    let mut tv = anatomy(head, &vox, &deep, &calcs, third, tex);
                    let mut edema = false;
                    for b in &active {
                        match b.lesion.test(&vox, head) {
                            2 => {
                                tv = (Tissue::Blood, b.hu + 4.0 * b.texture.at(x, y, h));
                                mask[i] = 1;
                                flags[b.subtype as usize] = true;
                                break;
                            }
                            1 => edema = true,
                            _ => {}
                        }
                    }
                    if edema && matches!(tv.0, Tissue::Gray | Tissue::White | Tissue::DeepGray) {
                        tv = (Tissue::Edema, head.hu_edema + tex);
                    }
                    tv
                }
            };
            hu[i] = v as f32;
            tissue[i] = t as u8;
        }
    }
    flags
}

/// Gyral phase in [0, 1], 1 at a sulcus: a periodic pattern around the head whose phase
/// wobbles with the angle, bends with depth and drifts with height, so sulci are curved
/// and differ from slice to slice.
#[inline]
fn gyral_phase(head: &Head, th: f64, din: f64, h: f64) -> f64 {
    let p = head.gyri * th
        + head.gyri_phase
        + 1.1 * (3.0 * th + head.gyri_wobble).sin()
        + 0.7 * (7.0 * th + 2.0 * head.gyri_wobble).sin()
        + 0.12 * din * (5.0 * th + head.gyri_wobble).sin()
        + 0.09 * h;
    0.5 + 0.5 * p.cos()
}

/// Intracranial anatomy without lesions.
fn anatomy(
    head: &Head,
    v: &Vox,
    deep: &[&Ell],
    calcs: &[&(Ell, f64)],
    third: Option<&Ell>,
    tex: f64,
) -> (Tissue, f64) {
    if let Some((_, hu)) = calcs.iter().find(|(e, _)| e.q(v.x, v.y, v.h) < 1.0) {
        return (Tissue::Calcification, *hu);
    }
    let csf = (Tissue::Csf, head.hu_csf + 2.0 * tex);
    if v.ventricle_side.is_some() || third.is_some_and(|e| e.q(v.x, v.y, v.h) < 1.0) {
        return csf;
    }
    if v.din < 1.2 {
        return csf;
    }
    let w = 0.07 * (1.0 - v.din / head.sulc_depth);
    if v.din < head.sulc_depth && v.g > 1.0 - w {
        return csf;
    }
    // Interhemispheric fissure, in front of and behind the deep structures and above them.
    if v.x.abs() < 1.2 && (v.y.abs() > 32.0 || v.h > 30.0) {
        return csf;
    }
    if v.din < 1.2 + head.cortex_t + 5.0 * v.g.powi(3) {
        return (Tissue::Gray, head.hu_gray + tex);
    }
    if deep.iter().any(|e| e.q(v.x, v.y, v.h) < 1.0) {
        return (Tissue::DeepGray, head.hu_deep + tex);
    }
    (Tissue::White, head.hu_white + tex)
}

/// Streaks radiating from the petrous bone on the lowest slices, fading upward.
fn add_streaks(head: &Head, h: f64, cfg: &SynthConfig, hu: &mut [f32], tissue: &[u8]) {
    let fade = ((-25.0 - h) / 20.0).clamp(0.0, 1.0);
    if fade <= 0.0 {
        return;
    }
    let (amp, m, ph) = head.streak;
    let n = cfg.size;
    let sp = cfg.pixel_mm();
    for iy in 0..n {
        let y = (iy as f64 + 0.5 - n as f64 / 2.0) * sp - head.off[1];
        for ix in 0..n {
            let i = iy * n + ix;
            if tissue[i] == Tissue::Air as u8 {
                continue;
            }
            let x = (ix as f64 + 0.5 - n as f64 / 2.0) * sp - head.off[0];
            let mut s = 0.0;
            for side in [-1.0, 1.0] {
                let (dx, dy) = (x - side * 30.0, y - 6.0);
                let r = (dx * dx + dy * dy).sqrt();
                let a = dy.atan2(dx);
                s += (m * a + ph + side).cos().powi(9) * (-r / 45.0).exp();
            }
            hu[i] += (amp * fade * s) as f32;
        }
    }
}

/// In-place 3x3 binomial blur ([1 2 1]/4 each way) of one slice.
fn blur_slice(hu: &mut [f32], n: usize) {
    let src = hu.to_vec();
    let mut tmp = vec![0.0f32; n * n];
    for y in 0..n {
        for x in 0..n {
            let l = src[y * n + x.saturating_sub(1)];
            let r = src[y * n + (x + 1).min(n - 1)];
            tmp[y * n + x] = 0.25 * l + 0.5 * src[y * n + x] + 0.25 * r;
        }
    }
    for y in 0..n {
        for x in 0..n {
            let u = tmp[y.saturating_sub(1) * n + x];
            let d = tmp[(y + 1).min(n - 1) * n + x];
            hu[y * n + x] = 0.25 * u + 0.5 * tmp[y * n + x] + 0.25 * d;
        }
    }
}

/// Volume `index` of the set made with `seed`; `positive` decides whether it bleeds.
pub fn phantom(cfg: &SynthConfig, seed: u64, index: usize, positive: bool) -> Result<Phantom> {
    cfg.check()?;
    let vseed = derive_seed(seed, index as u64);
    let mut rng = Rng::new(vseed);
    let head = Head::new(&mut rng);
    let (lo, hi) = (
        slice_h(0, cfg.slices) - 0.5 * SLICE_MM,
        slice_h(cfg.slices - 1, cfg.slices) + 0.5 * SLICE_MM,
    );
    let mut bleeds = Vec::new();
    if positive {
        let count = 1 + usize::from(rng.chance(0.35)) + usize::from(rng.chance(0.1));
        for _ in 0..count {
            let st = choose_subtype(&mut rng);
            bleeds.push(make_lesion(&mut rng, &head, st, lo, hi));
        }
    }
    let mut ph = render(cfg, &head, &bleeds, vseed)?;
    // A lesion can miss the coverage or the ventricles; a positive volume must bleed, so add
    // an intraparenchymal one on the middle slice until it does.
    let mut tries = 0;
    while positive && ph.mask.iter().all(|&m| m == 0) && tries < 4 {
        let mid = slice_h(cfg.slices / 2, cfg.slices);
        bleeds.push(make_lesion(
            &mut rng,
            &head,
            Subtype::Intraparenchymal,
            mid - 2.0,
            mid + 2.0,
        ));
        ph = render(cfg, &head, &bleeds, vseed)?;
        tries += 1;
    }
    let mut kinds: Vec<Subtype> = Vec::new();
    for s in Subtype::ALL {
        if ph.slice_subtypes.iter().any(|f| f[s as usize]) {
            kinds.push(s);
        }
    }
    ph.lesions = kinds;
    Ok(ph)
}

fn render(cfg: &SynthConfig, head: &Head, bleeds: &[Bleed], vseed: u64) -> Result<Phantom> {
    let (d, n) = (cfg.slices, cfg.size);
    let plane = n * n;
    let mut hu = vec![0.0f32; d * plane];
    let mut mask = vec![0u8; d * plane];
    let mut tissue = vec![0u8; d * plane];
    let flags: Vec<[bool; 5]> = hu
        .par_chunks_mut(plane)
        .zip(mask.par_chunks_mut(plane))
        .zip(tissue.par_chunks_mut(plane))
        .enumerate()
        .map(|(z, ((hu, mask), tissue))| {
            let h = slice_h(z, d);
            let flags = render_slice(head, bleeds, h, cfg, hu, mask, tissue);
            if !cfg.clean {
                add_streaks(head, h, cfg, hu, tissue);
                blur_slice(hu, n);
                let mut rng = Rng::derived(vseed, 1 + z as u64);
                for v in hu.iter_mut() {
                    let noisy = *v as f64 + head.noise_sigma * rng.normal_fresh();
                    *v = noisy.round().clamp(-1024.0, 3071.0) as f32;
                }
            }
            flags
        })
        .collect();
    let shape = (d, n, n);
    let bad = |_| DataError::Invalid("phantom buffer size mismatch".into());
    Ok(Phantom {
        hu: Array3::from_shape_vec(shape, hu).map_err(bad)?,
        mask: Array3::from_shape_vec(shape, mask).map_err(bad)?,
        tissue: Array3::from_shape_vec(shape, tissue).map_err(bad)?,
        spacing: cfg.spacing(),
        slice_subtypes: flags,
        lesions: Vec::new(),
    })
}

// ---- writing a dataset ----------------------------------------------------------------

/// One written volume.
#[derive(Clone, Debug)]
pub struct SynthRecord {
    pub id: String,
    pub image: PathBuf,
    pub label: PathBuf,
    pub n_slices: usize,
    pub positive_slices: usize,
    pub mask_voxels: usize,
    pub subtypes: Vec<Subtype>,
}

/// Column names of `slice_labels.csv` (the same as ct-ich-dev's).
pub const SLICE_LABEL_COLUMNS: [&str; 12] = [
    "patient",
    "slice",
    "z",
    "png_index",
    "any_hemorrhage",
    "intraventricular",
    "intraparenchymal",
    "subarachnoid",
    "epidural",
    "subdural",
    "fracture",
    "mask_voxels",
];

/// Column names of `manifest.csv` (the same as ct-ich-dev's).
pub const MANIFEST_COLUMNS: [&str; 9] = [
    "patient",
    "n_slices",
    "n_positive_slices",
    "n_mask_slices",
    "mask_voxels",
    "subtypes",
    "n_fracture_slices",
    "image",
    "label",
];

/// The id of volume `i` of `n`: 1-based, zero-padded to at least 3 digits (`001`).
pub fn volume_id(i: usize, n: usize) -> String {
    let width = n.to_string().len().max(3);
    format!("{:0width$}", i + 1)
}

/// Writes `n` phantoms to `out` in the ct-ich-dev layout: `images/NNN.nii.gz` (int16 HU),
/// `labels/NNN.nii.gz` (u8 mask), `slice_labels.csv`, `manifest.csv`. Refuses a folder
/// whose `images/` holds volumes this set would not overwrite (a different dataset).
pub fn write_dataset(
    out: &Path,
    n: usize,
    seed: u64,
    cfg: &SynthConfig,
) -> Result<Vec<SynthRecord>> {
    cfg.check()?;
    if n == 0 {
        return Err(DataError::Invalid("asked for 0 volumes".into()));
    }
    let ids: Vec<String> = (0..n).map(|i| volume_id(i, n)).collect();
    let img_dir = out.join("images");
    if img_dir.is_dir() {
        let existing = super::dataset::list_volumes(&img_dir, false)?;
        if let Some((stem, p)) = existing.iter().find(|(s, _)| !ids.contains(s)) {
            return Err(DataError::Invalid(format!(
                "{}: already holds {} (volume {stem}), which this set of {n} would not replace; \
                 choose an empty folder",
                out.display(),
                p.display()
            )));
        }
    }
    let positive = plan_positive(n, seed);
    let records: Vec<(SynthRecord, Vec<Vec<String>>)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let ph = phantom(cfg, seed, i, positive[i])?;
            let id = &ids[i];
            let image = img_dir.join(format!("{id}.nii.gz"));
            let label = out.join("labels").join(format!("{id}.nii.gz"));
            let vol = Volume::from_array(ph.hu.clone(), ph.spacing, image.clone());
            io::write_volume(&image, &vol)?;
            io::write_mask(&label, &ph.mask, &vol)?;
            let mut rows = Vec::new();
            let mut pos = 0;
            let mut voxels = 0;
            for (z, s) in ph.mask.axis_iter(Axis(0)).enumerate() {
                let nv = s.iter().filter(|&&m| m > 0).count();
                voxels += nv;
                pos += usize::from(nv > 0);
                let f = ph.slice_subtypes[z];
                let mut r = vec![
                    id.clone(),
                    (z + 1).to_string(),
                    z.to_string(),
                    z.to_string(),
                    u8::from(nv > 0).to_string(),
                ];
                r.extend(f.iter().map(|&b| u8::from(b).to_string()));
                r.push("0".into());
                r.push(nv.to_string());
                rows.push(r);
            }
            let rec = SynthRecord {
                id: id.clone(),
                image,
                label,
                n_slices: cfg.slices,
                positive_slices: pos,
                mask_voxels: voxels,
                subtypes: ph.lesions.clone(),
            };
            Ok((rec, rows))
        })
        .collect::<Result<_>>()?;
    let slice_rows: Vec<Vec<String>> = records
        .iter()
        .flat_map(|(_, r)| r.iter().cloned())
        .collect();
    csv::write_table(
        &out.join("slice_labels.csv"),
        &SLICE_LABEL_COLUMNS,
        &slice_rows,
    )?;
    let manifest: Vec<Vec<String>> = records
        .iter()
        .map(|(r, _)| {
            vec![
                r.id.clone(),
                r.n_slices.to_string(),
                r.positive_slices.to_string(),
                r.positive_slices.to_string(),
                r.mask_voxels.to_string(),
                r.subtypes
                    .iter()
                    .map(|s| s.short())
                    .collect::<Vec<_>>()
                    .join(";"),
                "0".into(),
                format!("images/{}.nii.gz", r.id),
                format!("labels/{}.nii.gz", r.id),
            ]
        })
        .collect();
    csv::write_table(&out.join("manifest.csv"), &MANIFEST_COLUMNS, &manifest)?;
    Ok(records.into_iter().map(|(r, _)| r).collect())
}
