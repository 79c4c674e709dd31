#!/usr/bin/env python3
"""PyTorch baseline for ichcam's performance anchors (design.md): a stage-1 train step of
ResNet + LSTM (3 layers, hidden 256) + per-slice head (256-128-64-1) and a stage-2 CAM pass
(ResNet features -> fc -> vanilla CAM, bilinear upsample, per-slice min-max), each in eager
fp32 (TF32 allowed, as PyTorch's cuDNN default for convolutions) and eager bf16 autocast
with channels_last. Times with CUDA events after warm-up, reports the median, and prints one
JSON line per (workload, mode). Random inputs, never zeros.

    python3 benches/baselines/torch_baseline.py [--iters 10] [--only r18|r101] [--modes fp32,bf16]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


class Stage1(nn.Module):
    def __init__(self, arch):
        super().__init__()
        r = getattr(torchvision.models, arch)(weights=None)
        feat = r.fc.in_features
        r.fc = nn.Identity()
        self.backbone = r
        self.lstm = nn.LSTM(feat, 256, num_layers=3, batch_first=True)
        self.head = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):  # x [b, s, 3, h, w]
        b, s = x.shape[:2]
        f = self.backbone(x.flatten(0, 1)).view(b, s, -1)
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


def time_ms(fn, warmup, iters):
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


def bench_train(arch, batch, seq, size, mode, warmup, iters):
    dev = "cuda"
    m = Stage1(arch).to(dev)
    x = torch.rand(batch, seq, 3, size, size, device=dev)
    y = (torch.rand(batch, seq, device=dev) < 0.4).float()
    if mode == "bf16":
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
    lossf = nn.BCEWithLogitsLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        if mode == "bf16":
            xx = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view_as(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = lossf(m(xx).float(), y)
        else:
            loss = lossf(m(x), y)
        loss.backward()
        opt.step()

    return time_ms(step, warmup, iters)


def bench_cam(arch, n, size, mode, warmup, iters):
    dev = "cuda"
    m = Stage2(arch).to(dev).eval()
    x = torch.rand(n, 3, size, size, device=dev)
    if mode == "bf16":
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run():
        if mode == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return m(x)
        return m(x)

    return time_ms(run, warmup, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", choices=["r18", "r101"], default=None)
    ap.add_argument("--modes", default="fp32,bf16")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to PyTorch"}))
        return 1
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(0)
    workloads = [
        ("train-step", "r18", lambda mode: bench_train("resnet18", 4, 32, 256, mode, a.warmup, a.iters), 128),
        ("cam", "r18", lambda mode: bench_cam("resnet18", 128, 256, mode, a.warmup, a.iters), 128),
        ("train-step", "r101", lambda mode: bench_train("resnet101", 1, 32, 512, mode, a.warmup, a.iters), 32),
        ("cam", "r101", lambda mode: bench_cam("resnet101", 32, 512, mode, a.warmup, a.iters), 32),
    ]
    rc = 0
    for what, arch, fn, slices in workloads:
        if a.only and a.only != arch:
            continue
        for mode in a.modes.split(","):
            rec = {"what": what, "arch": arch, "config": "small" if arch == "r18" else "paper", "mode": mode, "device": name}
            try:
                med, mn = fn(mode)
                rec.update(median_ms=round(med, 3), min_ms=round(mn, 3), slices_per_s=round(slices / (med / 1e3), 1))
            except Exception as e:  # report and go on: one OOM must not hide the other figures
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                rc = 1
            print(json.dumps(rec), flush=True)
            torch.cuda.empty_cache()
    return rc


if __name__ == "__main__":
    sys.exit(main())
