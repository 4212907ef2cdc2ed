"""agvm.diagnose: the running sums against the Gram matrix, the law against measured 1 - cos, the closed forms, DDP."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import _diagnose_worker as W  # noqa: E402

import agvm  # noqa: E402
from agvm.diagnose import Diagnosis, GradientSums, HalfPairs, diagnose, measure_phi, measure_phi_pairs  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _per_image_grads(model, x, y):
    """{module: [N, D] matrix of flattened per-image gradients}, brute force."""
    rows = {m: [] for m in W.MODULES}
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        W.loss(model, x[i:i + 1], y[i:i + 1]).backward()
        for m in W.MODULES:
            rows[m].append(torch.cat([p.grad.reshape(-1) for p in getattr(model, m).parameters()]).double())
    return {m: torch.stack(v) for m, v in rows.items()}


def test_sums_equal_the_gram_matrix_estimates():
    model = W.make_net()
    x, y = W.data(24, torch.Generator().manual_seed(3))
    d = diagnose(model, lambda i: W.loss(model, x[i:i + 1], y[i:i + 1]), range(len(x)), modules=W.MODULES,
                 progress=None)
    n = len(x)
    for m, r in _per_image_grads(model, x, y).items():
        k = r @ r.T
        signal = (k.sum() - k.trace()) / (n * (n - 1))  # mean off-diagonal Gram entry: unbiased |mu|^2
        noise = torch.cov(r.T).trace()  # unbiased trace of the covariance
        assert d.signal[m] == pytest.approx(float(signal), rel=1e-4)
        assert d.noise[m] == pytest.approx(float(noise), rel=1e-4)
        assert d.nsr[m] == pytest.approx(float(noise / signal), rel=1e-3)
    assert d.num_images == n and d.modules == W.MODULES


def test_law_predicts_measured_phi_at_held_out_batches():
    """NSR from 128 per-image gradients; Phi measured directly (two half-batches of fresh samples, 10 repeats) at
    batches 64-4096 that the diagnosis never saw. A law off by a factor 2 in x must fail the same check."""
    model = W.make_net()
    g = torch.Generator().manual_seed(2)
    x, y = W.data(128, g)
    d = diagnose(model, lambda i: W.loss(model, x[i:i + 1], y[i:i + 1]), range(len(x)), modules=W.MODULES,
                 total=len(x), progress=None)
    errors, wrong = [], []
    for b in (64, 256, 1024, 4096):
        phis = []
        for _ in range(10):
            (xa, ya), (xb, yb) = W.data(b // 2, g), W.data(b // 2, g)
            phis.append(measure_phi(model, lambda: W.loss(model, xa, ya), lambda: W.loss(model, xb, yb), W.MODULES))
        pred, off = d.phi(b), d.phi(b / 2)  # off: x = 4 NSR / b
        for m in W.MODULES:
            measured = statistics.fmean(p[m] for p in phis)
            errors.append(abs(pred[m] - measured) / measured)
            wrong.append(abs(off[m] - measured) / measured)
    assert statistics.median(errors) < 0.2, errors
    assert statistics.median(wrong) > 0.2, wrong


def test_measure_phi_is_what_the_optimizer_measures():
    model = W.make_net()
    x, y = W.data(16, torch.Generator().manual_seed(5))
    opt = agvm.AGVMSGD(agvm.param_groups(model, modules=W.MODULES), lr=0.0, interval=1)
    _, halves = agvm.backward_two_halves(opt, lambda: W.loss(model, x[:8], y[:8]), lambda: W.loss(model, x[8:], y[8:]))
    opt.step(halves=halves)
    direct = measure_phi(model, lambda: W.loss(model, x[:8], y[:8]), lambda: W.loss(model, x[8:], y[8:]), W.MODULES)
    for m in W.MODULES:
        assert direct[m] == pytest.approx(opt.variance[m], rel=1e-5)


def test_half_pairs_average_every_pair_of_halves():
    """K = 8 halves: the all-pairs mean of 1 - cos from the running sum equals the brute-force mean over the 28 pairs;
    the error bound is the sd of the 4 disjoint pairs' Phi over sqrt(4); one stored gradient beyond the sum."""
    model = W.make_net()
    x, y = W.data(8 * 6, torch.Generator().manual_seed(11))
    losses = [lambda k=k: W.loss(model, x[6 * k:6 * k + 6], y[6 * k:6 * k + 6]) for k in range(8)]
    got = measure_phi_pairs(model, losses, W.MODULES)
    grads = []
    for loss in losses:
        model.zero_grad(set_to_none=True)
        loss().backward()
        grads.append({m: torch.cat([p.grad.reshape(-1) for p in getattr(model, m).parameters()]).double()
                      for m in W.MODULES})
    for m in W.MODULES:
        cos = [float(torch.nn.functional.cosine_similarity(grads[i][m], grads[j][m], dim=0))
               for i in range(8) for j in range(i + 1, 8)]
        assert len(cos) == 28 and got[m]["pairs"] == 28 and got[m]["halves"] == 8
        assert got[m]["phi"] == pytest.approx(1 - statistics.fmean(cos), rel=1e-5)
        disjoint = [1 - float(torch.nn.functional.cosine_similarity(grads[i][m], grads[i + 1][m], dim=0))
                    for i in range(0, 8, 2)]
        assert got[m]["se"] == pytest.approx(statistics.stdev(disjoint) / 2, rel=1e-4)
        # the first disjoint pair is what measure_phi (and the optimizer) measure for those two halves
        assert disjoint[0] == pytest.approx(measure_phi(model, losses[0], losses[1], W.MODULES)[m], rel=1e-5)


