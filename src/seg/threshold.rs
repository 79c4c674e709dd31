//! The binary CAM region: voxels whose min-max normalised CAM reaches a threshold.
//! Knows nothing of how the CAM was computed.

use crate::io::Mask;
use ndarray::Array3;

/// The authors' CAM threshold on the min-max normalised map.
pub const DEFAULT_CAM_THRESHOLD: f32 = 0.7;

/// 1 where `cam_norm >= threshold`, else 0. NaN never passes (a comparison with NaN is false).
pub fn cam_region(cam_norm: &Array3<f32>, threshold: f32) -> Mask {
    cam_norm.mapv(|c| u8::from(c >= threshold))
}
