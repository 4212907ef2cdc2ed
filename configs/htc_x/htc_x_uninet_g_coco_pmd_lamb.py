"""Stage 3 with PMD-LAMB at batch 960: the paper's comparison (UniNet-G + HTC-X with PMD-LAMB diverges in the
early training stage; secondary source, results/paper/numbers.yaml uninet_htcx/htc_x/bs960/pmd_lamb).

Everything as htc_x_uninet_g_coco.py (data, model, warm-up, schedule, no clipping) except the optimizer.
Ours (not in the paper): lr 1.5e-4 and weight decay 0.05 as AdamW's, LAMB's eps 1e-6. PMD-LAMB is a
reconstruction from its abstract (agvm/optim/pmd_lamb.py): both moments reset every epoch
(ceil(117266 / 960) = 123 iterations).
"""
_base_ = ["./htc_x_uninet_g_coco.py"]

optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(_delete_=True, type="PMDLAMB", lr=1.5e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05,
                   decay_interval=123, moment_decay=(0.0, 0.0)),
    clip_grad=None)
