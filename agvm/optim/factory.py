"""Build any optimizer of the paper's comparisons by name, from the same param groups.

LARS and LAMB are timm's (imported only when asked for); PMD-LAMB and the AGVM optimizers are ours;
SGD and AdamW are torch's. Param groups may carry AGVM's ``"module"`` key: the others ignore it.

Gradient clipping is never inside an optimizer built here, so that baselines compare on equal terms: timm's
``Lamb`` clips the global gradient norm at 1.0 by default (``max_grad_norm=1.0``) while LARS, PMD-LAMB, SGD and
AdamW do not, so ``create_optimizer("lamb", ...)`` passes ``max_grad_norm=None`` unless the caller gives a value.
Clip outside, the same for every optimizer (``torch.nn.utils.clip_grad_norm_``, mmengine's ``clip_grad``).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .agvm_adamw import AGVMAdamW
from .agvm_sgd import AGVMSGD
from .pmd_lamb import PMDLAMB


def _timm(name: str) -> Callable:
    def build(params, **kw):
        try:
            import timm.optim
        except ImportError as e:
            raise ImportError(f"optimizer {name!r} is timm's: `pip install timm` (and see README set-up)") from e
        return getattr(timm.optim, name)(params, **kw)

    return build


OPTIMIZERS: Dict[str, Callable] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "agvm_sgd": AGVMSGD,
    "agvm_adamw": AGVMAdamW,
    "lars": _timm("Lars"),
    "lamb": _timm("Lamb"),
    "pmd_lamb": PMDLAMB,
}


def create_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """``create_optimizer("agvm_sgd", agvm.param_groups(model), lr=0.32, momentum=0.9, ...)``."""
    key = name.lower().replace("-", "_")
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if key not in ("agvm_sgd", "agvm_adamw") and isinstance(params, list):
        params = [{k: v for k, v in g.items() if k != "module"} if isinstance(g, dict) else g for g in params]
    if key == "lamb":
        kwargs.setdefault("max_grad_norm", None)  # timm's default 1.0 would clip LAMB alone (module docstring)
    return OPTIMIZERS[key](params, **kwargs)
