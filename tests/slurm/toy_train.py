"""A tiny pure-torch stand-in for ``agvm.mm.train.train`` with the same signature and work-dir contract.

It trains a two-module MLP (``backbone`` + ``head``) with AGVM-SGD on data generated from
(seed, iteration, rank), so a resumed run sees exactly the batches an uninterrupted run sees: the final
weights must then be bit-identical. Checkpoints are written atomically (temporary file + ``os.replace``)
every ``ckpt_interval`` iterations, with mmengine's ``last_checkpoint`` pointer; ``metrics.json`` at the
end. With ``launcher="pytorch"`` it wraps the model in DDP and registers ``agvm.distributed.register_hook``.

The config is a Python file of plain assignments (``iters = 12``); cfg options override them, with
mmengine's dotted names for the batch (``train_dataloader.batch_size``) and seed (``randomness.seed``).
``load_from`` initialises the model from another run's checkpoint (stage chains); ``emulate_ranks=k``
makes one process see the data of k ranks (rank r = the r-th k-th of the batch, the halves of AGVM
with k = 2), to compare with a distributed run. For the preemption test: ``pause_at`` + ``pause_file`` make the first attempt write its pid to the file at
that iteration and wait there to be signalled.
"""
from __future__ import annotations

import json
import os
import runpy
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

import agvm
from agvm.fileio import write_text_atomic

DEFAULTS = dict(iters=12, ckpt_interval=4, lr=0.05, interval=2, dim=8, per_rank_batch=4, seed=0, sleep=0.0,
                pause_at=None, pause_file=None, fail=False, load_from=None, emulate_ranks=1)


class ToyNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def batch(cfg: Dict[str, Any], it: int, rank: int, n: int) -> tuple:
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + it * 1009 + rank)
    x = torch.randn(n, cfg["dim"], generator=g)
    w = torch.linspace(-1, 1, cfg["dim"])
    y = (x @ w).unsqueeze(1).sin() + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(config: str, work_dir: str, cfg_options: Optional[Dict[str, Any]] = None, resume: bool = True,
          launcher: str = "none") -> Dict[str, Any]:
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in runpy.run_path(config).items() if k in DEFAULTS})
    for k, v in (cfg_options or {}).items():
        key = {"train_dataloader.batch_size": "per_rank_batch", "randomness.seed": "seed"}.get(k, k)
        if key not in DEFAULTS:
            raise KeyError(f"toy_train: unknown cfg option {k!r}")
        cfg[key] = v
    if cfg["fail"]:
        raise RuntimeError("toy_train: failing on purpose (fail=True)")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    distributed = launcher == "pytorch"
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg["seed"])
    model = ToyNet(cfg["dim"])
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=cfg["lr"], momentum=0.9, weight_decay=1e-4,
                       interval=cfg["interval"])
    net: nn.Module = model
    if distributed:
        from agvm.distributed import register_hook

        net = torch.nn.parallel.DistributedDataParallel(model)
        register_hook(net, opt)
    start = 0
    pointer = work / "last_checkpoint"
    if resume and pointer.is_file():
        state = torch.load(work / pointer.read_text().strip(), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iter"])
    elif cfg["load_from"]:  # a stage initialised from the previous stage's final checkpoint
        model.load_state_dict(torch.load(cfg["load_from"], weights_only=True)["model"])
    loss_fn = nn.MSELoss()
    loss = torch.tensor(float("nan"))
    for it in range(start + 1, cfg["iters"] + 1):
        if distributed or cfg["emulate_ranks"] == 1:
            x, y = batch(cfg, it, rank, cfg["per_rank_batch"])
        else:  # one process standing in for k ranks: rank r's data is the r-th k-th of the batch
            k = cfg["emulate_ranks"]
            parts = [batch(cfg, it, r, cfg["per_rank_batch"] // k) for r in range(k)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if distributed:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
        else:
            h = x.shape[0] // 2
            loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model(x[:h]), y[:h]),
                                                    lambda: loss_fn(model(x[h:]), y[h:]))
            opt.step(halves=halves)
        if cfg["sleep"]:
            time.sleep(cfg["sleep"])
        if rank == 0:
            write_text_atomic(work / "progress.json", json.dumps({"iter": it, "max_iters": cfg["iters"],
                                                            "loss": float(loss)}))
            if it % cfg["ckpt_interval"] == 0 or it == cfg["iters"]:
                _save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it}, work / f"iter_{it}.pth")
                write_text_atomic(pointer, f"iter_{it}.pth")
        if cfg["pause_at"] == it and cfg["pause_file"] and not Path(cfg["pause_file"]).exists():
            write_text_atomic(Path(cfg["pause_file"]), str(os.getpid()))
            time.sleep(120)  # the test signals this process (SIGUSR2, as SLURM does before a time-out)
            raise RuntimeError("toy_train: pause_at was never interrupted")
    metrics = {"loss": float(loss), "iters": cfg["iters"], "world_size": world, "checkpoint": f"iter_{cfg['iters']}.pth",
               "mu": opt.modulation, "per_rank_batch": cfg["per_rank_batch"], "resumed_from": start,
               "loaded_from": None if start else cfg["load_from"]}
    if rank == 0:
        write_text_atomic(work / "metrics.json", json.dumps(metrics))
    return metrics
