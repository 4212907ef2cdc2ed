"""AGVM: Adaptive Gradient Variance Modulation for large-batch dense visual prediction.

Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022 (arXiv 2210.11078).
Depends on torch only; the OpenMMLab glue lives in ``agvm.mm`` and is imported only when used. The names below
are imported on first use, so torch-free parts (``agvm.fileio``, ``agvm.cli``, used by the SLURM launcher's
status and the tables) load without torch.
"""
import importlib

__version__ = "0.1.0"

_HOMES = {
    "AGVMSGD": "optim", "AGVMAdamW": "optim", "PMDLAMB": "optim", "create_optimizer": "optim",
    "param_groups": "grouping", "DEFAULT_MODULES": "grouping",
    "backward_two_halves": "two_halves", "TwoHalves": "two_halves",
    "Modulator": "variance", "module_stats": "variance", "phi_from_stats": "variance",
    "sgd_lr": "lr_scaling", "adamw_lr": "lr_scaling", "scale_lr": "lr_scaling", "default_interval": "lr_scaling",
}
__all__ = list(_HOMES)
_SUBMODULES = ("optim", "variance", "grouping", "two_halves", "lr_scaling", "distributed", "diagnose", "fileio",
               "cli", "cpu_stats", "mm")


def __getattr__(name):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:  # agvm.variance etc. without importing them first, as before the names were lazy
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'agvm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
