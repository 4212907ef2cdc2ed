"""The learning-rate scaling rules of the AGVM appendix (A.5.1, Tables 1-3).

- SGD: linear scaling from the reference batch up to a knee (128 for detection, 256 for semantic
  segmentation), square-root scaling above it (the paper's baselines diverged with linear scaling).
- AdamW: linear up to 128, then x sqrt(1.5) per doubling of the batch.
"""
from __future__ import annotations

import math

__all__ = ["scale_lr", "sgd_lr", "adamw_lr", "default_interval", "KNEE_DETECTION", "KNEE_SEGMENTATION"]

KNEE_DETECTION = 128
KNEE_SEGMENTATION = 256


def scale_lr(batch_size: int, base_lr: float, base_batch: int, knee: int, per_doubling: float) -> float:
    """``base_lr`` (tuned at ``base_batch``) scaled linearly up to ``knee``, then by ``per_doubling``
    for every doubling of the batch above the knee (sqrt(2): square-root scaling)."""
    if batch_size <= 0 or base_batch <= 0 or knee <= 0:
        raise ValueError(f"batch sizes must be positive, got batch_size={batch_size}, base_batch={base_batch}, "
                         f"knee={knee}")
    if base_batch > knee:
        raise ValueError(f"base_batch ({base_batch}) must not exceed the knee ({knee})")
    if batch_size <= knee:
        return base_lr * batch_size / base_batch
    return base_lr * knee / base_batch * per_doubling ** math.log2(batch_size / knee)


def sgd_lr(batch_size: int, task: str = "detection", base_lr: float = None, base_batch: int = 32) -> float:
    """SGD learning rate: Table 1 (detection, 0.04 at 32) or Table 2 (segmentation, 0.01 at 32)."""
    if task not in ("detection", "segmentation"):
        raise ValueError(f"task must be 'detection' or 'segmentation', got {task!r}")
    if base_lr is None:
        base_lr = 0.04 if task == "detection" else 0.01
    knee = KNEE_DETECTION if task == "detection" else KNEE_SEGMENTATION
    return scale_lr(batch_size, base_lr, base_batch, knee, math.sqrt(2.0))


def adamw_lr(batch_size: int, base_lr: float = 2e-4, base_batch: int = 32) -> float:
    """AdamW learning rate (Table 3: 2e-4 at 32, x sqrt(1.5) per doubling above 128)."""
    return scale_lr(batch_size, base_lr, base_batch, KNEE_DETECTION, math.sqrt(1.5))


def default_interval(batch_size: int) -> int:
    """tau: 10, and 5 from batch 1024 on (Tables 1 and 3; Table 2 uses 5 throughout)."""
    return 5 if batch_size >= 1024 else 10
