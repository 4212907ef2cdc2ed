"""agvm.two_halves: one full-batch pass off measurement steps; on measurement steps half A's gradient kept
apart (moved, not copied), p.grad the whole batch's mean, weights for unequal halves, accumulation, loss scale."""
import pytest
import torch
from torch import nn

import agvm
from agvm.variance import module_stats


class Det(nn.Module):
    """mmdet's attribute names; the bbox_head's `extra` layer is reached by the samples of half A only."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.neck = nn.Sequential(nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8))
        self.bbox_head = nn.Linear(8, 3)
        self.bbox_head.extra = nn.Linear(8, 3)

    def forward(self, x, first_only=False):
        h = self.neck(self.backbone(x))
        out = self.bbox_head(h)
        return out + self.bbox_head.extra(h) if first_only else out


def make():
    torch.manual_seed(0)
    return Det()


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def loss_fn(model, x, y, first_only=False):
    return nn.functional.mse_loss(model(x, first_only), y)


def reference(x, y, n_a, first_only=False):
    """(mean-loss gradient of the whole batch, of half A, of half B) on a fresh model, the plain way."""
    grads = []
    for sl, fo in ((slice(None), None), (slice(0, n_a), first_only), (slice(n_a, None), False)):
        model = make()
        if fo is None:  # the whole batch: the halves' weighted mean
            la = loss_fn(model, x[:n_a], y[:n_a], first_only) * n_a / len(x)
            (la + loss_fn(model, x[n_a:], y[n_a:]) * (len(x) - n_a) / len(x)).backward()
        else:
            loss_fn(model, x[sl], y[sl], fo).backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()])
    return grads


def full_halves(opt, halves):
    """(ga, gb) from either form of ``step(halves=...)``: gb is derived as 2 * p.grad - ga for (ga, None)."""
    ga, gb = halves
    if gb is None:
        gb = [None if p.grad is None else 2 * p.grad - (0 if a is None else a)
              for p, a in zip(opt.params_in_order(), ga)]
    return ga, gb


def test_off_measurement_steps_run_one_full_batch_pass():
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=3)
    x, y = batch(8)
    calls = []

    def closure(name, sl):
        def fn():
            calls.append(name)
            return loss_fn(model, x[sl], y[sl])
        return fn

    full, _, _ = reference(x, y, 4)
    for t in range(1, 4):
        calls.clear()
        loss, halves = agvm.backward_two_halves(opt, closure("a", slice(0, 4)), closure("b", slice(4, None)),
                                                loss=closure("full", slice(None)))
        assert (halves is None) == (t != 3)
        assert calls == (["full"] if t != 3 else ["a", "b"])
        torch.testing.assert_close(loss, loss_fn(make(), x, y).detach())
        for p, g in zip(model.parameters(), full):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, g)
        opt.t += 1  # no update: the weights stay the reference's
    # the two-pass option (no `loss`): both halves on every step
    calls.clear()
    _, halves = agvm.backward_two_halves(opt, closure("a", slice(0, 4)), closure("b", slice(4, None)))
    assert calls == ["a", "b"] and halves is None


@pytest.mark.parametrize("n", [8, 7])
def test_measurement_gives_mean_gradient_and_half_a_scaled_by_two_weights(n):
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=1)
    x, y = batch(n)
    n_a = (n + 1) // 2
    w = (n_a / n, (n - n_a) / n)
    loss, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, x[:n_a], y[:n_a], True),
                                            lambda: loss_fn(model, x[n_a:], y[n_a:]), weights=w,
                                            loss=lambda: pytest.fail("a measurement step runs the halves"))
    full, ga_ref, gb_ref = reference(x, y, n_a, first_only=True)
    params = opt.params_in_order()
    index = {id(p): k for k, p in enumerate(model.parameters())}
    ga, gb = full_halves(opt, halves)
    for p, a, b in zip(params, ga, gb):
        k = index[id(p)]
        torch.testing.assert_close(p.grad, full[k])
        torch.testing.assert_close(a, 2 * w[0] * ga_ref[k])  # the scale the optimizer's derivation needs
        torch.testing.assert_close(b, 2 * w[1] * gb_ref[k])
    extra = [k for k, p in enumerate(params) if p is model.bbox_head.extra.weight][0]
    assert ga[extra].abs().sum() > 0 and gb[extra].abs().sum() == 0  # only half A reached it
    # Phi is that of the unscaled halves: the weights do not bias the measurement
    ids, m = opt.module_ids(), len(opt.modules)
    ref = [[r[index[id(p)]] for p in params] for r in (ga_ref, gb_ref)]
    stats, stats_ref = module_stats(ga, gb, ids, m), module_stats(*ref, ids, m)
    cos = stats[:, 0] / (stats[:, 1] * stats[:, 2]).sqrt()
    cos_ref = stats_ref[:, 0] / (stats_ref[:, 1] * stats_ref[:, 2]).sqrt()
    torch.testing.assert_close(cos, cos_ref)
    opt.step(halves=halves)
    assert set(opt.variance) == {"backbone", "neck", "bbox_head"}


def test_half_a_moves_gradients_and_pop_adds_in_place():
    """No copies: p.grad's tensors come back after half A, and pop adds half A into them and returns
    half A's own buffers: a measurement step holds one gradient-sized buffer beyond plain training."""
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=1)
    params = opt.params_in_order()
    x, y = batch(8)
    loss_fn(model, x[4:], y[4:]).backward()  # half B first: p.grad exists before half A runs
    before = [p.grad for p in params]
    two = agvm.TwoHalves(opt)
    with two.half_a():
        assert all(p.grad is None for p in params)
        loss_fn(model, x[:4], y[:4], True).backward()
        inside = [p.grad for p in params]
    assert all(p.grad is b for p, b in zip(params, before)) and two.pending
    ga, _ = two.pop()
    assert not two.pending and two.pop() is None
    assert all(p.grad is b for p, b in zip(params, before) if b is not None)  # (bbox_head.extra: half A only)
    assert all(a is i for a, i in zip(ga, inside))


