//! What `--input` names: a NIfTI file (or either file of a `.hdr`/`.img` pair), a DICOM series
//! folder, a folder of volumes, or a dataset folder (`images/` or `data/` inside). Each becomes
//! one `(id, path)` item; the id is the file stem ([`crate::io::volume_id`], or the DICOM
//! folder's name) and names the output folder.
//!
//! With [`ExpandOptions::series`], one series (by SeriesInstanceUID) of a single DICOM
//! folder holding several. With [`ExpandOptions::recursive`], every folder under each input
//! (symbolic links to folders not followed, at most [`MAX_DEPTH`] levels) gives its NIfTI
//! files and pairs ([`crate::io::volume_stem`]) and one item per CT series of its DICOM images ([`is_ct_volume`], from the headers
//! alone: `io::dicom::list_series`); the others are listed as skipped, with the reason.

use super::InferError;
use crate::data::dataset::list_volumes;
use crate::io::dicom::{list_series, SeriesInfo};
use crate::io::{volume_id, volume_stem};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One volume to segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputItem {
    pub id: String,
    pub path: PathBuf,
    /// The SeriesInstanceUID to read, for a DICOM folder holding several series.
    pub series: Option<String>,
}

/// Expands the command line's inputs into volumes, in order, refusing duplicate ids (their
/// outputs would overwrite each other).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<InputItem>, InferError> {
    let items = expand_flat(inputs)?;
    check_items(&items)?;
    Ok(items)
}

/// One level: the inputs as [`expand_inputs`] reads them.
fn expand_flat(inputs: &[PathBuf]) -> Result<Vec<InputItem>, InferError> {
    let mut items = Vec::new();
    for p in inputs {
        let meta =
            std::fs::metadata(p).map_err(|e| InferError::Input(format!("{}: {e}", p.display())))?;
        if meta.is_file() {
            items.push(InputItem {
                id: volume_id(p),
                path: p.clone(),
                series: None,
            });
            continue;
        }
        let dir = images_dir(p);
        let vols = list_volumes(&dir, true)?;
        if vols.is_empty() {
            // Not a folder of volumes: a DICOM series itself (the reader says if it is not).
            items.push(InputItem {
                id: volume_id(p),
                path: p.clone(),
                series: None,
            });
        } else {
            items.extend(vols.into_iter().map(|(id, path)| InputItem {
                id,
                path,
                series: None,
            }));
        }
    }
    Ok(items)
}

/// The folder whose volumes an input folder `p` gives: a dataset folder segments its
/// images (`images/` or `data/` inside), any other folder itself.
fn images_dir(p: &Path) -> PathBuf {
    ["images", "data"]
        .iter()
        .map(|s| p.join(s))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| p.to_path_buf())
}

/// Refuses duplicate ids and an empty list.
fn check_items(items: &[InputItem]) -> Result<(), InferError> {
    let mut seen = HashSet::new();
    for it in items {
        if !seen.insert(it.id.clone()) {
            return Err(InferError::Input(format!(
                "two inputs share the id `{}` (the output folder name): rename one",
                it.id
            )));
        }
    }
    if items.is_empty() {
        return Err(InferError::Input("no input volumes".into()));
    }
    Ok(())
}

/// Default of [`ExpandOptions::min_slices`]: fewer slices is no head CT volume (a scout, a
/// few reformatted or key images).
pub const DEFAULT_MIN_SLICES: usize = 8;

/// Deepest folder level [`expand_inputs_with`] searches below an input (patient / study /
/// series is 3).
pub const MAX_DEPTH: usize = 16;

/// How [`expand_inputs_with`] reads the inputs.
#[derive(Clone, Debug)]
pub struct ExpandOptions {
    /// Walk every folder under each input folder (see the module doc).
    pub recursive: bool,
    /// Recursive: DICOM series with fewer slices are skipped.
    pub min_slices: usize,
    /// One series (SeriesInstanceUID) of the one DICOM folder input.
    pub series: Option<String>,
}

impl Default for ExpandOptions {
    fn default() -> Self {
        ExpandOptions {
            recursive: false,
            min_slices: DEFAULT_MIN_SLICES,
            series: None,
        }
    }
}

/// The volumes of [`expand_inputs_with`], and what it skipped (one line each: the folder,
/// the series and the reason).
#[derive(Clone, Debug, Default)]
pub struct Expanded {
    pub items: Vec<InputItem>,
    pub skipped: Vec<String>,
}

/// Why a DICOM series is no CT volume to segment (`None`: it is one): Modality other than
/// CT (absent is taken for CT), ImageType LOCALIZER, or fewer than `min_slices` slices.
pub fn is_ct_volume(s: &SeriesInfo, min_slices: usize) -> Option<String> {
    if let Some(m) = s
        .modality
        .as_deref()
        .filter(|m| !m.eq_ignore_ascii_case("CT"))
    {
        return Some(format!("Modality {m}, not CT"));
    }
    if s.localizer {
        return Some("a localizer (ImageType LOCALIZER)".into());
    }
    if s.slices < min_slices {
        return Some(format!(
            "{} slice(s), fewer than the {min_slices} of --min-slices",
            s.slices
        ));
    }
    None
}

