"""PMD-LAMB: LAMB with periodical moments decay, the strongest large-batch baseline of the AGVM paper.

Paper: "Large Batch Optimization for Object Detection: Training COCO in 12 Minutes", Wang et al.,
ECCV 2020. Only its abstract is public: PMD-LAMB "periodically decays moments" to reduce the effect of
lagging historical gradients. The decay rule below is therefore a reconstruction, with every choice a
parameter: every ``decay_interval`` steps both moments are multiplied by ``moment_decay``
(gamma_m, gamma_v); a factor of 0 resets a moment and restarts its bias correction.

The LAMB part (You et al., "Large Batch Optimization for Deep Learning", arXiv 1904.00962), per tensor:
    m_t = beta1 m + (1 - beta1) g,   v_t = beta2 v + (1 - beta2) g^2
    r = m_hat / (sqrt(v_hat) + eps),  u = r + lambda w
    w <- w - lr * phi(||w||) / ||u|| * u,   trust ratio 1 where ||w|| or ||u|| is 0
with phi(z) = clip(z, 0, trust_clip) (identity when trust_clip is None).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


class PMDLAMB(torch.optim.Optimizer):
    """LAMB with periodical moments decay.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: LAMB's (beta1, beta2).
        eps: added to sqrt(v_hat).
        weight_decay: decoupled into the trust-ratio update (LAMB's lambda).
        decay_interval: decay the moments every this many steps (0 disables: plain LAMB).
        moment_decay: (gamma_m, gamma_v) in [0, 1]; 0 resets the moment and its bias correction.
        trust_clip: upper bound of phi(||w||); None for no bound.
        bias_correction: use Adam's bias correction.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        decay_interval: int = 0,
        moment_decay: Tuple[float, float] = (0.0, 0.0),
        trust_clip: Optional[float] = None,
        bias_correction: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if decay_interval < 0:
            raise ValueError(f"decay_interval must be >= 0 (0 disables the decay), got {decay_interval}")
        if not all(0.0 <= d <= 1.0 for d in moment_decay):
            raise ValueError(f"moment_decay factors must be in [0, 1], got {moment_decay}")
        if trust_clip is not None and trust_clip <= 0:
            raise ValueError(f"trust_clip must be > 0 or None, got {trust_clip}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay_interval=decay_interval,
                        moment_decay=tuple(moment_decay), trust_clip=trust_clip, bias_correction=bias_correction)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decay_interval", 0)
            group.setdefault("moment_decay", (0.0, 0.0))
            group.setdefault("trust_clip", None)
            group.setdefault("bias_correction", True)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            gamma_m, gamma_v = group["moment_decay"]
            interval = group["decay_interval"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("PMDLAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["step_m"] = 0  # steps since the last reset of m (bias correction)
                    state["step_v"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if interval and state["step"] > 0 and state["step"] % interval == 0:
                    m.mul_(gamma_m)
                    v.mul_(gamma_v)
                    if gamma_m == 0.0:
                        state["step_m"] = 0
                    if gamma_v == 0.0:
                        state["step_v"] = 0
                state["step"] += 1
                state["step_m"] += 1
                state["step_v"] += 1
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat = m / (1 - beta1 ** state["step_m"])
                    denom = (v / (1 - beta2 ** state["step_v"])).sqrt_().add_(group["eps"])
                else:
                    m_hat, denom = m, v.sqrt().add_(group["eps"])
                update = m_hat.div_(denom) if m_hat is not m else m_hat / denom
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm = p.norm()
                if group["trust_clip"] is not None:
                    w_norm = w_norm.clamp(max=group["trust_clip"])
                u_norm = update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss
