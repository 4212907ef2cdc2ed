import math

import pytest
import torch

from agvm.variance import Modulator, adam_denominator_, module_stats, phi_from_stats


def _phi(ga, gb, ids=None, m=1):
    ids = ids or [0] * len(ga)
    return phi_from_stats(module_stats(ga, gb, ids, m)).tolist()


def test_phi_identical_orthogonal_opposite():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert _phi([a], [a.clone()]) == [0.0]
    assert _phi([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 5.0])]) == [1.0]
    assert _phi([a], [-2 * a]) == [2.0]


def test_phi_is_over_the_concatenation_of_a_modules_tensors():
    # Two tensors of one module: per-tensor cosines are 1 and -1, the concatenation's cosine is
    # (1*1 + 3*(-3)) / (sqrt(10) * sqrt(10)) = -0.8.
    ga = [torch.tensor([1.0]), torch.tensor([3.0])]
    gb = [torch.tensor([1.0]), torch.tensor([-3.0])]
    assert _phi(ga, gb) == pytest.approx([1.8])
    # the same tensors as two modules: Phi 0 and 2
    assert _phi(ga, gb, ids=[0, 1], m=2) == pytest.approx([0.0, 2.0])


def test_phi_hand_computed_random_against_float64():
    g = torch.Generator().manual_seed(0)
    ga = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    gb = [torch.randn(7, 3, generator=g), torch.randn(5, generator=g)]
    a = torch.cat([x.flatten() for x in ga]).double()
    b = torch.cat([x.flatten() for x in gb]).double()
    expected = 1 - float(a @ b / (a.norm() * b.norm()))
    assert _phi(ga, gb) == pytest.approx([expected], rel=1e-6)


def test_module_without_gradient_gives_nan_and_missing_halves_are_zero():
    stats = module_stats([None, torch.ones(2)], [None, torch.ones(2)], [0, 1], 2)
    phi = phi_from_stats(stats)
    assert math.isnan(phi[0]) and phi[1] == 0.0
    # a parameter only half A reached: B's gradient is zero there
    stats = module_stats([torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([1.0, 0.0]), None], [0, 0], 1)
    assert stats[0].tolist() == [1.0, 5.0, 1.0]


def test_denominators_divide_the_halves_and_adam_denominator_matches_alg2():
    g = torch.Generator().manual_seed(1)
    a, b, grad, v = (torch.randn(10, generator=g) for _ in range(4))
    v = v.abs()
    d = (0.99 * v + 0.01 * (grad / 4) ** 2).sqrt() + 1e-3  # a GradScaler's scale 4 taken out of p.grad
    divided = module_stats([a, None], [b, None], [0, 0], 1, precond=[(v, 0.99, 1e-3), (None, 0.99, 1e-3)],
                           grads=[grad, None], inv_scale=0.25)
    direct = module_stats([a / d], [b / d], [0], 1)
    assert torch.allclose(divided, direct, rtol=1e-6)
    grad, v = torch.randn(4, generator=g), torch.rand(4, generator=g)
    den = adam_denominator_(grad, v, beta2=0.99, eps=1e-3)
    torch.testing.assert_close(den, (0.99 * v + 0.01 * grad**2).sqrt() + 1e-3)
    den0 = adam_denominator_(grad, None, beta2=0.99, eps=1e-3, out=torch.empty(4))  # first step: v_0 = 0
    torch.testing.assert_close(den0, (0.01 * grad**2).sqrt() + 1e-3)


def test_shape_and_length_errors():
    with pytest.raises(ValueError, match="one tensor per optimizer parameter"):
        module_stats([torch.ones(1)], [], [0], 1)
    with pytest.raises(ValueError, match="differ in shape"):
        module_stats([torch.ones(2)], [torch.ones(3)], [0], 1)


def _stats(phis):
    """[M, 3] stats whose Phi are the given values (unit vectors at angle arccos(1 - phi))."""
    return torch.tensor([[1.0 - p, 1.0, 1.0] for p in phis], dtype=torch.float64)


def test_modulator_mu_formula_ema_and_clip():
    mod = Modulator(["backbone", "neck", "head"], alpha=0.9, mu_clip=(0.1, 10.0), var_eps=1e-8)
    assert mod.update(_stats([0.5, 0.02, 0.5 * 1e-6]), t=10)
    target_neck = math.sqrt((0.5 + 1e-8) / (0.02 + 1e-8))  # = 5.0
    assert mod.mu["neck"] == pytest.approx(0.9 * 1.0 + 0.1 * target_neck)
    assert mod.mu["head"] == pytest.approx(0.9 + 0.1 * 10.0)  # sqrt(1e6) = 1000, clipped to 10
    assert mod.mu["backbone"] == 1.0
    assert mod.phi == pytest.approx({"backbone": 0.5, "neck": 0.02, "head": 0.5e-6})
    mu_neck = mod.mu["neck"]
    mod.update(_stats([0.001, 0.4, 0.001]), t=20)  # ratio 1/400 -> sqrt = 0.05 -> clipped to 0.1
    assert mod.mu["neck"] == pytest.approx(0.9 * mu_neck + 0.1 * 0.1)
    assert mod.mu["head"] == pytest.approx(0.9 * (0.9 + 0.1 * 10.0) + 0.1 * 1.0)


def test_modulator_ratio_clip_variant_and_start_iter():
    mod = Modulator(["backbone", "neck"], alpha=0.0, ratio_clip=(0.5, 10.0), start_iter=100)
    mod.update(_stats([0.5, 0.005]), t=10)  # before start_iter: Phi recorded, mu stays 1
    assert mod.mu == {"backbone": 1.0, "neck": 1.0} and mod.phi["neck"] == pytest.approx(0.005)
    mod.update(_stats([0.5, 0.005]), t=100)  # ratio 100 -> clipped to 10 before the sqrt
    assert mod.mu["neck"] == pytest.approx(math.sqrt(10.0))
    mod.update(_stats([0.1, 0.5]), t=110)  # ratio 0.2 -> 0.5
    assert mod.mu["neck"] == pytest.approx(math.sqrt(0.5))


def test_modulator_rejects_nonfinite_and_keeps_mu(caplog):
    mod = Modulator(["backbone", "neck"], alpha=0.5)
    mod.update(_stats([0.5, 0.125]), t=1)
    before = dict(mod.mu), dict(mod.phi)
    bad = _stats([0.5, 0.1])
    bad[1, 0] = float("nan")
    with caplog.at_level("DEBUG", logger="agvm"):
        assert not mod.update(bad, t=2)
        bad[0, 1] = float("inf")
        assert not mod.update(bad, t=3)
    assert (dict(mod.mu), dict(mod.phi)) == before
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "NaN or Inf" in warnings[0].getMessage()
    assert mod.num_rejected == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(anchor="fpn"), "anchor 'fpn' names no module"),
        (dict(alpha=1.0), "alpha must be in"),
        (dict(alpha=-0.1), "alpha must be in"),
        (dict(mu_clip=(10.0, 0.1)), "low <= high"),
        (dict(mu_clip=(0.0, 1.0)), "0 < low"),
        (dict(ratio_clip=(2.0, 1.0)), "ratio_clip"),
        (dict(var_eps=-1.0), "var_eps"),
    ],
)
def test_modulator_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Modulator(["backbone", "neck"], **kwargs)
