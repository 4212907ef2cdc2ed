"""scripts/gpu_check.py: the dry run (CPU, tiny sizes) goes through every section's GPU code path."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("mmdet")
    pytest.importorskip("timm")
    out = tmp_path_factory.mktemp("gpu_check") / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    return proc.stdout, {(r["section"], r["what"]): r for r in data["rows"]}


def _rows(rows, section):
    found = [r for (s, _), r in rows.items() if s == section]
    assert found, f"no {section} row"
    return found


@pytest.mark.slow
@pytest.mark.mm
def test_dry_run_every_section_ok_and_table_printed(dry_run):
    stdout, rows = dry_run
    assert {s for s, _ in rows} == set(gpu_check.SECTIONS)
    assert all(r["ok"] for r in rows.values())
    assert "GPU check on CPU (dry run)" in stdout
    for r in rows.values():  # one table line per row
        assert any(line.startswith(r["section"]) and r["result"] in line for line in stdout.splitlines())


@pytest.mark.slow
@pytest.mark.mm
def test_dry_run_detector_amp_fp16_and_bf16(dry_run):
    _, rows = dry_run
    det = _rows(rows, "detector")
    assert sorted(r["what"].split(", ")[1] for r in det) == ["bfloat16", "float16"]
    for r in det:
        v = r["values"]
        assert math.isfinite(v["loss"]) and v["loss"] > 0
        assert v["t_after_step"] == 1 and v["t_after_skip"] == 1  # GradScaler skipped the inf step
        assert v["mu_after_skip"] == v["mu"] and v["weights_unchanged"]
        assert set(v["mu"]) >= {"backbone", "neck"}
        assert all(math.isfinite(m) for m in v["mu"].values())
        assert all(0.0 <= p <= 2.0 for p in v["phi"].values()) and v["phi"]


@pytest.mark.slow
@pytest.mark.mm
def test_dry_run_optim_htcx_ddp(dry_run):
    _, rows = dry_run
    optim = _rows(rows, "optim")
    assert {r["what"].split()[0] for r in optim} == {"SGD", "AdamW"}
    (htcx,) = _rows(rows, "htcx")
    v = htcx["values"]
    assert v["checkpointing"] and v["dtype"] == "bf16" and v["batch"] == 1
    assert v["images_per_s"] > 0 and v["model_flops_per_iter"] > 0
    assert v["model_flops_per_s"] > 0 and v["bf16_matmul_peak_flops"] > 0  # their ratio means nothing on a CPU
    (ddp,) = _rows(rows, "ddp")
    assert "gloo" in ddp["what"]
    assert all(t > 0 for t in ddp["values"].values())


def test_without_cuda_one_line_and_bad_section(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "optim,gpus"])
    assert "unknown section(s) ['gpus']" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dry-run" in err[0]
