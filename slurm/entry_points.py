"""Adapters giving other training functions the one entry-point signature the launcher calls:
``fn(config, work_dir, cfg_options=None, resume=True, launcher="none") -> dict`` (see ``agvm.mm.train.train``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["uninet_pretrain", "train_with_diagnosis"]


def uninet_pretrain(config: str, work_dir: str, cfg_options: Optional[Dict[str, Any]] = None, resume: bool = True,
                    launcher: str = "none") -> Dict[str, Any]:
    """Stage 1 of UniNet-G (ImageNet-22K pre-training, ``models.pretrain``) with the launcher's signature.

    ``cfg_options`` become ``models.pretrain`` overrides (``data.batch_per_gpu=64``, ``train.seed=0``); the
    process group (several ranks) is already initialised by the launcher, which ``models.pretrain`` uses.
    Writes ``<work_dir>/metrics.json`` and the hand-over export named by the config's ``export_name``.
    """
    from models.pretrain import load_config, train

    overrides = [f"{k}={v!r}" for k, v in (cfg_options or {}).items()]
    cfg = load_config(config, overrides)
    return train(cfg, work_dir=work_dir, resume=resume)


def train_with_diagnosis(config: str, work_dir: str, cfg_options: Optional[Dict[str, Any]] = None, resume: bool = True,
                         launcher: str = "none", images: int = 128) -> Dict[str, Any]:
    """``agvm.mm.train.train`` between two variance diagnoses (``agvm.mm.diagnose``, ``images`` per-image gradients
    shared over the ranks): of the initial weights into ``<work_dir>/diagnosis_init/`` (skipped once training has
    a checkpoint) and of the final checkpoint into ``<work_dir>/diagnosis_final/``: the predicted Phi_i(b) beside
    the Phi the run measures (``experiments/fig1_4_variance``). A requeued job skips a diagnosis already written."""
    import os.path as osp

    import torch.distributed as dist

    from agvm.diagnose import PAPER_BATCHES
    from agvm.mm.diagnose import run as diagnose
    from agvm.mm.runner import latest_checkpoint
    from agvm.mm.train import train

    world = dist.get_world_size() if dist.is_initialized() else 1
    per_rank = (cfg_options or {}).get("train_dataloader.batch_size")
    batches = sorted(set(PAPER_BATCHES) | ({int(per_rank) * world} if per_rank else set()))
    init, final = osp.join(work_dir, "diagnosis_init"), osp.join(work_dir, "diagnosis_final")
    if latest_checkpoint(work_dir) is None and not osp.isfile(osp.join(init, "diagnosis.json")):
        diagnose(config, images, None, init, cfg_options, launcher=launcher, batches=batches)
    metrics = train(config, work_dir, cfg_options=cfg_options, resume=resume, launcher=launcher)
    if not osp.isfile(osp.join(final, "diagnosis.json")):
        diagnose(config, images, latest_checkpoint(work_dir), final, cfg_options, launcher=launcher, batches=batches)
    return metrics
