"""The launcher's own JSON state (no submitit result pickle is ever read), diverged runs in status and submit,
one submit per experiment, never a second job for a pending / running run, submitit's TorchDistributedEnvironment."""
from __future__ import annotations

import json
import os
import pickle
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agvm.cli import run as run_cli
from agvm.fileio import WorkDirLock
from slurm.experiment import load_experiment
from slurm.state import run_state
from slurm.status import format_table, status_rows
from slurm.submit import main as submit_main
from slurm.submit import submit_experiment
from slurm.trainer import setup_distributed

from test_slurm_launch import CHAIN, toy_experiment

ONE = """
- name: toy_mlp_bs8_agvm_sgd
  config: configs/toy/toy_mlp_bs8_agvm_sgd.py
  paper: table1/faster_rcnn/bs512/agvm_sgd
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    monkeypatch.delenv("AGVM_WORK_DIRS", raising=False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


class _Planted:
    """A result pickle whose unpickling would create a file (stands for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _job(wd: Path, job_id: str, cluster: str = "local", host: str | None = None) -> None:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "job.json").write_text(json.dumps({"cluster": cluster, "job_id": job_id, "host": host or socket.gethostname(),
                                             "folder": str(wd.parent / ".submitit" / job_id)}))


def test_status_reads_outcome_json_and_never_unpickles_submitits_results(tmp_path):
    exp = load_experiment(toy_experiment(tmp_path, ONE))
    wd = tmp_path / "work_dirs" / "toy" / "toy_mlp_bs8_agvm_sgd"
    dead = subprocess.Popen(["true"])
    dead.wait()
    job_id = str(dead.pid)  # no such process: the local job has ended
    _job(wd, job_id)
    marker = tmp_path / "code_ran"
    folder = tmp_path / "work_dirs" / "toy" / ".submitit" / job_id
    folder.mkdir(parents=True)
    for name in (f"{job_id}_0_result.pkl", f"{job_id}_result.pkl"):
        (folder / name).write_bytes(pickle.dumps(("error", _Planted(marker))))
    assert run_state(wd).state == "ended without metrics"
    (wd / "outcome.json").write_text(json.dumps({"status": "failed", "error": "rank 0: an older job", "job_id": "1"}))
    assert run_state(wd).state == "ended without metrics"  # another job's outcome is not this job's
    (wd / "outcome.json").write_text(json.dumps({"status": "failed", "error": "rank 0: boom", "job_id": job_id}))
    table = format_table(exp, status_rows(exp, tmp_path / "work_dirs"))
    assert "failed: rank 0: boom" in table
    assert submit_experiment(exp, cluster="debug", only=["toy_mlp_bs8_agvm_sgd"]) == {"toy_mlp_bs8_agvm_sgd": "done"}
    assert not marker.exists()


def test_diverged_run_in_status_and_not_resubmitted(tmp_path, capsys):
    exp = load_experiment(toy_experiment(tmp_path, ONE))
    wd = tmp_path / "work_dirs" / "toy" / "toy_mlp_bs8_agvm_sgd"
    wd.mkdir(parents=True)
    (wd / "metrics.json").write_text(json.dumps({"status": "diverged", "iter": 7, "epoch": 0,
                                                 "reason": "the loss non-finite in 3 consecutive iteration(s)"}))
    st = run_state(wd)
    assert st.state == "diverged at iter 7" and st.finished and not st.active
    table = format_table(exp, status_rows(exp, tmp_path / "work_dirs"))
    assert "0/1 done, 1 diverged" in table and "diverged at iter 7" in table and "the loss non-finite" in table
    out = submit_experiment(exp, cluster="debug")
    assert out == {"toy_mlp_bs8_agvm_sgd": "skipped: finished, diverged at iter 7 (metrics.json present; "
                                           "--force to re-run)"}


def test_a_running_local_job_is_never_started_again_even_with_force(tmp_path):
    exp = load_experiment(toy_experiment(tmp_path, ONE))
    wd = tmp_path / "work_dirs" / "toy" / "toy_mlp_bs8_agvm_sgd"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _job(wd, str(sleeper.pid))
        assert run_state(wd).active and run_state(wd).state == "running"
        for force in (False, True):
            out = submit_experiment(exp, cluster="local", force=force)["toy_mlp_bs8_agvm_sgd"]
            assert out.startswith(f"skipped: already running as local job {sleeper.pid}")
        assert not (wd / "attempts.jsonl").exists() and not (wd / "metrics.json").exists()
        _job(wd, str(sleeper.pid), host="elsewhere.invalid")  # a pid of another machine means nothing here
        assert run_state(wd).state == "unknown (job %d on elsewhere.invalid)" % sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_second_submit_of_the_experiment_is_refused_naming_the_first(tmp_path, capsys):
    folder = toy_experiment(tmp_path, CHAIN)
    with WorkDirLock(tmp_path / "work_dirs" / "toy", what="slurm.submit"):
        assert run_cli(submit_main, [str(folder), "--cluster", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: work dir ") and f"pid {os.getpid()} on host" in err[0]
    assert not (tmp_path / "work_dirs" / "toy" / "toy_mlp_bs8_agvm_sgd" / "attempts.jsonl").exists()


def test_distributed_environment_from_submitits_helper(monkeypatch):
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RANK", "7")  # a stale value from an outer job is overwritten
    info = setup_distributed(0)
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.master_addr == "127.0.0.1" and info.master_port == random.Random("4242").randint(20000, 60000)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("0", "1", str(info.master_port))


@pytest.mark.slow
def test_local_submit_twice_runs_the_experiment_once(tmp_path, capsys):
    """`slurm.submit --cluster local` while another is running it: refused with one line; afterwards: skipped."""
    folder = toy_experiment(tmp_path, ONE, config="iters = 12\nckpt_interval = 4\nsleep = 0.5\n")
    first = {}
    thread = threading.Thread(target=lambda: first.update(rc=submit_main([str(folder), "--cluster", "local"])))
    thread.start()
    wd = tmp_path / "work_dirs" / "toy" / "toy_mlp_bs8_agvm_sgd"
    deadline = time.time() + 60
    while not (wd / "job.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert run_cli(submit_main, [str(folder), "--cluster", "local"]) == 2
    assert "in use by another run" in capsys.readouterr().err
    thread.join(timeout=180)
    assert first == {"rc": 0}
    assert run_cli(submit_main, [str(folder), "--cluster", "local"]) == 0
    assert "skipped: finished, done" in capsys.readouterr().out
    assert len((wd / "attempts.jsonl").read_text().splitlines()) == 1
