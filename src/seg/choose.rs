//! Which k-means cluster is the hemorrhage: the brightest one that is not saturated and not
//! tiny. Knows only centroids (subdural-window units, [0, 1]) and counts.
//!
//! Calcifications and bone saturate the 80/200 window (>= 180 HU maps to 1), so the
//! brightest cluster inside a CAM often is not blood; blood (50-90 HU) sits near 0.35-0.55.

/// Centroids at or above this (window units) count as saturated: 0.6 is 100 HU, above acute
/// blood (50-90 HU). The window itself saturates only at 180 HU, and the voxels between 100
/// and 180 HU inside a CAM are the partial-volume rim of the inner skull table (or the edge
/// of a calcification), which would otherwise be the "brightest non-saturated" cluster next
/// to every epidural or subdural hematoma.
pub const DEFAULT_SATURATION: f32 = 0.6;
/// The darkest centroid (HU) taken for acute blood.
pub const DEFAULT_MIN_BLOOD_HU: f32 = 45.0;
/// Clusters with fewer voxels than this are ignored.
pub const DEFAULT_MIN_CLUSTER_VOXELS: usize = 10;

/// The index of the brightest cluster with `floor <= centroid < saturation` and
/// `count >= max(min_voxels, 1)`; `None` if there is none. Ties go to the lower index.
/// `floor` is the darkest centroid that can still be acute blood: without it, a CAM region
/// that holds only brain still yields its brightest (noisiest) quarter as a "lesion".
pub fn choose_cluster(
    centroids: &[f32],
    counts: &[usize],
    floor: f32,
    saturation: f32,
    min_voxels: usize,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, (&c, &n)) in centroids.iter().zip(counts).enumerate() {
        // NaN centroids are never chosen.
        if n < min_voxels.max(1) || c.is_nan() || c >= saturation || c < floor {
            continue;
        }
        match best {
            Some(b) if centroids[b] >= c => {}
            _ => best = Some(i),
        }
    }
    best
}
