"""Evaluate a checkpoint with its config's metric: ``python -m agvm.mm.evaluate CONFIG CHECKPOINT [...]``.

    python -m agvm.mm.evaluate configs/faster_rcnn/faster_rcnn_r50_bs512_agvm_sgd.py work_dirs/x/iter_100.pth \
        [--cfg-options dataset=synthetic] [--work-dir DIR] [--out metrics.json] [--unsafe-load]
    python -m agvm.mm.evaluate configs/uninet/uninet_g_in22k_pretrain.py uninet_g_in22k.pth --data-root DIR

Checkpoints understood (the format is recognised from the file, not from a flag):
- mmengine checkpoints of this repository's mmdet / mmseg configs (``{'meta', 'state_dict', ...}``);
- checkpoints of the authors' mmdetection 2.x code (mmcv 1.x layout: ``meta.mmdet_version = '2.*'``,
  ``meta.CLASSES``, maybe a ``module.`` prefix from an un-unwrapped model wrapper). For Faster R-CNN,
  Mask R-CNN and RetinaNet the parameter names of mmdet 2.x and 3.x are the same (``rpn_head.rpn_conv``,
  ``roi_head.bbox_head.shared_fcs.{0,1}`` / ``fc_cls`` / ``fc_reg``, ``roi_head.mask_head.convs.N.conv`` /
  ``upsample`` / ``conv_logits``, ``bbox_head.retina_cls`` / ``retina_reg``, ``neck.lateral_convs.N.conv``:
  mmdet 3's model zoo serves the 2.x files unchanged, and ``tests/mm/test_evaluate.py`` checks the names
  against mmdet 3.3's models), so the remapping (``MMDET2_RULES``) strips wrapper prefixes and refuses
  mmdet 1.x files (whose class order and RoI-head layout differ: convert them with mmdet 2.x's
  ``tools/model_converters/upgrade_model_version.py`` first);
- UniNet weights in timm's format (a plain state dict, or ``{'model' | 'state_dict': ...}``) with the
  ImageNet pre-training config (``models.pretrain`` format): evaluated on ``<root>/<split>`` (ImageFolder)
  with top-1 / top-5 accuracy. Given with a detector config instead, they are refused with a message: a
  backbone alone cannot be evaluated as a detector (fine-tune from it with ``init_cfg=dict(type='Pretrained')``).

Loading is ``torch.load(weights_only=True)`` (mmengine's HistoryBuffer and numpy scalars are allow-listed by
``agvm._compat``); files that need more are refused unless ``--unsafe-load`` says the file is trusted. A
truncated or corrupted file gives a one-line error, not a pickle trace. Parameter names or shapes that do not
match the config's model give an error listing the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import pickle
import re
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from agvm.fileio import write_json_atomic

__all__ = ["CheckpointError", "load_checkpoint_file", "extract_state_dict", "detect_source", "remap_state_dict",
           "load_into_model", "evaluate", "evaluate_classifier", "write_results_files", "results_files_run", "main",
           "MMDET2_RULES"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with the config; the message says why and what to do."""


# (pattern, replacement, why). Applied in order to every key of an mmdet 2.x / mmcv 1.x checkpoint.
MMDET2_RULES: Tuple[Tuple[str, str, str], ...] = (
    (r"^module\.", "", "model wrapper prefix (DDP / the authors' AgvmDistModule saved without unwrapping)"),
)
# A two-stage mmdet 1.x checkpoint keeps its box / mask heads at the top level; 2.x moved them into roi_head.
_MMDET1_TWO_STAGE = re.compile(r"^(bbox_head|mask_head)\.(fc_cls|fc_reg|shared_fcs|convs|conv_logits)")


# ---------------------------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------------------------

