"""HTC-X with the tiny UniNet: the same detector code at CPU-test size (not a paper configuration).

Tiny UniNet (widths 16..96, 6 transformer blocks in 2 subsets), 64-channel RCNet + SEPC over P3-P8 with plain
convs instead of DCN (CPU speed), 1 + 1 decoupled transformer blocks, few proposals / samples. COCO-format data at
``$AGVM_COCO_ROOT`` (e.g. agvm.mm.synthetic.make_coco output; num_classes 3 fits the synthetic shapes), 96 px.
"""
_base_ = ["./htc_x_uninet_g_base.py"]

num_classes = 3
c = 64
model = dict(
    backbone=dict(arch="tiny", out_indices=(2, 4, 5), window_sizes=(4, 2), num_subsets=2, with_cp=False,
                  drop_path_rate=0.0),
    neck=dict(in_channels=[32, 64, 96], out_channels=c,
              rcnet=dict(use_dcn=False, norm_cfg=dict(type="GN", num_groups=8)),
              sepc=dict(num_pconvs=2, use_dcn=False, ibn=True, num_extra_convs=1)),
    rpn_head=dict(in_channels=c, feat_channels=c),
    roi_head=dict(
        num_classes=num_classes,
        glbctx_head=dict(num_convs=2, in_channels=c, conv_out_channels=c),
        bbox_roi_extractor=dict(out_channels=c),
        bbox_head=[dict(type="DecoupledTransformerBBoxHead", in_channels=c, num_cls_blocks=1, num_reg_blocks=1,
                        num_heads=4, roi_feat_size=7,
                        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds),
                        reg_class_agnostic=True,
                        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                        loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0))
                   for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067])],
        mask_roi_extractor=dict(out_channels=c),
        mask_head=dict(num_convs=1, in_channels=c, conv_out_channels=c)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=200, max_per_img=100),
        rcnn=[dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=thr, neg_iou_thr=thr, min_pos_iou=thr,
                                 ignore_iof_thr=-1),
                   sampler=dict(type="RandomSampler", num=64, pos_fraction=0.25, neg_pos_ub=-1,
                                add_gt_as_proposals=True),
                   mask_size=28, pos_weight=-1, debug=False)
              for thr in (0.6, 0.7, 0.8)]),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100)))

# data: COCO format, 96 px (the synthetic generator's default size)
data_root = "{{$AGVM_COCO_ROOT:data/synthetic/coco/}}"
metainfo = dict(classes=("rectangle", "ellipse", "triangle"))
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomResize", scale=(96, 96), ratio_range=(0.8, 1.2), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(96, 96), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=True),
    dataset=dict(type="EnvRootCocoDataset", data_root=data_root, metainfo=metainfo,
                 ann_file="annotations/instances_train2017.json", data_prefix=dict(img="train2017/"),
                 filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=2, num_workers=0, drop_last=False, sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type="EnvRootCocoDataset", data_root=data_root, metainfo=metainfo,
                 ann_file="annotations/instances_val2017.json", data_prefix=dict(img="val2017/"), test_mode=True,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/instances_val2017.json",
                     metric=["bbox", "segm"])
test_evaluator = val_evaluator
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=1, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
# the COCO stage's optimizer (AGVM-AdamW; one process: two-half micro-batches, agvm.mm.optim)
optim_wrapper = dict(type="AGVMOptimWrapper",
                     optimizer=dict(type="AGVMAdamW", lr=1e-4, weight_decay=0.05, interval=1))
param_scheduler = []
