"""The GPU paths in one run on a CUDA machine (about 4-8 minutes on one GPU), ending in one table.

    make gpu-check                                   # python scripts/gpu_check.py
    python scripts/gpu_check.py --dry-run            # CPU, tiny sizes, the same code (< 60 s; run by the tests)
    python scripts/gpu_check.py --only detector,htcx --out gpu_check.json

Sections (each one row or more; a failing section prints FAIL with the reason and the others still run):

- optim: ``benchmarks/bench_optim.py``'s ``bench`` at ~100M and ~1B parameters (width-1024 / width-2048
  transformer blocks): AGVM's plain and measurement step over torch's step, as that benchmark reports them.
- detector: Faster R-CNN R50-FPN (configs/faster_rcnn/faster_rcnn_r50_bs256_agvm_sgd.py, random init) at
  1333x800, batch 2 split into the two halves by ``agvm.mm``'s ``AGVMTwoHalves``, through
  ``AGVMAmpOptimWrapper`` (mmengine's AmpOptimWrapper: autocast + GradScaler) with AGVM-SGD measuring every
  step, once in fp16 and once in bf16: one training iteration (finite loss, Phi and mu, t = 1), then one whose
  gradients a hook makes inf (GradScaler skips it: t, mu and the weights must stay).
- htcx: UniNet-G + HTC-X (configs/htc_x/htc_x_uninet_g_coco.py) at 1333x800, bf16, activation checkpointing,
  1 image: ``benchmarks/bench_uninet.py``'s ``bench_htcx``: peak memory, images/s, model FLOPs per second
  (3 x the forward's FLOPs per iteration, from torch's FlopCounterMode) over the bf16 matmul peak measured
  here (square bf16 matmuls).
- ddp: ``benchmarks/bench_ddp.py`` on 2 NCCL ranks (one GPU each) when there are two GPUs, else one line
  saying it was skipped.

``--dry-run`` runs every section on the CPU at tiny sizes (100k-parameter optimizer sets, 96x64 images,
Faster R-CNN with ResNet-18 and few proposals, the tiny UniNet + HTC-X, DDP on 2 gloo ranks). mmengine's AmpOptimWrapper refuses
to be built without an accelerator, so the dry run lets it and gives it torch's CPU GradScaler (as
tests/mm/test_optim_wrapper.py does); mmengine's CPU autocast takes bf16 only, so the dry run's fp16 row
autocasts to bf16. Exit status 1 when any check failed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTIONS = ("optim", "detector", "htcx", "ddp")
DETECTOR_CONFIG = ROOT / "configs" / "faster_rcnn" / "faster_rcnn_r50_bs256_agvm_sgd.py"


def _ratios(value: Any) -> str:
    """bench_optim's result for one optimizer: (plain, measurement) over torch's step, or a dict of ratios."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_ratios(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"plain {value[0]:.3f}x, measurement {value[1]:.3f}x"
    if isinstance(value, (tuple, list)):
        return " / ".join(_ratios(v) for v in value)
    return f"{value:.3f}x" if isinstance(value, float) else str(value)


def check_optim(device: torch.device, dry: bool) -> List[Dict[str, Any]]:
    from benchmarks import bench_optim

    sets = ([("~100k (2 x width-64 blocks)", bench_optim.transformer_shapes(2, 64))] if dry else
            [("~100M (8 x width-1024 blocks)", bench_optim.transformer_shapes(8, 1024)),
             ("~1B (20 x width-2048 blocks)", bench_optim.transformer_shapes(20, 2048))])
    rows = []
    for name, shapes in sets:
        res = bench_optim.bench(name, shapes, device.type, 2 if dry else 20)
        for label, value in res.items():
            rows.append(dict(section="optim", what=f"{label} step, {name}", result=_ratios(value) + " of torch's",
                             ok=True, values=value))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


@contextmanager
def _amp_on_cpu(device: torch.device):
    """Dry run: mmengine's AmpOptimWrapper asserts an accelerator at construction; let it build on CPU."""
    if device.type == "cuda":
        yield
        return
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_mod

    saved = amp_mod.is_cuda_available
    amp_mod.is_cuda_available = lambda: True
    try:
        yield
    finally:
        amp_mod.is_cuda_available = saved