def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    msg = str(err).strip()
    if "WeightsUnpickler error:" in msg:  # torch wraps the real reason in a long weights_only explanation
        msg = msg.split("WeightsUnpickler error:", 1)[1].strip()
    first = msg.splitlines()[0].split(". ")[0].rstrip(".") if msg else type(err).__name__
    size = path.stat().st_size
    return CheckpointError(
        f"checkpoint {path} cannot be read: the file looks truncated or corrupted ({size} bytes; "
        f"{type(err).__name__}: {first[:200]}). Copy or download it again; for a run's own checkpoint, use the "
        "previous one (checkpoints are written atomically, so an older file is complete).")


class _Inert:
    """Stands in for any object a checkpoint stores besides tensors (log buffers, functions, configs): it is
    created without running the stored class's code and ignores its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a stand-in dict
        pass

    def append(self, value: Any) -> None:  # APPENDS on a stand-in list
        pass

    def extend(self, values: Any) -> None:
        pass


# Globals the restricted loader resolves for real: torch's tensor rebuilding, containers, numpy arrays.
_REAL_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"), ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


_TORCH_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "uint8", "int8", "bool"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL_GLOBALS or (module == "torch" and name in _TORCH_DTYPES) \
                or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        return _Inert


class _RestrictedPickleModule:
    """A ``pickle_module`` for torch.load: tensors and plain containers are rebuilt, every other global becomes
    an inert stand-in, so no code stored in the file runs (the fallback when weights_only=True refuses)."""

    __name__ = "agvm_restricted_pickle"
    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(f, **kwargs).load()


def load_checkpoint_file(path: str | os.PathLike, unsafe: bool = False) -> Any:
    """The object stored in ``path`` (``.pth``/``.pt``/``.ckpt`` via torch.load, or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted; use another file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for bad headers / lengths
            raise _corrupt(path, err) from None
    import agvm._compat

    agvm._compat.apply()  # allow-lists mmengine's HistoryBuffer and numpy scalars for weights_only loading
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as err:
        msg = str(err)
        bad = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if not bad:
            raise _corrupt(path, err) from None
        # Objects besides the weights (e.g. mmengine's message hub: HistoryBuffer with its statistics
        # functions). Read the file again with every such object replaced by an inert stand-in.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
        except Exception as err2:
            raise CheckpointError(
                f"checkpoint {path} holds a Python object ({bad.group(1)}) that safe loading (weights_only=True) "
                f"refuses, and the restricted reader failed too ({type(err2).__name__}: {str(err2)[:120]}). If you "
                "trust the file, pass --unsafe-load (torch.load(weights_only=False)).") from None
        print(f"[evaluate] {path}: non-tensor objects (first: {bad.group(1)}) were replaced by inert stand-ins "
              "(no code from the file was run); the weights are complete", file=sys.stderr)
        return obj
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            ImportError, IndexError, TypeError) as err:
        raise _corrupt(path, err) from None


def extract_state_dict(obj: Any, path: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, meta) from an mmengine / mmcv checkpoint, a timm-style ``{'model': ...}`` or a plain dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state_dict or a checkpoint holding one), got "
                              f"{type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    else:
        sd = obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(obj)[:10]}); is this a model checkpoint?")
    return tensors, meta


