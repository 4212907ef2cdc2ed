"""Gradient-variance figures in the style of the AGVM appendix, Fig. 1-4, from the JSON-lines variance logs.

A run's ``<work_dir>/agvm_variance.jsonl`` holds one JSON object per measurement (written by agvm.mm's
logging hook)::

    {"iter": int, "epoch": int, "phi": {module: float}, "mu": {module: float},
     "lr": float, "batch_size": int, "optimizer": str}

- ``phi`` figure (Fig. 1, 2, 4): one panel per run, Phi_t^(i) = 1 - cos(G_1^(i), G_2^(i)) per module i over the
  training iterations (appendix Eq. 2 without the learning rate, as in the figures), log scale. Panels titled
  "<name> (<batch size>)" like the appendix ("the number in the bracket is the batch size").
- ``mu`` figure (Fig. 3 companion): the modulation mu_t^(i) = sqrt(Phi^(1) / Phi^(i)) after the momentum of
  Eq. 42, per module, for runs trained with AGVM (the anchor, the backbone, stays at 1).

CLI: ``python -m results.figures WORK_DIR [WORK_DIR ...] --out DIR [--name NAME] [--label LABEL ...]``, or
``python -m results.figures --appendix work_dirs/fig1_4_variance --out results/figures`` for Fig. 1-4 from the
runs of ``experiments/fig1_4_variance``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOG_NAME = "agvm_variance.jsonl"
PREDICTIONS = {"diagnosis_init": ":", "diagnosis_final": "--"}  # agvm.mm.diagnose outputs in a run dir: line style
REQUIRED = {"iter": int, "phi": dict}
# Readable names for the module groups the logs use (agvm.param_groups' names and mmdet attribute names).
MODULE_LABELS = {"backbone": "Backbone", "neck": "FPN", "fpn": "FPN", "rpn_head": "RPN", "rpn": "RPN",
                 "roi_head": "Detection head", "bbox_head": "Detection head", "head": "Detection head",
                 "mask_head": "Mask head", "semantic_head": "Semantic head", "panoptic_head": "Semantic head",
                 "decode_head": "Decode head", "auxiliary_head": "Auxiliary head"}
OPTIMIZER_LABELS = {"sgd": "SGD", "agvm_sgd": "AGVM-SGD", "adamw": "AdamW", "agvm_adamw": "AGVM-AdamW",
                    "AGVMSGD": "AGVM-SGD", "AGVMAdamW": "AGVM-AdamW", "SGD": "SGD", "AdamW": "AdamW"}

__all__ = ["VarianceLog", "load_variance_log", "plot_phi", "plot_mu", "main"]


class VarianceLogError(ValueError):
    """A variance log that cannot be read; the message names the file and line."""


@dataclass
class VarianceLog:
    """One run's measurements, in iteration order."""

    label: str
    records: List[dict]
    predicted: Dict[str, Dict[str, float]] = field(default_factory=dict)  # diagnosis -> {module: Phi at batch_size}

    @property
    def modules(self) -> List[str]:
        seen: Dict[str, None] = {}
        for r in self.records:
            for m in r["phi"]:
                seen.setdefault(m, None)
        return list(seen)

    @property
    def batch_size(self) -> Optional[int]:
        return next((r.get("batch_size") for r in self.records if r.get("batch_size")), None)

    @property
    def optimizer(self) -> Optional[str]:
        return next((r.get("optimizer") for r in self.records if r.get("optimizer")), None)

    def series(self, key: str, module: str, times_lr2: bool = False):
        """(iterations, values) of ``phi`` or ``mu`` for one module, skipping missing and non-finite points."""
        xs, ys = [], []
        for r in self.records:
            v = (r.get(key) or {}).get(module)
            if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            if times_lr2 and r.get("lr") is not None:
                v = v * float(r["lr"]) ** 2
            xs.append(r["iter"])
            ys.append(float(v))
        return xs, ys

    @property
    def has_mu(self) -> bool:
        return any(r.get("mu") for r in self.records)


