"""Step time of AGVM-SGD / AGVM-AdamW against torch's own SGD / AdamW, fused and foreach, as ratios.

    python benchmarks/bench_optim.py [--sizes 10m,100m[,300m]] [--reps 9] [--optimizers sgd,adamw] [--threads N]
                                     [--compile]

Parameter sets: a detector of realistic shapes in 4 modules (a Swin-like backbone, an FPN neck, an RPN head,
a two-fc RoI head; hundreds of tensors) at about 10M, 100M and 300M parameters. For each optimizer it
times torch's step with ``foreach=True`` and with ``fused=True``, AGVM's plain step (its default, fused
kernels), and AGVM's measurement step with ``halves=(ga, gb)`` and with ``halves=(ga, None)``; a second
torch fused optimizer with its own state shows how much two identical steps differ on the machine;
``--compile`` adds the measurement steps with the opt-in compiled statistics. Every
repetition runs all contenders once, in a rotated order, so machine-load drifts hit them alike; the
medians and their ratios are printed. Targets (issue 10): plain <= 1.02x fused; measurement <= 1.5x (SGD)
/ 2x (AdamW) fused. Memory: parameters and gradients are shared by the contenders (torch's foreach and
fused steps are one optimizer with its flag switched); about 7 (SGD) / 10 (AdamW) floats per parameter,
8.8 / 12.5 GB at 300M (not in the default sizes: ``--sizes 300m``; check ``free -g`` first).
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

# (backbone width C, stage depths, neck channels, RoI fc width): Swin-like stages of width C, 2C, 4C, 8C
SIZES = {"10m": (56, (2, 2, 6, 2), 64, 256), "100m": (128, (2, 2, 18, 2), 256, 1024),
         "300m": (232, (2, 2, 18, 2), 384, 1024)}


def detector_shapes(c, depths, cn, fc):
    """(module, shape) of every tensor of a Swin-FPN Faster R-CNN-like detector."""
    s = [("backbone", (c, 3, 4, 4)), ("backbone", (c,)), ("backbone", (c,)), ("backbone", (c,))]
    for i, depth in enumerate(depths):
        w, heads = c * 2 ** i, 3 * 2 ** i
        for _ in range(depth):
            s += [("backbone", x) for x in ((w,), (w,), (169, heads), (3 * w, w), (3 * w,), (w, w), (w,), (w,), (w,),
                                            (4 * w, w), (4 * w,), (w, 4 * w), (w,))]
        if i < len(depths) - 1:  # patch merging
            s += [("backbone", (4 * w,)), ("backbone", (4 * w,)), ("backbone", (2 * w, 4 * w))]
    for i in range(len(depths)):  # FPN: lateral 1x1 and output 3x3 convs
        s += [("neck", (cn, c * 2 ** i, 1, 1)), ("neck", (cn,)), ("neck", (cn, cn, 3, 3)), ("neck", (cn,))]
    s += [("rpn_head", x) for x in ((cn, cn, 3, 3), (cn,), (3, cn, 1, 1), (3,), (12, cn, 1, 1), (12,))]
    s += [("roi_head", x) for x in ((fc, cn * 49), (fc,), (fc, fc), (fc,), (81, fc), (81,), (320, fc), (320,))]
    return s


def make_params(shapes, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    groups = {}
    for module, shape in shapes:
        p = (torch.randn(shape, generator=g) * 0.02).to(device)
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
        groups.setdefault(module, []).append(p)
    return groups


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def transformer_shapes(blocks, width):
    """(module, shape) of ``blocks`` transformer blocks of width ``width`` (scripts/gpu_check.py's larger sets):
    the first half backbone, then neck, rpn_head and roi_head."""
    shapes = []
    for i in range(blocks):
        rest = i - blocks // 2
        module = "backbone" if rest < 0 else ("neck", "rpn_head", "roi_head")[min(2, rest * 3 // (blocks - blocks // 2))]
        for shape in ((3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,),
                      (width, 4 * width), (width,), (width,), (width,), (width,), (width,)):
            shapes.append((module, shape))
    return shapes


def bench(title, shapes, device, reps, compiled=False, optimizers=("sgd", "adamw")):
    """Times every optimizer on ``shapes``; returns {"SGD": {step: ratio to torch's fused step}, "AdamW": ...}."""
    out = {}
    for name in optimizers:
        med = bench_one(title, shapes, name, device, reps, compiled)
        out[{"sgd": "SGD", "adamw": "AdamW"}[name]] = {
            k.replace("AGVM ", ""): v / med["torch fused"] for k, v in med.items() if k != "torch fused"}
    return out


def bench_one(title, shapes, name, device, reps, compiled):
    groups = make_params(shapes, device)
    params = [p for ps in groups.values() for p in ps]
    n = sum(p.numel() for p in params)
    cls, ref_cls, kw = {"sgd": (agvm.AGVMSGD, torch.optim.SGD, dict(lr=1e-3, momentum=0.9, weight_decay=1e-4)),
                        "adamw": (agvm.AGVMAdamW, torch.optim.AdamW, dict(lr=1e-5, weight_decay=0.05))}[name]
    ref = ref_cls([{"params": ps} for ps in groups.values()], **kw, foreach=True)  # the same groups as AGVM's
    opt = cls([{"params": ps, "module": m} for m, ps in groups.items()], **kw, interval=10 ** 9)
    assert all(g["fused"] for g in opt.param_groups)
    ga = [p.grad * 1.1 for p in params]
    gb = [2 * p.grad - a for p, a in zip(params, ga)]

    def torch_step(fused):
        def step():
            for g in ref.param_groups:
                g["fused"], g["foreach"] = fused, not fused
            ref.step()
        return step

    def agvm_step(halves, compiled=False):
        def step():
            if halves is not None:
                opt.t = opt.interval * 7 - 1  # the next step measures
            agvm.variance.COMPILE_STATS = compiled
            opt.step(halves=halves)
        return step

    # a second torch optimizer with its own state: how much two identical fused steps differ here (memory placement)
    twin = ref_cls([{"params": ps} for ps in groups.values()], **kw, fused=True)
    twin.step()  # its state exists from here on
    # the least any statistics can cost: every operand read once (torch's dot, MKL), then torch's fused update.
    # SGD reads G_a and G_b; AdamW also p.grad and v_{t-1} (its preconditioner, computed before the update).
    pairs = [(a.view(-1), b.view(-1)) for a, b in zip(ga, gb)]
    if name == "adamw":
        pairs += [(p.grad.view(-1), twin.state[p]["exp_avg_sq"].view(-1)) for p in params]

    def floor():
        for a, b in pairs:
            a.dot(b)
        twin.step()

    contenders = {"torch foreach": torch_step(False), "torch fused": torch_step(True), "torch fused (2nd)": twin.step,
                  "fused + operands read": floor,
                  "AGVM plain": agvm_step(None),
                  "AGVM measure (ga, gb)": agvm_step((ga, gb)), "AGVM measure (ga, None)": agvm_step((ga, None))}
    if compiled:  # AGVM_COMPILE_STATS=1: the statistics as one torch.compile'd kernel
        contenders["compiled (ga, gb)"] = agvm_step((ga, gb), True)
        contenders["compiled (ga, None)"] = agvm_step((ga, None), True)
    for fn in contenders.values():  # warm-up: lazy state, allocator
        fn()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(timed(contenders[k], device))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"\n{name.upper()} on {title}: {n / 1e6:.1f}M parameters in {len(params)} tensors ({len(groups)} modules), "
          f"{device}, {reps} repetitions")
    print(f"{'step':<26}{'median ms':>10}{'x fused':>9}{'x foreach':>11}")
    for k, v in med.items():
        print(f"{k:<26}{v:>10.1f}{v / med['torch fused']:>9.3f}{v / med['torch foreach']:>11.3f}")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--sizes", default="10m,100m", help="comma-separated: 10m, 100m, 300m")
    ap.add_argument("--optimizers", default="sgd,adamw")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled statistics (AGVM_COMPILE_STATS=1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; targets: plain <= 1.02x fused, "
          "measurement <= 1.5x (SGD) / 2x (AdamW) fused")
    for size in args.sizes.split(","):
        bench(size, detector_shapes(*SIZES[size]), args.device, args.reps, args.compile, args.optimizers.split(","))


if __name__ == "__main__":
    main()
