"""Adapters giving other training functions the one entry-point signature the launcher calls:
``fn(config, work_dir, cfg_options=None, resume=True, launcher="none") -> dict`` (see ``agvm.mm.train.train``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["uninet_pretrain"]


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
