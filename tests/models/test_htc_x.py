"""HTC-X parts (models/htc_x/): RCNet, SEPC, the decoupled transformer bbox head, HTC-Lite, tiny end-to-end run."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.mm
pytest.importorskip("mmdet")

import models.htc_x.register  # noqa: E402,F401  (registers the parts)
import models.mmdet_uninet  # noqa: E402,F401
from models.htc_x.decoupled_head import DecoupledTransformerBBoxHead  # noqa: E402
from models.htc_x.rcnet import RCNet  # noqa: E402
from models.htc_x.sepc import IBN, PConv, SEConv, SEPC  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "htc_x", "htc_x_uninet_tiny.py")
G_COCO = os.path.join(ROOT, "configs", "htc_x", "htc_x_uninet_g_coco.py")
G_O365 = os.path.join(ROOT, "configs", "htc_x", "htc_x_uninet_g_o365.py")


def _pyramid(h: int, w: int, n: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    for _ in range(n - 1):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return sizes


def _backbone_feats(h: int = 13, w: int = 21, channels=(16, 24, 32)) -> list[torch.Tensor]:
    sizes = _pyramid(h, w, len(channels))
    return [torch.randn(2, c, *s, requires_grad=True) for c, s in zip(channels, sizes)]


@pytest.mark.parametrize("use_dcn", [False, True])
def test_rcnet_six_levels_non_square_and_gradients(use_dcn: bool) -> None:
    torch.manual_seed(0)
    feats = _backbone_feats()
    neck = RCNet([16, 24, 32], 32, num_outs=6, use_dcn=use_dcn, norm_cfg=dict(type="GN", num_groups=8))
    out = neck(feats)
    assert [tuple(o.shape) for o in out] == [(2, 32, *s) for s in _pyramid(13, 21, 6)]
    sum(o.square().mean() for o in out).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    no_grad = [n for n, p in neck.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_rcnet_fusion_node_at_init_is_the_average_of_its_inputs() -> None:
    """Zero-initialised attention / gate convs: uniform attention (x HW = 1) and w = 0.5 (RCNet Sec. 3.1)."""
    torch.manual_seed(0)
    neck = RCNet([8, 8], 16, num_outs=2, use_dcn=False, use_csn=False, norm_cfg=None)
    node = neck.nodes[0]
    x1, x2 = torch.randn(1, 16, 6, 10), torch.randn(1, 16, 3, 5)
    up = F.interpolate(x2, size=(6, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(node(x1, x2), node.post_fusion(0.5 * x1 + 0.5 * up))
    # a non-zero gate moves the weight: w = sigmoid(b)
    with torch.no_grad():
        node.gate.bias.fill_(2.0)
    w = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(node(x1, x2), node.post_fusion(w * x1 + (1 - w) * up))


def test_csn_shifts_channels_cyclically_across_levels() -> None:
    """With the aggregation convs zeroed except for the shifted chunk, level l sees level l+1's chunk 0."""
    from models.htc_x.rcnet import CrossShiftNet

    csn = CrossShiftNet(16, 4, align_level=0, norm_cfg=None)
    feats = [torch.full((1, 16, 2, 2), float(l + 1)) for l in range(4)]
    captured = {}
    csn.aggregate[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    csn(feats)
    mixed = captured["x"]  # level 0 input: 16 own channels + 4 shifted chunks of 1 channel
    assert mixed.shape[1] == 16 + 4
    assert mixed[0, :16].eq(1).all()
    # chunks come from levels 0+1, 0-1 (cyclic: 3), 0+2, 0-2 (cyclic: 2) -> values 2, 4, 3, 3
    assert [float(mixed[0, 16 + k, 0, 0]) for k in range(4)] == [2.0, 4.0, 3.0, 3.0]


def test_pconv_matches_the_three_kernel_formula() -> None:
    """y_l = W0*x_l + W_down *_s2 x_{l-1} + up(W_up*x_{l+1}) (SEPC Sec. 3.1), plain convs, no iBN."""
    torch.manual_seed(0)
    pconv = PConv(8, use_dcn=False, ibn=False)
    feats = [torch.randn(1, 8, *s) for s in _pyramid(9, 14, 3)]
    out = pconv(feats)

    def conv(m, x, stride=1):
        return F.conv2d(x, m.conv.weight, m.bias, stride, 1)

    y1 = (conv(pconv.same, feats[1]) + conv(pconv.down, feats[0], 2)
          + F.interpolate(conv(pconv.up, feats[2]), size=feats[1].shape[-2:], mode="bilinear", align_corners=True))
    torch.testing.assert_close(out[1], F.relu(y1))
    y2 = conv(pconv.same, feats[2]) + conv(pconv.down, feats[1], 2)
    torch.testing.assert_close(out[2], F.relu(y2))


def test_seconv_small_maps_and_level_zero() -> None:
    """Deformable conv with zero offsets equals the plain conv, also on maps smaller than 3x3 (padding path)."""
    torch.manual_seed(0)
    for stride in (1, 2):
        m = SEConv(8, stride=stride, use_dcn=True)
        with torch.no_grad():
            m.bias.normal_()
        for size in [(1, 1), (2, 5), (5, 7)]:
            x = torch.randn(1, 8, *size)
            ref = F.conv2d(x, m.conv.weight, m.bias, stride, 1)
            torch.testing.assert_close(m(x, level=1), ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m(x, level=0), ref)


def test_ibn_pools_statistics_over_levels() -> None:
    torch.manual_seed(0)
    ibn = IBN(4).train()
    feats = [torch.randn(2, 4, 8, 8) + 3.0, torch.randn(2, 4, 4, 4) - 5.0]
    out = ibn(feats)
    pooled = torch.cat([o.flatten(2) for o in out], 2)
    torch.testing.assert_close(pooled.mean((0, 2)), torch.zeros(4), atol=1e-5, rtol=0)
    assert out[0].mean() > 0.3 and out[1].mean() < -1.0  # pooled stats (mean 1.4, std 3.35), not per level


@pytest.mark.parametrize("use_dcn", [False, True])
def test_sepc_six_levels_non_square_and_gradients(use_dcn: bool) -> None:
    torch.manual_seed(0)
    sizes = _pyramid(11, 18, 6)
    feats = [torch.randn(2, 16, *s, requires_grad=True) for s in sizes]
    sepc = SEPC(16, 6, num_pconvs=2, use_dcn=use_dcn, ibn=True, num_extra_convs=1)
    out = sepc(feats)
    assert [tuple(o.shape) for o in out] == [(2, 16, *s) for s in sizes]
    sum(o.mean() for o in out).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert not [n for n, p in sepc.named_parameters() if p.grad is None]
    with pytest.raises(ValueError, match="6 levels"):
        sepc(feats[:5])


def test_decoupled_head_shapes_and_branch_independence() -> None:
    torch.manual_seed(0)
    head = DecoupledTransformerBBoxHead(in_channels=32, embed_dims=48, num_cls_blocks=4, num_reg_blocks=4,
                                        num_heads=4, num_classes=7, reg_class_agnostic=True)
    assert len(head.cls_blocks) == 4 and len(head.reg_blocks) == 4
    assert head.fc_cls.in_features == 48 and head.fc_cls.out_features == 8 and head.fc_reg.out_features == 4
    x = torch.randn(5, 32, 7, 7)
    cls, reg = head(x)
    assert cls.shape == (5, 8) and reg.shape == (5, 4)
    cls.sum().backward()
    assert all(p.grad is None for p in head.reg_blocks.parameters())  # separate weights
    assert all(p.grad is not None for p in head.cls_blocks.parameters())
    assert head(torch.zeros(0, 32, 7, 7))[0].shape == (0, 8)
    per_class = DecoupledTransformerBBoxHead(in_channels=32, num_heads=4, num_cls_blocks=1, num_reg_blocks=1,
                                             num_classes=7, reg_class_agnostic=False)
    assert per_class(x)[1].shape == (5, 28)
    with pytest.raises(ValueError, match="RoI features"):
        head(torch.randn(2, 16, 7, 7))


def _tiny_cfg(**roi):
    from mmengine.config import Config

    cfg = Config.fromfile(TINY)
    cfg.model.roi_head.update(roi)
    return cfg


def _build(cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def _batch(cfg, root: str, n: int = 2, split: str = "train"):
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    key = "train_dataloader" if split == "train" else "val_dataloader"
    ds_cfg = cfg[key].dataset.copy()
    ds_cfg.data_root = root
    ds = DATASETS.build(ds_cfg)
    return pseudo_collate([ds[i] for i in range(n)])


@pytest.fixture(scope="module")
def synthetic_coco(tmp_path_factory) -> str:
    from agvm.mm.synthetic import make_coco

    root = str(tmp_path_factory.mktemp("coco"))
    make_coco(root, num_train=4, num_val=2, image_size=96, seed=0)
    return root.rstrip("/") + "/"


@pytest.mark.slow
def test_tiny_uninet_htc_x_trains_and_predicts(synthetic_coco: str) -> None:
    from mmengine.optim import OptimWrapper

    torch.manual_seed(0)
    cfg = _tiny_cfg()
    model = _build(cfg)
    assert type(model.backbone).__name__ == "MMDetUniNet" and model.with_mask
    batch = _batch(cfg, synthetic_coco)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=2e-4))
    totals = []
    for _ in range(3):
        log = model.train_step(batch, wrapper)
        assert all(math.isfinite(float(torch.as_tensor(v).detach())) for v in log.values())
        totals.append(float(log["loss"].detach()))
    assert {"loss_glbctx", "loss_mask", "s0.loss_cls", "s2.loss_bbox", "loss_rpn_cls"} <= set(log)
    assert totals[-1] < totals[0], totals
    model.eval()
    val = _batch(cfg, synthetic_coco, split="val")
    with torch.no_grad():
        results = model.val_step(val)
    assert len(results) == 2
    for res, meta in zip(results, val["data_samples"]):
        p = res.pred_instances
        n = len(p)
        assert 0 < n <= 100
        assert p.bboxes.shape == (n, 4) and p.scores.shape == (n,) and p.labels.shape == (n,)
        assert p.labels.max() < 3 and p.scores.min() >= 0 and p.scores.max() <= 1
        assert tuple(p.masks.shape) == (n, *meta.ori_shape)


