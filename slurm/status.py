"""``python -m slurm.status experiments/<name>``: one line per run with its state, progress, last metric and
the paper's number beside it (from ``results/paper/numbers.yaml`` when the id is there, else the id)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .experiment import Experiment, ExperimentError, Run, load_experiment
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


def paper_number(root: Path, paper_id: Optional[str], metric: Optional[str]) -> str:
    """'36.7 (B)' from results/paper/numbers.yaml, or the id itself when the paper gives no number for it."""
    if not paper_id:
        return "-"
    try:
        sys.path.insert(0, str(root))
        from results.numbers import load_numbers  # the paper numbers helper (results/)

        numbers = load_numbers()
    except Exception:  # noqa: BLE001 - no numbers file: show the id
        return paper_id
    finally:
        if sys.path and sys.path[0] == str(root):
            sys.path.pop(0)
    found = numbers.get(paper_id, metric) if metric else None
    if found is None:
        entries = numbers.by_id().get(paper_id, [])
        found = entries[0] if entries else None
    if found is None:
        return f"{paper_id} (no number)"
    return f"{found.display()} {found.metric} ({found.trust})"


def status_rows(exp: Experiment, work_dirs: Path) -> List[Tuple[Run, RunState]]:
    return [(run, run_state(run_dir(work_dirs, exp.name, run.name))) for run in exp.order()]


def format_table(exp: Experiment, rows: List[Tuple[Run, RunState]]) -> str:
    table = [("run", "state", "progress", "last", "paper")]
    for run, st in rows:
        last = our_metric(st.metrics, run.metric) if st.metrics else st.last
        state = st.state + (f" ({st.attempts - 1} requeue(s))" if st.attempts > 1 else "")
        table.append((run.name, state, st.progress, last or "-", paper_number(exp.root, run.paper, run.metric)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    done = sum(1 for _, st in rows if st.state == "done")
    return f"experiment {exp.name}: {done}/{len(rows)} done\n" + "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.status", description=__doc__)
    ap.add_argument("experiment", help="experiment folder, e.g. experiments/table1")
    ap.add_argument("--work-dirs", help="root of the work dirs (default $AGVM_WORK_DIRS or ./work_dirs)")
    ap.add_argument("--root", help="repository root (default: the experiment folder's grand-parent)")
    args = ap.parse_args(argv)
    try:
        exp = load_experiment(args.experiment, root=args.root, check_configs=False)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(exp, status_rows(exp, work_dirs_root(exp.root, args.work_dirs))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
