"""``AGVMRunner``: mmengine's Runner with atomic checkpoints and AGVM's model wrapping.

- Checkpoints (``agvm.mm.checkpoint``): ``save_checkpoint`` writes ``<name>.tmp``, records its SHA-256 in
  ``<name>.sha256`` and renames it, so a checkpoint file that exists is complete; it also stores every rank's
  random-number-generator state and the resolved config (``meta.rng_state``, ``meta.resolved_config``).
  ``latest_checkpoint`` picks the newest one that verifies. ``load_checkpoint`` (``load_from`` and resume) reads
  with ``weights_only=True`` and loads the model strictly; ``resume`` refuses a changed config (unless
  ``allow_config_change``), restores the generators, and continues mid-epoch at the right iteration
  (``agvm.mm.resume``).
- ``wrap_model``: with an AGVM optimizer and no second rank, the model is wrapped in
  ``AGVMTwoHalves`` (two micro-batches on measurement steps); under DDP on CPU, DDP gets ``device_ids=None``.
- An ``AGVMHook`` and a ``DivergenceHook`` are added when the config has none.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Optional

from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.model import MMDistributedDataParallel, is_model_wrapper
from mmengine.runner import Runner

from . import checkpoint as ckpt
from .hooks import AGVMHook, DivergenceHook
from .optim import AGVM_OPTIMIZERS, AGVMTwoHalves
from .resume import AGVMEpochBasedTrainLoop, AGVMIterBasedTrainLoop, RNGIsolationHook, seeded_loader

__all__ = ["AGVMRunner", "latest_checkpoint"]


def latest_checkpoint(work_dir: str) -> Optional[str]:
    """The newest checkpoint (``iter_N.pth`` / ``epoch_N.pth``) in ``work_dir`` that verifies, or None; damaged
    newer ones are skipped with a warning."""
    from mmengine.logging import print_log

    return ckpt.latest_intact(work_dir, warn=lambda msg: print_log(msg, logger="current", level=logging.WARNING))


class AGVMRunner(Runner):
    """mmengine Runner; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(h, AGVMHook) for h in self._hooks):
            self.register_hook(AGVMHook())
        if not any(isinstance(h, DivergenceHook) for h in self._hooks):
            self.register_hook(DivergenceHook())
        self.register_hook(RNGIsolationHook())
        self.unsafe_load = False  # set by agvm.mm.train: torch.load(weights_only=False) for a trusted file
        self.allow_config_change = False  # set by agvm.mm.train: resume although the config changed
        self._read_cache = None

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

    def _read(self, filename: str):
        if self._read_cache is None or self._read_cache[0] != filename:
            self._read_cache = (filename, ckpt.read(filename, unsafe=self.unsafe_load))
        return self._read_cache[1]

    def build_train_loop(self, loop):
        """mmengine's, with the training loader seeded per sample and loops that resume without replaying batches."""
        if isinstance(loop, dict) and isinstance(self._train_dataloader, dict):
            loop = dict(loop)
            if loop.get("type") == "EpochBasedTrainLoop" or loop.pop("by_epoch", None) is True:
                loop["type"] = AGVMEpochBasedTrainLoop
            elif loop.get("type", "IterBasedTrainLoop") == "IterBasedTrainLoop":
                loop["type"] = AGVMIterBasedTrainLoop
            diff_rank_seed = self._randomness_cfg.get("diff_rank_seed", False)
            loader = self.build_dataloader(self._train_dataloader, seed=self.seed, diff_rank_seed=diff_rank_seed)
            self._train_dataloader = seeded_loader(loader, self.seed)
        return super().build_train_loop(loop)

    def train(self):
        """Before anything is built from the seed: a resumed run takes the checkpoint's seed (the sampler's order
        and the per-sample seeds depend on it) and refuses a changed config (unless allow_config_change)."""
        if self._resume and self._load_from:
            meta = self._read(self._load_from).get("meta", {})
            saved = meta.get("resolved_config")
            if saved is None:
                self.logger.warning(f"{self._load_from} records no resolved config (written by an older version): "
                                    "config changes since then cannot be checked")
            else:
                diff = ckpt.config_diff(saved, ckpt.config_snapshot(self.cfg))
                if diff and not self.allow_config_change:
                    raise ckpt.CheckpointError(
                        f"the config differs from the one checkpoint {self._load_from} was trained with "
                        f"({'; '.join(diff[:12])}{'; ...' if len(diff) > 12 else ''}): run the same command as before, "
                        "use a new --work-dir, or pass --allow-config-change to resume with the new settings")
                if diff:
                    self.logger.warning("resuming with a changed config (--allow-config-change): " + "; ".join(diff))
            if meta.get("seed") is not None and meta["seed"] != self.seed:
                self._randomness_cfg.update(seed=meta["seed"])
                self.set_randomness(**self._randomness_cfg)
        return super().train()

    def load_checkpoint(self, filename: str, map_location="cpu", strict: bool = False, revise_keys=None):
        """Read ``filename`` (verified, weights_only=True), then a strict load into the model (``module.`` prefixes
        removed; the parts a stage hand-over marks as fresh may be missing). ``strict`` is always on."""
        checkpoint = self._read(filename)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        sd, meta = ckpt.extract_state_dict(checkpoint, filename)
        sd, _ = ckpt.remap_state_dict(sd, ckpt.detect_source(sd, meta), model_state=model.state_dict())
        fresh = (meta.get("handover") or {}).get("fresh", []) if not self._resume else []
        ckpt.load_into_model(model, sd, f"checkpoint {filename}", fresh=fresh)
        if not self._resume:
            self._read_cache = None
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint

    def resume(self, filename: str, *args, **kwargs) -> None:
        """Runner.resume through ``load_checkpoint``, then every generator restored to its state at the save."""
        super().resume(filename, *args, **kwargs)
        states = self._read(filename)["meta"].get("rng_state")
        self._read_cache = None
        rank, world = get_rank(), get_world_size()
        if not states or len(states) != world:
            self.logger.warning(f"{filename} holds no random-generator state for {world} rank(s) "
                                f"({len(states or [])} saved): the resumed run is not bit-identical to an "
                                "uninterrupted one")
            return
        ckpt.set_rng_state(states[rank])

    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        """Runner.save_checkpoint into ``filename + '.tmp'``, with every rank's generator state and the resolved
        config in its meta; then a checksum sidecar and an atomic rename to ``filename``."""
        states = [ckpt.rng_state()]
        if get_world_size() > 1:
            from mmengine.dist import all_gather_object

            states = all_gather_object(states[0])
        meta = dict(kwargs.pop("meta", None) or {})
        meta.update(rng_state=states, resolved_config=ckpt.config_snapshot(self.cfg))
        tmp = filename + ".tmp"
        super().save_checkpoint(out_dir, tmp, *args, meta=meta, **kwargs)
        if is_main_process():
            ckpt.finalize(osp.join(out_dir, tmp), osp.join(out_dir, filename))
            for name in os.listdir(out_dir):  # sidecars of checkpoints that max_keep_ckpts removed
                if name.endswith(".pth.sha256") and not osp.exists(osp.join(out_dir, name[:-len(".sha256")])):
                    os.remove(osp.join(out_dir, name))
