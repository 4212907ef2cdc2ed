"""A small synthetic dataset in real COCO and ADE20K formats, with shapes a detector can learn.

Each image has a two-region textured background (stuff: "sky" above a random horizon, "ground"
below) and 1-4 non-overlapping solid shapes (things: rectangle, ellipse, triangle) whose colour
depends on the class (plus jitter and pixel noise). Written:

    make_coco(root):  train2017/, val2017/ (JPEG), annotations/instances_{train,val}2017.json
                      (boxes, polygon masks), annotations/panoptic_{train,val}2017.json and
                      annotations/panoptic_{train,val}2017/*.png (COCO panoptic PNG ids)
    make_ade(root):   images/{training,validation}/*.jpg, annotations/{training,validation}/*.png
                      (ADE20K layout: label 0 = unlabelled, 1.. = classes; reduce_zero_label=True)

CLI: ``python -m agvm.mm.synthetic --out data/synthetic`` writes ``<out>/coco`` and ``<out>/ade``.
Configs are pointed at it with ``--cfg-options dataset=synthetic`` (see ``apply_synthetic``).
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np

from agvm.fileio import write_json_atomic

from .panoptic import id2rgb

__all__ = ["THING_CLASSES", "STUFF_CLASSES", "SEG_CLASSES", "make_coco", "make_ade", "make_all", "ensure",
           "apply_synthetic", "default_root", "SyntheticStream", "use_stream"]

THING_CLASSES = ("rectangle", "ellipse", "triangle")
STUFF_CLASSES = ("sky", "ground")
SEG_CLASSES = STUFF_CLASSES + THING_CLASSES  # ADE labels 1..5 (0 = unlabelled)
_THING_RGB = {0: (220, 40, 40), 1: (40, 200, 60), 2: (240, 220, 40)}
_STUFF_RGB = {0: (90, 140, 230), 1: (120, 85, 50)}
_VERSION = 2  # bump when the generated content changes


def _scene(rng: np.random.Generator, size: int):
    """One image: (rgb uint8 [H, W, 3], stuff map [H, W] in {0, 1}, [(thing class, bool mask)])."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(rng.uniform(0.3, 0.7) * h)
    stuff = (yy >= horizon).astype(np.int64)
    img = np.zeros((h, w, 3), np.float32)
    for s, rgb in _STUFF_RGB.items():
        img[stuff == s] = rgb
    img[stuff == 0] += (8 * np.sin(xx[stuff == 0] / 3.0))[:, None]  # sky: soft stripes
    img[stuff == 1] += rng.normal(0, 18, size=(int((stuff == 1).sum()), 1))  # ground: grainy
    things: List[Tuple[int, np.ndarray]] = []
    occupied = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(20):
            cls = int(rng.integers(0, len(THING_CLASSES)))
            bw, bh = (rng.uniform(0.2, 0.45, size=2) * size).astype(int)
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            if cls == 0:
                mask = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
            elif cls == 1:
                cx, cy = x0 + bw / 2, y0 + bh / 2
                mask = ((xx + 0.5 - cx) / (bw / 2)) ** 2 + ((yy + 0.5 - cy) / (bh / 2)) ** 2 <= 1.0
            else:  # isosceles triangle pointing up
                rel = (yy - y0 + 0.5) / bh
                mask = (yy >= y0) & (yy < y0 + bh) & (np.abs(xx + 0.5 - (x0 + bw / 2)) <= rel * bw / 2)
            grown = np.pad(mask, 2)[:-4, :-4] | np.pad(mask, 2)[4:, 4:] | mask
            if mask.sum() < 40 or (grown & occupied).any():
                continue
            occupied |= mask
            colour = np.array(_THING_RGB[cls], np.float32) + rng.normal(0, 12, size=3)
            img[mask] = colour
            things.append((cls, mask))
            break
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), stuff, things


