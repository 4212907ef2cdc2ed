"""Stage 3 with plain AdamW at batch 960: the paper's comparison (UniNet-G + HTC-X with AdamW diverges in the
early training stage; secondary source, results/paper/numbers.yaml uninet_htcx/htc_x/bs960/adamw).

Everything as htc_x_uninet_g_coco.py (data, model, warm-up, schedule, no clipping, lr 1.5e-4, weight decay
0.05) except the optimizer: AdamW without AGVM's modulation.
"""
_base_ = ["./htc_x_uninet_g_coco.py"]

optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(_delete_=True, type="AdamW", lr=1.5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    clip_grad=None)
