"""A stage of a chain starts from the previous stage's output through models.handover: rank 0 converts
the file into ``<work_dir>/init.pth`` (checked against the stage's config) and the entry point receives
it as ``load_from``; a requeued job does not convert again."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from slurm.trainer import RunSpec, Trainer

REPO = Path(__file__).resolve().parents[2]

RECORDER = textwrap.dedent('''
    import json, os
    def train(config, work_dir, cfg_options=None, resume=True, launcher="none"):
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, "seen.json"), "w") as f:
            json.dump({"config": config, "cfg_options": cfg_options, "launcher": launcher}, f)
        with open(os.path.join(work_dir, "metrics.json"), "w") as f:
            json.dump({"ok": 1}, f)
        return {"ok": 1}
''')


@pytest.mark.slow
@pytest.mark.mm
def test_pretrain_to_detector_handover_feeds_load_from(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("models.handover")
    import models.uninet  # noqa: F401  (registers uninet_* with timm)

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    torch.save(timm.create_model("uninet_tiny", num_classes=5).state_dict(), stage1 / "uninet_tiny.pth")
    (tmp_path / "recorder.py").write_text(RECORDER)
    spec = RunSpec(experiment="chain", run="stage2", entry_point=f"{tmp_path / 'recorder.py'}:train",
                   config=str(REPO / "configs" / "htc_x" / "htc_x_uninet_tiny.py"), work_dir=str(tmp_path / "stage2"),
                   batch_size=None, seed_key=None,
                   init_from={"work_dir": str(stage1), "key": "load_from", "file": "uninet_tiny.pth",
                              "handover": "pretrain-to-det"})
    Trainer(spec)()
    init = tmp_path / "stage2" / "init.pth"
    seen = json.loads((tmp_path / "stage2" / "seen.json").read_text())
    assert seen["cfg_options"] == {"load_from": str(init)} and seen["launcher"] == "none"
    state = torch.load(init, weights_only=False)["state_dict"]
    assert state and all(k.startswith("backbone.") for k in state)
    assert not any(k.startswith(("backbone.head.", "backbone.classifier.")) for k in state)  # classifier dropped
    mtime = init.stat().st_mtime_ns
    Trainer(spec.__class__(**{**spec.__dict__, "resume": True}))()  # a requeue: no second conversion
    assert init.stat().st_mtime_ns == mtime


def test_missing_previous_stage_output_is_a_clear_error(tmp_path):
    (tmp_path / "recorder.py").write_text(RECORDER)
    spec = RunSpec(experiment="chain", run="stage2", entry_point=f"{tmp_path / 'recorder.py'}:train",
                   config="c.py", work_dir=str(tmp_path / "stage2"), seed_key=None,
                   init_from={"work_dir": str(tmp_path / "stage1"), "key": "load_from", "file": "export.pth",
                              "handover": None})
    with pytest.raises(FileNotFoundError, match="has not written: did it finish"):
        Trainer(spec)()
    spec2 = RunSpec(**{**spec.__dict__, "init_from": {**spec.init_from, "file": None}})
    with pytest.raises(FileNotFoundError, match="the previous stage has not finished"):
        Trainer(spec2)()
