"""Decoupled transformer bbox head for HTC-X (AGVM appendix A.5.2: "4 decoupled transformer blocks for the
classification branch and localization branch, respectively").

No public source describes this head, so the concrete form is ours (facts note section 6, tagged [I]): the 7x7
RoIAlign output (C channels) becomes 49 tokens (linear C->d plus a learnable position embedding); two stacks of
``num_cls_blocks`` / ``num_reg_blocks`` pre-LN transformer blocks (MHSA + MLP, timm's ``Block``, no shared
weights) process them; each stack ends in LayerNorm + mean pooling + the linear predictor. It subclasses mmdet's
``BBoxHead``, so targets, losses, box decoding, ``refine_bboxes`` and ``predict_by_feat`` are mmdet's.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from mmdet.models.roi_heads.bbox_heads import BBoxHead
from mmdet.registry import MODELS


@MODELS.register_module()
class DecoupledTransformerBBoxHead(BBoxHead):
    """BBoxHead with separate transformer-block stacks for classification and box regression.

    Args:
        in_channels: channels of the RoI features (the neck width, 384 in HTC-X).
        embed_dims: token width d (default: ``in_channels``).
        num_cls_blocks / num_reg_blocks: blocks in each branch (4 / 4 in HTC-X).
        num_heads, mlp_ratio, drop_path_rate: transformer block settings.
        **kwargs: everything else goes to mmdet's ``BBoxHead`` (num_classes, bbox_coder, reg_class_agnostic,
            losses, roi_feat_size, ...).
    """

    def __init__(self, in_channels: int = 256, embed_dims: int | None = None, num_cls_blocks: int = 4,
                 num_reg_blocks: int = 4, num_heads: int = 8, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 **kwargs) -> None:
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        d = embed_dims or in_channels
        if d % num_heads:
            raise ValueError(f"embed_dims={d} must be divisible by num_heads={num_heads}")
        if num_cls_blocks < 0 or num_reg_blocks < 0:
            raise ValueError("block counts must be >= 0")
        # with_avg_pool=True makes BBoxHead size fc_cls / fc_reg for a d-dim pooled token instead of C*7*7
        super().__init__(with_avg_pool=True, in_channels=d, **kwargs)
        del self.avg_pool  # pooling is a token mean here
        self.roi_in_channels, self.embed_dims = in_channels, d
        self.proj = nn.Linear(in_channels, d) if d != in_channels else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, self.roi_feat_area, d))
        trunc_normal_(self.pos_embed, std=0.02)

        def stack(n: int) -> nn.Sequential:
            rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # python floats: meta-device safe
            return nn.Sequential(*[Block(d, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rates[i])
                                   for i in range(n)])

        self.cls_blocks = stack(num_cls_blocks) if self.with_cls else None
        self.cls_norm = nn.LayerNorm(d) if self.with_cls else None
        self.reg_blocks = stack(num_reg_blocks) if self.with_reg else None
        self.reg_norm = nn.LayerNorm(d) if self.with_reg else None
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in (getattr(self, "fc_cls", None), getattr(self, "fc_reg", None)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, return_shared_feat: bool = False) -> tuple:
        """x: N x C x 7 x 7 RoI features -> (cls_score N x (K+1), bbox_pred N x 4 or N x 4K)[, None]."""
        if x.dim() != 4 or x.shape[1] != self.roi_in_channels or x.shape[2] * x.shape[3] != self.roi_feat_area:
            raise ValueError(f"expected RoI features N x {self.roi_in_channels} x {self.roi_feat_size}, "
                             f"got {tuple(x.shape)}")
        tokens = self.proj(x.flatten(2).transpose(1, 2)) + self.pos_embed
        cls_score = bbox_pred = None
        if self.with_cls:
            cls_score = self.fc_cls(self.cls_norm(self.cls_blocks(tokens)).mean(1))
        if self.with_reg:
            bbox_pred = self.fc_reg(self.reg_norm(self.reg_blocks(tokens)).mean(1))
        if return_shared_feat:  # SCNet-style callers ask for a relayed feature; HTC-X has no feature relay
            return cls_score, bbox_pred, None
        return cls_score, bbox_pred
