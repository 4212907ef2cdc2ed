"""``agvm.mm.train.train``: resume from the newest complete checkpoint, dataset-root and pretrained
errors, latest_checkpoint ignoring partial files, and the authors'-code schedule pieces."""
import json
import os
import os.path as osp

import pytest
import torch

from _mm_helpers import tiny_options

pytestmark = pytest.mark.mm
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RETINA = osp.join(ROOT, "configs", "retinanet", "retinanet_r50_bs32_agvm_sgd.py")


@pytest.mark.slow
def test_resume_continues_agvm_state(synthetic_root, tmp_path):
    from agvm.mm.train import train

    work = str(tmp_path / "work")
    train(RETINA, work, tiny_options("retinanet", synthetic_root), resume=True)
    first = torch.load(osp.join(work, "epoch_2.pth"), map_location="cpu", weights_only=False)
    assert first["optimizer"]["agvm"]["t"] == 4
    # a partial checkpoint must be ignored; training continues from epoch 2 to epoch 3
    with open(osp.join(work, "epoch_3.pth.tmp"), "wb") as f:
        f.write(b"partial")
    metrics = train(RETINA, work, tiny_options("retinanet", synthetic_root, **{"train_cfg.max_epochs": 3,
                                                                                "train_cfg.val_interval": 3}),
                    allow_config_change=True)  # a longer schedule: an explicit config change
    last = torch.load(osp.join(work, "epoch_3.pth"), map_location="cpu", weights_only=False)
    assert last["optimizer"]["agvm"]["t"] == 6  # 4 steps before the restart + 2 after it
    assert last["meta"]["epoch"] == 3
    with open(osp.join(work, "agvm_variance.jsonl")) as f:
        assert [json.loads(line)["iter"] for line in f] == [2, 4, 6]
    with open(osp.join(work, "metrics.json")) as f:
        assert json.load(f) == pytest.approx(metrics) and "coco/bbox_mAP" in metrics


def test_latest_checkpoint(tmp_path):
    from agvm.mm.runner import latest_checkpoint

    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for name in ("epoch_2.pth", "epoch_10.pth", "epoch_11.pth.tmp", "last_checkpoint", "epoch_x.pth"):
        (tmp_path / name).write_bytes(b"x")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "epoch_10.pth")


def test_dataset_root_error_names_path_and_variable(tmp_path, monkeypatch):
    from agvm.mm.train import train

    missing = str(tmp_path / "no_coco") + "/"
    monkeypatch.setenv("AGVM_COCO_ROOT", missing)
    with pytest.raises(FileNotFoundError) as e:
        train(RETINA, str(tmp_path / "w"))
    msg = str(e.value)
    assert "no_coco" in msg and "AGVM_COCO_ROOT" in msg and "dataset=synthetic" in msg
    monkeypatch.setenv("AGVM_ADE_ROOT", str(tmp_path / "no_ade"))
    with pytest.raises(FileNotFoundError, match="AGVM_ADE_ROOT"):
        train(osp.join(ROOT, "configs", "semantic_fpn", "semantic_fpn_r50_bs32_sgd.py"), str(tmp_path / "w"))


def test_pretrained_weights_are_not_downloaded(tmp_path, monkeypatch):
    from agvm.mm.train import check_pretrained, load_config

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("AGVM_ALLOW_DOWNLOAD", raising=False)
    cfg = load_config(RETINA)
    with pytest.raises(FileNotFoundError, match="torchvision://resnet50.*init_cfg=None"):
        check_pretrained(cfg)
    swin = load_config(osp.join(ROOT, "configs", "faster_rcnn", "faster_rcnn_swin-t_bs32_adamw.py"))
    with pytest.raises(FileNotFoundError, match="swin_tiny_patch4_window7_224"):
        check_pretrained(swin)
    cfg.model.backbone.init_cfg = None
    check_pretrained(cfg)  # nothing to load: fine
    synthetic = load_config(RETINA, {"dataset": "synthetic"})
    assert synthetic.model.backbone.init_cfg is None and synthetic.dataset == "synthetic"


def test_exp_warmup_schedule():
    from mmengine.optim.scheduler import MultiStepLR

    from agvm.mm import register_all
    from agvm.mm.schedulers import ExpWarmupLR

    register_all()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    warm = ExpWarmupLR(opt, start_factor=0.001, by_epoch=False, begin=0, end=4)
    steps = MultiStepLR(opt, milestones=[6], gamma=0.1, by_epoch=False)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        warm.step()
        steps.step()
    expected = [0.001 ** (1 - t / 3) for t in range(4)] + [1.0, 1.0, 0.1, 0.1]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_cli_options_and_missing_config(tmp_path):
    from agvm.mm.train import parse_cfg_options, main

    o = parse_cfg_options(["dataset=synthetic", "train_cfg.max_epochs=1", "model.neck.in_channels=[64,128]"])
    assert o == {"dataset": "synthetic", "train_cfg.max_epochs": 1, "model.neck.in_channels": [64, 128]}
    assert parse_cfg_options([]) == {}
    with pytest.raises(FileNotFoundError, match="config file not found"):
        main([str(tmp_path / "nope.py"), "--work-dir", str(tmp_path / "w")])
