"""HTC-X configs on the generated data (``dataset=synthetic``): the stage configs point at the generated COCO files
with masks, and the tiny config trains, evaluates and writes COCO results files end to end."""
from __future__ import annotations

import json
import math
import os

import pytest

pytestmark = pytest.mark.mm
pytest.importorskip("mmdet")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HTC = os.path.join(ROOT, "configs", "htc_x")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    from agvm.mm.synthetic import make_all

    return make_all(str(tmp_path_factory.mktemp("synthetic")), num_train=4, num_val=2, image_size=96, seed=0)


@pytest.mark.parametrize("stage, metrics", [("coco", ["bbox", "segm"]), ("o365", "bbox"),
                                            ("coco_pmd_lamb", ["bbox", "segm"])])
def test_stage_configs_point_at_the_generated_coco_files(synthetic, stage, metrics):
    from agvm.mm.train import load_config

    cfg = load_config(os.path.join(HTC, f"htc_x_uninet_g_{stage}.py"),
                      {"dataset": "synthetic", "synthetic_root": synthetic})
    coco = os.path.join(synthetic, "coco") + "/"
    for key, split in (("train_dataloader", "train2017"), ("val_dataloader", "val2017"),
                       ("test_dataloader", "val2017")):
        ds = cfg[key].dataset
        assert (ds.type, ds.data_root, ds.ann_file, ds.data_prefix) == (
            "CocoDataset", coco, f"annotations/instances_{split}.json", dict(img=f"{split}/"))
        assert os.path.isfile(os.path.join(coco, ds.ann_file))
        assert ds.metainfo.classes == ("rectangle", "ellipse", "triangle")
    assert cfg.val_evaluator.ann_file == os.path.join(coco, "annotations", "instances_val2017.json")
    assert cfg.val_evaluator.metric == metrics
    assert cfg.model.roi_head.num_classes == 3 and cfg.load_from is None
    scales = cfg.train_dataloader.dataset.pipeline[2].scales
    assert scales == [(96, 96)]
    assert cfg.optim_wrapper.optimizer.type in ("AGVMAdamW", "AdamW", "PMDLAMB")  # the stage's optimizer stays


@pytest.mark.slow
def test_tiny_htc_x_trains_on_synthetic_data_and_writes_results_files(synthetic, tmp_path):
    """Two training iterations (4 images, 2 per step, AGVM-AdamW two-half steps measuring every step), the COCO box
    and mask evaluation, then the test-dev style results files from the checkpoint."""
    from agvm.mm.evaluate import write_results_files
    from agvm.mm.train import train

    opts = {"dataset": "synthetic", "synthetic_root": synthetic, "log_level": "WARNING",
            "model.test_cfg.rcnn.score_thr": 0.0}
    work = tmp_path / "work"
    metrics = train(os.path.join(HTC, "htc_x_uninet_tiny.py"), str(work), cfg_options=dict(opts), resume=False)
    assert {"coco/bbox_mAP", "coco/segm_mAP"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    lines = [json.loads(x) for x in (work / "agvm_variance.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in lines] == [1, 2] and "mask_head" in lines[-1]["mu"]

    prefix = tmp_path / "results" / "detections"
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "detections.bbox.json").write_text("stale")  # must not pass for this run's output
    files = write_results_files(os.path.join(HTC, "htc_x_uninet_tiny.py"), str(work / "epoch_1.pth"), str(prefix),
                                dict(opts), str(tmp_path / "eval"))
    assert files == [f"{prefix}.bbox.json", f"{prefix}.segm.json"]
    ann = json.loads(open(os.path.join(synthetic, "coco", "annotations", "instances_val2017.json")).read())
    ids, cats = {i["id"] for i in ann["images"]}, {c["id"] for c in ann["categories"]}
    bbox, segm = (json.loads(open(f).read()) for f in files)
    assert bbox and segm  # score_thr 0: every image has detections
    assert {d["image_id"] for d in bbox} == ids and {d["category_id"] for d in bbox} <= cats
    assert all(len(d["bbox"]) == 4 and 0.0 <= d["score"] <= 1.0 for d in bbox)
    assert all(set(d["segmentation"]) == {"size", "counts"} for d in segm)


def test_results_files_need_a_coco_metric(tmp_path):
    from agvm.mm.evaluate import write_results_files

    cfg = tmp_path / "c.py"
    cfg.write_text("test_evaluator = dict(type='IoUMetric')\n")
    with pytest.raises(ValueError, match="need one CocoMetric test_evaluator"):
        write_results_files(str(cfg), "x.pth", str(tmp_path / "p"))