@pytest.mark.slow
def test_htc_lite_without_mask_branch_on_non_square_inputs() -> None:
    """Objects365 setting: no mask loss, no masks predicted; num_classes reaches every class layer; images whose
    sizes are neither square nor multiples of the windows / strides."""
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(0)
    cfg = _tiny_cfg(mask_roi_extractor=None, mask_head=None, num_classes=5)
    model = _build(cfg)
    assert not model.with_mask
    assert all(h.fc_cls.out_features == 6 for h in model.roi_head.bbox_head)
    assert model.roi_head.glbctx_head.fc.out_features == 5
    packed = demo_mm_inputs(2, [[3, 90, 131], [3, 70, 100]], num_classes=5, num_items=[3, 2])
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")
    assert "loss_mask" not in losses and "loss_glbctx" in losses
    total, log = model.parse_losses(losses)
    assert math.isfinite(total.detach().item()) and all(math.isfinite(float(v)) for v in log.values())
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(packed, False)
        res = model(**data, mode="predict")
        (cls_scores, bbox_preds), = model(**data, mode="tensor")
    assert "masks" not in res[0].pred_instances and len(res[0].pred_instances) > 0
    assert res[0].pred_instances.bboxes[:, 2].max() <= 131 and res[1].pred_instances.bboxes[:, 3].max() <= 70
    assert len(cls_scores) == 2 and cls_scores[0].shape[1] == 6 and bbox_preds[0].shape[1] == 4
    with pytest.raises(ValueError, match="both mask_roi_extractor and mask_head"):
        _build(_tiny_cfg(mask_head=None))


