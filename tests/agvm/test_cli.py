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
    assert one_line(RuntimeError("first\nsecond")) == "first [...]"
    assert one_line(ZeroDivisionError("division by zero")) == "ZeroDivisionError: division by zero"
    assert one_line(AssertionError()) == "AssertionError (no message)"
