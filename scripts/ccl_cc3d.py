#!/usr/bin/env python3
"""Times cc3d.connected_components(connectivity=26) on the volumes benches/ccl.rs dumped.

    ICHCAM_CCL_DUMP=/tmp/ccl cargo bench --bench ccl
    .venv-cc3d/bin/python scripts/ccl_cc3d.py /tmp/ccl [--repeat 10]

Each DIR/<name>.u8 is raw uint8, C order [z, y, x]; DIR/<name>.txt holds "nz ny nx N" with
N the component count ichcam found. The script checks cc3d finds the same N, then prints the
median and best time of `--repeat` runs (after one warm-up) with a uint32 output, as ichcam's.
`--no-hugepage` turns off numpy's huge-page advice for the output array (see docs/perf.md).
"""
import argparse
import pathlib
import statistics
import sys
import time

import cc3d
import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=pathlib.Path)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument(
        "--no-hugepage",
        action="store_true",
        help="turn off numpy's madvise(MADV_HUGEPAGE) on large arrays (cc3d's output is one): "
        "the output volume then faults in 4 KiB pages, as ichcam's does",
    )
    args = ap.parse_args()
    if args.no_hugepage:
        core = getattr(np, "_core", None) or np.core
        core.multiarray._set_madvise_hugepage(False)
    txts = sorted(args.dir.glob("*.txt"))
    if not txts:
        print(f"no volumes in {args.dir}", file=sys.stderr)
        return 1
    ok = True
    try:
        from importlib.metadata import version

        cc3d_version = version("connected-components-3d")
    except Exception:  # the version is only for the printout
        cc3d_version = "?"
    print(f"cc3d {cc3d_version}, numpy {np.__version__}, hugepage madvise {'off' if args.no_hugepage else 'on'}")
    print(f"{'volume':<22} {'fg %':>6} {'N cc3d':>8} {'N ichcam':>9} {'median ms':>10} {'best ms':>9}")
    for txt in txts:
        nz, ny, nx, n_ref = (int(v) for v in txt.read_text().split())
        vol = np.fromfile(txt.with_suffix(".u8"), dtype=np.uint8).reshape(nz, ny, nx)
        run = lambda: cc3d.connected_components(vol, connectivity=26, out_dtype=np.uint32, return_N=True)
        labels, n = run()
        if n != n_ref:
            ok = False
        del labels
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
            del out
        print(
            f"{txt.stem:<22} {100 * vol.mean():>6.2f} {n:>8} {n_ref:>9} "
            f"{1e3 * statistics.median(times):>10.1f} {1e3 * min(times):>9.1f}"
        )
    if not ok:
        print("component counts differ between cc3d and ichcam", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
