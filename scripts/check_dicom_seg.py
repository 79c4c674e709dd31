"""Independent check of a DICOM Segmentation written by `ichcam segment --dicom-seg`.

Loads OUT/<id>/seg.dcm with highdicom (`highdicom.seg.segread`) and compares it with
OUT/<id>/mask.nii.gz (nibabel) and with the source DICOM (pydicom):

- the SEG is BINARY with one segment, SCT 50960005 "Hemorrhage", and references the source
  series, study and frame of reference;
- `get_pixels_by_source_instance` (a single-frame series) or `get_pixels_by_source_frame`
  (a multi-frame image), asked for every source slice, equals the NIfTI mask slice by slice
  (slices the SEG has no frame for must be empty in the mask);
- `get_volume()` gives a volume whose slices, placed by its affine, land on source slices
  and equal the mask there.

The mask's slice z is the source slice z-th along the slice normal (how ichcam orders a
series); its voxel (x, y, z) is row y, column x of that slice.

Usage (a venv with highdicom and nibabel, e.g.
`python3 -m venv /tmp/hdvenv && /tmp/hdvenv/bin/pip install highdicom nibabel`):

    /tmp/hdvenv/bin/python scripts/check_dicom_seg.py --source SERIES_DIR_OR_FILE --out OUT/<id>

Exits non-zero, with the reason, on any mismatch; prints one line per check otherwise.
"""
import argparse
import pathlib
import sys

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def source_slices(src):
    """[(sop_instance_uid, frame_number or None, position)] sorted along the slice normal,
    and the first dataset."""
    paths = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.is_file())
    out, first = [], None
    for p in paths:
        try:
            ds = pydicom.dcmread(p)
        except Exception:
            continue
        if "Rows" not in ds:
            continue
        first = first or ds
        if "PerFrameFunctionalGroupsSequence" in ds:
            shared = ds.SharedFunctionalGroupsSequence[0]
            for k, fr in enumerate(ds.PerFrameFunctionalGroupsSequence):
                g = fr if "PlaneOrientationSequence" in fr else shared
                ori = [float(v) for v in g.PlaneOrientationSequence[0].ImageOrientationPatient]
                pos = [float(v) for v in fr.PlanePositionSequence[0].ImagePositionPatient]
                out.append((ds.SOPInstanceUID, k + 1, pos, ori))
        else:
            ori = [float(v) for v in ds.ImageOrientationPatient]
            out.append((ds.SOPInstanceUID, None, [float(v) for v in ds.ImagePositionPatient], ori))
    if not out:
        fail(f"{src}: no DICOM images")
    ori = np.array(out[0][3])
    normal = np.cross(ori[:3], ori[3:])
    out.sort(key=lambda s: float(np.dot(normal, s[2])))
    return [(u, f, np.array(p)) for u, f, p, _ in out], first


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, type=pathlib.Path)
    ap.add_argument("--out", required=True, type=pathlib.Path, help="OUT/<id> of ichcam segment")
    a = ap.parse_args()

    slices, first = source_slices(a.source)
    mask = np.asarray(nib.load(a.out / "mask.nii.gz").dataobj).astype(np.uint8)
    # NIfTI (x, y, z) -> (z, row, column).
    mask = np.transpose(mask, (2, 1, 0))
    if mask.shape[0] != len(slices):
        fail(f"mask has {mask.shape[0]} slices, the source {len(slices)}")

    seg = hd.seg.segread(a.out / "seg.dcm")
    print(f"highdicom {hd.__version__}: read {a.out / 'seg.dcm'}: "
          f"{seg.NumberOfFrames} frame(s) of {seg.Rows}x{seg.Columns}")
    if seg.segmentation_type != hd.seg.SegmentationTypeValues.BINARY:
        fail(f"segmentation type {seg.segmentation_type}")
    if seg.number_of_segments != 1:
        fail(f"{seg.number_of_segments} segments")
    d = seg.get_segment_description(1)
    if d.segmented_property_type.value != "50960005":
        fail(f"segment property type {d.segmented_property_type}")
    print(f"ok: BINARY, 1 segment: {d.segment_label!r}, "
          f"{d.segmented_property_category.meaning} / {d.segmented_property_type.meaning}, "
          f"algorithm {d.algorithm_type.value}")
    for attr in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        if getattr(seg, attr, "") != getattr(first, attr, ""):
            fail(f"{attr}: {getattr(seg, attr, '')} vs the source's {getattr(first, attr, '')}")
    ref_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    if ref_series != first.SeriesInstanceUID:
        fail(f"references series {ref_series}, the source is {first.SeriesInstanceUID}")
    print("ok: study, frame of reference, patient and referenced series are the source's")

    # Per source slice.
    referenced = set()
    for item in seg.PerFrameFunctionalGroupsSequence:
        r = item.DerivationImageSequence[0].SourceImageSequence[0]
        referenced.add((r.ReferencedSOPInstanceUID, int(r.ReferencedFrameNumber)
                        if "ReferencedFrameNumber" in r else None))
    multi = slices[0][1] is not None
    have = [k for k, (u, f, _) in enumerate(slices) if (u, f) in referenced]
    if multi:
        px = seg.get_pixels_by_source_frame(
            slices[0][0], source_frame_numbers=[slices[k][1] for k in have],
            segment_numbers=[1])
    else:
        px = seg.get_pixels_by_source_instance([slices[k][0] for k in have], segment_numbers=[1])
    px = np.asarray(px)[..., 0]
    for i, k in enumerate(have):
        if not np.array_equal(px[i].astype(np.uint8), mask[k]):
            fail(f"slice {k}: SEG pixels differ from the mask "
                 f"({int(px[i].sum())} vs {int(mask[k].sum())} voxels)")
    for k in set(range(len(slices))) - set(have):
        if mask[k].any():
            fail(f"slice {k} has {int(mask[k].sum())} mask voxels but no SEG frame")
    how = "get_pixels_by_source_frame" if multi else "get_pixels_by_source_instance"
    print(f"ok: {how}: {len(have)} referenced slice(s) equal the mask; the other "
          f"{len(slices) - len(have)} slice(s) are empty in the mask; "
          f"{int(mask.sum())} mask voxels in all")

    # As a volume, placed by its affine.
    vol = seg.get_volume()
    arr = np.asarray(vol.array)
    if arr.ndim == 4:
        arr = arr[..., 0]
    positions = np.array([p for _, _, p in slices])
    placed = 0
    for k in range(arr.shape[0]):
        pos = (vol.affine @ np.array([k, 0, 0, 1.0]))[:3]
        dist = np.linalg.norm(positions - pos, axis=1)
        z = int(np.argmin(dist))
        if dist[z] > 1e-3:
            fail(f"get_volume slice {k} at {pos} is on no source slice")
        if not np.array_equal(arr[k].astype(np.uint8), mask[z]):
            fail(f"get_volume slice {k} (source slice {z}) differs from the mask")
        placed += 1
    print(f"ok: get_volume: {placed} slice(s) of {arr.shape[1]}x{arr.shape[2]} land on source "
          f"slices and equal the mask there")
    print("PASS")


if __name__ == "__main__":
    main()
