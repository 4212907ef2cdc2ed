"""AGVM: Adaptive Gradient Variance Modulation for large-batch dense visual prediction.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022 (arXiv 2210.11078).
Depends on torch only; the OpenMMLab glue lives in ``agvm.mm`` and is imported only when used.
"""
from .lr_scaling import adamw_lr, default_interval, scale_lr, sgd_lr
from .optim import AGVMSGD, PMDLAMB, AGVMAdamW, create_optimizer
from .param_groups import DEFAULT_MODULES, param_groups
from .two_halves import TwoHalves, backward_two_halves
from .variance import Modulator, module_stats, phi_from_stats

__version__ = "0.1.0"

__all__ = [
    "AGVMSGD", "AGVMAdamW", "PMDLAMB", "create_optimizer", "param_groups", "DEFAULT_MODULES", "backward_two_halves", "TwoHalves",
    "Modulator", "module_stats", "phi_from_stats", "sgd_lr", "adamw_lr", "scale_lr", "default_interval",
]


def __getattr__(name):  # agvm.distributed is imported lazily (it pulls in torch.distributed)
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'agvm' has no attribute {name!r}")
