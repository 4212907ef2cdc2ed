"""AGVM-AdamW: AdamW whose per-module learning rates follow the preconditioned gradient variance.

Paper: "Large-batch Optimization for Dense Visual Predictions", Xue et al., NeurIPS 2022
(arXiv 2210.11078), appendix Alg. 2 with Eq. 41-42.

As AGVM-SGD, except that Phi is measured on the preconditioned half gradients: each element is
divided by sqrt(v_t) + eps, where v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2 is the second moment
after this step's update (g_t the full-batch mean gradient in ``p.grad``). The update is exactly
torch.optim.AdamW's with lr = group lr * mu_i (weight decay included, as in Alg. 2).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from ._base import AGVMMixin


class AGVMAdamW(AGVMMixin, torch.optim.AdamW):
    """torch.optim.AdamW with AGVM: the same arguments in the same order with the same defaults, then
    AGVM's, keyword-only (see ``AGVMSGD`` for them and for ``fused=None``)."""

    def __init__(
        self,
        params,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
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
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)
        self._agvm_init(interval, alpha, mu_clip, var_eps, anchor, ratio_clip, start_iter, phase, fused, foreach)

    def _preconditioner(self) -> List[Tuple[Optional[torch.Tensor], float, float]]:
        """(v_{t-1}, beta2, eps) per parameter: the measurement divides the halves by sqrt(v_t) + eps, v_t the
        second moment this step's update will hold, computed from v_{t-1} (None before the first step) and
        p.grad in the same pass without touching the state, so the measurement sees the v_t of Alg. 2 and
        the update stays torch's own."""
        return [(self.state.get(p, {}).get("exp_avg_sq"), float(g["betas"][1]), g["eps"])
                for g in self.param_groups for p in g["params"]]
