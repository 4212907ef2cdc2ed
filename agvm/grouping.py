"""Param groups with a ``"module"`` key, built from a model's attribute names.

``param_groups(model)`` assigns every trainable parameter to a module by the longest matching
attribute-name prefix (mmdet's ``backbone``, ``neck``, ``rpn_head``, ``roi_head.bbox_head``, ...),
optionally splits norms and biases into groups without weight decay, merges groups with equal
options (so foreach kernels see few, large groups), and raises an error that names every trainable
parameter no module covers: the authors' code silently left such parameters out of the optimizer.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["DEFAULT_MODULES", "param_groups", "module_of", "module_spec", "module_map", "freeze_modules"]

# name -> attribute-name prefixes. Covers mmdet / mmseg detectors and segmentors.
DEFAULT_MODULES: Dict[str, Sequence[str]] = {
    "backbone": ("backbone",),
    "neck": ("neck",),
    "rpn_head": ("rpn_head",),
    "roi_head": ("roi_head",),  # what of the roi_head is not a bbox or mask head (e.g. HTC's semantic head)
    "bbox_head": ("bbox_head", "roi_head.bbox_head"),
    "mask_head": ("mask_head", "roi_head.mask_head"),
    "semantic_head": ("semantic_head", "roi_head.semantic_head"),
    "panoptic_head": ("panoptic_head",),
    "panoptic_fusion_head": ("panoptic_fusion_head",),
    "decode_head": ("decode_head",),
    "auxiliary_head": ("auxiliary_head",),
    "head": ("head",),
}

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)


def _strip_wrapper(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def module_of(name: str, modules: Mapping[str, Sequence[str]]) -> Optional[str]:
    """The module whose longest prefix matches parameter ``name`` (None if none does)."""
    best, best_len = None, -1
    for module, prefixes in modules.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = module, len(prefix)
    return best


def module_spec(modules=None) -> Dict[str, Tuple[str, ...]]:
    """``modules`` as ``{name: (prefix, ...)}``: a mapping ``{name: prefix or [prefixes]}``, a list of prefixes
    (each named by its last component) or None (``DEFAULT_MODULES``)."""
    if modules is None:
        return {k: tuple(v) for k, v in DEFAULT_MODULES.items()}
    if isinstance(modules, Mapping):
        return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in modules.items()}
    spec: Dict[str, Tuple[str, ...]] = {}
    for prefix in modules:
        spec[prefix.split(".")[-1]] = spec.get(prefix.split(".")[-1], ()) + (prefix,)
    return spec


def freeze_modules(model: nn.Module, modules, names: Sequence[str]) -> None:
    """``requires_grad_(False)`` for every parameter of the modules ``names`` (of the spec ``modules``)."""
    spec = module_spec(modules)
    unknown = set(names) - set(spec)
    if unknown:
        raise ValueError(f"freeze names unknown module(s) {sorted(unknown)}; the modules are {sorted(spec)}")
    if names:
        for name, p in model.named_parameters():
            if module_of(_strip_wrapper(name), spec) in names:
                p.requires_grad_(False)


def module_map(model: nn.Module, modules=None) -> Dict[int, str]:
    """``{id(p): module}`` for every trainable parameter of ``model``.

    Raises:
        ValueError: naming every trainable parameter no module covers.
    """
    spec = module_spec(modules)
    owner: Dict[int, str] = {}
    uncovered: List[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = module_of(_strip_wrapper(name), spec)
        if module is None:
            uncovered.append(name)
        else:
            owner[id(p)] = module
    if uncovered:
        shown = ", ".join(uncovered[:50]) + (f", ... ({len(uncovered)} in all)" if len(uncovered) > 50 else "")
        raise ValueError(
            f"{len(uncovered)} trainable parameter(s) belong to no AGVM module and would not be optimized: "
            f"{shown}. Add their prefix to `modules` (known modules: {sorted(spec)}) or freeze them "
            "(requires_grad=False)."
        )
    return owner


def param_groups(
    model: nn.Module,
    modules: Optional[Union[Mapping[str, Union[str, Sequence[str]]], Sequence[str]]] = None,
    weight_decay: Optional[float] = None,
    no_decay_norm_bias: bool = False,
    freeze: Sequence[str] = (),
) -> List[dict]:
    """Param groups for the AGVM optimizers.

    Args:
        model: the network (a DDP/DataParallel wrapper's ``module.`` prefix is ignored).
        modules: which modules to form: a mapping ``{name: prefix or [prefixes]}`` or a list of
            prefixes (each named by its last component, ``"roi_head.bbox_head"`` -> ``"bbox_head"``).
            Default: ``DEFAULT_MODULES``; only modules that own a trainable parameter appear.
        weight_decay: the groups' weight decay (None: the optimizer's default).
        no_decay_norm_bias: put norm-layer parameters and biases into groups with weight decay 0.
        freeze: module names whose parameters are frozen (``requires_grad_(False)``) and left out,
            e.g. ``("bbox_head",)`` for the frozen-head ablation of the appendix's Fig. 4.

    Returns groups in module order, each ``{"params", "module"}`` (+ ``"weight_decay"``).

    Raises:
        ValueError: naming every trainable parameter no module covers.
    """
    spec = module_spec(modules)
    freeze_modules(model, spec, freeze)
    owner = module_map(model, spec)
    no_decay = set()
    if no_decay_norm_bias:
        for mod in model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if isinstance(mod, _NORMS) or pname == "bias" or p.ndim <= 1:
                    no_decay.add(id(p))

    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for p in model.parameters():  # trainable, each once
        if id(p) in owner:
            buckets.setdefault((owner[id(p)], id(p) in no_decay), []).append(p)
    order = list(spec)
    groups = []
    for (module, is_no_decay), params in sorted(buckets.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        group = {"params": params, "module": module}
        if is_no_decay:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups
