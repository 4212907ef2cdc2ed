"""Per-iteration time and peak memory of AGVM's one-process step (``AGVMTwoHalves``) on the demo's detector.

    python benchmarks/bench_two_halves.py [--batch 16 8] [--size 64] [--rounds 8] [--tau 10] [--threads 1]
                                          [--no-memory] [--root DIR]

The demo's small Faster R-CNN (``scripts/demo.py``: ResNet-18, 64-channel FPN, 64 RoIs per image, random
init) on synthetic images of ``--size`` px (``agvm.mm.synthetic``), one data batch reused, lr 0 (the weights
stay the same, so every contender does the same work). Contenders, one iteration of each per round in rotating
order (interleaved), median over the rounds after one warm-up round:

    sgd         torch SGD (its default foreach kernels) in mmengine's OptimWrapper, the model's own train_step:
                one full-batch pass
    sgd_fused   the same with torch's fused SGD kernel (what AGVM-SGD uses by default)
    agvm        AGVM-SGD through AGVMTwoHalves off a measurement step: one full-batch pass (the default)
    agvm_2pass  the same with ``two_passes=True``: both halves on every step (what every step cost before)
    agvm_meas   AGVM-SGD on a measurement step: two half-batch passes, half A kept, the statistics

Printed: ms per iteration, ratios to sgd and to sgd_fused, and the amortised ratios at interval tau,
((tau - 1) * agvm + agvm_meas) / (tau * sgd) (and / sgd_fused).
Memory (torch's profiler memory timeline on the CPU, one iteration of each contender), in units of the model's
trainable parameter bytes: the peak of gradient memory (what the profiler classes as gradients: p.grad and the
kept half A), the peak of all memory during the iteration (parameters, momentum, activations, gradients,
temporaries), and that peak minus sgd's.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import agvm._compat  # noqa: E402

agvm._compat.apply()

CONFIG = str(ROOT / "configs/faster_rcnn/faster_rcnn_r50_bs32_agvm_sgd.py")


def build(batch: int, size: int, root: str):
    """(model, one data batch) of the demo's detector."""
    from demo import tiny_model_options
    from mmdet.registry import MODELS
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from agvm.mm.synthetic import ensure
    from agvm.mm.train import load_config

    ensure(root, num_train=max(16, batch), num_val=2, image_size=size)
    options = {"dataset": "synthetic", "synthetic_root": root, "synthetic_image_size": size,
               "train_dataloader.batch_size": batch, "train_dataloader.num_workers": 0,
               "train_dataloader.persistent_workers": False, "randomness": dict(seed=0)}
    options.update(tiny_model_options())
    cfg = load_config(CONFIG, options)
    init_default_scope("mmdet")
    MMLogger.get_instance("bench_two_halves", log_level="ERROR")  # mmengine's per-parameter log lines
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    data = next(iter(Runner.build_dataloader(cfg.train_dataloader, seed=0)))
    if len(data["inputs"]) != batch:
        raise RuntimeError(f"the synthetic set at {root} gave a batch of {len(data['inputs'])}, not {batch}: "
                           "delete it or pass another --root")
    return model, data


def contenders(model, tau: int):
    from mmengine.optim import build_optim_wrapper

    from agvm.mm import register_all
    from agvm.mm.optim import AGVMTwoHalves

    register_all()
    sgd = dict(lr=0.0, momentum=0.9, weight_decay=1e-4)
    plain = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="SGD", **sgd)))
    fused = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="SGD", fused=True, **sgd)))

    def agvm_wrapper(two_passes):
        return build_optim_wrapper(model, dict(constructor="AGVMOptimWrapperConstructor", type="AGVMOptimWrapper",
                                               optimizer=dict(type="AGVMSGD", interval=tau, **sgd),
                                               two_passes=two_passes))

    one, two = agvm_wrapper(False), agvm_wrapper(True)
    wrapped = AGVMTwoHalves(model)

    def agvm_step(ow, t):
        def step(data):
            ow.optimizer.t = t  # the next step is t + 1: a measurement step iff t + 1 == tau
            wrapped.train_step(data, ow)
            assert ow.optimizer.t == t + 1
        return step

    return {"sgd": lambda data: model.train_step(data, plain), "sgd_fused": lambda data: model.train_step(data, fused),
            "agvm": agvm_step(one, 0),
            "agvm_2pass": agvm_step(two, 0), "agvm_meas": agvm_step(one, tau - 1)}


def time_rounds(steps, data, rounds: int):
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            d = copy.deepcopy(data)
            t0 = time.perf_counter()
            steps[n](d)
            if r:  # round 0 warms up
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def memory(step, data, model_bytes: int):
    """(peak gradient memory, peak total memory) of one ``step(data)``, in model sizes."""
    from torch.profiler import ProfilerActivity, _memory_profiler, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(copy.deepcopy(data))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    column = {c: i + 1 for i, c in enumerate(_memory_profiler._CATEGORY_TO_INDEX)}  # column 0: not a category
    grads = max(s[column[_memory_profiler.Category.GRADIENT]] for s in sizes)
    return grads / model_bytes, max(sum(s) for s in sizes) / model_bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[16, 8])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--tau", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--root", default=str(ROOT / "work_dirs/bench_two_halves/synthetic"))
    args = p.parse_args(argv)
    if args.tau < 2 or min(args.batch) < 2:
        p.error("--tau and every --batch must be >= 2")
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"{args.threads} torch thread(s), torch {torch.__version__}; {args.rounds} rounds, tau {args.tau}")
    for batch in args.batch:
        model, data = build(batch, args.size, args.root)
        steps = contenders(model, args.tau)
        med = time_rounds(steps, data, args.rounds)
        base, fast = med["sgd"], med["sgd_fused"]
        amortised = ((args.tau - 1) * med["agvm"] + med["agvm_meas"]) / args.tau
        print(f"\nbatch {batch}, {args.size} px: ms per iteration (median), ratio to sgd, ratio to sgd_fused")
        for name, sec in med.items():
            print(f"  {name:11s} {sec * 1e3:8.1f} ms  {sec / base:6.3f}x  {sec / fast:6.3f}x")
        print(f"  amortised at tau={args.tau}: {amortised / base:.3f}x sgd, {amortised / fast:.3f}x sgd_fused")
        if not args.no_memory:
            model_bytes = sum(q.numel() * q.element_size() for q in model.parameters() if q.requires_grad)
            print(f"  memory in model sizes ({model_bytes / 2**20:.1f} MiB of trainable parameters): "
                  "peak gradients, peak total, peak total - sgd's")
            peaks = {name: memory(step, data, model_bytes) for name, step in steps.items()}
            for name, (grad, total) in peaks.items():
                print(f"  {name:11s} {grad:6.2f}x  {total:6.2f}x  {total - peaks['sgd'][1]:+6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
