//! Datasets on disk: which volumes, which masks, which slice labels. Three layouts are
//! recognised: INSTANCE 2022 (`data/` + optional `label/`), ct-ich (`images/` + optional
//! `labels/` + optional `slice_labels.csv`), and a plain folder of volumes with an optional
//! image-level label CSV. Slice labels come from the CSV when it has rows for a case, else
//! from the mask (a slice is positive if any voxel is). A folder without any mask is valid:
//! weak supervision needs only the CSV. Knows nothing about the network.

use super::csv;
use super::error::{DataError, Result};
use crate::io::{self, Mask, Volume};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// How the folder is organised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// MICCAI 2022 INSTANCE: `data/NNN.nii.gz`, `label/NNN.nii.gz`.
    Instance,
    /// PhysioNet ct-ich as prepared here: `images/`, `labels/`, `slice_labels.csv`.
    CtIch,
    /// Volumes directly in the folder, labels (if any) in a CSV next to them.
    Folder,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Instance => "INSTANCE (data/ + label/)",
            Layout::CtIch => "ct-ich (images/ + labels/ + slice_labels.csv)",
            Layout::Folder => "folder of volumes (+ label CSV)",
        })
    }
}

/// One volume of a dataset, not yet read.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// The file stem (`049` for `049.nii.gz` or the pair `049.hdr`/`049.img`), unique within
    /// the dataset.
    pub id: String,
    /// The patient the volume belongs to: the unit of train/validation splits. Every layout
    /// here has one volume per patient, so it equals `id`.
    pub patient: String,
    /// The image: a `.nii`/`.nii.gz` file, a pair's `.hdr` (its voxels in the `.img` beside
    /// it), a DICOM series folder or a multi-frame DICOM file.
    pub image: PathBuf,
    /// The voxel mask, when the layout has one for this case.
    pub mask: Option<PathBuf>,
    /// Slice labels from the CSV, indexed by z (0-based), 0/1. Slices the CSV does not list
    /// are 0; the vector may be shorter than the volume and is padded when loaded.
    pub slice_labels: Option<Vec<u8>>,
}

impl Case {
    /// Whether the case has any source of slice labels (CSV rows or a mask).
    pub fn has_labels(&self) -> bool {
        self.slice_labels.is_some() || self.mask.is_some()
    }
}

/// The cases of a dataset folder.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    pub layout: Layout,
    /// The label CSV used, if any.
    pub label_csv: Option<PathBuf>,
    /// Sorted by id.
    pub cases: Vec<Case>,
}

/// A case read into memory.
#[derive(Clone, Debug)]
pub struct LoadedCase {
    pub id: String,
    pub volume: Volume,
    pub mask: Option<Mask>,
    /// One 0/1 label per slice (length = the volume's depth). Empty only when the case has
    /// no labels at all and they were not required.
    pub slice_labels: Vec<u8>,
}

fn is_dicom_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_ascii_lowercase();
                n.ends_with(".dcm")
            })
        })
        .unwrap_or(false)
}

/// `(stem, path)` of the volumes in `dir`, sorted by stem: `.nii`/`.nii.gz` files and, with
/// `dicom_dirs`, DICOM volumes: subfolders holding `.dcm` files (a series, or a multi-frame
/// image alone in its folder; named by the folder) and loose multi-frame files (`NAME.dcm`,
/// any case, or `NAME` without an extension, whose header says more than one frame; named
/// `NAME`), told from their headers by [`io::dicom::probe_image`] without reading pixels.
///
/// Errors: two volumes with one stem (`a.nii` and `a.nii.gz`, `a.dcm` and a series folder
/// `a/`), as which one is meant is not guessed; loose single-frame DICOM slices beside
/// volumes (a series goes in a subfolder of its own); a loose file with the `DICM` code
/// whose header is corrupt or refused (the reader's error, naming the file). A folder
/// holding loose single-frame slices and no volume lists nothing: it is a series itself
/// (what `segment` then reads), not a folder of volumes.
pub fn list_volumes(dir: &Path, dicom_dirs: bool) -> Result<Vec<(String, PathBuf)>> {
    use crate::io::dicom::{probe_image, FileImage};
    let rd = std::fs::read_dir(dir).map_err(|err| DataError::Folder {
        path: dir.to_path_buf(),
        err,
    })?;
    let mut out = Vec::new();
    // Loose single-frame DICOM slices: not volumes.
    let mut slices = Vec::new();
    for e in rd {
        let e = e.map_err(|err| DataError::Folder {
            path: dir.to_path_buf(),
            err,
        })?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if path.is_file() {
            if let Some(stem) = io::volume_stem(&name) {
                out.push((stem.to_string(), path));
            } else if dicom_dirs {
                // `NAME.dcm` (any case) or `NAME`.
                let stem = match io::strip_suffix_ci(&name, ".dcm") {
                    Some(stem) => stem,
                    None if !name.contains('.') => &name[..],
                    None => continue,
                };
                if stem.is_empty() || stem.starts_with('.') {
                    continue;
                }
                match probe_image(&path)? {
                    FileImage::MultiFrame { .. } => out.push((stem.to_string(), path)),
                    FileImage::Slice => slices.push(name),
                    FileImage::NotDicom | FileImage::NoImage => {}
                }
            }
        } else if dicom_dirs && path.is_dir() && !name.starts_with('.') && is_dicom_dir(&path) {
            out.push((name, path));
        }
    }
    out.sort();
    if !slices.is_empty() && !out.is_empty() {
        slices.sort();
        let shown = slices
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        return Err(DataError::Invalid(format!(
            "{}: {} loose single-frame DICOM slice(s) ({shown}{}) beside {} volume(s): a \
             series goes in a subfolder of its own (one folder per series); a loose DICOM \
             file must be a multi-frame image",
            dir.display(),
            slices.len(),
            if slices.len() > 3 { ", ..." } else { "" },
            out.len()
        )));
    }
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        let file = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        return Err(DataError::Invalid(format!(
            "{}: two volumes are named `{}` ({} and {}): rename or move one",
            dir.display(),
            w[0].0,
            file(&w[0].1),
            file(&w[1].1)
        )));
    }
    Ok(out)
}

