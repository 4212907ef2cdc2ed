"""``AGVMRunner``: mmengine's Runner with atomic checkpoints and AGVM's model wrapping.

- ``save_checkpoint`` writes ``<name>.tmp`` and renames it (``os.replace``), so a checkpoint file
  that exists is complete; ``latest_checkpoint`` picks the newest one.
- ``wrap_model``: with an AGVM optimizer and no second rank, the model is wrapped in
  ``AGVMTwoHalves`` (two micro-batches on measurement steps); under DDP on CPU, DDP gets ``device_ids=None``.
- An ``AGVMHook`` and a ``DivergenceHook`` are added when the config has none.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import Optional

from mmengine.dist import get_world_size, is_main_process
from mmengine.model import MMDistributedDataParallel, is_model_wrapper
from mmengine.runner import Runner

from .hooks import AGVMHook, DivergenceHook
from .optim import AGVM_OPTIMIZERS, AGVMTwoHalves

__all__ = ["AGVMRunner", "latest_checkpoint"]

_CKPT = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The newest complete checkpoint (``iter_N.pth`` / ``epoch_N.pth``) in ``work_dir``, or None."""
    if not osp.isdir(work_dir):
        return None
    found = []
    for name in os.listdir(work_dir):
        m = _CKPT.match(name)
        if m:
            found.append((int(m.group(2)), osp.getmtime(osp.join(work_dir, name)), name))
    if not found:
        return None
    return osp.join(work_dir, max(found)[2])


class AGVMRunner(Runner):
    """mmengine Runner; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(h, AGVMHook) for h in self._hooks):
            self.register_hook(AGVMHook())
        if not any(isinstance(h, DivergenceHook) for h in self._hooks):
            self.register_hook(DivergenceHook())

    def _uses_agvm(self) -> bool:
        ow = self.cfg.get("optim_wrapper") or {}
        opt = ow.get("optimizer") or {}
        return opt.get("type") in AGVM_OPTIMIZERS

    def wrap_model(self, model_wrapper_cfg, model):
        if is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        multi_rank = self.distributed and get_world_size() > 1
        if self._uses_agvm() and not multi_rank:
            model = super().wrap_model(None, model) if not self.distributed else model.to(self._device())
            return AGVMTwoHalves(model)
        if self.distributed and model_wrapper_cfg is None and not next(model.parameters()).is_cuda \
                and self._device() == "cpu":
            from mmengine.model import revert_sync_batchnorm

            model = revert_sync_batchnorm(model)
            return MMDistributedDataParallel(module=model, device_ids=None, broadcast_buffers=False,
                                             find_unused_parameters=self.cfg.get("find_unused_parameters", False))
        return super().wrap_model(model_wrapper_cfg, model)

    @staticmethod
    def _device() -> str:
        from mmengine.device import get_device

        return get_device()

    def resume(self, filename: str, *args, **kwargs) -> None:
        """Runner.resume from this run's own checkpoint. Such checkpoints hold mmengine's MessageHub
        (HistoryBuffer with bound methods, pickled through ``getattr``), which torch >= 2.6's
        weights-only loader refuses; the file was written by this runner into its work dir, so it is
        loaded as a trusted file (weights_only=False) for this call only."""
        import torch

        original = torch.load

        def trusted_load(*a, **k):
            k.setdefault("weights_only", False)
            return original(*a, **k)

        torch.load = trusted_load
        try:
            super().resume(filename, *args, **kwargs)
        finally:
            torch.load = original

    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        """Runner.save_checkpoint into ``filename + '.tmp'``, then an atomic rename to ``filename``."""
        tmp = filename + ".tmp"
        super().save_checkpoint(out_dir, tmp, *args, **kwargs)
        if is_main_process():
            os.replace(osp.join(out_dir, tmp), osp.join(out_dir, filename))
