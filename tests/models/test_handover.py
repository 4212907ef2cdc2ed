"""Stage hand-over (models/handover.py): exact kept / dropped / new key sets, shape checks, atomic files."""
from __future__ import annotations

import os

import pytest
import torch

from agvm.mm.checkpoint import RefusedCheckpoint
from models.handover import (HandoverError, convert_file, load_state_dict, o365_to_coco, pretrain_to_detector,
                             save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "htc_x", "htc_x_uninet_tiny.py")


def _t(*shape):
    return torch.randn(*shape)


def _pretrain_sd():
    return {"stem.0.weight": _t(4, 3, 3, 3), "stages.0.blocks.0.conv.weight": _t(4, 4, 3, 3),
            "stages.1.norm.weight": _t(8), "head.conv.weight": _t(16, 8, 1, 1), "head.bn.running_mean": _t(16),
            "classifier.weight": _t(10, 16), "classifier.bias": _t(10)}


def test_pretrain_to_detector_keys_exact() -> None:
    out, rep = pretrain_to_detector(_pretrain_sd())
    assert sorted(out) == ["backbone.stages.0.blocks.0.conv.weight", "backbone.stages.1.norm.weight",
                           "backbone.stem.0.weight"]
    assert rep.kept == sorted(out)
    assert set(rep.dropped) == {"head.conv.weight", "head.bn.running_mean", "classifier.weight", "classifier.bias"}
    sd = _pretrain_sd()
    out, _ = pretrain_to_detector(sd)
    assert out["backbone.stem.0.weight"] is sd["stem.0.weight"]  # values untouched


def test_pretrain_to_detector_errors() -> None:
    bad = dict(_pretrain_sd(), **{"module.stem.0.weight": _t(1)})
    with pytest.raises(HandoverError, match="neither UniNet backbone"):
        pretrain_to_detector(bad)
    with pytest.raises(HandoverError, match="no UniNet backbone"):
        pretrain_to_detector({"classifier.weight": _t(2, 2)})
    target = {"backbone.stem.0.weight": (4, 3, 3, 3), "backbone.stages.0.blocks.0.conv.weight": (4, 4, 3, 3),
              "backbone.stages.1.norm.weight": (9,), "neck.a.weight": (1,)}
    with pytest.raises(HandoverError, match=r"stages.1.norm.weight: shape \(8,\) != target \(9,\)"):
        pretrain_to_detector(_pretrain_sd(), target)
    target["backbone.stages.1.norm.weight"] = (8,)
    target["backbone.stages.2.extra"] = (3,)
    with pytest.raises(HandoverError, match="the target needs it"):
        pretrain_to_detector(_pretrain_sd(), target)
    del target["backbone.stages.2.extra"]
    _, rep = pretrain_to_detector(_pretrain_sd(), target)
    assert rep.new == ["neck.a.weight"]


def _o365_sd(k: int = 365, d: int = 8):
    sd = {"backbone.stem.0.weight": _t(4, 3, 3, 3), "neck.rcnet.lateral_convs.0.conv.weight": _t(d, 4, 1, 1),
          "rpn_head.rpn_cls.weight": _t(3, d, 1, 1), "roi_head.glbctx_head.convs.0.conv1.weight": _t(d, d, 3, 3),
          "roi_head.glbctx_head.fc.weight": _t(k, d), "roi_head.glbctx_head.fc.bias": _t(k)}
    for i in range(3):
        p = f"roi_head.bbox_head.{i}."
        sd.update({p + "pos_embed": _t(1, 49, d), p + "cls_blocks.0.attn.qkv.weight": _t(3 * d, d),
                   p + "reg_blocks.0.mlp.fc1.weight": _t(4 * d, d), p + "cls_norm.weight": _t(d),
                   p + "reg_norm.bias": _t(d), p + "fc_cls.weight": _t(k + 1, d), p + "fc_cls.bias": _t(k + 1),
                   p + "fc_reg.weight": _t(4, d), p + "fc_reg.bias": _t(4)})
    return sd


def test_o365_to_coco_keys_exact() -> None:
    sd = _o365_sd()
    out, rep = o365_to_coco(sd)
    dropped = {f"roi_head.bbox_head.{i}.fc_cls.{w}" for i in range(3) for w in ("weight", "bias")}
    dropped |= {"roi_head.glbctx_head.fc.weight", "roi_head.glbctx_head.fc.bias"}
    assert set(rep.dropped) == dropped
    assert set(out) == set(sd) - dropped and rep.kept == sorted(out)
    assert rep.dropped["roi_head.glbctx_head.fc.bias"] == "365-class global-context classifier"
    assert all(out[k] is sd[k] for k in out)


def test_o365_to_coco_errors_and_mask_branch() -> None:
    sd = _o365_sd()
    with pytest.raises(HandoverError, match="match no hand-over rule"):
        o365_to_coco(dict(sd, **{"roi_head.semantic_head.conv.weight": _t(1)}))
    with_mask = dict(sd, **{"roi_head.mask_head.conv_logits.weight": _t(80, 8, 1, 1)})
    with pytest.raises(HandoverError, match="mask branch"):
        o365_to_coco(with_mask)
    _, rep = o365_to_coco(with_mask, allow_src_mask=True)
    assert "roi_head.mask_head.conv_logits.weight" in rep.dropped
    with pytest.raises(HandoverError, match="no 'neck.\\*'"):
        o365_to_coco({k: v for k, v in sd.items() if not k.startswith("neck.")})
    # per-class box regression would not fit a different class count: caught by the target shape check
    target = {k: tuple(v.shape) for k, v in o365_to_coco(sd)[0].items()}
    target["roi_head.bbox_head.0.fc_reg.weight"] = (4 * 80, 8)
    with pytest.raises(HandoverError, match="fc_reg.weight: shape"):
        o365_to_coco(sd, target)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo SHOULD-NOT-RUN > boom.txt",))


