"""Submit an experiment folder: ``python -m slurm.submit experiments/<name> [options]``.

Each run becomes one submitit job (one task per rank; see ``slurm.trainer``):

- ``--cluster slurm`` (default): runs with the same resources and the same dependencies go out as one job
  array; stage chains get ``--dependency=afterok:<job ids>``; the command returns once everything is queued.
- ``--cluster local``: submitit's local executor (one node, one subprocess per rank), run by run in
  dependency order, waiting for each; ``--cluster debug``: in this process, one rank (for pdb).

A run whose ``metrics.json`` exists is finished (done or diverged) and is skipped, unless ``--force`` (its old
work dir is kept, renamed ``<run>.old-<time>``). A run whose job is pending or running (on SLURM, or a local job
of this machine) is never submitted again, ``--force`` or not: cancel the job first. One ``slurm.submit`` at a
time per experiment: it holds the lock of ``<work dirs>/<experiment>/`` while it submits (and, for local and
debug runs, while they run), so a second one stops with a message naming the first.
``--dry-run`` prints the plan (resources, per-rank batch, dependencies, paper ids) and submits nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agvm.cli import one_line
from agvm.fileio import WorkDirLock, write_json_atomic

from .experiment import Experiment, ExperimentError, Run, load_experiment
from .state import job_error, read_json, run_dir, run_state, work_dirs_root
from .trainer import METRICS_FILE, RunSpec, Trainer

__all__ = ["main", "plan", "select_runs", "make_spec", "executor_parameters", "submit_experiment"]


def select_runs(exp: Experiment, only: Optional[Sequence[str]]) -> List[Run]:
    """The runs named by ``--only`` (names or shell patterns, comma-separated or repeated), in order."""
    if not only:
        return exp.order()
    patterns = [p for item in only for p in item.split(",") if p]
    names = [n for n in exp.runs if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in exp.runs)]
    if unmatched:
        raise ExperimentError(f"--only {unmatched}: no such run in {exp.name}; runs: {', '.join(exp.runs)}")
    return exp.order(names)


def make_spec(exp: Experiment, run: Run, work_dirs: Path) -> RunSpec:
    init = None
    if run.init_from is not None:
        i = run.init_from
        init = {"work_dir": str(run_dir(work_dirs, exp.name, i.run)), "key": i.key, "file": i.file,
                "handover": i.handover}
    entry = run.entry_point
    if entry.rsplit(":", 1)[0].endswith(".py"):  # a file entry point: absolute, so jobs find it from any cwd
        file, func = entry.rsplit(":", 1)
        entry = f"{(exp.root / file).resolve()}:{func}"
    return RunSpec(experiment=exp.name, run=run.name, entry_point=entry, config=str(exp.config_path(run)),
                   work_dir=str(run_dir(work_dirs, exp.name, run.name)), cfg_options=dict(run.cfg_options),
                   batch_size=run.batch_size, batch_key=run.batch_key, seed=run.seed, seed_key=run.seed_key,
                   init_from=init, resume=True, gpus_per_node=run.resources.gpus_per_node)


def executor_parameters(exp: Experiment, run: Run, cluster: str, partition: Optional[str] = None,
                        account: Optional[str] = None, dependency: Optional[str] = None,
                        setup: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """submitit AutoExecutor parameters for a run (generic ones, plus ``slurm_*`` for SLURM)."""
    r = run.resources
    if cluster == "local" and r.nodes > 1:
        raise ExperimentError(f"run {run.name} needs {r.nodes} nodes; --cluster local runs on one node only "
                              "(use --cluster slurm, or a single-node experiment)")
    if cluster == "debug" and r.world_size > 1:
        raise ExperimentError(f"run {run.name} has {r.world_size} ranks; --cluster debug runs one process in "
                              "this interpreter (use --cluster local for several ranks on one machine)")
    params: Dict[str, Any] = dict(name=f"{exp.name}.{run.name}", timeout_min=r.time_min, nodes=r.nodes,
                                  tasks_per_node=r.tasks_per_node, cpus_per_task=r.cpus_per_task)
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb is not None:
        params["mem_gb"] = r.mem_gb
    if cluster == "slurm":
        params["slurm_signal_delay_s"] = 180  # USR2 three minutes before the time limit: time to stop cleanly
        params["slurm_max_num_timeout"] = r.requeues
        if partition:
            params["slurm_partition"] = partition
        if account:
            params["slurm_account"] = account
        if setup:
            params["slurm_setup"] = list(setup)
        extra = dict(r.slurm)
        if dependency:
            extra["dependency"] = dependency
        if extra:
            params["slurm_additional_parameters"] = extra
    return params


def _group_key(params: Dict[str, Any]) -> Tuple:
    p = {k: v for k, v in params.items() if k != "name"}
    return tuple(sorted((k, repr(v)) for k, v in p.items()))


def plan(exp: Experiment, runs: Sequence[Run], work_dirs: Path) -> str:
    """A readable table of what would be submitted."""
    rows = [("run", "config", "batch", "ranks", "GPUs", "batch/rank", "time", "after", "paper id")]
    for run in runs:
        r = run.resources
        rows.append((run.name, run.config, str(run.batch_size or "-"),
                     f"{r.nodes}x{r.tasks_per_node}", str(r.gpus), str(run.per_rank_batch or "-"),
                     f"{r.time_min // 60}h{r.time_min % 60:02d}", ",".join(run.depends_on) or "-", run.paper or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return f"experiment {exp.name}: {len(runs)} run(s), work dirs under {work_dirs / exp.name}\n" + "\n".join(lines)


def _archive(work_dir: Path) -> Path:
    dest = work_dir.with_name(f"{work_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(work_dir, dest)
    return dest


def _record(run_work_dir: Path, exp: Experiment, run: Run, spec: RunSpec, job: Any, cluster: str,
            folder: Path) -> None:
    run_work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_work_dir / "job.json", {
        "cluster": cluster, "job_id": str(job.job_id), "folder": str(job.paths.folder), "submitted": time.time(),
        "host": socket.gethostname(), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)})


def _write_run_json(run_work_dir: Path, exp: Experiment, run: Run, spec: RunSpec) -> None:
    run_work_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_work_dir / "run.json", {
        "experiment": exp.name, "run": run.name, "config": run.config, "spec": dataclasses.asdict(spec),
        "resources": dataclasses.asdict(run.resources), "depends_on": list(run.depends_on),
        "paper": run.paper, "metric": run.metric})


def submit_experiment(exp: Experiment, cluster: str = "slurm", only: Optional[Sequence[str]] = None,
                      partition: Optional[str] = None, account: Optional[str] = None, dry_run: bool = False,
                      force: bool = False, work_dirs: Optional[Path] = None, setup: Optional[Sequence[str]] = None,
                      log=print) -> Dict[str, str]:
    """Submit (or, for local/debug, run) the selected runs. Returns {run: job id, 'skipped: ...' or error}."""
    import submitit

    work_dirs = work_dirs or work_dirs_root(exp.root)
    runs = select_runs(exp, only)
    selected = {r.name for r in runs}
    for run in runs:  # refuse up front what a cluster cannot run
        executor_parameters(exp, run, cluster, partition, account)
    log(plan(exp, runs, work_dirs))
    if dry_run:
        log("dry run: nothing submitted")
        return {}
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ExperimentError("no SLURM on this machine (sbatch / srun not on PATH): submit from a SLURM login node, "
                              "or run here with --cluster local (subprocesses) or --cluster debug (in this process)")
    # jobs see the repository (the Trainer is unpickled by import) and the same python environment
    os.environ["PYTHONPATH"] = os.pathsep.join([str(exp.root)] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p and Path(p).resolve() != exp.root.resolve()])
    with WorkDirLock(work_dirs / exp.name, what="slurm.submit"):
        return _submit_runs(submitit, exp, runs, selected, cluster, partition, account, force, work_dirs, setup, log)


def _submit_runs(submitit, exp, runs, selected, cluster, partition, account, force, work_dirs, setup,
                 log) -> Dict[str, str]:
    folder = work_dirs / exp.name / ".submitit"
    outcome: Dict[str, str] = {}
    job_ids: Dict[str, str] = {}  # run -> job id (slurm) for afterok
    pending: List[Tuple[Run, RunSpec]] = []

    for run in runs:
        wd = run_dir(work_dirs, exp.name, run.name)
        st = run_state(wd)
        if st.active:  # never twice, --force or not
            outcome[run.name] = (f"skipped: already {st.state} as {st.job.get('cluster')} job {st.job.get('job_id')}"
                                 + (" (scancel it first to re-run)" if force else ""))
            log(f"{run.name}: {outcome[run.name]}")
            if st.job.get("cluster") == "slurm":
                job_ids[run.name] = str(st.job.get("job_id"))
            continue
        if st.finished:
            if not force:
                outcome[run.name] = f"skipped: finished, {st.state} (metrics.json present; --force to re-run)"
                log(f"{run.name}: {outcome[run.name]}")
                continue
            log(f"{run.name}: --force: old work dir kept as {_archive(wd)}")
        for d in run.depends_on:
            if d not in job_ids and d not in selected and run_state(run_dir(work_dirs, exp.name, d)).state != "done":
                raise ExperimentError(f"run {run.name} depends on {d}, which is neither finished nor selected nor "
                                      f"queued; add it: --only {d},{run.name}")
        spec = make_spec(exp, run, work_dirs)
        _write_run_json(wd, exp, run, spec)
        if cluster == "slurm":
            pending.append((run, spec))
        else:
            failed_dep = [d for d in run.depends_on if outcome.get(d, "").startswith("failed")]
            if failed_dep:
                outcome[run.name] = f"failed: not started, its dependency {failed_dep[0]} failed"
                log(f"{run.name}: {outcome[run.name]}")
                continue
            outcome[run.name] = _run_here(submitit, exp, run, spec, cluster, folder, wd, log)
    if cluster == "slurm":
        _submit_slurm_waves(submitit, exp, pending, job_ids, folder, partition, account, work_dirs, outcome, log,
                            setup)
    return outcome


def _submit_slurm_waves(submitit, exp, pending, job_ids, folder, partition, account, work_dirs, outcome,
                        log, setup=None) -> None:
    """Submit in waves: each wave takes the pending runs whose dependencies are finished or have job ids,
    and sends runs with equal resources and equal dependencies out as one job array."""
    while pending:
        ready, waiting = [], []
        for item in pending:
            run = item[0]
            if all(d in job_ids or run_state(run_dir(work_dirs, exp.name, d)).state == "done"
                   for d in run.depends_on):
                ready.append(item)
            else:
                waiting.append(item)
        if not ready:
            raise ExperimentError(f"cannot submit {[i[0].name for i in waiting]}: dependencies never submitted")
        groups: Dict[Tuple, List] = {}
        for run, spec in ready:
            dep_ids = [job_ids[d] for d in run.depends_on if d in job_ids]
            dependency = "afterok:" + ":".join(dep_ids) if dep_ids else None
            params = executor_parameters(exp, run, "slurm", partition, account, dependency, setup)
            groups.setdefault(_group_key(params), []).append((run, spec, params))
        for items in groups.values():
            params = dict(items[0][2])
            ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                       slurm_max_num_timeout=params.pop("slurm_max_num_timeout"))
            if len(items) > 1:
                params["name"] = f"{exp.name}.array"
            ex.update_parameters(**params)
            jobs = ex.submit_array([Trainer(spec) for _, spec, _ in items])
            for (run, spec, _), job in zip(items, jobs):
                job_ids[run.name] = str(job.job_id)
                _record(Path(spec.work_dir), exp, run, spec, job, "slurm", folder)
                outcome[run.name] = str(job.job_id)
                dep = params.get("slurm_additional_parameters", {}).get("dependency")
                log(f"{run.name}: submitted as SLURM job {job.job_id}" + (f" ({dep})" if dep else ""))
        pending[:] = waiting


def _run_here(submitit, exp: Experiment, run: Run, spec: RunSpec, cluster: str, folder: Path, wd: Path,
              log) -> str:
    """Run one job on this machine (local: subprocesses, one per rank; debug: in this process) and wait."""
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    ex.update_parameters(**executor_parameters(exp, run, cluster))
    t0 = time.time()
    job = ex.submit(Trainer(spec))
    _record(wd, exp, run, spec, job, cluster, folder)
    log(f"{run.name}: running as {cluster} job {job.job_id} ({run.resources.world_size} rank(s)); "
        f"logs: {job.paths.stdout}")
    fallback = None  # the error when the job recorded none
    if cluster == "debug":  # runs here, now; the error is read back from outcome.json like a local job's
        import pdb
        from unittest import mock

        try:  # submitit's debug jobs open pdb on an exception; only with a terminal
            with mock.patch.object(pdb, "post_mortem", pdb.post_mortem if sys.stdin.isatty() else lambda *a: None):
                job.results()
        except Exception as err:  # noqa: BLE001 - reported below, from outcome.json
            fallback = one_line(err)
    else:
        job.wait()  # the subprocess's state only: submitit's result pickle is never read
    metrics = read_json(wd / METRICS_FILE)
    if metrics is not None and metrics.get("status") == "diverged":
        msg = f"diverged at iter {metrics.get('iter', '?')}: {metrics.get('reason')}"
    elif metrics is not None:
        log(f"{run.name}: done in {time.time() - t0:.1f} s -> {wd / METRICS_FILE}")
        return "done"
    else:
        msg = job_error(wd, {"job_id": str(job.job_id)}) or fallback or \
            f"the job ended without writing {METRICS_FILE} or an error"
    log(f"{run.name}: FAILED after {time.time() - t0:.1f} s: {msg} (logs: {job.paths.stderr})")
    return f"failed: {msg}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="experiment folder, e.g. experiments/table1")
    ap.add_argument("--cluster", choices=("slurm", "local", "debug"), default="slurm")
    ap.add_argument("--partition", help="SLURM partition (yours; not written in the experiment)")
    ap.add_argument("--account", help="SLURM account")
    ap.add_argument("--setup", action="append", metavar="CMD",
                    help="shell line run in the sbatch script before the job (repeat), e.g. 'module load cuda'")
    ap.add_argument("--only", action="append", metavar="RUN", help="run name or pattern (repeat or comma-separate)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    ap.add_argument("--force", action="store_true", help="re-run finished runs (old work dir kept)")
    ap.add_argument("--work-dirs", help="root of the work dirs (default $AGVM_WORK_DIRS or ./work_dirs)")
    ap.add_argument("--root", help="repository root the config paths are relative to (default: the experiment "
                                   "folder's grand-parent)")
    args = ap.parse_args(argv)
    exp = load_experiment(args.experiment, root=args.root)  # errors: one line through agvm.cli.run
    outcome = submit_experiment(exp, cluster=args.cluster, only=args.only, partition=args.partition,
                                account=args.account, dry_run=args.dry_run, force=args.force,
                                work_dirs=work_dirs_root(exp.root, args.work_dirs), setup=args.setup)
    return 1 if any(v.startswith("failed") for v in outcome.values()) else 0


if __name__ == "__main__":
    import agvm.cli

    sys.exit(agvm.cli.run(main))
