"""The submitit job: one rank of one run (train -> on preemption checkpoint() -> requeue -> resume).

``Trainer(spec)()`` runs on every task of the job. It exports the torch.distributed environment with
submitit's ``helpers.TorchDistributedEnvironment`` (RANK, WORLD_SIZE, LOCAL_RANK from the task ids,
MASTER_ADDR = the first host of the node list, 127.0.0.1 on one node; MASTER_PORT derived from the job id so
every rank agrees), initialises the process group (NCCL on GPUs, gloo on CPU), checks that the total batch
divides over the ranks, and calls the run's entry point, by default
``agvm.mm.train:train(config, work_dir, cfg_options, resume, launcher)``, which trains, checkpoints atomically
and writes ``<work_dir>/metrics.json``. The job's end is recorded in ``<work_dir>/outcome.json``
(``{"status": "done" | "failed", "error": one line, "job_id", ...}``): the launcher and ``slurm.status`` read
that file, never submitit's result pickles.

On a time-out or preemption SLURM sends USR2; submitit calls ``Trainer.checkpoint()``, which returns a
``DelayedSubmission`` of the same run with ``resume=True``, and requeues the job. The requeued job's entry
point resumes from the last *complete* checkpoint in the work dir (checkpoints are written to a temporary
file and renamed, so a kill during a save leaves the previous one intact).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from agvm.cli import one_line
from agvm.fileio import write_json_atomic

__all__ = ["RunSpec", "Trainer", "DistInfo", "setup_distributed", "resolve_entry_point", "final_checkpoint",
           "METRICS_FILE", "OUTCOME_FILE"]

METRICS_FILE = "metrics.json"
OUTCOME_FILE = "outcome.json"


@dataclass(frozen=True)
class RunSpec:
    """Everything a job needs, resolved at submission time (absolute paths, picklable)."""

    experiment: str
    run: str
    entry_point: str
    config: str
    work_dir: str
    cfg_options: Dict[str, Any] = field(default_factory=dict)
    batch_size: Optional[int] = None
    batch_key: Optional[str] = "train_dataloader.batch_size"
    seed: int = 0
    seed_key: Optional[str] = "randomness.seed"
    # the previous stage: {"work_dir", "key" (cfg option), "file" (None: its final checkpoint), "handover"}
    init_from: Optional[Dict[str, Any]] = None
    resume: bool = True
    gpus_per_node: int = 0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: Optional[str]  # None: a single process, no process group
    master_addr: str
    master_port: int


def _job_env():
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (a direct call): one process
        return None


def setup_distributed(gpus_per_node: int = 0) -> DistInfo:
    """Export the torch.distributed env:// variables (submitit's ``TorchDistributedEnvironment``) and initialise
    the process group when there is more than one rank (NCCL when this job has GPUs, gloo otherwise)."""
    import torch
    import torch.distributed as dist
    from submitit.helpers import TorchDistributedEnvironment

    if _job_env() is None:  # a direct call: one process, nothing to export
        return DistInfo(0, 1, 0, None, "127.0.0.1", 0)
    env = TorchDistributedEnvironment()
    if env._job_env.num_nodes == 1:
        env.master_addr = "127.0.0.1"  # one node: no need for the host name to resolve
    env.export(set_cuda_visible_devices=False, overwrite=True)
    backend = None
    if env.world_size > 1:
        use_cuda = gpus_per_node > 0 and torch.cuda.is_available()
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)
    return DistInfo(env.rank, env.world_size, env.local_rank, backend, env.master_addr, env.master_port)


def resolve_entry_point(path: str) -> Callable[..., Any]:
    """``'package.module:function'`` or ``'path/to/file.py:function'`` -> the function."""
    if ":" not in path:
        raise ValueError(f"entry point {path!r} must look like 'package.module:function' or 'file.py:function'")
    module_name, func_name = path.rsplit(":", 1)
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise FileNotFoundError(f"entry point file {file} does not exist")
        spec = importlib.util.spec_from_file_location(f"_agvm_entry_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ImportError(f"cannot import the entry point module {module_name!r} ({err}); is the repository "
                              "root on PYTHONPATH and the environment set up (make setup)?") from err
    obj: Any = module
    for part in func_name.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"entry point {path!r}: {module_name} has no attribute {func_name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"entry point {path!r} is not callable")
    return obj


def final_checkpoint(work_dir: str | Path) -> Path:
    """The final checkpoint of a finished run: ``metrics.json['checkpoint']``, else the one mmengine's
    ``last_checkpoint`` file names (``mmengine.runner.find_latest_checkpoint``)."""
    from mmengine.runner import find_latest_checkpoint

    work_dir = Path(work_dir)
    metrics = work_dir / METRICS_FILE
    if metrics.is_file():
        ckpt = json.loads(metrics.read_text()).get("checkpoint")
        if ckpt and (work_dir / ckpt).is_file():
            return work_dir / ckpt
    last = find_latest_checkpoint(str(work_dir))
    if last:
        for p in (Path(last), work_dir / last, work_dir / Path(last).name):  # absolute, relative, work dir moved
            if p.is_file():
                return p
    raise FileNotFoundError(f"no checkpoint in {work_dir}: the previous stage has not finished (no metrics.json "
                            "with 'checkpoint', no last_checkpoint naming a file); run it first")


class Trainer:
    """A checkpointable submitit callable for one run (MAE / DeiT style: ``__call__`` + ``checkpoint``)."""

    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec

    def __repr__(self) -> str:
        return f"Trainer({self.spec.experiment}/{self.spec.run}, resume={self.spec.resume})"

    def cfg_options(self, world_size: int) -> Dict[str, Any]:
        """The run's cfg options plus the per-rank batch, the seed and the previous stage's checkpoint."""
        s = self.spec
        opts = dict(s.cfg_options)
        if s.batch_size is not None:
            if s.batch_size % world_size:
                raise ValueError(f"run {s.run}: total batch {s.batch_size} does not divide over {world_size} ranks; "
                                 "fix the experiment's resources (nodes x tasks_per_node)")
            if s.batch_key:
                opts[s.batch_key] = s.batch_size // world_size
        if s.seed_key:
            opts[s.seed_key] = s.seed
        if s.init_from is not None:
            opts[s.init_from["key"]] = str(self.init_checkpoint(convert=False))
        return opts

    def init_checkpoint(self, convert: bool = True) -> Path:
        """The previous stage's checkpoint this run starts from; with a ``handover`` it is converted
        (``models.handover.convert_file``, checked against this run's config) to ``<work_dir>/init.pth``."""
        init = self.spec.init_from
        dep_dir = Path(init["work_dir"])
        src = final_checkpoint(dep_dir) if init.get("file") is None else dep_dir / init["file"]
        if not src.is_file():
            raise FileNotFoundError(f"run {self.spec.run} starts from {src}, which the previous stage has not "
                                    "written: did it finish?")
        if not init.get("handover"):
            return src
        dst = Path(self.spec.work_dir) / "init.pth"
        if convert and (not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime):
            from models.handover import convert_file

            report = convert_file(init["handover"], str(src), str(dst), target_config=self.spec.config)
            print(f"[slurm.trainer] hand-over {init['handover']}: {src} -> {dst}\n{report.summary()}", flush=True)
        return dst

    def __call__(self) -> Dict[str, Any]:
        s = self.spec
        try:  # the environment shim (torchvision ops on CPU torch, checkpoint allow-lists) before any mm import
            import agvm._compat as compat

            compat.apply()
        except ImportError:
            pass
        info = setup_distributed(s.gpus_per_node)
        work_dir = Path(s.work_dir)
        try:
            if s.init_from is not None and s.init_from.get("handover"):
                if info.rank == 0:  # one rank converts (atomically: save_checkpoint), the others wait
                    work_dir.mkdir(parents=True, exist_ok=True)
                    self.init_checkpoint(convert=True)
                if info.world_size > 1:
                    import torch.distributed as dist

                    dist.barrier()
            opts = self.cfg_options(info.world_size)
            if info.rank == 0:
                work_dir.mkdir(parents=True, exist_ok=True)
                env = _job_env()
                with open(work_dir / "attempts.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.time(), "job_id": env.job_id if env else None,
                                        "host": socket.gethostname(), "world_size": info.world_size,
                                        "backend": info.backend, "resume": s.resume,
                                        "per_rank_batch": opts.get(s.batch_key) if s.batch_key else None}) + "\n")
            print(f"[slurm.trainer] {s.experiment}/{s.run}: rank {info.rank}/{info.world_size} "
                  f"backend={info.backend} master={info.master_addr}:{info.master_port} resume={s.resume}",
                  flush=True)
            fn = resolve_entry_point(s.entry_point)
            result = fn(s.config, str(work_dir), cfg_options=opts, resume=s.resume,
                        launcher="pytorch" if info.world_size > 1 else "none")
            if info.backend is not None:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.barrier()  # every rank done before any tears the process group down (gloo aborts else)
            if info.rank == 0 and not (work_dir / METRICS_FILE).is_file():
                raise RuntimeError(f"entry point {s.entry_point} returned without writing {work_dir / METRICS_FILE}")
            if info.rank == 0:
                self._record_outcome("done")
            return result
        except Exception as err:
            self._record_outcome("failed", f"rank {info.rank}: {one_line(err)}")
            raise
        finally:
            if info.backend is not None:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()

    def _record_outcome(self, status: str, error: Optional[str] = None) -> None:
        """``<work_dir>/outcome.json``: how this job ended (the launcher's own state; see the module docstring)."""
        env = _job_env()
        write_json_atomic(Path(self.spec.work_dir) / OUTCOME_FILE, {
            "status": status, "error": error, "job_id": env.job_id if env else None, "host": socket.gethostname(),
            "time": time.time()})

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption / time-out: requeue this run, resuming from its last checkpoint."""
        import submitit

        print(f"[slurm.trainer] {self.spec.experiment}/{self.spec.run}: preempted or timed out, requeueing "
              "with resume=True", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(dataclasses.replace(self.spec, resume=True)))
