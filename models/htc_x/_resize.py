"""Resizing helpers shared by the RCNet and SEPC necks (any input size, no square or power-of-two assumption)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def down_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Max-pool a finer map down to ``size``: replicate-pad to even + 2x2 max-pool per halving, adaptive at the end.

    For maps produced by repeated ceil-halving this is exact 2x2 pooling (RCNet's choice); any residual size
    mismatch (backbones that round differently) is closed with adaptive max-pooling.
    """
    size = tuple(int(s) for s in size)
    while x.shape[-2] >= 2 * size[0] - 1 and x.shape[-1] >= 2 * size[1] - 1 and tuple(x.shape[-2:]) != size:
        ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.max_pool2d(x, 2)
    if tuple(x.shape[-2:]) != size:
        x = F.adaptive_max_pool2d(x, size)
    return x


def up_to(x: torch.Tensor, size: torch.Size | tuple[int, int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear upsampling of a coarser map to ``size`` (identity when the size already matches)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)
