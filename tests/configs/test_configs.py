"""The configs: generated files equal the generator's output, every config loads, and each family
carries its table's values (appendix Tables 1-3; learning rates from agvm's scaling rules)."""
import glob
import os
import os.path as osp
import re
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = osp.join(ROOT, "configs")
OWN = ("faster_rcnn", "mask_rcnn", "panoptic_fpn", "retinanet", "semantic_fpn")
NAME = re.compile(r"^(faster_rcnn|mask_rcnn|panoptic_fpn|retinanet|semantic_fpn)_(r50|r18|swin-t)_bs(\d+)_"
                  r"(sgd|agvm_sgd|adamw|agvm_adamw|lars|lamb|pmd_lamb)\.py$")

# (B): (warm-up, lr as printed, tau); Table 1 warm-up in epochs, Table 2 in iterations
TABLE1 = {32: (1, "0.04", 10), 256: (2, "0.226", 10), 512: (2, "0.32", 10), 1024: (2, "0.452", 5)}
TABLE2 = {32: (500, "0.01", 5), 512: (500, "0.113", 5), 1024: (250, "0.16", 5), 2048: (125, "0.226", 5)}
TABLE3 = {32: (1, "2e-4", 10), 256: (2, "9.8e-4", 10), 512: (2, "1.2e-3", 10), 1024: (3, "1.5e-3", 5)}


def within_printed(value: float, printed: str) -> bool:
    """``value`` agrees with the table's printed number to within one unit of its last digit."""
    mant, _, exp = printed.partition("e")
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    unit = 10.0 ** (-decimals + (int(exp) if exp else 0))
    return abs(value - float(printed)) < unit


def own_configs():
    out = []
    for p in OWN:
        out += glob.glob(osp.join(CONFIGS, p, "**", "*.py"), recursive=True)
    return sorted(out)


