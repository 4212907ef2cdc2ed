"""UniNet as an mmdet backbone (registry name ``'UniNet'``); the only UniNet file that imports mmdet.

Config example (AGVM A.5.2, COCO fine-tuning)::

    custom_imports = dict(imports=['models.mmdet_uninet'], allow_failed_imports=False)
    model = dict(backbone=dict(
        type='UniNet', arch='g', out_indices=(2, 4, 5), window_sizes=(28, 14), num_subsets=18,
        with_cp=True, drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='work_dirs/uninet_g_in22k/uninet_g_in22k.pth')))

The module *is* a :class:`models.uninet.UniNet` (same parameter names), so mmengine's ``Pretrained``
initialiser loads timm-format weights (a plain state dict, or ``{'state_dict' | 'model': ...}``)
directly; the classification head tensors of a pre-training checkpoint are reported as unexpected
keys and ignored. To take the backbone out of a whole-detector checkpoint use
``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.model import BaseModule

from .uninet import UniNet, UniNetArch

__all__ = ["MMDetUniNet"]


@MODELS.register_module(name="UniNet")
class MMDetUniNet(UniNet, BaseModule):
    """UniNet backbone for mmdet: returns a tuple of NCHW feature maps for ``out_indices``.

    Args (besides :class:`UniNet`'s ``widths`` / ``depths`` / ``expansions`` / ``conv_block``):
        arch: 'g' | 'b0' | 'tiny' | a dict of :class:`UniNetArch` fields.
        out_indices: stages to return (strides 2, 4, 8, 16, 16, 32 for stages 0..5).
        window_sizes: per transformer stage (A.5.2 for UniNet-G: (28, 14)); None = global attention only.
        num_subsets: even split of the transformer blocks; each subset = window blocks + one global block
            (A.5.2 for UniNet-G: 18). None with window_sizes = every block uses windows.
        with_cp: activation checkpointing per block.
        drop_path_rate: stochastic depth.
        frozen_stages: freeze the stem and stages ``0..frozen_stages`` (-1: nothing frozen).
        norm_eval: keep BatchNorm layers in eval mode while training (small per-GPU batches).
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint='uninet_g_in22k.pth')``.
    """

    def __init__(
        self,
        arch: Union[str, dict, UniNetArch] = "g",
        out_indices: Sequence[int] = (2, 4, 5),
        window_sizes: Optional[Sequence[Optional[int]]] = None,
        num_subsets: Optional[int] = None,
        with_cp: bool = False,
        drop_path_rate: float = 0.0,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        init_cfg: Optional[Union[dict, list]] = None,
        **kwargs,
    ) -> None:
        if isinstance(arch, dict):
            arch = UniNetArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()})
        UniNet.__init__(self, arch, num_classes=0, with_head=False, window_sizes=window_sizes,
                        num_subsets=num_subsets, grad_checkpointing=with_cp, drop_path_rate=drop_path_rate,
                        out_indices=out_indices, **kwargs)
        self.init_cfg = init_cfg  # read by BaseModule.init_weights (Pretrained -> mmengine load_checkpoint)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.stem] + [self.stages[i] for i in range(min(self.frozen_stages + 1, len(self.stages)))]
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> "MMDetUniNet":
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.forward_features_list(x))
