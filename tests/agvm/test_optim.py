import copy
import math

import pytest
import torch
from torch import nn

import agvm
from agvm.variance import module_stats, phi_from_stats


class Det(nn.Module):
    """A toy detector with the attribute names of mmdet's: backbone, neck, bbox_head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU())
        self.neck = nn.Linear(8, 8)
        self.bbox_head = nn.Linear(8, 3)

    def forward(self, x):
        return self.bbox_head(torch.relu(self.neck(self.backbone(x))))


def make(seed=0):
    torch.manual_seed(seed)
    return Det()


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def data(steps, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)) for _ in range(steps)]


def half_grads(model, opt, x, y):
    """(full mean grad set on p.grad, ga, gb) computed the plain way, for checking."""
    params = opt.params_in_order()
    n = len(x) // 2
    halves = []
    for sl in (slice(0, n), slice(n, None)):
        opt.zero_grad()
        loss_fn(model, x[sl], y[sl]).backward()
        halves.append([p.grad.clone() for p in params])
    for p, a, b in zip(params, *halves):
        p.grad = (a + b) / 2
    return halves


def agvm_opt(cls, model, **kw):
    return cls(agvm.param_groups(model), **kw)


def torch_opt(cls, model, **kw):
    """torch's optimizer with its fused kernel: the AGVM optimizers' default implementation on a CPU."""
    return cls([{"params": g["params"]} for g in agvm.param_groups(model)], fused=True, **kw)


SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
ADAMW_KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
PAIRS = [(agvm.AGVMSGD, torch.optim.SGD, SGD_KW), (agvm.AGVMAdamW, torch.optim.AdamW, ADAMW_KW)]


@pytest.mark.parametrize("cls, ref_cls, kw", PAIRS)
def test_equal_halves_equal_torch_optim_exactly(cls, ref_cls, kw):
    m1, m2 = make(), make()
    opt = agvm_opt(cls, m1, interval=2, **kw)
    ref = torch_opt(ref_cls, m2, **kw)
    for x, y in data(6):
        for m, o in ((m1, opt), (m2, ref)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
        grads = [p.grad.clone() for p in opt.params_in_order()]
        opt.step(halves=(grads, [g.clone() for g in grads]) if opt.should_measure() else None)
        ref.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert opt.modulation == {"backbone": 1.0, "neck": 1.0, "bbox_head": 1.0}
    assert opt.variance == {"backbone": 0.0, "neck": 0.0, "bbox_head": 0.0}
    assert opt.t == 6


@pytest.mark.parametrize("cls, ref_cls, kw", PAIRS)
def test_update_is_torch_update_with_lr_times_mu(cls, ref_cls, kw):
    """With real halves, each module must move exactly as torch's optimizer with lr * mu_i."""
    m1 = make()
    opt = agvm_opt(cls, m1, interval=1, alpha=0.5, **kw)
    refs = {}
    for g in agvm.param_groups(m1):
        refs[g["module"]] = ref_cls([copy.deepcopy(p) for p in g["params"]], fused=True, **kw)
    ref_params = {k: [p for grp in o.param_groups for p in grp["params"]] for k, o in refs.items()}
    for x, y in data(4):
        ga, gb = half_grads(m1, opt, x, y)
        opt.step(halves=(ga, gb))
        mu = opt.modulation
        offset = 0
        for g in opt.param_groups:
            n = len(g["params"])
            for p_ref, p in zip(ref_params[g["module"]], g["params"]):
                p_ref.grad = p.grad.clone()
            offset += n
        for name, o in refs.items():
            for grp in o.param_groups:
                grp["lr"] = kw["lr"] * mu[name]
            o.step()
    for g in opt.param_groups:
        for p_ref, p in zip(ref_params[g["module"]], g["params"]):
            torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    assert opt.modulation["backbone"] == 1.0
    assert opt.modulation["neck"] != 1.0 and opt.modulation["bbox_head"] != 1.0
    assert all(g["lr"] == kw["lr"] for g in opt.param_groups)  # the scheduler's lr is untouched


