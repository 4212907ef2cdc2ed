"""Every pipeline trains a few iterations with AGVM on the generated data and evaluates with its real
metric (COCO box / mask AP via pycocotools, PQ, mIoU) through the one entry point ``agvm.mm.train.train``."""
import glob
import json
import math
import os.path as osp

import pytest

from _mm_helpers import tiny_options

pytestmark = [pytest.mark.slow, pytest.mark.mm]

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))

CASES = {
    "faster_rcnn": (["coco/bbox_mAP", "coco/bbox_mAP_50"], ["backbone", "neck", "rpn_head", "bbox_head"]),
    "mask_rcnn": (["coco/bbox_mAP", "coco/segm_mAP"], ["backbone", "neck", "rpn_head", "bbox_head", "mask_head"]),
    "panoptic_fpn": (["coco_panoptic/PQ", "coco_panoptic/PQ_th", "coco_panoptic/PQ_st"],
                     ["backbone", "neck", "rpn_head", "bbox_head", "mask_head", "semantic_head"]),
    "retinanet": (["coco/bbox_mAP"], ["backbone", "neck", "bbox_head"]),
    "semantic_fpn": (["mIoU", "aAcc"], ["backbone", "neck", "decode_head"]),
}


@pytest.mark.parametrize("pipeline", sorted(CASES))
def test_pipeline_trains_and_evaluates(pipeline, synthetic_root, tmp_path):
    from agvm.mm.train import train

    keys, modules = CASES[pipeline]
    config = osp.join(ROOT, "configs", pipeline, f"{pipeline}_r50_bs32_agvm_sgd.py")
    work = str(tmp_path / "work")
    metrics = train(config, work, tiny_options(pipeline, synthetic_root), resume=False)

    for k in keys:
        assert k in metrics and math.isfinite(metrics[k]), (k, metrics)
    with open(osp.join(work, "metrics.json")) as f:
        assert json.load(f) == pytest.approx(metrics)
    # 4 iterations, tau = 2: measurements after iterations 2 and 4
    with open(osp.join(work, "agvm_variance.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iter"] for r in records] == [2, 4]
    for r in records:
        assert set(r) == {"iter", "epoch", "phi", "mu", "lr", "batch_size", "optimizer"}
        assert sorted(r["phi"]) == sorted(modules) and sorted(r["mu"]) == sorted(modules)
        assert r["mu"]["backbone"] == 1.0  # the anchor
        assert all(0.0 <= v <= 2.0 for v in r["phi"].values())
        assert r["optimizer"] == "AGVMSGD" and r["batch_size"] == (4 if pipeline == "semantic_fpn" else 2)
        assert r["lr"] >= 0  # mmengine's PolyLR reaches eta_min = 0 at its last step
    assert records[0]["lr"] > 0
    assert any(r["mu"][m] != 1.0 for r in records for m in modules if m != "backbone")
    # atomic checkpoints: complete files only, no temporaries left behind
    assert glob.glob(osp.join(work, "*_*.pth")) and not glob.glob(osp.join(work, "*.tmp"))
    # TensorBoard scalars written by the visualizer backend
    assert glob.glob(osp.join(work, "*", "vis_data", "events.out.tfevents.*"))


def test_authors_code_variant(synthetic_root, tmp_path):
    """The authors'-code config: their detector (trained BatchNorm, softmax RPN, SmoothL1), exponential warm-up,
    clip window, AGVM measuring at phase 1 from start_iter (mu stays 1 before it), ratio clip, all reaching the
    model / optimizer / wrapper through the config; sync_bn is dropped in one process."""
    from agvm.mm.train import train

    config = osp.join(ROOT, "configs", "faster_rcnn", "authors_code", "faster_rcnn_r50_bs256_agvm_sgd.py")
    work = str(tmp_path / "work")
    options = tiny_options("faster_rcnn", synthetic_root, **{
        "train_dataloader.batch_size": 2,
        "param_scheduler": [dict(type="ExpWarmupLR", start_factor=0.01, by_epoch=False, begin=0, end=3)],
        "optim_wrapper.clip_window": (1, 3), "optim_wrapper.optimizer.start_iter": 3})
    train(config, work, options, resume=False)
    with open(osp.join(work, "agvm_variance.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["iter"] for r in records] == [1, 3]  # tau 2, phase 1: t = 1, 3 (their 0-based iterations 0, 2)
    assert all(v == 1.0 for v in records[0]["mu"].values())  # before start_iter: Phi measured, mu kept
    assert all(v is not None for v in records[0]["phi"].values())
    assert any(v != 1.0 for v in records[1]["mu"].values())
    assert records[0]["lr"] == pytest.approx(0.16 * 2 ** 0.5 * 0.01)  # exp. warm-up, iteration 0 of 0..2
