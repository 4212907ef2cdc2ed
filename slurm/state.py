"""Where a run stands, read from its work dir: ``work_dirs/<experiment>/<run>/``.

A work dir holds ``run.json`` (the resolved run: config, cfg options, resources, paper id; written at
submission), ``job.json`` (the submitit job: cluster, job id, host, log paths), ``attempts.jsonl`` (one line per
start of the job, so requeues are visible), ``outcome.json`` (how the job ended: done, or failed with a
one-line error), the entry point's logs and checkpoints, and ``metrics.json`` (the final metrics: the run is
done; ``"status": "diverged"``: it stopped on a NaN / Inf loss). Only these JSON files are read: never
submitit's result pickles, whose unpickling could run code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .trainer import METRICS_FILE, OUTCOME_FILE

__all__ = ["work_dirs_root", "run_dir", "read_json", "RunState", "run_state", "job_error", "ACTIVE_SLURM_STATES"]

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
        if job.get("host", socket.gethostname()) != socket.gethostname():
            return "UNKNOWN"  # a process on another machine: its pid means nothing here
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
    state: str  # done, diverged at iter N, running, queued, failed: ..., stopped, not submitted, ...
    progress: str
    last: Optional[str]
    metrics: Optional[Dict[str, Any]]
    job: Optional[Dict[str, Any]]
    attempts: int
    active: bool = False  # its job is pending or running: do not submit it again

    @property
    def finished(self) -> bool:
        """metrics.json is there: the run ended (done or diverged)."""
        return self.metrics is not None


def _attempts(work_dir: Path) -> int:
    try:
        return sum(1 for _ in open(work_dir / "attempts.jsonl"))
    except OSError:
        return 0


def job_error(work_dir: Path, job: Dict[str, Any]) -> Optional[str]:
    """The one-line error the job recorded in outcome.json (only this job's, not an earlier job's)."""
    outcome = read_json(Path(work_dir) / OUTCOME_FILE)
    if outcome and outcome.get("status") == "failed" and str(outcome.get("job_id")) == str(job.get("job_id")):
        return str(outcome.get("error") or "no message")[:300]
    return None


def run_state(work_dir: Path) -> RunState:
    metrics = read_json(work_dir / METRICS_FILE)
    job = read_json(work_dir / "job.json")
    prog, last = progress(work_dir) if work_dir.is_dir() else ("-", None)
    attempts = _attempts(work_dir)
    if metrics is not None:
        if metrics.get("status") == "diverged":
            return RunState(f"diverged at iter {metrics.get('iter', '?')}", prog, metrics.get("reason"), metrics,
                            job, attempts)
        return RunState("done", "finished", last, metrics, job, attempts)
    if job is None:
        state = "stopped" if prog != "-" else "not submitted"
        return RunState(state, prog, last, None, None, attempts)
    sched = _job_state(job)
    active = sched.upper() in ACTIVE_SLURM_STATES or sched == "SUBMITTED"
    if sched.upper() in ACTIVE_SLURM_STATES:
        state = "queued" if sched.upper() == "PENDING" and attempts == 0 else sched.lower()
    elif sched == "SUBMITTED":
        state = "submitted" if attempts == 0 else "started"
    elif sched == "UNKNOWN":
        state = f"unknown (job {job.get('job_id')} on {job.get('host', 'an unknown host')})"
    else:
        err = job_error(work_dir, job)
        state = f"failed: {err}" if err else ("failed" if sched not in ("ENDED", "COMPLETED") else "ended without metrics")
    return RunState(state, prog, last, None, job, attempts, active)
