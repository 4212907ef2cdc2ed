"""AGVM-SGD: SGD with momentum whose per-module learning rates follow the gradient-variance ratio.

Paper: "Large-batch Optimization for Dense Visual Predictions", Xue et al., NeurIPS 2022
(arXiv 2210.11078), appendix Alg. 1 with Eq. 41-42.

Every ``interval`` steps the variance Phi_i = 1 - cos(G_a^(i), G_b^(i)) of each module i is estimated
from two half-batch gradients, and module i's learning rate becomes eta_t * mu_i with

    mu~_i = clip(sqrt((Phi_anchor + var_eps) / (Phi_i + var_eps)), *mu_clip)
    mu_i <- alpha * mu_i + (1 - alpha) * mu~_i

The update is exactly torch.optim.SGD's with lr = group lr * mu_i.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._base import AGVMMixin


class AGVMSGD(AGVMMixin, torch.optim.SGD):
    """torch.optim.SGD with AGVM: the same arguments in the same order with the same defaults, then
    AGVM's, keyword-only.

    Args:
        params: param groups, each with a ``"module"`` key (see ``agvm.param_groups``).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused: as
            torch.optim.SGD, except that ``fused=None`` with ``foreach=None`` (the defaults) selects
            torch's fused kernel whenever every parameter is a floating-point tensor on a device that
            has one (CPU and CUDA); pass ``fused=False`` for torch's own default implementation.
        interval: tau, measure every ``interval`` steps (a step t, counted from 1, measures when
            t % interval == phase).
        alpha: momentum of mu (Eq. 42), in [0, 1).
        mu_clip: (low, high) clip of mu~ (appendix A.6: (0.1, 10)).
        var_eps: epsilon added to both variances in the ratio.
        anchor: the module the others are aligned to (the backbone).
        ratio_clip: the authors' code variant, clip of the variance ratio before the square root,
            e.g. (0.5, 10.0); None follows the appendix.
        start_iter: mu stays 1 before this step (Phi is still measured); the authors' runs start
            AGVM after warm-up.
        phase: in [0, interval); 1 reproduces the authors' code (0-based counter: measures at t = 1, tau + 1, ...).
    """

    def __init__(
        self,
        params,
        lr: Union[float, torch.Tensor] = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: Union[float, torch.Tensor] = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        interval: int = 10,
        alpha: float = 0.97,
        mu_clip: Tuple[float, float] = (0.1, 10.0),
        var_eps: float = 1e-8,
        anchor: str = "backbone",
        ratio_clip: Optional[Tuple[float, float]] = None,
        start_iter: int = 0,
        phase: int = 0,
    ):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        self._agvm_init(interval, alpha, mu_clip, var_eps, anchor, ratio_clip, start_iter, phase, fused, foreach)
