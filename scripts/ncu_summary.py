#!/usr/bin/env python3
"""Per-kernel totals of an `ncu --csv --metrics gpu__time_duration.sum` log: kernel name
(up to its parameter list), launches, total and mean time, share of the whole; the top N
printed, largest first. Usage: ncu_summary.py LOG.csv [N]"""
import csv
import sys
from collections import defaultdict

SCALE = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0, "s": 1e3, "second": 1e3}


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    tot = defaultdict(float)
    cnt = defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        try:
            v = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        name = row.get("Kernel Name", "?").split("(")[0]
        tot[name] += v * SCALE.get(row.get("Metric Unit", "ns"), 1e-6)
        cnt[name] += 1
    whole = sum(tot.values())
    print(f"{path}: {sum(cnt.values())} launches, {whole:.3f} ms of kernel time")
    for name, ms in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {ms:9.3f} ms {100 * ms / max(whole, 1e-12):5.1f}% {cnt[name]:5d}x {ms / cnt[name] * 1e3:9.1f} us  {name[:70]}")


if __name__ == "__main__":
    main()
