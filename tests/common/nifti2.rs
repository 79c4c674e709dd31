//! NIfTI-2 files written by hand for the tests, from the NIfTI-2 layout (a 540-byte header:
//! `i64` dims and vox_offset, `f64` pixdim, scaling and geometry, `i32` codes), without
//! ichcam's reader: [`Nifti2`] holds the fields, [`Nifti2::from_nifti1`] takes them from a
//! NIfTI-1 header (every `f32` exactly as `f64`), [`Nifti2::file`] lays out a whole file in
//! either byte order and [`from_nifti1_file`] converts a `.nii` written by ichcam (its
//! header read by the nifti crate).

/// The fields of a NIfTI-2 header.
#[derive(Clone, Debug)]
pub struct Nifti2 {
    /// `"n+2\0"` then `"\r\n\x1a\n"`.
    pub magic: [u8; 8],
    pub datatype: i16,
    pub bitpix: i16,
    pub dim: [i64; 8],
    pub intent_p: [f64; 3],
    pub pixdim: [f64; 8],
    pub vox_offset: i64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub cal_max: f64,
    pub cal_min: f64,
    pub slice_duration: f64,
    pub toffset: f64,
    pub slice_start: i64,
    pub slice_end: i64,
    pub descrip: [u8; 80],
    pub aux_file: [u8; 24],
    pub qform_code: i32,
    pub sform_code: i32,
    /// quatern_b, quatern_c, quatern_d, qoffset_x, qoffset_y, qoffset_z.
    pub quatern: [f64; 6],
    pub srow: [[f64; 4]; 3],
    pub slice_code: i32,
    pub xyzt_units: i32,
    pub intent_code: i32,
    pub intent_name: [u8; 16],
    pub dim_info: u8,
}

impl Nifti2 {
    /// The same header as NIfTI-2 (vox_offset 544: the header and 4 extension bytes).
    pub fn from_nifti1(h: &nifti::NiftiHeader) -> Nifti2 {
        let mut descrip = [0u8; 80];
        let n = h.descrip.len().min(80);
        descrip[..n].copy_from_slice(&h.descrip[..n]);
        let f = |v: f32| v as f64;
        Nifti2 {
            magic: *b"n+2\0\r\n\x1a\n",
            datatype: h.datatype,
            bitpix: h.bitpix,
            dim: h.dim.map(|d| d as i64),
            intent_p: [h.intent_p1, h.intent_p2, h.intent_p3].map(f),
            pixdim: h.pixdim.map(f),
            vox_offset: 544,
            scl_slope: f(h.scl_slope),
            scl_inter: f(h.scl_inter),
            cal_max: f(h.cal_max),
            cal_min: f(h.cal_min),
            slice_duration: f(h.slice_duration),
            toffset: f(h.toffset),
            slice_start: h.slice_start as i64,
            slice_end: h.slice_end as i64,
            descrip,
            aux_file: h.aux_file,
            qform_code: h.qform_code as i32,
            sform_code: h.sform_code as i32,
            quatern: [
                h.quatern_b,
                h.quatern_c,
                h.quatern_d,
                h.quatern_x,
                h.quatern_y,
                h.quatern_z,
            ]
            .map(f),
            srow: [h.srow_x.map(f), h.srow_y.map(f), h.srow_z.map(f)],
            slice_code: h.slice_code as i32,
            xyzt_units: h.xyzt_units as i32,
            intent_code: h.intent_code as i32,
            intent_name: h.intent_name,
            dim_info: h.dim_info,
        }
    }

    /// The 540 header bytes, big-endian if `big`.
    pub fn header(&self, big: bool) -> Vec<u8> {
        let mut b = Vec::with_capacity(540);
        macro_rules! put {
            ($v:expr) => {
                if big {
                    b.extend_from_slice(&$v.to_be_bytes())
                } else {
                    b.extend_from_slice(&$v.to_le_bytes())
                }
            };
        }
        put!(540i32); // 0 sizeof_hdr
        b.extend_from_slice(&self.magic); // 4
        put!(self.datatype); // 12
        put!(self.bitpix); // 14
        for d in self.dim {
            put!(d); // 16
        }
        for v in self.intent_p {
            put!(v); // 80
        }
        for v in self.pixdim {
            put!(v); // 104
        }
        put!(self.vox_offset); // 168
        for v in [
            self.scl_slope,
            self.scl_inter,
            self.cal_max,
            self.cal_min,
            self.slice_duration,
            self.toffset,
        ] {
            put!(v); // 176
        }
        put!(self.slice_start); // 224
        put!(self.slice_end); // 232
        b.extend_from_slice(&self.descrip); // 240
        b.extend_from_slice(&self.aux_file); // 320
        put!(self.qform_code); // 344
        put!(self.sform_code); // 348
        for v in self.quatern {
            put!(v); // 352
        }
        for row in self.srow {
            for v in row {
                put!(v); // 400
            }
        }
        put!(self.slice_code); // 496
        put!(self.xyzt_units); // 500
        put!(self.intent_code); // 504
        b.extend_from_slice(&self.intent_name); // 508
        b.push(self.dim_info); // 524
        b.extend_from_slice(&[0u8; 15]); // 525 unused_str
        assert_eq!(b.len(), 540);
        b
    }

    /// A whole file: the header, zeros up to vox_offset (4 extension bytes when vox_offset
    /// is not from 540 to 4096, e.g. a hostile one), then the voxels `body_le`
    /// (little-endian, [`datatype_size`] bytes each) in the header's byte order.
    pub fn file(&self, big: bool, body_le: &[u8]) -> Vec<u8> {
        let mut b = self.header(big);
        let start = match self.vox_offset {
            o @ 540..=4096 => o as usize,
            _ => 544,
        };
        b.resize(start, 0);
        let size = datatype_size(self.datatype);
        for c in body_le.chunks(size) {
            if big {
                b.extend(c.iter().rev());
            } else {
                b.extend_from_slice(c);
            }
        }
        b
    }
}

/// Bytes per voxel of a NIfTI datatype code (1 for codes other than the scalar types).
pub fn datatype_size(code: i16) -> usize {
    match code {
        4 | 512 => 2,
        8 | 16 | 768 => 4,
        64 | 1024 | 1280 => 8,
        _ => 1,
    }
}

/// The header (as NIfTI-2) and the little-endian voxel bytes of a little-endian `.nii`
/// NIfTI-1 file (as ichcam writes), its header read by the nifti crate.
pub fn parts_of_nifti1_file(nii: &[u8]) -> (Nifti2, Vec<u8>) {
    let h = nifti::NiftiHeader::from_reader(nii).unwrap();
    let off = h.vox_offset as usize;
    (Nifti2::from_nifti1(&h), nii[off..].to_vec())
}

/// A little-endian `.nii` NIfTI-1 file (as ichcam writes) converted to NIfTI-2 in byte
/// order `big`: the same fields and voxels.
pub fn from_nifti1_file(nii: &[u8], big: bool) -> Vec<u8> {
    let (h, body) = parts_of_nifti1_file(nii);
    h.file(big, &body)
}
