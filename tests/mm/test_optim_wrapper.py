"""The mmengine glue of the two-half measurement: the same halves, Phi and update as the core helper,
with one full-batch pass off measurement steps, gradient accumulation, unequal halves, clipping, AMP; the
registry; the constructor against mmengine's own (same lr and weight decay per parameter)."""
import copy

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.mm

mmengine = pytest.importorskip("mmengine")


def _model_cls():
    from mmengine.model import BaseModel

    class Tiny(BaseModel):
        """backbone / neck / bbox_head, as mmdet names them; a per-sample regression loss."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=True), nn.Tanh())
            self.neck = nn.Linear(8, 8)
            self.bbox_head = nn.Linear(8, 1)
            self.backbone[1].eval()  # frozen statistics, as mmdet's norm_eval: halves == whole batch
            self.forwards = 0

        def train(self, mode=True):
            super().train(mode)
            self.backbone[1].eval()
            return self

        def forward(self, inputs, data_samples=None, mode="tensor"):
            self.forwards += 1
            x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
            out = self.bbox_head(torch.relu(self.neck(self.backbone(x)))).squeeze(-1)
            if mode == "loss":
                y = torch.stack(data_samples) if isinstance(data_samples, (list, tuple)) else data_samples
                return {"loss": ((out - y) ** 2).mean()}
            return out

    return Tiny


def _batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, generator=g)
    return {"inputs": list(x), "data_samples": list(y)}


def _build(model, opt_cfg, **wrapper):
    from agvm.mm import register_all
    from mmengine.optim import build_optim_wrapper

    register_all()
    cfg = dict(constructor="AGVMOptimWrapperConstructor", optimizer=opt_cfg, **wrapper)
    return build_optim_wrapper(model, cfg)


def _core_reference(model, batches, lr, interval, accum=1, clip=None):
    """The same training with agvm's core API: halves by hand, averaged over the accumulation window."""
    import agvm

    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-4, interval=interval)
    params = opt.params_in_order()
    k = 0
    while k < len(batches):
        window = batches[k:k + accum]
        k += accum
        ga = [torch.zeros_like(p) for p in params]
        gb = [torch.zeros_like(p) for p in params]
        for b in window:
            n = len(b["inputs"])
            n_a = (n + 1) // 2
            for acc, sl in ((ga, slice(0, n_a)), (gb, slice(n_a, n))):
                model.zero_grad(set_to_none=True)
                loss = model(b["inputs"][sl], b["data_samples"][sl], mode="loss")["loss"]
                loss.backward()
                for a, p in zip(acc, params):
                    a += p.grad / len(window)
        for p, a, b_ in zip(params, ga, gb):
            p.grad = a * n_a / n + b_ * (n - n_a) / n
        if clip is not None:
            clip_type, value = clip
            if clip_type == "norm":
                torch.nn.utils.clip_grad_norm_(params, value)
            else:
                torch.nn.utils.clip_grad_value_(params, value)
        opt.step(halves=(ga, gb))
        model.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("accum, n, two_passes", [(1, 6, False), (2, 6, False), (1, 5, False), (2, 5, True)])