@pytest.mark.slow
def test_htc_x_uninet_g_parameter_count() -> None:
    """Exact parameter counts of HTC-X + UniNet-G (meta device), and the mask/class-layer difference between the
    COCO and Objects365 models checked analytically."""
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    counts = {}
    for name, path in (("coco", G_COCO), ("o365", G_O365)):
        cfg = Config.fromfile(path)
        with torch.device("meta"):
            m = MODELS.build(cfg.model)
        counts[name] = {k: sum(p.numel() for p in getattr(m, k).parameters())
                        for k in ("backbone", "neck", "rpn_head", "roi_head")}
        counts[name]["total"] = sum(p.numel() for p in m.parameters())
    print("HTC-X + UniNet-G parameters:", counts)
    c, o = counts["coco"], counts["o365"]
    assert c["backbone"] == o["backbone"] and c["neck"] == o["neck"] and c["rpn_head"] == o["rpn_head"]
    d = 384
    mask_head = 4 * (d * d * 9 + d) + (d * d * 4 + d) + (d * 80 + 80)  # 4 convs, deconv 2x2, 1x1 logits
    class_layers = (3 * (d + 1) + (d + 1)) * (365 - 80)  # 3 fc_cls (K+1 outputs) + glbctx fc (K outputs)
    assert c["total"] - o["total"] == mask_head - class_layers
    assert 1.1e9 < c["total"] < 1.25e9  # UniNet-G ~1.08B + HTC-X ~92M


