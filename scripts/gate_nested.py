#!/usr/bin/env python3
"""Nested choice of test-time gates / component filters on the output of
`cargo run --release --example gate_features -- CVDIR > F.jsonl` (docs/accuracy.md).

    python3 scripts/gate_nested.py F.jsonl [TOLERANCE]

Prints one markdown row per family: per fold pooled slice Dice / volume Dice (FP volumes)
and the value chosen for that fold, the mean +- sd over folds, all-51 pooled, volume Dice.


Rule (written before any result was seen): for fold k, every threshold of a family's grid is
scored on the other four folds' volumes: J = pooled slice Dice over their truth slices; among
the thresholds with J >= max J - 0.01, the one with the fewest false-positive volumes
(ties: higher J, then the grid's first) is applied to fold k. Reported per fold.
"""
import json, sys, statistics

MIN_ML = 0.3

def load(path):
    return [json.loads(l) for l in open(path)]

def apply(v, keep_comp, keep_slice, refilter=True):
    """Per-slice (pred voxels, overlap) after the gate."""
    d = len(v["truth_slice"])
    a = [0] * d; c = [0] * d
    for comp in v["comps"]:
        if not keep_comp(v, comp):
            continue
        sl = [(z, n, o) for z, n, o in comp["slices"] if keep_slice(v, z)]
        if refilter and sum(n for _, n, _ in sl) * v["voxel_ml"] < MIN_ML - 1e-12:
            continue
        for z, n, o in sl:
            a[z] += n; c[z] += o
    return a, c

def score(vols, keep_comp, keep_slice):
    ds = 0.0; nt = 0; vd = []; fp = 0; neg = 0
    for v in vols:
        a, c = apply(v, keep_comp, keep_slice)
        b = v["truth_slice"]
        for z in range(len(b)):
            if b[z] > 0:
                ds += 2 * c[z] / (a[z] + b[z]); nt += 1
        if sum(b) > 0:
            vd.append(2 * sum(c) / (sum(a) + sum(b)))
        else:
            neg += 1; fp += sum(a) > 0
    return dict(sd=ds / max(nt, 1), sdsum=ds, nt=nt, vd=vd, fp=fp, neg=neg)

ALL = lambda v, x: True

def vol_feature(name):
    def f(v):
        flagged = [z for z, fl in enumerate(v["flag"]) if fl]
        if name == "pmax": return max(v["prob"])
        if name == "nflag": return len(flagged)
        if name == "umax_flag": return max([v["unet_max"][z] for z in flagged], default=0.0)
        if name == "umass_flag": return sum(v["unet_area"][z] for z in flagged) * v["voxel_ml"]
        if name == "pred_ml": return sum(c["voxels"] for c in v["comps"]) * v["voxel_ml"]
        if name == "big_ml": return max([c["voxels"] for c in v["comps"]], default=0) * v["voxel_ml"]
        if name == "best_umean": return max([c["unet_mean"] for c in v["comps"]], default=0.0)
        if name == "best_umax": return max([c["unet_max"] for c in v["comps"]], default=0.0)
        raise KeyError(name)
    return f

def comp_feature(name):
    def f(v, c):
        if name == "ml": return c["voxels"] * v["voxel_ml"]
        if name == "hu_neg": return -c["hu_mean"]
        if name == "nsl": return len(c["slices"])
        if name == "mirror_neg": return -c["mirror"]
        if name == "rim_neg": return -c["rim"]
        if name == "mo_neg": return -c["mirror_other"]
        if name == "outside_neg": return -c["outside"]
        return c[name]
    return f

FAMILIES = {}
def grid(lo, hi, n):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
for name, g in [("pmax", grid(0.5, 1.0, 51)), ("nflag", list(range(0, 25))),
                ("umax_flag", grid(0.5, 1.0, 51)), ("umass_flag", grid(0, 10, 51)),
                ("pred_ml", grid(0, 10, 51)), ("big_ml", grid(0, 10, 51)),
                ("best_umean", grid(0, 1, 51)), ("best_umax", grid(0.5, 1.0, 51))]:
    ff = vol_feature(name)
    FAMILIES["volume gate " + name] = [(t, (lambda ff, t: (lambda v, c: ff(v) >= t))(ff, t), ALL) for t in g]
for name, g in [("unet_max", grid(0.5, 1.0, 51)), ("unet_mean", grid(0, 1, 51)),
                ("unet_hi", grid(0, 1, 51)), ("cam_max", grid(0, 1, 51)),
                ("ml", grid(0.3, 5, 48)), ("nsl", list(range(1, 8))),
                ("hu_neg", grid(-100, -55, 46)), ("mirror_neg", grid(-1, 0, 51)),
                ("rim_neg", grid(-1, 0, 51)), ("middist_px", grid(0, 60, 31)), ("mo_neg", grid(-1, 0, 51)),
                ("outside_neg", grid(-1, 0, 51))]:
    ff = comp_feature(name)
    FAMILIES["component filter " + name] = [(t, (lambda ff, t: (lambda v, c: ff(v, c) >= t))(ff, t), ALL) for t in g]
