"""``ExpWarmupLR``: the exponential warm-up of the AGVM authors' public code (mmcv 1.x ``warmup='exp'``).

lr_t = lr * start_factor ** (1 - t / T) for t = 0 .. T (T = end - begin - 1), so the lr grows
geometrically from ``start_factor * lr`` to ``lr``; chainable like mmengine's LinearLR (it multiplies
the current lr, so it composes with MultiStepLR running at the same time).
"""
from __future__ import annotations

from mmengine.optim.scheduler.lr_scheduler import LRSchedulerMixin
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler

__all__ = ["ExpWarmupParamScheduler", "ExpWarmupLR"]


class ExpWarmupParamScheduler(_ParamScheduler):
    """Geometric ramp of a parameter from ``start_factor`` times its value to its value."""

    def __init__(self, optimizer, param_name: str, start_factor: float = 0.001, begin: int = 0, end: int = INF,
                 last_step: int = -1, by_epoch: bool = True, verbose: bool = False):
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"start_factor must be in (0, 1], got {start_factor}")
        if end == INF or end - begin < 2:
            raise ValueError(f"ExpWarmupLR needs a finite end >= begin + 2, got begin={begin}, end={end}")
        self.start_factor = start_factor
        self.total_iters = end - begin - 1
        super().__init__(optimizer, param_name=param_name, begin=begin, end=end, last_step=last_step,
                         by_epoch=by_epoch, verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None, **kwargs):
        if not by_epoch or not epoch_length:
            raise ValueError("convert_to_iter_based needs by_epoch=True and the epoch length")
        return cls(*args, begin=int(begin * epoch_length), end=int(end * epoch_length), by_epoch=False, **kwargs)

    def _get_value(self):
        if self.last_step == 0:
            return [g[self.param_name] * self.start_factor for g in self.optimizer.param_groups]
        step = self.start_factor ** (-1.0 / self.total_iters)
        return [g[self.param_name] * step for g in self.optimizer.param_groups]


class ExpWarmupLR(LRSchedulerMixin, ExpWarmupParamScheduler):
    """Exponential learning-rate warm-up (see the module docstring)."""
