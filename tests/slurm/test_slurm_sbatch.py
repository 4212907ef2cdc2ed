"""The sbatch scripts submitit writes for the repository's experiments, without a cluster: a fake ``sbatch``
on PATH keeps each script and answers with a job id (and a fake ``srun``, which submitit looks for)."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from agvm.cli import run as run_cli
from slurm.experiment import load_experiment
from slurm.status import main as status_main
from slurm.submit import main as submit_main
from slurm.submit import submit_experiment

REPO = Path(__file__).resolve().parents[2]

FAKE_SBATCH = """#!/bin/sh
n=$(( $(cat "$FAKE_SLURM_DIR/counter" 2>/dev/null || echo 1000) + 1 ))
echo $n > "$FAKE_SLURM_DIR/counter"
cp "$1" "$FAKE_SLURM_DIR/job_$n.sh"
echo "Submitted batch job $n"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(record))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return record


def scripts(record: Path) -> dict:
    return {int(p.stem.split("_")[1]): p.read_text() for p in record.glob("job_*.sh")}


def flags(script: str) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, re.M))


def with_configs_in(tmp_root: Path, folder: Path) -> None:
    """Stand-in config files under a temporary root for every config the experiment names."""
    for run in load_experiment(folder, check_configs=False).runs.values():
        path = tmp_root / run.config
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# stand-in\n")


def test_table1_multi_node_scripts_and_arrays(fake_slurm, tmp_path):
    folder = REPO / "experiments" / "table1"
    with_configs_in(tmp_path, folder)
    exp = load_experiment(folder, root=tmp_path)
    out = submit_experiment(exp, cluster="slurm", partition="gpu", account="proj42", only=["*_r50_bs512_*sgd"],
                            work_dirs=tmp_path / "wd", log=lambda *a: None)
    assert len(out) == 6  # 3 pipelines x {sgd, agvm_sgd} at 512
    jobs = scripts(fake_slurm)
    assert len(jobs) == 1, "runs with equal resources and no dependencies go out as one job array"
    script = next(iter(jobs.values()))
    f = flags(script)
    assert f["nodes"] == "32" and f["ntasks-per-node"] == "8" and f["gpus-per-node"] == "8"  # 256 ranks x 2 images
    assert f["cpus-per-task"] == "8" and f["time"] == "240"
    assert f["partition"] == "gpu" and f["account"] == "proj42"
    assert f["array"] == "0-5%6" and f["signal"] == "USR2@180"
    assert "dependency" not in f
    assert re.search(r"^srun .*-m submitit.core._submit", script, re.M)
    assert set(out.values()) == {f"1001_{i}" for i in range(6)}
    job = json.loads((tmp_path / "wd" / "table1" / "mask_rcnn_r50_bs512_agvm_sgd" / "job.json").read_text())
    assert job["cluster"] == "slurm" and job["job_id"].startswith("1001_")
    # different resources -> a separate job
    submit_experiment(exp, cluster="slurm", only=["faster_rcnn_r50_bs32_sgd"], work_dirs=tmp_path / "wd",
                      setup=["module load cuda/12.4"], log=lambda *a: None)
    assert "\n# setup\nmodule load cuda/12.4\n" in scripts(fake_slurm)[1002]
    f32 = flags(scripts(fake_slurm)[1002])
    assert f32["nodes"] == "2" and f32["ntasks-per-node"] == "8" and "array" not in f32 and "partition" not in f32


def test_uninet_chain_gets_afterok_dependencies(fake_slurm, tmp_path, capsys):
    folder = REPO / "experiments" / "uninet_g"
    with_configs_in(tmp_path, folder)
    exp = load_experiment(folder, root=tmp_path)
    out = submit_experiment(exp, cluster="slurm", work_dirs=tmp_path / "wd", log=lambda *a: None)
    # the three COCO runs at 960 (AGVM-AdamW, AdamW, PMD-LAMB) share resources and dependency: one job array
    ids = {run: int(str(jid).split("_")[0]) for run, jid in out.items()}
    pre, o365, coco = ids["uninet_g_in22k_pretrain"], ids["htc_x_uninet_g_o365"], ids["htc_x_uninet_g_bs960_agvm_adamw"]
    assert ids["htc_x_uninet_g_bs960_adamw"] == ids["htc_x_uninet_g_bs960_pmd_lamb"] == coco
    jobs = scripts(fake_slurm)
    assert "dependency" not in flags(jobs[pre])
    assert flags(jobs[o365])["dependency"] == f"afterok:{pre}"
    f = flags(jobs[coco])
    assert f["dependency"] == f"afterok:{o365}" and "array" in f
    assert f["nodes"] == "60" and f["ntasks-per-node"] == "8" and f["gpus-per-node"] == "8"  # 480 GPUs x 2 = 960
    assert flags(jobs[pre])["time"] == "2880"
    assert "module load cuda" not in jobs[pre]
    # no sacct here: status shows the runs submitted, with the paper's number beside the COCO stage
    assert status_main([str(folder), "--root", str(tmp_path), "--work-dirs", str(tmp_path / "wd")]) == 0
    table = capsys.readouterr().out
    assert table.count("submitted") == 6 and "62.2 box_ap (A)" in table
    # the test-dev results files wait for the AGVM-AdamW run (its array task), on one GPU
    f = flags(jobs[ids["uninet_g_coco_test_dev_results"]])
    assert f["dependency"] == f"afterok:{out['htc_x_uninet_g_bs960_agvm_adamw']}"
    assert f["nodes"] == "1" and f["gpus-per-node"] == "1"


def test_resubmitting_a_queued_chain_adds_nothing(fake_slurm, tmp_path, monkeypatch):
    folder = REPO / "experiments" / "uninet_g"
    with_configs_in(tmp_path, folder)
    args = [str(folder), "--root", str(tmp_path), "--work-dirs", str(tmp_path / "wd")]
    assert submit_main(args) == 0
    n = len(scripts(fake_slurm))
    # a fake sacct that reports every job pending (array tasks as <job>_<task>, as sacct does): nothing is
    # submitted twice
    sacct = Path(os.environ["PATH"].split(os.pathsep)[0]) / "sacct"
    sacct.write_text("#!/bin/sh\necho 'JobID|State|NodeList'\nfor i in $(seq 1001 1010); do echo \"$i|PENDING|\"; "
                     "for k in 0 1 2; do echo \"${i}_$k|PENDING|\"; done; done\n")
    sacct.chmod(0o755)
    assert submit_main(args) == 0
    assert len(scripts(fake_slurm)) == n


def test_no_slurm_here_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch / srun
    assert run_cli(submit_main, [str(REPO / "experiments" / "smoke"), "--work-dirs", str(tmp_path / "wd")]) == 2
    assert "no SLURM on this machine" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()
