"""Stage 2 of 3: HTC-X + UniNet-G on Objects365 v1, no mask branch (AGVM appendix A.5.2).

Paper: AdamW, lr 8e-5, batch 64, 20 epochs, initialised from the ImageNet-22K pre-training; shorter side random in
400-1200 and longer side <= 1600 "during the fine-tuning phase". Ours (not in the paper): weight decay, warmup,
lr steps, test scale, 2 images per GPU (64 = 32 GPUs x 2).

Data:      $AGVM_O365_ROOT (default data/objects365/) with annotations/objects365_{train,val}.json, train/, val/.
Hand-over: python -m models.handover pretrain-to-det work_dirs/uninet_g_in22k/uninet_g_in22k.pth \
               work_dirs/htc_x_uninet_g_o365/init.pth
           (drops the classifier, prefixes 'backbone.'; load_from below; override with $AGVM_O365_INIT).
Output:    the last checkpoint of this stage feeds models.handover o365-to-coco (see htc_x_uninet_g_coco.py).
"""
_base_ = ["./htc_x_uninet_g_base.py"]

num_classes = 365
mask_on = False
dataset = "objects365"
total_batch_size = 64  # paper
num_gpus = 32  # launch with this many processes: train_dataloader.batch_size (2) is per GPU
model = dict(roi_head=dict(num_classes=num_classes, mask_roi_extractor=None, mask_head=None))

load_from = "{{$AGVM_O365_INIT:work_dirs/htc_x_uninet_g_o365/init.pth}}"
data_root = "{{$AGVM_O365_ROOT:data/objects365/}}"
dataset_type = "EnvRootObjects365V1Dataset"
backend_args = None

train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=False),
    dict(type="RandomChoiceResize", scales=[(1600, s) for s in range(400, 1201, 32)], keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=2, num_workers=4, persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=True), batch_sampler=dict(type="AspectRatioBatchSampler"),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file="annotations/objects365_train.json",
                 data_prefix=dict(img="train/"), filter_cfg=dict(filter_empty_gt=True, min_size=32),
                 pipeline=train_pipeline, backend_args=backend_args))
val_dataloader = dict(
    batch_size=1, num_workers=2, persistent_workers=True, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, ann_file="annotations/objects365_val.json",
                 data_prefix=dict(img="val/"), test_mode=True, pipeline=test_pipeline, backend_args=backend_args))
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/objects365_val.json", metric="bbox",
                     format_only=False, backend_args=backend_args)
test_evaluator = val_evaluator

max_epochs = 20  # paper
train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),  # ours
    dict(type="MultiStepLR", begin=0, end=max_epochs, by_epoch=True, milestones=[16, 19], gamma=0.1),  # ours
]
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=8e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),  # lr: paper; wd: ours
    clip_grad=None)
auto_scale_lr = dict(enable=False, base_batch_size=total_batch_size)
