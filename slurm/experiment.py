"""Experiment folders: one ``experiments/<name>/experiment.yaml`` per reproduced table or figure.

The file lists the runs of the experiment (config x batch size x optimizer x seed, written once as a
``matrix`` and expanded), the resources of each run, the stage chain (``depends_on`` / ``init_from``:
pre-train -> Objects365 -> COCO) and the paper number each run is compared with (an id into
``results/paper/numbers.yaml``). ``load_experiment`` expands and validates everything up front, so a bad
file fails at ``--dry-run`` time with a message naming the file, the run and what to change, never on a
cluster node hours later.

Schema (every key but ``runs`` optional; ``defaults`` apply to every run and are deep-merged)::

    description: "Appendix Table 1: ..."
    defaults:
      entry_point: agvm.mm.train:train        # module:function with the agvm.mm.train.train signature
      resources: {gpus_per_node: 8, images_per_gpu: 2, cpus_per_task: 10, mem_gb: 400, time: "24:00:00"}
      metric: box_ap                           # paper metric compared with (box_ap, mask_ap, pq, miou)
    runs:
      - name: "{pipeline}_bs{batch}_{optimizer}"
        matrix:                                # the product of the lists; a mapping entry sets several keys
          pipeline: [faster_rcnn]
          batch: [{batch: 32, time: "12:00:00"}, {batch: 512, time: "2:00:00"}]
          optimizer: [sgd, agvm_sgd]
        config: "configs/{pipeline}/{pipeline}_r50_bs{batch}_{optimizer}.py"
        batch_size: "{batch}"                  # the total batch, split over the ranks
        paper: "table1/{pipeline}/bs{batch}/{optimizer}"
        cfg_options: {"train_cfg.max_epochs": 12}
        depends_on: [other_run]                # afterok on SLURM; run in order locally
        init_from: {run: other_run, key: load_from}   # the previous stage's final checkpoint -> cfg key
                                               # (file: NAME takes that file of its work dir instead;
                                               #  handover: o365-to-coco converts it with models.handover)

Resources: ``nodes`` (or ``images_per_gpu``, from which nodes = batch / (images_per_gpu x tasks_per_node)),
``gpus_per_node`` (0 = CPU), ``tasks_per_node`` (default: one per GPU, 1 on CPU), ``cpus_per_task``,
``mem_gb``, ``time`` ("HH:MM:SS", "D-HH:MM:SS" or minutes), ``requeues`` (time-outs that still requeue
the job, default 10; preemptions always requeue), ``slurm`` (extra sbatch options such as
``{constraint: a100, qos: high}``). Partition and account are left to the user (command line).

Top-level ``x-<name>`` keys are ignored: they hold YAML anchors (``&no_fpn``) that runs reuse (``*no_fpn``).
"""
from __future__ import annotations

import copy
import math
import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

__all__ = ["ExperimentError", "Resources", "Run", "Experiment", "load_experiment", "parse_time",
           "EXPERIMENT_FILE", "DEFAULT_ENTRY_POINT", "PAPER_METRICS"]

EXPERIMENT_FILE = "experiment.yaml"
DEFAULT_ENTRY_POINT = "agvm.mm.train:train"
PAPER_METRICS = ("box_ap", "mask_ap", "pq", "miou")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_BS_RE = re.compile(r"_bs(\d+)(?:k)?_")

_RUN_KEYS = {"name", "matrix", "config", "batch_size", "seed", "entry_point", "cfg_options", "resources",
             "depends_on", "init_from", "paper", "metric", "batch_key", "seed_key", "description"}
_RESOURCE_KEYS = {"nodes", "gpus_per_node", "tasks_per_node", "images_per_gpu", "cpus_per_task", "mem_gb",
                  "time", "requeues", "slurm"}


class ExperimentError(ValueError):
    """An experiment file that cannot be run; the message says where and what to change."""