def test_accumulation_over_a_window_and_loss_scale():
    """k micro-batches, each split in two, backward scaled by s / k: p.grad the window's (scaled) mean, half A's
    gradient summed over the window and returned unscaled; Phi equal to that of the plain halves."""
    k, s = 3, 2.0 ** 6
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=1)
    params = opt.params_in_order()
    micro = [batch(6, seed=i) for i in range(k)]
    two = agvm.TwoHalves(opt)
    for x, y in micro:
        with two.half_a():
            (loss_fn(model, x[:3], y[:3]) * 0.5 * s / k).backward()
        (loss_fn(model, x[3:], y[3:]) * 0.5 * s / k).backward()
    halves = two.pop(scale=s)
    for p in params:
        if p.grad is not None:
            p.grad.div_(s)  # what scaler.unscale_ does
    ga, gb = full_halves(opt, halves)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    ref = [reference(x, y, 3) for x, y in micro]
    for p, a, b in zip(params, ga, gb):
        i = index[id(p)]
        if p is model.bbox_head.extra.weight or p is model.bbox_head.extra.bias:
            assert p.grad is None and a is None and b is None
            continue
        torch.testing.assert_close(p.grad, sum(r[0][i] for r in ref) / k)
        torch.testing.assert_close(a, sum(r[1][i] for r in ref) / k)
        torch.testing.assert_close(b, sum(r[2][i] for r in ref) / k)


def test_gradscaler_halves_match_unscaled_training():
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        model = make()
        opt = agvm.AGVMAdamW(agvm.param_groups(model), lr=1e-2, interval=2)
        for i in range(4):
            x, y = batch(8, seed=i)
            _, halves = agvm.backward_two_halves(opt, lambda: loss_fn(model, x[:4], y[:4]),
                                                 lambda: loss_fn(model, x[4:], y[4:]), scaler,
                                                 loss=lambda: loss_fn(model, x, y))
            if scaler is None:
                opt.step(halves=halves)
            else:
                scaler.step(opt, halves=halves)
                scaler.update()
        runs.append((opt.variance, list(model.parameters())))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5) and len(runs[0][0]) == 3
    for p, q in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(p, q)


def test_error_inside_half_a_restores_gradients_and_bad_weights():
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=1)
    x, y = batch(8)
    loss_fn(model, x, y).backward()
    before = [p.grad for p in opt.params_in_order()]
    two = agvm.TwoHalves(opt)
    with pytest.raises(RuntimeError, match="boom"):
        with two.half_a():
            raise RuntimeError("boom")
    assert all(p.grad is b for p, b in zip(opt.params_in_order(), before))
    with pytest.raises(ValueError, match="weights must be"):
        agvm.backward_two_halves(opt, lambda: None, lambda: None, weights=(0.5, 0.6))


def test_derive_b_materialises_half_b_before_p_grad_changes():
    """Clipping scales p.grad after pop: derive_b=True hands over half B as it was, so Phi stays right."""
    model = make()
    opt = agvm.AGVMSGD(agvm.param_groups(model), lr=0.1, interval=1)
    x, y = batch(8)
    two = agvm.TwoHalves(opt)
    with two.half_a():
        (loss_fn(model, x[:4], y[:4]) * 0.5).backward()
    (loss_fn(model, x[4:], y[4:]) * 0.5).backward()
    ga, gb = two.pop(derive_b=True)
    torch.nn.utils.clip_grad_norm_(opt.params_in_order(), 1e-3)
    _, ga_ref, gb_ref = reference(x, y, 4)
    index = {id(p): k for k, p in enumerate(model.parameters())}
    for p, a, b in zip(opt.params_in_order(), ga, gb):
        if p.grad is not None:
            torch.testing.assert_close(a, ga_ref[index[id(p)]])
            torch.testing.assert_close(b, gb_ref[index[id(p)]])
