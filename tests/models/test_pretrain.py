"""Stage 1 (models/pretrain.py + configs/uninet/uninet_g_in22k_pretrain.py): the paper's settings, the
missing-data error, a tiny run on generated images, the timm-format hand-over checkpoint and resume."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pretrain import load_config, main, resolve_train_dir

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "uninet" / "uninet_g_in22k_pretrain.py")
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]


def _make_imagefolder(root: Path, per_class: int = 8, size: int = 40) -> Path:
    """A learnable ImageFolder: one colour per class plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, col in enumerate(COLORS):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = np.clip(np.array(col)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.png")
    return root


TINY = ["model.name=uninet_tiny", "model.num_classes=4", "data.input_size=32", "data.batch_per_gpu=8",
        "batch_size=8", "data.workers=0", "train.log_interval=1", "scheduler.warmup_epochs=0",
        "export_name=uninet_tiny_pretrain.pth"]


def test_config_has_the_papers_settings():
    cfg = load_config(CONFIG)
    assert cfg["model"]["name"] == "uninet_g" and cfg["model"]["drop_path_rate"] == 0.3
    assert cfg["scheduler"]["epochs"] == 150 and cfg["scheduler"]["sched"] == "cosine"
    assert cfg["optimizer"]["opt"] == "adamw" and cfg["optimizer"]["lr"] == 5e-3
    assert cfg["scheduler"]["min_lr"] == 1e-4 and cfg["optimizer"]["weight_decay"] == 0.03
    assert cfg["batch_size"] == 5120
    assert cfg["mixup"]["mixup_alpha"] > 0 and cfg["mixup"]["cutmix_alpha"] > 0 and cfg["data"]["re_prob"] > 0
    over = load_config(CONFIG, ["optimizer.lr=1e-3", "train.max_iters=3", "mixup=None", "model.name=uninet_tiny"])
    assert over["optimizer"]["lr"] == 1e-3 and over["train"]["max_iters"] == 3 and over["mixup"] is None
    assert over["model"]["name"] == "uninet_tiny"
    with pytest.raises(ValueError, match="key=value"):
        load_config(CONFIG, ["optimizer.lr"])
    with pytest.raises(KeyError, match="not a section"):
        load_config(CONFIG, ["nosuch.lr=1"])


def test_missing_data_root_names_the_path(tmp_path, monkeypatch):
    cfg = load_config(CONFIG)
    monkeypatch.delenv("AGVM_IMAGENET_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="AGVM_IMAGENET_ROOT"):
        resolve_train_dir(cfg)
    missing = tmp_path / "no_imagenet"
    monkeypatch.setenv("AGVM_IMAGENET_ROOT", str(missing))
    with pytest.raises(FileNotFoundError, match=str(missing / "train")):
        resolve_train_dir(cfg)


@pytest.mark.slow
def test_tiny_pretrain_run_checkpoint_and_resume(tmp_path):
    """A few iterations with the full augmentation stack (RandAugment, Mixup/CutMix, Random Erasing, drop path);
    the hand-over checkpoint loads into timm's features_only model, and a second call resumes."""
    import timm

    data = _make_imagefolder(tmp_path / "inet")
    work = tmp_path / "work"
    s = main([CONFIG, "--data-root", str(data), "--work-dir", str(work), "--override", *TINY,
              "train.max_iters=3", "scheduler.epochs=2"])
    assert s["steps"] == 3 and len(s["losses"]) == 3 and all(np.isfinite(s["losses"]))
    export = work / "uninet_tiny_pretrain.pth"
    assert export.is_file() and (work / "last.pth").is_file()
    assert json.loads((work / "metrics.json").read_text())["steps"] == 3
    assert not list(work.glob(".*tmp*"))  # atomic writes leave no temporaries
    sd = torch.load(export, map_location="cpu", weights_only=True)
    assert "classifier.weight" in sd and sd["classifier.weight"].shape == (4, 128)
    fresh = timm.create_model("uninet_tiny", num_classes=4).state_dict()
    assert not torch.equal(sd["stages.5.blocks.0.attn.qkv.weight"], fresh["stages.5.blocks.0.attn.qkv.weight"])
    feat = timm.create_model("uninet_tiny", features_only=True, out_indices=(2, 4, 5), pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(export)))
    torch.testing.assert_close(feat.model.stages[5].blocks[0].attn.qkv.weight, sd["stages.5.blocks.0.attn.qkv.weight"])
    # resume: continues at step 3 (not from scratch), stops at 5, and matches an uninterrupted 5-step run
    s2 = main([CONFIG, "--data-root", str(data), "--work-dir", str(work), "--override", *TINY,
               "train.max_iters=5", "scheduler.epochs=2"])
    assert s2["steps"] == 5 and len(s2["losses"]) == 2
    straight = main([CONFIG, "--data-root", str(data), "--work-dir", str(tmp_path / "straight"), "--override",
                     *TINY, "train.max_iters=5", "scheduler.epochs=2"])
    assert straight["losses"][:3] == s["losses"]
    np.testing.assert_allclose(straight["losses"][3:], s2["losses"], rtol=1e-5)
    with pytest.raises(ValueError, match="class folders"):
        main([CONFIG, "--data-root", str(data), "--work-dir", str(tmp_path / "w2"), "--override", *TINY,
              "model.num_classes=10", "train.max_iters=1"])


@pytest.mark.slow
def test_tiny_pretrain_loss_goes_down(tmp_path):
    data = _make_imagefolder(tmp_path / "inet")
    s = main([CONFIG, "--data-root", str(data), "--work-dir", str(tmp_path / "work"), "--override", *TINY,
              "train.max_iters=10", "scheduler.epochs=3", "optimizer.lr=3e-3", "model.drop_path_rate=0.0",
              "mixup=None", "data.auto_augment=None", "data.re_prob=0.0"])
    first, last = np.mean(s["losses"][:3]), np.mean(s["losses"][-3:])
    assert last < 0.8 * first, s["losses"]
