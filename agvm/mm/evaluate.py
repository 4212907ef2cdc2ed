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

Reading, verification, remapping and the strict load are ``agvm.mm.checkpoint``'s: the file is verified (its
``.sha256`` sidecar, else the CRC-32 of torch's zip records) and a damaged one is refused as damaged; loading is
``torch.load(weights_only=True)`` with a minimal allow-list (numpy meta data, mmengine's HistoryBuffer), and a file
that needs more is refused (named as such) unless ``--unsafe-load`` says the file is trusted. Parameter names or
shapes that do not match the config's model give an error listing the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from agvm.fileio import write_json_atomic

from .checkpoint import (CheckpointError, detect_source, extract_state_dict, load_into_model, read,
                         remap_state_dict)

__all__ = ["prepare", "evaluate", "evaluate_classifier", "write_results_files", "results_files_run", "main"]


def _backbone_only(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    backbone = getattr(model, "backbone", None)
    if backbone is None or any(k.startswith("backbone.") for k in state_dict):
        return False
    own = set(backbone.state_dict())
    return len(own & set(state_dict)) >= 0.5 * max(1, len(own))


def prepare(model: torch.nn.Module, checkpoint: str, unsafe: bool = False) -> List[str]:
    """Read ``checkpoint``, remap it for ``model`` and load it strictly; returns notes on the conversion."""
    obj = read(checkpoint, unsafe)
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
    write_json_atomic(osp.join(work_dir, "results_files.json"), {"checkpoint": str(checkpoint), "files": files})
    write_json_atomic(osp.join(work_dir, "metrics.json"), {})
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
    obj = read(checkpoint, unsafe_load)
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