def test_two_half_step_matches_core(accum, n, two_passes):
    """interval 2: steps 1, 3 are one full-batch pass per micro-batch (two half passes with two_passes),
    steps 2, 4 measure; odd n gives unequal halves (3 + 2) whose weights make p.grad the batch mean."""
    from agvm.mm.optim import AGVMOptimWrapper, AGVMTwoHalves

    Tiny = _model_cls()
    model_a, model_b = Tiny(), Tiny()
    model_b.load_state_dict(model_a.state_dict())
    batches = [_batch(i, n) for i in range(4 * accum)]
    ow = _build(model_a, dict(type="AGVMSGD", lr=0.1, momentum=0.9, weight_decay=1e-4, interval=2),
                type="AGVMOptimWrapper", accumulative_counts=accum, two_passes=two_passes)
    assert isinstance(ow, AGVMOptimWrapper)
    wrapped = AGVMTwoHalves(model_a).train()
    forwards = []
    for b in batches:
        before = model_a.forwards
        wrapped.train_step(b, ow)
        forwards.append(model_a.forwards - before)
    plain = 2 if two_passes else 1
    assert forwards == [f for f in (plain, 2, plain, 2) for _ in range(accum)]
    ref = _core_reference(model_b.train(), batches, lr=0.1, interval=2, accum=accum)
    opt = ow.optimizer
    assert opt.t == ref.t == 4
    assert opt.variance.keys() == ref.variance.keys() == {"backbone", "neck", "bbox_head"}
    for m in ref.variance:
        assert opt.variance[m] == pytest.approx(ref.variance[m], rel=1e-5, abs=1e-9)
        assert opt.modulation[m] == pytest.approx(ref.modulation[m], rel=1e-6)
    assert any(v != 1.0 for v in opt.modulation.values())
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_type, value", [("norm", 0.01), ("value", 1e-4)])
def test_clipping_acts_on_full_gradient_not_on_phi(clip_type, value):
    """Phi is measured on the unclipped halves (up to one common factor for clipping by norm, where half B stays
    derived from p.grad: no gradient-sized copy); clipping by value, not one factor, hands over half B."""
    from agvm.mm.optim import AGVMTwoHalves

    Tiny = _model_cls()
    model_a, model_b = Tiny(), Tiny()
    model_start = copy.deepcopy(model_a.state_dict())
    model_b.load_state_dict(model_start)
    batches = [_batch(i) for i in range(2)]
    ow = _build(model_a, dict(type="AGVMSGD", lr=0.1, momentum=0.9, weight_decay=1e-4, interval=1),
                type="AGVMOptimWrapper", clip_grad=dict(type=clip_type, **{
                    "max_norm" if clip_type == "norm" else "clip_value": value}))
    handed = []
    step = ow.optimizer.step
    ow.optimizer.step = lambda **kw: (handed.append(kw["halves"][1] is None), step(**kw))[1]
    wrapped = AGVMTwoHalves(model_a).train()
    for b in batches:
        wrapped.train_step(b, ow)
    assert handed == [clip_type == "norm"] * 2
    ref = _core_reference(model_b.train(), batches, lr=0.1, interval=1, clip=(clip_type, value))
    for m in ref.variance:
        assert ow.optimizer.variance[m] == pytest.approx(ref.variance[m], rel=1e-5, abs=1e-9)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    model_c = Tiny()  # clipping took effect: without it the weights end elsewhere
    model_c.load_state_dict(model_start)
    _core_reference(model_c.train(), batches, lr=0.1, interval=1)
    assert any(not torch.allclose(pa, pc, rtol=1e-4, atol=1e-6) for pa, pc in zip(model_a.parameters(),
                                                                                 model_c.parameters()))


def test_clip_window_only_clips_inside_window():
    from mmengine.logging import MessageHub

    Tiny = _model_cls()
    model = Tiny()
    ow = _build(model, dict(type="SGD", lr=0.1), type="ClipWindowOptimWrapper",
                clip_grad=dict(max_norm=1e-3), clip_window=(1, 2))
    hub = MessageHub.get_current_instance()
    norms = []
    for it in range(3):
        hub.update_info("iter", it)
        loss = model(_batch(it)["inputs"], _batch(it)["data_samples"], mode="loss")["loss"] * 100
        ow.backward(loss)
        ow._clip_grad()
        norms.append(torch.nn.utils.clip_grad_norm_(list(model.parameters()), float("inf")).item())
        ow.zero_grad()
    assert norms[0] > 1e-2 and norms[1] == pytest.approx(1e-3, rel=1e-3) and norms[2] > 1e-2
    with pytest.raises(ValueError, match="clip_window"):
        _build(Tiny(), dict(type="SGD", lr=0.1), type="ClipWindowOptimWrapper", clip_window=(3, 1),
               clip_grad=dict(max_norm=1.0))