/// Finds the entry for `id` in a map keyed by ids, leniently: exact match first, then (when
/// `id` is a number) any key with the same integer value, so `49` matches `049`.
fn lenient_get<'a, V>(
    map: &'a HashMap<String, V>,
    by_int: &HashMap<u64, String>,
    id: &str,
) -> Option<&'a V> {
    map.get(id).or_else(|| {
        id.trim()
            .parse::<u64>()
            .ok()
            .and_then(|n| by_int.get(&n))
            .and_then(|k| map.get(k))
    })
}

fn int_index<V>(map: &HashMap<String, V>) -> HashMap<u64, String> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort(); // deterministic when two keys share a value ("7" and "07")
    let mut out = HashMap::new();
    for k in keys {
        if let Ok(n) = k.trim().parse::<u64>() {
            out.entry(n).or_insert_with(|| k.clone());
        }
    }
    out
}

/// Most slices a label CSV may name per volume (NIfTI-1 holds at most 32767).
pub const MAX_SLICES: usize = 1 << 16;

/// Slice labels per patient from an image-level CSV. The header needs a patient column
/// (`patient`, or `PatientNumber`), a slice column (`z`, 0-based, or `slice`/`SliceNumber`,
/// 1-based) and a label column (`any_hemorrhage` or `label`, 0/1; or `No_Hemorrhage`,
/// inverted). Several rows for one slice are OR-ed.
pub fn read_label_csv(path: &Path) -> Result<HashMap<String, Vec<u8>>> {
    let t = csv::read_table(path)?;
    let pc = t.require(path, &["patient", "PatientNumber"])?;
    let (sc, one_based) = match t.column(&["z"]) {
        Some(c) => (c, false),
        None => (t.require(path, &["z", "slice", "SliceNumber"])?, true),
    };
    let (lc, inverted) = match t.column(&["any_hemorrhage", "label"]) {
        Some(c) => (c, false),
        None => (
            t.require(path, &["any_hemorrhage", "label", "No_Hemorrhage"])?,
            true,
        ),
    };
    let mut rows: HashMap<String, BTreeMap<usize, u8>> = HashMap::new();
    for (line, r) in &t.rows {
        let bad = |reason: String| DataError::CsvRow {
            path: path.to_path_buf(),
            line: *line,
            reason,
        };
        let get = |c: usize, what: &str| {
            r.get(c)
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(format!("no {what} value")))
        };
        let patient = get(pc, "patient")?.to_string();
        let s_txt = get(sc, "slice")?;
        let s: usize = s_txt
            .parse()
            .map_err(|_| bad(format!("slice `{s_txt}` is not a non-negative integer")))?;
        let z = if one_based {
            s.checked_sub(1)
                .ok_or_else(|| bad("slice numbers are 1-based; got 0".into()))?
        } else {
            s
        };
        // The labels become one byte per slice up to the largest: bound it before that.
        if z >= MAX_SLICES {
            return Err(bad(format!(
                "slice `{s_txt}` is beyond the {MAX_SLICES} slices a volume can have"
            )));
        }
        let l_txt = get(lc, "label")?;
        let v: f64 = match l_txt.to_ascii_lowercase().as_str() {
            "true" | "yes" => 1.0,
            "false" | "no" => 0.0,
            t => t
                .parse()
                .map_err(|_| bad(format!("label `{l_txt}` is not 0 or 1")))?,
        };
        if !(v == 0.0 || v == 1.0) {
            return Err(bad(format!("label `{l_txt}` is not 0 or 1")));
        }
        let positive = (v == 1.0) != inverted;
        let e = rows.entry(patient).or_default().entry(z).or_insert(0);
        *e |= positive as u8;
    }
    Ok(rows
        .into_iter()
        .map(|(p, m)| {
            let n = m.keys().next_back().map_or(0, |z| z + 1);
            let mut v = vec![0u8; n];
            for (z, l) in m {
                v[z] = l;
            }
            (p, v)
        })
        .collect())
}

