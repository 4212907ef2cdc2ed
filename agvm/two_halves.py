"""Single-process AGVM: the two half-batch gradients from two backward passes (micro-batches).

In a distributed run the two estimates come from two halves of the ranks (``agvm.distributed``).
In one process, split each batch into two equal halves and call:

    loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(batch_a), lambda: loss_fn(batch_b))
    opt.step(halves=halves)          # or scaler.step(opt, halves=halves) with torch.amp

Each closure returns the mean loss of its half. Afterwards ``p.grad`` holds the mean gradient of the
whole batch; ``halves`` is ``(ga, gb)`` on measurement steps and ``None`` otherwise, so plain steps
cost one accumulated backward per half and no copies.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

__all__ = ["backward_two_halves"]


def backward_two_halves(
    optimizer,
    loss_a: Callable[[], torch.Tensor],
    loss_b: Callable[[], torch.Tensor],
    scaler: Optional["torch.amp.GradScaler"] = None,
) -> Tuple[torch.Tensor, Optional[Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]]]:
    """Backward over two equal halves of a batch; returns (mean loss, halves or None).

    The optimizer's gradients are zeroed first (set to None). With a GradScaler, the scaled losses are back-propagated
    (the halves are then scaled too; Phi, a cosine, does not depend on the scale).
    """
    params = optimizer.params_in_order()
    optimizer.zero_grad(set_to_none=True)

    def backward(closure):
        loss = closure()
        (scaler.scale(loss) if scaler is not None else loss).mul(0.5).backward()
        return loss.detach()

    if not optimizer.should_measure():
        return (backward(loss_a) + backward(loss_b)) / 2, None

    la = backward(loss_a)
    ga = [None if p.grad is None else p.grad * 2 for p in params]  # half A's own mean gradient
    optimizer.zero_grad(set_to_none=True)
    lb = backward(loss_b)
    gb = [None if p.grad is None else p.grad * 2 for p in params]
    for p, a, b in zip(params, ga, gb):
        if a is not None and b is not None:
            p.grad = (a + b) / 2
        else:  # a parameter used by one half only: the other half's gradient is zero
            p.grad = None if a is None and b is None else (a if b is None else b) / 2
    return (la + lb) / 2, (ga, gb)