def test_amp_wrapper_measures_and_skipped_steps_leave_t(monkeypatch):
    """AGVMAmpOptimWrapper with torch's GradScaler: measurement steps pass halves through
    ``scaler.step``; a step the scaler skips (inf gradients) advances neither t nor mu.
    (mmengine's AmpOptimWrapper insists on an accelerator; on CPU it is given torch's CPU GradScaler.)"""
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp_mod

    from agvm.mm.optim import AGVMAmpOptimWrapper, AGVMTwoHalves

    if not torch.cuda.is_available():
        monkeypatch.setattr(amp_mod, "is_cuda_available", lambda: True)
    Tiny = _model_cls()
    model = Tiny()
    ow = _build(model, dict(type="AGVMSGD", lr=0.05, interval=2), type="AGVMAmpOptimWrapper", dtype="bfloat16")
    assert isinstance(ow, AGVMAmpOptimWrapper)
    if not torch.cuda.is_available():
        ow.loss_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    wrapped = AGVMTwoHalves(model).train()
    for i in range(4):
        wrapped.train_step(_batch(i), ow)
    opt = ow.optimizer
    assert opt.t == 4
    assert set(opt.variance) == {"backbone", "neck", "bbox_head"}
    assert all(0.0 <= v <= 2.0 for v in opt.variance.values())
    mu = opt.modulation
    bad = _batch(9)
    bad["data_samples"][-1] = torch.tensor(float("inf"))
    wrapped.train_step(bad, ow)  # t would become 5: not a measurement step
    wrapped.train_step(_batch(10), ow)
    assert opt.t == 5
    bad = _batch(11)
    bad["data_samples"][-1] = torch.tensor(float("inf"))
    state = copy.deepcopy(model.state_dict())
    wrapped.train_step(bad, ow)  # the measurement step 6, skipped by the scaler
    assert opt.t == 5 and opt.modulation == mu
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    wrapped.train_step(_batch(12), ow)
    assert opt.t == 6 and opt.modulation != mu


def test_wrong_wrapper_and_tiny_batch_errors():
    from mmengine.optim import OptimWrapper

    from agvm.mm.optim import AGVMTwoHalves

    Tiny = _model_cls()
    model = Tiny()
    ow = _build(model, dict(type="AGVMSGD", lr=0.05, interval=2), type="OptimWrapper")
    assert type(ow) is OptimWrapper
    with pytest.raises(TypeError, match="AGVMOptimWrapper"):
        AGVMTwoHalves(model).train_step(_batch(0), ow)
    ow = _build(model, dict(type="AGVMSGD", lr=0.05, interval=2))  # the constructor's default type
    with pytest.raises(ValueError, match="batch_size >= 2"):
        AGVMTwoHalves(model).train_step(_batch(0, n=1), ow)
    # a non-AGVM optimizer goes through the model's own train_step
    sgd = _build(model, dict(type="SGD", lr=0.05))
    before = copy.deepcopy(model.state_dict())
    AGVMTwoHalves(model).train().train_step(_batch(0), sgd)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_registry_names():
    import agvm
    from mmengine.registry import OPTIMIZERS
    from timm.optim import Lamb, Lars

    from agvm.mm import register_all

    register_all()
    model = _model_cls()()
    for name, cls, kw in (("AGVMSGD", agvm.AGVMSGD, dict(lr=0.1, interval=3, alpha=0.9, mu_clip=(0.2, 5.0))),
                          ("AGVMAdamW", agvm.AGVMAdamW, dict(lr=1e-3, interval=3, anchor="neck")),
                          ("PMDLAMB", agvm.PMDLAMB, dict(lr=1e-3, decay_interval=5)),
                          ("Lars", Lars, dict(lr=0.1, trust_coeff=0.001)), ("Lamb", Lamb, dict(lr=1e-3))):
        opt = OPTIMIZERS.build(dict(type=name, params=agvm.param_groups(model), **kw))
        assert type(opt) is cls


