"""results.collect / results.numbers: tables of our runs against the paper's numbers."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from results import collect as C
from results.numbers import load_numbers


def _run(root: Path, experiment: str, name: str, metrics: dict) -> Path:
    d = root / experiment / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_numbers_file_loads_and_every_number_has_trust():
    p = load_numbers()
    assert len(p.numbers) >= 30
    assert {n.trust for n in p.numbers} == {"A", "B"}
    # spot checks against shared/paper/reported-results.md
    assert p.get("authors_code/faster_rcnn/bs512/agvm_sgd", "box_ap").value == 36.8
    assert p.get("authors_code/mask_rcnn/bs256/sgd", "mask_ap").value == 34.4
    assert p.get("table1/faster_rcnn/bs512/sgd", "box_ap").trust == "B"
    assert p.get("retinanet/retinanet_r18/bs10k/pmd_lamb", "box_ap").outcome == "diverged"
    assert p.get("uninet_htcx/htc_x/bs960/agvm_adamw", "box_ap").trust == "A"


@pytest.mark.parametrize("bad, message", [
    ({"id": "table1/faster_rcnn/bs32/sgd", "metric": "box_ap", "value": 1.0, "source": "nowhere"}, "unknown source"),
    ({"id": "table1/faster_rcnn/bs32/sgd", "metric": "ap", "value": 1.0, "source": "s"}, "unknown metric"),
    ({"id": "faster_rcnn", "metric": "box_ap", "value": 1.0, "source": "s"}, "table/pipeline"),
    ({"id": "table1/faster_rcnn/bs32/sgd", "metric": "box_ap", "source": "s"}, "needs 'value' or 'range'"),
])
def test_numbers_validation_names_the_problem(tmp_path, bad, message):
    f = tmp_path / "n.yaml"
    f.write_text(yaml.safe_dump({"sources": {"s": {"trust": "A", "cite": "x"}}, "numbers": [bad]}))
    with pytest.raises(ValueError, match=message):
        load_numbers(f)


def test_duplicate_number_rejected(tmp_path):
    e = {"id": "table1/faster_rcnn/bs32/sgd", "metric": "box_ap", "value": 1.0, "source": "s"}
    f = tmp_path / "n.yaml"
    f.write_text(yaml.safe_dump({"sources": {"s": {"trust": "B", "cite": "x"}}, "numbers": [e, e]}))
    with pytest.raises(ValueError, match="duplicate"):
        load_numbers(f)


def test_no_runs_everything_missing_never_zero(tmp_path):
    out = tmp_path / "tables"
    rows = C.collect(tmp_path / "no_work_dirs", out)
    for spec in C.TABLES:
        assert (out / f"{spec.name}.md").is_file() and (out / f"{spec.name}.csv").is_file()
        for r in _csv(out / f"{spec.name}.csv"):
            assert r["status"] == "missing" and r["ours"] == "" and r["diff"] == ""
        assert all(r.status == "missing" for r in rows[spec.name])
    md = (out / "table1.md").read_text()
    assert "| faster_rcnn | 512 | agvm_sgd | box AP | missing | 36.7 [B] | – |" in md
    assert "0.0" not in md
    # every table that shows a B number says what B means
    for spec in C.TABLES:
        text = (out / f"{spec.name}.md").read_text()
        if "[B]" in text:
            assert "unattributed secondary summary" in text
    assert (out / "README.md").is_file() and (out / "claims.md").is_file()


def test_runs_matched_by_name_with_difference_and_seeds(tmp_path):
    wd = tmp_path / "work_dirs"
    _run(wd, "table1", "faster_rcnn_r50_bs512_agvm_sgd_seed0", {"coco/bbox_mAP": 0.372, "coco/bbox_mAP_50": 0.6})
    _run(wd, "table1", "faster_rcnn_r50_bs512_agvm_sgd_seed1", {"coco/bbox_mAP": 0.368})
    _run(wd, "t1", "mask_rcnn_r50_bs256_sgd_authors", {"coco/bbox_mAP": 0.37, "coco/segm_mAP": 0.341})
    _run(wd, "seg", "semantic_fpn_r50_bs512_agvm_sgd", {"mIoU": 40.5, "aAcc": 80.0})
    _run(wd, "adamw", "faster_rcnn_r50_bs1536_pmd_lamb", {"coco/bbox_mAP": float("nan")})
    _run(wd, "smoke", "tiny", {"coco/bbox_mAP": 0.01})
    bad = wd / "broken" / "run"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text("{not json")
    out = tmp_path / "tables"
    rows = C.collect(wd, out)

    t1 = {(r["id"], r["metric"]): r for r in _csv(out / "table1.csv")}
    r = t1[("table1/faster_rcnn/bs512/agvm_sgd", "box_ap")]
    assert r["status"] == "done" and r["ours_n"] == "2"
    assert float(r["ours"]) == pytest.approx(37.0) and float(r["diff"]) == pytest.approx(0.3)
    assert float(r["ours_std"]) == pytest.approx(0.28, abs=0.006) and r["trust"] == "B"
    assert t1[("table1/faster_rcnn/bs512/sgd", "box_ap")]["status"] == "missing"

    ac = {(r["id"], r["metric"]): r for r in _csv(out / "authors_code.csv")}
    r = ac[("authors_code/mask_rcnn/bs256/sgd", "mask_ap")]
    assert float(r["ours"]) == pytest.approx(34.1) and float(r["diff"]) == pytest.approx(-0.3) and r["trust"] == "A"

    t2 = {(r["id"], r["metric"]): r for r in _csv(out / "table2.csv")}
    assert float(t2[("table2/semantic_fpn/bs512/agvm_sgd", "miou")]["ours"]) == pytest.approx(40.5)
    assert t2[("table2/semantic_fpn/bs512/agvm_sgd", "miou")]["paper"] == ""

    ad = {(r["id"], r["metric"]): r for r in _csv(out / "adamw_r50.csv")}
    assert ad[("adamw_r50/faster_rcnn/bs1536/pmd_lamb", "box_ap")]["status"] == "diverged"
    md = (out / "adamw_r50.md").read_text()
    assert "diverged (NaN)" in md

    md1 = (out / "table1.md").read_text()
    assert "37.0 ± 0.3 (n=2)" in md1 and "+0.3" in md1
    other = (out / "other_runs.md").read_text()
    assert "smoke/tiny" in other and "box AP 1.0" in other and "broken" not in other


def test_experiment_named_after_table_and_explicit_paper_id(tmp_path):
    wd = tmp_path / "wd"
    _run(wd, "authors_code", "faster_rcnn_r50_bs256_agvm_sgd", {"coco/bbox_mAP": 0.371})
    _run(wd, "custom", "my_run", {"paper_id": "retinanet/retinanet_r18/bs10k/agvm", "coco/bbox_mAP": 0.25})
    C.collect(wd, tmp_path / "out")
    ac = {(r["id"], r["metric"]): r for r in _csv(tmp_path / "out" / "authors_code.csv")}
    assert float(ac[("authors_code/faster_rcnn/bs256/agvm_sgd", "box_ap")]["diff"]) == pytest.approx(0.0)
    rn = {(r["id"], r["metric"]): r for r in _csv(tmp_path / "out" / "retinanet.csv")}
    assert float(rn[("retinanet/retinanet_r18/bs10k/agvm", "box_ap")]["diff"]) == pytest.approx(-1.7)


def test_cli(tmp_path, capsys):
    assert C.main(["--work-dirs", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 0
    assert "0 of" in capsys.readouterr().out


def test_paper_id_recorded_by_the_launcher_in_run_json(tmp_path):
    wd = tmp_path / "wd"
    d = _run(wd, "mine", "odd_name", {"coco/bbox_mAP": 0.35})
    (d / "run.json").write_text(json.dumps({"experiment": "mine", "run": "odd_name",
                                            "paper": "table1/faster_rcnn/bs512/sgd", "metric": "box_ap"}))
    C.collect(wd, tmp_path / "out")
    t1 = {(r["id"], r["metric"]): r for r in _csv(tmp_path / "out" / "table1.csv")}
    r = t1[("table1/faster_rcnn/bs512/sgd", "box_ap")]
    assert r["runs"] == "mine/odd_name" and float(r["diff"]) == pytest.approx(-0.8)


def test_diverged_runs_against_the_papers_diverged_rows(tmp_path):
    """metrics.json {"status": "diverged"} (agvm.mm.train's DivergenceHook): "diverged" in every metric row of the
    run's id, compared with the paper's own diverged rows (numbers.yaml outcome: diverged) and with its numbers."""
    wd = tmp_path / "wd"
    diverged = {"status": "diverged", "iter": 37, "epoch": 0, "reason": "the loss non-finite in 3 consecutive iteration(s)"}
    _run(wd, "uninet_htcx", "htc_x_uninet_g_bs960_adamw", diverged)          # paper: diverged too
    _run(wd, "uninet_htcx", "htc_x_uninet_g_bs960_agvm_adamw", diverged)     # paper: 62.2 / 53.4
    _run(wd, "retinanet", "retinanet_r18_bs10k_pmd_lamb", {"coco/bbox_mAP": 0.2})  # paper: diverged, ours trains
    out = tmp_path / "out"
    C.collect(wd, out)
    rows = {(r["id"], r["metric"]): r for r in _csv(out / "uninet_htcx.csv")}
    both = rows[("uninet_htcx/htc_x/bs960/adamw", "box_ap")]
    assert both["status"] == "diverged" and both["ours"] == "nan" and both["paper_outcome"] == "diverged"
    for metric in ("box_ap", "mask_ap"):  # a diverged run has no metric at all, yet every metric row says so
        assert rows[("uninet_htcx/htc_x/bs960/agvm_adamw", metric)]["status"] == "diverged"
    md = (out / "uninet_htcx.md").read_text()
    assert "| htc_x | 960 | adamw | box AP | diverged (iter 37) | diverged (NaN) [B] | both diverged |" in md
    assert "| htc_x | 960 | agvm_adamw | box AP | diverged (iter 37) | 62.2 [A] | ours diverged |" in md
    rn = (out / "retinanet.md").read_text()
    assert "| retinanet_r18 | 10k | pmd_lamb | box AP | 20.0 | diverged (NaN) [B] | ours trains |" in rn


def test_results_do_not_import_the_launcher():
    """slurm/ and results/ do not import each other (checked on the source: every import statement)."""
    import ast

    for pkg, other in (("results", "slurm"), ("slurm", "results")):
        for f in (Path(C.REPO) / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n == other or n.startswith(other + ".") for n in names), f"{f} imports {other}"


def test_every_experiment_paper_id_has_a_table():
    """The ids the experiment folders declare (slurm.submit writes them into run.json) land in one of the tables."""
    se = pytest.importorskip("slurm.experiment")
    exps = Path(C.REPO) / "experiments"
    folders = [p for p in exps.iterdir() if (p / "experiment.yaml").is_file()] if exps.is_dir() else []
    if not folders:
        pytest.skip("no experiment folders yet")
    declared = {run.paper for f in folders for run in se.load_experiment(f, check_configs=False).runs.values()
                if run.paper}
    unknown = sorted(pid for pid in declared if pid.split("/")[0] not in C.TABLE_BY_NAME)
    assert not unknown, f"paper ids with no table: {unknown}"
    assert "table1/faster_rcnn/bs512/agvm_sgd" in declared
    assert "authors_code/faster_rcnn/bs512/agvm_sgd" in declared
