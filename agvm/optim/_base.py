"""What AGVM adds to a torch optimizer: the step counter, the measurement, and per-module lr scaling.

The update itself is the base class's (torch.optim.SGD / AdamW, so its foreach/fused kernels are
used unchanged): during ``step()`` each group's ``lr`` is multiplied by its module's mu and restored
afterwards, so the ``lr`` a scheduler writes is never changed by the optimizer.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..variance import Modulator, module_stats

Halves = Tuple[Sequence[Optional[torch.Tensor]], Sequence[Optional[torch.Tensor]]]


class AGVMMixin:
    """Mixed in before a ``torch.optim.Optimizer`` subclass; see ``AGVMSGD`` for the arguments."""

    # set by ``agvm.distributed.register_hook``: an object with ``stats(optimizer, t) -> [M, 3] tensor``
    estimator = None

    def _agvm_init(
        self,
        interval: int,
        alpha: float,
        mu_clip: Tuple[float, float],
        var_eps: float,
        anchor: str,
        ratio_clip: Optional[Tuple[float, float]],
        start_iter: int,
        phase: int = 0,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < interval:
            raise ValueError(f"phase must be an integer in [0, interval={interval}), got {phase!r}")
        self.interval = interval
        self.phase = phase
        modules: List[str] = []
        for g in self.param_groups:
            if g["module"] not in modules:
                modules.append(g["module"])
        self.modulator = Modulator(modules, anchor, alpha, mu_clip, var_eps, ratio_clip, start_iter)
        self.t = 0

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict) or "module" not in param_group:
            raise ValueError(
                f"{type(self).__name__}: every param group needs a \"module\" key naming the network module it "
                "belongs to (e.g. {'params': ..., 'module': 'backbone'}); build the groups with "
                "agvm.param_groups(model)"
            )
        if not isinstance(param_group["module"], str) or not param_group["module"]:
            raise ValueError(f"\"module\" must be a non-empty string, got {param_group['module']!r}")
        if hasattr(self, "modulator") and param_group["module"] not in self.modulator.modules:
            raise ValueError(
                f"cannot add a group for the new module {param_group['module']!r} after construction; "
                f"the optimizer's modules are {self.modulator.modules}"
            )
        super().add_param_group(param_group)

    # -- public API ---------------------------------------------------------------------------------
    @property
    def modules(self) -> List[str]:
        return list(self.modulator.modules)

    @property
    def modulation(self) -> Dict[str, float]:
        """mu per module after the last measurement (1.0 before the first)."""
        return dict(self.modulator.mu)

    @property
    def variance(self) -> Dict[str, float]:
        """Phi per module from the last measurement (empty before the first)."""
        return dict(self.modulator.phi)

    def is_measurement_step(self, t: int) -> bool:
        """True iff step ``t`` (counted from 1) measures: ``t % interval == phase``. phase=0 measures at
        t = tau, 2 tau, ...; phase=1 at t = 1, tau + 1, ... (the authors' code, whose counter starts at 0)."""
        return t % self.interval == getattr(self, "phase", 0)

    def should_measure(self) -> bool:
        """True iff the next ``step()`` is a measurement step."""
        return self.is_measurement_step(self.t + 1)

    def params_in_order(self) -> List[torch.Tensor]:
        """The optimizer's parameters in param-group order: the order ``halves`` must follow."""
        return [p for g in self.param_groups for p in g["params"]]

    def module_ids(self) -> List[int]:
        index = {m: i for i, m in enumerate(self.modulator.modules)}
        return [index[g["module"]] for g in self.param_groups for _ in g["params"]]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, halves: Optional[Halves] = None):
        """One update. On a measurement step, ``halves=(ga, gb)`` are the mean gradients of the two
        halves of the batch (one tensor or None per parameter, in ``params_in_order()``), unless a
        distributed estimator is registered; on other steps ``halves`` is ignored."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.t + 1
        if self.is_measurement_step(t):
            self.modulator.update(self._measure(halves, t), t)
        self.t = t
        with self._modulated_lr():
            super().step()
        return loss

    # -- internals ----------------------------------------------------------------------------------
    def _measure(self, halves: Optional[Halves], t: int) -> torch.Tensor:
        if halves is None:
            if self.estimator is not None:
                return self.estimator.stats(self, t)
            raise RuntimeError(
                f"{type(self).__name__}: step {t} is a measurement step (interval={self.interval}, "
                f"phase={self.phase}) but no "
                "halves were given. Pass step(halves=(ga, gb)) when should_measure() is True (see "
                "agvm.backward_two_halves), or register the DDP hook with agvm.distributed.register_hook."
            )
        ga, gb = halves
        return module_stats(ga, gb, self.module_ids(), len(self.modulator.modules), self._stat_denominators())

    def _stat_denominators(self) -> Optional[Callable[[int, torch.Tensor], torch.Tensor]]:
        """``denom(k, out)`` for ``module_stats``: the element-wise divisor of parameter k's halves
        (AdamW's preconditioner); None for SGD."""
        return None

    @contextmanager
    def _modulated_lr(self):
        mu = self.modulator.mu
        saved = [g["lr"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                m = mu[g["module"]]
                if m != 1.0:
                    g["lr"] = g["lr"] * m
            yield
        finally:
            for g, lr in zip(self.param_groups, saved):
                g["lr"] = lr

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["agvm"] = {"t": self.t, **self.modulator.state_dict()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        agvm_state = state_dict.pop("agvm", None)
        super().load_state_dict(state_dict)
        if agvm_state is not None:
            self.modulator.load_state_dict(agvm_state)
            self.t = int(agvm_state["t"])
