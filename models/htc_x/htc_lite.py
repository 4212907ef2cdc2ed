"""HTC-Lite RoI head and the HTC-X detector.

HTC-Lite (Seesaw Loss, Wang et al., CVPR 2021, arXiv 2008.10032 appendix D) differs from HTC (Chen et al., CVPR
2019): three box stages are kept, the semantic branch is replaced by a global context encoding branch whose vector
(with a multi-label image classification loss) is added to the box and mask RoI features, and only the last stage
has a mask head (no interleaved mask information flow). mmdet's ``SCNetRoIHead`` already implements the global
context fusion (``GlobalContextHead`` + ``_fuse_glbctx``); this head reuses it without the semantic and feature
relay branches and makes the mask branch optional (HTC-X is trained without it on Objects365; AGVM A.5.2).
"""
from __future__ import annotations

from typing import Tuple

import torch
from mmdet.models.detectors import CascadeRCNN
from mmdet.models.roi_heads import CascadeRoIHead, SCNetRoIHead
from mmdet.registry import MODELS
from mmdet.structures import SampleList
from mmdet.structures.bbox import bbox2roi
from mmdet.utils import InstanceList, OptConfigType
from torch import Tensor


def _with_classes(cfg: dict | None, num_classes: int) -> dict | None:
    """A copy of a head config with ``num_classes`` set."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    cfg["num_classes"] = num_classes
    return cfg


@MODELS.register_module()
class HTCLiteRoIHead(SCNetRoIHead):
    """Three-stage cascade with a global context head and an optional single (last-stage) mask head.

    Args:
        num_stages / stage_loss_weights: cascade settings (3 and [1, 0.5, 0.25] in HTC).
        glbctx_head: config of the global context head (mmdet ``GlobalContextHead``); required.
        mask_loss_weight: weight of the single mask loss; None gives SCNet's ``sum(stage_loss_weights)``.
        num_classes: if given, overrides ``num_classes`` of every bbox head, the mask head and the global
            context head (one knob for stage configs: 365 for Objects365, 80 for COCO).
        **kwargs: ``CascadeRoIHead`` arguments (bbox/mask extractors and heads, train_cfg, test_cfg).
            ``mask_head=None`` (with ``mask_roi_extractor=None``) switches the mask branch off.
    """

    def __init__(self, num_stages: int, stage_loss_weights: list[float], glbctx_head: OptConfigType = None,
                 mask_loss_weight: float | None = None, num_classes: int | None = None, **kwargs) -> None:
        if glbctx_head is None:
            raise ValueError("HTC-Lite needs a global context head (glbctx_head=dict(type='GlobalContextHead', ...))")
        if (kwargs.get("mask_head") is None) != (kwargs.get("mask_roi_extractor") is None):
            raise ValueError("give both mask_roi_extractor and mask_head (mask branch on) or neither (off)")
        if num_classes is not None:
            glbctx_head = _with_classes(glbctx_head, num_classes)
            heads = kwargs.get("bbox_head")
            kwargs["bbox_head"] = ([_with_classes(h, num_classes) for h in heads] if isinstance(heads, (list, tuple))
                                   else _with_classes(heads, num_classes))
            if kwargs.get("mask_head") is not None:
                kwargs["mask_head"] = _with_classes(kwargs["mask_head"], num_classes)
        # SCNetRoIHead.__init__ asserts a mask head; HTC-Lite allows none, so build through CascadeRoIHead
        CascadeRoIHead.__init__(self, num_stages=num_stages, stage_loss_weights=stage_loss_weights, **kwargs)
        assert self.with_bbox and not self.with_shared_head
        self.glbctx_head = MODELS.build(glbctx_head)
        self.num_classes = num_classes
        self.mask_loss_weight = sum(stage_loss_weights) if mask_loss_weight is None else float(mask_loss_weight)

    def loss(self, x: Tuple[Tensor], rpn_results_list: InstanceList, batch_data_samples: SampleList) -> dict:
        """Global-context loss, three cascade box stages (with context fused into the RoI features) and, if
        enabled, the mask loss of the last stage's positive samples."""
        assert len(rpn_results_list) == len(batch_data_samples)
        from mmdet.models.utils import unpack_gt_instances

        batch_gt_instances, batch_gt_instances_ignore, batch_img_metas = unpack_gt_instances(batch_data_samples)
        ctx = self.global_context_loss(x=x, batch_gt_instances=batch_gt_instances)
        losses = {"loss_glbctx": ctx["loss_glbctx"]}
        glbctx_feat = ctx["glbctx_feat"]
        results_list = rpn_results_list
        for stage in range(self.num_stages):
            sampling_results = []
            for i in range(len(batch_img_metas)):
                results = results_list[i]
                results.priors = results.pop("bboxes")
                assign_result = self.bbox_assigner[stage].assign(results, batch_gt_instances[i],
                                                                 batch_gt_instances_ignore[i])
                sampling_results.append(self.bbox_sampler[stage].sample(
                    assign_result, results, batch_gt_instances[i], feats=[lvl[i][None] for lvl in x]))
            bbox_results = self.bbox_loss(stage=stage, x=x, sampling_results=sampling_results,
                                          glbctx_feat=glbctx_feat)
            w = self.stage_loss_weights[stage]
            for name, value in bbox_results["loss_bbox"].items():
                losses[f"s{stage}.{name}"] = value * w if "loss" in name else value
            if stage < self.num_stages - 1:
                with torch.no_grad():
                    results_list = self.bbox_head[stage].refine_bboxes(
                        sampling_results=sampling_results, bbox_results=bbox_results, batch_img_metas=batch_img_metas)
        if self.with_mask:
            mask_results = self.mask_loss(x=x, sampling_results=sampling_results,
                                          batch_gt_instances=batch_gt_instances, glbctx_feat=glbctx_feat)
            losses["loss_mask"] = self.mask_loss_weight * mask_results["loss_mask"]["loss_mask"]
        return losses

    def predict_mask(self, x: Tuple[Tensor], semantic_heat: Tensor | None, glbctx_feat: Tensor,
                     batch_img_metas: list[dict], results_list: InstanceList, rescale: bool = False) -> InstanceList:
        """Masks of the final boxes from the single mask head (global context fused, no feature relay)."""
        from mmdet.models.utils import empty_instances

        bboxes = [res.bboxes for res in results_list]
        mask_rois = bbox2roi(bboxes)
        if mask_rois.shape[0] == 0:
            return empty_instances(batch_img_metas=batch_img_metas, device=mask_rois.device, task_type="mask",
                                   instance_results=results_list, mask_thr_binary=self.test_cfg.mask_thr_binary)
        mask_preds = self._mask_forward(x=x, rois=mask_rois, glbctx_feat=glbctx_feat)["mask_preds"]
        mask_preds = mask_preds.split(tuple(len(b) for b in bboxes), 0)
        return self.mask_head.predict_by_feat(mask_preds=mask_preds, results_list=results_list,
                                              batch_img_metas=batch_img_metas, rcnn_test_cfg=self.test_cfg,
                                              rescale=rescale)

    def forward(self, x: Tuple[Tensor], rpn_results_list: InstanceList, batch_data_samples: SampleList) -> tuple:
        """Tensor-mode forward (no post-processing): per-stage-averaged scores, last box deltas[, mask logits]."""
        batch_img_metas = [s.metainfo for s in batch_data_samples]
        _, glbctx_feat = self.glbctx_head(x)
        proposals = [r.bboxes for r in rpn_results_list]
        num_per_img = tuple(len(p) for p in proposals)
        rois, cls_scores, bbox_preds = self._refine_roi(x=x, rois=bbox2roi(proposals), glbctx_feat=glbctx_feat,
                                                        batch_img_metas=batch_img_metas,
                                                        num_proposals_per_img=num_per_img)
        results: tuple = (cls_scores, bbox_preds)
        if self.with_mask:
            mask_preds = self._mask_forward(x=x, rois=torch.cat(rois), glbctx_feat=glbctx_feat)["mask_preds"]
            results = results + (mask_preds.split(num_per_img, 0),)
        return results


@MODELS.register_module()
class HTCX(CascadeRCNN):
    """HTC-X (AGVM appendix A.5.2): backbone + RCNet/SEPC neck (P3-P8) + RPN + HTC-Lite RoI head with decoupled
    transformer bbox heads. Structurally a cascade R-CNN; the differences live in the neck and RoI head configs."""
