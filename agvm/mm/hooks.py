"""``AGVMHook``: connects AGVM to the distributed run and logs Phi and mu at every measurement.

- ``before_train``: under DDP (world size >= 2) registers ``agvm.distributed.register_hook`` on the
  wrapped model, so the two gradient estimates come from the two halves of the ranks.
- ``after_train_iter``: when the optimizer measured in this iteration (its step count t reached a
  multiple of tau), writes Phi_i (Eq. 2 without eta^2) and mu_i (Eq. 42) per module to mmengine's
  visualizer (scalars ``agvm/phi/<module>``, ``agvm/mu/<module>``: TensorBoard with
  TensorboardVisBackend) and one JSON line to ``<work_dir>/agvm_variance.jsonl``:
  ``{"iter", "epoch", "phi": {module: float}, "mu": {module: float}, "lr", "batch_size", "optimizer"}``
  (``iter``: iterations completed, 1-based; ``lr``: the scheduler's lr before mu; non-finite -> null).
- ``after_val_epoch``: remembers the metrics (``train()`` writes the final ones to metrics.json).
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
from typing import Dict, Optional

from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from torch.nn.parallel import DistributedDataParallel

from .optim import is_agvm

__all__ = ["AGVMHook", "VARIANCE_LOG"]

VARIANCE_LOG = "agvm_variance.jsonl"


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


class AGVMHook(Hook):
    """See the module docstring. ``log_file``: name of the JSON-lines file inside the work dir."""

    priority = "BELOW_NORMAL"

    def __init__(self, log_file: str = VARIANCE_LOG, tensorboard: bool = True):
        self.log_file = log_file
        self.tensorboard = tensorboard
        self.last_metrics: Optional[Dict[str, float]] = None
        self.last_metrics_iter = -1
        self._last_t = -1
        self._batch_size = 0
        self._ddp_registered = False

    @staticmethod
    def _optimizer(runner):
        ow = getattr(runner, "optim_wrapper", None)
        return getattr(ow, "optimizer", None)

    def before_train(self, runner) -> None:
        opt = self._optimizer(runner)
        if not is_agvm(opt):
            return
        self._last_t = opt.t
        per_rank = (runner.cfg.get("train_dataloader") or {}).get("batch_size") or 0
        accum = getattr(runner.optim_wrapper, "_accumulative_counts", 1)
        self._batch_size = int(per_rank * get_world_size() * accum)
        if isinstance(runner.model, DistributedDataParallel) and not self._ddp_registered:
            from agvm.distributed import register_hook

            register_hook(runner.model, opt)
            self._ddp_registered = True
        path = osp.join(runner.work_dir, self.log_file)
        if is_main_process() and osp.exists(path):  # resumed: drop records after the checkpoint
            with open(path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("iter", 0) <= runner.iter]
            if len(keep) != len(lines):
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    f.writelines(keep)
                os.replace(tmp, path)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        opt = self._optimizer(runner)
        if not is_agvm(opt) or opt.t == self._last_t:
            return
        self._last_t = opt.t
        if not opt.is_measurement_step(opt.t):
            return
        it = runner.iter + 1
        phi = {m: _finite(v) for m, v in opt.variance.items()}
        mu = {m: _finite(v) for m, v in opt.modulation.items()}
        if not is_main_process():
            return
        record = {"iter": it, "epoch": runner.epoch, "phi": phi, "mu": mu,
                  "lr": float(opt.param_groups[0]["lr"]), "batch_size": self._batch_size,
                  "optimizer": type(opt).__name__}
        with open(osp.join(runner.work_dir, self.log_file), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            scalars = {f"agvm/phi/{m}": v for m, v in phi.items() if v is not None}
            scalars.update({f"agvm/mu/{m}": v for m, v in mu.items() if v is not None})
            runner.visualizer.add_scalars(scalars, step=it)

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if metrics is not None:
            self.last_metrics = dict(metrics)
            self.last_metrics_iter = runner.iter
