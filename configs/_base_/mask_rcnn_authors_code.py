# Mask R-CNN R50-FPN as the AGVM authors' public code builds it (Sense-X/AGVM,
# configs/instance_segmentation/_base_/models/mask_rcnn_r50_fpn_align.py + their agvm/*_bs{256,512}.py),
# written as overrides of mmdet 3.3's model. Per-run files (configs/mask_rcnn/authors_code/, generated)
# set the batch, optimizer, clip window and schedule.
_base_ = './mask_rcnn.py'
model = dict(
    # their backbone: norm_cfg=SyncBN (requires_grad), norm_eval=False (see faster_rcnn_authors_code.py)
    backbone=dict(norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False),
    rpn_head=dict(
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),  # softmax RPN
        loss_bbox=dict(type='SmoothL1Loss', beta=1.0 / 9.0, loss_weight=1.0)),
    roi_head=dict(
        # their Mask R-CNN samples the box RoIs with sampling_ratio 0 and the mask RoIs with 2
        bbox_roi_extractor=dict(roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0)),
        mask_roi_extractor=dict(roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=2)),
        bbox_head=dict(loss_bbox=dict(type='SmoothL1Loss', beta=1.0, loss_weight=1.0))),
    train_cfg=dict(rpn_proposal=dict(nms_pre=2000, max_per_img=2000)),  # 2000 training proposals
    test_cfg=dict(rcnn=dict(score_thr=0.0)))
sync_bn = 'torch'  # mmengine: BatchNorm -> torch.nn.SyncBatchNorm when training on several GPUs
