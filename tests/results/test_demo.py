"""scripts/demo.py end to end at its smallest: trains through agvm.mm.train.train on the fresh stream, diagnoses,
and writes summary.json, report.md and the figures from the numbers it measured."""
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("agvm_demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "agvm_demo", demo)
    spec.loader.exec_module(demo)
    return demo


@pytest.mark.parametrize("args, message", [
    (["--validate", "4,5"], "--validate takes even batch sizes >= 2"),
    (["--images", "16"], "--images (16) >= --large-batch (32)"),
    (["--diag-images", "1"], "--diag-images and --validate-images must be >= 2"),
])
def test_demo_refuses_bad_sizes_before_training(tmp_path, capsys, monkeypatch, args, message):
    demo = _load_demo(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing started


@pytest.mark.mm
@pytest.mark.slow
def test_demo_smallest(tmp_path, capsys, monkeypatch):
    demo = _load_demo(monkeypatch)
    import torch

    out, work = tmp_path / "out", tmp_path / "work"
    threads = torch.get_num_threads()
    try:
        rc = demo.main(["--out", str(out), "--work-dir", str(work), "--num-val", "4", "--images", "8",
                        "--small-batch", "2", "--large-batch", "4", "--seeds", "1", "--diag-images", "3",
                        "--validate-images", "4", "--checkpoints", "2", "--validate", "2,4", "--repeats", "2",
                        "--jobs", "1"])
    finally:
        torch.set_num_threads(threads)  # the demo's worker sets one thread
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert [(r["setting"], r["seed"]) for r in s["runs"]] == [
        ("sgd_small", 0), ("sgd_large", 0), ("agvm_large", 0), ("sgd_large_no_fpn", 0)]
    for r in s["runs"]:
        assert (work / r["name"] / "metrics.json").is_file() and r["batch"] in (2, 4) and r["iterations"] in (4, 2)
        assert r["ap"] == pytest.approx(100 * json.loads((work / r["name"] / "metrics.json").read_text())
                                        ["coco/bbox_mAP"])
    t = s["table"]["agvm_large"]
    assert t["ap"]["n"] == 1 and t["ap"]["mean"] == pytest.approx(s["runs"][2]["ap"]) and t["optimizer"] == "AGVM-SGD"
    assert set(s["modules"]) == {"backbone", "neck", "rpn_head", "bbox_head"}
    for m, v in s["modules"].items():
        assert v["nsr"] is None or v["nsr"] >= 0
        assert 0 <= v["phi_predicted"]["4"] <= 1 and set(v["phi_measured_direct"]) == {"2", "4"}
    rows = s["prediction"]["direct"]["rows"]
    assert all(r["pairs"] == 6 and r["measured_se"] >= 0 for r in rows)  # all pairs of 4 halves per batch
    ran = {p.parent.name: json.loads(p.read_text())["num_images"] for p in (work / "diagnosis").glob("*/diagnosis.json")}
    assert ran["sgd_large_seed0_iter2"] == 4 and ran["sgd_large_seed0_iter1"] == 3  # --validate-images, --diag-images
    assert len(rows) == 8 and s["prediction"]["direct"]["median_rel_error"] == pytest.approx(
        statistics.median(r["rel_error"] for r in rows))
    assert s["prediction"]["training"]["rows"], "no prediction compared with the Phi logged in training"
    assert set(s["ablations_nsr"]) == {"FPN, 64 RoIs", "no FPN", "no FPN, 10 RoIs", "no FPN, 10 RoIs, frozen head"}
    assert "bbox_head" not in s["ablations_nsr"]["no FPN, 10 RoIs, frozen head"]  # frozen: no gradient, no NSR
    assert s["wall_seconds"] > 0 and "load" in s["load"]
    assert math.isfinite(s["verdict"]["head_nsr_needed_for_4x_at_512"])
    assert set(s["verdict"]["misaligned_at_batch_per_module"]) == {"neck", "rpn_head", "bbox_head"}
    report = (out / "report.md").read_text()
    assert "| agvm_large | 4 | AGVM-SGD |" in report and "Median relative error of the prediction" in report
    assert "## Verdict" in report and "no FPN, 10 RoIs, frozen head" in report
    for fig in ("overlay.png", "diagnosis.png", "phi.png", "mu.png"):
        assert (out / fig).stat().st_size > 10_000 and f"]({fig})" in report
    printed = capsys.readouterr().out
    assert f"Report:  {out / 'report.md'}" in printed and "iter" in printed and "diagnose:" in printed
    assert "Average Precision" not in printed  # pycocotools' tables go to each run's console.log
    assert "Average Precision" in (work / "sgd_small_seed0" / "console.log").read_text()
