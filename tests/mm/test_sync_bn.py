"""SyncBN in the training entry point: mmengine's ``sync_bn`` key is kept only where it can act (several CUDA
ranks) and removed, with one logged line, in one process or on CPU ranks (agvm.mm.train.sync_bn_plan)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.mm


def _cfg(**kw):
    pytest.importorskip("mmengine")
    from mmengine.config import Config

    return Config(dict(model=dict(type="X"), **kw))


def test_no_key_no_plan():
    from agvm.mm.train import sync_bn_plan

    cfg = _cfg()
    assert sync_bn_plan(cfg, "none") == "" and "sync_bn" not in cfg


def test_one_process_keeps_batchnorm(monkeypatch):
    from agvm.mm.train import sync_bn_plan

    cfg = _cfg(sync_bn="torch")
    note = sync_bn_plan(cfg, "none")
    assert "sync_bn" not in cfg and "one process" in note and "per-process" in note


def test_several_cuda_ranks_keep_the_key_and_cpu_ranks_drop_it(monkeypatch):
    import torch

    from agvm.mm.train import sync_bn_plan

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg(sync_bn="torch")
    assert "SyncBatchNorm" in sync_bn_plan(cfg, "pytorch") and cfg.sync_bn == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    note = sync_bn_plan(cfg, "pytorch")
    assert "sync_bn" not in cfg and "4 CPU ranks" in note


def test_unknown_value_is_one_clear_error():
    from agvm.mm.train import sync_bn_plan

    with pytest.raises(ValueError, match="sync_bn='yes' is not understood"):
        sync_bn_plan(_cfg(sync_bn="yes"), "none")


def test_mmengine_converts_what_the_configs_train():
    """The key is mmengine's: its converter turns the BatchNorm layers the configs train (ResNet with norm_eval
    False, SEPC's iBN) into torch's SyncBatchNorm, and its revert turns them back for one process."""
    pytest.importorskip("mmdet")
    import torch
    from mmengine.model import convert_sync_batchnorm, revert_sync_batchnorm

    import models.htc_x.register  # noqa: F401
    from models.htc_x.sepc import IBN

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), IBN(8))
    synced = convert_sync_batchnorm(net, "torch")
    kinds = [type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.SyncBatchNorm, torch.nn.SyncBatchNorm]
    back = revert_sync_batchnorm(synced)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in back.modules())