@dataclass(frozen=True)
class Resources:
    """What one run asks the scheduler for; world size = nodes x tasks_per_node (one rank per task)."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    time_min: int = 60
    requeues: int = 10  # time-outs after which the job is still requeued (preemptions do not count)
    slurm: Tuple[Tuple[str, Any], ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class InitFrom:
    """Initialise a stage from the final checkpoint of ``run`` (or from ``file`` in its work dir, e.g. an
    exported backbone), passed as cfg option ``key``."""

    run: str
    key: str = "load_from"
    file: Optional[str] = None
    handover: Optional[str] = None  # models.handover kind ('pretrain-to-det', 'o365-to-coco') applied first


@dataclass
class Run:
    """One training run of an experiment (one submitit job)."""

    name: str
    config: str  # relative to the repository root, as written in the file
    batch_size: Optional[int]
    seed: int
    entry_point: str  # 'module:function' or 'file.py:function' (relative to the root)
    cfg_options: Dict[str, Any]
    resources: Resources
    depends_on: Tuple[str, ...] = ()
    init_from: Optional[InitFrom] = None
    paper: Optional[str] = None
    metric: Optional[str] = None
    batch_key: Optional[str] = "train_dataloader.batch_size"
    seed_key: Optional[str] = "randomness.seed"
    description: str = ""

    @property
    def per_rank_batch(self) -> Optional[int]:
        if self.batch_size is None:
            return None
        return self.batch_size // self.resources.world_size


@dataclass
class Experiment:
    name: str
    folder: Path
    root: Path
    description: str
    runs: Dict[str, Run] = field(default_factory=dict)

    def order(self, names: Optional[Sequence[str]] = None) -> List[Run]:
        """Runs in an order where every run comes after the runs it depends on."""
        names = list(self.runs) if names is None else list(names)
        done: List[str] = []

        def visit(n: str) -> None:
            if n in done:
                return
            for d in self.runs[n].depends_on:
                if d in names:
                    visit(d)
            done.append(n)

        for n in names:
            visit(n)
        return [self.runs[n] for n in done]

    def config_path(self, run: Run) -> Path:
        return (self.root / run.config).resolve()


def parse_time(value: Any, where: str = "time") -> int:
    """Minutes from ``90``, ``"90"``, ``"HH:MM:SS"``, ``"MM:SS"`` or ``"D-HH:MM:SS"`` (SLURM's forms)."""
    if isinstance(value, bool):
        raise ExperimentError(f"{where}: expected minutes or 'HH:MM:SS', got {value!r}")
    if isinstance(value, (int, float)):
        minutes = float(value)
    else:
        m = re.fullmatch(r"\s*(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?\s*", str(value))
        if not m:
            raise ExperimentError(f"{where}: expected minutes or 'HH:MM:SS' / 'D-HH:MM:SS', got {value!r}")
        d, a, b, c = (int(x) if x else None for x in m.groups())
        if b is None:  # plain minutes (or D-HH)
            minutes = (d or 0) * 1440 + (a * 60 if d is not None else a)
        elif c is None:  # MM:SS, or D-HH:MM
            minutes = (d * 1440 + a * 60 + b) if d is not None else a + b / 60
        else:
            minutes = (d or 0) * 1440 + a * 60 + b + c / 60
    if minutes <= 0:
        raise ExperimentError(f"{where}: must be positive, got {value!r}")
    return max(1, math.ceil(minutes))  # never shorten a time limit


def _deep_merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _format(value: Any, values: Mapping[str, Any], where: str) -> Any:
    """Fill ``{key}`` templates from the matrix values in strings (recursively in lists and dicts)."""
    if isinstance(value, str):
        fields = {f for _, f, _, _ in string.Formatter().parse(value) if f}
        missing = sorted(f for f in fields if f.split(".")[0].split("[")[0] not in values)
        if missing:
            raise ExperimentError(f"{where}: template {value!r} uses {missing}, which the matrix does not define "
                                  f"(matrix keys: {sorted(values)})")
        return value.format(**values) if fields else value
    if isinstance(value, list):
        return [_format(v, values, where) for v in value]
    if isinstance(value, dict):
        return {_format(k, values, where): _format(v, values, where) for k, v in value.items()}
    return value


def _as_int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool):
        raise ExperimentError(f"{where}: expected an integer, got {value!r}")
    try:
        out = int(str(value).strip()) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ExperimentError(f"{where}: expected an integer, got {value!r}") from None
    if out < minimum:
        raise ExperimentError(f"{where}: must be >= {minimum}, got {out}")
    return out