/// The label CSV of a plain folder: `slice_labels.csv`, else `labels.csv`, else the only
/// `.csv` in it. Several unnamed CSVs are ambiguous: none is used.
fn find_folder_csv(dir: &Path) -> Option<PathBuf> {
    for n in ["slice_labels.csv", "labels.csv"] {
        let p = dir.join(n);
        if p.is_file() {
            return Some(p);
        }
    }
    let csvs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    if csvs.len() == 1 {
        csvs.into_iter().next()
    } else {
        None
    }
}

impl Dataset {
    /// Opens a dataset folder, recognising its layout and its label CSV.
    pub fn open(dir: &Path) -> Result<Dataset> {
        Dataset::open_with_csv(dir, None)
    }

    /// Like [`Dataset::open`], with an explicit label CSV (overrides the one the layout
    /// would use).
    pub fn open_with_csv(dir: &Path, csv: Option<&Path>) -> Result<Dataset> {
        if !dir.is_dir() {
            return Err(DataError::Folder {
                path: dir.to_path_buf(),
                err: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
            });
        }
        let (layout, img_dir, mask_dir, default_csv) = if dir.join("data").is_dir() {
            (
                Layout::Instance,
                dir.join("data"),
                Some(dir.join("label")),
                None,
            )
        } else if dir.join("images").is_dir() {
            let c = dir.join("slice_labels.csv");
            (
                Layout::CtIch,
                dir.join("images"),
                Some(dir.join("labels")),
                c.is_file().then_some(c),
            )
        } else {
            (
                Layout::Folder,
                dir.to_path_buf(),
                None,
                find_folder_csv(dir),
            )
        };
        let images = list_volumes(&img_dir, true)?;
        if images.is_empty() {
            let expected = match layout {
                Layout::Instance => "expected data/NNN.nii.gz",
                Layout::CtIch => "expected images/NNN.nii.gz",
                Layout::Folder => {
                    "expected .nii/.nii.gz files, .hdr/.img pairs, multi-frame DICOM files, \
                     DICOM series folders (one per series), or data/ or images/"
                }
            };
            return Err(DataError::Empty {
                path: img_dir,
                expected: expected.into(),
            });
        }
        let masks: HashMap<String, PathBuf> = match &mask_dir {
            Some(m) if m.is_dir() => list_volumes(m, false)?.into_iter().collect(),
            _ => HashMap::new(),
        };
        let mask_ints = int_index(&masks);
        let label_csv = csv.map(Path::to_path_buf).or(default_csv);
        let labels = match &label_csv {
            Some(p) => read_label_csv(p)?,
            None => HashMap::new(),
        };
        let label_ints = int_index(&labels);
        let cases = images
            .into_iter()
            .map(|(id, image)| Case {
                mask: lenient_get(&masks, &mask_ints, &id).cloned(),
                slice_labels: lenient_get(&labels, &label_ints, &id).cloned(),
                patient: id.clone(),
                id,
                image,
            })
            .collect();
        Ok(Dataset {
            root: dir.to_path_buf(),
            layout,
            label_csv,
            cases,
        })
    }

