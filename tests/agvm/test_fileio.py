"""agvm.fileio: the one atomic JSON writer and the one-run-per-work-dir lock."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agvm.fileio import LOCK_FILE, WorkDirBusy, WorkDirLock, main_rank_lock, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_write_json_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"b": 1, "a": float("nan")})
    assert path.read_text() == '{\n "a": NaN,\n "b": 1\n}\n'
    write_json_atomic(path, {"c": [1, 2]}, indent=None)
    assert json.loads(path.read_text()) == {"c": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):  # fails while writing the temporary file
        write_text_atomic(path, 42)
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def _holder(work_dir: Path) -> subprocess.Popen:
    """A process that takes the lock and sleeps; returns once it holds it."""
    code = ("import sys, time; from agvm.fileio import WorkDirLock; "
            f"WorkDirLock({str(work_dir)!r}, 'holder-test').acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkDirBusy) as err:
            WorkDirLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {proc.pid} on host " in msg and "started 20" in msg and "holder-test" in msg
        assert "\n" not in msg and "another work dir" in msg
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no clean-up code runs
        proc.wait()
    with WorkDirLock(tmp_path, "after") as lock:  # the OS dropped the dead process's lock
        assert lock.holder()["pid"] == os.getpid() and lock.holder()["what"] == "after"
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: nobody recorded


def test_lock_is_exclusive_within_one_process_and_released_on_exit(tmp_path):
    with WorkDirLock(tmp_path):
        with pytest.raises(WorkDirBusy, match=f"pid {os.getpid()}"):
            WorkDirLock(tmp_path).acquire()
    with WorkDirLock(tmp_path):  # free again
        pass


def test_only_the_main_rank_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with main_rank_lock(tmp_path):
        assert not (tmp_path / LOCK_FILE).exists()
    monkeypatch.setenv("RANK", "0")
    with main_rank_lock(tmp_path):
        with pytest.raises(WorkDirBusy):
            WorkDirLock(tmp_path).acquire()
