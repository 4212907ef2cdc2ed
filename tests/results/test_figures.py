"""results.figures: Phi / mu figures from generated JSON-lines variance logs."""
import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from results import figures as F

MODULES = ["backbone", "neck", "rpn_head", "roi_head"]


def _write_log(path, batch, optimizer, misaligned, with_mu, n=30, truncate=False):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(batch)
    lines = []
    for k in range(n):
        it = (k + 1) * 10
        base = 0.5 * math.exp(-it / 300)
        phi = {m: base * (10.0 ** (-j if misaligned else 0)) * (1 + 0.1 * rng.random()) for j, m in enumerate(MODULES)}
        phi["unused"] = float("nan")
        rec = {"iter": it, "epoch": k // 10, "phi": phi, "lr": 0.02, "batch_size": batch, "optimizer": optimizer,
               "mu": ({m: math.sqrt(phi["backbone"] / phi[m]) for m in MODULES} if with_mu else {})}
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if truncate:
        text += '{"iter": 9999, "phi": {"backb'
    (path / F.LOG_NAME).write_text(text)
    return path


def _image_ok(p):
    img = mpimg.imread(p)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not blank


def test_load_and_series(tmp_path):
    d = _write_log(tmp_path / "a", 512, "sgd", misaligned=True, with_mu=False, truncate=True)
    log = F.load_variance_log(d)
    assert len(log.records) == 30  # the truncated last line is skipped
    assert log.label == "SGD (512)" and log.modules[:4] == MODULES and not log.has_mu
    xs, ys = log.series("phi", "roi_head")
    assert xs[0] == 10 and len(xs) == 30
    bx, by = log.series("phi", "backbone")
    assert all(b / r > 500 for b, r in zip(by, ys))  # three decades apart, as generated
    assert log.series("phi", "unused") == ([], [])  # NaN points dropped
    x2, y2 = log.series("phi", "backbone", times_lr2=True)
    assert y2[0] == pytest.approx(by[0] * 0.02 ** 2)


def test_bad_logs_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="agvm_variance.jsonl"):
        F.load_variance_log(tmp_path)
    (tmp_path / F.LOG_NAME).write_text('{"iter": 1, "phi": {}}\n{oops\n{"iter": 2, "phi": {}}\n')
    with pytest.raises(F.VarianceLogError, match=r":2: not valid JSON"):
        F.load_variance_log(tmp_path)
    (tmp_path / F.LOG_NAME).write_text('{"iter": "x", "phi": {}}\n')
    with pytest.raises(F.VarianceLogError, match="'iter'"):
        F.load_variance_log(tmp_path)
    (tmp_path / F.LOG_NAME).write_text("\n")
    with pytest.raises(F.VarianceLogError, match="empty"):
        F.load_variance_log(tmp_path)


def test_phi_and_mu_figures(tmp_path):
    logs = [F.load_variance_log(_write_log(tmp_path / f"r{b}{o}", b, o, misaligned=b > 32, with_mu=o.startswith("agvm")))
            for b, o in [(32, "sgd"), (512, "sgd"), (512, "agvm_sgd"), (1024, "agvm_sgd"), (32, "adamw")]]
    p = F.plot_phi(logs, tmp_path / "out" / "phi.png", smooth=3)
    _image_ok(p)
    m = F.plot_mu(logs, tmp_path / "out" / "mu.png")
    _image_ok(m)
    with pytest.raises(ValueError, match="mu is logged only"):
        F.plot_mu(logs[:2], tmp_path / "out" / "none.png")


def test_cli(tmp_path, capsys):
    a = _write_log(tmp_path / "a", 32, "sgd", False, False)
    b = _write_log(tmp_path / "b", 512, "agvm_sgd", True, True)
    assert F.main([str(a), str(b), "--out", str(tmp_path / "figs"), "--name", "fig1",
                   "--label", "Faster R-CNN SGD (32)", "--label", "Faster R-CNN AGVM (512)"]) == 0
    assert (tmp_path / "figs" / "fig1_phi.png").is_file() and (tmp_path / "figs" / "fig1_mu.png").is_file()
    assert F.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "f2")]) == 2
    assert "no variance log" in capsys.readouterr().err


def test_measured_runs_labelled_with_base_optimizer(tmp_path):
    d = _write_log(tmp_path / "m", 512, "AGVMSGD", True, False)
    text = (d / F.LOG_NAME).read_text().replace('"mu": {}', '"mu": {"backbone": 1.0, "neck": 1.0}')
    (d / F.LOG_NAME).write_text(text)
    assert F.load_variance_log(d).label == "SGD (512)"
    a = _write_log(tmp_path / "a", 512, "AGVMSGD", True, True)
    assert F.load_variance_log(a).label == "AGVM-SGD (512)"


def test_appendix_figures_from_experiment_runs(tmp_path, capsys):
    runs = tmp_path / "fig1_4_variance"
    _write_log(runs / "faster_rcnn_r50_bs32_sgd_measured", 32, "AGVMSGD", False, False)
    _write_log(runs / "faster_rcnn_r50_bs512_sgd_measured", 512, "AGVMSGD", True, False)
    _write_log(runs / "mask_rcnn_r50_bs1024_agvm_sgd", 1024, "AGVMSGD", True, True)
    assert F.main(["--appendix", str(runs), "--out", str(tmp_path / "figs")]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["fig1_phi.png", "fig3_mu.png", "fig3_phi.png", "fig4_phi.png"]
    assert "no log for retinanet_r50_bs32_sgd_measured" in capsys.readouterr().err
    assert F.main(["--appendix", str(tmp_path / "empty"), "--out", str(tmp_path / "f2")]) == 2


def test_phi_panels_carry_the_runs_diagnoses(tmp_path):
    """A run dir with diagnosis_final/diagnosis.json (slurm.entry_points:train_with_diagnosis): the predicted Phi
    at the run's batch is read from it and drawn beside the measured curve."""
    from agvm.diagnose import Diagnosis

    d = _write_log(tmp_path / "run", 512, "sgd", misaligned=True, with_mu=False)
    diag = Diagnosis(MODULES, [1.0] * 4, [300.0, 100.0, 30.0, 10.0], num_images=128)
    (d / "diagnosis_final").mkdir()
    (d / "diagnosis_final" / "diagnosis.json").write_text(json.dumps(diag.to_dict()))
    log = F.load_variance_log(d)
    assert list(log.predicted) == ["diagnosis_final"]
    assert log.predicted["diagnosis_final"] == pytest.approx(diag.phi(512))
    assert F.load_variance_log(_write_log(tmp_path / "plain", 32, "sgd", False, False)).predicted == {}
    _image_ok(F.plot_phi([log], tmp_path / "phi.png"))
