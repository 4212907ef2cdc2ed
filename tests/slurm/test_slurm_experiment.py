"""Experiment files: expansion of the run matrix, resources, and every validation error (slurm.experiment)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from slurm.experiment import ExperimentError, load_experiment, parse_time
from slurm.submit import executor_parameters, make_spec, select_runs


def write(root: Path, text: str, configs=("configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py",)) -> Path:
    for c in configs:
        (root / c).parent.mkdir(parents=True, exist_ok=True)
        (root / c).write_text("# test config\n")
    folder = root / "experiments" / "exp"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experiment.yaml").write_text(textwrap.dedent(text))
    return folder


TABLE = """
defaults:
  resources: {gpus_per_node: 8, images_per_gpu: 2, time: "4:00:00"}
  metric: box_ap
runs:
  - name: "{p}_r50_bs{batch}_{opt}"
    matrix:
      p: [faster_rcnn, mask_rcnn]
      batch: [{batch: 32, time: "12:00:00"}, {batch: 512, time: 90}]
      opt: [sgd, agvm_sgd]
    config: "configs/{p}/{p}_r50_bs{batch}_{opt}.py"
    batch_size: "{batch}"
    resources: {time: "{time}"}
    paper: "table1/{p}/bs{batch}/{opt}"
"""
TABLE_CONFIGS = [f"configs/{p}/{p}_r50_bs{b}_{o}.py" for p in ("faster_rcnn", "mask_rcnn") for b in (32, 512)
                 for o in ("sgd", "agvm_sgd")]


def test_matrix_expands_with_resources_and_paper_ids(tmp_path):
    exp = load_experiment(write(tmp_path, TABLE, TABLE_CONFIGS))
    assert len(exp.runs) == 8
    run = exp.runs["mask_rcnn_r50_bs512_agvm_sgd"]
    assert run.config == "configs/mask_rcnn/mask_rcnn_r50_bs512_agvm_sgd.py"
    assert run.batch_size == 512 and run.paper == "table1/mask_rcnn/bs512/agvm_sgd" and run.metric == "box_ap"
    r = run.resources
    assert (r.nodes, r.tasks_per_node, r.gpus_per_node, r.world_size, r.time_min) == (32, 8, 8, 256, 90)
    assert run.per_rank_batch == 2
    small = exp.runs["faster_rcnn_r50_bs32_sgd"].resources
    assert (small.nodes, small.time_min) == (2, 720)
    assert exp.name == "exp" and exp.root == tmp_path


def test_spec_carries_absolute_paths_and_options(tmp_path):
    exp = load_experiment(write(tmp_path, TABLE, TABLE_CONFIGS))
    run = exp.runs["faster_rcnn_r50_bs512_sgd"]
    spec = make_spec(exp, run, tmp_path / "wd")
    assert Path(spec.config).is_absolute() and Path(spec.config).is_file()
    assert spec.work_dir == str(tmp_path / "wd" / "exp" / "faster_rcnn_r50_bs512_sgd")
    p = executor_parameters(exp, run, "slurm", partition="gpu", account="acc", dependency="afterok:7")
    assert p["nodes"] == 32 and p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["timeout_min"] == 90
    assert p["slurm_partition"] == "gpu" and p["slurm_account"] == "acc"
    assert p["slurm_additional_parameters"] == {"dependency": "afterok:7"}
    with pytest.raises(ExperimentError, match="one node"):
        executor_parameters(exp, run, "local")
    with pytest.raises(ExperimentError, match="debug"):
        executor_parameters(exp, run, "debug")


def test_only_selects_by_pattern_and_keeps_dependency_order(tmp_path):
    exp = load_experiment(write(tmp_path, TABLE, TABLE_CONFIGS))
    assert [r.name for r in select_runs(exp, ["*bs512_agvm*"])] == ["faster_rcnn_r50_bs512_agvm_sgd",
                                                                    "mask_rcnn_r50_bs512_agvm_sgd"]
    with pytest.raises(ExperimentError, match="no such run"):
        select_runs(exp, ["retinanet*"])


@pytest.mark.parametrize("text, configs, message", [
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/missing_bs32_sgd.py}
     """, (), "does not exist"),
    ("""
     runs:
       - name: a
         config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py
         batch_size: 32
         resources: {nodes: 3, gpus_per_node: 8}
     """, None, "not divisible by the 24 ranks"),
    ("""
     runs:
       - name: a
         config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py
         batch_size: 32
         resources: {gpus_per_node: 8, images_per_gpu: 3}
     """, None, "not a whole number of nodes"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, depends_on: [pretrain]}
     """, None, "depends on 'pretrain', which is not a run"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, depends_on: [c]}
       - {name: b, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, depends_on: [a]}
       - {name: c, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, init_from: {run: b}}
     """, None, "dependency cycle a -> c -> b -> a"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, batch_size: 64}
     """, None, "disagrees with the config name"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, optimiser: sgd}
     """, None, "unknown key"),
    ("""
     runs:
       - {name: "a_{x}", config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py}
     """, None, "matrix does not define"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py}
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py}
     """, None, "duplicate run name"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, resources: {slurm: {partition: x}}}
     """, None, "partition and account are the user's"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, resources: {time: "1:xx"}}
     """, None, "HH:MM:SS"),
    ("""
     runs:
       - {name: a, config: configs/faster_rcnn/faster_rcnn_r50_bs32_sgd.py, metric: AP}
     """, None, "is not one of"),
    ("runs: []\n", None, "non-empty list 'runs'"),
    ("runs: [\n", None, "not valid YAML"),
])
def test_bad_experiment_files_fail_with_a_clear_message(tmp_path, text, configs, message):
    folder = write(tmp_path, text) if configs is None else write(tmp_path, text, configs)
    with pytest.raises(ExperimentError, match=message) as info:
        load_experiment(folder)
    assert "experiment.yaml" in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ExperimentError, match="no experiment file"):
        load_experiment(tmp_path / "nope")


def test_parse_time_slurm_forms():
    assert parse_time(90) == 90
    assert parse_time("30") == 30
    assert parse_time("24:00:00") == 1440
    assert parse_time("1-12:00:00") == 2160
    assert parse_time("2-0") == 2880
    assert parse_time("10:30") == 11  # MM:SS, rounded up
    with pytest.raises(ExperimentError):
        parse_time(0)


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "experiments").iterdir()
                                          if (p / "experiment.yaml").is_file()))
def test_repository_experiments_are_valid(folder):
    """Every experiment folder of the repository loads, and every config it names exists."""
    exp = load_experiment(REPO / "experiments" / folder)
    assert exp.runs
    for run in exp.runs.values():
        assert run.paper is None or run.paper.count("/") >= 2, run.paper


def _config_value(path: Path, pattern: str):
    import re

    m = re.search(pattern, path.read_text(), re.M)
    return None if m is None else int(m.group(1))


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "experiments").iterdir()
                                          if (p / "experiment.yaml").is_file()))
def test_repository_resources_match_the_configs(folder):
    """Where a config records its total batch (auto_scale_lr.base_batch_size) and GPU count (num_gpus), the
    experiment's batch and rank count agree with it (smoke sets its own small batch)."""
    exp = load_experiment(REPO / "experiments" / folder)
    for run in exp.runs.values():
        path = exp.config_path(run)
        base = _config_value(path, r"base_batch_size=(\d+)")
        gpus = _config_value(path, r"^num_gpus = (\d+)")
        if run.batch_size is None:  # smoke sets its own small batch; an evaluation run has none to set
            assert folder == "smoke" or run.batch_key is None, run.name
            continue
        if base is not None:
            assert run.batch_size == base, run.name
        if gpus is not None:
            assert run.resources.world_size == gpus, (run.name, run.resources.world_size, gpus)