def _resources(spec: Mapping[str, Any], batch: Optional[int], where: str) -> Resources:
    unknown = sorted(set(spec) - _RESOURCE_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: unknown resource key(s) {unknown}; known: {sorted(_RESOURCE_KEYS)}")
    gpus = _as_int(spec.get("gpus_per_node", 0), f"{where}.gpus_per_node")
    tasks = _as_int(spec.get("tasks_per_node", gpus if gpus > 0 else 1), f"{where}.tasks_per_node", 1)
    if "nodes" in spec:
        nodes = _as_int(spec["nodes"], f"{where}.nodes", 1)
    elif "images_per_gpu" in spec:
        per = _as_int(spec["images_per_gpu"], f"{where}.images_per_gpu", 1)
        if batch is None:
            raise ExperimentError(f"{where}: images_per_gpu needs the run's batch_size; give nodes instead")
        if batch % (per * tasks):
            raise ExperimentError(
                f"{where}: batch {batch} is not a whole number of nodes at {per} image(s) per rank and "
                f"{tasks} rank(s) per node ({batch} / {per * tasks} = {batch / (per * tasks):g}); "
                "change images_per_gpu / tasks_per_node or give nodes")
        nodes = batch // (per * tasks)
    else:
        nodes = 1
    extra = spec.get("slurm") or {}
    if not isinstance(extra, Mapping):
        raise ExperimentError(f"{where}.slurm: expected a mapping of extra sbatch options, got {extra!r}")
    if {"partition", "account"} & set(extra):
        raise ExperimentError(f"{where}.slurm: partition and account are the user's: pass --partition / "
                              "--account to slurm.submit instead of writing them in the experiment")
    mem = spec.get("mem_gb")
    return Resources(nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus,
                     cpus_per_task=_as_int(spec.get("cpus_per_task", 2), f"{where}.cpus_per_task", 1),
                     mem_gb=None if mem is None else float(mem),
                     time_min=parse_time(spec.get("time", 60), f"{where}.time"),
                     requeues=_as_int(spec.get("requeues", 10), f"{where}.requeues"),
                     slurm=tuple(sorted((str(k), v) for k, v in extra.items())))


def _expand(entry: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> List[Dict[str, Any]]:
    unknown = sorted(set(entry) - _RUN_KEYS)
    if unknown:
        raise ExperimentError(f"{where}: unknown key(s) {unknown}; known: {sorted(_RUN_KEYS)}")
    if "name" not in entry or "config" not in entry:
        raise ExperimentError(f"{where}: every run needs 'name' and 'config'")
    matrix = entry.get("matrix") or {}
    if not isinstance(matrix, Mapping) or not all(isinstance(v, list) and v for v in matrix.values()):
        raise ExperimentError(f"{where}.matrix: expected a mapping of key -> non-empty list, got {matrix!r}")
    merged = _deep_merge(dict(defaults), {k: v for k, v in entry.items() if k != "matrix"})
    keys = list(matrix)
    out = []
    for combo in itertools.product(*(matrix[k] for k in keys)):
        values: Dict[str, Any] = {}
        for k, v in zip(keys, combo):  # a mapping value sets several template keys at once (zipped values)
            if isinstance(v, Mapping):
                if k not in v:
                    raise ExperimentError(f"{where}.matrix.{k}: a mapping entry must set {k!r} itself, got {dict(v)}")
                values.update(v)
            else:
                values[k] = v
        out.append(_format(merged, values, where))
    return out


def _check_config(root: Path, run: Run, where: str) -> None:
    path = root / run.config
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.py"))[:8] if path.parent.is_dir() else []
        hint = f" (that folder has: {', '.join(near)})" if near else f" (folder {path.parent} does not exist)"
        raise ExperimentError(f"{where}: config file {run.config} does not exist under {root}{hint}")
    m = _BS_RE.search(Path(run.config).name + "_")
    if m and run.batch_size is not None:
        bs = int(m.group(1)) * (1000 if m.group(0).endswith("k_") else 1)
        if bs != run.batch_size:
            raise ExperimentError(f"{where}: batch_size {run.batch_size} disagrees with the config name "
                                  f"{Path(run.config).name} (bs{m.group(1)})")


def load_experiment(folder: str | Path, root: Optional[str | Path] = None, check_configs: bool = True) -> Experiment:
    """Load, expand and validate ``<folder>/experiment.yaml``.

    Args:
        folder: the experiment folder (``experiments/table1``) or the file itself.
        root: the repository root config paths are relative to (default: the folder's grand-parent).
        check_configs: check that every config file exists (off only to inspect a file elsewhere).

    Raises:
        ExperimentError: an unknown config file, a batch not divisible by the rank count, a missing or
            cyclic dependency, a duplicate run name, an unknown key, ... with the file and run named.
    """
    folder = Path(folder)
    file = folder if folder.is_file() else folder / EXPERIMENT_FILE
    folder = file.parent
    if not file.is_file():
        raise ExperimentError(f"no experiment file {file}; an experiment folder holds an {EXPERIMENT_FILE}")
    root = Path(root) if root is not None else folder.resolve().parent.parent
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ExperimentError(f"{file}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise ExperimentError(f"{file}: expected a mapping with a non-empty list 'runs'")
    unknown = sorted(k for k in set(data) - {"description", "defaults", "runs", "name"} if not str(k).startswith("x-"))
    if unknown:
        raise ExperimentError(f"{file}: unknown top-level key(s) {unknown}; known: description, defaults, runs "
                              "(and x-<name> keys holding YAML anchors)")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - (_RUN_KEYS - {"name", "matrix", "config"}):
        raise ExperimentError(f"{file}: 'defaults' must be a mapping of run keys (not name/matrix/config)")
    exp = Experiment(name=str(data.get("name", folder.name)), folder=folder, root=root,
                     description=str(data.get("description", "")).strip())

    for i, entry in enumerate(data["runs"]):
        if not isinstance(entry, dict):
            raise ExperimentError(f"{file}: runs[{i}] must be a mapping")
        for spec in _expand(entry, defaults, f"{file}: runs[{i}] ({entry.get('name')})"):
            name = str(spec["name"])
            where = f"{file}: run {name!r}"
            if not _NAME_RE.match(name):
                raise ExperimentError(f"{where}: run names use letters, digits, '_', '-', '.' only")
            if name in exp.runs:
                raise ExperimentError(f"{where}: duplicate run name (add a matrix key to the name template)")
            batch = None if spec.get("batch_size") is None else _as_int(spec["batch_size"], f"{where}.batch_size", 1)
            resources = _resources(spec.get("resources") or {}, batch, f"{where}.resources")
            init = spec.get("init_from")
            if init is not None:
                if isinstance(init, str):
                    init = {"run": init}
                if not isinstance(init, dict) or "run" not in init or set(init) - {"run", "key", "file", "handover"}:
                    raise ExperimentError(f"{where}.init_from: expected {{run: NAME, key: CFG_KEY, file: NAME, "
                                          f"handover: KIND}}, got {init!r}")
                if init.get("handover") not in (None, "pretrain-to-det", "o365-to-coco"):
                    raise ExperimentError(f"{where}.init_from.handover: {init['handover']!r} is not one of "
                                          "pretrain-to-det, o365-to-coco (models.handover)")
                init = InitFrom(run=str(init["run"]), key=str(init.get("key", "load_from")),
                                file=None if init.get("file") is None else str(init["file"]),
                                handover=init.get("handover"))
            deps = spec.get("depends_on") or []
            deps = [deps] if isinstance(deps, str) else list(deps)
            if init is not None and init.run not in deps:
                deps.append(init.run)
            cfg_options = spec.get("cfg_options") or {}
            if not isinstance(cfg_options, dict):
                raise ExperimentError(f"{where}.cfg_options: expected a mapping 'dotted.key: value'")
            metric = spec.get("metric")
            if metric is not None and metric not in PAPER_METRICS:
                raise ExperimentError(f"{where}.metric: {metric!r} is not one of {PAPER_METRICS}")
            entry_point = str(spec.get("entry_point", DEFAULT_ENTRY_POINT))
            if not re.fullmatch(r"([\w.]+|[^:]+\.py):[\w.]+", entry_point):
                raise ExperimentError(f"{where}.entry_point: expected 'package.module:function' or "
                                      f"'path/to/file.py:function', got {entry_point!r}")
            if entry_point.split(":")[0].endswith(".py") and check_configs \
                    and not (root / entry_point.split(":")[0]).is_file():
                raise ExperimentError(f"{where}.entry_point: file {entry_point.split(':')[0]} does not exist under {root}")
            run = Run(name=name, config=str(spec["config"]), batch_size=batch,
                      seed=_as_int(spec.get("seed", 0), f"{where}.seed"), entry_point=entry_point,
                      cfg_options=dict(cfg_options), resources=resources, depends_on=tuple(str(d) for d in deps),
                      init_from=init, paper=None if spec.get("paper") is None else str(spec["paper"]),
                      metric=metric, batch_key=spec.get("batch_key", "train_dataloader.batch_size"),
                      seed_key=spec.get("seed_key", "randomness.seed"),
                      description=str(spec.get("description", "")))
            if batch is not None and batch % resources.world_size:
                raise ExperimentError(
                    f"{where}: batch_size {batch} is not divisible by the {resources.world_size} ranks "
                    f"({resources.nodes} node(s) x {resources.tasks_per_node} task(s)); change nodes, "
                    "tasks_per_node or images_per_gpu")
            if check_configs:
                _check_config(root, run, where)
            exp.runs[name] = run

    for run in exp.runs.values():
        for d in run.depends_on:
            if d not in exp.runs:
                raise ExperimentError(f"{file}: run {run.name!r} depends on {d!r}, which is not a run of this "
                                      f"experiment (runs: {', '.join(exp.runs)})")
            if d == run.name:
                raise ExperimentError(f"{file}: run {run.name!r} depends on itself")
    _check_cycles(exp, file)
    return exp


def _check_cycles(exp: Experiment, file: Path) -> None:
    state: Dict[str, int] = {}  # 1 visiting, 2 done

    def visit(n: str, path: List[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            raise ExperimentError(f"{file}: dependency cycle {' -> '.join(cycle)}; stage chains must be acyclic")
        state[n] = 1
        for d in exp.runs[n].depends_on:
            visit(d, path + [n])
        state[n] = 2

    for n in exp.runs:
        visit(n, [])
