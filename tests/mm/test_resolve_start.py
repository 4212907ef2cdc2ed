"""Where a run starts: its own last checkpoint on resume, else the config's load_from (stage hand-over)."""
import pytest

pytest.importorskip("mmengine")
from mmengine.config import Config  # noqa: E402

from agvm.mm.train import resolve_start  # noqa: E402


def _cfg(tmp_path, load_from=None):
    return Config(dict(work_dir=str(tmp_path / "run"), load_from=load_from))


def test_fresh_run_keeps_the_hand_over_checkpoint(tmp_path):
    init = tmp_path / "init.pth"
    init.write_bytes(b"x")
    cfg = _cfg(tmp_path, str(init))
    resolve_start(cfg, resume=True, latest_checkpoint=lambda d: None)
    assert cfg.load_from == str(init) and cfg.resume is False


def test_resume_prefers_the_runs_own_checkpoint(tmp_path):
    init = tmp_path / "init.pth"
    init.write_bytes(b"x")
    cfg = _cfg(tmp_path, str(init))
    resolve_start(cfg, resume=True, latest_checkpoint=lambda d: d + "/iter_4.pth")
    assert cfg.load_from.endswith("iter_4.pth") and cfg.resume is True
    cfg = _cfg(tmp_path, None)
    resolve_start(cfg, resume=False, latest_checkpoint=lambda d: d + "/iter_4.pth")
    assert cfg.load_from is None and cfg.resume is False


def test_missing_hand_over_checkpoint_is_an_error(tmp_path):
    cfg = _cfg(tmp_path, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_start(cfg, resume=True, latest_checkpoint=lambda d: None)