def test_sgd_phi_and_mu_match_hand_computation():
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=1, alpha=0.97, **SGD_KW)
    x, y = data(1)[0]
    ga, gb = half_grads(model, opt, x, y)
    opt.step(halves=(ga, gb))
    phi = {}
    for g in opt.param_groups:
        idx = [i for i, p in enumerate(opt.params_in_order()) if any(p is q for q in g["params"])]
        a = torch.cat([ga[i].flatten() for i in idx]).double()
        b = torch.cat([gb[i].flatten() for i in idx]).double()
        phi[g["module"]] = 1 - float(a @ b / (a.norm() * b.norm()))
    assert opt.variance == pytest.approx(phi, rel=1e-5)
    for name in ("neck", "bbox_head"):
        target = min(max(math.sqrt((phi["backbone"] + 1e-8) / (phi[name] + 1e-8)), 0.1), 10.0)
        assert opt.modulation[name] == pytest.approx(0.97 + 0.03 * target, rel=1e-6)


def test_adamw_preconditions_with_second_moment_after_update():
    model = make()
    opt = agvm_opt(agvm.AGVMAdamW, model, interval=2, **ADAMW_KW)
    beta2, eps = ADAMW_KW["betas"][1], ADAMW_KW["eps"]
    batches = data(2)
    # step 1 (no measurement) fills v_1
    opt.zero_grad()
    loss_fn(model, *batches[0]).backward()
    opt.step()
    v1 = [opt.state[p]["exp_avg_sq"].clone() for p in opt.params_in_order()]
    ga, gb = half_grads(model, opt, *batches[1])
    g = [p.grad.clone() for p in opt.params_in_order()]
    opt.step(halves=(ga, gb))
    v2 = [beta2 * v + (1 - beta2) * gi * gi for v, gi in zip(v1, g)]
    for v, p in zip(v2, opt.params_in_order()):  # the state the base update computed is the same v_t
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v)
    pa = [a / (v.sqrt() + eps) for a, v in zip(ga, v2)]
    pb = [b / (v.sqrt() + eps) for b, v in zip(gb, v2)]
    expected = phi_from_stats(module_stats(pa, pb, opt.module_ids(), len(opt.modules)))
    plain = phi_from_stats(module_stats(ga, gb, opt.module_ids(), len(opt.modules)))
    got = torch.tensor([opt.variance[m] for m in opt.modules], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, plain, rtol=1e-3)  # preconditioning matters


@pytest.mark.parametrize("phase, expected", [
    (0, [False, False, True, False, False, True, False]),
    (1, [True, False, False, True, False, False, True]),  # the authors' 0-based counter: t = 1, 4, 7
    (2, [False, True, False, False, True, False, False]),
])
def test_should_measure_and_step_counting(phase, expected):
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=3, phase=phase, **SGD_KW)
    pattern, phis = [], []
    for x, y in data(7):
        pattern.append(opt.should_measure())
        halves = half_grads(model, opt, x, y) if opt.should_measure() else None
        if halves is None:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
        opt.step(halves=halves)
        phis.append(dict(opt.variance))
    assert pattern == expected
    assert opt.t == 7
    # Phi changes exactly on the measurement steps
    changed = [phis[i] != (phis[i - 1] if i else {}) for i in range(7)]
    assert changed == expected


@pytest.mark.parametrize("phase", [-1, 3, 1.0, True])
def test_bad_phase_raises(phase):
    with pytest.raises(ValueError, match="phase must be an integer in \\[0, interval=3\\)"):
        agvm_opt(agvm.AGVMSGD, make(), interval=3, phase=phase, **SGD_KW)


def test_measurement_without_halves_raises():
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=1, **SGD_KW)
    loss_fn(model, *data(1)[0]).backward()
    with pytest.raises(RuntimeError, match="measurement step .* no halves"):
        opt.step()
    assert opt.t == 0  # the failed step did not count