def test_run_state_from_a_work_dir(tmp_path):
    from slurm.state import run_state

    wd = tmp_path / "run"
    assert run_state(wd).state == "not submitted"
    (wd / "20260101_000000" / "vis_data").mkdir(parents=True)
    (wd / "20260101_000000" / "vis_data" / "scalars.json").write_text(
        '{"lr": 0.1, "loss": 2.0, "iter": 20, "step": 20}\n{"lr": 0.1, "loss": 1.5, "iter": 40, "step": 40}\n'
        '{"coco/bbox_mAP": 0.1, "step": 1}\n')
    (wd / "epoch_3.pth").write_bytes(b"x")
    st = run_state(wd)
    assert (st.state, st.progress, st.last) == ("stopped", "iter 40", "loss 1.5")
    (wd / "progress.json").write_text('{"iter": 7, "max_iters": 12, "loss": 0.25}')
    assert run_state(wd).progress == "iter 7/12"
    (wd / "metrics.json").write_text('{"coco/bbox_mAP": 0.368}')
    st = run_state(wd)
    assert st.state == "done"
    from slurm.status import our_metric

    assert our_metric(st.metrics, "box_ap") == "box_ap 36.8"
    assert our_metric({"mIoU": 41.234}, "miou") == "miou 41.2"
