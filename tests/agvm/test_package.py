"""The package's import surface: the names import on first use, and the torch-free tools load without torch."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_launcher_status_and_tables_load_without_torch():
    assert _run("import sys, agvm, agvm.fileio, agvm.cli, slurm.status, slurm.submit, results.collect; "
                "print('torch' in sys.modules)") == "False"


def test_every_public_name_and_submodule_resolves():
    out = _run("import agvm, sys; names = [getattr(agvm, n) for n in agvm.__all__]; "
               "print(len(names), 'torch' in sys.modules, agvm.variance.__name__, agvm.distributed.__name__, "
               "set(agvm.__all__) <= set(dir(agvm)))")
    assert out == "15 True agvm.variance agvm.distributed True"


def test_unknown_name_raises_attribute_error():
    import agvm

    with pytest.raises(AttributeError, match="no_such_name"):
        agvm.no_such_name