def _finite(values) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def check_detector(device: torch.device, dry: bool, dtype: str) -> Dict[str, Any]:
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope

    from agvm.mm import register_all
    from agvm.mm.optim import AGVMAmpOptimWrapper, AGVMTwoHalves

    register_all()
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(DETECTOR_CONFIG))
    cfg.model.backbone.init_cfg = None  # random weights: no download
    if dry:  # the tests' tiny detector: ResNet-18, few proposals (bf16 convolutions are slow on CPUs)
        cfg.merge_from_dict({"model.backbone.depth": 18, "model.neck.in_channels": [64, 128, 256, 512],
                             "model.train_cfg.rpn_proposal.nms_pre": 200, "model.train_cfg.rpn_proposal.max_per_img": 50,
                             "model.train_cfg.rcnn.sampler.num": 32, "model.roi_head.bbox_head.fc_out_channels": 64})
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).to(device).train()
    wrapper_cfg = cfg.optim_wrapper.to_dict()
    # mmengine's CPU autocast takes bf16 only: the dry run's fp16 row autocasts to bf16 (GradScaler as on CUDA)
    wrapper_cfg.update(type="AGVMAmpOptimWrapper", dtype=dtype if device.type == "cuda" else "bfloat16")
    wrapper_cfg["optimizer"] = {**wrapper_cfg["optimizer"], "interval": 1}  # every step measures
    with _amp_on_cpu(device):
        ow = build_optim_wrapper(model, wrapper_cfg)
    if not isinstance(ow, AGVMAmpOptimWrapper):
        raise TypeError(f"expected AGVMAmpOptimWrapper, got {type(ow).__name__}")
    if device.type != "cuda":
        ow.loss_scaler = torch.amp.GradScaler("cpu")
    opt = ow.optimizer
    h, w = (64, 96) if dry else (800, 1333)
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, h, w)] * 2, num_items=[8, 8], num_classes=80,
                          with_mask=False)
    wrapped = AGVMTwoHalves(model).train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    logs = wrapped.train_step(data, ow)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec = time.perf_counter() - t0
    loss = float(logs["loss"].detach())
    t1, mu1, phi1 = opt.t, dict(opt.modulation), dict(opt.variance)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scale = float(ow.loss_scaler.get_scale())
    # an iteration whose gradients are inf: a hook on the first trained parameter poisons its gradient
    param = opt.params_in_order()[0]
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        wrapped.train_step(data, ow)
    finally:
        handle.remove()
    t2, mu2 = opt.t, dict(opt.modulation)
    unchanged = all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    checks = {"finite loss": math.isfinite(loss), "t == 1 after one step": t1 == 1,
              "finite Phi and mu": bool(phi1) and _finite(phi1.values()) and _finite(mu1.values()),
              "skipped step: t, mu, weights unchanged": t2 == t1 and mu2 == mu1 and unchanged,
              "loss scale lowered": float(ow.loss_scaler.get_scale()) < scale}
    failed = [k for k, v in checks.items() if not v]
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    return dict(section="detector", what=f"Faster R-CNN R{cfg.model.backbone.depth} {w}x{h}, {dtype}, two halves",
                result=(f"loss {loss:.3f}, mu {', '.join(f'{k} {v:.3f}' for k, v in mu1.items())}, "
                        f"{sec:.2f} s/it{mem}; skipped step: t {t1} -> {t2}"
                        + ("" if device.type == "cuda" or dtype == "bfloat16" else " (CPU: bf16 autocast)")
                        + (f"; FAILED: {', '.join(failed)}" if failed else "")),
                ok=not failed, values=dict(loss=loss, t_after_step=t1, t_after_skip=t2, mu=mu1, mu_after_skip=mu2,
                                           phi=phi1, weights_unchanged=unchanged, checks=checks))


