//! DICOM archive folders for tests, written by `io::dicom::write_series_with`: a folder
//! holding two CT series and a one-slice localizer ([`write_mixed`]).

use ichcam::io::dicom::{self, SeriesOptions};
use ichcam::io::Volume;
use std::path::Path;

/// One series written by [`write_mixed`].
pub struct Written {
    pub uid: String,
    pub number: u32,
    pub description: &'static str,
    pub localizer: bool,
    /// Its voxels and geometry.
    pub volume: Volume,
}

/// Writes into `dir` (created): series 1 "scout", a LOCALIZER of one slice (the first of
/// `brain`), series 2 "bone" (`bone`) and series 3 "brain" (`brain`), each with its own
/// SeriesInstanceUID (`<uid_root>.1` ...) and file prefix. Returns them by series number.
pub fn write_mixed(dir: &Path, uid_root: &str, bone: &Volume, brain: &Volume) -> Vec<Written> {
    let scout = {
        let first = brain.data.slice(ndarray::s![0..1, .., ..]).to_owned();
        let mut v = brain.clone();
        v.data = first;
        v
    };
    let out = vec![
        Written {
            uid: format!("{uid_root}.1"),
            number: 1,
            description: "scout",
            localizer: true,
            volume: scout,
        },
        Written {
            uid: format!("{uid_root}.2"),
            number: 2,
            description: "bone",
            localizer: false,
            volume: bone.clone(),
        },
        Written {
            uid: format!("{uid_root}.3"),
            number: 3,
            description: "brain",
            localizer: false,
            volume: brain.clone(),
        },
    ];
    for w in &out {
        dicom::write_series_with(
            dir,
            &w.volume,
            &SeriesOptions {
                series_uid: Some(w.uid.clone()),
                prefix: format!("{}_", w.description),
                series_number: w.number,
                description: Some(w.description.into()),
                localizer: w.localizer,
                ..Default::default()
            },
        )
        .unwrap();
    }
    out
}