@pytest.mark.slow
def test_tiny_htc_x_through_the_training_entry_point(synthetic_coco: str, tmp_path, monkeypatch) -> None:
    """agvm.mm.train on the tiny config: AGVM-AdamW (two-half steps), COCO bbox+segm evaluation, variance log."""
    import json

    from agvm.mm.train import train

    monkeypatch.setenv("AGVM_COCO_ROOT", synthetic_coco)
    work = tmp_path / "work"
    metrics = train(TINY, str(work), cfg_options={"train_cfg.max_epochs": 1}, resume=False)
    assert {"coco/bbox_mAP", "coco/segm_mAP"} <= set(metrics)
    assert json.loads((work / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (work / "epoch_1.pth").is_file()
    lines = [json.loads(line) for line in (work / "agvm_variance.jsonl").read_text().splitlines()]
    assert lines and lines[-1]["optimizer"] == "AGVMAdamW"
    assert {"backbone", "neck", "rpn_head", "roi_head", "bbox_head", "mask_head"} == set(lines[-1]["mu"])
    assert all(math.isfinite(v) for line in lines for v in line["phi"].values())


def test_stage_configs_follow_the_paper() -> None:
    from mmengine.config import Config

    o365, coco = Config.fromfile(G_O365), Config.fromfile(G_COCO)
    assert o365.optim_wrapper.optimizer.type == "AdamW" and o365.optim_wrapper.optimizer.lr == 8e-5
    assert o365.total_batch_size == 64 and o365.train_cfg.max_epochs == 20
    assert o365.model.roi_head.num_classes == 365 and o365.model.roi_head.mask_head is None
    assert o365.train_dataloader.dataset.type == "EnvRootObjects365V1Dataset"
    assert coco.optim_wrapper.optimizer.type == "AGVMAdamW" and coco.optim_wrapper.optimizer.lr == 1.5e-4
    assert coco.total_batch_size == 960 and coco.train_cfg.max_epochs == 11
    assert coco.model.roi_head.num_classes == 80 and coco.model.roi_head.mask_head is not None
    assert tuple(coco.model.backbone.window_sizes) == (28, 14) and coco.model.backbone.num_subsets == 18
    scales = coco.train_dataloader.dataset.pipeline[2].scales
    assert min(s[1] for s in scales) == 400 and max(s[1] for s in scales) == 1200 and {s[0] for s in scales} == {1600}
    for cfg in (o365, coco):
        m = cfg.model
        assert m.neck.out_channels == 384 and m.neck.num_outs == 6
        assert m.rpn_head.anchor_generator.strides == [8, 16, 32, 64, 128, 256]  # P3-P8
        assert [r.assigner.pos_iou_thr for r in m.train_cfg.rcnn] == [0.6, 0.7, 0.8]
        assert all(h.num_cls_blocks == 4 and h.num_reg_blocks == 4 for h in m.roi_head.bbox_head)


def test_missing_dataset_root_names_the_path(tmp_path) -> None:
    from models.htc_x.datasets import EnvRootCocoDataset

    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{missing}.*AGVM_COCO_ROOT"):
        EnvRootCocoDataset(data_root=missing, ann_file="annotations/instances_train2017.json")
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json.*is missing"):
        EnvRootCocoDataset(data_root=str(tmp_path / "coco"), ann_file="annotations/instances_val2017.json")
