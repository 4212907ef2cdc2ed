"""RCNet neck: Reverse Feature Pyramid (RevFP) + Cross-scale Shift Network (CSN).

Zong et al., "RCNet: Reverse Feature Pyramid and Cross-scale Shift Network for Object Detection",
ACM MM 2021 (arXiv 2110.12130). Written from the paper's description (see
``/work/shared/notes/htcx-and-baselines-facts.md`` section 2), generalised from the original five levels /
256 channels to any number of levels (HTC-X uses P3-P8, six levels, 384 channels; AGVM appendix A.5.2).

Layout, for backbone inputs C_s..C_e and ``num_outs`` output levels:

* laterals: 1x1 conv + norm (no activation) per input level; extra levels c_{k+1} = maxpool2x2(1x1 conv(c_k));
* RevFP, one bottom-up pass with local top-down input:
  p_0 = N(c_0, c_1), p_i = N(c_i, c_{i+1}, p_{i-1}), p_{L-1} = N(c_{L-1}, p_{L-2});
  every node uses feature-guided upsampling of its coarser input (spatial softmax attention) and
  image-wise dynamic weighted fusion (sigmoid gate from pooled features), then act -> DCNv2 -> norm;
* CSN: all levels are aligned to the size of ``align_level``, channels are shifted cyclically across levels
  (+1, -1, +2, -2 by C/16 channels each), aggregated per level by 1x1 convs with a residual, and a spatial and a
  scale global context vector are added; the result is resized back and added to each p_i.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.model import BaseModule

from ._resize import down_to, up_to

try:  # the MODELS registry is only needed when mmdet is present (always in this repo's stack)
    from mmdet.registry import MODELS
except ImportError:  # pragma: no cover
    MODELS = None


def _deform_cfg(use_dcn: bool, deform_groups: int) -> dict | None:
    """Conv config for the fusion convs: modulated deformable conv (DCNv2, mmcv.ops) or a plain conv."""
    return dict(type="DCNv2", deform_groups=deform_groups) if use_dcn else None


class FusionNode(nn.Module):
    """One RevFP node N(x1, x2[, x3]) (RCNet Sec. 3.1).

    ``x1`` is the same-level lateral, ``x2`` the neighbouring input (coarser lateral, or for the last node the
    finer p_{i-1}), ``x3`` the already fused finer level p_{i-1} (3-input nodes only).
    """

    def __init__(self, channels: int, three_inputs: bool, guided_upsample: bool, conv_cfg: dict | None,
                 norm_cfg: dict | None) -> None:
        super().__init__()
        self.channels = channels
        self.three_inputs = three_inputs
        self.guided_upsample = guided_upsample
        if guided_upsample:
            self.attn_conv = nn.Conv2d(2 * channels, 1, 3, padding=1)
            self.temperature = nn.Parameter(torch.ones(1))
        self.gate = nn.Conv2d(2 * channels, 1, 1)
        if three_inputs:
            self.pre_fusion = ConvModule(channels, channels, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                         order=("act", "conv", "norm"))
            self.gate3 = nn.Conv2d(2 * channels, 1, 1)
        self.post_fusion = ConvModule(channels, channels, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                      order=("act", "conv", "norm"))
        self.init_weights()

    def init_weights(self) -> None:
        """Zero-init the attention and gate convs (attention starts uniform, gates start at 0.5)."""
        for conv in [getattr(self, "attn_conv", None), self.gate, getattr(self, "gate3", None)]:
            if conv is not None:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    @staticmethod
    def _gated(a: torch.Tensor, b: torch.Tensor, gate: nn.Conv2d) -> torch.Tensor:
        """w * a + (1 - w) * b with w = sigmoid(conv1x1(cat(GAP(a), GAP(b)))), one scalar per image."""
        w = torch.sigmoid(gate(torch.cat([a.mean((2, 3), keepdim=True), b.mean((2, 3), keepdim=True)], 1)))
        return w * a + (1 - w) * b

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor | None = None) -> torch.Tensor:
        size = x1.shape[-2:]
        if self.guided_upsample:  # x2 is coarser: feature-guided upsampling
            x2 = up_to(x2, size)
            logits = self.attn_conv(torch.cat([x1, x2], 1)) * self.temperature / math.sqrt(self.channels)
            n, _, h, w = logits.shape
            attn = torch.softmax(logits.flatten(1), dim=1).view(n, 1, h, w) * (h * w)
            x2 = attn * x2
        else:  # x2 is finer (last node)
            x2 = down_to(x2, size)
        r = self._gated(x1, x2, self.gate)
        if self.three_inputs:
            assert x3 is not None, "a three-input RevFP node needs the finer fused level"
            r = self._gated(self.pre_fusion(r), down_to(x3, size), self.gate3)
        return self.post_fusion(r)


class CrossShiftNet(nn.Module):
    """Cross-scale Shift Network (RCNet Sec. 3.2) for ``num_levels`` levels of ``channels`` channels."""

    def __init__(self, channels: int, num_levels: int, align_level: int = 1, norm_cfg: dict | None = None) -> None:
        super().__init__()
        if channels % 16:
            raise ValueError(f"CSN shifts channels in parts of C/16; channels={channels} is not a multiple of 16")
        if not 0 <= align_level < num_levels:
            raise ValueError(f"align_level={align_level} must index one of the {num_levels} levels")
        self.channels, self.num_levels, self.align_level = channels, num_levels, align_level
        self.part = channels // 16
        self.shifts = (1, -1, 2, -2)  # chunk k of the shifted channels at level l comes from level l + shift
        agg_in = channels + len(self.shifts) * self.part
        self.aggregate = nn.ModuleList([
            nn.Sequential(ConvModule(agg_in, channels, 1, norm_cfg=norm_cfg), nn.Conv2d(channels, channels, 1))
            for _ in range(num_levels)])
        self.spatial_attn = nn.Conv2d(channels, 1, 1)
        self.spatial_out = nn.Conv2d(channels, channels, 1)
        self.scale_attn = nn.Conv2d(channels, 1, 1)
        self.scale_out = nn.Conv2d(channels, channels, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert len(feats) == self.num_levels, f"CSN built for {self.num_levels} levels, got {len(feats)}"
        size = feats[self.align_level].shape[-2:]
        aligned = [down_to(f, size) if i < self.align_level else up_to(f, size) if i > self.align_level else f
                   for i, f in enumerate(feats)]
        x = torch.stack(aligned, 1)  # B x L x C x H x W
        L, p = self.num_levels, self.part
        shifted = [torch.roll(x[:, :, k * p:(k + 1) * p], shifts=-s, dims=1) for k, s in enumerate(self.shifts)]
        mixed = torch.cat([x] + shifted, 2)
        y = torch.stack([x[:, i] + self.aggregate[i](mixed[:, i]) for i in range(L)], 1)
        # spatial global context: attention over positions of the level-averaged map
        b, _, c, h, w = y.shape
        mean_l = y.mean(1)
        a = torch.softmax(self.spatial_attn(mean_l).flatten(2), -1)  # B x 1 x HW
        g_sp = self.spatial_out(torch.einsum("bqn,bcn->bc", a, mean_l.flatten(2))[..., None, None])
        # scale global context: attention over levels of the spatially averaged vectors
        pooled = y.mean((3, 4))  # B x L x C
        a_sc = torch.softmax(self.scale_attn(pooled.reshape(b * L, c, 1, 1)).view(b, L), 1)
        g_sc = self.scale_out(torch.einsum("bl,blc->bc", a_sc, pooled)[..., None, None])
        y = y + (g_sp + g_sc).unsqueeze(1)
        return [y[:, i] for i in range(L)]


class RCNet(BaseModule):
    """RCNet neck (RevFP + CSN) over ``num_outs`` pyramid levels.

    Args:
        in_channels: channels of the backbone outputs (all of them; ``start_level`` picks the first used).
        out_channels: pyramid width (384 in HTC-X, 256 in the RCNet paper).
        num_outs: number of output levels (6 for P3-P8 in HTC-X); levels beyond the used inputs are made by
            1x1 conv + 2x2 max-pool from the previous lateral.
        start_level / end_level: the used backbone outputs (end_level=-1: up to the last).
        use_dcn: DCNv2 (mmcv.ops ModulatedDeformConv2dPack, deform_groups=2) in the fusion convs as in the
            paper; False gives plain 3x3 convs (fast on CPU).
        use_csn: add the cross-scale shift network (on by default).
        norm_cfg: norm layer config (BN in the paper's configs; GN / SyncBN also work).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int, start_level: int = 0,
                 end_level: int = -1, use_dcn: bool = True, deform_groups: int = 2, use_csn: bool = True,
                 csn_align_level: int = 1, norm_cfg: dict | None = dict(type="BN", requires_grad=True),
                 init_cfg: dict | list | None = None) -> None:
        super().__init__(init_cfg=init_cfg)
        in_channels = list(in_channels)
        end = len(in_channels) if end_level == -1 else end_level + 1
        if not 0 <= start_level < end <= len(in_channels):
            raise ValueError(f"bad start_level={start_level}/end_level={end_level} for {len(in_channels)} inputs")
        self.in_channels, self.out_channels, self.num_outs = in_channels, out_channels, num_outs
        self.start_level, self.end = start_level, end
        self.num_ins = end - start_level
        if num_outs < max(self.num_ins, 2):
            raise ValueError(f"num_outs={num_outs} must be >= the {self.num_ins} used inputs and >= 2")
        self.lateral_convs = nn.ModuleList([
            ConvModule(c, out_channels, 1, norm_cfg=norm_cfg, act_cfg=None) for c in in_channels[start_level:end]])
        self.extra_convs = nn.ModuleList([
            ConvModule(out_channels, out_channels, 1, norm_cfg=norm_cfg, act_cfg=None)
            for _ in range(num_outs - self.num_ins)])
        conv_cfg = _deform_cfg(use_dcn, deform_groups)
        L = num_outs
        self.nodes = nn.ModuleList([
            FusionNode(out_channels, three_inputs=0 < i < L - 1, guided_upsample=i < L - 1, conv_cfg=conv_cfg,
                       norm_cfg=norm_cfg) for i in range(L)])
        self.csn = CrossShiftNet(out_channels, L, csn_align_level, norm_cfg) if use_csn else None

    def init_weights(self) -> None:
        super().init_weights()
        for m in self.modules():  # BaseModule's default init leaves convs at PyTorch's default; zero the gates
            if isinstance(m, FusionNode):
                m.init_weights()

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"RCNet expects {len(self.in_channels)} backbone outputs, got {len(inputs)}")
        c = [conv(inputs[self.start_level + i]) for i, conv in enumerate(self.lateral_convs)]
        for conv in self.extra_convs:
            c.append(F.max_pool2d(_pad_even(conv(c[-1])), 2))
        L = self.num_outs
        p: list[torch.Tensor] = []
        for i, node in enumerate(self.nodes):
            if i == 0:
                p.append(node(c[0], c[1]))
            elif i < L - 1:
                p.append(node(c[i], c[i + 1], p[i - 1]))
            else:
                p.append(node(c[i], p[i - 1]))
        if self.csn is not None:
            q = self.csn(p)
            a = self.csn.align_level
            p = [pi + (up_to(qi, pi.shape[-2:]) if i < a else down_to(qi, pi.shape[-2:]))
                 for i, (pi, qi) in enumerate(zip(p, q))]
        return tuple(p)


def _pad_even(x: torch.Tensor) -> torch.Tensor:
    """Replicate-pad the bottom/right edge to an even height and width (so 2x2 max-pool gives ceil(H/2))."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


if MODELS is not None:
    MODELS.register_module(name="RCNet", module=RCNet)
