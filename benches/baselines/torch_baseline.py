#!/usr/bin/env python3
"""PyTorch baseline for the six workloads of issue 14 (what `ichcam bench` times):

    train-r101   stage-1 train step, ResNet-101 + LSTM 3x256 + head, 1x32 slices 512^2
    cam-r101     stage-2 CAM pass, ResNet-101, 32 slices 512^2
    train-r18    stage-1 train step, ResNet-18 + LSTM 3x256 + head, 4x32 slices 256^2
    cam-r18      stage-2 CAM pass, ResNet-18, 128 slices 256^2
    latency-r18  the CAM pass on one slice 256^2
    ccl-2pct     3-D connected components (26-conn.) 40x512x512 at 2 % (cupyx, if installed)
    ccl-30pct    the same, 512^3 at 30 %

Modes (each workload in each mode asked for): `fp32` (eager, TF32 allowed as cuDNN's
default), `bf16` (eager, channels_last, bf16 autocast), `graph` (bf16 channels_last, the
step or pass captured once with torch.cuda.graph and replayed), `compile` (bf16
channels_last, torch.compile's default mode). The CAM pass is features -> fc -> vanilla
CAM -> bilinear upsample -> per-slice min-max, as ichcam's. Times with CUDA events after
warm-up; median and min in ms and the peak of torch.cuda.max_memory_allocated, one JSON line
per (workload, mode). Random inputs, never zeros. A workload that fails (OOM, a compile
error) prints its error and the next one runs. `--budget-s` skips what would start after it.

    python3 benches/baselines/torch_baseline.py [--iters 10] [--warmup 3]
        [--workloads train-r101,cam-r101,...] [--modes fp32,bf16,graph,compile] [--budget-s 240]
    python3 benches/baselines/torch_baseline.py --dry-run   # parse, list, import nothing
"""
import argparse
import json
import statistics
import sys
import time

WORKLOADS = {
    # name: (kind, arch, batch or n, seq, size, slices per iteration)
    "train-r101": ("train", "resnet101", 1, 32, 512, 32),
    "cam-r101": ("cam", "resnet101", 32, 0, 512, 32),
    "train-r18": ("train", "resnet18", 4, 32, 256, 128),
    "cam-r18": ("cam", "resnet18", 128, 0, 256, 128),
    "latency-r18": ("cam", "resnet18", 1, 0, 256, 1),
    "ccl-2pct": ("ccl", None, (40, 512, 512), 0.02, 0, 40),
    "ccl-30pct": ("ccl", None, (512, 512, 512), 0.30, 0, 512),
}
MODES = ["fp32", "bf16", "graph", "compile"]


