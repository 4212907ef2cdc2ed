"""Collect finished runs and tabulate them against the paper: ``python -m results.collect`` (``make tables``).

Every finished run is a ``work_dirs/<experiment>/<run>/metrics.json`` (written by ``agvm.mm.train.train``; a run
stopped by a NaN / Inf loss writes ``{"status": "diverged", "iter": ...}`` and is shown as "diverged", next to the
paper's own "diverged" rows). Each run is matched to a paper id ``<table>/<pipeline>/bs<B>/<optimizer>``
(results/paper/numbers.yaml): from the ``paper`` of the ``run.json`` the launcher (slurm.submit) wrote into the
work dir, else a ``paper_id`` in metrics.json, else from the run name, which follows the config names
``<pipeline>_<backbone>_bs<B>_<optimizer>[...]``. For each table of the paper this
writes ``results/tables/<table>.md`` and ``.csv``: our number, the paper's, the difference, the source and its
trust level (A = authors' own material, B = unattributed secondary summary). Runs that are not there are shown
as "missing", never as zero; runs that match no table go to ``other_runs.md``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from agvm.fileio import write_text_atomic

from .numbers import METRIC_LABELS, PaperNumber, PaperNumbers, load_numbers, parse_id

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# The tables: which rows each shows (a grid of pipeline x batch x optimizer, plus every paper id of the table).
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    description: str
    pipelines: Dict[str, Tuple[str, ...]]  # pipeline key (the id's 2nd part) -> metrics shown
    batches: Tuple[str, ...] = ()
    optimizers: Tuple[str, ...] = ()
    backbone: str = "r50"  # the backbone a run name must have to land in this table


TABLES: Tuple[TableSpec, ...] = (
    TableSpec("table1", "Table 1: SGD vs AGVM-SGD, R50-FPN, COCO val",
              "Appendix Table 1 hyper-parameters (warm-up, lr, MultiStep, tau, alpha, wd 1e-4).",
              {"faster_rcnn": ("box_ap",), "mask_rcnn": ("mask_ap", "box_ap"), "panoptic_fpn": ("pq",)},
              ("bs32", "bs256", "bs512", "bs1024"), ("sgd", "agvm_sgd")),
    TableSpec("authors_code", "The authors' public code settings: SGD vs AGVM-SGD, R50-FPN, COCO val",
              "The authors' mmdetection 2.x port: 16 epochs, lr steps at 12/14, exponential warm-up, tau 10.",
              {"faster_rcnn": ("box_ap",), "mask_rcnn": ("mask_ap",)},
              ("bs32", "bs256", "bs512"), ("sgd", "agvm_sgd")),
    TableSpec("table2", "Table 2: Semantic FPN R50, ADE20K val, SGD vs AGVM-SGD",
              "Appendix Table 2 hyper-parameters (warm-up iterations, Poly 0.9, tau 5, wd 5e-4). "
              "The sources we have give no mIoU for this table.",
              {"semantic_fpn": ("miou",)}, ("bs32", "bs512", "bs1024", "bs2048"), ("sgd", "agvm_sgd")),
    TableSpec("table3", "Table 3: Faster R-CNN Swin-Tiny FPN, COCO val, AdamW vs AGVM-AdamW",
              "Appendix Table 3 hyper-parameters (gradient clip 1.0 from batch 256). "
              "The sources we have give no box AP for this table.",
              {"faster_rcnn": ("box_ap",)}, ("bs32", "bs256", "bs512", "bs1024"), ("adamw", "agvm_adamw"),
              backbone="swin"),
    TableSpec("adamw_r50", "Faster R-CNN R50 with AdamW, AGVM-AdamW and the large-batch baselines, COCO val",
              "Main paper, 12 epochs; LAMB / PMD-LAMB / LARS at the largest batch.",
              {"faster_rcnn": ("box_ap",)}, ("bs32", "bs256", "bs512", "bs1024", "bs1536"),
              ("adamw", "agvm_adamw")),
    TableSpec("baselines", "Large-batch baselines on Faster R-CNN R50-FPN at batch 1024, COCO val",
              "LARS, LAMB and PMD-LAMB at the largest Table 1 batch (SGD / AGVM-SGD at 1024 are in table1). "
              "The sources we have give no numbers at 1024 (see adamw_r50 for 1536).",
              {"faster_rcnn": ("box_ap",)}, ("bs1024",), ("lars", "lamb", "pmd_lamb")),
    TableSpec("retinanet", "RetinaNet large-batch stability (up to batch 10k), COCO val",
              "'agvm' = AGVM with the base optimizer the source does not state.",
              {"retinanet_r18": ("box_ap",), "retinanet_r50": ("box_ap",)}),
    TableSpec("uninet_htcx", "UniNet-G + HTC-X (about 1B parameters) at batch 960, COCO test-dev",
              "The paper evaluates on test-dev; our runs evaluate on the config's test set (val unless changed).",
              {"htc_x": ("box_ap", "mask_ap")}),
    TableSpec("ablations", "Ablations (main paper)", "Batch size and pipeline partly unstated in the source.",
              {"mask_rcnn": ("mask_ap",), "faster_rcnn": ("box_ap",)}),
)
TABLE_BY_NAME = {t.name: t for t in TABLES}

# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------

# metrics.json keys (last '/'-separated part) -> (our metric, factor to percent). mmdet's CocoMetric reports
# bbox_mAP / segm_mAP as fractions; mmdet's panoptic metric and mmseg's IoUMetric report PQ / mIoU in percent.
METRIC_KEYS: Dict[str, Tuple[str, float]] = {
    "bbox_mAP": ("box_ap", 100.0),
    "segm_mAP": ("mask_ap", 100.0),
    "PQ": ("pq", 1.0),
    "mIoU": ("miou", 1.0),
}

PIPELINES = ("faster_rcnn", "mask_rcnn", "panoptic_fpn", "retinanet", "semantic_fpn", "htc_x", "htc")
OPTIMIZERS = ("agvm_sgd", "agvm_adamw", "pmd_lamb", "sgd", "adamw", "lars", "lamb")
RUN_NAME = re.compile(
    r"^(?P<pipeline>" + "|".join(PIPELINES) + r")_(?P<backbone>[a-z0-9_\-]+?)_bs(?P<bs>\d+k?)_"
    r"(?P<opt>" + "|".join(OPTIMIZERS) + r")(?P<rest>(_.*)?)$")


@dataclass
class Run:
    experiment: str
    name: str
    path: Path
    metrics: Dict[str, float]  # our metric -> value in percent (NaN = diverged)
    raw: dict
    paper_ids: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.experiment}/{self.name}"

    @property
    def diverged(self) -> bool:
        """metrics.json says the run diverged (``"status": "diverged"``; ``"diverged": true`` in older files)."""
        return self.raw.get("status") == "diverged" or self.raw.get("diverged") is True

    def value(self, metric: str) -> Optional[float]:
        """Our number for ``metric``: NaN for a diverged run, None when the run did not report it."""
        return math.nan if self.diverged else self.metrics.get(metric)


def extract_metrics(raw: dict) -> Dict[str, float]:
    """Our metrics (percent) from a metrics.json mapping; a flat mapping or one nested under 'metrics'."""
    flat = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else raw
    out: Dict[str, float] = {}
    for key, value in flat.items():
        last = str(key).split("/")[-1]
        if last not in METRIC_KEYS:
            continue
        metric, factor = METRIC_KEYS[last]
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue
        out.setdefault(metric, v * factor if math.isfinite(v) else float("nan"))
    return out


def find_runs(work_dirs: Path) -> List[Run]:
    """Every ``metrics.json`` under ``work_dirs``: ``<experiment>/<run>/metrics.json`` (deeper run paths are joined
    with '/'; a metrics.json directly in ``work_dirs/<name>/`` is experiment '-', run <name>)."""
    runs: List[Run] = []
    if not work_dirs.is_dir():
        return runs
    for path in sorted(work_dirs.rglob("metrics.json")):
        rel = path.parent.relative_to(work_dirs).parts
        if not rel:
            continue
        experiment, name = (rel[0], "/".join(rel[1:])) if len(rel) > 1 else ("-", rel[0])
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"[tables] skipping unreadable {path}: {err}", file=sys.stderr)
            continue
        if not isinstance(raw, dict):
            print(f"[tables] skipping {path}: not a JSON object", file=sys.stderr)
            continue
        runs.append(Run(experiment, name, path.parent, extract_metrics(raw), raw))
    return runs


def _bs_key(bs: str) -> str:
    if bs.endswith("k"):
        return f"bs{bs}"
    n = int(bs)
    return "bs10k" if n in (10000, 10240) else f"bs{n}"


def ids_from_name(experiment: str, name: str) -> List[str]:
    """Paper ids a run name ``<pipeline>_<backbone>_bs<B>_<optimizer>[_variant]`` stands for (may be several: a
    Table 1 Faster R-CNN run at 512 is compared with the Table 1 number; an ``_authors`` variant with the code's)."""
    m = RUN_NAME.match(name.split("/")[0])
    if not m:
        return []
    pipeline, backbone, opt, rest = m["pipeline"], m["backbone"], m["opt"], m["rest"]
    bs = _bs_key(m["bs"])
    out: List[str] = []
    if experiment in TABLE_BY_NAME:  # an experiment named after a table says which table
        tables = [experiment]
    elif "authors" in rest:
        tables = ["authors_code"]
    elif pipeline in ("faster_rcnn", "mask_rcnn", "panoptic_fpn") and backbone.startswith("r50") and opt in (
            "sgd", "agvm_sgd"):
        tables = ["table1"]
    elif pipeline == "semantic_fpn":
        tables = ["table2"]
    elif pipeline == "faster_rcnn" and backbone.startswith("swin"):
        tables = ["table3"]
    elif pipeline == "faster_rcnn" and backbone.startswith("r50") and bs == "bs1024":
        tables = ["baselines"]
    elif pipeline == "faster_rcnn" and backbone.startswith("r50"):
        tables = ["adamw_r50"]
    elif pipeline == "retinanet":
        tables = ["retinanet"]
    elif pipeline in ("htc_x", "htc") and "uninet" in backbone:
        tables = ["uninet_htcx"]
    else:
        tables = []
    for table in tables:
        key = f"{pipeline}_{backbone.split('_')[0]}" if table == "retinanet" else pipeline
        if table == "uninet_htcx":
            key = "htc_x"
        out.append(f"{table}/{key}/{bs}/{opt}")
        if table == "retinanet" and opt.startswith("agvm"):
            out.append(f"{table}/{key}/{bs}/agvm")
    return out


def assign_ids(runs: Sequence[Run]) -> None:
    """Each run's paper ids: the ``paper`` the launcher recorded in ``<work dir>/run.json``, else metrics.json's
    ``paper_id``, else from the run name."""
    for run in runs:
        try:
            declared = json.loads((run.path / "run.json").read_text()).get("paper")
        except (OSError, ValueError, AttributeError):
            declared = None
        declared = declared or run.raw.get("paper_id")
        if isinstance(declared, str):
            declared = [declared]
        run.paper_ids = list(declared) if declared else ids_from_name(run.experiment, run.name)

# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    table: str
    id: str
    metric: str
    paper: Optional[PaperNumber]
    runs: List[Run]

    @property
    def ours(self) -> List[float]:
        return [v for v in (r.value(self.metric) for r in self.runs) if v is not None]

    @property
    def status(self) -> str:
        if not self.runs:
            return "missing"
        if not self.ours:
            return "no metric"
        return "diverged" if any(math.isnan(v) for v in self.ours) else "done"

    def ours_mean(self) -> Optional[float]:
        vals = [v for v in self.ours if not math.isnan(v)]
        return statistics.fmean(vals) if vals and len(vals) == len(self.ours) else None

    def ours_std(self) -> Optional[float]:
        vals = self.ours
        return statistics.stdev(vals) if len(vals) > 1 and not any(math.isnan(v) for v in vals) else None

    def diff(self) -> Optional[float]:
        mean = self.ours_mean()
        ref = self.paper.comparable() if self.paper else None
        return None if mean is None or ref is None else mean - ref

    def ours_cell(self) -> str:
        if self.status == "missing":
            return "missing"
        if self.status == "no metric":
            return f"no {METRIC_LABELS[self.metric]} in metrics.json"
        if self.status == "diverged":
            at = sorted({r.raw["iter"] for r in self.runs if r.diverged and isinstance(r.raw.get("iter"), int)})
            return "diverged" + (f" (iter {', '.join(map(str, at))})" if at else " (NaN)")
        mean, std, n = self.ours_mean(), self.ours_std(), len(self.ours)
        return f"{mean:.1f}" + (f" ± {std:.1f} (n={n})" if std is not None else "")

    def paper_cell(self) -> str:
        return "not reported" if self.paper is None else f"{self.paper.display()} [{self.paper.trust}]"

    def diff_cell(self) -> str:
        d = self.diff()
        if d is not None:
            return f"{d:+.1f}"
        if self.paper is not None and self.paper.outcome == "diverged" and self.status == "diverged":
            return "both diverged"
        if self.paper is not None and self.paper.outcome == "diverged" and self.status == "done":
            return "ours trains"
        if self.paper is not None and self.status == "diverged":
            return "ours diverged"
        return "–"


def _sort_key(paper_id: str, spec: TableSpec) -> tuple:
    _, pipeline, bs, opt = parse_id(paper_id)
    p_order = list(spec.pipelines).index(pipeline) if pipeline in spec.pipelines else 99
    n = 10_000 if bs == "bs10k" else int(bs[2:]) if bs[2:].isdigit() else 0
    o_order = OPTIMIZERS.index(opt) if opt in OPTIMIZERS else 50
    # baselines first, AGVM after: sgd, adamw, lars, lamb, pmd_lamb, agvm_*
    o_rank = {"sgd": 0, "adamw": 1, "lars": 2, "lamb": 3, "pmd_lamb": 4}.get(opt, 5 + o_order)
    return (p_order, pipeline, n, o_rank, opt)


def build_rows(spec: TableSpec, paper: PaperNumbers, runs: Sequence[Run]) -> List[Row]:
    keys: Dict[Tuple[str, str], None] = {}
    for pipeline, metrics in spec.pipelines.items():
        for bs in spec.batches:
            for opt in spec.optimizers:
                for metric in metrics:
                    keys[(f"{spec.name}/{pipeline}/{bs}/{opt}", metric)] = None
    for n in paper.numbers:
        if n.table == spec.name:
            keys[(n.id, n.metric)] = None
    for run in runs:
        for pid in run.paper_ids:
            if pid.split("/")[0] != spec.name:
                continue
            pipeline = parse_id(pid)[1]
            for metric in spec.pipelines.get(pipeline, tuple(run.metrics) or ("box_ap",)):
                keys[(pid, metric)] = None
    rows = [Row(spec.name, pid, metric, paper.get(pid, metric), [r for r in runs if pid in r.paper_ids])
            for pid, metric in keys]
    metric_order = {m: i for i, m in enumerate(METRIC_LABELS)}
    rows.sort(key=lambda r: (_sort_key(r.id, spec), metric_order.get(r.metric, 9)))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

CSV_FIELDS = ("table", "id", "pipeline", "batch_size", "optimizer", "metric", "status", "ours", "ours_std",
              "ours_n", "paper", "paper_outcome", "diff", "trust", "source", "runs")


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}"


