"""``python -m slurm.status experiments/<name>``: one line per run with its state (done, diverged at iter N,
running, failed: <error>, ...), progress, last metric and the paper's number beside it (from
``results/paper/numbers.yaml`` when the id is there, else the id). The numbers file is read as data:
``slurm/`` and ``results/`` do not import each other."""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .experiment import Experiment, Run, load_experiment
from .state import RunState, run_dir, run_state, work_dirs_root

__all__ = ["main", "status_rows", "format_table", "our_metric", "paper_number", "METRIC_KEYS"]

# metrics.json key -> paper metric (the paper gives percent; mmdet's COCO metrics are fractions)
METRIC_KEYS: Dict[str, Sequence[Tuple[str, float]]] = {
    "box_ap": (("box_ap", 1.0), ("coco/bbox_mAP", 100.0), ("bbox_mAP", 100.0)),
    "mask_ap": (("mask_ap", 1.0), ("coco/segm_mAP", 100.0), ("segm_mAP", 100.0)),
    "pq": (("pq", 1.0), ("coco_panoptic/PQ", 1.0), ("PQ", 1.0)),
    "miou": (("miou", 1.0), ("mIoU", 1.0)),
}


def our_metric(metrics: Dict[str, Any], metric: Optional[str]) -> Optional[str]:
    """The run's number in the paper's unit (e.g. 'box AP 36.8'), else the first numeric entry."""
    if metric:
        for key, scale in METRIC_KEYS.get(metric, ()):
            v = metrics.get(key)
            if isinstance(v, (int, float)):
                return f"{metric} {v * scale:.1f}" if math.isfinite(v) else f"{metric} {v}"
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{k} {v:.4g}"
    return None


NUMBERS_FILE = Path("results") / "paper" / "numbers.yaml"  # relative to the repository root


@functools.lru_cache(maxsize=4)
def _numbers(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def paper_number(root: Path, paper_id: Optional[str], metric: Optional[str]) -> str:
    """'36.7 box_ap (B)' (value, metric, trust) from results/paper/numbers.yaml, 'diverged box_ap (B)' for a
    divergence the paper reports, or the id itself when the file has no number for it."""
    if not paper_id:
        return "-"
    own = Path(root) / NUMBERS_FILE  # the experiment's repository, else this one's (what `make tables` reads)
    data = _numbers(own if own.is_file() else Path(__file__).resolve().parents[1] / NUMBERS_FILE)
    if not data:
        return paper_id
    entries = [e for e in data.get("numbers") or [] if isinstance(e, dict) and e.get("id") == paper_id]
    found = next((e for e in entries if e.get("metric") == metric), entries[0] if entries else None)
    if found is None:
        return f"{paper_id} (no number)"
    trust = ((data.get("sources") or {}).get(found.get("source")) or {}).get("trust", "?")
    if found.get("outcome") == "diverged":
        value = "diverged"
    elif found.get("range"):
        value = f"{found['range'][0]:g}-{found['range'][1]:g}"
    else:
        value = f"{float(found['value']):.1f}"
    return f"{value} {found.get('metric')} ({trust})"


def status_rows(exp: Experiment, work_dirs: Path) -> List[Tuple[Run, RunState]]:
    return [(run, run_state(run_dir(work_dirs, exp.name, run.name))) for run in exp.order()]


def format_table(exp: Experiment, rows: List[Tuple[Run, RunState]]) -> str:
    table = [("run", "state", "progress", "last", "paper")]
    for run, st in rows:
        last = our_metric(st.metrics, run.metric) if st.state == "done" else st.last
        state = st.state + (f" ({st.attempts - 1} requeue(s))" if st.attempts > 1 else "")
        table.append((run.name, state, st.progress, last or "-", paper_number(exp.root, run.paper, run.metric)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    done = sum(1 for _, st in rows if st.state == "done")
    diverged = sum(1 for _, st in rows if st.state.startswith("diverged"))
    return (f"experiment {exp.name}: {done}/{len(rows)} done" + (f", {diverged} diverged" if diverged else "")
            + "\n" + "\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__)
    ap.add_argument("experiment", help="experiment folder, e.g. experiments/table1")
    ap.add_argument("--work-dirs", help="root of the work dirs (default $AGVM_WORK_DIRS or ./work_dirs)")
    ap.add_argument("--root", help="repository root (default: the experiment folder's grand-parent)")
    args = ap.parse_args(argv)
    exp = load_experiment(args.experiment, root=args.root, check_configs=False)  # errors: agvm.cli.run
    print(format_table(exp, status_rows(exp, work_dirs_root(exp.root, args.work_dirs))))
    return 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