def detect_source(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> str:
    """'mmdet1', 'mmdet2' (mmcv 1.x layout), 'mmengine' or 'plain' (timm / torch state dict)."""
    version = str(meta.get("mmdet_version", ""))
    if version.startswith("1."):
        return "mmdet1"
    if version.startswith("2.") or str(meta.get("mmcv_version", "")).startswith("1.") or "CLASSES" in meta:
        return "mmdet2"
    if "mmengine_version" in meta or "dataset_meta" in meta or meta:
        return "mmengine"
    return "plain"


def rpn_softmax_to_sigmoid(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Convert a softmax RPN classifier (2 channels per anchor: foreground, background, as mmdet >= 2.5 orders
    them) into the sigmoid one (1 channel per anchor) with identical objectness:
    sigmoid(z_fg - z_bg) = softmax(z_fg, z_bg)[fg], and the difference of two convolutions is one convolution."""
    w = weight.reshape(weight.shape[0] // 2, 2, *weight.shape[1:])
    b = None if bias is None else bias.reshape(-1, 2)
    return w[:, 0] - w[:, 1], None if b is None else b[:, 0] - b[:, 1]


def remap_state_dict(state_dict: Dict[str, torch.Tensor], source: str,
                     model_keys: Iterable[str] = (),
                     model_state: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Keys renamed for this repository's (mmdet 3.x) models; returns (new state dict, notes on what changed).

    Besides the prefix rules, the authors' configs train the RPN with a softmax classifier (``use_sigmoid=False``:
    2 logits per anchor); when the config's model has the sigmoid RPN (1 logit per anchor) the classifier is
    converted exactly (``rpn_softmax_to_sigmoid``)."""
    model_keys = set(model_keys) | set(model_state or {})
    notes: List[str] = []
    two_stage = any(k.startswith("roi_head.") for k in model_keys)
    if source == "mmdet1" or (two_stage and any(_MMDET1_TWO_STAGE.match(k) for k in state_dict)
                              and not any(k.startswith("roi_head.") for k in state_dict)):
        raise CheckpointError(
            "this is an mmdetection 1.x checkpoint (box/mask heads outside roi_head, background class first): "
            "convert it with mmdetection 2.x's tools/model_converters/upgrade_model_version.py, then evaluate")
    out: Dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    for k, v in state_dict.items():
        new = k
        for pattern, repl, _ in (MMDET2_RULES if source in ("mmdet2", "plain", "mmengine") else ()):
            changed = re.sub(pattern, repl, new)
            if changed != new:
                counts[pattern] += 1
                new = changed
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r} after removing wrapper prefixes")
        out[new] = v
    notes += [f"{n} keys: removed '{p.strip('^').replace(chr(92), '')}'" for p, n in counts.items()]
    w_key, b_key = "rpn_head.rpn_cls.weight", "rpn_head.rpn_cls.bias"
    if model_state and w_key in out and w_key in model_state \
            and out[w_key].shape[0] == 2 * model_state[w_key].shape[0] \
            and out[w_key].shape[1:] == model_state[w_key].shape[1:]:
        out[w_key], b = rpn_softmax_to_sigmoid(out[w_key], out.get(b_key))
        if b is not None:
            out[b_key] = b
        notes.append("rpn_head.rpn_cls: softmax RPN classifier (2 logits per anchor) converted to the config's "
                     "sigmoid RPN (fg - bg logit; identical objectness scores)")
    return out, notes


def _summarise(keys: Sequence[str], limit: int = 15) -> str:
    groups = Counter(".".join(k.split(".")[:2]) for k in keys)
    head = ", ".join(f"{g}.* ({n})" for g, n in groups.most_common(8))
    listed = "\n    ".join(list(keys)[:limit]) + (f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{len(keys)} [by prefix: {head}]\n    {listed}"


def load_into_model(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Strict load: any missing, unexpected or mis-shaped key is an error that lists them.

    BatchNorm ``num_batches_tracked`` counters missing from older checkpoints are not an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the config's model:"]
        if missing:
            parts.append(f"  missing keys (in the model, not in the checkpoint): {_summarise(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys (in the checkpoint, not in the model): {_summarise(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches: {_summarise(shapes)}")
        parts.append("  Check that the config is the one the checkpoint was trained with (pipeline, backbone, "
                     "num_classes).")
        raise CheckpointError("\n".join(parts))
    full = dict(state_dict)
    for k in own:
        if k not in full:  # num_batches_tracked only
            full[k] = own[k]
    model.load_state_dict(full, strict=True)


def _backbone_only(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    backbone = getattr(model, "backbone", None)
    if backbone is None or any(k.startswith("backbone.") for k in state_dict):
        return False
    own = set(backbone.state_dict())
    return len(own & set(state_dict)) >= 0.5 * max(1, len(own))


def prepare(model: torch.nn.Module, checkpoint: str, unsafe: bool = False) -> List[str]:
    """Read ``checkpoint``, remap it for ``model`` and load it strictly; returns notes on the conversion."""
    obj = load_checkpoint_file(checkpoint, unsafe)
    sd, meta = extract_state_dict(obj, checkpoint)
    source = detect_source(sd, meta)
    sd, notes = remap_state_dict(sd, source, model_state=model.state_dict())
    if _backbone_only(sd, model):
        raise CheckpointError(
            f"{checkpoint} holds backbone weights only (timm format: no 'backbone.' prefix, no neck or heads); a "
            "detector/segmenter config needs the whole model's weights. To fine-tune from them set "
            "model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...); to evaluate the backbone itself use "
            "its classification config (e.g. configs/uninet/uninet_g_in22k_pretrain.py) with --data-root.")
    load_into_model(model, sd, f"checkpoint {checkpoint} ({source} format)")
    return [f"format: {source}"] + notes


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------

def _is_classification_config(config: str) -> bool:
    text = Path(config).read_text()
    return bool(re.search(r"^model\s*=\s*dict\(\s*\n?\s*name\s*=", text, re.M)) and "_base_" not in text


def _keep_synthetic_size(config: str, options: dict) -> dict:
    """A run's dumped config (``<work_dir>/<name>.py``) already has the synthetic data applied at its image size;
    ``load_config`` applies it again, at its default size unless told: keep the size the run used."""
    if "synthetic_image_size" in options:
        return options
    from mmengine.config import Config

    raw = Config.fromfile(config)
    if options.get("dataset", raw.get("dataset")) != "synthetic" or raw.get("dataset") != "synthetic":
        return options
    pipeline = ((raw.get("test_dataloader") or {}).get("dataset") or {}).get("pipeline") or []
    for step in pipeline:
        if step.get("type") == "Resize" and step.get("scale"):
            scale = step["scale"]
            options["synthetic_image_size"] = int(scale[0] if isinstance(scale, (list, tuple)) else scale)
            break
    return options


def evaluate(config: str, checkpoint: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
             unsafe_load: bool = False, data_root: Optional[str] = None, split: str = "val") -> Dict[str, float]:
    """Load ``checkpoint`` into ``config``'s model and evaluate with the config's test metric; returns the metrics."""
    if not osp.isfile(config):
        raise FileNotFoundError(f"config file not found: {config}")
    if _is_classification_config(config):
        overrides = [f"{k}={v}" for k, v in (cfg_options or {}).items()]
        return evaluate_classifier(config, checkpoint, overrides, data_root, split, unsafe_load)
    if not osp.isfile(checkpoint):  # before the data check and the model build (and mmengine's environment dump)
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}; give the path of a .pth / .safetensors file")
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    from agvm.mm.train import check_data_roots, load_config

    cfg_options = _keep_synthetic_size(config, dict(cfg_options or {}))
    cfg = load_config(config, cfg_options)
    if not cfg.get("test_dataloader") or not cfg.get("test_evaluator"):
        raise ValueError(f"{config} has no test_dataloader / test_evaluator: nothing to evaluate with")
    for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler", "val_dataloader", "val_cfg",
                "val_evaluator", "auto_scale_lr"):
        cfg[key] = None
    if cfg.get("custom_hooks"):  # training-time hooks (AGVM logging, a run's own progress hooks) play no part here
        print(f"[evaluate] ignoring the config's custom_hooks: {[h.get('type') for h in cfg.custom_hooks]}")
        cfg.custom_hooks = []
    if cfg.get("dataset") == "synthetic":
        from agvm.mm.synthetic import ensure

        ensure(cfg.synthetic_root)
    else:
        check_data_roots(cfg)
    cfg.work_dir = osp.abspath(work_dir or osp.join("work_dirs", "eval", Path(config).stem))
    cfg.load_from, cfg.resume = None, False
    cfg.pop("runner_type", None)
    cfg.launcher = "none"
    runner = Runner.from_cfg(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    for note in prepare(model, checkpoint, unsafe_load):
        print(f"[evaluate] {note}", flush=True)
    metrics = runner.test()
    return {k: float(v) if isinstance(v, (int, float)) else v for k, v in (metrics or {}).items()}


def write_results_files(config: str, checkpoint: str, outfile_prefix: str, cfg_options: Optional[dict] = None,
                        work_dir: Optional[str] = None, unsafe_load: bool = False) -> List[str]:
    """COCO results files of the config's test set for an evaluation server (COCO test-dev has no public labels):
    runs the test loop with the COCO test evaluator's ``format_only=True, outfile_prefix=outfile_prefix`` (mmdet's
    ``CocoMetric``) and returns the files written: ``<prefix>.bbox.json`` (and ``<prefix>.segm.json`` with masks)."""
    from mmengine.config import Config

    ev = Config.fromfile(config).get("test_evaluator")
    if not isinstance(ev, dict) or ev.get("type") != "CocoMetric":
        raise ValueError(f"{config}: results files need one CocoMetric test_evaluator, got {ev!r}")
    prefix = osp.abspath(outfile_prefix)
    os.makedirs(osp.dirname(prefix), exist_ok=True)
    metrics = ev.get("metric", "bbox")
    expected = [f"{prefix}.{m}.json" for m in ([metrics] if isinstance(metrics, str) else metrics)]
    for path in expected:  # a file left by an earlier run must not pass for this run's output
        if osp.exists(path):
            os.remove(path)
    options = dict(cfg_options or {})
    options.update({"test_evaluator.format_only": True, "test_evaluator.outfile_prefix": prefix})
    evaluate(config, checkpoint, options, work_dir, unsafe_load)
    missing = [p for p in expected if not osp.isfile(p)]
    if missing:
        raise RuntimeError(f"the test loop did not write {missing} (no detections?)")
    return expected


def results_files_run(config: str, work_dir: str, cfg_options: Optional[dict] = None, resume: bool = True,
                 launcher: str = "none") -> Dict[str, float]:
    """Entry point of an experiment run (``agvm.mm.train.train``'s signature) that writes results files: the
    checkpoint is ``cfg_options['load_from']`` (the trained run, through ``init_from``); the files are
    ``<work_dir>/detections.{bbox,segm}.json``; ``metrics.json`` is empty (test-dev scores come from the server)."""
    options = dict(cfg_options or {})
    checkpoint = options.pop("load_from", None)
    if not checkpoint:
        raise ValueError("results_files_run needs the checkpoint as cfg_options['load_from'] "
                         "(init_from in the experiment)")
    for key in [k for k in options if k.startswith(("train_dataloader", "train_cfg", "optim_wrapper"))]:
        options.pop(key)  # the launcher's per-rank batch and seed keys concern training only
    files = write_results_files(config, checkpoint, osp.join(work_dir, "detections"), options,
                                osp.join(work_dir, "eval"))
    _write_json_atomic(osp.join(work_dir, "results_files.json"), {"checkpoint": str(checkpoint), "files": files})
    _write_json_atomic(osp.join(work_dir, "metrics.json"), {})
    return {}


def evaluate_classifier(config: str, checkpoint: str, overrides: Sequence[str] = (), data_root: Optional[str] = None,
                        split: str = "val", unsafe_load: bool = False, batch_size: int = 32) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent) of timm-format weights on ``<root>/<split>`` (an ImageFolder tree)."""
    import timm
    import torchvision
    from timm.data import create_transform

    import models.uninet  # noqa: F401  (registers uninet_* with timm)
    from models.pretrain import ENV_ROOT, load_config

    cfg = load_config(config, overrides)
    root = data_root or cfg["data"].get("root") or os.environ.get(ENV_ROOT)
    if not root:
        raise FileNotFoundError(f"no dataset root: pass --data-root DIR or export {ENV_ROOT}=DIR "
                                f"(an ImageFolder tree DIR/{split}/<class>/<image>)")
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"evaluation folder {folder} does not exist; expected <root>/{split}/<class>/<image>")
    mkw = {k: v for k, v in cfg["model"].items() if k not in ("name", "drop_path_rate", "grad_checkpointing")}
    model = timm.create_model(cfg["model"]["name"], **mkw)
    obj = load_checkpoint_file(checkpoint, unsafe_load)
    sd, meta = extract_state_dict(obj, checkpoint)
    sd, notes = remap_state_dict(sd, "plain", model.state_dict().keys())
    if any(k.startswith("backbone.") for k in sd):
        raise CheckpointError(f"{checkpoint} is a detector checkpoint (keys start with 'backbone.'); evaluate it with "
                              "its detector config, or pass a timm-format classification state dict")
    load_into_model(model, sd, f"checkpoint {checkpoint}")
    dcfg = cfg["data"]
    dataset = torchvision.datasets.ImageFolder(
        str(folder), transform=create_transform(dcfg["input_size"], is_training=False,
                                                interpolation=dcfg.get("interpolation", "bicubic")))
    if len(dataset.classes) != cfg["model"]["num_classes"]:
        raise ValueError(f"{folder} has {len(dataset.classes)} class folders, the model {cfg['model']['num_classes']} "
                         "classes")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    model.eval()
    top1 = top5 = n = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).topk(min(5, cfg["model"]["num_classes"]), dim=1).indices
            top1 += (pred[:, 0] == y).sum().item()
            top5 += (pred == y[:, None]).any(dim=1).sum().item()
            n += len(y)
    return {"accuracy/top1": 100.0 * top1 / n, "accuracy/top5": 100.0 * top5 / n, "num_images": float(n)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agvm.mm.evaluate",
                                description="Evaluate a checkpoint with its config's metric (mmdet/mmseg test "
                                            "metric, or top-1/top-5 for a UniNet classification config).")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--cfg-options", nargs="+", default=[],
                   help="key=value overrides, e.g. dataset=synthetic")
    p.add_argument("--work-dir", default=None, help="where mmengine writes its logs (default work_dirs/eval/<config>)")
    p.add_argument("--out", default=None, help="metrics JSON (default <work-dir>/eval_metrics.json)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="torch.load(weights_only=False): only for files you trust")
    p.add_argument("--data-root", default=None, help="ImageFolder root for classification configs")
    p.add_argument("--split", default="val", help="ImageFolder split for classification configs (default val)")
    p.add_argument("--results-file", default=None, metavar="PREFIX",
                   help="write COCO results files PREFIX.bbox.json / PREFIX.segm.json for an evaluation server "
                        "(COCO test-dev: configs/htc_x/htc_x_uninet_g_coco_testdev.py) instead of metrics")
    a = p.parse_args(argv)
    from .train import parse_cfg_options

    # errors: one line through agvm.cli.run (python -m agvm.mm.evaluate; --debug for the traceback)
    cfg_options = parse_cfg_options(a.cfg_options)
    if a.results_file:
        files = write_results_files(a.config, a.checkpoint, a.results_file, cfg_options, a.work_dir, a.unsafe_load)
        print("[evaluate] results files written:\n  " + "\n  ".join(files))
        return 0
    metrics = evaluate(a.config, a.checkpoint, cfg_options, a.work_dir, a.unsafe_load, a.data_root, a.split)
    out = a.out or osp.join(a.work_dir or osp.join("work_dirs", "eval", Path(a.config).stem), "eval_metrics.json")
    write_json_atomic(out, metrics)
    print(json.dumps(metrics, indent=1, sort_keys=True))
    print(f"[evaluate] metrics written to {out}")
    return 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