def test_nonfinite_halves_keep_mu_warn_once_and_train_on(caplog):
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=1, **SGD_KW)
    batches = data(3)
    ga, gb = half_grads(model, opt, *batches[0])
    opt.step(halves=(ga, gb))
    mu = opt.modulation
    with caplog.at_level("WARNING", logger="agvm"):
        for x, y in batches[1:]:
            ga, gb = half_grads(model, opt, x, y)
            ga[0] = torch.full_like(ga[0], float("nan"))
            before = [p.clone() for p in model.parameters()]
            opt.step(halves=(ga, gb))
            assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.modulation == mu and opt.t == 3
    assert len([r for r in caplog.records if r.name == "agvm"]) == 1


def test_gradscaler_skipped_step_neither_advances_t_nor_touches_mu():
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=1, **SGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = data(2)
    loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, batches[0][0][:8], batches[0][1][:8]),
                                            lambda: loss_fn(model, batches[0][0][8:], batches[0][1][8:]), scaler)
    scaler.step(opt, halves=halves)
    scaler.update()
    assert opt.t == 1
    mu, phi = opt.modulation, opt.variance
    params = [p.clone() for p in model.parameters()]
    loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, batches[1][0][:8], batches[1][1][:8]),
                                            lambda: loss_fn(model, batches[1][0][8:], batches[1][1][8:]), scaler)
    next(model.parameters()).grad[0, 0] = float("inf")  # as an fp16 overflow would
    scaler.step(opt, halves=halves)
    scaler.update()
    assert opt.t == 1 and opt.modulation == mu and opt.variance == phi
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))


def test_gradscaler_scaled_halves_give_unscaled_phi():
    m1, m2 = make(), make()
    o1 = agvm_opt(agvm.AGVMSGD, m1, interval=1, **SGD_KW)
    o2 = agvm_opt(agvm.AGVMSGD, m2, interval=1, **SGD_KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = data(1)[0]
    _, h1 = agvm.backward_two_halves(o1, lambda: loss_fn(m1, x[:8], y[:8]), lambda: loss_fn(m1, x[8:], y[8:]), scaler)
    scaler.step(o1, halves=h1)
    _, h2 = agvm.backward_two_halves(o2, lambda: loss_fn(m2, x[:8], y[:8]), lambda: loss_fn(m2, x[8:], y[8:]))
    o2.step(halves=h2)
    assert o1.variance == pytest.approx(o2.variance, rel=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)


@pytest.mark.parametrize("cls, kw", [(agvm.AGVMSGD, SGD_KW), (agvm.AGVMAdamW, ADAMW_KW)])
def test_state_dict_resume_is_bit_identical(cls, kw):
    batches = data(9)

    def run(model, opt, bs):
        for x, y in bs:
            loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, x[:8], y[:8]),
                                                    lambda: loss_fn(model, x[8:], y[8:]))
            opt.step(halves=halves)

    full = make()
    opt_full = agvm_opt(cls, full, interval=2, alpha=0.5, **kw)
    run(full, opt_full, batches)

    part = make()
    opt_part = agvm_opt(cls, part, interval=2, alpha=0.5, **kw)
    run(part, opt_part, batches[:5])
    ckpt = copy.deepcopy({"model": part.state_dict(), "opt": opt_part.state_dict()})
    assert ckpt["opt"]["agvm"]["t"] == 5
    resumed = make(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt_res = agvm_opt(cls, resumed, interval=2, alpha=0.5, **kw)
    opt_res.load_state_dict(ckpt["opt"])
    assert opt_res.t == 5 and opt_res.modulation == opt_part.modulation
    run(resumed, opt_res, batches[5:])
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt_res.modulation == opt_full.modulation and opt_res.variance == opt_full.variance


def test_two_halves_helper_gives_mean_gradient_and_halves_only_on_measurement():
    model = make()
    opt = agvm_opt(agvm.AGVMSGD, model, interval=2, **SGD_KW)
    x, y = data(1)[0]
    ref = make()
    loss_ref = loss_fn(ref, x, y)
    loss_ref.backward()
    for measure in (False, True):
        assert opt.should_measure() == measure
        loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, x[:8], y[:8]),
                                                lambda: loss_fn(model, x[8:], y[8:]))
        assert (halves is not None) == measure
        torch.testing.assert_close(loss, loss_ref.detach())
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        if measure:
            fresh = make()  # same weights: no step was taken
            ga, gb = half_grads(fresh, agvm_opt(agvm.AGVMSGD, fresh), x, y)
            assert halves[1] is None  # (ga, None): the optimizer derives gb = 2 * p.grad - ga
            for a, b, ha, p in zip(ga, gb, halves[0], opt.params_in_order()):
                torch.testing.assert_close(ha, a)
                torch.testing.assert_close(2 * p.grad - ha, b)
        opt.t += 1  # advance the counter without stepping, to keep the weights equal to `ref`


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(interval=0), "interval must be an integer >= 1"),
        (dict(interval=2.5), "interval must be an integer >= 1"),
        (dict(alpha=1.0), "alpha must be in"),
        (dict(mu_clip=(2.0, 1.0)), "low <= high"),
        (dict(anchor="fpn"), "anchor 'fpn' names no module"),
    ],
)
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        agvm_opt(agvm.AGVMSGD, make(), **kwargs)