class Net(nn.Module):
    """Every kind of parameter mmengine's paramwise_cfg tells apart: conv weights and biases, a depth-wise conv,
    BatchNorm / GroupNorm / LayerNorm, a 1-D parameter outside a norm, a position table, a module shared twice."""

    def __init__(self, shared=False):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8),
                                      nn.LayerNorm(4))
        self.backbone.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4))
        self.backbone.gamma = nn.Parameter(torch.ones(8))
        self.neck = nn.Sequential(nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8))
        self.bbox_head = nn.Linear(8, 2)
        self.bbox_head.norm_fc = nn.Linear(2, 2)
        if shared:
            self.neck.again = self.backbone[0]


def _lr_wd(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]
            if p.requires_grad}


PARAMWISE = [
    dict(custom_keys={"backbone": dict(lr_mult=0.1, decay_mult=0.9), "absolute_pos_embed": dict(decay_mult=0.0),
                      "norm": dict(decay_mult=0.0), "neck.0": dict(lr_mult=2.0)}),
    dict(norm_decay_mult=0.0),
    dict(bias_lr_mult=2.0, bias_decay_mult=0.0),
    dict(dwconv_decay_mult=0.5),
    dict(flat_decay_mult=0.0),
    dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0, custom_keys={"neck": dict(lr_mult=0.5)}),
    dict(bypass_duplicate=True),
    dict(custom_keys={"neck.1": dict(requires_grad=False)}),
]


@pytest.mark.parametrize("paramwise_cfg", [None] + PARAMWISE)
def test_constructor_gives_mmengines_lr_and_weight_decay_per_parameter(paramwise_cfg):
    from mmengine.optim import DefaultOptimWrapperConstructor

    from agvm.mm import register_all
    from agvm.mm.optim import AGVMOptimWrapperConstructor

    register_all()
    shared = bool(paramwise_cfg and paramwise_cfg.get("bypass_duplicate"))
    theirs, ours = Net(shared), Net(shared)
    sgd = dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4)
    ref = DefaultOptimWrapperConstructor(dict(optimizer=sgd), copy.deepcopy(paramwise_cfg))(theirs).optimizer
    for opt_cfg in (sgd, dict(sgd, type="AGVMSGD", interval=2)):
        ow = AGVMOptimWrapperConstructor(dict(optimizer=opt_cfg), copy.deepcopy(paramwise_cfg))(ours)
        got, want = _lr_wd(ow.optimizer, ours), _lr_wd(ref, theirs)
        assert got == want and len(want) == sum(p.requires_grad for p in theirs.parameters())
        assert {n for n, p in ours.named_parameters() if not p.requires_grad} == \
            {n for n, p in theirs.named_parameters() if not p.requires_grad}
        groups = ow.optimizer.param_groups
        modules = {n.split(".")[0] for n in got}
        assert {g["module"] for g in groups} == modules
        # merged: no two groups equal in everything but params, and every trainable parameter once
        options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        assert all(a != b for i, a in enumerate(options) for b in options[i + 1:])
        assert sum(len(g["params"]) for g in groups) == len(got)
        names = {id(p): n for n, p in theirs.named_parameters()}
        distinct = {(names[id(p)].split(".")[0], repr(sorted((k, v) for k, v in g.items() if k != "params")))
                    for g in ref.param_groups for p in g["params"] if p.requires_grad}
        assert len(groups) == len(distinct) < len(got)


