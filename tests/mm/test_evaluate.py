"""agvm.mm.evaluate: checkpoint reading (safe, clear errors), mmdet 2.x remapping, strict key check, evaluation."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from agvm.mm import evaluate as E

REPO = Path(__file__).resolve().parents[2]


class Det(nn.Module):
    """A stand-in with a detector's layout (backbone / neck / rpn_head / roi_head)."""

    def __init__(self, rpn_out=3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.neck = nn.Conv2d(4, 4, 1)
        self.rpn_head = nn.Module()
        self.rpn_head.rpn_cls = nn.Conv2d(4, rpn_out, 1)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.Module()
        self.roi_head.bbox_head.fc_cls = nn.Linear(8, 4)


# ------------------------------------------------------------------ reading files (more in test_checkpoint.py)
def test_evaluate_reads_through_the_checkpoint_module(tmp_path):
    from mmengine.logging import HistoryBuffer

    f = tmp_path / "mmengine.pth"
    hb = HistoryBuffer()
    hb.update(1.0)
    torch.save({"meta": {"mmengine_version": "0.10.7"}, "state_dict": Det().state_dict(),
                "message_hub": {"log_scalars": {"loss": hb}}}, f)
    dst = Det()
    assert E.prepare(dst, str(f))[0] == "format: mmengine"
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    f.write_bytes(bytes(data))
    with pytest.raises(E.CheckpointError, match="is damaged"):
        E.prepare(Det(), str(f))


# ------------------------------------------------------------------ key checks and remapping
def test_mmdet2_layout_with_module_prefix_loads_exactly(tmp_path):
    src = Det()
    f = tmp_path / "authors.pth"
    torch.save({"meta": {"mmdet_version": "2.25.1", "mmcv_version": "1.7.0", "CLASSES": ("a", "b", "c")},
                "state_dict": {"module." + k: v for k, v in src.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}}, f)
    dst = Det()
    notes = E.prepare(dst, str(f))
    assert notes[0] == "format: mmdet2" and any("module." in n for n in notes)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_key_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    sd = Det().state_dict()
    sd.pop("roi_head.bbox_head.fc_cls.weight")
    sd["roi_head.mask_head.conv_logits.weight"] = torch.zeros(1)
    sd["neck.weight"] = torch.zeros(5, 4, 1, 1)
    f = tmp_path / "wrong.pth"
    torch.save({"state_dict": sd, "meta": {"mmengine_version": "0.10.7"}}, f)
    with pytest.raises(E.CheckpointError) as info:
        E.prepare(Det(), str(f))
    msg = str(info.value)
    assert "missing keys" in msg and "roi_head.bbox_head.fc_cls.weight" in msg
    assert "unexpected keys" in msg and "roi_head.mask_head.conv_logits.weight" in msg
    assert "shape mismatches" in msg and "neck.weight: checkpoint (5, 4, 1, 1) vs model (4, 4, 1, 1)" in msg


def test_missing_num_batches_tracked_is_fine(tmp_path):
    sd = {k: v for k, v in Det().state_dict().items() if not k.endswith("num_batches_tracked")}
    m = Det()
    E.load_into_model(m, sd)
    assert torch.equal(m.backbone[0].weight, sd["backbone.0.weight"])


def test_mmdet1_and_backbone_only_refused(tmp_path):
    sd = Det().state_dict()
    old = {k.replace("roi_head.", ""): v for k, v in sd.items()}
    f = tmp_path / "v1.pth"
    torch.save({"state_dict": old, "meta": {}}, f)
    with pytest.raises(E.CheckpointError, match="mmdetection 1.x.*upgrade_model_version"):
        E.prepare(Det(), str(f))
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    bb["head.fc.weight"] = torch.zeros(2, 2)
    f2 = tmp_path / "timm.pth"
    torch.save(bb, f2)
    with pytest.raises(E.CheckpointError, match="backbone weights only.*init_cfg"):
        E.prepare(Det(), str(f2))


def test_rpn_softmax_checkpoint_converted_to_sigmoid_model(tmp_path):
    src = Det(rpn_out=6)  # 3 anchors x (fg, bg) softmax logits, like the authors' use_sigmoid=False RPN
    f = tmp_path / "softmax_rpn.pth"
    torch.save({"state_dict": src.state_dict(), "meta": {"mmdet_version": "2.25.1"}}, f)
    dst = Det(rpn_out=3)
    notes = E.prepare(dst, str(f))
    assert any("softmax RPN" in n for n in notes)
    x = torch.randn(2, 4, 5, 5)
    z = src.rpn_head.rpn_cls(x)  # [N, 6, H, W]: channels (a0 fg, a0 bg, a1 fg, ...)
    soft = z.permute(0, 2, 3, 1).reshape(-1, 2).softmax(-1)[:, 0]
    sig = dst.rpn_head.rpn_cls(x).permute(0, 2, 3, 1).reshape(-1).sigmoid()
    torch.testing.assert_close(sig, soft, rtol=1e-5, atol=1e-6)


@pytest.mark.mm
@pytest.mark.slow
def test_mmdet3_uses_the_mmdet2_parameter_names():
    """The names of the authors' mmdet 2.x checkpoints (Faster/Mask R-CNN, RetinaNet) exist unchanged in mmdet 3.3."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    mmdet2_names = {
        "faster_rcnn": ["rpn_head.rpn_conv.weight", "rpn_head.rpn_cls.weight", "rpn_head.rpn_reg.bias",
                        "roi_head.bbox_head.shared_fcs.0.weight", "roi_head.bbox_head.shared_fcs.1.bias",
                        "roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_reg.weight",
                        "neck.lateral_convs.0.conv.weight", "neck.fpn_convs.3.conv.bias",
                        "backbone.layer4.2.bn3.running_var", "backbone.layer1.0.downsample.0.weight"],
        "mask_rcnn": ["roi_head.mask_head.convs.3.conv.weight", "roi_head.mask_head.upsample.weight",
                      "roi_head.mask_head.conv_logits.bias", "roi_head.bbox_head.fc_cls.bias"],
        "retinanet": ["bbox_head.cls_convs.3.conv.weight", "bbox_head.reg_convs.0.conv.bias",
                      "bbox_head.retina_cls.weight", "bbox_head.retina_reg.bias", "neck.fpn_convs.4.conv.weight"],
    }
    for pipeline, names in mmdet2_names.items():
        cfg = Config.fromfile(str(REPO / "configs" / "_base_" / f"{pipeline}.py"))
        cfg.model.backbone.init_cfg = None
        keys = set(MODELS.build(cfg.model).state_dict())
        assert not [n for n in names if n not in keys], pipeline


# ------------------------------------------------------------------ full evaluation paths
@pytest.mark.mm
@pytest.mark.slow
def test_runner_test_on_synthetic_data(tmp_path, monkeypatch):
    """A checkpoint of a Faster R-CNN (mmengine layout) evaluated through Runner.test with CocoMetric."""
    from mmdet.registry import MODELS

    from agvm.mm.train import load_config

    monkeypatch.setenv("AGVM_SYNTHETIC_ROOT", str(tmp_path / "synthetic"))
    config = str(REPO / "configs" / "_base_" / "faster_rcnn.py")
    opts = {"dataset": "synthetic", "synthetic_image_size": 64, "model.backbone.depth": 18,
            "model.neck.in_channels": [64, 128, 256, 512]}  # R18: a quick CPU test
    cfg = load_config(config, opts)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "model.pth"
    torch.save({"meta": {"mmengine_version": "0.10.7"}, "state_dict": model.state_dict()}, ckpt)
    metrics = E.evaluate(config, str(ckpt), opts, work_dir=str(tmp_path / "eval"))
    assert "coco/bbox_mAP" in metrics and 0.0 <= metrics["coco/bbox_mAP"] <= 1.0
    # the same file with a wrong head size: the key check stops it before any evaluation
    sd = model.state_dict()
    sd["roi_head.bbox_head.fc_cls.weight"] = torch.zeros(81, 1024)
    torch.save({"state_dict": sd, "meta": {}}, ckpt)
    with pytest.raises(E.CheckpointError, match="fc_cls.weight: checkpoint \\(81, 1024\\)"):
        E.evaluate(config, str(ckpt), opts, work_dir=str(tmp_path / "eval2"))


@pytest.mark.slow
def test_uninet_timm_weights_classification(tmp_path):
    """timm-format UniNet weights with a classification config: top-1/top-5 on an ImageFolder tree."""
    import numpy as np
    import timm
    from PIL import Image

    import models.uninet  # noqa: F401

    for c in ("a", "b"):
        d = tmp_path / "data" / "val" / c
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = tmp_path / "tiny.py"
    cfg.write_text(
        "model = dict(name='uninet_tiny', num_classes=2)\n"
        "data = dict(root=None, train_split='train', input_size=64, interpolation='bicubic', workers=0,"
        " batch_per_gpu=2)\nbatch_size = 2\noptimizer = dict(opt='adamw', lr=1e-3, weight_decay=0.0)\n"
        "scheduler = dict(sched='cosine', epochs=1, min_lr=0.0)\ntrain = dict(amp=None)\n"
        "work_dir = 'unused'\nexport_name = 'unused.pth'\n")
    torch.manual_seed(0)
    net = timm.create_model("uninet_tiny", num_classes=2)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    m = E.evaluate(str(cfg), str(tmp_path / "w.pth"), data_root=str(tmp_path / "data"))
    assert m["num_images"] == 4 and m["accuracy/top5"] == 100.0
    # top-1 recomputed by hand with the same weights and timm's eval transform
    from timm.data import create_transform
    tf = create_transform(64, is_training=False, interpolation="bicubic")
    net.eval()
    correct = 0
    for label, c in enumerate(("a", "b")):
        for i in range(2):
            x = tf(Image.open(tmp_path / "data" / "val" / c / f"{i}.png").convert("RGB"))[None]
            correct += int(net(x).argmax(1).item() == label)
    assert m["accuracy/top1"] == pytest.approx(100.0 * correct / 4)


def test_cli_reports_errors_without_trace(tmp_path, capsys):
    (tmp_path / "c.py").write_text("model = dict(\n    name='uninet_tiny', num_classes=2)\n")
    from agvm.cli import run

    assert run(E.main, [str(tmp_path / "c.py"), str(tmp_path / "missing.pth")]) == 2  # python -m agvm.mm.evaluate
    err = capsys.readouterr().err
    assert err.startswith("error:") and "lacks" in err and "Traceback" not in err


@pytest.mark.mm
@pytest.mark.slow
def test_runs_own_checkpoint_reproduces_its_metrics(tmp_path, synthetic_root, capsys):
    """Train through agvm.mm.train.train, then evaluate the run's dumped config + mmengine checkpoint (message hub
    included: weights_only with the minimal allow-list) and get the run's own final metrics back; the same checkpoint
    also serves as load_from of a new run."""
    from agvm.mm.train import train

    opts = {"dataset": "synthetic", "synthetic_root": synthetic_root, "synthetic_image_size": 64,
            "model.backbone.depth": 18, "model.backbone.init_cfg": None, "model.neck.in_channels": [64, 128, 256, 512],
            "model.train_cfg.rcnn.sampler.num": 64, "model.roi_head.bbox_head.fc_out_channels": 64,
            "train_cfg.max_epochs": 2, "train_cfg.val_interval": 2, "log_level": "WARNING", "randomness": {"seed": 0},
            "optim_wrapper.optimizer.interval": 2, "optim_wrapper.optimizer.lr": 0.01,
            "param_scheduler": [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2)]}
    config = str(REPO / "configs" / "faster_rcnn" / "faster_rcnn_r50_bs32_agvm_sgd.py")
    wd = tmp_path / "run"
    trained = train(config, str(wd), opts, resume=False)
    dumped = wd / "faster_rcnn_r50_bs32_agvm_sgd.py"
    ckpt = wd / "epoch_2.pth"
    assert dumped.is_file() and ckpt.is_file()
    got = E.evaluate(str(dumped), str(ckpt), work_dir=str(tmp_path / "eval"))  # weights_only, message hub included
    assert set(trained) == set(got)
    assert any(v > 0 for v in trained.values())  # not an all-zero comparison
    for k, v in trained.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


@pytest.mark.mm
@pytest.mark.slow
def test_mmseg_checkpoint_evaluates_miou(tmp_path, synthetic_root):
    """An mmseg (Semantic FPN) checkpoint through Runner.test with IoUMetric on the synthetic ADE20K-format data."""
    from mmseg.registry import MODELS

    from agvm.mm.train import load_config

    config = str(REPO / "configs" / "_base_" / "semantic_fpn.py")
    opts = {"dataset": "synthetic", "synthetic_root": synthetic_root, "synthetic_image_size": 64,
            "model.backbone.depth": 18, "model.backbone.init_cfg": None, "model.pretrained": None,
            "model.neck.in_channels": [64, 128, 256, 512], "model.decode_head.channels": 32}
    cfg = load_config(config, opts)
    model = MODELS.build(cfg.model)
    ckpt = tmp_path / "seg.pth"
    torch.save({"meta": {"mmengine_version": "0.10.7"}, "state_dict": model.state_dict()}, ckpt)
    metrics = E.evaluate(config, str(ckpt), opts, work_dir=str(tmp_path / "eval"))
    assert "mIoU" in metrics and 0.0 <= metrics["mIoU"] <= 100.0
