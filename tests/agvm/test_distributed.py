"""agvm.distributed: the DDP hook against the single-process optimizer fed halves=(G_A, G_B).

The multi-process tests run 2 or 4 gloo ranks on CPU (torch.multiprocessing spawn) with a tiny
three-module network and tiny buckets (several buckets, some spanning two modules).
Tolerances: G_A, G_B and their mean are sums of the same float32 values in a different order than the
reference's, and the per-module sums are split at shard boundaries, so mu agrees to float32
rounding (rtol 1e-5 on mu ~ 1, amplified by 1 / Phi at most ~3 here) and weights to 1e-6.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import _dist_utils as U  # noqa: E402

import agvm  # noqa: E402

MU_RTOL = 1e-5
W_ATOL = 1e-6


def _check(results, ref, min_dev: float = 0.02):
    for r in results:
        assert "error" not in r, r.get("traceback")
    first = results[0]
    for r in results[1:]:  # every rank holds bit-identical mu and weights
        assert r["mu"] == first["mu"]
        for k in first["weights"]:
            assert torch.equal(r["weights"][k], first["weights"][k]), k
    assert first["t"] == ref["t"]
    assert first["mu"].keys() == ref["mu"].keys()
    # the measurement must have moved mu, or the comparison below proves nothing
    assert max(abs(v - 1.0) for v in ref["mu"].values()) > min_dev, ref["mu"]
    for m in ref["mu"]:
        assert math.isclose(first["mu"][m], ref["mu"][m], rel_tol=MU_RTOL), (m, first["mu"], ref["mu"])
        assert math.isclose(first["phi"][m], ref["phi"][m], rel_tol=MU_RTOL, abs_tol=1e-7), (m, first["phi"])
    for k, v in ref["weights"].items():
        torch.testing.assert_close(first["weights"][k], v, rtol=0, atol=W_ATOL, msg=k)


# -- single process: the register-time errors --------------------------------------------------------
@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_register_errors_in_one_process(one_rank_group):
    model = U.make_model({})
    opt = U.make_opt(model, {})
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        agvm.distributed.register_hook(model, opt)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(TypeError, match="AGVMSGD or agvm.AGVMAdamW"):
        agvm.distributed.register_hook(ddp, torch.optim.SGD(model.parameters(), lr=0.1))
    # the optimizer misses a trainable parameter
    groups = agvm.param_groups(model, modules=["backbone", "neck", "head"])
    groups = [g for g in groups if g["module"] != "head"]
    with pytest.raises(ValueError, match=r"does not hold.*head\.weight"):
        agvm.distributed.register_hook(ddp, agvm.AGVMSGD(groups, lr=0.1))
    # the optimizer holds a parameter DDP does not synchronise
    extra = torch.nn.Parameter(torch.zeros(3))
    groups = agvm.param_groups(model, modules=["backbone", "neck", "head"]) + [{"params": [extra], "module": "x"}]
    with pytest.raises(ValueError, match="does not synchronise"):
        agvm.distributed.register_hook(ddp, agvm.AGVMSGD(groups, lr=0.1))
    # a frozen parameter left in the optimizer
    opt2 = U.make_opt(model, {})
    model.neck.bias.requires_grad_(False)
    ddp2 = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="does not synchronise"):
        agvm.distributed.register_hook(ddp2, opt2)
    model.neck.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="world size is 1.*backward_two_halves"):
        agvm.distributed.register_hook(ddp, opt)
    assert opt.estimator is None


@pytest.mark.slow
def test_odd_world_size_raises():
    results = U.spawn(U.error_worker, 3)
    for r in results:
        assert r["raised"] == "ValueError", r
        assert "odd" in r["message"]


# -- agreement with the single-process computation -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sgd_matches_single_process(world):
    cfg = {"steps": 7, "optim": "sgd", "interval": 2}
    _check(U.spawn(U.train_worker, world, cfg), U.reference(world, cfg))


@pytest.mark.slow
def test_wrong_split_would_be_caught():
    """Negative control: the halves {0, 2} / {1, 3} give a mu that the tolerance tells apart."""
    cfg = {"steps": 7, "optim": "sgd", "interval": 2}
    right, wrong = U.reference(4, cfg), U.reference(4, cfg, split=([0, 2], [1, 3]))
    assert any(not math.isclose(right["mu"][m], wrong["mu"][m], rel_tol=100 * MU_RTOL) for m in right["mu"])


@pytest.mark.slow
def test_adamw_accumulation_unused_matches_single_process():
    """AdamW's weighted stats, with no_sync gradient accumulation and a parameter no rank uses."""
    cfg = {"steps": 7, "optim": "adamw", "interval": 3, "accum": 2, "unused": True}
    results = U.spawn(U.train_worker, 4, cfg)
    ref = U.reference(4, cfg)
    _check(results, ref)
    assert results[0]["t"] == 7


