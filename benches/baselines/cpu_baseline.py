#!/usr/bin/env python3
"""CPU baseline for ichcam's engine (issue 13): PyTorch eager, PyTorch channels_last and
ONNX Runtime on exactly the workloads of `ichcam bench --device cpu`, with ichcam itself
run beside them in the same session, each in its own process (so peak RSS is per tool and
workload), round-robin over several rounds, best of the rounds.

The topology and sizes come from ichcam: `ichcam bench --describe` prints the model config
(the PyTorch-fixture JSON format) and the shapes of each workload, so a change of a preset
moves the baseline with it.

- train-step: ResNet (per slice) -> GAP -> LSTM (batch_first) -> head Linear/ReLU.. -> 1,
  training-mode BN, BCE-with-logits, backward, SGD lr 1e-3 momentum 0.9 (PyTorch's
  zero_grad(set_to_none=True) + backward + step).
- cam: eval-mode ResNet -> GAP -> fc logits, vanilla CAM (fc-weighted channel sum), bilinear
  upsample to the input (align_corners=False), per-slice min-max, under no_grad.

Threads: 2 everywhere (torch.set_num_threads, ORT intra_op_num_threads, RAYON_NUM_THREADS;
ICHCAM_BASELINE_THREADS=N changes it). A second table gives each tool's CPU time per
iteration (all its threads), which other processes on a shared machine inflate far less
than wall time.
Peak memory: ru_maxrss of each worker process (os.wait4); for Python workers also the peak
above the RSS right after the imports (the libraries' own footprint taken out).

    python cpu_baseline.py --ichcam target/release/ichcam [--rounds 3] [--iters 7]
        [--workloads small:train-step,small:cam,tiny:train-step,tiny:cam] [--json FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import time

THREADS = int(os.environ.get("ICHCAM_BASELINE_THREADS", "2"))


# ---------------------------------------------------------------------------- workers
def worker(args):
    """Runs one (tool, workload) in this process and prints one JSON line."""
    import resource

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    d = json.loads(args.describe)
    cfg = d["model"]
    torch.manual_seed(0)

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, w, stride, eps, mom):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, w, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(w, eps=eps, momentum=mom)
            self.conv2 = nn.Conv2d(w, w, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(w, eps=eps, momentum=mom)
            self.down = None
            if stride != 1 or cin != w:
                self.down = nn.Sequential(nn.Conv2d(cin, w, 1, stride, bias=False),
                                          nn.BatchNorm2d(w, eps=eps, momentum=mom))

        def forward(self, x):
            o = F.relu(self.bn1(self.conv1(x)))
            o = self.bn2(self.conv2(o))
            s = x if self.down is None else self.down(x)
            return F.relu(o + s)

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, cin, w, stride, eps, mom):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, w, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(w, eps=eps, momentum=mom)
            self.conv2 = nn.Conv2d(w, w, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(w, eps=eps, momentum=mom)
            self.conv3 = nn.Conv2d(w, 4 * w, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(4 * w, eps=eps, momentum=mom)
            self.down = None
            if stride != 1 or cin != 4 * w:
                self.down = nn.Sequential(nn.Conv2d(cin, 4 * w, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * w, eps=eps, momentum=mom))

        def forward(self, x):
            o = F.relu(self.bn1(self.conv1(x)))
            o = F.relu(self.bn2(self.conv2(o)))
            o = self.bn3(self.conv3(o))
            s = x if self.down is None else self.down(x)
            return F.relu(o + s)

    class Backbone(nn.Module):
        """torchvision's ResNet (v1.5) with any number of stages; returns the last maps."""

        def __init__(self):
            super().__init__()
            eps, mom = cfg["bn_eps"], cfg["bn_momentum"]
            base = cfg["base_width"]
            blk = Basic if cfg["block"] == "basic" else Bottle
            self.stem = nn.Sequential(
                nn.Conv2d(cfg.get("in_channels", 3), base, 7, 2, 3, bias=False),
                nn.BatchNorm2d(base, eps=eps, momentum=mom), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1))
            layers, cin = [], base
            for i, n in enumerate(cfg["layers"]):
                w = base << i
                for j in range(n):
                    layers.append(blk(cin, w, 2 if (j == 0 and i > 0) else 1, eps, mom))
                    cin = w * blk.expansion
            self.layers = nn.Sequential(*layers)
            self.out_c = cin

        def forward(self, x):
            return self.layers(self.stem(x))

    class Stage1(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            hid = cfg["lstm_hidden"]
            self.lstm = nn.LSTM(self.backbone.out_c, hid, num_layers=cfg["lstm_layers"],
                                batch_first=True)
            head, k = [], hid
            widths = cfg["head"]  # ends with the output width 1
            for i, n in enumerate(widths):
                head.append(nn.Linear(k, n))
                if i + 1 < len(widths):
                    head.append(nn.ReLU())
                k = n
            self.head = nn.Sequential(*head)

        def forward(self, x, b, s):
            f = self.backbone(x).mean((2, 3)).view(b, s, -1)
            h, _ = self.lstm(f)
            return self.head(h).reshape(-1)

    class Stage2(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.fc = nn.Linear(self.backbone.out_c, 1)

        def forward(self, x):
            f = self.backbone(x)
            logits = self.fc(f.mean((2, 3)))[:, 0]
            cam = torch.einsum("nchw,c->nhw", f, self.fc.weight[0])
            up = F.interpolate(cam[:, None], size=(x.shape[-2], x.shape[-1]),
                               mode="bilinear", align_corners=False)[:, 0]
            lo = up.amin((1, 2), keepdim=True)
            hi = up.amax((1, 2), keepdim=True)
            rng = hi - lo
            norm = torch.where(rng > 0, (up - lo) / rng.clamp_min(1e-30), torch.zeros_like(up))
            return logits, norm

    size = d["size"]
    cin = cfg.get("in_channels", 3)
    g = torch.Generator().manual_seed(1)
    times = []
    if args.what == "train-step":
        b, s = d["batch"], d["slices"]
        m = Stage1()
        x = torch.rand(b * s, cin, size, size, generator=g)
        y = torch.tensor([float((i // 3) % 2) for i in range(b * s)])
        if args.tool == "torch-cl":
            m = m.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        lossf = nn.BCEWithLogitsLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = lossf(m(x, b, s), y)
            loss.backward()
            opt.step()
    elif args.what == "cam":
        n = d["cam_slices"]
        m = Stage2().eval()
        x = torch.rand(n, cin, size, size, generator=g)
        if args.tool == "ort":
            import onnxruntime as ort
            import tempfile

            path = os.path.join(tempfile.mkdtemp(prefix="ichcam-ort-"), "stage2.onnx")
            with torch.no_grad():
                try:
                    torch.onnx.export(m, (x,), path, input_names=["x"],
                                      output_names=["logits", "cam"], opset_version=17,
                                      dynamo=False)
                except Exception:  # exporter without the TorchScript path: use dynamo
                    torch.onnx.export(m, (x,), path, input_names=["x"],
                                      output_names=["logits", "cam"], dynamo=True)
            so = ort.SessionOptions()
            so.intra_op_num_threads = THREADS
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            xn = x.numpy()
            # Check the export against eager once (a wrong graph would time nothing useful).
            with torch.no_grad():
                ref = m(x)[1].numpy()
            got = sess.run(None, {"x": xn})[1]
            err = float(abs(got - ref).max())
            if err > 1e-3:
                raise SystemExit(f"ORT export differs from eager by {err}")

            def step():
                sess.run(None, {"x": xn})
        else:
            if args.tool == "torch-cl":
                m = m.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)

            @torch.no_grad()
            def step():
                m(x)
    else:
        raise SystemExit(f"unknown workload {args.what}")
    for _ in range(args.warmup):
        step()
    cpu0 = time.process_time()
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / max(args.iters, 1)
    times.sort()
    print(json.dumps({"min_ms": times[0], "median_ms": times[len(times) // 2], "cpu_ms": cpu_ms,
                      "rss_after_import_kib": rss_after_import,
                      "torch": torch.__version__}), flush=True)


# ---------------------------------------------------------------------------- driver
def measure(cmd, env):
    """Runs cmd and returns (rc, stdout, stderr, max RSS KiB of that child)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # Read everything first (the pipes must not fill), then reap with wait4 for its rusage.
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out.decode(), err.decode(), ru.ru_maxrss


def describe(ichcam, config, what, overrides):
    cmd = [ichcam, "bench", "--device", "cpu", "--config", config, "--what", what,
           "--describe"] + overrides
    return json.loads(subprocess.check_output(cmd, text=True).strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--tool")
    ap.add_argument("--what")
    ap.add_argument("--describe")
    ap.add_argument("--ichcam", default="target/release/ichcam")
    ap.add_argument("--ichcam-before", default=None,
                    help="an older ichcam binary, timed beside the others as `ichcam-before`")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads",
                    default="small:train-step,small:cam,tiny:train-step,tiny:cam")
    ap.add_argument("--tools", default="ichcam,torch,torch-cl,ort")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return 0

    env = dict(os.environ)
    env.update(RAYON_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS))
    # The workloads: small train-step at batch 1 x 8 slices of 128^2, small CAM
    # 8 slices at the preset's 256^2; the default CPU preset at its own shapes.
    overrides = {
        ("small", "train-step"): ["--batch", "1", "--slices", "8", "--size", "128"],
        ("small", "cam"): ["--slices", "8"],
    }
    tools = a.tools.split(",")
    if a.ichcam_before:
        tools.append("ichcam-before")
    work = []
    for wl in a.workloads.split(","):
        config, what = wl.split(":")
        ov = overrides.get((config, what), [])
        d = describe(a.ichcam, config, what, ov)
        work.append((config, what, ov, d))
    results = {}
    for r in range(a.rounds):
        for config, what, ov, d in work:
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for tool in order:
                if tool == "ort" and what != "cam":
                    continue
                # An older binary's presets other than `small` may have other shapes.
                if tool == "ichcam-before" and config != "small":
                    continue
                if tool in ("ichcam", "ichcam-before"):
                    exe = a.ichcam if tool == "ichcam" else a.ichcam_before
                    cmd = [exe, "bench", "--device", "cpu", "--config", config, "--what",
                           what, "--iters", str(a.iters), "--warmup", str(a.warmup),
                           "--json"] + ov
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tool",
                           tool, "--what", what, "--describe", json.dumps(d), "--iters",
                           str(a.iters), "--warmup", str(a.warmup)]
                rc, out, err, rss = measure(cmd, env)
                key = (config, what, tool)
                rec = results.setdefault(key, {"min_ms": [], "median_ms": [], "rss_kib": [],
                                               "rss_work_kib": [], "cpu_ms": []})
                if rc != 0:
                    rec["error"] = (err or out).strip().splitlines()[-1:] or ["failed"]
                    print(f"# {config} {what} {tool}: FAILED {rec['error']}", file=sys.stderr)
                    continue
                j = json.loads(out.strip().splitlines()[-1])
                rec["min_ms"].append(j["min_ms"])
                rec["median_ms"].append(j["median_ms"])
                if j.get("cpu_ms") is not None:
                    rec["cpu_ms"].append(j["cpu_ms"])
                rec["rss_kib"].append(rss)
                rec["rss_work_kib"].append(rss - j.get("rss_after_import_kib", 0))
                if "torch" in j:
                    rec["torch"] = j["torch"]
                print(f"# round {r + 1} {config} {what} {tool}: min {j['min_ms']:.1f} ms, "
                      f"median {j['median_ms']:.1f} ms, peak RSS {rss / 1024:.0f} MiB",
                      file=sys.stderr, flush=True)

    def best(config, what, tool):
        rec = results.get((config, what, tool))
        if not rec or not rec["min_ms"]:
            return None
        return rec

    try:
        import onnxruntime
        import torch
        versions = f"PyTorch {torch.__version__}, ONNX Runtime {onnxruntime.__version__}"
    except Exception:
        versions = ""
    load = os.getloadavg()
    print(f"\nichcam CPU baseline, {time.strftime('%Y-%m-%d %H:%M %Z')}, {THREADS} threads, "
          f"{versions}, best of {a.rounds} rounds x {a.iters} iterations, "
          f"load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    before = "ichcam-before" in tools
    hdr = ("| workload | shapes | PyTorch eager | PyTorch channels_last | ONNX Runtime | ichcam "
           "| ichcam / PyTorch | ichcam / ORT | peak RSS ichcam | peak RSS PyTorch (above imports) |")
    if before:
        hdr += " ichcam before | before / PyTorch | before / ORT |"
    print(hdr)
    print("|" + " --- |" * (13 if before else 10))
    table = []
    for config, what, ov, d in work:
        cells = {}
        for tool in tools:
            rec = best(config, what, tool)
            cells[tool] = min(rec["min_ms"]) if rec else None
        fmt = lambda v: "-" if v is None else f"{v:.1f} ms"
        torch_best = min([v for v in (cells.get("torch"), cells.get("torch-cl")) if v] or [0]) or None
        ich = cells.get("ichcam")
        r_t = f"{ich / torch_best:.2f}" if ich and torch_best else "-"
        r_o = f"{ich / cells['ort']:.2f}" if ich and cells.get("ort") else "-"
        ri = best(config, what, "ichcam")
        rt = best(config, what, "torch")
        rss_i = f"{max(ri['rss_kib']) / 1024:.0f} MiB" if ri else "-"
        rss_t = (f"{max(rt['rss_kib']) / 1024:.0f} MiB ({max(rt['rss_work_kib']) / 1024:.0f} MiB)"
                 if rt else "-")
        if what == "train-step":
            shapes = f"{d['batch']}x{d['slices']} slices {d['size']}^2"
        else:
            shapes = f"{d['cam_slices']} slices {d['size']}^2"
        print(f"| {config} {what} | {shapes} | {fmt(cells.get('torch'))} | "
              f"{fmt(cells.get('torch-cl'))} | {fmt(cells.get('ort'))} | {fmt(ich)} | {r_t} | "
              f"{r_o} | {rss_i} | {rss_t} |" + (
                  (f" {fmt(cells.get('ichcam-before'))} | "
                   + (f"{cells['ichcam-before'] / torch_best:.2f}"
                      if cells.get("ichcam-before") and torch_best else "-") + " | "
                   + (f"{cells['ichcam-before'] / cells['ort']:.2f}"
                      if cells.get("ichcam-before") and cells.get("ort") else "-") + " |")
                  if before else ""))
        table.append({"config": config, "what": what, "shapes": shapes, "ms": cells,
                      "ichcam_over_best_torch": r_t, "ichcam_over_ort": r_o,
                      "rss_ichcam_kib": ri and max(ri["rss_kib"]),
                      "rss_torch_kib": rt and max(rt["rss_kib"]),
                      "rss_torch_above_imports_kib": rt and max(rt["rss_work_kib"])})
    print("\n(ratios: ichcam's best time over the best PyTorch mode's best time, and over ORT's;"
          " goals: train-step <= 0.67, cam <= 1.0)")
    # CPU time per iteration (all threads of the process): robust to other processes on
    # the machine, which stretch wall time (and stall OpenMP's barriers) far more.
    print("\nCPU time per iteration (all threads, mean of the best round):\n")
    print("| workload | PyTorch eager | PyTorch channels_last | ONNX Runtime | ichcam "
          "| ichcam / PyTorch | ichcam / ORT |")
    print("|" + " --- |" * 7)
    for config, what, ov, d in work:
        c = {}
        for tool in tools:
            rec = best(config, what, tool)
            c[tool] = min(rec["cpu_ms"]) if rec and rec["cpu_ms"] else None
        fmt = lambda v: "-" if v is None else f"{v:.1f} ms"
        tb = min([v for v in (c.get("torch"), c.get("torch-cl")) if v] or [0]) or None
        ich, ort = c.get("ichcam"), c.get("ort")
        r_t = f"{ich / tb:.2f}" if ich and tb else "-"
        r_o = f"{ich / ort:.2f}" if ich and ort else "-"
        print(f"| {config} {what} | {fmt(c.get('torch'))} | {fmt(c.get('torch-cl'))} | "
              f"{fmt(ort)} | {fmt(ich)} | {r_t} | {r_o} |")
        for row in table:
            if row["config"] == config and row["what"] == what:
                row["cpu_ms"] = c
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load": load,
                       "versions": versions, "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