def build_models(torch, nn, F, torchvision):
    class Stage1(nn.Module):
        def __init__(self, arch):
            super().__init__()
            r = getattr(torchvision.models, arch)(weights=None)
            feat = r.fc.in_features
            r.fc = nn.Identity()
            self.backbone = r
            self.lstm = nn.LSTM(feat, 256, num_layers=3, batch_first=True)
            self.head = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

        def forward(self, x):  # x [b*s, 3, h, w]
            f = self.backbone(x).view(self.b, self.s, -1)
            h, _ = self.lstm(f)
            return self.head(h).squeeze(-1)

    class Stage2(nn.Module):
        def __init__(self, arch):
            super().__init__()
            r = getattr(torchvision.models, arch)(weights=None)
            self.features = nn.Sequential(*list(r.children())[:-2])
            self.fc = nn.Linear(r.fc.in_features, 1)

        def forward(self, x):  # x [n, 3, h, w]
            f = self.features(x)
            logits = self.fc(f.mean((2, 3)))
            cam = torch.einsum("nchw,c->nhw", f, self.fc.weight[0].to(f.dtype))
            up = F.interpolate(cam[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            lo = up.amin((1, 2), keepdim=True)
            hi = up.amax((1, 2), keepdim=True)
            norm = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(up))
            return logits, norm

    return Stage1, Stage2


def time_ms(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out), min(out)


def as_graph(torch, fn, warmup):
    """fn captured once (after warm-up on a side stream, as PyTorch's docs do) -> replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(max(warmup, 3)):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_train(mods, arch, batch, seq, size, mode, warmup, iters):
    torch, nn = mods["torch"], mods["nn"]
    Stage1 = mods["Stage1"]
    m = Stage1(arch).cuda()
    m.b, m.s = batch, seq
    x = torch.rand(batch * seq, 3, size, size, device="cuda")
    y = (torch.rand(batch, seq, device="cuda") < 0.4).float()
    low = mode != "fp32"
    if low:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    lossf = nn.BCEWithLogitsLoss()
    fwd = torch.compile(m) if mode == "compile" else m

    # Inside a captured graph autocast's weight cache must be off (PyTorch's graph notes).
    cache = mode != "graph"

    def step():
        opt.zero_grad(set_to_none=False)
        if low:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
                loss = lossf(fwd(x).float(), y)
        else:
            loss = lossf(fwd(x), y)
        loss.backward()
        opt.step()

    fn = as_graph(torch, step, warmup) if mode == "graph" else step
    return time_ms(torch, fn, warmup, iters)


def bench_cam(mods, arch, n, size, mode, warmup, iters):
    torch = mods["torch"]
    m = mods["Stage2"](arch).cuda().eval()
    x = torch.rand(n, 3, size, size, device="cuda")
    low = mode != "fp32"
    if low:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = torch.compile(m) if mode == "compile" else m

    cache = mode != "graph"

    @torch.no_grad()
    def run():
        if low:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache):
                return fwd(x)
        return fwd(x)

    fn = as_graph(torch, run, warmup) if mode == "graph" else run
    return time_ms(torch, fn, warmup, iters)


def bench_ccl(mods, dims, fill, warmup, iters):
    import cupy
    import cupyx.scipy.ndimage as ndi

    rng = cupy.random.default_rng(1)
    mask = rng.random(dims, dtype=cupy.float32) < fill
    st = cupy.ones((3, 3, 3), dtype=bool)  # 26-connectivity
    torch = mods["torch"]

    def run():
        ndi.label(mask, structure=st)

    for _ in range(warmup):
        run()
    cupy.cuda.Device().synchronize()
    out = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        run()
        b.record()
        b.synchronize()
        out.append(cupy.cuda.get_elapsed_time(a, b))
    del torch
    return statistics.median(out), min(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default="fp32,bf16,graph,compile")
    ap.add_argument("--budget-s", type=float, default=0.0, help="skip what would start after this many seconds (0: none)")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, list the runs, import nothing")
    a = ap.parse_args()
    wl = [w for w in a.workloads.split(",") if w]
    modes = [m for m in a.modes.split(",") if m]
    bad = [w for w in wl if w not in WORKLOADS] + [m for m in modes if m not in MODES]
    if bad:
        ap.error("unknown workload or mode: " + ", ".join(bad))
    runs = []
    for w in wl:
        kind = WORKLOADS[w][0]
        for mode in (["cupyx"] if kind == "ccl" else modes):
            if (w, mode) not in runs:
                runs.append((w, mode))
    if a.dry_run:
        for w, mode in runs:
            print(json.dumps({"workload": w, "mode": mode, "dry_run": True}))
        return 0

    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision

    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to PyTorch"}))
        return 1
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    Stage1, Stage2 = build_models(torch, nn, F, torchvision)
    mods = {"torch": torch, "nn": nn, "Stage1": Stage1, "Stage2": Stage2}
    name = torch.cuda.get_device_name(0)
    t0 = time.time()
    rc = 0
    for w, mode in runs:
        kind, arch, b, s, size, slices = WORKLOADS[w]
        rec = {"workload": w, "what": kind, "arch": arch, "mode": mode, "device": name, "torch": torch.__version__}
        if a.budget_s and time.time() - t0 > a.budget_s:
            rec["error"] = "skipped: over --budget-s"
            print(json.dumps(rec), flush=True)
            continue
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t1 = time.time()
        try:
            if kind == "train":
                med, mn = bench_train(mods, arch, b, s, size, mode, a.warmup, a.iters)
            elif kind == "cam":
                med, mn = bench_cam(mods, arch, b, size, mode, a.warmup, a.iters)
            else:
                med, mn = bench_ccl(mods, b, s, a.warmup, a.iters)
            rec.update(
                median_ms=round(med, 3),
                min_ms=round(mn, 3),
                slices_per_s=round(slices / (med / 1e3), 1),
                peak_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
            )
        except Exception as e:  # report and go on: one OOM must not hide the other figures
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
            rc = 1
        rec["wall_s"] = round(time.time() - t1, 1)
        print(json.dumps(rec), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
