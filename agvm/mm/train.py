"""The one training entry point of the OpenMMLab pipelines: ``train(config, work_dir, ...)``.

    python -m agvm.mm.train configs/faster_rcnn/faster_rcnn_r50_bs32_agvm_sgd.py --work-dir work_dirs/x \
        [--cfg-options dataset=synthetic train_cfg.max_epochs=1 ...] [--no-resume] [--launcher pytorch]
        [--unsafe-load] [--allow-config-change]

Trains with mmengine's Runner (``AGVMRunner``: atomic checkpoints), evaluates with the config's
metric, writes ``<work_dir>/metrics.json`` (the final metrics as a flat ``{name: value}`` dict,
atomically) and returns the same dict. With ``resume=True`` it continues from the newest complete
checkpoint in ``work_dir`` that verifies (``agvm.mm.checkpoint``), bit-identically (generator states, mid-epoch
position), and refuses a changed config unless ``--allow-config-change``. ``dataset=synthetic`` (an override)
trains on the generated data (``agvm.mm.synthetic``; written to ``$AGVM_SYNTHETIC_ROOT`` or ``data/synthetic``
when missing).
The main rank holds ``work_dir``'s lock for the whole call (one run per work dir); a run whose loss turns
NaN / Inf raises ``agvm.mm.hooks.TrainingDiverged`` after writing ``metrics.json`` with ``"status": "diverged"``.
The CLI prints any error as one line (``agvm.cli.run``; ``--debug`` for the traceback).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import os.path as osp
import sys
import uuid
from typing import Dict, Optional

from agvm.fileio import main_rank_lock, write_json_atomic

__all__ = ["train", "load_config", "parse_cfg_options", "check_data_roots", "check_pretrained", "sync_bn_plan", "main"]

ROOT_VARS = {"coco": "AGVM_COCO_ROOT", "ade20k": "AGVM_ADE_ROOT", "objects365": "AGVM_O365_ROOT",
             "imagenet": "AGVM_IMAGENET_ROOT"}


def load_config(config: str, cfg_options: Optional[dict] = None):
    """mmengine Config from ``config`` with ``cfg_options`` merged and ``dataset=synthetic`` applied."""
    from agvm.mm import register_all

    register_all()
    from mmengine.config import Config

    if not osp.isfile(config):
        raise FileNotFoundError(f"config file not found: {config}")
    try:
        cfg = Config.fromfile(config)
    except SyntaxError:  # mmengine's message says "<unknown>"; Python's own parse names the file and line
        import ast

        with open(config) as f:
            ast.parse(f.read(), filename=config)
        raise
    options = dict(cfg_options or {})
    synthetic_size = options.pop("synthetic_image_size", None)
    if options:
        cfg.merge_from_dict(options)
    if cfg.get("dataset") == "synthetic":
        from .synthetic import apply_synthetic

        apply_synthetic(cfg, root=cfg.get("synthetic_root"), image_size=int(synthetic_size or 96))
    return cfg


def _dataset_cfgs(cfg):
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if loader:
            ds = loader["dataset"]
            while "dataset" in ds and "data_root" not in ds:  # RepeatDataset / ClassBalancedDataset
                ds = ds["dataset"]
            yield key, ds


def check_data_roots(cfg) -> None:
    """FileNotFoundError naming the missing dataset path and the variable / override to set."""
    name = cfg.get("dataset", "coco")
    var = ROOT_VARS.get(name, "the dataset root variable")
    for key, ds in _dataset_cfgs(cfg):
        root = ds.get("data_root", "")
        paths = [root] if root else []
        if ds.get("ann_file"):
            paths.append(osp.join(root, ds["ann_file"]))
        for path in paths:
            if not osp.exists(path):
                raise FileNotFoundError(
                    f"{name} data for {key} not found: {osp.abspath(path)} does not exist. Set {var} to the "
                    f"{name} root (now {os.environ.get(var, '<unset>')!r}), or train on generated data with "
                    "--cfg-options dataset=synthetic")


def _pretrained_paths(cfg):
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("type") == "Pretrained" and obj.get("checkpoint"):
                found.append(obj["checkpoint"])
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(cfg.get("model", {}))
    return found


def check_pretrained(cfg) -> None:
    """Pretrained backbone weights must be on disk (nothing is downloaded unless AGVM_ALLOW_DOWNLOAD=1)."""
    if os.environ.get("AGVM_ALLOW_DOWNLOAD") == "1":
        return
    import torch

    hub = osp.join(torch.hub.get_dir(), "checkpoints")
    for ckpt in _pretrained_paths(cfg):
        if ckpt.startswith(("http://", "https://", "torchvision://", "open-mmlab://", "mmcls://", "pavi://")):
            if ckpt.startswith("torchvision://"):
                from mmengine.runner.checkpoint import get_torchvision_models

                url = get_torchvision_models().get(ckpt[len("torchvision://"):], "")
            else:
                url = ckpt
            local = osp.join(hub, osp.basename(url)) if url else ""
            if not url or not osp.exists(local):
                raise FileNotFoundError(
                    f"pretrained backbone weights {ckpt} are not on this machine (expected {local or '?'}) and "
                    "downloads are off. Put the file there, set AGVM_ALLOW_DOWNLOAD=1, or train from scratch with "
                    "--cfg-options model.backbone.init_cfg=None")
        elif not osp.exists(ckpt):
            raise FileNotFoundError(f"pretrained checkpoint {ckpt} does not exist")


def _to_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _init_cpu_process_group(launcher: str) -> None:
    import torch
    import torch.distributed as dist

    if launcher != "none" and not torch.cuda.is_available() and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")  # mmengine's init_dist assumes CUDA; RANK/WORLD_SIZE/MASTER_* from env


def sync_bn_plan(cfg, launcher: str) -> str:
    """What becomes of the config's ``sync_bn`` key (mmengine's Runner converts every BatchNorm to SyncBatchNorm
    when it wraps the model for multi-GPU DDP); returns the line to log. On CPU ranks (gloo: torch has no CPU
    SyncBatchNorm) and in one process the key is removed, so BatchNorm keeps per-process statistics."""
    value = cfg.get("sync_bn")
    if value is None:
        return ""
    if value not in ("torch", "mmcv"):
        raise ValueError(f"sync_bn={value!r} is not understood: use 'torch' (torch.nn.SyncBatchNorm) or 'mmcv', "
                         "or remove the key for plain BatchNorm")
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1) if launcher != "none" else 1
    if world > 1 and torch.cuda.is_available():
        return f"sync_bn={value!r}: BatchNorm layers become SyncBatchNorm (statistics over all {world} ranks)"
    cfg.pop("sync_bn")
    where = "one process" if world == 1 else f"{world} CPU ranks (no CPU SyncBatchNorm)"
    return f"sync_bn={value!r} not applied ({where}): BatchNorm layers keep per-process batch statistics"


def resolve_start(cfg, resume: bool, latest_checkpoint) -> None:
    """Where training starts: the run's own last complete checkpoint (resume) if there is one, else the
    config's ``load_from`` (a stage hand-over or pretrained detector), which must then be kept."""
    ckpt = latest_checkpoint(cfg.work_dir) if resume else None
    cfg.resume = ckpt is not None
    if ckpt is not None:
        cfg.load_from = ckpt
    elif cfg.get("load_from") and "://" not in str(cfg.load_from) and not osp.isfile(cfg.load_from):
        raise FileNotFoundError(f"load_from={cfg.load_from!r} does not exist; give the checkpoint this run starts from "
                                "(e.g. the previous stage's hand-over) or drop load_from")