def test_half_pairs_errors_and_silent_modules():
    model = W.make_net()
    x, y = W.data(4, torch.Generator().manual_seed(1))
    pairs = HalfPairs(model, W.MODULES)
    W.loss(model, x[:2], y[:2]).backward()
    pairs.add()
    with pytest.raises(ValueError, match="odd number of halves"):
        pairs.result()
    model.zero_grad(set_to_none=True)
    W.loss(model, x[2:], y[2:]).backward()
    model.neck.weight.grad = None
    model.neck.bias.grad = None  # the neck got no gradient from this half: no cosine, left out
    pairs.add()
    res = pairs.result()
    assert set(res) == {"backbone", "head"} and res["head"]["se"] is None and 0 <= res["head"]["phi"] <= 2
    W.loss(model, x[:2], y[:2]).backward()
    model.head.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"module\(s\) \['head'\] is not finite"):
        pairs.add()


def _made(noise, signal=(1.0, 1.0, 1.0)):
    return Diagnosis(W.MODULES, list(signal), list(noise), num_images=64)


def test_phi_ratio_mu_closed_forms():
    d = _made([100.0, 10.0, 400.0])  # NSR backbone 100, neck 10, head 400
    assert d.nsr == {"backbone": 100.0, "neck": 10.0, "head": 400.0}
    for b in (4, 32, 512, 10_000):
        phi = d.phi(b)
        for m, nsr in d.nsr.items():
            x = 2 * nsr / b
            assert phi[m] == pytest.approx(x / (1 + x), rel=1e-12)
        assert d.ratio(b)["neck"] == pytest.approx(phi["backbone"] / phi["neck"], rel=1e-12)
        mu = d.mu(b)
        assert mu["backbone"] == 1.0
        target = {m: min(max(math.sqrt((phi["backbone"] + 1e-8) / (phi[m] + 1e-8)), 0.1), 10) for m in phi}  # Eq. 41
        assert mu["neck"] == pytest.approx(target["neck"], rel=1e-9)
        assert mu["head"] == pytest.approx(target["head"], rel=1e-9)
    assert d.mu(512, mu_clip=(0.9, 1.1))["neck"] == pytest.approx(1.1)
    # the ratio goes from 1 (small b) to NSR_backbone / NSR_module (large b)
    assert d.ratio(1e-6)["neck"] == pytest.approx(1.0, rel=1e-6)
    assert d.ratio(1e12)["neck"] == pytest.approx(10.0, rel=1e-6)
    assert d.ratio(1e12)["head"] == pytest.approx(0.25, rel=1e-6)


def test_batch_at_ratio_is_where_the_largest_ratio_crosses():
    d = _made([100.0, 10.0, 400.0])
    b2 = d.batch_at_ratio(2.0)
    assert b2 == pytest.approx(25.0)  # neck: 2 * 100 * 10 * (2 - 1) / (100 - 2 * 10)
    assert d.ratio(b2)["neck"] == pytest.approx(2.0, rel=1e-9)
    assert d.ratio(0.99 * b2)["neck"] < 2.0 and d.ratio(1.01 * b2)["neck"] > 2.0
    assert d.batch_at_ratio(2.0, module="head") == pytest.approx(400.0)  # the head is the noisier: 1 / ratio
    assert 1 / d.ratio(400.0)["head"] == pytest.approx(2.0, rel=1e-9)
    assert d.batch_at_ratio(4.0) == pytest.approx(100.0)  # the head's limit is exactly 4: never beyond
    assert math.isinf(d.batch_at_ratio(20.0))
    need = d.nsr_for_ratio(4.0, 512)  # a module this noisy would be 4x below the backbone at 512
    assert _made([100.0, need, 400.0]).ratio(512)["neck"] == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(ValueError, match="factor must be > 1"):
        d.batch_at_ratio(1.0)


