"""Forward+backward throughput and memory of UniNet (and HTC-X + UniNet when available).

    python benchmarks/bench_uninet.py [--device auto|cpu|cuda] [--model uninet_g] [--size 800x1333]
                                      [--batch 1] [--iters 5] [--warmup 2] [--no-htcx] [--threads N]
                                      [--out FILE.json]

GPU (default when CUDA is available): UniNet-G at 800x1333 (H x W), the detection setting of AGVM A.5.2
(windows 28 / 14, 18 subsets of window, window, global), bf16 autocast, with and without activation
checkpointing; then HTC-X + UniNet-G (configs/htc_x/htc_x_uninet_g_coco.py) if that config and mmdet are
present (skipped with the reason otherwise). CPU: the tiny member at 256x320, fp32.

Per setting it reports images/s (forward + backward, after warm-up), peak memory (CUDA:
torch.cuda.max_memory_allocated; CPU: n/a), the activation memory autograd keeps for backward
("saved", MiB: unique non-parameter tensors seen by saved-tensor hooks; this is what checkpointing cuts,
and it is measured the same way on CPU and GPU) and the model FLOPs of one iteration (3 x the forward's
FLOPs as torch's FlopCounterMode counts them: matmuls, convolutions, attention; ops outside torch's
dispatcher such as mmcv's RoIAlign are not counted; recomputation by checkpointing is not model FLOPs).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.utils.flop_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import agvm._compat  # noqa: E402

agvm._compat.apply()


def _saved_activation_mib(step: Callable[[], torch.Tensor], params: set) -> float:
    """MiB of unique non-parameter tensors that autograd saves for backward during ``step()``."""
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values()) / 2**20


def _time(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench_backbone(name: str, size: tuple, batch: int, device: torch.device, bf16: bool, checkpointing: bool,
                   warmup: int, iters: int, windows: Optional[tuple], subsets: Optional[int]) -> Dict[str, Any]:
    import timm

    import models.uninet  # noqa: F401

    model = timm.create_model(name, features_only=True, out_indices=(2, 4, 5), window_sizes=windows,
                              num_subsets=subsets, grad_checkpointing=checkpointing).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, *size, device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return sum(f.float().mean() for f in model(x))

    return _run(step, model, device, batch, warmup, iters,
                dict(model=name, params=n_params, size=f"{size[0]}x{size[1]}", batch=batch,
                     dtype="bf16" if bf16 else "fp32", checkpointing=checkpointing, windows=windows,
                     subsets=subsets))


def _run(step, model, device, batch, warmup, iters, info) -> Dict[str, Any]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    saved = _saved_activation_mib(step, params)
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        step()
    sec = _time(step, device, warmup, iters)
    info.update(images_per_s=round(batch / sec, 3), sec_per_iter=round(sec, 4), saved_activations_mib=round(saved, 1),
                model_flops_per_iter=3 * counter.get_total_flops(),
                peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return info


def bench_htcx(config: Path, size: tuple, batch: int, device: torch.device, bf16: bool, checkpointing: bool,
               warmup: int, iters: int) -> Dict[str, Any]:
    """HTC-X + UniNet: model.loss on mmdet's demo inputs (random boxes / masks) at ``size``."""
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import models.htc_x.register  # noqa: F401
    import models.mmdet_uninet  # noqa: F401
    from agvm.mm import register_all
    from mmdet.registry import MODELS

    register_all()  # among others: bf16 through mmcv's RoIAlign / nms (agvm/mm/amp.py)
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(config))
    cfg.model.backbone.with_cp = checkpointing
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    with_mask = bool(cfg.get("mask_on", True))
    packed = demo_mm_inputs(batch_size=batch, image_shapes=[(3, *size)] * batch, num_items=[8] * batch,
                            num_classes=cfg.get("num_classes", 80), with_mask=with_mask)
    data = model.data_preprocessor(packed, True)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model.loss(data["inputs"], data["data_samples"])
        loss, _ = model.parse_losses(losses)
        return loss

    return _run(step, model, device, batch, warmup, iters,
                dict(model=f"htc_x+{cfg.model.backbone.arch}", config=str(config.relative_to(ROOT)),
                     params=n_params, size=f"{size[0]}x{size[1]}", batch=batch, dtype="bf16" if bf16 else "fp32",
                     checkpointing=checkpointing))


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None, help="timm name (default: uninet_g on GPU, uninet_tiny on CPU)")
    p.add_argument("--size", default=None, help="HxW (default: 800x1333 on GPU, 256x320 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 1 on GPU, 2 on CPU")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-htcx", action="store_true")
    p.add_argument("--htcx-config", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available() if a.device == "auto" else a.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    name = a.model or ("uninet_g" if cuda else "uninet_tiny")
    size = tuple(int(v) for v in (a.size or ("800x1333" if cuda else "256x320")).lower().split("x"))
    batch = a.batch or (1 if cuda else 2)
    windows, subsets = ((28, 14), 18) if name == "uninet_g" else ((4, 2), 2) if name == "uninet_tiny" else (None, None)
    bf16 = cuda
    rows: List[Dict[str, Any]] = []
    for ckpt in (False, True):
        try:
            rows.append(bench_backbone(name, size, batch, device, bf16, ckpt, a.warmup, a.iters, windows, subsets))
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            rows.append(dict(model=name, checkpointing=ckpt, error=f"out of memory: {str(e).splitlines()[0]}"))
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    if not a.no_htcx:
        cfg = Path(a.htcx_config) if a.htcx_config else ROOT / "configs" / "htc_x" / (
            "htc_x_uninet_g_coco.py" if name == "uninet_g" else "htc_x_uninet_tiny.py")
        for ckpt in (False, True):
            try:
                rows.append(bench_htcx(cfg.resolve(), size, batch, device, bf16, ckpt, a.warmup, a.iters))
            except ImportError as e:
                rows.append(dict(model="htc_x", skipped=f"not available: {e}"))
            except FileNotFoundError as e:
                rows.append(dict(model="htc_x", skipped=f"config missing: {e}"))
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                rows.append(dict(model="htc_x", checkpointing=ckpt, error=f"out of memory: {str(e).splitlines()[0]}"))
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
            if "skipped" in rows[-1]:
                break
    if a.out:
        out = Path(a.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(out)
    return rows


if __name__ == "__main__":
    main()
