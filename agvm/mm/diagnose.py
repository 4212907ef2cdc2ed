"""Variance diagnosis of an mmdet / mmseg config: every module's NSR and predicted Phi at any batch size.

    python -m agvm.mm.diagnose CONFIG [--checkpoint C] --images N [--validate 8,32 --repeats 4] [--out DIR] \\
        [--cfg-options dataset=synthetic ...] [--launcher pytorch]

Builds the config's model (its init, or ``--checkpoint``'s weights), takes N training images (a seeded random
subset of the config's train set, through its train pipeline), computes one gradient per image (the model in
train mode, the loss as training computes it for a batch of one) and from the per-module running sums the
diagnosis of ``agvm.diagnose``: NSR per module, Phi_i(b), the ratios to the anchor, the batch at which they
reach 2x and 4x, and the mu AGVM would settle at. ``--validate`` also measures Phi = 1 - cos(G_a, G_b)
directly at those batch sizes (2 x ``--repeats`` half-batches of fresh images each, at the same weights, 1 - cos
averaged over all pairs of halves; one extra gradient of memory) and reports the prediction's error. Under ``--launcher pytorch`` (torchrun) each rank takes its share of the
images and the sums are all-reduced; on a GPU the model and images are on the rank's device.
Errors are one line (``agvm.cli.run``; ``--debug`` for the traceback). Writes ``DIR/diagnosis.json`` and ``DIR/diagnosis.png`` (Phi_i(b) per module, the paper's batches marked).
The config's ``paramwise_cfg`` (``modules``, ``frozen_modules``) forms the modules as in training.
Batch-norm layers in train mode (``norm_eval=False``) see one image at a time here.
"""
from __future__ import annotations

import argparse
import functools
import os
import os.path as osp
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import agvm
from agvm.diagnose import PAPER_BATCHES, Diagnosis, diagnose

__all__ = ["run", "build", "main"]


def _say(msg: str) -> None:
    from mmengine.dist import is_main_process

    if is_main_process():
        print(f"[diagnose] {msg}", flush=True)


