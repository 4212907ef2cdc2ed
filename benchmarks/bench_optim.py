"""Step time of AGVM-SGD / AGVM-AdamW against torch's own SGD / AdamW (foreach), as ratios.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--reps 20] [--sets resnet50,100m]

Two parameter sets: ResNet-50's shapes (25.6M, split into backbone / neck / head modules as a detector
would be) and ~100M parameters (8 transformer blocks of width 1024). For each optimizer it prints the
median time of torch's step, AGVM's plain step and AGVM's measurement step (halves given), and the
ratios to torch's step. Targets: plain <= 1.05x, measurement <= 2x. The timings alternate between the
contenders within each repetition so that machine load drifts affect them alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import agvm  # noqa: E402


def resnet50_shapes():
    shapes = [("backbone", (64, 3, 7, 7)), ("backbone", (64,)), ("backbone", (64,))]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            cin = inplanes if b == 0 else planes * 4
            for shape in ((planes, cin, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)):
                shapes += [("backbone", shape), ("backbone", (shape[0],)), ("backbone", (shape[0],))]
            if b == 0:
                shapes += [("backbone", (planes * 4, cin, 1, 1)), ("backbone", (planes * 4,)), ("backbone", (planes * 4,))]
        inplanes = planes * 4
    # relabel the last stage as "neck" and the classifier as "head", as a detector has three modules
    n_last = 3 * 3 * 3 * 3 + 3
    shapes = shapes[: len(shapes) - n_last] + [("neck", s) for _, s in shapes[len(shapes) - n_last:]]
    shapes += [("head", (1000, 2048)), ("head", (1000,))]
    return shapes


def transformer_shapes(blocks=8, width=1024):
    shapes = []
    for i in range(blocks):
        module = "backbone" if i < 5 else ("neck" if i < 7 else "head")
        for shape in ((3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,),
                      (width, 4 * width), (width,), (width,), (width,), (width,), (width,)):
            shapes.append((module, shape))
    return shapes


def make_groups(shapes, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    groups = {}
    for module, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device) * 0.02)
        p.grad = torch.randn(shape, generator=g).to(device) * 1e-3
        groups.setdefault(module, []).append(p)
    return [{"params": ps, "module": m} for m, ps in groups.items()]


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench(name, shapes, device, reps):
    nparams = sum(torch.Size(s).numel() for _, s in shapes)
    print(f"\n{name}: {nparams / 1e6:.1f}M parameters in {len(shapes)} tensors, device {device}")
    print(f"{'optimizer':<12}{'torch ms':>10}{'plain ms':>10}{'measure ms':>12}{'plain x':>9}{'measure x':>11}")
    results = {}
    for label, cls, ref_cls, kw in (
        ("SGD", agvm.AGVMSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)),
        ("AdamW", agvm.AGVMAdamW, torch.optim.AdamW, dict(lr=1e-4, weight_decay=0.05)),
    ):
        ref_groups = make_groups(shapes, device)
        ref = ref_cls([{"params": g["params"]} for g in ref_groups], foreach=True, **kw)
        # interval 2: steps alternate plain / measurement, so each repetition times one of each
        opt = cls(make_groups(shapes, device), foreach=True, interval=2, **kw)
        params = opt.params_in_order()
        halves = ([p.grad * 1.1 for p in params], [p.grad * 0.9 + 1e-4 for p in params])
        for _ in range(4):  # warm-up and lazy state; leaves t even, so the next step is plain
            ref.step()
            opt.step(halves=halves if opt.should_measure() else None)
        t_ref, t_plain, t_meas = [], [], []
        for _ in range(reps):
            assert not opt.should_measure()
            t_ref.append(timed(ref.step, device))
            t_plain.append(timed(opt.step, device))
            t_ref.append(timed(ref.step, device))
            t_meas.append(timed(lambda: opt.step(halves=halves), device))
        r, p, m = (statistics.median(x) * 1e3 for x in (t_ref, t_plain, t_meas))
        results[label] = (p / r, m / r)
        print(f"{label:<12}{r:>10.2f}{p:>10.2f}{m:>12.2f}{p / r:>9.3f}{m / r:>11.3f}")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sets", default="resnet50,100m")
    args = ap.parse_args()
    sets = {"resnet50": ("ResNet-50", resnet50_shapes()), "100m": ("~100M (8 x width-1024 blocks)", transformer_shapes())}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; targets: plain <= 1.05x, measurement <= 2x")
    for key in args.sets.split(","):
        bench(*sets[key], args.device, args.reps)


if __name__ == "__main__":
    main()