def test_files_are_written_atomically_and_load_back(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "pre.pth"
    torch.save({"model": {"module." + k: v for k, v in _pretrain_sd().items()}}, src)
    dst = tmp_path / "out" / "init.pth"
    rep = convert_file("pretrain-to-det", str(src), str(dst))
    assert sorted(os.listdir(dst.parent)) == ["init.pth", "init.pth.sha256"]  # no temporary file left
    ck = torch.load(dst, weights_only=True)
    assert sorted(ck["state_dict"]) == rep.kept and ck["meta"]["handover"]["dropped"] == rep.dropped
    assert sorted(load_state_dict(str(dst))) == rep.kept
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(str(tmp_path / "missing.pth"))
    planted = tmp_path / "planted.pth"  # unpickling it would run code: refused, never run
    torch.save({"model": _pretrain_sd(), "x": _Boom()}, planted)
    with pytest.raises(RefusedCheckpoint, match="refused.*--unsafe-load"):
        convert_file("pretrain-to-det", str(planted), str(tmp_path / "x.pth"))
    assert not (tmp_path / "boom.txt").exists()
    with pytest.raises(ValueError, match="unknown hand-over"):
        convert_file("coco-to-lvis", str(src), str(dst))

    def broken_save(obj, path):  # a crash half-way through writing
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    before = dst.read_bytes()
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"a": torch.zeros(1)}, str(dst), rep)
    assert dst.read_bytes() == before and sorted(os.listdir(dst.parent)) == ["init.pth", "init.pth.sha256"]


def _no_bn_counters(keys) -> set:
    """torch's load_state_dict does not report missing BatchNorm ``num_batches_tracked`` counters."""
    return {k for k in keys if not k.endswith("num_batches_tracked")}


@pytest.mark.mm
@pytest.mark.slow
def test_handover_between_real_tiny_models(tmp_path) -> None:
    """Tiny UniNet (timm) -> tiny HTC-X O365 (5 classes, no mask) -> tiny HTC-X COCO (3 classes, mask): exact sets,
    checked against models built from the configs, and the weights land in the next model."""
    pytest.importorskip("mmdet")
    import timm
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import models.htc_x.register  # noqa: F401
    import models.mmdet_uninet  # noqa: F401
    import models.uninet  # noqa: F401

    register_all_modules()
    pre = timm.create_model("uninet_tiny").state_dict()
    cfg = Config.fromfile(TINY)
    o365_cfg = cfg.model.copy()
    o365_cfg.roi_head = dict(o365_cfg.roi_head, num_classes=5, mask_roi_extractor=None, mask_head=None)
    o365 = MODELS.build(o365_cfg)
    coco = MODELS.build(cfg.model)
    o_sd, c_sd = o365.state_dict(), coco.state_dict()

    out, rep = pretrain_to_detector(pre, o_sd)
    assert set(out) == {k for k in o_sd if k.startswith("backbone.")}
    assert set(rep.dropped) == {k for k in pre if k.startswith(("head.", "classifier."))} and rep.dropped
    assert set(rep.new) == {k for k in o_sd if not k.startswith("backbone.")}
    missing, unexpected = o365.load_state_dict(out, strict=False)
    assert not unexpected and set(missing) == _no_bn_counters(rep.new)

    out2, rep2 = o365_to_coco(o_sd, c_sd)
    new = set(rep2.new)
    assert {k for k in c_sd if ".mask_head." in k} <= new and any(".mask_head." in k for k in new)
    assert {k for k in c_sd if ".fc_cls." in k or "glbctx_head.fc." in k} <= new
    assert new == {k for k in c_sd if ".mask_head." in k or ".fc_cls." in k or "glbctx_head.fc." in k}
    assert set(rep2.dropped) == {k for k in o_sd if ".fc_cls." in k or "glbctx_head.fc." in k}
    assert set(out2) == set(o_sd) - set(rep2.dropped)
    missing, unexpected = coco.load_state_dict(out2, strict=False)
    assert not unexpected and set(missing) == _no_bn_counters(new)
    assert torch.equal(coco.roi_head.bbox_head[2].fc_reg.weight, o365.roi_head.bbox_head[2].fc_reg.weight)
    # the same through files, checked against the config-built (meta device) target
    src = tmp_path / "o365.pth"
    torch.save({"state_dict": o_sd, "meta": {}}, src)
    rep3 = convert_file("o365-to-coco", str(src), str(tmp_path / "coco_init.pth"), target_config=TINY)
    assert rep3.kept == rep2.kept and rep3.new == rep2.new
    # load_from's strict load (agvm.mm.checkpoint) accepts exactly the parts the file marks fresh as missing
    from agvm.mm.checkpoint import CheckpointError, load_into_model, read

    init = read(tmp_path / "coco_init.pth")
    fresh_model = MODELS.build(cfg.model)
    load_into_model(fresh_model, init["state_dict"], fresh=init["meta"]["handover"]["fresh"])
    assert torch.equal(fresh_model.roi_head.bbox_head[2].fc_reg.weight, o365.roi_head.bbox_head[2].fc_reg.weight)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_into_model(fresh_model, {k: v for k, v in init["state_dict"].items() if not k.startswith("neck.")},
                        fresh=init["meta"]["handover"]["fresh"])
