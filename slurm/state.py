"""Where a run stands, read from its work dir: ``work_dirs/<experiment>/<run>/``.

A work dir holds ``run.json`` (the resolved run: config, cfg options, resources, paper id; written at
submission), ``job.json`` (the submitit job: cluster, job id, log paths), ``attempts.jsonl`` (one line per
start of the job, so requeues are visible), the entry point's logs and checkpoints, and ``metrics.json``
(the final metrics: the run is done).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .trainer import METRICS_FILE

__all__ = ["work_dirs_root", "run_dir", "read_json", "RunState", "run_state", "ACTIVE_SLURM_STATES"]

ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                       "REQUEUE_HOLD", "REQUEUE_FED"}


def work_dirs_root(root: Path, override: Optional[str] = None) -> Path:
    """``--work-dirs``, else $AGVM_WORK_DIRS, else ``<repository root>/work_dirs``."""
    base = override or os.environ.get("AGVM_WORK_DIRS") or str(root / "work_dirs")
    return Path(base).resolve()


def run_dir(work_dirs: Path, experiment: str, run: str) -> Path:
    return work_dirs / experiment / run


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a finished child that was not reaped is a zombie: not running
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _job_state(job: Dict[str, Any]) -> str:
    """The scheduler's view: a SLURM state (via sacct), or running / ended for local jobs."""
    cluster, job_id = job.get("cluster"), str(job.get("job_id", ""))
    if cluster == "slurm":
        if shutil.which("sacct") is None:
            return "SUBMITTED"
        try:
            import submitit

            return submitit.SlurmJob(folder=job["folder"], job_id=job_id).state
        except Exception:  # noqa: BLE001 - status must never fail on a scheduler hiccup
            return "UNKNOWN"
    if cluster == "local" and job_id.isdigit():
        return "RUNNING" if _pid_alive(int(job_id)) else "ENDED"
    return "ENDED"


_CKPT = re.compile(r"(epoch|iter)_(\d+)\.pth$")


def progress(work_dir: Path) -> Tuple[str, Optional[str]]:
    """(progress, last loss) from ``progress.json`` (any entry point may write one:
    ``{"iter", "max_iters"}`` or ``{"epoch", "max_epochs"}`` + ``"loss"``), else mmengine's
    ``vis_data/scalars.json``, else the newest checkpoint's name."""
    prog = read_json(work_dir / "progress.json")
    if prog:
        for unit in ("iter", "epoch"):
            if unit in prog:
                total = prog.get(f"max_{unit}s")
                text = f"{unit} {prog[unit]}" + (f"/{total}" if total else "")
                loss = prog.get("loss")
                return text, None if loss is None else f"loss {float(loss):.4g}"
    scalars = sorted(work_dir.glob("*/vis_data/scalars.json"), key=lambda p: p.stat().st_mtime)
    if scalars:
        last = None
        with open(scalars[-1]) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "loss" in row:
                    last = row
        if last is not None:
            step = last.get("iter", last.get("step"))
            return f"iter {step}", f"loss {float(last['loss']):.4g}"
    ckpts = [m for m in (_CKPT.search(p.name) for p in work_dir.glob("*.pth")) if m]
    if ckpts:
        unit, n = max(((m.group(1), int(m.group(2))) for m in ckpts), key=lambda x: x[1])
        return f"ckpt {unit} {n}", None
    return "-", None


@dataclass
class RunState:
    state: str  # done, running, queued, failed, stopped, not submitted, ...
    progress: str
    last: Optional[str]
    metrics: Optional[Dict[str, Any]]
    job: Optional[Dict[str, Any]]
    attempts: int


def _attempts(work_dir: Path) -> int:
    try:
        return sum(1 for _ in open(work_dir / "attempts.jsonl"))
    except OSError:
        return 0


def _error_of(job: Dict[str, Any]) -> Optional[str]:
    """submitit's result pickle says whether the job raised (local / slurm)."""
    folder, job_id = job.get("folder"), job.get("job_id")
    if not folder or not job_id:
        return None
    import pickle

    for p in Path(folder).glob(f"{job_id}_*result.pkl"):
        try:
            with open(p, "rb") as f:
                outcome, value = pickle.load(f)
        except Exception:  # noqa: BLE001
            continue
        if outcome == "error":
            return str(value).strip().splitlines()[-1][:200]
    return None


def run_state(work_dir: Path) -> RunState:
    metrics = read_json(work_dir / METRICS_FILE)
    job = read_json(work_dir / "job.json")
    prog, last = progress(work_dir) if work_dir.is_dir() else ("-", None)
    attempts = _attempts(work_dir)
    if metrics is not None:
        return RunState("done", "finished", last, metrics, job, attempts)
    if job is None:
        state = "stopped" if prog != "-" else "not submitted"
        return RunState(state, prog, last, None, None, attempts)
    sched = _job_state(job)
    if sched.upper() in ACTIVE_SLURM_STATES:
        state = "queued" if sched.upper() == "PENDING" and attempts == 0 else sched.lower()
    elif sched == "SUBMITTED":
        state = "submitted" if attempts == 0 else "started"
    else:
        err = _error_of(job)
        state = f"failed: {err}" if err else ("failed" if sched not in ("ENDED", "COMPLETED") else "ended without metrics")
    return RunState(state, prog, last, None, job, attempts)