def test_constructor_agvm_keys_and_errors():
    from mmengine.optim import DefaultOptimWrapperConstructor

    from agvm.mm import register_all
    from agvm.mm.optim import AGVMOptimWrapperConstructor

    register_all()
    adamw = dict(type="AdamW", lr=1e-3, weight_decay=0.05)
    model = Net()
    modules = dict(backbone="backbone", fpn="neck", bbox_head="bbox_head")
    ow = AGVMOptimWrapperConstructor(dict(optimizer=dict(adamw, type="AGVMAdamW")),
                                     dict(frozen_modules=["bbox_head"], modules=modules))(model)
    assert ow.optimizer.modules == ["backbone", "fpn"]
    assert not any(p.requires_grad for p in model.bbox_head.parameters())
    assert {id(p) for g in ow.optimizer.param_groups for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if not n.startswith("bbox_head")}
    # the project's shorthand is mmengine's three multipliers
    a, b = Net(), Net()
    short = AGVMOptimWrapperConstructor(dict(optimizer=adamw), dict(no_decay_norm_bias=True))(a).optimizer
    three = dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0)
    ref = DefaultOptimWrapperConstructor(dict(optimizer=adamw), three)(b).optimizer
    got = _lr_wd(short, a)
    assert got == _lr_wd(ref, b) and got["backbone.gamma"][1] == got["neck.0.bias"][1] == 0.0
    for cfg, match in ((dict(norm_decay_mul=0.0), "unknown paramwise_cfg keys"),
                       (dict(no_decay_norm_bias=True, bias_decay_mult=0.0), "one or the other"),
                       (dict(frozen_modules=["fpn"]), "unknown module"),
                       (dict(modules=dict(backbone="backbone")), "belong to no AGVM module")):
        with pytest.raises(ValueError, match=match):
            AGVMOptimWrapperConstructor(dict(optimizer=adamw), cfg)(Net())


def test_swin_config_uses_mmdets_paramwise_cfg():
    """The Table 3 Swin-T base has mmdet's Swin paramwise_cfg as it is; with it our constructor gives a small
    Swin-T-FPN the lr and weight decay mmengine's gives: biases keep weight decay 0.05, norms and position
    tables get 0."""
    pytest.importorskip("mmdet")
    import os.path as osp

    from mmdet.models.backbones import SwinTransformer
    from mmengine.config import Config
    from mmengine.optim import DefaultOptimWrapperConstructor

    from agvm.mm import register_all
    from agvm.mm.optim import AGVMOptimWrapperConstructor

    register_all()
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    ours = Config.fromfile(osp.join(root, "configs/_base_/faster_rcnn_swin-t.py")).optim_wrapper.paramwise_cfg
    import mmdet as mmdet_pkg

    theirs_cfg = osp.join(osp.dirname(mmdet_pkg.__file__), ".mim/configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py")
    mmdet = Config.fromfile(theirs_cfg).optim_wrapper.paramwise_cfg
    assert ours.to_dict() == mmdet.to_dict()

    def swin():
        torch.manual_seed(0)
        net = nn.Module()
        net.backbone = SwinTransformer(embed_dims=16, depths=[1, 1], num_heads=[1, 2], strides=(4, 2),
                                       out_indices=(0, 1), window_size=2, use_abs_pos_embed=True,
                                       pretrain_img_size=16)
        net.neck = nn.Conv2d(32, 8, 1)
        return net

    adamw = dict(type="AdamW", lr=1e-4, weight_decay=0.05)
    theirs, net = swin(), swin()
    ref = DefaultOptimWrapperConstructor(dict(optimizer=adamw), mmdet.to_dict())(theirs).optimizer
    got = _lr_wd(AGVMOptimWrapperConstructor(dict(optimizer=dict(adamw, type="AGVMAdamW")), ours.to_dict())(net)
                 .optimizer, net)
    assert got == _lr_wd(ref, theirs)
    biases = [n for n in got if n.endswith(".bias") and "norm" not in n]
    assert len(biases) > 5 and all(got[n][1] == 0.05 for n in biases)
    assert all(got[n][1] == 0.0 for n in got if "norm" in n or "relative_position_bias_table" in n
               or "absolute_pos_embed" in n)
