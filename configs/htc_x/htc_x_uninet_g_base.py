"""HTC-X + UniNet-G: the model shared by the Objects365 and COCO fine-tuning stages (AGVM appendix A.5.2).

From the paper: HTC-Lite (global context head instead of the semantic branch, one mask head on the last stage),
UniNet-G transformer blocks split into 18 subsets of (window, window, global) attention, RCNet + SEPC over P3-P8
with 384 channels, positive IoU thresholds 0.6 / 0.7 / 0.8, 4 + 4 decoupled transformer blocks (cls / loc).
Not in the paper (our choices, marked "ours" below): anchor scale, RoI levels, heads of the transformer blocks,
norm layers of the neck, drop path during fine-tuning, global context loss weight (SCNet's value).
Parts: models/htc_x/ (registered on import of models.htc_x.register), models/mmdet_uninet.py (backbone 'UniNet').
"""
_base_ = ["mmdet::_base_/default_runtime.py"]
custom_imports = dict(imports=["agvm.mm.registry", "models.mmdet_uninet", "models.htc_x.register"],
                      allow_failed_imports=False)
pipeline = "htc_x"
dataset = "coco"  # 'synthetic' (an override) trains on generated data, see agvm.mm.synthetic
runner_type = "AGVMRunner"  # atomic checkpoints; one-process two-half steps for AGVM optimizers
custom_hooks = [dict(type="AGVMHook")]  # DDP measurement hook + Phi/mu log (agvm_variance.jsonl)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))
visualizer = dict(vis_backends=[dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")])
# param groups with a "module" key (backbone, neck, rpn_head, roi_head = global context head, bbox_head, mask_head)
optim_wrapper = dict(constructor="AGVMOptimWrapperConstructor", paramwise_cfg=dict(no_decay_norm_bias=True))
# BatchNorm layers that train here: UniNet-G's convolution stages (stem, Fused-MBConv; norm_eval=False) and SEPC's
# iBN. At 2 images per GPU their statistics would come from 2 images (SEPC's authors need >= 4 per GPU for iBN), so
# mmengine converts every BatchNorm to torch's SyncBatchNorm under multi-GPU DDP (statistics over all ranks: 960
# images at batch 960); in one process or on CPU ranks they stay BatchNorm (agvm.mm.train logs which).
sync_bn = "torch"

num_classes = 80
neck_channels = 384  # paper
mask_on = True

model = dict(
    type="HTCX",
    data_preprocessor=dict(
        type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
    backbone=dict(
        type="UniNet", arch="g", out_indices=(2, 4, 5),  # strides 8, 16, 32; channels 384, 576, 1152
        window_sizes=(28, 14), num_subsets=18,  # paper
        with_cp=True, drop_path_rate=0.3,  # drop path: ours (pre-training used 0.3)
        init_cfg=None),  # stage configs set the checkpoint
    neck=dict(
        type="RCNetSEPC", in_channels=[384, 576, 1152], out_channels=neck_channels, num_outs=6,  # P3-P8
        rcnet=dict(use_dcn=True, deform_groups=2, norm_cfg=dict(type="GN", num_groups=32)),  # GN: ours
        sepc=dict(num_pconvs=4, use_dcn=True, ibn=True, num_extra_convs=1)),
    rpn_head=dict(
        type="RPNHead", in_channels=neck_channels, feat_channels=neck_channels,
        anchor_generator=dict(type="AnchorGenerator", scales=[4], ratios=[0.5, 1.0, 2.0],  # scale 4: ours
                              strides=[8, 16, 32, 64, 128, 256]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0)),
    roi_head=dict(
        type="HTCLiteRoIHead",
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        glbctx_head=dict(type="GlobalContextHead", num_convs=4, in_channels=neck_channels,
                         conv_out_channels=neck_channels, num_classes=num_classes, loss_weight=3.0,
                         conv_to_res=True),
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
            out_channels=neck_channels, featmap_strides=[8, 16, 32, 64]),  # P3-P6: ours
        bbox_head=[
            dict(type="DecoupledTransformerBBoxHead", in_channels=neck_channels, num_cls_blocks=4, num_reg_blocks=4,
                 num_heads=12, mlp_ratio=4.0, roi_feat_size=7, num_classes=num_classes,
                 bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
                 reg_class_agnostic=True,
                 loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                 loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0))
            for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])],
        mask_roi_extractor=dict(
            type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
            out_channels=neck_channels, featmap_strides=[8, 16, 32, 64]),
        mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=neck_channels, conv_out_channels=neck_channels,
                       num_classes=num_classes,
                       loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          ignore_iof_thr=-1),
            sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
            allowed_border=0, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=2000, max_per_img=2000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=[
            dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=thr, neg_iou_thr=thr, min_pos_iou=thr,
                               ignore_iof_thr=-1),
                 sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                              add_gt_as_proposals=True),
                 mask_size=28, pos_weight=-1, debug=False)
            for thr in (0.6, 0.7, 0.8)]),  # paper (HTC: 0.5 / 0.6 / 0.7)
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.001, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5)))
