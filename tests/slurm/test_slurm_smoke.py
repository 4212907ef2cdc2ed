"""experiments/smoke end to end through the real entry point (agvm.mm.train on generated data):
``--cluster local`` (a subprocess per rank) and ``--cluster debug`` (in this process), then slurm.status."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slurm.status import main as status_main
from slurm.submit import main as submit_main

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "experiments" / "smoke"
RUN = "smoke_retinanet_r18_agvm_sgd"


@pytest.fixture
def smoke_env(tmp_path, monkeypatch):
    pytest.importorskip("agvm.mm.train", reason="agvm.mm.train (issue 4) is not in this checkout")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    # generated data shared by both tests (made once, reused: agvm.mm.synthetic.ensure)
    monkeypatch.setenv("AGVM_SYNTHETIC_ROOT", str(Path(tmp_path.parent.parent) / "agvm-synthetic-smoke"))
    return tmp_path / "work_dirs"


def _check(work_dirs: Path, cluster: str, capsys) -> float:
    t0 = time.time()
    assert submit_main([str(SMOKE), "--cluster", cluster, "--work-dirs", str(work_dirs)]) == 0
    seconds = time.time() - t0
    wd = work_dirs / "smoke" / RUN
    metrics = json.loads((wd / "metrics.json").read_text())
    assert 0.0 <= metrics["coco/bbox_mAP"] <= 1.0  # the real COCO metric was computed
    lines = (wd / "agvm_variance.jsonl").read_text().splitlines()
    assert [json.loads(x)["iter"] for x in lines] == [2, 4]  # AGVM measured every 2 of the 4 steps
    assert json.loads((wd / "job.json").read_text())["cluster"] == cluster
    assert (wd / "last_checkpoint").is_file()
    capsys.readouterr()
    assert status_main([str(SMOKE), "--work-dirs", str(work_dirs)]) == 0
    table = capsys.readouterr().out
    assert "1/1 done" in table and f"{RUN}  done" in table and "box_ap" in table
    print(f"smoke via --cluster {cluster}: {seconds:.1f} s")
    return seconds


@pytest.mark.slow
@pytest.mark.mm
def test_smoke_local(smoke_env, capsys):
    _check(smoke_env, "local", capsys)


@pytest.mark.slow
@pytest.mark.mm
def test_smoke_debug(smoke_env, capsys):
    _check(smoke_env, "debug", capsys)


@pytest.mark.slow
@pytest.mark.mm
def test_smoke_config_on_two_gloo_ranks(smoke_env, tmp_path):
    """The smoke run as 2 ranks through the local executor: the launcher's gloo process group is used by
    mmengine's DDP and the AGVM hook (agvm.distributed) measures across the two ranks."""
    import yaml

    pytest.importorskip("agvm.distributed")
    data = yaml.safe_load((SMOKE / "experiment.yaml").read_text())
    run = data["runs"][0]
    run["name"] = "ddp2"
    run["resources"]["tasks_per_node"] = 2
    run["cfg_options"]["train_dataloader.batch_size"] = 2  # per rank: 4 in all, as in the one-rank smoke
    folder = tmp_path / "experiments" / "ddp"
    folder.mkdir(parents=True)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(data))
    assert submit_main([str(folder), "--cluster", "local", "--root", str(REPO), "--work-dirs", str(smoke_env)]) == 0
    wd = smoke_env / "ddp" / "ddp2"
    attempt = json.loads((wd / "attempts.jsonl").read_text().splitlines()[0])
    assert attempt["world_size"] == 2 and attempt["backend"] == "gloo"
    logs = [json.loads(x) for x in (wd / "agvm_variance.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in logs] == [2, 4] and all(x["batch_size"] == 4 for x in logs)
    assert "coco/bbox_mAP" in json.loads((wd / "metrics.json").read_text())