def test_groups_without_module_are_refused():
    model = make()
    with pytest.raises(ValueError, match='needs a "module" key'):
        agvm.AGVMSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match='needs a "module" key'):
        agvm.AGVMAdamW([{"params": list(model.parameters())}])


def test_several_groups_per_module_share_one_phi():
    model = make()
    groups = agvm.param_groups(model, no_decay_norm_bias=True, weight_decay=1e-4)
    assert [g["module"] for g in groups] == ["backbone", "backbone", "neck", "neck", "bbox_head", "bbox_head"]
    opt = agvm.AGVMSGD(groups, lr=0.1, interval=1)
    assert opt.modules == ["backbone", "neck", "bbox_head"]
    ga, gb = half_grads(model, opt, *data(1)[0])
    opt.step(halves=(ga, gb))
    assert set(opt.variance) == {"backbone", "neck", "bbox_head"}


def test_pmd_lamb_without_decay_is_lamb_and_decay_resets_moments():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    w_ref = w.detach().clone()
    opt = agvm.PMDLAMB([w], lr=0.1, weight_decay=0.01, decay_interval=2, moment_decay=(0.0, 0.0))
    grads = [torch.randn(5) for _ in range(3)]
    m = torch.zeros(5)
    v = torch.zeros(5)
    steps = 0
    for k, g in enumerate(grads):
        if k == 2:  # reset before the 3rd step: moments and bias correction start over
            m.zero_()
            v.zero_()
            steps = 0
        steps += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        r = (m / (1 - 0.9**steps)) / ((v / (1 - 0.999**steps)).sqrt() + 1e-6) + 0.01 * w_ref
        w_ref = w_ref - 0.1 * (w_ref.norm() / r.norm()) * r
        w.grad = g.clone()
        opt.step()
        torch.testing.assert_close(w.detach(), w_ref)
    with pytest.raises(ValueError, match="moment_decay"):
        agvm.PMDLAMB([w], moment_decay=(1.5, 0.0))


def test_groups_added_later_must_name_an_existing_module():
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="new module 'rpn_head'"):
        opt.add_param_group({"params": [extra], "module": "rpn_head"})
    assert len(opt.param_groups) == 3  # nothing half-added
    opt.add_param_group({"params": [extra], "module": "neck", "weight_decay": 0.0})
    assert opt.module_ids()[-1] == opt.modules.index("neck")
