"""AGVM inside mmengine: the param-group constructor, the optim wrappers and the one-process model wrapper.

How the two gradient estimates G_a, G_b of AGVM (appendix A.1, Eq. 1-2) are obtained:

- Distributed (DDP, world size >= 2): the ranks are split in two halves by ``agvm.distributed.register_hook``
  (``AGVMHook.before_train`` calls it); mmengine's ordinary ``train_step`` / ``update_params`` run unchanged.
- One process: ``AGVMTwoHalves`` (a registered mmengine model wrapper, applied by ``AGVMRunner``) splits
  every data batch into two halves (micro-batches) and hands two loss closures to the optim wrapper's
  ``update_params_two_halves``; on measurement steps that keeps each half's gradient and passes
  ``halves=(ga, gb)`` to ``optimizer.step``.

Why a model wrapper plus an optim-wrapper mixin: mmengine's optim wrapper only ever sees the loss
of the whole batch, so the batch has to be split where ``train_step`` is (the model); the backward,
loss scaling (AMP), accumulation and clipping stay in the optim wrapper, so ``AGVMOptimWrapper`` and
``AGVMAmpOptimWrapper`` keep every behaviour of mmengine's ``OptimWrapper`` / ``AmpOptimWrapper``:
clipping acts on the full gradient before ``step`` (Phi, a cosine, does not depend on scale), with
``accumulative_counts = k`` each half's gradient is accumulated over the k micro-iterations of the
window, and with AMP a step that GradScaler skips neither advances t nor touches mu.
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

__all__ = ["AGVMOptimWrapperConstructor", "AGVMOptimWrapper", "AGVMAmpOptimWrapper", "AGVMTwoHalves",
           "ClipWindowOptimWrapper", "split_batch", "is_agvm"]

AGVM_OPTIMIZERS = ("AGVMSGD", "AGVMAdamW")


def is_agvm(optimizer) -> bool:
    return isinstance(optimizer, AGVMMixin)


class AGVMOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Param groups from the model's attributes via ``agvm.param_groups`` (each group has a "module").

    ``paramwise_cfg`` keys (all optional):
        modules: ``{name: prefix or [prefixes]}`` (default ``agvm.DEFAULT_MODULES``: backbone, neck,
            rpn_head, roi_head.bbox_head, ...).
        no_decay_norm_bias: weight decay 0 for norm layers, biases and 1-D parameters.
        no_decay_keys: parameter-name substrings that also get weight decay 0 (Swin's
            ``relative_position_bias_table``, ``absolute_pos_embed``).
        frozen_modules: modules to freeze and leave out of the optimizer (Fig. 4's frozen head).
    Used for every optimizer of the configs (baselines too), so baselines and AGVM see the same
    groups; torch optimizers keep the extra "module" key.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {"modules", "no_decay_norm_bias", "no_decay_keys", "frozen_modules"}
        if unknown:
            raise ValueError(f"AGVMOptimWrapperConstructor: unknown paramwise_cfg keys {sorted(unknown)}; "
                             "allowed: modules, no_decay_norm_bias, no_decay_keys, frozen_modules")
        self.optim_wrapper_cfg = copy.deepcopy(dict(optim_wrapper_cfg))
        if "optimizer" not in self.optim_wrapper_cfg:
            raise ValueError("optim_wrapper needs an `optimizer` dict")
        self.optimizer_cfg = self.optim_wrapper_cfg.pop("optimizer")
        self.paramwise_cfg = paramwise_cfg

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, "module"):
            model = model.module
        pw = self.paramwise_cfg
        groups = agvm.param_groups(model, modules=pw.get("modules"),
                                   no_decay_norm_bias=bool(pw.get("no_decay_norm_bias", False)),
                                   freeze=tuple(pw.get("frozen_modules") or ()))
        keys = tuple(pw.get("no_decay_keys") or ())
        if keys:
            names = {id(p): n for n, p in model.named_parameters()}
            split: List[dict] = []
            for g in groups:
                hit = [p for p in g["params"] if any(k in names[id(p)] for k in keys)]
                rest = [p for p in g["params"] if not any(k in names[id(p)] for k in keys)]
                if rest:
                    split.append({**g, "params": rest})
                if hit:
                    split.append({**g, "params": hit, "weight_decay": 0.0})
            groups = split
        optimizer_cfg = copy.deepcopy(dict(self.optimizer_cfg))
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
    """Adds ``update_params_two_halves`` to an mmengine optim wrapper (see the module docstring)."""

    _halves_acc: Optional[Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]]]] = None

    def _backward_uncounted(self, loss: torch.Tensor) -> None:
        self.backward(loss)  # OptimWrapper: loss.backward(); AmpOptimWrapper: scaler.scale(loss).backward()
        self._inner_count -= 1  # one micro-iteration = both halves: counted once below

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
        opt = self.optimizer
        if not is_agvm(opt):
            raise TypeError(f"update_params_two_halves needs an AGVM optimizer, got {type(opt).__name__}")
        measure = opt.should_measure()
        params = opt.params_in_order()
        stash = [p.grad for p in params] if measure else None
        halves: List[List[Optional[torch.Tensor]]] = []
        logs: List[Dict[str, torch.Tensor]] = []
        for fn, w in zip(loss_fns, weights):
            if measure:
                for p in params:
                    p.grad = None
            loss, log_vars = fn()
            self._backward_uncounted(self.scale_loss(loss) * w)
            logs.append(log_vars)
            if measure:
                halves.append([p.grad for p in params])
        if measure:
            (ga, gb), (wa, wb) = halves, weights
            acc = self._halves_acc
            for k, p in enumerate(params):
                parts = [g for g in (stash[k], ga[k], gb[k]) if g is not None]
                p.grad = None if not parts else (parts[0].clone() if len(parts) == 1 else sum(parts[1:], parts[0]))
            ga = [None if g is None else g.div_(wa) for g in ga]  # half a's own mean gradient (/ k, x scale)
            gb = [None if g is None else g.div_(wb) for g in gb]
            if acc is not None:
                ga = [a if b is None else (b if a is None else a.add_(b)) for a, b in zip(ga, acc[0])]
                gb = [a if b is None else (b if a is None else a.add_(b)) for a, b in zip(gb, acc[1])]
            self._halves_acc = (ga, gb)
        self._inner_count += 1
        if self.should_update():
            if self._halves_acc is not None:
                halves_arg, self._halves_acc = self._halves_acc, None
                self.step(halves=halves_arg)
            else:
                self.step()
            self.zero_grad()
        out: Dict[str, torch.Tensor] = {}
        for k in logs[0]:
            out[k] = logs[0][k] * weights[0] + logs[1].get(k, logs[0][k]) * weights[1]
        return out


class ClipWindowOptimWrapper(_ClipWindowMixin, OptimWrapper):
    """mmengine ``OptimWrapper`` with ``clip_window`` (for the baselines of the authors' settings)."""


class AGVMOptimWrapper(_TwoHalvesMixin, OptimWrapper):
    """mmengine ``OptimWrapper`` (clip_grad, accumulative_counts) that can do AGVM's two-half step."""


class AGVMAmpOptimWrapper(_TwoHalvesMixin, AmpOptimWrapper):
    """mmengine ``AmpOptimWrapper`` (autocast + GradScaler) that can do AGVM's two-half step."""


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
    """One-process model wrapper: ``train_step`` runs the batch as two micro-batches (two halves) so
    that AGVM can measure Phi; ``val_step`` / ``test_step`` are the wrapped model's. Registered as an
    mmengine model wrapper, so the runner's checkpoints and hooks see ``.module``."""

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
        n = batch_len(data)
        if n < 2:
            raise ValueError(f"AGVM in one process splits each batch into two halves, but this batch has {n} "
                             "sample(s); use train_dataloader.batch_size >= 2 (an even number)")
        n_a = (n + 1) // 2
        half_a, half_b = split_batch(data, n_a)
        model = self.module

        def run(half):
            def fn():
                with optim_wrapper.optim_context(model):
                    d = model.data_preprocessor(half, True)
                    losses = model._run_forward(d, mode="loss")
                return model.parse_losses(losses)
            return fn

        return optim_wrapper.update_params_two_halves((run(half_a), run(half_b)), (n_a / n, (n - n_a) / n))

    def val_step(self, data):
        return self.module.val_step(data)

    def test_step(self, data):
        return self.module.test_step(data)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
