"""Single-process AGVM: the two half-batch gradients from two backward passes (micro-batches).

In a distributed run the two estimates come from two halves of the ranks (``agvm.distributed``).
In one process, give the loss of each half of the batch and of the whole batch as closures:

    loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(batch_a), lambda: loss_fn(batch_b),
                                            loss=lambda: loss_fn(batch))
    opt.step(halves=halves)          # or scaler.step(opt, halves=halves) with torch.amp

Off measurement steps this is one backward of the whole batch (what plain training costs) and ``halves``
is None. On measurement steps the two halves run separately; afterwards ``p.grad`` holds the mean gradient
of the whole batch and ``halves`` is ``(ga, None)``, where ``ga`` is half A's gradient and the optimizer
derives half B's per tensor (``2 * p.grad - ga``), so the step costs one gradient-sized buffer (``ga``)
beyond plain training. Without ``loss`` every step runs the two halves (the two-pass option: mmdet's
losses, normalised by the number of samples / positives in the batch, are then normalised the same way on
every step, at the cost of a second, half-size forward/backward per step).

``TwoHalves`` is the piece underneath for training loops that run the backward themselves (gradient
accumulation, loss scaling, mmengine's optim wrapper: ``agvm.mm.optim``)::

    two = agvm.TwoHalves(opt)
    for micro_batch in window:                   # accumulation: half A's gradient is summed over the window
        with two.half_a():                       # on measurement steps the gradient goes to half A's buffer
            backward(w_a * loss_fn(part_a))      # any backward: scaled by a GradScaler, divided by k, ...
        backward(w_b * loss_fn(part_b))          # into p.grad, as usual
    opt.step(halves=two.pop(scale))              # p.grad += half A; None off measurement steps

The weights w_a, w_b (n_a / n, n_b / n: unequal halves for odd batches) make p.grad the batch's mean
gradient; ``pop`` returns half A's gradient scaled by 2 w_a (Phi, a cosine, does not depend on the scale).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch

__all__ = ["TwoHalves", "backward_two_halves"]


class TwoHalves:
    """Keeps half A's gradient apart from ``p.grad`` on measurement steps (see the module docstring).

    Memory: half A's buffer replaces ``p.grad`` while half A runs (the tensors are moved, not copied), so a
    measurement step holds at most one gradient-sized buffer more than plain training.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._ga: Optional[List[Optional[torch.Tensor]]] = None  # half A's gradient, summed over the window

    @property
    def pending(self) -> bool:
        """True while half A's gradient waits for ``pop``."""
        return self._ga is not None

    @contextmanager
    def half_a(self):
        """Backward passes inside accumulate into half A's buffer on a measurement step (else into p.grad)."""
        if not self.optimizer.should_measure():
            yield
            return
        params = self.optimizer.params_in_order()
        rest = [p.grad for p in params]  # half B so far (and earlier micro-batches' B halves)
        ga, self._ga = self._ga or [None] * len(params), None
        for p, a in zip(params, ga):
            p.grad = a
        del ga
        try:
            yield
        finally:
            self._ga = [p.grad for p in params]
            for p, b in zip(params, rest):
                p.grad = b

    @torch.no_grad()
    def pop(self, scale: float = 1.0, derive_b: bool = False) -> Optional[tuple]:
        """Add half A's gradient to ``p.grad`` in place and return ``(ga, None)`` for ``step(halves=...)``,
        or None when no half A was kept. ``scale``: the loss scale the backward passes used (a GradScaler's
        ``get_scale()``): ``ga`` is returned unscaled, as ``p.grad`` will be after ``scaler.unscale_``.
        ``derive_b=True`` returns ``(ga, gb)`` with gb = 2 p.grad - ga materialised now (one more gradient-sized
        buffer): needed when p.grad changes before the step other than by the scaler or by one common factor
        (clipping by norm: scale ga by the same factor instead, as ``agvm.mm``'s optim wrappers do; clipping by
        value needs derive_b)."""
        ga, self._ga = self._ga, None
        if ga is None:
            return None
        params = self.optimizer.params_in_order()
        for p, a in zip(params, ga):
            if a is None:
                continue
            if p.grad is None:  # only half A reached p
                p.grad = a.clone()
            else:
                p.grad.add_(a)
            a.mul_(2.0 / scale)
        if not derive_b:
            return ga, None
        return ga, [None if p.grad is None else p.grad * (2.0 / scale) - (0 if a is None else a)
                    for p, a in zip(params, ga)]


def backward_two_halves(
    optimizer,
    loss_a: Callable[[], torch.Tensor],
    loss_b: Callable[[], torch.Tensor],
    scaler: Optional["torch.amp.GradScaler"] = None,
    *,
    loss: Optional[Callable[[], torch.Tensor]] = None,
    weights: Sequence[float] = (0.5, 0.5),
) -> Tuple[torch.Tensor, Optional[tuple]]:
    """Zero the gradients, then backward one batch; returns (the batch's mean loss, halves or None).

    Args:
        loss_a, loss_b: closures returning the mean loss of each half of the batch.
        scaler: a ``torch.amp.GradScaler``: the scaled losses are back-propagated.
        loss: a closure returning the whole batch's mean loss; off measurement steps it is the only pass.
            Without it both halves run on every step.
        weights: the halves' shares of the batch (n_a / n, n_b / n), summing to 1.
    Half B is derived in the step from p.grad: to clip p.grad before the step, use ``TwoHalves``, and scale
    ``ga`` by the clipping factor (by norm) or ``pop(derive_b=True)`` (by value), as ``agvm.mm``'s wrappers do.
    """
    if len(weights) != 2 or abs(sum(weights) - 1.0) > 1e-6 or min(weights) <= 0:
        raise ValueError(f"weights must be the two halves' shares of the batch (n_a / n, n_b / n), got {weights}")

    def backward(value: torch.Tensor) -> None:
        (scaler.scale(value) if scaler is not None else value).backward()

    optimizer.zero_grad(set_to_none=True)
    if loss is not None and not optimizer.should_measure():
        value = loss()
        backward(value)
        return value.detach(), None
    two = TwoHalves(optimizer)
    with two.half_a():
        la = loss_a()
        backward(la * weights[0])
    lb = loss_b()
    backward(lb * weights[1])
    halves = two.pop(scaler.get_scale() if scaler is not None else 1.0)
    return (la.detach() * weights[0] + lb.detach() * weights[1]), halves
