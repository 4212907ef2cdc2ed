"""Files a run shares with other processes: atomic writes and the one-run-per-work-dir lock.

Standard library only, so ``agvm``, ``agvm.mm``, ``models``, ``slurm`` and ``results`` all use this one copy.

- ``write_text_atomic`` / ``write_json_atomic``: a temporary file in the same folder, flushed to disk, then
  ``os.replace``: a reader sees the old file or the new one, never half of one.
- ``WorkDirLock``: an exclusive ``fcntl.flock`` on ``<work_dir>/.agvm.lock`` held for the life of a run; the
  operating system drops it when the process ends, however it ends. A second run gets ``WorkDirBusy``, whose
  message names the holder (host, pid, start time, command) and what to do.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["write_text_atomic", "write_json_atomic", "WorkDirLock", "WorkDirBusy", "main_rank_lock", "LOCK_FILE"]

LOCK_FILE = ".agvm.lock"
PathLike = Union[str, "os.PathLike[str]"]


def write_text_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: PathLike, obj: Any, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON (sorted keys, a final newline) through ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


class WorkDirBusy(RuntimeError):
    """Another live process holds the work dir's lock."""


class WorkDirLock:
    """``with WorkDirLock(work_dir, what="training"):`` -- see the module docstring."""

    def __init__(self, work_dir: PathLike, what: str = "run") -> None:
        self.work_dir = Path(work_dir)
        self.path = self.work_dir / LOCK_FILE
        self.what = what
        self._fd: Optional[int] = None

    def holder(self) -> dict:
        """What the current holder wrote into the lock file ({} when nothing is recorded)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WorkDirLock":
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            who = "a process that has not recorded itself yet"
            if h:
                who = f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
                who += f" ({h.get('what', 'run')}: {h['command']})" if h.get("command") else ""
            raise WorkDirBusy(f"work dir {self.work_dir} is in use by another run: {who}; wait for it to end, stop "
                              "it, or give this run another work dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv else "",
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays (unlinking it would race with a waiting process)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "WorkDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def main_rank_lock(work_dir: PathLike, what: str = "run"):
    """``WorkDirLock`` on the main rank (``RANK`` / ``SLURM_PROCID`` 0 or unset); nothing on the other ranks,
    which belong to the main rank's run."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return WorkDirLock(work_dir, what) if rank == "0" else contextlib.nullcontext()
