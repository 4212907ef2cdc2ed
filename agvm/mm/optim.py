"""AGVM inside mmengine: the param-group constructor, the optim wrappers and the one-process model wrapper.

How the two gradient estimates G_a, G_b of AGVM (appendix A.1, Eq. 1-2) are obtained:

- Distributed (DDP, world size >= 2): the ranks are split in two halves by ``agvm.distributed.register_hook``
  (``AGVMHook.before_train`` calls it); mmengine's ordinary ``train_step`` / ``update_params`` run unchanged.
- One process: ``AGVMTwoHalves`` (a registered mmengine model wrapper, applied by ``AGVMRunner``) runs the
  model's own ``train_step`` (one full-batch pass) off measurement steps; on measurement steps it splits the
  batch into two halves (micro-batches) and hands two loss closures to the optim wrapper's
  ``update_params_two_halves``, which keeps half A's gradient apart with ``agvm.TwoHalves`` and passes it to
  ``optimizer.step(halves=...)``. ``two_passes=True`` on the optim wrapper runs the two halves on every step.

Why a model wrapper plus an optim-wrapper mixin: mmengine's optim wrapper only ever sees the loss
of the whole batch, so the batch has to be split where ``train_step`` is (the model); the backward,
loss scaling (AMP), accumulation and clipping stay in the optim wrapper: half B goes through mmengine's own
``update_params`` (loss scaling, accumulation count, step, zero_grad), half A through the same backward
without counting a second micro-iteration. So ``AGVMOptimWrapper`` and ``AGVMAmpOptimWrapper`` keep every
behaviour of mmengine's ``OptimWrapper`` / ``AmpOptimWrapper``: clipping acts on the full gradient before
``step`` (Phi, a cosine, does not depend on scale), with ``accumulative_counts = k`` each half's gradient is
accumulated over the k micro-iterations of the window, and with AMP a step that GradScaler skips neither
advances t nor touches mu.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

import agvm
from agvm.optim._base import AGVMMixin
from agvm.grouping import freeze_modules, module_map

__all__ = ["AGVMOptimWrapperConstructor", "AGVMOptimWrapper", "AGVMAmpOptimWrapper", "AGVMTwoHalves",
           "ClipWindowOptimWrapper", "split_batch", "is_agvm"]

AGVM_OPTIMIZERS = ("AGVMSGD", "AGVMAdamW")
# the paramwise_cfg keys mmengine's DefaultOptimWrapperConstructor reads (it ignores any other key silently)
MMENGINE_KEYS = ("custom_keys", "bias_lr_mult", "bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult",
                 "flat_decay_mult", "bypass_duplicate", "dcn_offset_lr_mult")
AGVM_KEYS = ("modules", "frozen_modules", "no_decay_norm_bias")


def is_agvm(optimizer) -> bool:
    return isinstance(optimizer, AGVMMixin)


class AGVMOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's ``DefaultOptimWrapperConstructor`` (its ``add_params``: every ``paramwise_cfg`` key of
    mmengine gives the same lr and weight decay per parameter) plus AGVM's module tag per group.

    Extra ``paramwise_cfg`` keys (all optional):
        modules: ``{name: prefix or [prefixes]}`` naming the AGVM modules (default ``agvm.DEFAULT_MODULES``:
            backbone, neck, rpn_head, roi_head.bbox_head, ...); every group gets ``"module"``, and a trainable
            parameter no module covers is an error.
        frozen_modules: modules to freeze and leave out of the optimizer (Fig. 4's frozen head).
        no_decay_norm_bias: shorthand for ``norm_decay_mult=0, bias_decay_mult=0, flat_decay_mult=0``.
    Then groups equal in everything but their parameters are merged (few, large groups for the foreach / fused
    kernels); parameters with ``requires_grad=False`` are left out (as mmengine's ``add_params`` does; without a
    ``paramwise_cfg`` mmengine would pass them all, where they are never updated). Used for every optimizer of
    the configs (baselines too), so baselines and AGVM see the same groups; torch optimizers keep the extra
    "module" key.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        pw = dict(paramwise_cfg or {})
        unknown = set(pw) - set(MMENGINE_KEYS) - set(AGVM_KEYS)
        if unknown:
            raise ValueError(f"AGVMOptimWrapperConstructor: unknown paramwise_cfg keys {sorted(unknown)}; "
                             f"mmengine's are {list(MMENGINE_KEYS)}, AGVM's {list(AGVM_KEYS)}")
        if "optimizer" not in optim_wrapper_cfg:
            raise ValueError("optim_wrapper needs an `optimizer` dict")
        self.modules = pw.pop("modules", None)
        self.frozen_modules = tuple(pw.pop("frozen_modules", None) or ())
        if pw.pop("no_decay_norm_bias", False):
            both = sorted({"norm_decay_mult", "bias_decay_mult", "flat_decay_mult"} & set(pw))
            if both:
                raise ValueError(f"paramwise_cfg: no_decay_norm_bias sets {both} to 0; give one or the other")
            pw.update(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0)
        super().__init__(copy.deepcopy(dict(optim_wrapper_cfg)), pw)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, "module"):
            model = model.module
        freeze_modules(model, self.modules, self.frozen_modules)
        params: List[dict] = []
        self.add_params(params, model)  # mmengine: one group per parameter, frozen ones skipped
        owner = module_map(model, self.modules)
        defaults = {k: v for k, v in self.optimizer_cfg.items() if k != "type"}
        groups: List[dict] = []
        options: List[dict] = []  # each group's effective options (the optimizer's where the group sets none)
        for g in params:
            (p,) = g["params"]
            if not p.requires_grad:
                continue
            g = {**g, "module": owner[id(p)]}
            opts = {**defaults, **{k: v for k, v in g.items() if k != "params"}}
            if opts in options:
                groups[options.index(opts)]["params"].append(p)
            else:
                groups.append(g)
                options.append(opts)
        optimizer_cfg = copy.deepcopy(self.optimizer_cfg)
        optimizer_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = copy.deepcopy(self.optim_wrapper_cfg)
        wrapper_cfg.setdefault("type", "AGVMOptimWrapper" if is_agvm(optimizer) else "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))


class _ClipWindowMixin:
    """``clip_window=(begin, end)``: apply ``clip_grad`` only in iterations begin <= iter < end (the
    runner's 0-based iteration from mmengine's MessageHub; the authors' code clips just before AGVM
    starts). None: clip whenever ``clip_grad`` is set (mmengine's behaviour)."""

    def __init__(self, *args, clip_window: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if clip_window is not None:
            if len(clip_window) != 2 or clip_window[0] > clip_window[1]:
                raise ValueError(f"clip_window must be (begin, end) with begin <= end, got {clip_window}")
            if not self.clip_grad_kwargs:
                raise ValueError("clip_window needs clip_grad=dict(max_norm=...)")
        self.clip_window = None if clip_window is None else (int(clip_window[0]), int(clip_window[1]))

    def _clip_grad(self) -> None:
        if self.clip_window is not None:
            from mmengine.logging import MessageHub

            it = MessageHub.get_current_instance().get_info("iter", 0)
            if not self.clip_window[0] <= it < self.clip_window[1]:
                return
        super()._clip_grad()


class _TwoHalvesMixin(_ClipWindowMixin):
    """Adds ``update_params_two_halves`` to an mmengine optim wrapper (see the module docstring).

    ``two_passes=True``: the model wrapper runs the two halves on every step, not only on measurement steps
    (mmdet's losses, normalised over the batch, are then normalised the same way on every step).
    """

    def __init__(self, *args, two_passes: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.two_passes = bool(two_passes)
        self._two: Optional[agvm.TwoHalves] = None

    def _backward_uncounted(self, loss: torch.Tensor) -> None:
        """``self.backward`` without counting a micro-iteration: half A's backward (half B's is counted)."""
        loss.backward()

    def _loss_scale(self) -> float:
        return 1.0

    def update_params_two_halves(
        self,
        loss_fns: Sequence[Callable[[], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]],
        weights: Sequence[float],
    ) -> Dict[str, torch.Tensor]:
        """Backward over the two halves of one micro-iteration; step when the window is complete.

        Args:
            loss_fns: two closures, each running the forward of one half and returning
                ``(loss, log_vars)`` as ``BaseModel.parse_losses`` does (the half's mean loss).
            weights: the halves' shares of the batch (n_a / n, n_b / n): p.grad ends as the batch mean.
        Returns the log_vars averaged over the halves with these weights.
        """
        if self._two is None:
            self._two = agvm.TwoHalves(self.optimizer)
        with self._two.half_a():
            loss_a, log_a = loss_fns[0]()
            self._backward_uncounted(self.scale_loss(loss_a * weights[0]))
        loss_b, log_b = loss_fns[1]()
        self.update_params(loss_b * weights[1])  # mmengine's: scale, backward, count, step + zero_grad at the end
        return {k: log_a[k] * weights[0] + log_b.get(k, log_a[k]) * weights[1] for k in log_a}

    def step(self, **kwargs) -> None:
        """mmengine's step (clipping, loss scaler) with ``halves`` when half A's gradient was kept."""
        # Clipping by norm scales p.grad by one factor c before the optimizer derives half B = 2 p.grad - G_A
        # from it: G_A is scaled by the same c (see _clip_grad), so the halves are c G_A and c G_B and Phi, a
        # cosine, is unchanged. Clipping by value is not one factor: half B is then materialised now.
        by_value = bool(self.clip_grad_kwargs) and self.clip_func is not torch.nn.utils.clip_grad_norm_
        halves = self._two.pop(self._loss_scale(), derive_b=by_value) if self._two is not None else None
        if halves is not None:
            kwargs["halves"] = halves
        self._half_a = halves[0] if halves is not None and halves[1] is None else None
        try:
            super().step(**kwargs)
        finally:
            self._half_a = None

    def _clip_grad(self) -> None:
        half_a = getattr(self, "_half_a", None)
        if half_a is None:
            return super()._clip_grad()
        clip_norm = self.clip_func

        def clip_and_scale_half_a(params, max_norm, **kw):
            total = clip_norm(params, max_norm, **kw)
            scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grad_norm_ factor
            torch._foreach_mul_([a for a in half_a if a is not None], scale)
            return total

        self.clip_func = clip_and_scale_half_a
        try:
            super()._clip_grad()
        finally:
            self.clip_func = clip_norm


class ClipWindowOptimWrapper(_ClipWindowMixin, OptimWrapper):
    """mmengine ``OptimWrapper`` with ``clip_window`` (for the baselines of the authors' settings)."""


class AGVMOptimWrapper(_TwoHalvesMixin, OptimWrapper):
    """mmengine ``OptimWrapper`` (clip_grad, accumulative_counts) that can do AGVM's two-half step."""


class AGVMAmpOptimWrapper(_TwoHalvesMixin, AmpOptimWrapper):
    """mmengine ``AmpOptimWrapper`` (autocast + GradScaler) that can do AGVM's two-half step."""

    def _backward_uncounted(self, loss: torch.Tensor) -> None:
        self.loss_scaler.scale(loss).backward()

    def _loss_scale(self) -> float:
        return float(self.loss_scaler.get_scale())


def split_batch(data, n_a: int):
    """The first ``n_a`` samples and the rest of a collated batch (dicts, lists, tensors; others shared)."""
    if isinstance(data, dict):
        parts = {k: split_batch(v, n_a) for k, v in data.items()}
        return {k: v[0] for k, v in parts.items()}, {k: v[1] for k, v in parts.items()}
    if isinstance(data, (list, tuple)) or torch.is_tensor(data):
        return data[:n_a], data[n_a:]
    return data, data


def batch_len(data) -> int:
    if isinstance(data, dict):
        for key in ("inputs", "data_samples"):
            if key in data:
                return batch_len(data[key])
        for v in data.values():
            n = batch_len(v)
            if n:
                return n
        return 0
    if isinstance(data, (list, tuple)) or torch.is_tensor(data):
        return len(data)
    return 0


class AGVMTwoHalves(nn.Module):
    """One-process model wrapper: ``train_step`` is the model's own (one full-batch pass) off measurement
    steps and runs the batch as two micro-batches (two halves) on measurement steps, so that AGVM can measure
    Phi; ``val_step`` / ``test_step`` are the wrapped model's. Registered as an mmengine model wrapper, so the
    runner's checkpoints and hooks see ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @property
    def data_preprocessor(self):
        return self.module.data_preprocessor

    def train_step(self, data, optim_wrapper) -> Dict[str, torch.Tensor]:
        if not isinstance(optim_wrapper, _TwoHalvesMixin):
            if is_agvm(getattr(optim_wrapper, "optimizer", None)):
                raise TypeError(
                    f"{type(optim_wrapper.optimizer).__name__} in one process needs optim_wrapper.type="
                    f"'AGVMOptimWrapper' (or 'AGVMAmpOptimWrapper' for AMP), got {type(optim_wrapper).__name__}")
            return self.module.train_step(data, optim_wrapper)
        if not is_agvm(optim_wrapper.optimizer):
            raise TypeError(f"{type(optim_wrapper).__name__} needs an AGVM optimizer, got "
                            f"{type(optim_wrapper.optimizer).__name__}; use optim_wrapper.type='OptimWrapper'")
        n = batch_len(data)
        if n < 2:
            raise ValueError(f"AGVM in one process splits each batch into two halves, but this batch has {n} "
                             "sample(s); use train_dataloader.batch_size >= 2 (an even number)")
        if not optim_wrapper.optimizer.should_measure() and not optim_wrapper.two_passes:
            return self.module.train_step(data, optim_wrapper)  # one full-batch pass, as plain training
        n_a = (n + 1) // 2
        half_a, half_b = split_batch(data, n_a)
        model = self.module

        def run(half):
            def fn():
                with optim_wrapper.optim_context(model):
                    d = model.data_preprocessor(half, True)
                    losses = model(**d, mode="loss") if isinstance(d, dict) else model(*d, mode="loss")
                return model.parse_losses(losses)
            return fn

        return optim_wrapper.update_params_two_halves((run(half_a), run(half_b)), (n_a / n, (n - n_a) / n))

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
