"""The few ``panopticapi`` pieces mmdet needs (panopticapi is not on PyPI), written here.

COCO panoptic format (Kirillov et al., "Panoptic Segmentation", CVPR 2019): a PNG per image whose
RGB value encodes a segment id as ``id = R + 256 G + 256^2 B``; the JSON lists each segment's
``category_id``. Panoptic quality per category c over matched segment pairs (IoU > 0.5, unique):

    PQ_c = sum_{(p, g) in TP} IoU(p, g) / (|TP| + |FP| / 2 + |FN| / 2) = SQ_c * RQ_c

and PQ is the mean of PQ_c over the categories that occur (in ground truth or prediction).

mmdet 3.x imports ``panopticapi.utils`` (rgb2id, id2rgb) and ``panopticapi.evaluation``
(OFFSET, VOID, PQStat) and does the segment matching itself (``pq_compute_single_core``).
``install()`` puts this module into ``sys.modules`` as ``panopticapi``, ``panopticapi.utils``
and ``panopticapi.evaluation`` and patches mmdet modules that were imported before it. It never
replaces a real panopticapi if one is installed.
"""
from __future__ import annotations

import sys
import types
from collections import defaultdict
from typing import Dict, Mapping, Optional, Tuple

import numpy as np

__all__ = ["OFFSET", "VOID", "rgb2id", "id2rgb", "PQStatCat", "PQStat", "install"]

OFFSET = 256 * 256 * 256  # gt_id * OFFSET + pred_id keys the intersection counts
VOID = 0  # segment id of unlabelled pixels


def rgb2id(color) -> np.ndarray:
    """Segment ids from an RGB panoptic PNG ([H, W, 3] -> [H, W] int); a 3-sequence -> int."""
    if isinstance(color, np.ndarray) and color.ndim == 3:
        if color.dtype == np.uint8:
            color = color.astype(np.int32)
        return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]
    return int(color[0] + 256 * color[1] + 256 * 256 * color[2])


def id2rgb(id_map):
    """RGB encoding of segment ids ([H, W] -> [H, W, 3] uint8); an int -> [r, g, b]."""
    if isinstance(id_map, np.ndarray):
        ids = id_map.copy().astype(np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= OFFSET:
            raise ValueError(f"segment ids must lie in [0, {OFFSET}), got [{ids.min()}, {ids.max()}]")
        rgb = np.zeros(ids.shape + (3,), dtype=np.uint8)
        for c in range(3):
            rgb[..., c] = ids % 256
            ids //= 256
        return rgb
    out = []
    for _ in range(3):
        out.append(id_map % 256)
        id_map //= 256
    return out


class PQStatCat:
    """Matching counts of one category: summed IoU of true positives, tp, fp, fn."""

    def __init__(self) -> None:
        self.iou = 0.0
        self.tp = 0
        self.fp = 0
        self.fn = 0

    def __iadd__(self, other: "PQStatCat") -> "PQStatCat":
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


class PQStat:
    """Per-category counts (``pq_stat[category_id].tp += 1``) and their PQ / SQ / RQ averages."""

    def __init__(self) -> None:
        self.pq_per_cat: Dict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: "PQStat") -> "PQStat":
        for label, stat in other.pq_per_cat.items():
            self.pq_per_cat[label] += stat
        return self

    def pq_average(self, categories: Mapping[int, dict], isthing: Optional[bool]) -> Tuple[dict, dict]:
        """Mean PQ, SQ, RQ over ``categories`` (all, things only or stuff only by ``isthing``).

        A category with no segment in ground truth or prediction is left out of the mean (n counts
        the others). Returns ``({"pq", "sq", "rq", "n"}, {category_id: {"pq", "sq", "rq"}})``.
        """
        pq = sq = rq = 0.0
        n = 0
        per_class: Dict[int, dict] = {}
        for label, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            stat = self.pq_per_cat[label]
            denom = stat.tp + 0.5 * stat.fp + 0.5 * stat.fn
            if denom == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_c = stat.iou / denom
            sq_c = stat.iou / stat.tp if stat.tp else 0.0
            rq_c = stat.tp / denom
            per_class[label] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
            pq, sq, rq = pq + pq_c, sq + sq_c, rq + rq_c
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def _is_real_panopticapi(mod) -> bool:
    return mod is not None and not getattr(mod, "_agvm_shim", False)


def install() -> bool:
    """Make ``import panopticapi`` (utils, evaluation) resolve to this module's functions.

    Returns False (and does nothing) when a real panopticapi is importable. Also fills the
    module-level names of mmdet modules that were imported before and found no panopticapi.
    """
    existing = sys.modules.get("panopticapi")
    if existing is None:
        try:
            import panopticapi as existing  # noqa: F401  (a real installation wins)
        except ImportError:
            existing = None
    if _is_real_panopticapi(existing):
        return False
    if existing is None:
        pkg = types.ModuleType("panopticapi")
        pkg.__path__ = []  # a package, so ``from panopticapi import utils`` works
        pkg._agvm_shim = True
        utils = types.ModuleType("panopticapi.utils")
        utils.rgb2id, utils.id2rgb = rgb2id, id2rgb
        evaluation = types.ModuleType("panopticapi.evaluation")
        evaluation.OFFSET, evaluation.VOID = OFFSET, VOID
        evaluation.PQStat, evaluation.PQStatCat = PQStat, PQStatCat
        pkg.utils, pkg.evaluation = utils, evaluation
        sys.modules.update({"panopticapi": pkg, "panopticapi.utils": utils, "panopticapi.evaluation": evaluation})
    pkg = sys.modules["panopticapi"]
    patches = {
        "mmdet.evaluation.functional.panoptic_utils": dict(PQStat=PQStat, rgb2id=rgb2id, VOID=VOID, OFFSET=OFFSET),
        "mmdet.evaluation.metrics.coco_panoptic_metric": dict(
            panopticapi=pkg, PQStat=PQStat, VOID=VOID, id2rgb=id2rgb, rgb2id=rgb2id),
    }
    for modname, names in patches.items():
        mod = sys.modules.get(modname)
        if mod is not None:
            for k, v in names.items():
                if getattr(mod, k, None) is None or k in ("PQStat", "VOID"):
                    setattr(mod, k, v)
    return True
