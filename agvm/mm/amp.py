"""bf16 autocast with mmcv 2.1.0's detection ops (two-stage detectors: Faster R-CNN, HTC-X).

mmcv's RoIAlign kernels (CPU and CUDA) dispatch float32 / float64 / float16 only, and mmdet's
``SingleRoIExtractor`` casts the RoIs to the features' dtype first (``rois.type_as(feats[0])``), so under
bf16 autocast a two-stage detector stops with "... not implemented for 'BFloat16'" (and bf16 RoI
coordinates would be off by up to 4 px at 1333). mmcv's nms reads the boxes as float32; on CUDA the box
decoder's ``exp`` already runs in float32 under autocast, on CPU it does not.

``patch_mmcv_bf16()`` (called by ``agvm.mm.register_all``) makes both run in float32 when handed bf16:
the RoI extractor gets float32 features (and so float32 RoIs) and returns bf16; nms gets float32 boxes
and scores. float32 and float16 inputs take mmcv's and mmdet's own code unchanged.
"""
from __future__ import annotations

import functools
import sys

import torch

__all__ = ["patch_mmcv_bf16"]


def patch_mmcv_bf16() -> None:
    """Install the float32 detours for bf16 inputs (idempotent)."""
    import mmcv.ops  # noqa: F401 - its package attribute ``nms`` is the function, not the module
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

    nms_mod = sys.modules["mmcv.ops.nms"]
    if getattr(SingleRoIExtractor.forward, "_agvm_bf16", False):
        return
    extract = SingleRoIExtractor.forward

    @functools.wraps(extract)
    def forward(self, feats, rois, roi_scale_factor=None):
        if feats[0].dtype != torch.bfloat16:
            return extract(self, feats, rois, roi_scale_factor)
        out = extract(self, tuple(f.float() for f in feats), rois.float(), roi_scale_factor)
        return out.to(torch.bfloat16)

    forward._agvm_bf16 = True
    SingleRoIExtractor.forward = forward

    nms = nms_mod.nms  # batched_nms looks ``nms`` up in its module at call time

    @functools.wraps(nms)
    def nms_float32(boxes, scores, *args, **kwargs):
        if torch.is_tensor(boxes) and torch.bfloat16 in (boxes.dtype, scores.dtype):
            boxes, scores = boxes.float(), scores.float()
        return nms(boxes, scores, *args, **kwargs)

    nms_mod.nms = nms_float32
