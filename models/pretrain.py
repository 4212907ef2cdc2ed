"""Stage 1 entry point: ImageNet-style classification pre-training of UniNet (AGVM appendix A.5.2).

    python -m models.pretrain configs/uninet/uninet_g_in22k_pretrain.py [--data-root DIR]
        [--work-dir DIR] [--override key=value ...] [--no-resume]

The config is a plain python file (top-level dicts: model, data, mixup, optimizer, scheduler, train and
the scalars batch_size, work_dir, export_name); ``--override optimizer.lr=1e-3`` sets nested keys
(values parsed as python literals, else kept as strings). Built from timm's utilities: ``create_model``,
``data.create_transform`` (RandAugment, Random Erasing), ``data.Mixup`` (Mixup + CutMix),
``loss.SoftTargetCrossEntropy``, ``optim.create_optimizer_v2`` (AdamW, no decay on norms / biases)
and ``scheduler.CosineLRScheduler`` (per-step cosine with warm-up), over a torchvision ImageFolder.

Several processes: launch with torchrun (the env RANK / WORLD_SIZE / LOCAL_RANK is used); ``batch_size``
is global and reached with ``data.batch_per_gpu`` per process and gradient accumulation.

Outputs in work_dir, each written atomically (tmp file + os.replace):
- ``last.pth``: resume state (model, optimizer, scheduler, step, epoch, position in the epoch);
  a re-run continues from it unless --no-resume;
- ``<export_name>``: the plain timm-format state dict handed to the detection stage;
- ``log.jsonl`` (one line per logged step) and ``metrics.json`` (summary at the end).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import runpy
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import agvm._compat
from agvm.fileio import main_rank_lock, write_json_atomic
from agvm.mm.checkpoint import read, rng_state, set_rng_state

agvm._compat.apply()

__all__ = ["load_config", "resolve_train_dir", "train", "main", "save_atomic"]

ENV_ROOT = "AGVM_IMAGENET_ROOT"
_CONFIG_KEYS = ("model", "data", "mixup", "batch_size", "optimizer", "scheduler", "train", "work_dir", "export_name")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Run the config file and return its top-level settings, with ``key.sub=value`` overrides applied."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ns = runpy.run_path(path)
    cfg = {k: v for k, v in ns.items() if k in _CONFIG_KEYS}
    missing = [k for k in _CONFIG_KEYS if k not in cfg and k != "mixup"]
    if missing:
        raise KeyError(f"config {path} lacks {missing}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise KeyError(f"override {item!r}: {p!r} is not a section of the config")
            node = node[p]
        node[parts[-1]] = _parse_value(value)
    return cfg


def resolve_train_dir(cfg: Dict[str, Any], data_root: Optional[str] = None) -> Path:
    """<root>/<train_split>, root from --data-root, then data.root, then $AGVM_IMAGENET_ROOT."""
    root = data_root or cfg["data"].get("root") or os.environ.get(ENV_ROOT)
    if not root:
        raise FileNotFoundError(
            f"no ImageNet root given: pass --data-root DIR, set data.root in the config or export {ENV_ROOT}=DIR "
            f"(an ImageFolder tree DIR/{cfg['data'].get('train_split', 'train')}/<class>/<image>)")
    train_dir = Path(root) / cfg["data"].get("train_split", "train")
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"ImageNet training folder {str(train_dir)!r} does not exist (root {root!r}); expected "
            f"<root>/{cfg['data'].get('train_split', 'train')}/<class>/<image>. Set --data-root or {ENV_ROOT}.")
    return train_dir


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save atomically with a checksum sidecar (``agvm.mm.checkpoint.save``): never a half-written file."""
    from agvm.mm.checkpoint import save

    save(obj, str(path))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """Seeded per-epoch permutation, sliced per rank, that can start part-way into an epoch (resume)."""

    def __init__(self, n: int, batch_per_gpu: int, rank: int, world: int, seed: int) -> None:
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.per_rank = (n // (batch_per_gpu * world)) * batch_per_gpu  # full batches only (Mixup: even)
        if self.per_rank == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_per_gpu} x {world} processes)")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start = epoch, start_sample

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.world]
        return iter(perm[self.rank::self.world][self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start


def _dist_info() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def train(cfg: Dict[str, Any], data_root: Optional[str] = None, work_dir: Optional[str] = None,
          resume: bool = True) -> Dict[str, Any]:
    """Pre-train per ``cfg``; returns a summary (also written to ``<work_dir>/metrics.json``). The main rank
    holds the work dir's lock (``agvm.fileio.WorkDirLock``) throughout: one run per work dir."""
    work_dir = work_dir or cfg["work_dir"]
    with main_rank_lock(work_dir, "models.pretrain"):
        return _train(cfg, data_root, work_dir, resume)


def _train(cfg: Dict[str, Any], data_root: Optional[str], work_dir: str, resume: bool) -> Dict[str, Any]:
    import timm
    import torchvision
    from timm.data import Mixup, create_transform
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    import models.uninet  # noqa: F401  (registers uninet_* with timm)

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = _dist_info()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tcfg, dcfg, ocfg, scfg = cfg["train"], cfg["data"], cfg["optimizer"], cfg["scheduler"]
    work = Path(work_dir or cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    seed = tcfg.get("seed", 0) + rank  # DDP broadcasts rank 0's initial weights
    torch.manual_seed(seed)
    random.seed(seed)  # timm's RandAugment / Random Erasing draw from python's and numpy's generators
    np.random.seed(seed)  # Mixup / CutMix

    # data
    train_dir = resolve_train_dir(cfg, data_root)
    transform = create_transform(
        dcfg["input_size"], is_training=True, auto_augment=dcfg.get("auto_augment"),
        color_jitter=dcfg.get("color_jitter", 0.4), interpolation=dcfg.get("interpolation", "bicubic"),
        re_prob=dcfg.get("re_prob", 0.0), re_mode=dcfg.get("re_mode", "pixel"), re_count=dcfg.get("re_count", 1))
    dataset = torchvision.datasets.ImageFolder(str(train_dir), transform=transform)
    num_classes = cfg["model"]["num_classes"]
    if len(dataset.classes) != num_classes:
        raise ValueError(f"{train_dir} has {len(dataset.classes)} class folders but model.num_classes is "
                         f"{num_classes}; fix the data or pass --override model.num_classes={len(dataset.classes)}")
    bpg, global_bs = dcfg["batch_per_gpu"], cfg["batch_size"]
    if global_bs % (bpg * world):
        raise ValueError(f"batch_size {global_bs} is not a multiple of batch_per_gpu {bpg} x {world} processes")
    accum = global_bs // (bpg * world)
    sampler = EpochSampler(len(dataset), bpg, rank, world, tcfg.get("seed", 0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=bpg, sampler=sampler, drop_last=True,
                                         num_workers=dcfg.get("workers", 0), pin_memory=device.type == "cuda",
                                         persistent_workers=False,
                                         generator=torch.Generator().manual_seed(seed))  # not the global RNG
    steps_per_epoch = sampler.per_rank // (bpg * accum)
    if steps_per_epoch == 0:
        raise ValueError(f"one epoch ({sampler.per_rank} images per process) is less than one optimizer step "
                         f"({bpg} x {accum} accumulation)")
    mcfg = cfg.get("mixup") or None
    mixup = None
    if mcfg and (mcfg.get("mixup_alpha", 0) > 0 or mcfg.get("cutmix_alpha", 0) > 0):
        if bpg % 2:
            raise ValueError(f"Mixup/CutMix mix pairs within a batch: data.batch_per_gpu must be even, got {bpg}")
        mixup = Mixup(num_classes=num_classes, **mcfg)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        smoothing = (mcfg or {}).get("label_smoothing", 0.0)
        criterion = LabelSmoothingCrossEntropy(smoothing) if smoothing > 0 else nn.CrossEntropyLoss()

    # model, optimizer, schedule
    mkw = {k: v for k, v in cfg["model"].items() if k != "name"}
    model = timm.create_model(cfg["model"]["name"], **mkw).to(device)
    channels_last = bool(tcfg.get("channels_last", False))  # transformer stages run NHWC anyway
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt_kw = {k: v for k, v in ocfg.items() if k not in ("opt", "lr", "weight_decay")}
    optimizer = create_optimizer_v2(model, opt=ocfg["opt"], lr=ocfg["lr"], weight_decay=ocfg["weight_decay"],
                                    **opt_kw)
    total_steps = scfg["epochs"] * steps_per_epoch
    if scfg.get("sched", "cosine") != "cosine":
        raise ValueError(f"scheduler.sched {scfg.get('sched')!r}: only 'cosine' is supported")
    scheduler = CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=scfg["min_lr"],
                                  warmup_t=int(scfg.get("warmup_epochs", 0) * steps_per_epoch),
                                  warmup_lr_init=scfg.get("warmup_lr", 0.0), t_in_epochs=False)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)

    step, epoch, done_in_epoch = 0, 0, 0
    last = work / "last.pth"
    if resume and last.is_file():
        state = read(last)  # verified, weights_only=True
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, done_in_epoch = state["step"], state["epoch"], state["steps_done_in_epoch"]
        rng = state.get("rng", {}).get(rank)
        if rng is not None:  # same augmentation draws as an uninterrupted run (single process, workers=0)
            set_rng_state(rng)
        if rank == 0:
            print(f"[pretrain] resumed from {last} at step {step} (epoch {epoch})", flush=True)

    def checkpoint() -> None:
        if rank != 0:
            return
        rng = {0: rng_state()}
        save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), step=step, epoch=epoch,
                         steps_done_in_epoch=done_in_epoch, config=cfg, rng=rng), last)
        save_atomic(model.state_dict(), work / cfg["export_name"])

    amp = tcfg.get("amp") == "bf16" and device.type == "cuda"
    max_iters = tcfg.get("max_iters")
    ckpt_every = tcfg.get("ckpt_interval")
    log_every = tcfg.get("log_interval", 50)
    losses: List[float] = []
    t0 = time.time()
    model.train()
    stop = max_iters is not None and step >= max_iters
    while epoch < scfg["epochs"] and not stop:
        sampler.set_epoch(epoch, done_in_epoch * bpg * accum)
        it = iter(loader)
        while done_in_epoch < steps_per_epoch:
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(accum):
                images, targets = next(it)
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                sync = micro == accum - 1 or world == 1
                ctx = ddp_model.no_sync() if (world > 1 and not sync) else _nullcontext()
                with ctx, torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = criterion(ddp_model(images), targets) / accum
                loss.backward()
                loss_sum += loss.item()
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss is {loss_sum} at step {step}; lower optimizer.lr or check the data")
            if tcfg.get("clip_grad"):
                nn.utils.clip_grad_norm_(model.parameters(), tcfg["clip_grad"])
            optimizer.step()
            step += 1
            done_in_epoch += 1
            scheduler.step_update(num_updates=step)
            losses.append(loss_sum)
            if rank == 0 and (step % log_every == 0 or step == 1):
                rec = dict(step=step, epoch=epoch, loss=loss_sum, lr=optimizer.param_groups[0]["lr"],
                           time=round(time.time() - t0, 2))
                with open(work / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[pretrain] {json.dumps(rec)}", flush=True)
            stop = max_iters is not None and step >= max_iters
            if (ckpt_every and step % ckpt_every == 0) or stop:
                checkpoint()
            if stop:
                break
        if not stop:
            epoch, done_in_epoch = epoch + 1, 0
            checkpoint()
    summary = dict(steps=step, epoch=epoch, losses=losses, final_loss=losses[-1] if losses else None,
                   checkpoint=str(work / cfg["export_name"]), resume_state=str(last),
                   seconds=round(time.time() - t0, 2), world_size=world, accumulation=accum)
    if rank == 0:
        write_json_atomic(work / "metrics.json", summary)
    return summary


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description="UniNet ImageNet-style pre-training (AGVM stage 1)")
    p.add_argument("config")
    p.add_argument("--data-root", default=None, help=f"ImageFolder root (default: data.root or ${ENV_ROOT})")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="e.g. optimizer.lr=1e-3 train.max_iters=10 model.name=uninet_tiny")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if work_dir/last.pth exists")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.override)
    return train(cfg, data_root=a.data_root, work_dir=a.work_dir, resume=not a.no_resume)


if __name__ == "__main__":
    import agvm.cli

    raise SystemExit(agvm.cli.run(main))
