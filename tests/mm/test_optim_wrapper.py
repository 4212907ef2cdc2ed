"""The mmengine glue of the two-half measurement: the same halves, Phi and update as the core helper,
with gradient accumulation, clipping, AMP, and the registry / constructor."""
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

        def train(self, mode=True):
            super().train(mode)
            self.backbone[1].eval()
            return self

        def forward(self, inputs, data_samples=None, mode="tensor"):
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
            for acc, sl in ((ga, slice(0, (n + 1) // 2)), (gb, slice((n + 1) // 2, n))):
                model.zero_grad(set_to_none=True)
                loss = model(b["inputs"][sl], b["data_samples"][sl], mode="loss")["loss"]
                loss.backward()
                for a, p in zip(acc, params):
                    a += p.grad / len(window)
        for p, a, b_ in zip(params, ga, gb):
            p.grad = (a + b_) / 2
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step(halves=(ga, gb))
        model.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("accum", [1, 2])
def test_two_half_step_matches_core(accum):
    from agvm.mm.optim import AGVMOptimWrapper, AGVMTwoHalves

    Tiny = _model_cls()
    model_a, model_b = Tiny(), Tiny()
    model_b.load_state_dict(model_a.state_dict())
    batches = [_batch(i) for i in range(4 * accum)]
    ow = _build(model_a, dict(type="AGVMSGD", lr=0.1, momentum=0.9, weight_decay=1e-4, interval=2),
                type="AGVMOptimWrapper", accumulative_counts=accum)
    assert isinstance(ow, AGVMOptimWrapper)
    wrapped = AGVMTwoHalves(model_a).train()
    for b in batches:
        wrapped.train_step(b, ow)
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


def test_clipping_acts_on_full_gradient_not_on_phi():
    from agvm.mm.optim import AGVMTwoHalves

    Tiny = _model_cls()
    model_a, model_b = Tiny(), Tiny()
    model_b.load_state_dict(model_a.state_dict())
    batches = [_batch(i) for i in range(2)]
    ow = _build(model_a, dict(type="AGVMSGD", lr=0.1, momentum=0.9, weight_decay=1e-4, interval=1),
                type="AGVMOptimWrapper", clip_grad=dict(max_norm=0.01))
    wrapped = AGVMTwoHalves(model_a).train()
    for b in batches:
        wrapped.train_step(b, ow)
    ref = _core_reference(model_b.train(), batches, lr=0.1, interval=1, clip=0.01)
    for m in ref.variance:
        assert ow.optimizer.variance[m] == pytest.approx(ref.variance[m], rel=1e-5, abs=1e-9)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


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


def test_registry_names_and_constructor_groups():
    import agvm
    from mmengine.registry import OPTIMIZERS
    from timm.optim import Lamb, Lars

    from agvm.mm import register_all

    register_all()
    Tiny = _model_cls()
    model = Tiny()
    for name, cls, kw in (("AGVMSGD", agvm.AGVMSGD, dict(lr=0.1, interval=3, alpha=0.9, mu_clip=(0.2, 5.0))),
                          ("AGVMAdamW", agvm.AGVMAdamW, dict(lr=1e-3, interval=3, anchor="neck")),
                          ("PMDLAMB", agvm.PMDLAMB, dict(lr=1e-3, decay_interval=5)),
                          ("Lars", Lars, dict(lr=0.1, trust_coeff=0.001)), ("Lamb", Lamb, dict(lr=1e-3))):
        opt = OPTIMIZERS.build(dict(type=name, params=agvm.param_groups(model), **kw))
        assert type(opt) is cls
    ow = _build(model, dict(type="AGVMAdamW", lr=1e-3, weight_decay=0.05),
                paramwise_cfg=dict(no_decay_norm_bias=True, no_decay_keys=["neck.weight"]))
    groups = ow.optimizer.param_groups
    assert all("module" in g for g in groups)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.neck.weight)]["weight_decay"] == 0.0
    assert by_id[id(model.neck.bias)]["weight_decay"] == 0.0
    assert by_id[id(model.bbox_head.weight)]["weight_decay"] == 0.05
    assert by_id[id(model.backbone[1].weight)]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="unknown paramwise_cfg"):
        _build(model, dict(type="AGVMSGD", lr=0.1), paramwise_cfg=dict(custom_keys={}))
