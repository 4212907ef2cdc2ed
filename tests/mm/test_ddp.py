"""Two gloo ranks through ``train(..., launcher='pytorch')``: DDP-wrapped model, the distributed
measurement hook (``agvm.distributed.register_hook``) registered by AGVMHook, Phi/mu logged."""
import json
import os.path as osp
import socket

import pytest

from _mm_helpers import tiny_options

pytestmark = [pytest.mark.slow, pytest.mark.mm]
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_training_uses_the_distributed_hook(synthetic_root, tmp_path):
    import torch.multiprocessing as mp

    import _ddp_worker

    work = str(tmp_path / "work")
    options = tiny_options("retinanet", synthetic_root, **{"train_cfg.max_epochs": 4, "train_cfg.val_interval": 4})
    config = osp.join(ROOT, "configs", "retinanet", "retinanet_r50_bs32_agvm_sgd.py")
    mp.spawn(_ddp_worker.run, args=(2, config, work, options, _free_port()), nprocs=2, join=True)
    with open(osp.join(work, "agvm_variance.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # 4 images on 2 ranks, 2 per rank: one step per epoch, 4 steps, tau = 2
    assert [r["iter"] for r in records] == [2, 4]
    for r in records:
        assert sorted(r["phi"]) == ["backbone", "bbox_head", "neck"] and r["batch_size"] == 4
        assert all(v is not None and 0.0 <= v <= 2.0 for v in r["phi"].values())
        assert r["mu"]["backbone"] == 1.0
    with open(osp.join(work, "rank0.json")) as f:
        assert "coco/bbox_mAP" in json.load(f)
    assert osp.exists(osp.join(work, "metrics.json"))
    from agvm.mm.checkpoint import read  # each checkpoint holds every rank's generator state (gathered to rank 0)

    assert len(read(osp.join(work, "epoch_4.pth"))["meta"]["rng_state"]) == 2