    pub fn len(&self) -> usize {
        self.cases.len()
    }
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// Fails with [`DataError::NoLabels`] on the first case with neither CSV rows nor a
    /// mask: training checks this before reading any volume.
    pub fn require_labels(&self) -> Result<()> {
        match self.cases.iter().find(|c| !c.has_labels()) {
            Some(c) => Err(DataError::NoLabels {
                id: c.id.clone(),
                image: c.image.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Reads case `i` (see [`load_case`]).
    pub fn load(&self, i: usize, require_labels: bool) -> Result<LoadedCase> {
        let c = self.cases.get(i).ok_or_else(|| {
            DataError::Invalid(format!(
                "case index {i} out of range (dataset has {})",
                self.len()
            ))
        })?;
        load_case(c, require_labels)
    }

    /// The case with this id (exact, else by integer value).
    pub fn find(&self, id: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.id == id).or_else(|| {
            let n: u64 = id.trim().parse().ok()?;
            self.cases
                .iter()
                .find(|c| c.id.trim().parse::<u64>().ok() == Some(n))
        })
    }
}

/// 0/1 per slice: whether the mask has any voxel > 0 on it.
pub fn slice_labels_from_mask(mask: &Mask) -> Vec<u8> {
    mask.outer_iter()
        .map(|s| s.iter().any(|&v| v > 0) as u8)
        .collect()
}

/// Reads a case: its volume, its mask (checked to have the image's shape), and one label per
/// slice (CSV rows, else the mask). With `require_labels`, a case with neither is
/// [`DataError::NoLabels`]; CSV rows past the last slice are [`DataError::LabelBeyondVolume`].
pub fn load_case(case: &Case, require_labels: bool) -> Result<LoadedCase> {
    if require_labels && !case.has_labels() {
        return Err(DataError::NoLabels {
            id: case.id.clone(),
            image: case.image.clone(),
        });
    }
    let volume = io::read_volume(&case.image)?;
    let d = volume.dims().0;
    let mask = match &case.mask {
        Some(p) => {
            let mv = io::read_mask(p)?;
            io::check_same_shape(&volume, p, &mv)?;
            Some(io::to_mask(&mv))
        }
        None => None,
    };
    let slice_labels = match (&case.slice_labels, &mask) {
        (Some(l), _) => {
            if l.len() > d {
                let z = l.len() - 1;
                return Err(DataError::LabelBeyondVolume {
                    id: case.id.clone(),
                    image: case.image.clone(),
                    z,
                    depth: d,
                });
            }
            let mut v = l.clone();
            v.resize(d, 0);
            v
        }
        (None, Some(m)) => slice_labels_from_mask(m),
        (None, None) => Vec::new(),
    };
    Ok(LoadedCase {
        id: case.id.clone(),
        volume,
        mask,
        slice_labels,
    })
}

/// What `inspect` prints for a dataset folder.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSummary {
    pub root: PathBuf,
    pub layout: Layout,
    pub label_csv: Option<PathBuf>,
    pub volumes: usize,
    /// Volumes with a mask file.
    pub with_masks: usize,
    /// Volumes with neither CSV rows nor a mask.
    pub unlabelled: usize,
    pub slices: usize,
    /// Positive slices among the labelled volumes.
    pub positive_slices: usize,
    /// Labelled volumes with at least one positive slice.
    pub positive_volumes: usize,
    /// `(z, y, x)` extents: smallest and largest seen.
    pub min_dims: (usize, usize, usize),
    pub max_dims: (usize, usize, usize),
}

impl fmt::Display for DatasetSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset   {}", self.root.display())?;
        writeln!(f, "layout    {}", self.layout)?;
        if let Some(c) = &self.label_csv {
            writeln!(f, "labels    {}", c.display())?;
        }
        writeln!(
            f,
            "volumes   {} ({} with masks, {} unlabelled)",
            self.volumes, self.with_masks, self.unlabelled
        )?;
        writeln!(
            f,
            "slices    {} ({} positive, in {} positive volumes)",
            self.slices, self.positive_slices, self.positive_volumes
        )?;
        write!(
            f,
            "dims z,y,x from {:?} to {:?}",
            self.min_dims, self.max_dims
        )
    }
}

/// Reads every volume of the dataset at `dir` and counts volumes, slices and positive
/// slices.
pub fn summary(dir: &Path) -> Result<DatasetSummary> {
    let ds = Dataset::open(dir)?;
    let mut s = DatasetSummary {
        root: ds.root.clone(),
        layout: ds.layout,
        label_csv: ds.label_csv.clone(),
        volumes: ds.len(),
        with_masks: ds.cases.iter().filter(|c| c.mask.is_some()).count(),
        unlabelled: ds.cases.iter().filter(|c| !c.has_labels()).count(),
        slices: 0,
        positive_slices: 0,
        positive_volumes: 0,
        min_dims: (usize::MAX, usize::MAX, usize::MAX),
        max_dims: (0, 0, 0),
    };
    for c in &ds.cases {
        let lc = load_case(c, false)?;
        let (d, h, w) = lc.volume.dims();
        s.slices += d;
        s.min_dims = (
            s.min_dims.0.min(d),
            s.min_dims.1.min(h),
            s.min_dims.2.min(w),
        );
        s.max_dims = (
            s.max_dims.0.max(d),
            s.max_dims.1.max(h),
            s.max_dims.2.max(w),
        );
        let pos = lc.slice_labels.iter().filter(|&&l| l > 0).count();
        s.positive_slices += pos;
        s.positive_volumes += (pos > 0) as usize;
    }
    Ok(s)
}