def rows_to_csv(rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        _, pipeline, bs, opt = parse_id(r.id)
        w.writerow({
            "table": r.table, "id": r.id, "pipeline": pipeline, "batch_size": bs[2:] if bs else "",
            "optimizer": opt, "metric": r.metric, "status": r.status,
            "ours": _fmt(r.ours_mean()) if r.status == "done" else ("nan" if r.status == "diverged" else ""),
            "ours_std": _fmt(r.ours_std()), "ours_n": len(r.ours) if r.runs else "",
            "paper": "" if r.paper is None else (_fmt(r.paper.comparable()) if r.paper.outcome != "diverged" else "nan"),
            "paper_outcome": "" if r.paper is None else r.paper.outcome, "diff": _fmt(r.diff()),
            "trust": "" if r.paper is None else r.paper.trust, "source": "" if r.paper is None else r.paper.source,
            "runs": ";".join(run.label for run in r.runs)})
    return buf.getvalue()


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def rows_to_markdown(spec: TableSpec, rows: Sequence[Row], paper: PaperNumbers) -> str:
    done = sum(r.status in ("done", "diverged") for r in rows)
    lines = [f"# {spec.title}", "", spec.description, "",
             f"Rows: {len(rows)}; with our result: {done}; missing: {sum(r.status == 'missing' for r in rows)}. "
             "Ours = mean over the finished runs (± std over seeds); diff = ours − paper. "
             "Generated by `make tables` (python -m results.collect); do not edit by hand.", "",
             "| pipeline | batch | optimizer | metric | ours | paper [trust] | diff | source | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        _, pipeline, bs, opt = parse_id(r.id)
        src = "" if r.paper is None else r.paper.source + (f" ({r.paper.note})" if r.paper.note else "")
        lines.append("| " + " | ".join(_md_escape(c) for c in (
            pipeline, bs[2:] if bs else "-", opt, METRIC_LABELS[r.metric], r.ours_cell(), r.paper_cell(),
            r.diff_cell(), src, ", ".join(run.label for run in r.runs) or "–")) + " |")
    used = sorted({r.paper.source for r in rows if r.paper is not None})
    lines += ["", "Trust: **A** = the authors' own material; **B** = an unattributed secondary summary of the main "
              "paper (unverified; replace when a primary number is found). Sources:"]
    lines += [f"- `{s}` [{paper.sources[s]['trust']}]: {paper.sources[s]['cite']}" for s in used] or ["- (none)"]
    return "\n".join(lines) + "\n"


def other_runs_markdown(runs: Sequence[Run]) -> str:
    lines = ["# Runs that match no paper table", "",
             "Finished runs (metrics.json present) whose name or experiment maps to no table of the paper "
             "(smoke tests, the demo, custom configs).", ""]
    if not runs:
        return "\n".join(lines + ["(none)"]) + "\n"
    lines += ["| run | metrics (percent) |", "|---|---|"]
    for r in runs:
        ms = ", ".join(f"{METRIC_LABELS[m]} {v:.1f}" for m, v in sorted(r.metrics.items())) or "(no known metric)"
        if r.diverged:
            ms = f"diverged at iter {r.raw.get('iter', '?')}: {r.raw.get('reason', 'NaN')}"
        lines.append(f"| {r.label} | {_md_escape(ms)} |")
    return "\n".join(lines) + "\n"


def claims_markdown(paper: PaperNumbers) -> str:
    lines = ["# The paper's claims (not tabulated against runs)", "", "| claim | source [trust] |", "|---|---|"]
    lines += [f"| {_md_escape(c.text)} | {c.source} [{c.trust}] |" for c in paper.claims]
    return "\n".join(lines) + "\n"


def collect(work_dirs: Path, out: Path, numbers_file: Optional[Path] = None) -> Dict[str, List[Row]]:
    """Write ``<out>/<table>.md/.csv``, ``other_runs.md``, ``claims.md`` and ``README.md``; return the rows."""
    paper = load_numbers(numbers_file) if numbers_file else load_numbers()
    runs = find_runs(Path(work_dirs))
    assign_ids(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: Dict[str, List[Row]] = {}
    known_tables = set(TABLE_BY_NAME)
    for spec in TABLES:
        rows = build_rows(spec, paper, runs)
        all_rows[spec.name] = rows
        write_text_atomic(out / f"{spec.name}.md", rows_to_markdown(spec, rows, paper))
        write_text_atomic(out / f"{spec.name}.csv", rows_to_csv(rows))
    other = [r for r in runs if not any(pid.split("/")[0] in known_tables for pid in r.paper_ids)]
    write_text_atomic(out / "other_runs.md", other_runs_markdown(other))
    write_text_atomic(out / "claims.md", claims_markdown(paper))
    index = ["# Results tables", "", f"Finished runs found under `{work_dirs}`: {len(runs)} "
             f"({len(other)} match no paper table: other_runs.md).", "",
             "| table | rows | with our result | missing | with a paper number (A / B) |", "|---|---|---|---|---|"]
    for spec in TABLES:
        rows = all_rows[spec.name]
        a = sum(r.paper is not None and r.paper.trust == "A" for r in rows)
        b = sum(r.paper is not None and r.paper.trust == "B" for r in rows)
        index.append(f"| [{spec.name}]({spec.name}.md): {spec.title} | {len(rows)} | "
                     f"{sum(r.status in ('done', 'diverged') for r in rows)} | "
                     f"{sum(r.status == 'missing' for r in rows)} | {a} / {b} |")
    index += ["", "Also: [claims.md](claims.md) (the paper's claims), [other_runs.md](other_runs.md).", ""]
    write_text_atomic(out / "README.md", "\n".join(index))
    return all_rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m results.collect", description=__doc__.split("\n")[0])
    ap.add_argument("--work-dirs", default="work_dirs", help="root of the run work dirs (default: work_dirs)")
    ap.add_argument("--out", default="results/tables", help="output folder (default: results/tables)")
    ap.add_argument("--numbers", default=None, help="paper numbers file (default: results/paper/numbers.yaml)")
    args = ap.parse_args(argv)
    rows = collect(Path(args.work_dirs), Path(args.out), Path(args.numbers) if args.numbers else None)
    n_done = sum(r.status in ("done", "diverged") for rs in rows.values() for r in rs)
    n_all = sum(len(rs) for rs in rows.values())
    print(f"[tables] {n_done} of {n_all} table rows have our result; wrote {args.out}/README.md and "
          f"{len(rows)} tables (.md + .csv)")
    return 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
