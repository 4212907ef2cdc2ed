"""agvm.cli.run: one error line (exit 2, or the exception's exit_code), --debug for the traceback."""
import pytest

from agvm.cli import one_line, run


def _raise(err):
    def main(argv):
        raise err
    return main


def test_an_exception_is_one_line_on_stderr(capsys):
    assert run(_raise(FileNotFoundError("config file not found: x.py")), []) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: config file not found: x.py (add --debug for the traceback)\n"


def test_debug_gives_the_traceback_and_main_never_sees_the_flag():
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        run(main, ["a", "--debug"])
    assert seen == [["a"]]


def test_exit_codes(capsys):
    class Diverged(RuntimeError):
        exit_code = 3

    assert run(_raise(Diverged("training diverged at iteration 5: ...")), []) == 3
    assert run(lambda argv: None, []) == 0  # a main that returns nothing (or a dict) succeeded
    assert run(lambda argv: {"x": 1}, []) == 0
    assert run(lambda argv: 4, []) == 4
    assert run(_raise(KeyboardInterrupt()), []) == 130
    capsys.readouterr()


def test_one_line_forms(tmp_path):
    try:
        compile("a = (\n", str(tmp_path / "cfg.py"), "exec")
    except SyntaxError as err:
        assert one_line(err).startswith(f"{tmp_path / 'cfg.py'}, line 1: invalid Python syntax")
    assert one_line(KeyError("backbone")) == "KeyError: missing key 'backbone'"
    assert one_line(KeyError("Foo is not in the model registry")) == "Foo is not in the model registry"
    assert one_line(RuntimeError("ckpt does not match:\n  missing keys: a\n  Check the config.")) == \
        "ckpt does not match: missing keys: a Check the config."
    assert one_line(RuntimeError("x" * 2000)) == "x" * 1000 + " [...]"
    assert one_line(ZeroDivisionError("division by zero")) == "ZeroDivisionError: division by zero"
    assert one_line(AssertionError()) == "AssertionError (no message)"


# --- the fault table: bad inputs to every CLI, each one line on stderr (in-process through agvm.cli.run) ---------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
RETINA = str(ROOT / "configs" / "retinanet" / "retinanet_r50_bs32_agvm_sgd.py")


def _cases(tmp):
    """(name, CLI module, argv, words the line must hold); tmp is a scratch folder with a few bad files."""
    (tmp / "syntax.py").write_text("model = dict(type='RetinaNet',\n")
    (tmp / "exp").mkdir()
    (tmp / "exp" / "experiment.yaml").write_text("runs: [{name: a}]\n")
    (tmp / "bad_numbers.yaml").write_text("sources: {}\nnumbers: [{id: x}]\n")
    (tmp / "pre_cfg.py").write_text("model = dict(name='uninet_tiny')\n")
    w = str(tmp / "w")
    return [
        ("train: missing config", "agvm.mm.train", [str(tmp / "nope.py"), "--work-dir", w], "config file not found"),
        ("train: bad config syntax", "agvm.mm.train", [str(tmp / "syntax.py"), "--work-dir", w],
         "syntax.py, line 1: invalid Python syntax"),
        ("train: --cfg-options without =", "agvm.mm.train",
         [RETINA, "--work-dir", w, "--cfg-options", "train_cfg.max_epochs"], "expected key=value"),
        ("train: missing load_from", "agvm.mm.train",
         [RETINA, "--work-dir", w, "--cfg-options", "dataset=synthetic", f"synthetic_root={tmp / 'syn'}",
          f"load_from={tmp / 'init.pth'}", "model.backbone.init_cfg=None"], "does not exist"),
        ("train: no dataset", "agvm.mm.train", [RETINA, "--work-dir", w], "AGVM_COCO_ROOT"),
        ("evaluate: missing checkpoint", "agvm.mm.evaluate", [RETINA, str(tmp / "missing.pth")], "missing.pth"),
        ("evaluate: --cfg-options without =", "agvm.mm.evaluate",
         [RETINA, str(tmp / "missing.pth"), "--cfg-options", "dataset"], "expected key=value"),
        ("handover: missing source", "models.handover", ["o365-to-coco", str(tmp / "no.pth"), str(tmp / "o.pth")],
         "does not exist"),
        ("pretrain: missing config", "models.pretrain", [str(tmp / "none.py")], "does not exist"),
        ("pretrain: incomplete config", "models.pretrain", [str(tmp / "pre_cfg.py")], "lacks"),
        ("pretrain: bad config syntax", "models.pretrain", [str(tmp / "syntax.py")], "invalid Python syntax"),
        ("submit: missing experiment", "slurm.submit", [str(tmp / "no_exp"), "--cluster", "local"], "no_exp"),
        ("submit: bad experiment", "slurm.submit", [str(tmp / "exp"), "--dry-run"], "needs 'name' and 'config'"),
        ("submit: no SLURM here", "slurm.submit", [str(ROOT / "experiments" / "smoke")], "no SLURM on this machine"),
        ("status: missing experiment", "slurm.status", [str(tmp / "no_exp")], "no_exp"),
        ("diagnose: missing config", "agvm.mm.diagnose", [str(tmp / "nope.py"), "--images", "8"], "config file not found"),
        ("diagnose: one image", "agvm.mm.diagnose", [RETINA, "--images", "1"], "--images must be >= 2"),
        ("diagnose: bad --validate", "agvm.mm.diagnose", [RETINA, "--images", "8", "--validate", "8,x"], "comma-separated"),
        ("diagnose: no dataset", "agvm.mm.diagnose", [RETINA, "--images", "8"], "AGVM_COCO_ROOT"),
        ("tables: broken numbers file", "results.collect",
         ["--work-dirs", str(tmp), "--out", str(tmp / "t"), "--numbers", str(tmp / "bad_numbers.yaml")], "bad_numbers"),
    ]


@pytest.mark.mm
def test_every_cli_reports_each_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    """The fault table: for each bad input, exit status 2, no traceback, exactly one line on stderr that names
    the problem (mmengine's own logs go to stdout; an environment dump never precedes these errors)."""
    pytest.importorskip("mmdet")
    import importlib

    monkeypatch.delenv("AGVM_COCO_ROOT", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here
    monkeypatch.chdir(tmp_path)
    failures = []
    for name, module, argv, words in _cases(tmp_path):
        main = importlib.import_module(module).main
        rc = run(main, argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        ok = rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0] \
            and "Traceback" not in out + err and "System environment" not in out
        if not ok:
            failures.append(f"{name}: rc={rc} stderr={err!r} stdout tail={out[-300:]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("module, argv, words", [
    ("agvm.mm.train", ["{tmp}/nope.py", "--work-dir", "{tmp}/w"], "config file not found"),
    ("agvm.mm.evaluate", [RETINA, "{tmp}/missing.pth"], "missing.pth"),
    ("models.handover", ["o365-to-coco", "{tmp}/no.pth", "{tmp}/o.pth"], "does not exist"),
    ("models.pretrain", ["{tmp}/none.py"], "does not exist"),
    ("slurm.submit", ["{tmp}/no_exp"], "no_exp"),
    ("slurm.status", ["{tmp}/no_exp"], "no_exp"),
])
def test_python_dash_m_entry_points_use_the_wrapper(tmp_path, module, argv, words):
    """`python -m <cli>` goes through agvm.cli.run: one line and status 2; with --debug the traceback."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mmengine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], p.stderr
    p = subprocess.run([sys.executable, "-m", module, *argv, "--debug"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode != 0 and "Traceback (most recent call last)" in p.stderr
