"""The panopticapi stand-in (id <-> RGB, PQ) and the synthetic COCO / ADE20K data."""
import json
import os.path as osp

import numpy as np
import pytest

from agvm.mm.panoptic import PQStat, id2rgb, rgb2id


def test_id_rgb_roundtrip():
    ids = np.array([[0, 1, 255], [256, 65535, 4000 * 1000 + 7]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0, 2].tolist() == [255, 0, 0] and rgb[1, 0].tolist() == [0, 1, 0]
    assert (rgb2id(rgb) == ids).all()
    assert rgb2id([1, 2, 3]) == 1 + 2 * 256 + 3 * 65536 and id2rgb(1 + 2 * 256 + 3 * 65536) == [1, 2, 3]
    with pytest.raises(ValueError, match="segment ids"):
        id2rgb(np.array([256 ** 3]))


def test_pq_average_by_hand():
    stat = PQStat()
    stat[1].tp, stat[1].iou, stat[1].fp, stat[1].fn = 2, 1.5, 1, 1  # PQ = 1.5 / 3, SQ = 0.75, RQ = 2/3
    stat[2].tp, stat[2].iou = 1, 0.9  # stuff: PQ = SQ = 0.9, RQ = 1
    other = PQStat()
    other[2].fn = 1  # merged: stuff PQ = 0.9 / 1.5
    stat += other
    cats = {1: {"isthing": 1}, 2: {"isthing": 0}, 3: {"isthing": 1}}  # 3 never occurs: left out
    things, per = stat.pq_average(cats, isthing=True)
    assert things == pytest.approx({"pq": 0.5, "sq": 0.75, "rq": 2 / 3, "n": 1})
    stuff, _ = stat.pq_average(cats, isthing=False)
    assert stuff["pq"] == pytest.approx(0.6) and stuff["rq"] == pytest.approx(2 / 3)
    both, _ = stat.pq_average(cats, isthing=None)
    assert both["pq"] == pytest.approx(0.55) and both["n"] == 2
    assert per[3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert PQStat().pq_average(cats, isthing=None)[0]["n"] == 0


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    pytest.importorskip("cv2")
    from agvm.mm.synthetic import make_coco

    return make_coco(str(tmp_path_factory.mktemp("coco")), num_train=3, num_val=2, image_size=64, seed=3)


def test_coco_instances_consistent(coco):
    import cv2
    from pycocotools.coco import COCO

    api = COCO(osp.join(coco, "annotations", "instances_train2017.json"))
    assert sorted(c["name"] for c in api.loadCats(api.getCatIds())) == ["ellipse", "rectangle", "triangle"]
    assert len(api.getImgIds()) == 3 and len(api.getAnnIds()) >= 3
    for ann in api.loadAnns(api.getAnnIds()):
        m = api.annToMask(ann)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert abs(xs.min() - x) <= 3 and abs(ys.min() - y) <= 3 and abs(xs.max() + 1 - (x + w)) <= 3  # thin apexes
        assert abs(m.sum() - ann["area"]) <= 0.25 * ann["area"]  # polygon vs pixel mask
        img = cv2.imread(osp.join(coco, "train2017", api.loadImgs(ann["image_id"])[0]["file_name"]))
        assert img.shape == (64, 64, 3)


def test_coco_panoptic_png_matches_json(coco):
    import cv2

    with open(osp.join(coco, "annotations", "panoptic_val2017.json")) as f:
        pan = json.load(f)
    cats = {c["id"]: c for c in pan["categories"]}
    assert {c["name"] for c in cats.values() if not c["isthing"]} == {"sky", "ground"}
    for ann in pan["annotations"]:
        png = cv2.imread(osp.join(coco, "annotations", "panoptic_val2017", ann["file_name"]))[..., ::-1]
        ids = rgb2id(png)
        segs = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) == set(segs)
        for sid, s in segs.items():
            assert (ids == sid).sum() == s["area"] and s["category_id"] in cats


def test_mmdet_pq_with_the_shim(coco, tmp_path):
    """mmdet's own matching (pq_compute_single_core) through the shim: a perfect prediction gives
    PQ 1; dropping one thing segment gives that category one false negative."""
    pytest.importorskip("mmdet")
    import shutil

    from agvm.mm import panoptic

    panoptic.install()
    from mmdet.evaluation.functional import pq_compute_single_core

    with open(osp.join(coco, "annotations", "panoptic_val2017.json")) as f:
        pan = json.load(f)
    gt_dir = osp.join(coco, "annotations", "panoptic_val2017")
    cats = {c["id"]: c for c in pan["categories"]}
    pairs = [(a, json.loads(json.dumps(a))) for a in pan["annotations"]]
    stat = pq_compute_single_core(0, pairs, gt_dir, gt_dir, cats)
    assert stat.pq_average(cats, isthing=None)[0]["pq"] == pytest.approx(1.0)
    # drop the first thing segment of image 1 from the prediction (its pixels become VOID)
    import cv2

    pred_dir = str(tmp_path / "pred")
    shutil.copytree(gt_dir, pred_dir)
    gt, pred = pairs[0][0], json.loads(json.dumps(pan["annotations"][0]))
    thing = next(s for s in pred["segments_info"] if cats[s["category_id"]]["isthing"])
    pred["segments_info"] = [s for s in pred["segments_info"] if s["id"] != thing["id"]]
    path = osp.join(pred_dir, gt["file_name"])
    ids = rgb2id(cv2.imread(path)[..., ::-1])
    ids[ids == thing["id"]] = 0
    cv2.imwrite(path, np.ascontiguousarray(id2rgb(ids)[..., ::-1]))
    stat = pq_compute_single_core(0, [(gt, pred)] + pairs[1:], gt_dir, pred_dir, cats)
    c = stat[thing["category_id"]]
    assert c.fn == 1 and c.fp == 0
    res, per = stat.pq_average(cats, isthing=None)
    assert per[thing["category_id"]]["pq"] == pytest.approx(c.tp / (c.tp + 0.5)) and res["pq"] < 1.0


def test_ade_layout(tmp_path):
    pytest.importorskip("cv2")
    import cv2

    from agvm.mm.synthetic import SEG_CLASSES, make_ade

    root = make_ade(str(tmp_path), num_train=2, num_val=1, image_size=48, seed=1)
    label = cv2.imread(osp.join(root, "annotations", "training", "ADE_train_00000001.png"), cv2.IMREAD_UNCHANGED)
    assert label.ndim == 2 and label.shape == (48, 48)
    assert label[0].max() == 0 and set(np.unique(label)) <= set(range(len(SEG_CLASSES) + 1))
    assert {1, 2} <= set(np.unique(label).tolist())  # both stuff classes present
    assert osp.exists(osp.join(root, "images", "validation", "ADE_valid_00000001.jpg"))
    with pytest.raises(ValueError, match="image_size"):
        make_ade(str(tmp_path), image_size=16)


def test_same_seed_same_data(tmp_path):
    pytest.importorskip("cv2")
    from agvm.mm.synthetic import make_coco

    a = make_coco(str(tmp_path / "a"), num_train=1, num_val=1, image_size=48, seed=5)
    b = make_coco(str(tmp_path / "b"), num_train=1, num_val=1, image_size=48, seed=5)
    for rel in ("annotations/instances_train2017.json", "annotations/panoptic_val2017.json"):
        assert open(osp.join(a, rel)).read() == open(osp.join(b, rel)).read()