def build(config: str, cfg_options: Optional[dict] = None, checkpoint: Optional[str] = None, unsafe_load: bool = False):
    """(cfg, model in train mode on this rank's device, train dataset, collate function, modules spec)."""
    import torch.distributed as dist
    from mmengine.device import get_device
    from mmengine.logging import MMLogger
    from mmengine.registry import DATASETS, FUNCTIONS, MODELS, init_default_scope

    from .evaluate import prepare
    from .train import check_data_roots, check_pretrained, load_config

    cfg = load_config(config, cfg_options)
    if cfg.get("dataset") == "synthetic":
        from mmengine.dist import is_main_process

        from .synthetic import ensure

        if is_main_process():
            ensure(cfg.synthetic_root)
        if dist.is_initialized():
            dist.barrier()
    else:
        check_data_roots(cfg)
        if checkpoint is None:
            check_pretrained(cfg)
    if not cfg.get("train_dataloader"):
        raise ValueError(f"{config} has no train_dataloader: the diagnosis needs training images")
    init_default_scope(cfg.get("default_scope", "mmdet"))
    MMLogger.get_instance(f"agvm_diagnose_{uuid.uuid4().hex[:12]}", log_level=cfg.get("log_level", "WARNING"))
    if (cfg.get("randomness") or {}).get("seed") is not None:  # the initial weights training would start from
        from mmengine.runner import set_random_seed

        set_random_seed(cfg.randomness.seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    if checkpoint is not None:
        for note in prepare(model, checkpoint, unsafe_load):
            _say(note)
    model.to(get_device()).train()
    if checkpoint is None and dist.is_initialized() and dist.get_world_size() > 1:
        for t in model.state_dict().values():  # every rank diagnoses rank 0's initial weights
            dist.broadcast(t, 0)
    pw = (cfg.get("optim_wrapper") or {}).get("paramwise_cfg") or {}
    modules = pw.get("modules")
    if pw.get("frozen_modules"):  # as in training: frozen modules get no gradient and are not diagnosed
        agvm.param_groups(model, modules=modules, freeze=tuple(pw["frozen_modules"]))
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    collate = dict(cfg.train_dataloader.get("collate_fn") or dict(type="pseudo_collate"))  # as the Runner builds it
    collate = functools.partial(FUNCTIONS.get(collate.pop("type")), **collate)
    return cfg, model, dataset, collate, modules


def _loss(model, batch) -> torch.Tensor:
    """The mean loss of a collated batch, as the model's train_step computes it."""
    data = model.data_preprocessor(batch, True)
    loss, _ = model.parse_losses(model._run_forward(data, mode="loss"))
    return loss


def _rank_world():
    from mmengine.dist import get_rank, get_world_size

    return get_rank(), get_world_size()


def validate(model, dataset, collate, indices: Sequence[int], batches: Sequence[int], repeats: int, modules=None,
             seed: int = 0) -> Dict[int, Dict[str, dict]]:
    """Phi measured directly at each batch b from 2 x ``repeats`` half-batches of b / 2 fresh images (from
    ``indices``): the mean of 1 - cos over all pairs of halves with its error bound (``agvm.diagnose.HalfPairs``).
    Under DDP each rank measures its share of the pairs; every half is seeded, so any number of ranks agrees."""
    from mmengine.runner import set_random_seed

    from agvm.diagnose import HalfPairs

    rank, world = _rank_world()
    out: Dict[int, Dict[str, dict]] = {}
    it = iter(indices)
    for b in batches:
        pairs = HalfPairs(model, modules)
        for r in range(repeats):
            take = [next(it) for _ in range(2 * (b // 2))]  # every rank draws the same, keeps its pairs
            if r % world != rank:
                continue
            for h, half in enumerate((take[:b // 2], take[b // 2:])):
                set_random_seed(seed * 1_000_003 + 500_000 + 1_000 * b + 2 * r + h)
                model.zero_grad(set_to_none=True)
                _loss(model, collate([dataset[i] for i in half])).backward()
                pairs.add()
        model.zero_grad(set_to_none=True)
        out[b] = pairs.result(reduce=world > 1)
        _say(f"measured Phi at batch {b} (all {repeats * (2 * repeats - 1)} pairs of {2 * repeats} halves): " +
             ", ".join(f"{m} {v['phi']:.3g} +- {v['se'] or 0:.2g}" for m, v in out[b].items()))
    return out


def prediction_errors(d: Diagnosis, measured: Dict[int, Dict[str, dict]]) -> List[dict]:
    """|predicted - measured| / measured per (batch, module), with the measurement's error bound."""
    rows = []
    for b, phis in measured.items():
        pred = d.phi(b)
        for m, v in phis.items():
            if m in pred and v["phi"] > 0:
                rows.append({"batch": b, "module": m, "measured": v["phi"], "measured_se": v["se"],
                             "pairs": v["pairs"], "predicted": pred[m], "rel_error": abs(pred[m] - v["phi"]) / v["phi"]})
    return rows


def run(config: str, images: int, checkpoint: Optional[str] = None, out: Optional[str] = None,
        cfg_options: Optional[dict] = None, validate_batches: Sequence[int] = (), repeats: int = 4, seed: int = 0,
        anchor: str = "backbone", launcher: str = "none", unsafe_load: bool = False,
        batches: Sequence[int] = PAPER_BATCHES, title: Optional[str] = None) -> dict:
    """Diagnose ``config`` at its init or ``checkpoint``; writes ``out``/diagnosis.json and .png; returns the JSON."""
    from mmengine.dist import is_main_process

    from agvm.fileio import write_json_atomic

    from .train import _init_cpu_process_group

    t0 = time.time()
    if images < 2:
        raise ValueError(f"--images must be >= 2 (the NSR needs two or more per-image gradients), got {images}")
    if any(b < 2 or b % 2 for b in validate_batches) or repeats < 1:
        raise ValueError(f"--validate takes even batch sizes >= 2 (two halves of b / 2 images each) and --repeats "
                         f">= 1; got {list(validate_batches)} and {repeats}")
    import torch.distributed as dist

    if launcher != "none" and not dist.is_initialized():
        if torch.cuda.is_available():
            from mmengine.dist import init_dist

            init_dist(launcher)
        else:
            _init_cpu_process_group(launcher)
    cfg, model, dataset, collate, modules = build(config, cfg_options, checkpoint, unsafe_load)
    needed = images + sum(2 * (b // 2) * repeats for b in validate_batches)
    if needed > len(dataset):
        raise ValueError(f"the diagnosis needs {needed} distinct training images ({images} + the validation's), the "
                         f"train set has {len(dataset)}; lower --images / --validate / --repeats")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:needed].tolist()
    rank, world = _rank_world()
    mine = order[:images][rank::world]
    _say(f"{config}: per-image gradients of {images} images ({len(mine)} on each of {world} rank(s)) at "
         f"{'the weights of ' + checkpoint if checkpoint else 'initialisation'}")
    def image_loss(i: int) -> torch.Tensor:
        from mmengine.runner import set_random_seed

        set_random_seed(seed * 1_000_003 + i)  # the same flips and RoI samples on any number of ranks
        return _loss(model, collate([dataset[i]]))

    d = diagnose(model, image_loss, mine, modules=modules, anchor=anchor, total=len(mine), progress=_say)
    measured = validate(model, dataset, collate, order[images:], validate_batches, repeats, modules, seed) \
        if validate_batches else {}
    errors = prediction_errors(d, measured)
    result = {
        "config": config, "checkpoint": checkpoint, "cfg_options": {k: repr(v) for k, v in (cfg_options or {}).items()},
        "world_size": world, "device": str(next(model.parameters()).device), "seed": seed,
        **d.to_dict(batches=batches),
        "validation": {"repeats": repeats, "halves": 2 * repeats, "pairs": repeats * (2 * repeats - 1), "rows": errors,
                       "median_rel_error": statistics.median(r["rel_error"] for r in errors) if errors else None},
        "seconds": time.time() - t0,
    }
    if is_main_process():
        out = out or osp.join("work_dirs", "diagnose", Path(config).stem)
        os.makedirs(out, exist_ok=True)
        write_json_atomic(osp.join(out, "diagnosis.json"), result)
        d.plot(osp.join(out, "diagnosis.png"), batches=batches, measured=measured_by_module(measured),
               title=title)
        _say(summary(d, result, batches))
        _say(f"wrote {out}/diagnosis.json and diagnosis.png ({result['seconds']:.0f} s)")
    return result


def measured_by_module(measured: Dict[int, Dict[str, dict]]) -> Dict[str, Dict[int, float]]:
    out: Dict[str, Dict[int, float]] = {}
    for b, phis in measured.items():
        for m, v in phis.items():
            out.setdefault(m, {})[b] = v["phi"]
    return out


def summary(d: Diagnosis, result: dict, batches: Sequence[int]) -> str:
    """A few lines: NSR, Phi and mu per module at ``batches``, the crossing batches, the validation error."""
    lines = [f"{'module':<12} {'NSR':>9} " + " ".join(f"{'Phi@' + str(b):>9}" for b in batches) + "  " +
             " ".join(f"{'mu@' + str(b):>8}" for b in batches)]
    for m in d.modules:
        info = result["modules"][m]
        nsr = "unresolved" if info["nsr"] is None else f"{info['nsr']:.3g}"
        lines.append(f"{m:<12} {nsr:>9} " + " ".join(f"{v:9.3g}" for v in info["phi"]) + "  " +
                     " ".join(f"{v:8.2f}" for v in info["mu"]))
    cross = result["misaligned_at"]
    fmt = lambda v: "never" if v is None else f"b = {v:.0f}"  # noqa: E731
    lines.append(f"largest Phi ratio to the {d.anchor} reaches 2x at {fmt(cross['2x'])}, 4x at {fmt(cross['4x'])}")
    med = result["validation"]["median_rel_error"]
    if med is not None:
        rows = result["validation"]["rows"]
        above = sum(r["predicted"] > r["measured"] for r in rows)
        lines.append(f"prediction vs measured Phi at {sorted({r['batch'] for r in rows})}: median relative error "
                     f"{100 * med:.0f} % ({above} of {len(rows)} predictions above the measurement)")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .train import parse_cfg_options

    p = argparse.ArgumentParser(prog="python -m agvm.mm.diagnose", description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--checkpoint", help="weights to diagnose (default: the config's initialisation)")
    p.add_argument("--images", type=int, required=True, help="per-image gradients to take (e.g. 32-128)")
    p.add_argument("--validate", default="", help="batch sizes at which to measure Phi directly, e.g. 8,32")
    p.add_argument("--repeats", type=int, default=4,
                   help="per validation batch size: 2 x REPEATS half-batches, 1 - cos averaged over all their pairs")
    p.add_argument("--out", help="output folder (default work_dirs/diagnose/<config name>)")
    p.add_argument("--anchor", default="backbone")
    p.add_argument("--seed", type=int, default=0, help="which training images (a seeded random subset)")
    p.add_argument("--cfg-options", nargs="+", default=[], help="key=value overrides, e.g. dataset=synthetic")
    p.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm", "mpi"])
    p.add_argument("--unsafe-load", action="store_true", help="load a trusted checkpoint with pickle")
    a = p.parse_args(argv)
    try:
        batches = [int(v) for v in a.validate.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--validate takes comma-separated batch sizes, e.g. 8,32; got {a.validate!r}") from None
    run(a.config, a.images, a.checkpoint, a.out, parse_cfg_options(a.cfg_options), batches, a.repeats, a.seed, a.anchor,
        a.launcher, a.unsafe_load)
    return 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