def _polygons(mask: np.ndarray) -> List[List[float]]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = c.reshape(-1, 2).astype(float)
        if len(c) >= 3:
            polys.append([float(v) for v in c.reshape(-1)])
    return polys


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def _write_image(path: str, rgb: np.ndarray) -> None:
    import cv2

    os.makedirs(osp.dirname(path), exist_ok=True)
    ext = osp.splitext(path)[1].lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in (".jpg", ".jpeg") else []
    data = rgb if rgb.ndim == 2 else rgb[..., ::-1]  # 2-D: a single-channel (label) PNG
    if not cv2.imwrite(path, np.ascontiguousarray(data), params):
        raise OSError(f"could not write {path}")


def _check(num_train: int, num_val: int, image_size: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 px (mmdet drops images below 32 px), got {image_size}")


def make_coco(root: str, num_train: int = 16, num_val: int = 8, image_size: int = 96, seed: int = 0) -> str:
    """Write a COCO-format dataset (instances + panoptic) under ``root``; returns ``root``."""
    _check(num_train, num_val, image_size)
    rng = np.random.default_rng(seed)
    thing_cats = [{"id": i + 1, "name": n, "supercategory": "shape", "isthing": 1} for i, n in enumerate(THING_CLASSES)]
    stuff_cats = [{"id": len(THING_CLASSES) + i + 1, "name": n, "supercategory": "background", "isthing": 0}
                  for i, n in enumerate(STUFF_CLASSES)]
    for split, num in (("train2017", num_train), ("val2017", num_val)):
        images, anns, pan_anns = [], [], []
        for k in range(num):
            image_id = k + 1
            name = f"{image_id:012d}"
            rgb, stuff, things = _scene(rng, image_size)
            _write_image(osp.join(root, split, name + ".jpg"), rgb)
            images.append({"id": image_id, "file_name": name + ".jpg", "width": image_size, "height": image_size})
            pan = np.zeros(stuff.shape, np.int64)
            segments = []
            for s in range(len(STUFF_CLASSES)):
                region = stuff == s
                for _, m in things:
                    region &= ~m
                if region.any():
                    seg_id = stuff_cats[s]["id"] * 1000
                    pan[region] = seg_id
                    segments.append({"id": seg_id, "category_id": stuff_cats[s]["id"], "area": int(region.sum()),
                                     "bbox": _bbox(region), "iscrowd": 0})
            for j, (cls, m) in enumerate(things):
                cat_id = thing_cats[cls]["id"]
                anns.append({"id": len(anns) + 1 + 100000 * (split == "val2017"), "image_id": image_id,
                             "category_id": cat_id, "bbox": _bbox(m), "area": float(m.sum()),
                             "segmentation": _polygons(m), "iscrowd": 0})
                seg_id = cat_id * 1000 + j + 1
                pan[m] = seg_id
                segments.append({"id": seg_id, "category_id": cat_id, "area": int(m.sum()), "bbox": _bbox(m),
                                 "iscrowd": 0})
            _write_image(osp.join(root, "annotations", f"panoptic_{split}", name + ".png"), id2rgb(pan))
            pan_anns.append({"image_id": image_id, "file_name": name + ".png", "segments_info": segments})
        info = {"description": "AGVM synthetic shapes", "version": _VERSION}
        write_json_atomic(osp.join(root, "annotations", f"instances_{split}.json"),
                          {"info": info, "images": images, "annotations": anns,
                           "categories": [{k: v for k, v in c.items() if k != "isthing"} for c in thing_cats]},
                          indent=None)
        write_json_atomic(osp.join(root, "annotations", f"panoptic_{split}.json"),
                          {"info": info, "images": images, "annotations": pan_anns,
                           "categories": thing_cats + stuff_cats}, indent=None)
    return root


def make_ade(root: str, num_train: int = 16, num_val: int = 8, image_size: int = 96, seed: int = 0) -> str:
    """Write an ADE20K-layout semantic segmentation dataset under ``root``; returns ``root``.

    Label PNG values: 0 unlabelled (a 1-px frame, as ADE has unlabelled pixels), 1 + index into
    ``SEG_CLASSES`` otherwise (mmseg's ADE20KDataset uses reduce_zero_label=True)."""
    _check(num_train, num_val, image_size)
    rng = np.random.default_rng(seed + 1)
    for split, num in (("training", num_train), ("validation", num_val)):
        for k in range(num):
            name = f"ADE_{split[:5]}_{k + 1:08d}"
            rgb, stuff, things = _scene(rng, image_size)
            label = stuff + 1
            for cls, m in things:
                label[m] = len(STUFF_CLASSES) + cls + 1
            label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 0
            _write_image(osp.join(root, "images", split, name + ".jpg"), rgb)
            _write_image(osp.join(root, "annotations", split, name + ".png"), label.astype(np.uint8))
    return root


def default_root() -> str:
    """``$AGVM_SYNTHETIC_ROOT`` or ``data/synthetic`` (relative to the working directory)."""
    return os.environ.get("AGVM_SYNTHETIC_ROOT", osp.join("data", "synthetic"))


def make_all(out: str, num_train: int = 16, num_val: int = 8, image_size: int = 96, seed: int = 0) -> str:
    make_coco(osp.join(out, "coco"), num_train, num_val, image_size, seed)
    make_ade(osp.join(out, "ade"), num_train, num_val, image_size, seed)
    write_json_atomic(osp.join(out, "done.json"), {"version": _VERSION, "num_train": num_train, "num_val": num_val,
                                                   "image_size": image_size, "seed": seed})
    return out


def ensure(out: Optional[str] = None, **kwargs) -> str:
    """Generate the synthetic data at ``out`` (``make_all(out, **kwargs)``) unless a complete copy of
    this generator version is already there (then ``kwargs`` are ignored)."""
    out = out or default_root()
    marker = osp.join(out, "done.json")
    if osp.exists(marker):
        with open(marker) as f:
            if json.load(f).get("version") == _VERSION:
                return out
    return make_all(out, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Pointing a config at the synthetic data (``dataset='synthetic'``)
# ------------------------------------------------------------------------------------------------------
def _walk(obj, fn):
    """Apply ``fn`` to every dict inside ``obj`` (depth first)."""
    if isinstance(obj, dict):
        fn(obj)
        for v in list(obj.values()):
            _walk(v, fn)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, fn)


PIPELINES = ("faster_rcnn", "mask_rcnn", "panoptic_fpn", "retinanet", "semantic_fpn", "htc_x")


def apply_synthetic(cfg, root: Optional[str] = None, image_size: int = 96) -> None:
    """Rewrite an mmengine Config in place to train and evaluate on the synthetic data.

    Data roots, class lists, the heads' ``num_classes``, the image scales of the pipelines (to
    ``image_size``), and backbone pretrained init (off: nothing is downloaded). Everything else
    (model, optimizer, schedule) stays as the config says. The pipeline kind is ``cfg.pipeline``.
    HTC-X (``htc_x``, COCO or Objects365 stage configs): the generated COCO files with their masks replace the
    stage's dataset and annotation files, and the stage's ``load_from`` (the hand-over from the previous stage,
    made for the real data) is dropped.
    """
    root = osp.abspath(root or default_root())
    kind = cfg.get("pipeline")
    if kind not in PIPELINES:
        raise ValueError(f"dataset='synthetic' needs the config's `pipeline` key (one of {', '.join(PIPELINES)}), "
                         f"got {kind!r}")
    size = (image_size, image_size)

    def rescale(d: dict) -> None:
        t = d.get("type")
        if t in ("Resize", "RandomResize") and "scale" in d:
            d["scale"] = size if t == "Resize" else [size, size]
            d["keep_ratio"] = True
            if t == "RandomResize":
                d["ratio_range"] = (0.8, 1.2)
                d["scale"] = size
        elif t == "RandomChoiceResize":
            d["scales"] = [size]
        elif t == "RandomCrop" and "crop_size" in d:
            d["crop_size"] = size
        elif t == "PackSegInputs" or t == "PackDetInputs":
            pass
        if "init_cfg" in d and isinstance(d["init_cfg"], dict) and d["init_cfg"].get("type") == "Pretrained":
            d["init_cfg"] = None
        if d.get("pretrained") and isinstance(d.get("pretrained"), str):
            d["pretrained"] = None

    _walk(cfg._cfg_dict if hasattr(cfg, "_cfg_dict") else cfg, rescale)
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(key):  # a few small images: loading in the main process is fastest
            cfg[key]["num_workers"] = 0
            cfg[key]["persistent_workers"] = False
    if kind == "semantic_fpn":
        data_root = osp.join(root, "ade")
        meta = dict(classes=SEG_CLASSES, palette=[list(_STUFF_RGB[0]), list(_STUFF_RGB[1])] +
                    [list(_THING_RGB[i]) for i in range(len(THING_CLASSES))])
        for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(key):
                ds = cfg[key]["dataset"]
                ds["data_root"] = data_root
                ds["metainfo"] = meta
                # mmseg's ADE20KDataset only accepts subsets of ADE's 150 names: same layout, own classes
                ds.update(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png", reduce_zero_label=True)
        cfg.model.decode_head.num_classes = len(SEG_CLASSES)
        if cfg.model.get("auxiliary_head"):
            cfg.model.auxiliary_head.num_classes = len(SEG_CLASSES)
        if cfg.model.get("data_preprocessor") and cfg.model.data_preprocessor.get("size"):
            cfg.model.data_preprocessor.size = size
    else:
        data_root = osp.join(root, "coco") + "/"
        if kind == "panoptic_fpn":
            meta = dict(classes=THING_CLASSES + STUFF_CLASSES, thing_classes=THING_CLASSES,
                        stuff_classes=STUFF_CLASSES)
        else:
            meta = dict(classes=THING_CLASSES)
        for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(key):
                ds = cfg[key]["dataset"]
                ds["data_root"] = data_root
                ds["metainfo"] = meta
                ds.setdefault("filter_cfg", dict(filter_empty_gt=True, min_size=8))
                if kind == "htc_x":  # stage configs name COCO or Objects365 files: the generated COCO ones
                    split = "train2017" if key == "train_dataloader" else "val2017"
                    ds.update(type="CocoDataset", ann_file=f"annotations/instances_{split}.json",
                              data_prefix=dict(img=f"{split}/"))
        for key in ("val_evaluator", "test_evaluator"):
            ev = cfg.get(key)
            for e in (ev if isinstance(ev, list) else [ev] if ev else []):
                if "ann_file" in e:
                    name = "instances_val2017.json" if kind == "htc_x" else osp.basename(e["ann_file"])
                    e["ann_file"] = osp.join(data_root, "annotations", name)
                if "seg_prefix" in e:
                    e["seg_prefix"] = osp.join(data_root, "annotations", osp.basename(e["seg_prefix"].rstrip("/")))
                if e.get("type") == "CocoPanopticMetric":
                    e["nproc"] = 1
        m = cfg.model
        n = len(THING_CLASSES)
        if kind == "retinanet":
            m.bbox_head.num_classes = n
        elif kind == "htc_x":
            m.roi_head.num_classes = n  # HTCLiteRoIHead sets it on every box head, the mask and context heads
            cfg.load_from = None
        else:
            m.roi_head.bbox_head.num_classes = n
            if m.roi_head.get("mask_head"):
                m.roi_head.mask_head.num_classes = n
        if kind == "panoptic_fpn":
            m.semantic_head.num_things_classes = n
            m.semantic_head.num_stuff_classes = len(STUFF_CLASSES)
            m.panoptic_fusion_head.num_things_classes = n
            m.panoptic_fusion_head.num_stuff_classes = len(STUFF_CLASSES)
    cfg.dataset = "synthetic"
    cfg.synthetic_root = root
    if cfg.get("synthetic_stream"):  # e.g. synthetic_stream=dict(length=3200, seed=1): train on a fresh stream
        use_stream(cfg, image_size=image_size, **cfg.synthetic_stream)


# ------------------------------------------------------------------------------------------------------
# A fresh image stream: training images generated in memory, none seen twice
# ------------------------------------------------------------------------------------------------------
class SyntheticStream:
    """``length`` training images generated in memory: image ``k`` is the scene of ``default_rng([seed, k])``
    (the on-disk sets use integer seeds, so none of their images), with its boxes. A run that reads each index
    once (one epoch) never sees an image twice, so it cannot memorise its training data. ``pipeline`` is the
    config's train pipeline with the file-loading step replaced by ``LoadImageFromNDArray`` (``use_stream``)."""

    def __init__(self, length: int, pipeline, image_size: int = 96, seed: int = 0):
        from mmengine.dataset import Compose

        if length < 1:
            raise ValueError(f"SyntheticStream: length must be >= 1, got {length}")
        _check(1, 1, image_size)
        self.length, self.image_size, self.seed = int(length), int(image_size), int(seed)
        self.pipeline = Compose(pipeline)
        self.metainfo = dict(classes=THING_CLASSES)

    def __len__(self) -> int:
        return self.length

    def get_data_info(self, idx: int) -> dict:
        """Size and id of image ``idx`` (what mmdet's aspect-ratio batch sampler reads; every image is square)."""
        return {"img_id": idx, "height": self.image_size, "width": self.image_size}

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.length:
            raise IndexError(f"SyntheticStream index {idx} out of range [0, {self.length})")
        rgb, _, things = _scene(np.random.default_rng([self.seed, idx]), self.image_size)
        instances = []
        for cls, mask in things:
            x, y, w, h = _bbox(mask)
            instances.append({"bbox": [x, y, x + w, y + h], "bbox_label": cls, "ignore_flag": 0})
        info = {"img": np.ascontiguousarray(rgb[..., ::-1]), "img_id": idx, "height": self.image_size,
                "width": self.image_size, "instances": instances}  # BGR, as LoadImageFromFile reads it
        return self.pipeline(info)


def use_stream(cfg, length: int, seed: int = 0, image_size: int = 96) -> None:
    """Make ``cfg``'s training set a ``SyntheticStream`` of ``length`` images (validation stays on disk).
    Boxes only: a train pipeline that loads masks or segmentation maps is refused."""
    loader = cfg.train_dataloader
    ds = loader.dataset
    if ds.get("type") == "SyntheticStream":  # already a stream (a dumped config): new length / seed
        ds.update(length=int(length), seed=int(seed), image_size=int(image_size))
        return
    pipeline = [dict(step) for step in ds.get("pipeline") or []]
    files = [k for k, step in enumerate(pipeline) if str(step.get("type", "")).split(".")[-1] == "LoadImageFromFile"]
    if "pipeline" not in ds or not files:
        raise ValueError("synthetic_stream needs train_dataloader.dataset with a pipeline that starts by "
                         f"LoadImageFromFile; got dataset type {ds.get('type')!r}")
    for step in pipeline:
        if "LoadAnnotations" in str(step.get("type")) and (step.get("with_mask") or step.get("with_seg")):
            raise ValueError("synthetic_stream generates boxes only; this config's train pipeline loads masks or "
                             "segmentation maps (use the on-disk synthetic data: drop synthetic_stream)")
    pipeline[files[0]] = dict(type="LoadImageFromNDArray")
    loader.dataset = dict(type="SyntheticStream", length=int(length), seed=int(seed), image_size=int(image_size),
                          pipeline=pipeline)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the AGVM synthetic COCO + ADE20K data.")
    p.add_argument("--out", default=default_root())
    p.add_argument("--num-train", type=int, default=16)
    p.add_argument("--num-val", type=int, default=8)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_all(a.out, a.num_train, a.num_val, a.image_size, a.seed)
    print(f"wrote {a.out}/coco and {a.out}/ade")


if __name__ == "__main__":
    main()
