"""AGVM-AdamW: AdamW whose per-module learning rates follow the preconditioned gradient variance.

Paper: "Large-batch Optimization for Dense Visual Predictions", Xue et al., NeurIPS 2022
(arXiv 2210.11078), appendix Alg. 2 with Eq. 41-42.

As AGVM-SGD, except that Phi is measured on the preconditioned half gradients: each element is
divided by sqrt(v_t) + eps, where v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2 is the second moment
after this step's update (g_t the full-batch mean gradient in ``p.grad``). The update is exactly
torch.optim.AdamW's with lr = group lr * mu_i (weight decay included, as in Alg. 2).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..variance import adam_denominator_
from ._base import AGVMMixin


class AGVMAdamW(AGVMMixin, torch.optim.AdamW):
    """AdamW (torch.optim.AdamW semantics) with AGVM; see ``AGVMSGD`` for the AGVM arguments."""

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.05,
        amsgrad: bool = False,
        *,
        interval: int = 10,
        alpha: float = 0.97,
        mu_clip: Tuple[float, float] = (0.1, 10.0),
        var_eps: float = 1e-8,
        anchor: str = "backbone",
        ratio_clip: Optional[Tuple[float, float]] = None,
        start_iter: int = 0,
        phase: int = 0,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        fused: Optional[bool] = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, fused=fused)
        self._agvm_init(interval, alpha, mu_clip, var_eps, anchor, ratio_clip, start_iter, phase)

    def _stat_denominators(self) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``denom(k, out)``: sqrt(v_t) + eps of parameter k, v_t the second moment this step's update
        will hold, computed from v_{t-1} (zero before the first step) and p.grad without touching the
        state, so the measurement sees the v_t of Alg. 2 and the update stays torch's own."""
        where = [(p, g["betas"][1], g["eps"]) for g in self.param_groups for p in g["params"]]

        def denom(k: int, out: torch.Tensor) -> torch.Tensor:
            p, beta2, eps = where[k]
            return adam_denominator_(p.grad, self.state.get(p, {}).get("exp_avg_sq"), beta2, eps, out=out)

        return denom
