//! From HU volumes to model input and back: the method's HU windows, in-plane resampling,
//! slice sequences, datasets (INSTANCE, ct-ich layouts, slice-label CSV), patient-wise
//! splits, and synthetic head-CT phantoms with exact masks. Nothing here runs the network.

pub mod crop;
pub mod csv;
pub mod dataset;
pub mod error;
pub mod input;
pub mod resample;
pub mod sequence;
pub mod split;
pub mod synth;
pub mod window;

pub use dataset::{
    load_case, slice_labels_from_mask, summary, Case, Dataset, DatasetSummary, Layout, LoadedCase,
};
pub use error::DataError;
pub use input::{InputSpec, ModelInput};
pub use resample::{
    resize_map_bilinear, resize_mask_nearest, resize_slice, resize_stack, resize_volume, ResizeMode,
};
pub use sequence::{
    crop_pad, merge_maps, merge_scores, plan as plan_sequences, sliding, SeqMode, SeqWindow,
};
pub use split::{split_patients, Split};
pub use window::{windows3, windows3_slice, Window};
