"""Environment quirks of the pinned stack, fixed in one place. Call ``apply()`` once at entry points.

1. torchvision on CPU torch. The registry's torchvision 0.28 wheel links against CUDA torch; on the
   CPU build of torch its C++ extension does not load, and ``import torchvision`` then fails with
   ``operator torchvision::nms does not exist`` (its fake-tensor registration needs the operator).
   timm imports torchvision, mmseg imports timm and mmengine's Runner imports torchvision, so the whole
   stack fails. When (and only when) torch has no CUDA *and* torchvision's extension cannot load, we
   define ``torchvision::nms`` (pure torch, greedy NMS, same result as the C++ kernel) and
   ``torchvision::roi_align`` (torchvision's own pure-python fallback) before torchvision is imported.
   On a CUDA build, or where the extension loads, nothing is touched. mmdet's detectors use mmcv.ops,
   not these operators.
2. torch >= 2.6 loads checkpoints with ``weights_only=True``; mmengine checkpoints carry numpy
   scalars, arrays and dtypes in their meta data and HistoryBuffer objects in their message hub, whose
   statistics methods are pickled as ``getattr(HistoryBuffer, 'mean')``. The minimal allow-list: the numpy
   types, HistoryBuffer, and in place of ``builtins.getattr`` a function that gives out only those four
   methods of HistoryBuffer (anything else is refused). ``agvm.mm.checkpoint.read`` loads every checkpoint
   this way; ``weights_only=False`` only behind ``--unsafe-load``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

__all__ = ["apply", "torchvision_shim_needed", "nms_reference"]

_applied = False


def torchvision_shim_needed() -> bool:
    """True iff torch is a CPU build and torchvision's C++ extension cannot be loaded."""
    if torch.version.cuda is not None or torch.cuda.is_available():
        return False
    if "torchvision" in sys.modules:
        return False  # already imported (successfully): too late and not needed
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    if not libs:
        return True
    try:
        torch.ops.load_library(libs[0])
        return False
    except (OSError, RuntimeError, ImportError):
        return True


def nms_reference(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS in pure torch: indices of kept boxes, by decreasing score (torchvision semantics:
    a box is dropped when its IoU with a kept, higher-scoring box is > iou_threshold)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True, stable=True)
    b = boxes[order].float()
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    w = (torch.min(x2[:, None], x2[None]) - torch.max(x1[:, None], x1[None])).clamp(min=0)
    h = (torch.min(y2[:, None], y2[None]) - torch.max(y1[:, None], y1[None])).clamp(min=0)
    inter = w * h
    iou = inter / (area[:, None] + area[None] - inter)
    suppressed = torch.zeros(len(b), dtype=torch.bool)
    over = (iou > iou_threshold).cpu()
    keep = []
    for i in range(len(b)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def _define_torchvision_ops() -> None:
    lib = torch.library.Library("torchvision", "DEF")  # kept alive by the module-level reference below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
               "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")

    def roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        from torchvision.ops.roi_align import _roi_align  # torchvision's pure-torch implementation

        return _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def qnms(dets, scores, iou_threshold):
        raise NotImplementedError("quantized NMS is not available with the CPU torchvision shim")

    lib.impl("nms", nms_reference, "CompositeExplicitAutograd")
    lib.impl("qnms", qnms, "CompositeExplicitAutograd")
    lib.impl("roi_align", roi_align, "CompositeImplicitAutograd")
    global _LIB
    _LIB = lib


_LIB = None


_HISTORY_STATISTICS = ("min", "max", "current", "mean")


def _history_buffer_method(obj, name):
    """Stands in for ``builtins.getattr`` in weights-only loading: mmengine pickles HistoryBuffer's statistics
    methods as ``getattr(HistoryBuffer, 'mean')``. Only those four attributes of HistoryBuffer are given out."""
    from mmengine.logging.history_buffer import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_STATISTICS:
        return getattr(obj, name)
    import pickle

    raise pickle.UnpicklingError(f"refused getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}): only "
                                 f"HistoryBuffer.{{{', '.join(_HISTORY_STATISTICS)}}} are allowed")


def _allow_list_checkpoint_globals() -> None:
    safe = []
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        safe += [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct]
        safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    except (ImportError, AttributeError):
        pass
    try:
        from mmengine.logging.history_buffer import HistoryBuffer

        safe += [HistoryBuffer, (_history_buffer_method, "builtins.getattr")]
    except ImportError:
        pass
    if safe:
        torch.serialization.add_safe_globals(safe)


def apply() -> None:
    """Install the fixes above (idempotent). Import torchvision / timm / mmdet only after this."""
    global _applied
    if _applied:
        return
    if torchvision_shim_needed():
        _define_torchvision_ops()
        import torchvision.extension

        # nms asserts the extension is loaded; our operators now stand in for it. roi_align keeps
        # using torchvision's python fallback, which it chose at import time.
        torchvision.extension._has_ops = lambda: True
    _allow_list_checkpoint_globals()
    _applied = True