def matmul_peak(device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of square bf16 matmuls of size n (the best of ``reps`` timed rounds of 4)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 4 * 2 * n ** 3 / min(times[1:])  # the first round warms up


def check_htcx(device: torch.device, dry: bool) -> Dict[str, Any]:
    from benchmarks import bench_uninet

    config = ROOT / "configs" / "htc_x" / ("htc_x_uninet_tiny.py" if dry else "htc_x_uninet_g_coco.py")
    size = (64, 96) if dry else (800, 1333)
    info = bench_uninet.bench_htcx(config, size, 1, device, True, True, 0 if dry else 2, 1 if dry else 5)
    peak = matmul_peak(device, 256 if dry else 8192, 2 if dry else 10)
    flops = info["model_flops_per_iter"] / info["sec_per_iter"]
    mem = f"{info['peak_mem_gib']:.1f} GiB peak" if info["peak_mem_gib"] is not None else "peak memory n/a (CPU)"
    ok = info["images_per_s"] > 0 and info["model_flops_per_iter"] > 0
    return dict(section="htcx", what=f"{info['model']} {size[1]}x{size[0]}, bf16, checkpointing, 1 image",
                result=(f"{mem}, {info['images_per_s']:.2f} img/s, {flops / 1e12:.2f} TFLOP/s model = "
                        f"{flops / peak:.1%} of the measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s"),
                ok=ok, values={**info, "model_flops_per_s": flops, "bf16_matmul_peak_flops": peak})


def check_ddp(device: torch.device, dry: bool) -> Dict[str, Any]:
    from benchmarks import bench_ddp

    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dry:
        backend = "gloo"
    elif n_gpu >= 2 and torch.distributed.is_nccl_available():
        backend = "nccl"
    else:
        return dict(section="ddp", what="DDP hook on NCCL", ok=True, values={},
                    result=f"skipped: {n_gpu} CUDA device(s), it needs 2 (one per rank)")
    args = argparse.Namespace(world=2, steps=2 if dry else 10, warmup=1 if dry else 3, width=64 if dry else 1024,
                              batch=8 if dry else 32, threads=1, collective=False)
    res = bench_ddp.bench(backend, 2, args)
    nparams = sum(p.numel() for p in bench_ddp.make_model(args.width).parameters())
    bench_ddp.report(backend, 2, res, nparams, "NCCL's collectives" if backend == "nccl" else "gloo rings")
    ok = all(v > 0 and math.isfinite(v) for v in res.values())
    parts = [f"{o} measurement {res[f'{o}/agvm_measure'] / res[f'{o}/plain_ddp']:.2f}x, plain "
             f"{res[f'{o}/agvm_plain'] / res[f'{o}/plain_ddp']:.2f}x" for o in ("sgd", "adamw")]
    return dict(section="ddp", what=f"DDP hook, 2 {backend} ranks, {nparams / 1e6:.2f}M-parameter MLP",
                result="step time over plain DDP: " + "; ".join(parts), ok=ok, values=res)


def _table(rows: List[Dict[str, Any]], device_name: str) -> str:
    lines = [f"\nGPU check on {device_name}, torch {torch.__version__}",
             f"{'section':9s} {'status':6s} {'setting':58s} result"]
    for r in rows:
        lines.append(f"{r['section']:9s} {'ok' if r['ok'] else 'FAIL':6s} {r['what']:58s} {r['result']}")
    return "\n".join(lines)


def _run(name: str, fn: Callable[[], Any]) -> List[Dict[str, Any]]:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - one section's failure is a FAIL row; the others still run
        traceback.print_exc()
        out = dict(section=name, what=name, ok=False, result=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}",
                   values={})
    rows = out if isinstance(out, list) else [out]
    print(f"== {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code path")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    only = [s for s in a.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown} in --only; choose from {', '.join(SECTIONS)}")
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --dry-run (CPU, tiny sizes)",
              file=sys.stderr)
        return 2
    import agvm._compat

    agvm._compat.apply()
    device = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:
        torch.set_num_threads(1)
    name = "CPU (dry run)" if a.dry_run else torch.cuda.get_device_name(device)
    checks = {"optim": lambda: check_optim(device, a.dry_run),
              "detector": lambda: [check_detector(device, a.dry_run, d) for d in ("float16", "bfloat16")],
              "htcx": lambda: check_htcx(device, a.dry_run),
              "ddp": lambda: check_ddp(device, a.dry_run)}
    t0 = time.perf_counter()
    rows = [r for s in SECTIONS if s in only for r in _run(s, checks[s])]
    print(_table(rows, name))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if a.out:
        out = Path(a.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=rows), indent=2, default=str))
        tmp.replace(out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