def _one_run_per_work_dir(fn):
    """The main rank holds ``work_dir``'s lock (``agvm.fileio.WorkDirLock``) for the whole call, so a second run
    on the same work dir stops at once with a message naming the first."""

    @functools.wraps(fn)
    def locked(config, work_dir, *args, **kwargs):
        with main_rank_lock(work_dir, "agvm.mm.train"):
            return fn(config, work_dir, *args, **kwargs)

    return locked


@_one_run_per_work_dir
def train(config: str, work_dir: str, cfg_options: Optional[dict] = None, resume: bool = True,
          launcher: str = "none", unsafe_load: bool = False, allow_config_change: bool = False) -> Dict[str, float]:
    """Train ``config`` into ``work_dir``, evaluate, write ``metrics.json``; returns the final metrics.

    ``unsafe_load``: read the checkpoint to resume from / ``load_from`` with ``torch.load(weights_only=False)``
    (only for files you trust). ``allow_config_change``: resume although the resolved config differs from the
    checkpoint's (otherwise refused with the differences)."""
    from mmengine.dist import is_main_process

    from .hooks import AGVMHook
    from .runner import AGVMRunner, latest_checkpoint

    cfg = load_config(config, cfg_options)
    if cfg.get("dataset") == "synthetic":
        from .synthetic import ensure

        if is_main_process():
            ensure(cfg.synthetic_root)
    else:
        check_data_roots(cfg)
        check_pretrained(cfg)
    os.makedirs(work_dir, exist_ok=True)
    cfg.work_dir = osp.abspath(work_dir)
    cfg.launcher = launcher
    _init_cpu_process_group(launcher)
    note = sync_bn_plan(cfg, launcher)
    if note:
        from mmengine.logging import print_log

        print_log(f"[agvm.mm.train] {note}", logger="current")
    resolve_start(cfg, resume, latest_checkpoint)
    cfg.pop("runner_type", None)
    if isinstance(cfg.get("visualizer"), dict):  # a fresh visualizer per run (mmengine keeps instances by name)
        cfg.visualizer["name"] = f"visualizer_{uuid.uuid4().hex[:12]}"
    runner = AGVMRunner.from_cfg(cfg)
    runner.unsafe_load, runner.allow_config_change = unsafe_load, allow_config_change
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, AGVMHook))
    metrics = hook.last_metrics
    if runner.val_loop is not None and (metrics is None or hook.last_metrics_iter != runner.iter):
        metrics = runner.val()
    metrics = {k: _to_float(v) for k, v in (metrics or {}).items()}
    if not metrics:
        runner.logger.warning("the evaluation returned no metrics (e.g. no detection above the score threshold); "
                              "metrics.json is an empty dict")
    if is_main_process():
        write_json_atomic(osp.join(cfg.work_dir, "metrics.json"), metrics)
    return metrics


def parse_cfg_options(items):
    """``--cfg-options`` items (``key=value``) as a dict, through mmengine's DictAction."""
    from mmengine.config import DictAction

    for item in items:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"--cfg-options {item!r}: expected key=value, e.g. train_cfg.max_epochs=1 "
                             "(no spaces around '=')")

    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    return parser.parse_args(["--cfg-options", *items]).cfg_options if items else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train an AGVM mmdet/mmseg config (mmengine Runner).")
    p.add_argument("config")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--cfg-options", nargs="+", default=[],
                   help="key=value overrides, e.g. dataset=synthetic train_cfg.max_iters=10")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm", "mpi"])
    p.add_argument("--unsafe-load", action="store_true",
                   help="read the checkpoint to resume from / load_from with torch.load(weights_only=False): "
                        "only for files you trust")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's")
    a = p.parse_args(argv)
    metrics = train(a.config, a.work_dir, parse_cfg_options(a.cfg_options), resume=not a.no_resume,
                    launcher=a.launcher, unsafe_load=a.unsafe_load, allow_config_change=a.allow_config_change)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