@pytest.mark.slow
def test_adamw_two_ranks_matches_single_process():
    cfg = {"steps": 6, "optim": "adamw", "interval": 2}
    _check(U.spawn(U.train_worker, 2, cfg), U.reference(2, cfg))


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_gradscaler_skip_keeps_t_and_mu(optim):
    """An inf loss on rank 0 at a measurement step: GradScaler skips it, t and mu stay, and the run then
    equals the single-process run without that batch (the loss scale cancels in the cosine)."""
    cfg = {"steps": 8, "optim": optim, "interval": 2, "amp": True, "inf_steps": (3,)}
    results = U.spawn(U.train_worker, 4, cfg)
    log = results[0]["log"]
    assert "error" not in results[0], results[0].get("traceback")
    # step 3 follows three applied steps, so it was the measurement step t = 4
    assert log[3]["t"] == log[2]["t"] == 3 and log[3]["mu"] == log[2]["mu"]
    assert log[4]["t"] == 4 and log[4]["mu"] != log[3]["mu"]  # measured again on the next batch
    _check(results, U.reference(4, cfg, skip_steps=(3,)))


# -- resume --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_mid_run_is_bitwise(tmp_path, optim):
    """Checkpoint after 4 steps, rebuild DDP + optimizer from it, run on: bit-identical to an unbroken run.

    With 2 ranks every sum the hook and DDP form has two terms, so it does not depend on the bucket
    layout (which DDP rebuilds after the first iteration of each new DDP instance); the first resumed
    step (t = 5) is a plain step, so the first resumed measurement (t = 6) uses the rebuilt layout."""
    cfg = {"steps": 9, "stop": 4, "optim": optim, "interval": 2, "ckpt": str(tmp_path / "ckpt.pt")}
    results = U.spawn(U.resume_worker, 2, cfg)
    for r in results:
        assert "error" not in r, r.get("traceback")
        a, b = r["continuous"], r["resumed"]
        assert a["t"] == b["t"] == 9
        assert a["mu"] == b["mu"] and a["phi"] == b["phi"]
        assert max(abs(v - 1) for v in a["mu"].values()) > 0.01
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k


# -- traffic -------------------------------------------------------------------------------------------
def _ring_bytes(records) -> float:
    """Bytes one rank sends under the ring cost model of each collective."""
    total = 0.0
    for op, k, inp, out in records:
        assert inp >= 0, f"unexpected collective {op}"
        if op == "all_reduce":
            total += 2 * (k - 1) / k * inp
        elif op == "reduce_scatter":
            total += (k - 1) / k * inp
        elif op == "all_gather":
            total += (k - 1) / k * out
    return total


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_measurement_step_traffic_equals_plain_step(world):
    cfg = {"steps": 6, "interval": 3, "bucket_cap_mb": 0.001}
    results = U.spawn(U.traffic_worker, world, cfg)
    r = results[0]
    assert "error" not in r, r.get("traceback")
    plain = [s for s in r["per_step"] if not s["measure"]]
    meas = [s for s in r["per_step"] if s["measure"]]
    assert len(meas) == 2 and len(plain) == 4
    param_bytes = 4 * r["numel"]
    for s in plain:  # the ordinary all-reduce of every gradient, nothing else
        assert {op for op, *_ in s["records"]} == {"all_reduce"}
        assert sum(inp for _, _, inp, _ in s["records"]) == param_bytes
    plain_bytes = _ring_bytes(plain[0]["records"])
    assert plain_bytes == pytest.approx(2 * (world - 1) / world * param_bytes)
    for s in meas:
        assert "all_reduce" not in {op for op, *_ in s["records"]}
        ratio = _ring_bytes(s["records"]) / plain_bytes
        # extra: (H-1) * M * 3 float64 of statistics, and the zero padding of each bucket to a multiple of
        # H elements (< H), which costs 4 (2H - 1) (H - 1) / H < 8 (H - 1) bytes per bucket
        h = world // 2
        extra = (h - 1) * r["modules"] * 3 * 8 + 8 * (h - 1) * len(plain[0]["records"])
        assert 1.0 - 1e-12 <= ratio <= 1.0 + extra / plain_bytes + 1e-9, ratio
        assert ratio < 1.05  # the authors' scheme moves about 3x
