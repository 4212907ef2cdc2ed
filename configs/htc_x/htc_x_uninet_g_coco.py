"""Stage 3 of 3: HTC-X + UniNet-G on COCO with AGVM-AdamW at batch 960 (AGVM appendix A.5.2, Table 3 row).

Paper: AGVM + AdamW, lr 1.5e-4, batch 960, 11 epochs, shorter side random in 400-1200, longer side <= 1600,
windows 28x28 (stage 4) and 14x14 (stage 5), initialised from the Objects365 model; mask branch on.
Ours (not in the paper): weight decay, warmup, lr steps, test scale, 2 images per GPU (960 = 480 GPUs x 2),
AGVM interval 10 (batch 960 < 1k) / alpha 0.97 / mu clip [0.1, 10] (the appendix's defaults), var_eps 1e-8, no
gradient clipping. The comparisons at this batch (htc_x_uninet_g_coco_adamw.py, _pmd_lamb.py; the paper: both
diverge early) inherit everything from this file and change only the optimizer: the same warm-up, schedule and
(no) clipping. COCO test-dev results files: htc_x_uninet_g_coco_testdev.py.

Data:      $AGVM_COCO_ROOT (default data/coco/) with annotations/instances_{train,val}2017.json, train2017/, val2017/.
Hand-over: python -m models.handover o365-to-coco work_dirs/htc_x_uninet_g_o365/epoch_20.pth \
               work_dirs/htc_x_uninet_g_coco/init.pth
           (keeps backbone / neck / RPN / box regression and the transformer blocks; drops the 365-class
           classifiers and the global-context class fc; the mask branch is new; override with $AGVM_COCO_INIT).
Optimizer: 'AGVMAdamW' is registered by agvm.mm.register_all() (the training entry point agvm.mm.train calls it).
"""
_base_ = ["./htc_x_uninet_g_base.py"]

num_classes = 80
total_batch_size = 960  # paper
num_gpus = 480  # launch with this many processes: train_dataloader.batch_size (2) is per GPU
model = dict(roi_head=dict(num_classes=num_classes), backbone=dict(window_sizes=(28, 14)))  # windows: paper

load_from = "{{$AGVM_COCO_INIT:work_dirs/htc_x_uninet_g_coco/init.pth}}"
data_root = "{{$AGVM_COCO_ROOT:data/coco/}}"
dataset_type = "EnvRootCocoDataset"
backend_args = None

train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="RandomChoiceResize", scales=[(1600, s) for s in range(400, 1201, 32)], keep_ratio=True),  # paper
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2, num_workers=4, persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True), batch_sampler=dict(type="AspectRatioBatchSampler"),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file="annotations/instances_train2017.json",
                 data_prefix=dict(img="train2017/"), filter_cfg=dict(filter_empty_gt=True, min_size=32),
                 pipeline=train_pipeline, backend_args=backend_args))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file="annotations/instances_val2017.json",
                 data_prefix=dict(img="val2017/"), test_mode=True, pipeline=test_pipeline,
                 backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/instances_val2017.json",
                     metric=["bbox", "segm"], format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

max_epochs = 11  # paper
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=300),  # ours
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[8, 10], gamma=0.1),  # ours
]
optim_wrapper = dict(
    type="AGVMOptimWrapper",
    optimizer=dict(type="AGVMAdamW", lr=1.5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,  # lr: paper; wd: ours
                   interval=10, phase=0, alpha=0.97, mu_clip=(0.1, 10.0), var_eps=1e-8),
    clip_grad=None)
auto_scale_lr = dict(enable=False, base_batch_size=total_batch_size)
