"""AGVM-AdamW: AdamW whose per-module learning rates follow the preconditioned gradient variance.

Paper: "Large-batch Optimization for Dense Visual Predictions", Xue et al., NeurIPS 2022
(arXiv 2210.11078), appendix Alg. 2 with Eq. 41-42.

As AGVM-SGD, except that Phi is measured on the preconditioned half gradients: each element is
divided by sqrt(v_t) + eps, where v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2 is the second moment
after this step's update (g_t the full-batch mean gradient in ``p.grad``). The update is exactly
torch.optim.AdamW's with lr = group lr * mu_i (weight decay included, as in Alg. 2).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..variance import adam_denominator
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
        foreach: Optional[bool] = None,
        maximize: bool = False,
        fused: Optional[bool] = None,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, fused=fused)
        self._agvm_init(interval, alpha, mu_clip, var_eps, anchor, ratio_clip, start_iter)

    def _stat_denominators(self) -> List[Optional[torch.Tensor]]:
        """sqrt(v_t) + eps per parameter, v_t the second moment this step's update will hold.

        Computed from v_{t-1} (zero before the first step) and p.grad without touching the state, so
        the measurement sees the v_t of Alg. 2 and the update stays torch's own.
        """
        out: List[Optional[torch.Tensor]] = []
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            dens = iter(adam_denominator([p.grad for p in params], [self.state.get(p, {}).get("exp_avg_sq") for p in params],
                                         g["betas"][1], g["eps"]) if params else [])
            out += [None if p.grad is None else next(dens) for p in g["params"]]
        return out
