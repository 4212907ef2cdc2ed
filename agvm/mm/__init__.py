"""OpenMMLab (mmengine / mmdet / mmseg) integration of AGVM.

``register_all()`` makes every piece available by name to configs (registries of mmengine's root, so
mmdet / mmseg scopes find them too):

============================  ===================================  =====================================
registry                      name                                 what
============================  ===================================  =====================================
OPTIMIZERS                    AGVMSGD, AGVMAdamW, PMDLAMB          ``agvm.*`` (same keyword arguments)
OPTIMIZERS                    Lars, Lamb                           ``timm.optim.Lars`` / ``timm.optim.Lamb``
OPTIM_WRAPPER_CONSTRUCTORS    AGVMOptimWrapperConstructor          param groups via ``agvm.param_groups``
OPTIM_WRAPPERS                AGVMOptimWrapper, AGVMAmpOptimWrapper  two-half step in one process (+ clip_window)
OPTIM_WRAPPERS                ClipWindowOptimWrapper               OptimWrapper with clip_window
PARAM_SCHEDULERS              ExpWarmupLR                          exponential warm-up (authors' code)
MODEL_WRAPPERS                AGVMTwoHalves                        one-process two-micro-batch train_step
HOOKS                         AGVMHook                             DDP hook + Phi/mu logging
HOOKS                         DivergenceHook                       stops a run whose loss turns NaN / Inf
DATASETS                      SyntheticStream                      fresh generated training images
RUNNERS                       AGVMRunner                           atomic checkpoints, model wrapping
============================  ===================================  =====================================

It also installs the ``panopticapi`` stand-in (``agvm.mm.panoptic``) used by mmdet's panoptic
dataset and PQ metric. Importing ``agvm.mm.registry`` calls it (configs list that module in
``custom_imports``).
"""
from __future__ import annotations

_DONE = False


def register_all() -> None:
    """Register AGVM's optimizers, wrappers, hook and runner with mmengine (idempotent)."""
    global _DONE
    if _DONE:
        return
    import agvm._compat

    agvm._compat.apply()
    from . import panoptic

    panoptic.install()
    from mmengine.registry import (DATASETS, HOOKS, MODEL_WRAPPERS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS,
                                   PARAM_SCHEDULERS, RUNNERS)
    from timm.optim import Lamb, Lars

    import agvm

    from .hooks import AGVMHook, DivergenceHook
    from .optim import (AGVMAmpOptimWrapper, AGVMOptimWrapper, AGVMOptimWrapperConstructor, AGVMTwoHalves,
                        ClipWindowOptimWrapper)
    from .runner import AGVMRunner
    from .schedulers import ExpWarmupLR, ExpWarmupParamScheduler
    from .synthetic import SyntheticStream

    for name, cls in (("AGVMSGD", agvm.AGVMSGD), ("AGVMAdamW", agvm.AGVMAdamW), ("PMDLAMB", agvm.PMDLAMB),
                      ("Lars", Lars), ("Lamb", Lamb)):
        existing = OPTIMIZERS.get(name) if name in OPTIMIZERS.module_dict else None
        if existing is not None and existing is not cls:
            raise KeyError(f"mmengine already has an optimizer named {name!r} ({existing}); cannot register {cls}")
        OPTIMIZERS.register_module(name=name, module=cls, force=True)
    OPTIM_WRAPPER_CONSTRUCTORS.register_module(module=AGVMOptimWrapperConstructor, force=True)
    OPTIM_WRAPPERS.register_module(module=AGVMOptimWrapper, force=True)
    OPTIM_WRAPPERS.register_module(module=AGVMAmpOptimWrapper, force=True)
    OPTIM_WRAPPERS.register_module(module=ClipWindowOptimWrapper, force=True)
    PARAM_SCHEDULERS.register_module(module=ExpWarmupLR, force=True)
    PARAM_SCHEDULERS.register_module(module=ExpWarmupParamScheduler, force=True)
    MODEL_WRAPPERS.register_module(module=AGVMTwoHalves, force=True)
    HOOKS.register_module(module=AGVMHook, force=True)
    HOOKS.register_module(module=DivergenceHook, force=True)
    RUNNERS.register_module(module=AGVMRunner, force=True)
    from .amp import patch_mmcv_bf16

    patch_mmcv_bf16()  # bf16 autocast through mmcv's RoIAlign / nms (float32 detours)
    DATASETS.register_module(module=SyntheticStream, force=True)
    _DONE = True
