"""What AGVM adds to a torch optimizer: the step counter, the measurement, and per-module lr scaling.

The update itself is the base class's (torch.optim.SGD / AdamW, with its fused / foreach / for-loop
kernels unchanged): during ``step()`` each group's ``lr`` is multiplied by its module's mu and
restored afterwards, so the ``lr`` a scheduler writes is never changed by the optimizer. Everything
else keeps torch.optim's contract: step hooks run once per step, ``state_dict`` / ``load_state_dict``
hooks see the ``"agvm"`` entry, pickling and ``copy.deepcopy`` keep t and mu, and a plain torch
state_dict loads (the modules stay those of the constructed groups).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import _default_to_fused_or_foreach

from ..variance import Modulator, module_stats

Halves = Tuple[Sequence[Optional[torch.Tensor]], Optional[Sequence[Optional[torch.Tensor]]]]

logger = logging.getLogger("agvm")

# AGVM's own attributes: pickled with the optimizer (torch's __getstate__ keeps only defaults, state, groups)
_PICKLED = ("t", "interval", "phase", "modulator")


class AGVMMixin:
    """Mixed in before a ``torch.optim.Optimizer`` subclass; see ``AGVMSGD`` for the arguments."""

    # set by ``agvm.distributed.register_hook``: an object with ``stats(optimizer, t) -> [M, 3] tensor``;
    # not pickled (it holds process groups): register the hook again on a copy
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
        phase: int,
        fused: Optional[bool],
        foreach: Optional[bool],
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        if isinstance(phase, bool) or not isinstance(phase, int) or not 0 <= phase < interval:
            raise ValueError(f"phase must be an integer in [0, interval={interval}), got {phase!r}")
        self.interval = interval
        self.phase = phase
        self.modulator = Modulator(_modules_of(self.param_groups), anchor, alpha, mu_clip, var_eps, ratio_clip,
                                   start_iter)
        self.t = 0
        if fused is None and foreach is None:
            self._default_to_fused()

    def _default_to_fused(self) -> None:
        """torch's fused kernels when every parameter allows them (floating point, on a device that has
        them) and no group chose an implementation; otherwise torch's own default stays."""
        if self.defaults.get("differentiable") or any(
                g.get("fused") is not None or g.get("foreach") is not None for g in self.param_groups):
            return
        fused, _ = _default_to_fused_or_foreach(self.params_in_order(), differentiable=False, use_fused=True)
        if not fused:
            return
        self.defaults["fused"] = True
        for g in self.param_groups:
            g["fused"] = True
        # unlike torch's fused=True, GradScaler keeps its ordinary path (unscale p.grad, skip inf steps), as
        # with torch's default implementation: the optimizer behaves as the torch one it replaces

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
        return t % self.interval == self.phase

    def should_measure(self) -> bool:
        """True iff the next ``step()`` is a measurement step."""
        return self.is_measurement_step(self.t + 1)

    def params_in_order(self) -> List[torch.Tensor]:
        """The optimizer's parameters in param-group order: the order ``halves`` must follow."""
        return [p for g in self.param_groups for p in g["params"]]

    def module_ids(self) -> List[int]:
        index = {m: i for i, m in enumerate(self.modulator.modules)}
        return [index[g["module"]] for g in self.param_groups for _ in g["params"]]

    def step(self, closure: Optional[Callable[[], float]] = None, halves: Optional[Halves] = None):
        """One update. On a measurement step, ``halves=(ga, gb)`` are the mean gradients of the two
        halves of the batch (one tensor or None per parameter, in ``params_in_order()``), unless a
        distributed estimator is registered; ``halves=(ga, None)`` derives gb = 2 * p.grad - ga tensor
        by tensor (p.grad the whole batch's mean gradient, in the same scale as ga). On other steps
        ``halves`` is ignored. A step that ``torch.amp.GradScaler`` skips (found_inf, fused kernels)
        neither advances t nor measures."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)  # GradScaler's protocol for fused optimizers
        if found_inf is None or not bool(found_inf.item()):
            t = self.t + 1
            if self.is_measurement_step(t):
                with torch.no_grad():
                    self.modulator.update(self._measure(halves, t), t)
            self.t = t
        with self._modulated_lr():
            self._torch_step()
        return loss

    # -- internals ----------------------------------------------------------------------------------
    def _torch_step(self) -> None:
        """The base class's step without torch's hook wrapper: the hooks already ran around ``step``."""
        step = super().step.__func__
        while getattr(step, "hooked", False):  # torch patches a class's step once it has an instance
            step = step.__wrapped__
        step(self)

    def _measure(self, halves: Optional[Halves], t: int) -> torch.Tensor:
        if halves is None:
            if self.estimator is not None:
                if getattr(self, "grad_scale", None) is not None:  # GradScaler with fused=True: p.grad is scaled
                    torch._foreach_div_([p.grad for p in self.params_in_order() if p.grad is not None],
                                        self.grad_scale)
                    self.grad_scale = None  # unscaled now: the fused update must not divide again
                return self.estimator.stats(self, t)
            raise RuntimeError(
                f"{type(self).__name__}: step {t} is a measurement step (interval={self.interval}, "
                f"phase={self.phase}) but no "
                "halves were given. Pass step(halves=(ga, gb)) when should_measure() is True (see "
                "agvm.backward_two_halves), or register the DDP hook with agvm.distributed.register_hook."
            )
        if not isinstance(halves, (tuple, list)) or len(halves) != 2:
            raise ValueError(f"halves must be a pair (ga, gb) or (ga, None), got {type(halves).__name__}")
        ga, gb = halves
        grad_scale = getattr(self, "grad_scale", None)  # GradScaler with fused=True: p.grad is still scaled
        return module_stats(ga, gb, self.module_ids(), len(self.modulator.modules), self._preconditioner(),
                            grads=[p.grad for p in self.params_in_order()],
                            inv_scale=1.0 if grad_scale is None else 1.0 / float(grad_scale))

    def _preconditioner(self) -> Optional[List[Tuple[Optional[torch.Tensor], float, float]]]:
        """``precond`` for ``module_stats``: (exp_avg_sq, beta2, eps) per parameter for AdamW; None for SGD."""
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

    # -- checkpoints: state_dict, load_state_dict, pickle -------------------------------------------
    def state_dict(self) -> dict:
        """torch's state_dict plus ``"agvm"``: {t, mu, phi, num_rejected}. Post-hooks see the entry."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post_hooks)()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        sd["agvm"] = {"t": self.t, **self.modulator.state_dict()}
        for hook in post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, and the ``"agvm"`` entry when there is one (a plain torch.optim
        state_dict loads too: t and mu stay). Groups keep the constructed ``"module"``; everything is
        checked before anything changes. Pre-hooks see and may change the entry, post-hooks see it loaded."""
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy()
        for hook in pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        agvm_state = state_dict.pop("agvm", None)
        modulator, t = self.modulator, self.t
        if agvm_state is not None:
            modulator = copy.deepcopy(self.modulator)
            modulator.load_state_dict(agvm_state)
            t = int(agvm_state["t"])
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):  # else torch's own error below
            groups = []
            for i, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
                module = theirs.get("module", mine["module"])
                if module != mine["module"]:
                    raise ValueError(
                        f"param group {i} belongs to module {module!r} in the state_dict but to "
                        f"{mine['module']!r} in this optimizer; build the param groups the same way as the saved run"
                    )
                groups.append({**theirs, "module": module})
            state_dict["param_groups"] = groups
        self._optimizer_load_state_dict_pre_hooks = type(pre_hooks)()
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        self.modulator, self.t = modulator, t
        for hook in post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in _PICKLED if k in self.__dict__})
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # torch's (also called by load_state_dict with state and groups only)
        if "modulator" not in self.__dict__:  # a pickle from before AGVM state was pickled: start afresh
            modules = _modules_of(self.param_groups)
            anchor = "backbone" if "backbone" in modules else modules[0]
            logger.warning("AGVM: the pickled optimizer carries no AGVM state; t = 0, mu = 1 and the default "
                           "hyper-parameters (interval 10, anchor %r)", anchor)
            self.modulator = Modulator(modules, anchor)
        self.__dict__.setdefault("t", 0)
        self.__dict__.setdefault("interval", 10)
        self.__dict__.setdefault("phase", 0)


def _modules_of(param_groups: Sequence[dict]) -> List[str]:
    modules: List[str] = []
    for g in param_groups:
        if g["module"] not in modules:
            modules.append(g["module"])
    return modules
