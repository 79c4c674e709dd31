//! What `--input` names: a NIfTI file (or either file of a `.hdr`/`.img` pair), a DICOM series
//! folder, a folder of volumes, or a dataset folder (`images/` or `data/` inside). Each becomes
//! one `(id, path)` item; the id is the file stem ([`crate::io::volume_id`], or the DICOM
//! folder's name) and names the output folder.

use super::InferError;
use crate::data::dataset::list_volumes;
use crate::io::volume_id;
use std::collections::HashSet;
use std::path::PathBuf;

/// One volume to segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputItem {
    pub id: String,
    pub path: PathBuf,
}

/// Expands the command line's inputs into volumes, in order, refusing duplicate ids (their
/// outputs would overwrite each other).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<InputItem>, InferError> {
    let mut items = Vec::new();
    for p in inputs {
        let meta =
            std::fs::metadata(p).map_err(|e| InferError::Input(format!("{}: {e}", p.display())))?;
        if meta.is_file() {
            items.push(InputItem {
                id: volume_id(p),
                path: p.clone(),
            });
            continue;
        }
        // A dataset folder segments its images.
        let dir = ["images", "data"]
            .iter()
            .map(|s| p.join(s))
            .find(|d| d.is_dir())
            .unwrap_or_else(|| p.clone());
        let vols = list_volumes(&dir, true)?;
        if vols.is_empty() {
            // Not a folder of volumes: a DICOM series itself (the reader says if it is not).
            items.push(InputItem {
                id: volume_id(p),
                path: p.clone(),
            });
        } else {
            items.extend(vols.into_iter().map(|(id, path)| InputItem { id, path }));
        }
    }
    let mut seen = HashSet::new();
    for it in &items {
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
    Ok(items)
}
