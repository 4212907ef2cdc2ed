"""SEPC: Scale-Equalizing Pyramid Convolution, as a second neck after RCNet.

Wang et al., "Scale-Equalizing Pyramid Convolution for Object Detection", CVPR 2020 (arXiv 2005.03101); facts in
``/work/shared/notes/htcx-and-baselines-facts.md`` section 3. Generalised from five to N levels and any width.

* PConv (Sec. 3.1) is a 3-D convolution of depth 3 along the scale axis: for output level l,
  y_l = W_0 * x_l + W_down *_{stride 2} x_{l-1} + up(W_up * x_{l+1}), the three 3x3 kernels shared by all levels.
* Scale-equalizing (Sec. 3.2): the kernels act as deformable convs (DCNv1, mmcv.ops DeformConv2d, zero-init
  offsets, one offset conv per kernel) on output levels >= 1; level 0 (P3) uses the same weights as a plain conv.
* iBN (Sec. 3.3): one BatchNorm whose statistics are pooled over all levels at once.

Adapting the cls/loc split to a two-stage detector: the original SEPC ends in two extra shared convs (``cconv`` for
the classification tower, ``lconv`` for the localisation tower) and hands a pair of features per level to a
one-stage head. HTC-X's RPN and RoI extractors consume ONE feature list, and the cls/loc decoupling is done later,
per RoI, by the decoupled transformer bbox head (separate cls and loc branches). So this module keeps a single
extra shared 3x3 conv (``out_conv``; scale-equalizing and iBN as in ``lconv``, padding 1 so level sizes are kept)
and returns one list; ``num_extra_convs=0`` returns the PConv stack output directly. The output width equals the
input width, so it stacks on RCNet unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

from ._resize import up_to

try:
    from mmdet.registry import MODELS
except ImportError:  # pragma: no cover
    MODELS = None


class SEConv(nn.Module):
    """A 3x3 conv with shared weights whose deformable variant is used on levels >= 1 (SEPC's ``part_deform``).

    The kernel lives in an mmcv ``DeformConv2dPack`` (which has no bias, so a bias is added here); level 0 and
    ``use_dcn=False`` use the same kernel through ``F.conv2d``.
    """

    def __init__(self, channels: int, stride: int = 1, use_dcn: bool = True) -> None:
        super().__init__()
        self.stride, self.use_dcn = stride, use_dcn
        if use_dcn:
            from mmcv.ops import DeformConv2dPack

            self.conv = DeformConv2dPack(channels, channels, 3, stride=stride, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.conv.weight, 0, 0.01)  # SEPC init: N(0, 0.01), bias 0 (offset conv stays zero)

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        if self.use_dcn and level >= 1:
            h, w = x.shape[-2:]
            if h < 3 or w < 3:  # mmcv's DeformConv2d refuses maps smaller than the kernel: zero-pad, then crop
                out_h, out_w = (h - 1) // self.stride + 1, (w - 1) // self.stride + 1
                x = F.pad(x, (0, max(0, 3 - w), 0, max(0, 3 - h)))
                return self.conv(x)[..., :out_h, :out_w] + self.bias.view(1, -1, 1, 1)
            return self.conv(x) + self.bias.view(1, -1, 1, 1)
        return F.conv2d(x, self.conv.weight, self.bias, self.stride, 1)


class IBN(nn.Module):
    """Integrated BatchNorm: one set of statistics over all pyramid levels (SEPC Sec. 3.3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([f.flatten(2) for f in feats], 2).unsqueeze(2)  # N x C x 1 x sum(HW)
        out = self.bn(flat).squeeze(2)
        sizes = [f.shape[-2] * f.shape[-1] for f in feats]
        return [o.view_as(f) for o, f in zip(out.split(sizes, 2), feats)]


class PConv(nn.Module):
    """One pyramid convolution over all levels, with optional iBN and ReLU."""

    def __init__(self, channels: int, use_dcn: bool, ibn: bool) -> None:
        super().__init__()
        self.same = SEConv(channels, 1, use_dcn)
        self.down = SEConv(channels, 2, use_dcn)  # from the finer level l-1, stride 2
        self.up = SEConv(channels, 1, use_dcn)  # from the coarser level l+1, then upsampled
        self.ibn = IBN(channels) if ibn else None

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for l, x in enumerate(feats):
            y = self.same(x, l)
            if l > 0:
                d = self.down(feats[l - 1], l)
                if d.shape[-2:] != y.shape[-2:]:  # only if the pyramid is not a ceil-halving chain
                    d = F.adaptive_max_pool2d(d, y.shape[-2:])
                y = y + d
            if l < len(feats) - 1:
                y = y + up_to(self.up(feats[l + 1], l), y.shape[-2:], align_corners=True)
            out.append(y)
        if self.ibn is not None:
            out = self.ibn(out)
        return [F.relu(o) for o in out]


class SEPC(BaseModule):
    """SEPC neck: ``num_pconvs`` stacked PConv modules + ``num_extra_convs`` shared 3x3 convs, N levels in and out.

    Args:
        channels: input = output width (384 in HTC-X).
        num_levels: number of pyramid levels (6 for P3-P8).
        num_pconvs: stacked PConv modules (4 in the paper).
        use_dcn: scale-equalizing deformable convs (SEPC); False gives plain PConv (fast on CPU).
        ibn: integrated BN after every PConv and extra conv (needs >= 4 images per GPU to be useful).
        num_extra_convs: shared extra convs after the stack (1: the single-output adaptation described above).
    """

    def __init__(self, channels: int, num_levels: int, num_pconvs: int = 4, use_dcn: bool = True, ibn: bool = True,
                 num_extra_convs: int = 1, init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_levels < 2:
            raise ValueError(f"SEPC needs at least 2 pyramid levels, got {num_levels}")
        self.channels, self.num_levels = channels, num_levels
        self.pconvs = nn.ModuleList([PConv(channels, use_dcn, ibn) for _ in range(num_pconvs)])
        self.extra_convs = nn.ModuleList([SEConv(channels, 1, use_dcn) for _ in range(num_extra_convs)])
        self.extra_ibns = nn.ModuleList([IBN(channels) if ibn else nn.Identity() for _ in range(num_extra_convs)])
        self.ibn = ibn

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != self.num_levels:
            raise ValueError(f"SEPC built for {self.num_levels} levels, got {len(inputs)}")
        feats = list(inputs)
        for pconv in self.pconvs:
            feats = pconv(feats)
        for conv, ibn in zip(self.extra_convs, self.extra_ibns):
            feats = [conv(f, l) for l, f in enumerate(feats)]
            if self.ibn:
                feats = ibn(feats)
            feats = [F.relu(f) for f in feats]
        return tuple(feats)


@MODELS.register_module() if MODELS is not None else (lambda c: c)
class RCNetSEPC(BaseModule):
    """The HTC-X neck: RCNet followed by SEPC (AGVM appendix A.5.2), as one mmdet neck.

    ``rcnet`` and ``sepc`` are keyword dicts for :class:`RCNet` / :class:`SEPC`; ``out_channels`` and
    ``num_outs`` are shared. ``sepc=None`` gives RCNet alone.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 rcnet: dict | None = None, sepc: dict | None = None, init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        from .rcnet import RCNet

        self.rcnet = RCNet(in_channels, out_channels, num_outs, start_level=start_level, **(rcnet or {}))
        self.sepc = SEPC(out_channels, num_outs, **sepc) if sepc is not None else None

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feats = self.rcnet(inputs)
        return self.sepc(feats) if self.sepc is not None else feats


if MODELS is not None:
    MODELS.register_module(name="SEPC", module=SEPC)