def test_generated_files_are_up_to_date():
    r = subprocess.run([sys.executable, osp.join(CONFIGS, "generate.py"), "--check"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stdout + r.stderr


def test_within_printed():
    assert within_printed(0.45255, "0.452") and within_printed(1.47e-3, "1.5e-3")
    assert not within_printed(0.454, "0.452") and not within_printed(1.62e-3, "1.5e-3")


def test_names_follow_the_scheme():
    files = own_configs()
    assert len(files) >= 90
    for f in files:
        assert NAME.match(osp.basename(f)), f


@pytest.fixture(scope="module")
def load():
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    from agvm.mm.train import load_config

    cache = {}

    def get(rel):
        if rel not in cache:
            cache[rel] = load_config(osp.join(CONFIGS, rel))
        return cache[rel]

    return get


def _sched(cfg, typ):
    return [s for s in cfg.param_scheduler if s["type"] == typ]


def _common(cfg, B, opt, wd):
    assert cfg.auto_scale_lr == dict(enable=False, base_batch_size=B)
    assert cfg.num_gpus * cfg.train_dataloader.batch_size == B
    o = cfg.optim_wrapper.optimizer
    assert o.weight_decay == wd
    assert o.type == {"sgd": "SGD", "agvm_sgd": "AGVMSGD", "adamw": "AdamW", "agvm_adamw": "AGVMAdamW"}[opt]
    assert cfg.optim_wrapper.type == ("AGVMOptimWrapper" if opt.startswith("agvm") else "OptimWrapper")
    assert cfg.optim_wrapper.constructor == "AGVMOptimWrapperConstructor"
    return o


@pytest.mark.mm
@pytest.mark.parametrize("pipeline", ["faster_rcnn", "mask_rcnn", "panoptic_fpn"])
@pytest.mark.parametrize("B", sorted(TABLE1))
@pytest.mark.parametrize("opt", ["sgd", "agvm_sgd"])
def test_table1(load, pipeline, B, opt):
    import agvm

    cfg = load(f"{pipeline}/{pipeline}_r50_bs{B}_{opt}.py")
    warm, lr, tau = TABLE1[B]
    o = _common(cfg, B, opt, 1e-4)
    assert within_printed(o.lr, lr) and o.lr == pytest.approx(agvm.sgd_lr(B)) and o.momentum == 0.9
    if opt == "agvm_sgd":
        assert o.interval == tau and o.alpha == 0.97
    (w,) = _sched(cfg, "LinearLR")
    assert w.by_epoch and w.end == warm and w.convert_to_iter_based
    (m,) = _sched(cfg, "MultiStepLR")
    assert m.milestones == [8, 11] and m.end == cfg.train_cfg.max_epochs == 12
    assert cfg.optim_wrapper.clip_grad is None
    assert cfg.model.backbone.type == "ResNet" and cfg.model.backbone.depth == 50 and cfg.pipeline == pipeline


@pytest.mark.mm
@pytest.mark.parametrize("B", sorted(TABLE2))
@pytest.mark.parametrize("opt", ["sgd", "agvm_sgd"])
def test_table2(load, B, opt):
    import agvm

    cfg = load(f"semantic_fpn/semantic_fpn_r50_bs{B}_{opt}.py")
    warm, lr, tau = TABLE2[B]
    o = _common(cfg, B, opt, 5e-4)
    assert within_printed(o.lr, lr) and o.lr == pytest.approx(agvm.sgd_lr(B, "segmentation"))
    if opt == "agvm_sgd":
        assert o.interval == tau and o.alpha == 0.97
    (w,) = _sched(cfg, "LinearLR")
    assert not w.by_epoch and w.end == warm
    (p,) = _sched(cfg, "PolyLR")
    assert p.power == 0.9 and p.eta_min == 0.0 and p.begin == 0 and p.end == cfg.train_cfg.max_iters
    assert cfg.train_cfg.type == "IterBasedTrainLoop" and cfg.train_cfg.max_iters * B == 160000 * 16
    assert cfg.model.decode_head.type == "FPNHead" and cfg.model.decode_head.num_classes == 150


@pytest.mark.mm
@pytest.mark.parametrize("B", sorted(TABLE3))
@pytest.mark.parametrize("opt", ["adamw", "agvm_adamw"])
def test_table3(load, B, opt):
    import agvm

    cfg = load(f"faster_rcnn/faster_rcnn_swin-t_bs{B}_{opt}.py")
    warm, lr, tau = TABLE3[B]
    o = _common(cfg, B, opt, 0.05)
    assert within_printed(o.lr, lr) and o.lr == pytest.approx(agvm.adamw_lr(B))
    if opt == "agvm_adamw":
        assert o.interval == tau and o.alpha == 0.97
    (w,) = _sched(cfg, "LinearLR")
    assert w.end == warm
    clip = cfg.optim_wrapper.clip_grad
    assert (clip is None) if B < 256 else (clip.max_norm == 1.0)
    assert cfg.model.backbone.type == "SwinTransformer" and cfg.model.backbone.embed_dims == 96
    assert cfg.model.backbone.depths == [2, 2, 6, 2]
    assert "relative_position_bias_table" in cfg.optim_wrapper.paramwise_cfg.no_decay_keys


@pytest.mark.mm
@pytest.mark.parametrize("backbone,depth", [("r50", 50), ("r18", 18)])
def test_retinanet_family(load, backbone, depth):
    import agvm

    batches = sorted(int(NAME.match(osp.basename(f)).group(3))
                     for f in glob.glob(osp.join(CONFIGS, "retinanet", f"retinanet_{backbone}_bs*_agvm_sgd.py")))
    assert batches[0] == 32 and batches[-1] >= 10000
    for B in (32, batches[-1]):
        cfg = load(f"retinanet/retinanet_{backbone}_bs{B}_agvm_sgd.py")
        o = _common(cfg, B, "agvm_sgd", 1e-4)
        assert o.lr == pytest.approx(agvm.sgd_lr(B, base_lr=0.02)) and o.interval == agvm.default_interval(B)
        assert cfg.model.type == "RetinaNet" and cfg.model.backbone.depth == depth
    cfg = load(f"retinanet/retinanet_{backbone}_bs{batches[-1]}_pmd_lamb.py")
    assert cfg.optim_wrapper.optimizer.type == "PMDLAMB"


@pytest.mark.mm
def test_baselines_and_authors_code(load):
    for B in (1024, 1536):
        for opt, typ in (("lars", "Lars"), ("lamb", "Lamb"), ("pmd_lamb", "PMDLAMB")):
            cfg = load(f"faster_rcnn/faster_rcnn_r50_bs{B}_{opt}.py")
            assert cfg.optim_wrapper.optimizer.type == typ and cfg.auto_scale_lr.base_batch_size == B
    cfg = load("faster_rcnn/authors_code/faster_rcnn_r50_bs512_agvm_sgd.py")
    o = cfg.optim_wrapper.optimizer
    assert o.lr == 0.38 and o.ratio_clip == (0.5, 10.0) and o.start_iter == 560 and o.interval == 10
    assert cfg.optim_wrapper.clip_window == (460, 560) and cfg.optim_wrapper.clip_grad.max_norm == 1.0
    assert _sched(cfg, "ExpWarmupLR")[0].end == 460 and cfg.train_cfg.max_epochs == 16
    assert _sched(cfg, "MultiStepLR")[0].milestones == [12, 14]
    cfg = load("mask_rcnn/authors_code/mask_rcnn_r50_bs256_agvm_sgd.py")
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.16 * 2 ** 0.5) and cfg.optim_wrapper.optimizer.start_iter == 1020
    assert load("mask_rcnn/authors_code/mask_rcnn_r50_bs512_sgd.py").optim_wrapper.optimizer.lr == 0.32


@pytest.mark.mm
@pytest.mark.slow
def test_every_config_loads(load):
    for f in own_configs():
        cfg = load(osp.relpath(f, CONFIGS))
        assert cfg.auto_scale_lr.enable is False and cfg.auto_scale_lr.base_batch_size > 0
        assert cfg.pipeline in OWN and cfg.dataset in ("coco", "ade20k")