def mirror_and(tm, name, t2):
    def kc(v, c):
        if c["mirror_other"] > tm + 1e-9: return False
        if name == "nsl": return len(c["slices"]) >= t2
        return vol_feature("umax_flag")(v) >= t2
    return kc
FAMILIES["component filter mirror_other <= -t"] = FAMILIES.pop("component filter mo_neg")
FAMILIES["component filter outside <= -t"] = FAMILIES.pop("component filter outside_neg")
FAMILIES["outside and mirror_other (two thresholds)"] = [((t, tm), (lambda t, tm: (lambda v, c: c["outside"] <= t + 1e-9 and c["mirror_other"] <= tm + 1e-9))(t, tm), ALL) for t in grid(0, 1, 51) for tm in (0.16, 0.3, 0.44, 1.0)]
FAMILIES["outside <= 0 and nsl >= t"] = [(t2, (lambda t2: (lambda v, c: c["outside"] <= 0 and len(c["slices"]) >= t2))(t2), ALL) for t2 in (1, 2, 3, 4)]
FAMILIES["mirror_other and nsl (two thresholds)"] = [((tm, t2), mirror_and(tm, "nsl", t2), ALL) for tm in (0.16, 0.3, 0.44, 1.0) for t2 in (1, 2, 3, 4)]
FAMILIES["mirror_other and volume gate umax_flag (two thresholds)"] = [((tm, t2), mirror_and(tm, "umax", t2), ALL) for tm in (0.16, 0.3, 0.44, 1.0) for t2 in grid(0.5, 1, 26)]
FAMILIES["slice gate unet_max"] = [(t, ALL, (lambda t: (lambda v, z: v["unet_max"][z] >= t))(t)) for t in grid(0.5, 1.0, 51)]

def nested(vols, fam, tol=0.01):
    folds = sorted(set(v["fold"] for v in vols))
    out = []
    # Precompute scores per fold per threshold.
    per = {}
    for i, (t, kc, ks) in enumerate(fam):
        for k in folds:
            per[(i, k)] = score([v for v in vols if v["fold"] == k], kc, ks)
    for k in folds:
        cands = []
        for i, (t, _, _) in enumerate(fam):
            others = [per[(i, j)] for j in folds if j != k]
            J = sum(o["sdsum"] for o in others) / sum(o["nt"] for o in others)
            fp = sum(o["fp"] for o in others)
            cands.append((i, J, fp))
        jmax = max(c[1] for c in cands)
        ok = [c for c in cands if c[1] >= jmax - tol]
        best = min(ok, key=lambda c: (c[2], -c[1], c[0]))
        out.append((k, fam[best[0]][0], per[(best[0], k)]))
    return out

def fmt_t(t):
    if isinstance(t, tuple):
        return "(" + ", ".join(fmt_t(x) for x in t) + ")"
    return f"{round(t, 4):g}"

def summarize(label, rows):
    sds = [r["sd"] for _, _, r in rows]
    allsd = sum(r["sdsum"] for _, _, r in rows) / sum(r["nt"] for _, _, r in rows)
    vd = [statistics.mean(r["vd"]) for _, _, r in rows]
    allvd = statistics.mean([x for _, _, r in rows for x in r["vd"]])
    fp = sum(r["fp"] for _, _, r in rows); neg = sum(r["neg"] for _, _, r in rows)
    per = " | ".join(f"{r['sd']:.3f} / {statistics.mean(r['vd']):.3f} ({r['fp']})" + (f" t={fmt_t(t)}" if t is not None else "") for _, t, r in rows)
    print(f"| {label} | {per} | {statistics.mean(sds):.3f} ± {statistics.stdev(sds):.3f} | {allsd:.3f} | {statistics.mean(vd):.3f} ± {statistics.stdev(vd):.3f} | {fp} of {neg} |")

if __name__ == "__main__":
    vols = load(sys.argv[1])
    tol = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
    folds = sorted(set(v["fold"] for v in vols))
    print("| variant | fold 0 | fold 1 | fold 2 | fold 3 | fold 4 | pooled slice Dice, mean ± sd over folds | all 51 pooled | volume Dice | FP volumes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = [(k, None, score([v for v in vols if v["fold"] == k], ALL, ALL)) for k in folds]
    summarize("default (no gate)", base)
    for name, fam in FAMILIES.items():
        summarize(name + " (nested)", nested(vols, fam, tol))
