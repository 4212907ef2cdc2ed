"""agvm.mm.checkpoint: atomic writes with a checksum, verification (sha256 sidecar / zip CRC), safe reading
(refused vs damaged), mmengine's message hub under weights_only, generator state, config diff, strict load."""
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from agvm.mm import checkpoint as C


def _state():
    torch.manual_seed(0)
    return {"state_dict": nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)).state_dict(), "meta": {"epoch": 1}}


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    else:  # 4 KiB of random bytes in its middle
        mid = len(data) // 2 - 2048
        data[mid:mid + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("sidecar", [True, False])
@pytest.mark.parametrize("how", ["truncated", "empty", "noise"])
def test_damaged_files_are_reported_as_damaged(tmp_path, sidecar, how):
    f = tmp_path / "iter_1.pth"
    if sidecar:
        C.save(_state(), str(f))
        assert C.verify(f) == "sha256" and (tmp_path / "iter_1.pth.sha256").is_file()
    else:  # a file from elsewhere: torch's zip records carry a CRC-32 that torch itself never checks
        torch.save(_state(), f)
        assert C.verify(f) == "crc32"
    assert torch.equal(C.read(f)["state_dict"]["0.weight"], _state()["state_dict"]["0.weight"])
    _damage(f, how)
    with pytest.raises(C.DamagedCheckpoint, match="is damaged") as info:
        C.read(f)
    assert "\n" not in str(info.value) and " refused:" not in str(info.value)


def test_save_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "a.pth"
    C.save({"w": torch.ones(2)}, str(f))
    before = f.read_bytes()

    def broken(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        C.save({"w": torch.zeros(2)}, str(f))
    assert f.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.pth", "a.pth.sha256"]


class Custom:
    pass


class Boom:
    def __reduce__(self):
        return (os.system, ("echo SHOULD-NOT-RUN > boom.txt",))


def test_objects_besides_weights_are_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, obj in (("boom", Boom()), ("custom", Custom())):
        f = tmp_path / f"{name}.pth"
        torch.save({"state_dict": _state()["state_dict"], "extra": obj}, f)
        with pytest.raises(C.RefusedCheckpoint, match="refused.*--unsafe-load") as info:
            C.read(f)
        assert "damaged" not in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "boom.txt").exists()
    assert isinstance(C.read(tmp_path / "custom.pth", unsafe=True)["extra"], Custom)


def test_message_hub_loads_weights_only_and_getattr_stays_closed(tmp_path):
    from mmengine.logging import HistoryBuffer, MessageHub

    hub = MessageHub("resume-test")
    for v in (1.0, 3.0):
        hub.update_scalar("train/loss", v)
    hub.update_info("iter", 7)
    f = tmp_path / "hub.pth"
    C.save({"meta": {"seed": np.int64(3)}, "message_hub": hub.state_dict()}, str(f))
    got = C.read(f)["message_hub"]
    restored = MessageHub("resume-test-2")
    restored.load_state_dict(got)
    assert restored.get_scalar("train/loss").mean() == 2.0 and restored.get_info("iter") == 7

    class Sneaky:  # pickled as getattr(HistoryBuffer, 'update'): not one of its statistics methods
        def __reduce__(self):
            return (getattr, (HistoryBuffer, "update"))

    bad = tmp_path / "sneaky.pth"
    torch.save({"x": Sneaky()}, bad, pickle_protocol=2)
    with pytest.raises(C.RefusedCheckpoint, match="refused"):
        C.read(bad)


def test_latest_intact_falls_back_with_a_warning(tmp_path):
    for n in (1, 2, 3):
        C.save(_state(), str(tmp_path / f"iter_{n}.pth"))
    (tmp_path / "iter_4.pth.tmp").write_bytes(b"partial")  # an interrupted save: never a candidate
    _damage(tmp_path / "iter_3.pth", "noise")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert C.latest_intact(str(tmp_path)) == str(tmp_path / "iter_2.pth")
    assert any("iter_3.pth is damaged" in str(x.message) and "falling back" in str(x.message) for x in w)
    assert C.latest_intact(str(tmp_path / "none")) is None


def test_rng_state_round_trip():
    s = C.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    C.set_rng_state(pickle.loads(pickle.dumps(s)))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_config_diff_ignores_run_keys():
    from mmengine.config import Config

    a = Config(dict(work_dir="/a", load_from=None, optim_wrapper=dict(optimizer=dict(lr=0.01)), model=dict(depth=18)))
    b = Config(dict(work_dir="/b", load_from="/a/iter_4.pth", resume=True,
                    optim_wrapper=dict(optimizer=dict(lr=0.02)), model=dict(depth=18)))
    assert C.config_diff(C.config_snapshot(a), C.config_snapshot(b)) == ["optim_wrapper.optimizer.lr: 0.01 -> 0.02"]
    assert C.config_diff(C.config_snapshot(a), C.config_snapshot(a)) == []


def test_strict_load_allows_only_fresh_parts():
    src = nn.ModuleDict({"backbone": nn.Linear(2, 2), "head": nn.Linear(2, 3)})
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    dst = nn.ModuleDict({"backbone": nn.Linear(2, 2), "head": nn.Linear(2, 3)})
    with pytest.raises(C.CheckpointError, match="missing keys.*head.weight"):
        C.load_into_model(dst, sd)
    C.load_into_model(dst, sd, fresh=[r"^head\."])
    assert torch.equal(dst.backbone.weight, src.backbone.weight)
