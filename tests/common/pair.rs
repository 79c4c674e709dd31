//! NIfTI-1 `.hdr`/`.img` pairs made by hand for the tests from a single-file `.nii`, without
//! ichcam's reader: the 348 header bytes with the pair's magic `ni1` and `vox_offset` 0 (the
//! `.img` starts with the voxels), and the voxel bytes from the file's `vox_offset` on.

/// The `.hdr` and `.img` bytes of a little-endian single-file NIfTI-1 `.nii` (as ichcam
/// writes).
pub fn split_nii(nii: &[u8]) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(i32::from_le_bytes(nii[..4].try_into().unwrap()), 348);
    assert_eq!(&nii[344..348], b"n+1\0");
    let off = f32::from_le_bytes(nii[108..112].try_into().unwrap()) as usize;
    let mut hdr = nii[..348].to_vec();
    hdr[344..348].copy_from_slice(b"ni1\0");
    hdr[108..112].copy_from_slice(&0f32.to_le_bytes());
    (hdr, nii[off..].to_vec())
}

/// Writes `stem.hdr` and `stem.img` (each gzipped, with `.gz` added, when `gz`) in `dir`
/// from a `.nii`'s bytes; returns the two paths.
pub fn write_pair(
    dir: &std::path::Path,
    stem: &str,
    nii: &[u8],
    gz: bool,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (hdr, img) = split_nii(nii);
    let ext = if gz { ".gz" } else { "" };
    let (h, i) = (
        dir.join(format!("{stem}.hdr{ext}")),
        dir.join(format!("{stem}.img{ext}")),
    );
    let wrap = |b: Vec<u8>| if gz { super::files::gz(&b) } else { b };
    std::fs::write(&h, wrap(hdr)).unwrap();
    std::fs::write(&i, wrap(img)).unwrap();
    (h, i)
}

/// Sets a NIfTI-1 header's (little-endian) `dim` array.
pub fn set_dims(hdr: &mut [u8], dims: [i16; 8]) {
    for (k, d) in dims.iter().enumerate() {
        hdr[40 + 2 * k..42 + 2 * k].copy_from_slice(&d.to_le_bytes());
    }
}

/// Sets a NIfTI-1 header's (little-endian) `datatype` and `bitpix`.
pub fn set_datatype(hdr: &mut [u8], code: i16, bitpix: i16) {
    hdr[70..72].copy_from_slice(&code.to_le_bytes());
    hdr[72..74].copy_from_slice(&bitpix.to_le_bytes());
}
