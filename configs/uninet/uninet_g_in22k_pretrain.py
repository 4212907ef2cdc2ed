"""Stage 1 of 3: UniNet-G pre-training on ImageNet-22K (AGVM appendix A.5.2).

Paper: 150 epochs, AdamW, cosine learning rate from a peak of 5e-3 down to 1e-4, batch 5120, weight
decay 0.03, Mixup, CutMix, Random Erasing, stochastic depth 0.3. Values marked "not in the paper" are
the usual DeiT / timm defaults for these augmentations.

Run:   python -m models.pretrain configs/uninet/uninet_g_in22k_pretrain.py --data-root $AGVM_IMAGENET_ROOT
       (torchrun --nproc_per_node 8 -m models.pretrain ... for several GPUs; batch_size is global)
Data:  an ImageFolder tree <root>/<train_split>/<class>/<image>; root from --data-root, data.root or
       the env variable AGVM_IMAGENET_ROOT.
Hand-over: <work_dir>/uninet_g_in22k.pth, a plain timm-format state dict (stem.*, stages.*, head.*,
       classifier.*). The Objects365 stage loads it with init_cfg=dict(type='Pretrained', checkpoint=...)
       into the mmdet backbone 'UniNet', which has no head/classifier: those tensors are dropped there.
"""

model = dict(
    name="uninet_g",           # timm name (models/uninet.py)
    num_classes=21841,         # ImageNet-22K (fall11 release); must equal the number of class folders
    drop_path_rate=0.3,        # paper
    grad_checkpointing=False,  # turn on for memory
)

data = dict(
    root=None,                 # None -> --data-root or $AGVM_IMAGENET_ROOT
    train_split="train",
    input_size=224,
    interpolation="bicubic",
    auto_augment="rand-m9-mstd0.5-inc1",  # not in the paper
    color_jitter=0.4,                      # not in the paper (unused when auto_augment is set)
    re_prob=0.25,              # Random Erasing (paper); probability not in the paper
    re_mode="pixel",
    re_count=1,
    workers=10,
    batch_per_gpu=64,          # batch_size / (batch_per_gpu * world_size) = gradient-accumulation steps
)

mixup = dict(                  # Mixup + CutMix (paper); strengths not in the paper
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    prob=1.0,
    switch_prob=0.5,
    mode="batch",
    label_smoothing=0.1,
)

batch_size = 5120              # global (paper)

optimizer = dict(opt="adamw", lr=5e-3, weight_decay=0.03, betas=(0.9, 0.999), eps=1e-8)  # paper: lr, wd

scheduler = dict(
    sched="cosine",
    epochs=150,                # paper
    min_lr=1e-4,               # paper
    warmup_epochs=5,           # not in the paper
    warmup_lr=1e-6,
)

train = dict(
    amp="bf16",                # "bf16" (CUDA autocast) or None
    clip_grad=None,
    channels_last=True,        # NHWC weights / inputs (the transformer stages work on NHWC tokens)
    max_iters=None,            # stop early after this many optimizer steps (tests / smoke runs)
    log_interval=50,
    ckpt_interval=None,        # optimizer steps between checkpoints; None -> end of every epoch
    seed=0,
)

work_dir = "work_dirs/uninet_g_in22k_pretrain"
export_name = "uninet_g_in22k.pth"  # the hand-over checkpoint for the Objects365 stage
