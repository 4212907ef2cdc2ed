"""scripts/demo.py end to end with the smallest settings: it trains through agvm.mm.train.train and writes the report."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.mm
@pytest.mark.slow
def test_demo_smallest(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("agvm_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "agvm_demo", demo)  # dataclasses look the module up
    spec.loader.exec_module(demo)
    import torch

    out, work = tmp_path / "out", tmp_path / "work"
    threads = torch.get_num_threads()
    try:
        rc = demo.main(["--out", str(out), "--work-dir", str(work), "--num-train", "8", "--num-val", "4",
                        "--small-batch", "2", "--large-batch", "4", "--small-epochs", "1", "--large-epochs", "2"])
    finally:
        torch.set_num_threads(threads)  # the demo sets one thread for the whole process
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "scaled-down run on synthetic data" in report
    assert "| SGD (2) |" in report and "| AGVM-SGD (4) |" in report
    assert (out / "phi.png").stat().st_size > 10_000 and (out / "mu.png").stat().st_size > 10_000
    for run in ("small_sgd", "large_sgd", "large_agvm"):
        assert (work / run / "metrics.json").is_file() and (work / run / "agvm_variance.jsonl").is_file()
    printed = capsys.readouterr().out
    assert f"Report:  {out / 'report.md'}" in printed and "iter" in printed