def load_variance_log(path: str | Path, label: Optional[str] = None) -> VarianceLog:
    """Read ``agvm_variance.jsonl`` (or a work dir holding one). A truncated last line (a run killed while
    writing) is skipped with a warning; any other bad line is an error naming the file and line number."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no variance log at {path}: runs write {LOG_NAME} into their work dir when "
                                "trained with the AGVM logging hook (agvm.mm)")
    lines = path.read_text().splitlines()
    records: List[dict] = []
    for k, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(lines):
                print(f"[figures] {path}:{k}: skipping a truncated last line", file=sys.stderr)
                continue
            raise VarianceLogError(f"{path}:{k}: not valid JSON ({err})") from None
        if not isinstance(rec, dict):
            raise VarianceLogError(f"{path}:{k}: expected a JSON object, got {type(rec).__name__}")
        for key, typ in REQUIRED.items():
            if not isinstance(rec.get(key), typ):
                raise VarianceLogError(f"{path}:{k}: field {key!r} must be {typ.__name__}, got {rec.get(key)!r}; "
                                       f"expected {{'iter', 'epoch', 'phi', 'mu', 'lr', 'batch_size', 'optimizer'}}")
        records.append(rec)
    if not records:
        raise VarianceLogError(f"{path}: no measurements (empty log)")
    records.sort(key=lambda r: r["iter"])
    log = VarianceLog(label or "", records)
    if not label:
        log.label = default_label(log, path.parent.name)
    for name in PREDICTIONS:  # the run's variance diagnoses (slurm.entry_points:train_with_diagnosis), if any
        diag = path.parent / name / "diagnosis.json"
        if diag.is_file() and log.batch_size:
            from agvm.diagnose import Diagnosis

            log.predicted[name] = Diagnosis.from_dict(json.loads(diag.read_text())).phi(log.batch_size)
    return log


def _mu_fixed_at_one(log: VarianceLog) -> bool:
    return all(v is None or v == 1.0 for r in log.records for v in (r.get("mu") or {}).values())


def default_label(log: VarianceLog, fallback: str) -> str:
    """'SGD (512)'-style label from the log's optimizer and batch size (the appendix's convention). An AGVM
    optimizer whose mu stayed 1 (modulation off, Phi only measured) is labelled with its base optimizer."""
    opt = log.optimizer
    if opt is None:
        return fallback
    name = OPTIMIZER_LABELS.get(opt, opt)
    if name.startswith("AGVM-") and _mu_fixed_at_one(log):
        name = name[len("AGVM-"):]
    return f"{name} ({log.batch_size})" if log.batch_size else name


def _module_colors(logs: Sequence[VarianceLog]) -> Dict[str, tuple]:
    mods: Dict[str, None] = {}
    for log in logs:
        for m in log.modules:
            mods.setdefault(m, None)
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(mods)}


def _smooth(ys: List[float], window: int) -> List[float]:
    if window <= 1 or len(ys) < 2:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _grid(n: int):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _plot(logs: Sequence[VarianceLog], key: str, out: Path, title: str, ylabel: str, log_y: bool,
          smooth: int, times_lr2: bool = False) -> Path:
    if not logs:
        raise ValueError("no variance logs to plot")
    colors = _module_colors(logs)
    fig, axes = _grid(len(logs))
    for ax, log in zip(axes, logs):
        plotted = False
        for m in log.modules:
            xs, ys = log.series(key, m, times_lr2)
            if log_y:
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if y > 0]) if any(y > 0 for y in ys) else ((), ())
                xs, ys = list(xs), list(ys)
            if not xs:
                continue
            ax.plot(xs, _smooth(ys, smooth), label=MODULE_LABELS.get(m, m), color=colors[m], lw=1.4,
                    marker="o" if len(xs) < 15 else None, ms=3)
            plotted = True
            for name, phi in log.predicted.items() if key == "phi" else ():
                if phi.get(m, 0) > 0:  # predicted at the run's batch from the initial / final weights
                    ax.axhline(phi[m], color=colors[m], ls=PREDICTIONS[name], lw=1.0)
        title_ = log.label
        if key == "phi" and log.predicted:
            title_ += "\n(" + ", ".join(f"'{PREDICTIONS[n]}' predicted, {n.split('_')[1]} weights" for n in log.predicted) + ")"
        ax.set_title(title_, fontsize=11 if title_ == log.label else 8)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log_y and plotted:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
        if plotted:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {key} values", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_phi(logs: Sequence[VarianceLog], out: str | Path, title: Optional[str] = None, smooth: int = 1,
             times_lr2: bool = False) -> Path:
    """Fig. 1/2/4 style: Phi per module over training, one panel per run (batch size / optimizer)."""
    ylabel = "Φ = η²(1 − cos)" if times_lr2 else "Φ = 1 − cos(G₁, G₂)"
    return _plot(logs, "phi", Path(out), title or "Gradient variance Φ per module (appendix Eq. 2)", ylabel,
                 True, smooth, times_lr2)


def plot_mu(logs: Sequence[VarianceLog], out: str | Path, title: Optional[str] = None, smooth: int = 1) -> Path:
    """mu per module for runs trained with AGVM (runs without mu values are left out)."""
    with_mu = [log for log in logs if log.has_mu]
    if not with_mu:
        raise ValueError("none of the logs has mu values: mu is logged only by runs trained with AGVM")
    return _plot(with_mu, "mu", Path(out), title or "AGVM modulation μ per module (Eq. 41-42)",
                 "μ = sqrt(Φ_backbone / Φ_i), EMA", False, smooth)


# The appendix's figures from the runs of experiments/fig1_4_variance (work_dirs/fig1_4_variance/<run>/).
APPENDIX_FIGURES: Dict[str, List[tuple]] = {
    "fig1": [("faster_rcnn_r50_bs32_sgd_measured", "Faster R-CNN, SGD (32)"),
             ("faster_rcnn_r50_bs512_sgd_measured", "Faster R-CNN, SGD (512)"),
             ("panoptic_fpn_r50_bs32_sgd_measured", "Panoptic FPN, SGD (32)"),
             ("panoptic_fpn_r50_bs512_sgd_measured", "Panoptic FPN, SGD (512)"),
             ("faster_rcnn_swin-t_bs32_adamw_measured", "Faster R-CNN Swin-T, AdamW (32)"),
             ("faster_rcnn_swin-t_bs512_adamw_measured", "Faster R-CNN Swin-T, AdamW (512)")],
    "fig2": [("retinanet_r50_bs32_sgd_measured", "RetinaNet, SGD (32)"),
             ("retinanet_r50_bs10240_sgd_measured", "RetinaNet, SGD (10k)")],
    "fig3": [(f"mask_rcnn_r50_bs{b}_agvm_sgd", f"Mask R-CNN, AGVM-SGD ({b})") for b in (32, 256, 512, 1024)],
    "fig4": [("faster_rcnn_r50_bs512_sgd_measured", "FPN, 512 proposals"),
             ("faster_rcnn_r50_bs512_sgd_measured_no_fpn", "no FPN"),
             ("faster_rcnn_r50_bs512_sgd_measured_no_fpn_10_proposals", "no FPN, 10 proposals"),
             ("faster_rcnn_r50_bs512_sgd_measured_no_fpn_10_proposals_frozen_head", "no FPN, 10 proposals, frozen head")],
}
APPENDIX_TITLES = {
    "fig1": "Fig. 1: gradient variance per module, small vs large batch (R50 pipelines; Swin-T with AdamW)",
    "fig2": "Fig. 2: RetinaNet, batch 32 vs 10k",
    "fig3": "Fig. 3: Mask R-CNN with AGVM, batch 32 to 1024",
    "fig4": "Fig. 4: Faster R-CNN at batch 512, removing the FPN, proposals and the head's training",
}


def appendix_figures(runs_dir: str | Path, out: str | Path, smooth: int = 1) -> List[Path]:
    """Draw Fig. 1-4 (and Fig. 3's mu) from the runs present under ``runs_dir``; panels whose run has no log yet
    are left out (and named on stderr)."""
    runs_dir, out = Path(runs_dir), Path(out)
    written: List[Path] = []
    for fig, panels in APPENDIX_FIGURES.items():
        logs = []
        for run, label in panels:
            if (runs_dir / run / LOG_NAME).is_file():
                logs.append(load_variance_log(runs_dir / run, label))
            else:
                print(f"[figures] {fig}: no log for {run} yet, panel left out", file=sys.stderr)
        if not logs:
            continue
        written.append(plot_phi(logs, out / f"{fig}_phi.png", APPENDIX_TITLES[fig], smooth))
        if fig == "fig3" and any(log.has_mu for log in logs):
            written.append(plot_mu(logs, out / f"{fig}_mu.png", "Fig. 3: AGVM's mu per module", smooth))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m results.figures", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help=f"work dirs holding {LOG_NAME} (or the log files)")
    ap.add_argument("--appendix", metavar="RUNS_DIR", default=None,
                    help="draw the appendix's Fig. 1-4 from the runs of experiments/fig1_4_variance under RUNS_DIR "
                         "(e.g. work_dirs/fig1_4_variance)")
    ap.add_argument("--out", default="results/figures", help="output folder (default: results/figures)")
    ap.add_argument("--name", default="variance", help="file name prefix: <name>_phi.png, <name>_mu.png")
    ap.add_argument("--label", action="append", help="panel title per run, in order (default: 'SGD (512)')")
    ap.add_argument("--title", default=None)
    ap.add_argument("--smooth", type=int, default=1, help="moving-average window over measurements")
    ap.add_argument("--times-lr2", action="store_true", help="plot eta^2 (1 - cos) instead of (1 - cos)")
    args = ap.parse_args(argv)
    if args.appendix:
        written = appendix_figures(args.appendix, args.out, args.smooth)
        for p in written:
            print(f"[figures] wrote {p}")
        if not written:
            print(f"error: no variance logs of experiments/fig1_4_variance runs under {args.appendix}", file=sys.stderr)
            return 2
        return 0
    if not args.runs:
        ap.error("give run work dirs, or --appendix RUNS_DIR")
    if args.label and len(args.label) != len(args.runs):
        ap.error(f"--label given {len(args.label)} times for {len(args.runs)} runs")
    try:
        logs = [load_variance_log(r, args.label[i] if args.label else None) for i, r in enumerate(args.runs)]
    except (FileNotFoundError, VarianceLogError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    written = [plot_phi(logs, out / f"{args.name}_phi.png", args.title, args.smooth, args.times_lr2)]
    if any(log.has_mu for log in logs):
        written.append(plot_mu(logs, out / f"{args.name}_mu.png", None, args.smooth))
    for p in written:
        print(f"[figures] wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