def test_unresolved_signal_means_noise_dominated():
    d = _made([100.0, 10.0, 50.0], signal=(1.0, 1.0, -0.5))  # head: the mean not resolved from these images
    assert math.isinf(d.nsr["head"])
    assert d.phi(512)["head"] == pytest.approx(1.0)
    # 1 / ratio = 1 / Phi_backbone = 1 + b / (2 NSR_backbone): 4x at b = 2 * 100 * 3
    assert d.batch_at_ratio(4.0, module="head") == pytest.approx(600.0)
    assert 1 / d.ratio(600.0)["head"] == pytest.approx(4.0)
    out = d.to_dict()
    back = Diagnosis.from_dict(json.loads(json.dumps(out)))
    assert back.phi(77.0) == d.phi(77.0) and back.anchor == d.anchor
    assert out["modules"]["head"]["nsr"] is None and out["modules"]["neck"]["nsr"] == pytest.approx(10.0)
    assert out["misaligned_at"]["2x"] == pytest.approx(d.batch_at_ratio(2.0))


def test_errors_and_modules_without_gradient(caplog):
    model = W.make_net()
    x, y = W.data(4, torch.Generator().manual_seed(0))
    sums = GradientSums(model, W.MODULES)
    W.loss(model, x[:1], y[:1]).backward()
    sums.add()
    with pytest.raises(ValueError, match="at least 2 images"):
        sums.result()

    def head_only(i):  # the backbone and neck get no gradient
        return nn.functional.cross_entropy(model.head(x[i:i + 1, :1].expand(1, W.HID)), y[i:i + 1])

    with pytest.raises(ValueError, match="anchor module 'backbone' got no gradient"):
        diagnose(model, head_only, range(4), modules=W.MODULES, progress=None)
    d = diagnose(model, head_only, range(4), modules=W.MODULES, anchor="head", progress=None)
    assert d.modules == ["head"] and d.no_gradient == ["backbone", "neck"]
    assert "left out" in caplog.text

    with pytest.raises(FloatingPointError, match="not finite"):
        diagnose(model, lambda i: W.loss(model, x[i:i + 1], y[i:i + 1]) * math.inf, range(4), modules=W.MODULES,
                 progress=None)


def test_progress_lines():
    model = W.make_net()
    x, y = W.data(20, torch.Generator().manual_seed(0))
    lines = []
    diagnose(model, lambda i: W.loss(model, x[i:i + 1], y[i:i + 1]), range(20), modules=W.MODULES, total=20,
             progress=lines.append)
    assert len(lines) == 10 and lines[-1].startswith("diagnose: 20/20 images") and "ETA" in lines[0]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    d = _made([100.0, 10.0, 400.0])
    path = d.plot(str(tmp_path / "phi.png"), measured={"neck": {64: 0.2}})
    assert os.path.getsize(path) > 10_000 and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process():
    """Each of 2 gloo ranks takes every other image; the all-reduced sums give the one-process diagnosis."""
    import _dist_utils as U

    cfg = {"images": 16, "seed": 7}
    results = U.spawn(W.diagnose_worker, 2, cfg)
    assert not any("error" in r for r in results), results
    model = W.make_net()
    x, y = W.data(16, torch.Generator().manual_seed(7))
    ref = diagnose(model, lambda i: W.loss(model, x[i:i + 1], y[i:i + 1]), range(16), modules=W.MODULES,
                   progress=None)
    for r in results:
        assert r["num_images"] == 16
        for m in W.MODULES:
            assert r["signal"][m] == pytest.approx(ref.signal[m], rel=1e-4)
            assert r["noise"][m] == pytest.approx(ref.noise[m], rel=1e-4)


@pytest.mark.slow
def test_half_pairs_ddp_two_ranks_equal_one_process():
    """12 halves, pair k on rank k % 2: the all-reduced result is the one-process one."""
    import _dist_utils as U

    cfg = {"halves": 12, "half": 4, "seed": 5}
    results = U.spawn(W.pairs_worker, 2, cfg)
    assert not any("error" in r for r in results), results
    ref = W.pairs_worker(0, 1, cfg)
    for r in results:
        for m in W.MODULES:
            assert r[m]["halves"] == 12 and r[m]["phi"] == pytest.approx(ref[m]["phi"], rel=1e-5)
            assert r[m]["se"] == pytest.approx(ref[m]["se"], rel=1e-4)
