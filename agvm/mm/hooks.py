"""``AGVMHook``: connects AGVM to the distributed run and logs Phi and mu at every measurement.

- ``before_train``: under DDP (world size >= 2) registers ``agvm.distributed.register_hook`` on the
  wrapped model, so the two gradient estimates come from the two halves of the ranks.
- ``after_train_iter``: when the optimizer measured in this iteration (its step count t reached a
  multiple of tau), writes Phi_i (Eq. 2 without eta^2) and mu_i (Eq. 42) per module to mmengine's
  visualizer (scalars ``agvm/phi/<module>``, ``agvm/mu/<module>``: TensorBoard with
  TensorboardVisBackend) and one JSON line to ``<work_dir>/agvm_variance.jsonl``:
  ``{"iter", "epoch", "phi": {module: float}, "mu": {module: float}, "lr", "batch_size", "optimizer"}``
  (``iter``: iterations completed, 1-based; ``lr``: the scheduler's lr before mu; non-finite -> null).
  A measurement the optimizer rejected (NaN / Inf halves, no anchor gradient) is logged with every Phi and mu
  null and ``"rejected": true``, never as a repeat of the last good one.
- ``after_val_epoch``: remembers the metrics (``train()`` writes the final ones to metrics.json).

``DivergenceHook(patience=3)`` (added by ``AGVMRunner`` when the config has none) stops training with
``TrainingDiverged`` once the loss, or the gradient norm the optimizer wrapper logs when it clips, has been
non-finite in ``patience`` consecutive iterations (all ranks agree on it), after writing
``metrics.json = {"status": "diverged", "iter": ..., "epoch": ..., "reason": ...}``; the CLI exits with status 3.
"""
from __future__ import annotations

import json
import math
import os.path as osp
from typing import Dict, Optional

import torch
from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.optim import AmpOptimWrapper
from torch.nn.parallel import DistributedDataParallel

from agvm.fileio import write_json_atomic, write_text_atomic

from .optim import is_agvm

__all__ = ["AGVMHook", "DivergenceHook", "TrainingDiverged", "VARIANCE_LOG"]

VARIANCE_LOG = "agvm_variance.jsonl"
METRICS_FILE = "metrics.json"


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _num_rejected(opt) -> int:
    """Measurements the optimizer has rejected so far (its Modulator counts them)."""
    return int(getattr(getattr(opt, "modulator", None), "num_rejected", 0))


class AGVMHook(Hook):
    """See the module docstring. ``log_file``: name of the JSON-lines file inside the work dir."""

    priority = "BELOW_NORMAL"

    def __init__(self, log_file: str = VARIANCE_LOG, tensorboard: bool = True):
        self.log_file = log_file
        self.tensorboard = tensorboard
        self.last_metrics: Optional[Dict[str, float]] = None
        self.last_metrics_iter = -1
        self._last_t = -1
        self._rejected = 0
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
        self._rejected = _num_rejected(opt)
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
                write_text_atomic(path, "".join(keep))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        opt = self._optimizer(runner)
        if not is_agvm(opt) or opt.t == self._last_t:
            return
        self._last_t = opt.t
        if not opt.is_measurement_step(opt.t):
            return
        it = runner.iter + 1
        rejected, self._rejected = _num_rejected(opt) > self._rejected, _num_rejected(opt)
        if rejected:  # nothing was measured: null, not the last good values again
            phi, mu = dict.fromkeys(opt.modulation), dict.fromkeys(opt.modulation)
        else:
            phi = {m: _finite(v) for m, v in opt.variance.items()}
            mu = {m: _finite(v) for m, v in opt.modulation.items()}
        if not is_main_process():
            return
        record = {"iter": it, "epoch": runner.epoch, "phi": phi, "mu": mu,
                  "lr": float(opt.param_groups[0]["lr"]), "batch_size": self._batch_size,
                  "optimizer": type(opt).__name__}
        if rejected:
            record["rejected"] = True
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


class TrainingDiverged(RuntimeError):
    """Training stopped on a non-finite loss or gradient; the CLI exits with ``exit_code``."""

    exit_code = 3

    def __init__(self, iteration: int, epoch: int, reason: str):
        self.iteration, self.epoch, self.reason = iteration, epoch, reason
        super().__init__(f"training diverged at iteration {iteration}: {reason}; metrics.json says "
                         "\"status\": \"diverged\" (lower the lr, lengthen the warm-up or clip gradients)")


class DivergenceHook(Hook):
    """Stops a run whose loss or gradient norm is non-finite ``patience`` iterations in a row (see the module
    docstring). With AMP an overflowing gradient is the loss scaler's business, so only the loss counts."""

    priority = "ABOVE_NORMAL"  # before the checkpoint hook saves the iteration's weights

    def __init__(self, patience: int = 3):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"DivergenceHook: patience must be an integer >= 1, got {patience!r}")
        self.patience = patience
        self.bad = 0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        checks = {}  # what -> values that must be finite
        if isinstance(outputs, dict) and outputs.get("loss") is not None:
            checks["the loss"] = torch.as_tensor(outputs["loss"]).detach().float().reshape(-1)
        hub = runner.message_hub
        if not isinstance(runner.optim_wrapper, AmpOptimWrapper) and "train/grad_norm" in hub.log_scalars:
            checks["the gradient norm"] = torch.tensor([float(hub.get_scalar("train/grad_norm").current())])
        if not checks:
            return
        device = next(iter(checks.values())).device
        flags = torch.stack([(~torch.isfinite(v.to(device))).any().float() for v in checks.values()])
        if get_world_size() > 1:  # every rank stops at the same iteration, or the others would hang
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [what for what, f in zip(checks, flags.tolist()) if f]
        self.bad = self.bad + 1 if bad else 0
        if self.bad >= self.patience:
            err = TrainingDiverged(runner.iter + 1, runner.epoch, f"{' and '.join(bad)} non-finite in {self.bad} "
                                   f"consecutive iteration(s) (DivergenceHook patience={self.patience})")
            if is_main_process():
                write_json_atomic(osp.join(runner.work_dir, METRICS_FILE), {
                    "status": "diverged", "iter": err.iteration, "epoch": err.epoch, "reason": err.reason})
            raise err