/// As [`expand_inputs`], with a series of one folder or a recursive walk
/// ([`ExpandOptions`]). Without either, the same items as [`expand_inputs`].
pub fn expand_inputs_with(
    inputs: &[PathBuf],
    opts: &ExpandOptions,
) -> Result<Expanded, InferError> {
    let mut out = Expanded::default();
    if let Some(uid) = &opts.series {
        let [dir] = inputs else {
            return Err(InferError::Input(format!(
                "--series takes one DICOM folder input, not {}",
                inputs.len()
            )));
        };
        if opts.recursive || !dir.is_dir() {
            return Err(InferError::Input(format!(
                "{}: --series takes one DICOM folder (not a file, not with --recursive)",
                dir.display()
            )));
        }
        let found = list_series(dir)?;
        if !found.iter().any(|s| s.uid.as_deref() == Some(uid.as_str())) {
            return Err(InferError::Input(format!(
                "{}: no series {uid} in the folder; it holds {}: {}",
                dir.display(),
                if found.is_empty() {
                    "no DICOM image".to_string()
                } else {
                    format!("{} series", found.len())
                },
                found
                    .iter()
                    .map(|s| s.line())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        out.items.push(InputItem {
            id: volume_id(dir),
            path: dir.clone(),
            series: Some(uid.clone()),
        });
    } else if opts.recursive {
        for p in inputs {
            let meta = std::fs::metadata(p)
                .map_err(|e| InferError::Input(format!("{}: {e}", p.display())))?;
            if meta.is_file() {
                out.items.extend(expand_flat(std::slice::from_ref(p))?);
                continue;
            }
            let dir = images_dir(p);
            // DICOM images directly in the input (or its images/) are named by the input.
            let root = volume_id(p);
            walk(&dir, &root, &[], opts, &mut out)?;
        }
    } else {
        out.items = expand_flat(inputs)?;
    }
    check_items(&out.items)?;
    Ok(out)
}

/// The items of folder `dir` (at `rel` below the input folder named `root`) and of the
/// folders under it.
fn walk(
    dir: &Path,
    root: &str,
    rel: &[String],
    opts: &ExpandOptions,
    out: &mut Expanded,
) -> Result<(), InferError> {
    let id_of = |last: Option<&str>| {
        let mut parts: Vec<&str> = rel.iter().map(|s| s.as_str()).collect();
        parts.extend(last);
        if parts.is_empty() {
            root.to_string()
        } else {
            parts.join("_")
        }
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if !rel.is_empty() => {
            out.skipped
                .push(format!("{}: cannot list it: {e}", dir.display()));
            return Ok(());
        }
        Err(e) => return Err(InferError::Input(format!("{}: {e}", dir.display()))),
    };
    let mut entries: Vec<(String, PathBuf, std::fs::FileType)> = rd
        .flatten()
        .filter_map(|e| {
            let ft = e.file_type().ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), e.path(), ft))
        })
        .filter(|(name, _, _)| !name.starts_with('.'))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut subdirs = Vec::new();
    for (name, path, ft) in entries {
        if ft.is_dir() {
            subdirs.push((name, path));
        } else if ft.is_symlink() && path.is_dir() {
            out.skipped.push(format!(
                "{}: a symbolic link to a folder, not followed",
                path.display()
            ));
        } else if path.is_file() {
            // NIfTI files, and pairs by their header.
            if let Some(stem) = volume_stem(&name) {
                out.items.push(InputItem {
                    id: id_of(Some(stem)),
                    path,
                    series: None,
                });
            }
        }
    }
    match list_series(dir) {
        // A folder the reader would refuse (a corrupt DICOM file): an item, so the batch
        // reports it as failed with the reader's error and goes on.
        Err(_) => out.items.push(InputItem {
            id: id_of(None),
            path: dir.to_path_buf(),
            series: None,
        }),
        Ok(found) => {
            let mut kept = Vec::new();
            for s in &found {
                match is_ct_volume(s, opts.min_slices) {
                    Some(why) => {
                        out.skipped
                            .push(format!("{}: series {}: {why}", dir.display(), s.line()))
                    }
                    None => kept.push(s),
                }
            }
            if kept.len() > 1 {
                kept.retain(|s| {
                    if s.uid.is_none() {
                        out.skipped.push(format!(
                            "{}: series {}: images without a SeriesInstanceUID beside other series",
                            dir.display(),
                            s.line()
                        ));
                    }
                    s.uid.is_some()
                });
            }
            let base = id_of(None);
            let several = kept.len() > 1;
            for (k, s) in kept.iter().enumerate() {
                let unique =
                    s.number.is_some() && kept.iter().filter(|o| o.number == s.number).count() == 1;
                let id = match (several, s.number) {
                    (false, _) => base.clone(),
                    (true, Some(n)) if unique => format!("{base}_s{n}"),
                    (true, _) => format!("{base}_series{}", k + 1),
                };
                out.items.push(InputItem {
                    id,
                    path: dir.to_path_buf(),
                    // The folder's one series is read as today; one of several by its UID.
                    series: if found.len() > 1 { s.uid.clone() } else { None },
                });
            }
        }
    }
    for (name, path) in subdirs {
        if rel.len() >= MAX_DEPTH {
            out.skipped.push(format!(
                "{}: deeper than {MAX_DEPTH} folder levels, not searched",
                path.display()
            ));
            continue;
        }
        let mut sub = rel.to_vec();
        sub.push(name);
        walk(&path, root, &sub, opts, out)?;
    }
    Ok(())
}
