"""Hand-over between the three UniNet-G / HTC-X training stages (AGVM appendix A.5.2), explicit and checked.

1. ImageNet-22K pre-training -> Objects365 detector (:func:`pretrain_to_detector`):
   the timm-format UniNet state dict (``stem.*``, ``stages.*``, ``head.*``, ``classifier.*``) loses its
   classification head (``head.*``: the final 1x1 conv + BN before pooling, ``classifier.*``: the 21841-way fc)
   and every other key gets the prefix ``backbone.``. Neck, RPN and RoI heads start fresh.
2. Objects365 detector -> COCO detector (:func:`o365_to_coco`):
   kept: backbone, neck, RPN, the global-context convs, every bbox head's token projection / position embedding /
   transformer blocks / norms and the class-agnostic box regression ``fc_reg``;
   dropped: the 366-way classifiers ``roi_head.bbox_head.<i>.fc_cls`` and the 365-way global-context class fc
   ``roi_head.glbctx_head.fc``; the mask branch (``roi_head.mask_head`` / ``mask_roi_extractor``) does not exist in
   the Objects365 model and starts fresh on COCO (a source that has one is refused unless ``allow_src_mask``).

Every key must fall under exactly one rule; anything else is an error (not silently dropped). With ``target``
(the receiving model's state dict or key -> shape map, e.g. built on the meta device from the next stage's config)
the kept keys must exist there with equal shapes, and the target keys left uninitialised must be the expected new
ones. Each conversion returns a :class:`HandoverReport`; files are read and written by ``agvm.mm.checkpoint``
(verified, ``weights_only=True``; written atomically with a ``.sha256`` sidecar). The written file records which
target keys start fresh, so ``load_from`` accepts exactly those as missing.

CLI::

    python -m models.handover pretrain-to-det SRC.pth DST.pth [--target-config configs/htc_x/htc_x_uninet_g_o365.py]
    python -m models.handover o365-to-coco SRC.pth DST.pth [--target-config configs/htc_x/htc_x_uninet_g_coco.py]
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from agvm.fileio import write_json_atomic

__all__ = ["HandoverReport", "HandoverError", "pretrain_to_detector", "o365_to_coco", "load_state_dict",
           "save_checkpoint", "convert_file", "target_shapes_from_config"]

# (regex, reason); the first matching rule decides
PRETRAIN_KEEP = [(r"^(stem|stages)\.", "UniNet backbone")]
PRETRAIN_DROP = [(r"^(head|classifier)\.", "ImageNet-22K classification head")]
PRETRAIN_NEW = [r"^(neck|rpn_head|roi_head)\."]  # detector parts that start fresh

O365_KEEP = [
    (r"^backbone\.", "backbone"),
    (r"^neck\.", "neck (RCNet + SEPC)"),
    (r"^rpn_head\.", "RPN (class-agnostic)"),
    (r"^roi_head\.glbctx_head\.convs\.", "global-context convs"),
    (r"^roi_head\.bbox_head\.\d+\.(proj|pos_embed|cls_blocks|cls_norm|reg_blocks|reg_norm)\b",
     "bbox head transformer branches"),
    (r"^roi_head\.bbox_head\.\d+\.fc_reg\.", "class-agnostic box regression"),
]
O365_DROP = [
    (r"^roi_head\.bbox_head\.\d+\.fc_cls\.", "365-class classifier"),
    (r"^roi_head\.glbctx_head\.fc\.", "365-class global-context classifier"),
]
O365_SRC_MASK = [(r"^roi_head\.(mask_head|mask_roi_extractor)\.", "mask branch (not in the Objects365 stage)")]
O365_NEW = [r"^roi_head\.bbox_head\.\d+\.fc_cls\.", r"^roi_head\.glbctx_head\.fc\.",
            r"^roi_head\.(mask_head|mask_roi_extractor)\."]


class HandoverError(ValueError):
    """A checkpoint does not look like what this stage hands over (unknown keys, shape mismatch, missing parts)."""


@dataclass
class HandoverReport:
    """What a conversion did: kept keys (new names), dropped keys with the reason, target keys left fresh."""

    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    source: str = ""
    fresh: list[str] = field(default_factory=list)  # regexes of the receiving model's keys that start fresh

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for r in self.dropped.values():
            reasons[r] = reasons.get(r, 0) + 1
        return (f"kept {len(self.kept)} tensors, dropped {len(self.dropped)} ({reasons}), "
                f"{len(self.new)} target tensors start fresh")


def _match(key: str, rules: Sequence[tuple[str, str]]) -> str | None:
    for pattern, reason in rules:
        if re.search(pattern, key):
            return reason
    return None


def _check_target(out: Mapping[str, torch.Tensor], target: Mapping[str, object] | None, new_rules: Sequence[str],
                  report: HandoverReport) -> None:
    """Kept keys must exist in the target with equal shapes; target keys not provided must match ``new_rules``."""
    if target is None:
        return
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in target.items()}
    errors = [f"{k}: not in the target model" for k in out if k not in shapes]
    errors += [f"{k}: shape {tuple(v.shape)} != target {shapes[k]}" for k, v in out.items()
               if k in shapes and tuple(v.shape) != shapes[k]]
    missing = [k for k in shapes if k not in out]
    unexpected_missing = [k for k in missing if not any(re.search(p, k) for p in new_rules)]
    errors += [f"{k}: the target needs it but the source does not have it" for k in unexpected_missing]
    if errors:
        raise HandoverError(f"{len(errors)} mismatch(es) with the target model, e.g.:\n  " + "\n  ".join(errors[:20]))
    report.new = sorted(missing)


def pretrain_to_detector(state: Mapping[str, torch.Tensor], target: Mapping[str, object] | None = None
                         ) -> tuple[dict[str, torch.Tensor], HandoverReport]:
    """Pre-training (timm UniNet) state dict -> detector state dict with only ``backbone.*`` keys."""
    out: dict[str, torch.Tensor] = {}
    report = HandoverReport(source="pretrain", fresh=list(PRETRAIN_NEW))
    unknown = []
    for k, v in state.items():
        if _match(k, PRETRAIN_DROP):
            report.dropped[k] = _match(k, PRETRAIN_DROP)  # type: ignore[assignment]
        elif _match(k, PRETRAIN_KEEP):
            out["backbone." + k] = v
        else:
            unknown.append(k)
    if unknown:
        raise HandoverError(f"{len(unknown)} key(s) of the pre-training checkpoint are neither UniNet backbone "
                            f"(stem./stages.) nor its classifier (head./classifier.), e.g. {unknown[:5]}; "
                            "is this a timm UniNet checkpoint (or is it wrapped: module., model.)?")
    if not out:
        raise HandoverError("the pre-training checkpoint has no UniNet backbone tensors (stem.* / stages.*)")
    report.kept = sorted(out)
    _check_target(out, target, PRETRAIN_NEW, report)
    return out, report


def o365_to_coco(state: Mapping[str, torch.Tensor], target: Mapping[str, object] | None = None,
                 allow_src_mask: bool = False) -> tuple[dict[str, torch.Tensor], HandoverReport]:
    """Objects365 HTC-X state dict -> COCO HTC-X initialisation (see the module docstring for the rules)."""
    out: dict[str, torch.Tensor] = {}
    report = HandoverReport(source="objects365", fresh=list(O365_NEW))
    unknown, mask = [], []
    for k, v in state.items():
        if _match(k, O365_DROP):
            report.dropped[k] = _match(k, O365_DROP)  # type: ignore[assignment]
        elif _match(k, O365_SRC_MASK):
            mask.append(k)
            report.dropped[k] = _match(k, O365_SRC_MASK)  # type: ignore[assignment]
        elif _match(k, O365_KEEP):
            out[k] = v
        else:
            unknown.append(k)
    if mask and not allow_src_mask:
        raise HandoverError(f"the Objects365 checkpoint has a mask branch ({len(mask)} tensors, e.g. {mask[:2]}), "
                            "but the Objects365 stage is trained without one; pass allow_src_mask=True to drop it")
    if unknown:
        raise HandoverError(f"{len(unknown)} key(s) of the Objects365 checkpoint match no hand-over rule, e.g. "
                            f"{unknown[:5]}; is this an HTC-X checkpoint?")
    for part in ("backbone.", "neck.", "rpn_head.", "roi_head.bbox_head."):
        if not any(k.startswith(part) for k in out):
            raise HandoverError(f"the Objects365 checkpoint has no '{part}*' tensors; is this an HTC-X checkpoint?")
    report.kept = sorted(out)
    _check_target(out, target, O365_NEW, report)
    return out, report


def load_state_dict(path: str, unsafe_load: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file: a plain state dict or ``{'state_dict' | 'model' | 'module': ...}``
    (mmengine / timm / DeepSpeed-style); a leading ``module.`` (DDP) is removed. Read by ``agvm.mm.checkpoint.read``
    (verified, ``weights_only=True``; ``unsafe_load`` only for files you trust)."""
    from agvm.mm.checkpoint import read

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt = read(path, unsafe=unsafe_load)
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise HandoverError(f"{path!r} is not a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str, report: HandoverReport) -> None:
    """Write ``{'state_dict': ..., 'meta': {'handover': report}}`` (loadable as ``load_from``: the keys the report
    marks ``fresh`` may be missing) atomically, with a checksum sidecar (``agvm.mm.checkpoint.save``)."""
    from agvm.mm.checkpoint import save

    save({"state_dict": dict(state), "meta": {"handover": asdict(report)}}, path)


def target_shapes_from_config(config: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model a config builds, built on the meta device (no memory, no weights)."""
    import agvm._compat

    agvm._compat.apply()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(config)
    import importlib

    for mod in cfg.get("custom_imports", {}).get("imports", []):
        importlib.import_module(mod)
    with torch.device("meta"):
        model = MODELS.build(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_file(kind: str, src: str, dst: str, target_config: str | None = None,
                 allow_src_mask: bool = False, unsafe_load: bool = False) -> HandoverReport:
    """Run one hand-over on files: ``kind`` is 'pretrain-to-det' or 'o365-to-coco'."""
    state = load_state_dict(src, unsafe_load)
    target = target_shapes_from_config(target_config) if target_config else None
    if kind == "pretrain-to-det":
        out, report = pretrain_to_detector(state, target)
    elif kind == "o365-to-coco":
        out, report = o365_to_coco(state, target, allow_src_mask=allow_src_mask)
    else:
        raise ValueError(f"unknown hand-over {kind!r}: use 'pretrain-to-det' or 'o365-to-coco'")
    report.source = f"{kind}: {src}"
    save_checkpoint(out, dst, report)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="UniNet-G / HTC-X stage hand-over (AGVM A.5.2)")
    p.add_argument("kind", choices=["pretrain-to-det", "o365-to-coco"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--target-config", default=None, help="config of the receiving model, to check keys and shapes")
    p.add_argument("--allow-src-mask", action="store_true", help="o365-to-coco: drop a mask branch in the source")
    p.add_argument("--report", default=None, help="also write the report as JSON here")
    p.add_argument("--unsafe-load", action="store_true",
                   help="read SRC with torch.load(weights_only=False): only for files you trust")
    a = p.parse_args(argv)
    report = convert_file(a.kind, a.src, a.dst, a.target_config, a.allow_src_mask, a.unsafe_load)
    print(report.summary())
    if a.report:
        write_json_atomic(a.report, asdict(report))


if __name__ == "__main__":
    import sys

    import agvm.cli

    sys.exit(agvm.cli.run(main))
