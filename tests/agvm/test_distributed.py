"""agvm.distributed: the DDP hook against the single-process optimizer fed halves=(G_A, G_B).

The multi-process tests run 2 and 4 gloo ranks on CPU (torch.multiprocessing spawn) with a tiny
three-module network and tiny buckets (several buckets, some spanning two modules). Spawning is the
slow part, so each world size is spawned once (a module-scoped fixture runs every scenario in the
same processes) and the tests check the scenarios' results.

Tolerances: G_A, G_B and their mean are sums of the same float32 values in another order than the
reference's, and the per-module sums are split at shard boundaries, so Phi and mu agree to float32
rounding (rtol 1e-5; Phi is 0.5-1.9 here, so 1 / Phi does not amplify it) and weights to 1e-6.
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

CFG = {
    "sgd": {"steps": 7, "optim": "sgd", "interval": 2},
    # the measurement on the autograd thread, as for CUDA buckets (CPU buckets use a worker thread)
    "sgd_unthreaded": {"steps": 7, "optim": "sgd", "interval": 2, "threaded": False},
    # p.grad as views into DDP's buckets: the AdamW weights read p.grad at step time
    "adamw": {"steps": 6, "optim": "adamw", "interval": 2, "grad_view": True},
    # AdamW's weighted stats, no_sync gradient accumulation, and a parameter no rank uses
    "adamw_accum_unused": {"steps": 7, "optim": "adamw", "interval": 3, "accum": 2, "unused": True},
    # an inf loss on rank 0 at step index 3 (then t = 4, a measurement step): GradScaler skips it
    "amp_sgd": {"steps": 8, "optim": "sgd", "interval": 2, "amp": True, "inf_steps": (3,)},
    "amp_adamw": {"steps": 8, "optim": "adamw", "interval": 2, "amp": True, "inf_steps": (3,)},
    # bench_ddp's MLP at width 128 (117k parameters), about 16 buckets
    "traffic": {"steps": 6, "interval": 3, "bucket_cap_mb": 0.03, "width": 128},
    # a SyncBatchNorm-like layer: all-reduces on DDP's group in forward and backward
    "sync": {"steps": 6, "optim": "sgd", "interval": 2, "sync": True},
}


@pytest.fixture(scope="module")
def runs4():
    names = ["sgd", "sgd_unthreaded", "adamw_accum_unused", "amp_sgd", "amp_adamw", "traffic"]
    runs = {n: ("traffic" if n == "traffic" else "train", CFG[n]) for n in names}
    runs["sgd_collective"] = ("train", {**CFG["sgd"], "ring": False})
    runs["ring"] = ("ring", {})
    runs["sync_hook"] = ("train", CFG["sync"])
    runs["sync_brute_force"] = ("brute_force", CFG["sync"])
    return U.spawn(U.multi_worker, 4, {"runs": runs})


@pytest.fixture(scope="module")
def runs2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    runs = {n: ("train", CFG[n]) for n in ["sgd", "adamw"]}
    runs["traffic"] = ("traffic", CFG["traffic"])
    for optim in ("sgd", "adamw"):
        runs[f"resume_{optim}"] = ("resume", {"steps": 9, "stop": 4, "optim": optim, "interval": 2,
                                              "ckpt": str(tmp / f"{optim}.pt")})
    return U.spawn(U.multi_worker, 2, {"runs": runs})


def _get(results, name):
    out = [r[name] for r in results]
    for r in out:
        assert "error" not in r, r.get("traceback")
    return out


def _check(results, ref, min_dev: float = 0.02):
    first = results[0]
    for r in results[1:]:  # every rank holds bit-identical mu and weights
        assert r["mu"] == first["mu"]
        for k in first["weights"]:
            assert torch.equal(r["weights"][k], first["weights"][k]), k
    assert first["t"] == ref["t"]
    assert first["mu"].keys() == ref["mu"].keys() and first["phi"].keys() == ref["phi"].keys()
    # the measurements must have moved mu, or the comparison below proves little
    assert max(abs(v - 1.0) for v in ref["mu"].values()) > min_dev, ref["mu"]
    for m in ref["mu"]:
        assert math.isclose(first["mu"][m], ref["mu"][m], rel_tol=MU_RTOL), (m, first["mu"], ref["mu"])
    for m in ref["phi"]:
        assert math.isclose(first["phi"][m], ref["phi"][m], rel_tol=MU_RTOL), (m, first["phi"], ref["phi"])
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


class _GroupOfSize:
    """Stands in for DDP's process group where only its size matters (the world-size checks)."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def test_register_errors_in_one_process(one_rank_group):
    model = U.make_model({})
    opt = U.make_opt(model, {})
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        agvm.distributed.register_hook(model, opt)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(TypeError, match="AGVMSGD or agvm.AGVMAdamW"):
        agvm.distributed.register_hook(ddp, torch.optim.SGD(model.parameters(), lr=0.1))
    # the optimizer misses a trainable parameter
    groups = [g for g in agvm.param_groups(model, modules=["backbone", "neck", "head"]) if g["module"] != "head"]
    with pytest.raises(ValueError, match=r"does not hold.*head\.weight"):
        agvm.distributed.register_hook(ddp, agvm.AGVMSGD(groups, lr=0.1))
    # the optimizer holds a parameter DDP does not synchronise
    extra = torch.nn.Parameter(torch.zeros(3))
    groups = agvm.param_groups(model, modules=["backbone", "neck", "head"]) + [{"params": [extra], "module": "x"}]
    with pytest.raises(ValueError, match="does not synchronise"):
        agvm.distributed.register_hook(ddp, agvm.AGVMSGD(groups, lr=0.1))
    # a parameter frozen after the optimizer was built
    opt2 = U.make_opt(model, {})
    model.neck.bias.requires_grad_(False)
    ddp2 = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="does not synchronise"):
        agvm.distributed.register_hook(ddp2, opt2)
    model.neck.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="world size is 1.*backward_two_halves"):
        agvm.distributed.register_hook(ddp, opt)
    for odd in (3, 5):
        ddp.process_group = _GroupOfSize(odd)
        with pytest.raises(ValueError, match=f"world size {odd} is odd"):
            agvm.distributed.register_hook(ddp, opt)
    assert opt.estimator is None


def test_step_without_hook_measurement_raises():
    """The estimator refuses a step for which the last backward pass measured nothing."""
    model = U.make_model({})
    opt = U.make_opt(model, {"interval": 1})
    est = agvm.distributed.TwoHalfEstimator.__new__(agvm.distributed.TwoHalfEstimator)
    est.optimizer, est._pending = opt, None
    opt.estimator = est
    x, y = U.batch(0, 0, 0)
    U.loss_fn(model, x, y).backward()
    with pytest.raises(RuntimeError, match="took no measurement"):
        opt.step()
    assert opt.t == 0 and opt.modulation == {m: 1.0 for m in opt.modules}


# -- agreement with the single-process computation -----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_sgd_matches_single_process(world, runs2, runs4):
    _check(_get(runs2 if world == 2 else runs4, "sgd"), U.reference(world, CFG["sgd"]))


@pytest.mark.slow
def test_unthreaded_path_matches_threaded(runs4):
    a, b = _get(runs4, "sgd")[0], _get(runs4, "sgd_unthreaded")[0]
    assert a["mu"] == b["mu"]
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


@pytest.mark.slow
def test_wrong_split_would_be_caught(runs4):
    """Negative control: halves {0, 2} / {1, 3} give a mu the tolerance tells apart from the DDP run's."""
    wrong = U.reference(4, CFG["sgd"], split=([0, 2], [1, 3]))
    got = _get(runs4, "sgd")[0]
    assert any(not math.isclose(got["mu"][m], wrong["mu"][m], rel_tol=100 * MU_RTOL) for m in wrong["mu"])


@pytest.mark.slow
def test_adamw_two_ranks_matches_single_process(runs2):
    _check(_get(runs2, "adamw"), U.reference(2, CFG["adamw"]))


@pytest.mark.slow
def test_adamw_accumulation_unused_matches_single_process(runs4):
    results = _get(runs4, "adamw_accum_unused")
    _check(results, U.reference(4, CFG["adamw_accum_unused"]))
    assert "unused" not in results[0]["phi"] and results[0]["mu"]["unused"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_gradscaler_skip_keeps_t_and_mu(optim, runs4):
    """GradScaler skips the inf step: t and mu stay, the next backward measures again, and the run equals
    the single-process run without that batch (the loss scale, a power of 2, cancels in the cosine)."""
    results = _get(runs4, f"amp_{optim}")
    log = results[0]["log"]
    assert log[3]["t"] == log[2]["t"] == 3 and log[3]["mu"] == log[2]["mu"]
    assert log[4]["t"] == 4 and log[4]["mu"] != log[3]["mu"]
    _check(results, U.reference(4, CFG[f"amp_{optim}"], skip_steps=(3,)))


@pytest.mark.slow
def test_sync_layer_collectives_during_backward(runs4):
    """With a layer that all-reduces on DDP's group in forward and backward (SyncBatchNorm's pattern), the
    hook's result equals the brute-force reference (all local gradients all-gathered) in the same setting."""
    hook, brute = _get(runs4, "sync_hook"), _get(runs4, "sync_brute_force")
    _check(hook, brute[0])


@pytest.mark.slow
def test_six_ranks_matches_single_process():
    """H = 3: buckets zero-padded to a multiple of 3, a half mean that is not a power-of-two division."""
    runs = {"sgd": ("train", CFG["sgd"]), "adamw": ("train", CFG["adamw_accum_unused"]),
            "traffic": ("traffic", CFG["traffic"]), "ring": ("ring", {})}
    results = U.spawn(U.multi_worker, 6, {"runs": runs})
    _check(_get(results, "sgd"), U.reference(6, CFG["sgd"]))
    _check(_get(results, "adamw"), U.reference(6, CFG["adamw_accum_unused"]))
    _check_traffic(_get(results, "traffic"), 6)
    _check_ring(_get(results, "ring"), 6)


# -- resume --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_resume_mid_run_is_bitwise(optim, runs2):
    """Checkpoint after 4 steps, rebuild model, DDP and optimizer from it, run on: bit-identical to an
    unbroken run. With 2 ranks every sum the hook and DDP form has two terms, so it does not depend on
    the bucket layout, which DDP rebuilds after the first iteration of each new DDP instance; the
    first resumed step (t = 5) is a plain step, so the first resumed measurement (t = 6) uses the rebuilt
    layout and splits the per-module sums at the same places as the unbroken run."""
    for r in _get(runs2, f"resume_{optim}"):
        a, b = r["continuous"], r["resumed"]
        assert a["t"] == b["t"] == 9
        assert a["mu"] == b["mu"] and a["phi"] == b["phi"]
        assert max(abs(v - 1) for v in a["mu"].values()) > 0.01
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k


# -- point-to-point rings (gloo) --------------------------------------------------------------------
def _check_ring(results, world: int) -> None:
    """Each rank's ring reduce-scatter / all-gather against the true sums / chunks and against torch's
    collectives: integer-valued data exactly; random data exactly at H = 2 (a sum of two terms does not
    depend on their order), to float32 rounding at H = 3."""
    h = world // 2
    for key in results[0]:
        kind, s = key
        for r in range(world):
            half = range(h) if r < h else range(h, world)
            i = r % h
            ring, coll = results[r][key]["rs"]
            truth = sum(results[q][key]["input"][i * s:(i + 1) * s] for q in half)
            exact = kind == "int" or h == 2
            if exact:
                assert torch.equal(ring, coll) and torch.equal(ring, truth), key
            else:
                torch.testing.assert_close(ring, coll, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(ring, truth, rtol=1e-6, atol=1e-6)
            ring, coll = results[r][key]["ag"]
            truth = torch.cat([results[q][key]["input"][:s] for q in half])
            assert torch.equal(ring, coll) and torch.equal(ring, truth), key


@pytest.mark.slow
def test_ring_equals_collective(runs4):
    """The hook's gloo rings give the collectives' results: per call, and for a whole run (bit-identical mu
    and weights at H = 2)."""
    _check_ring(_get(runs4, "ring"), 4)
    ring, coll = _get(runs4, "sgd")[0], _get(runs4, "sgd_collective")[0]
    assert ring["mu"] == coll["mu"] and ring["t"] == coll["t"]
    for k in ring["weights"]:
        assert torch.equal(ring["weights"][k], coll["weights"][k]), k


# -- traffic -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_measurement_step_wire_bytes(world, runs2, runs4):
    _check_traffic(_get(runs2 if world == 2 else runs4, "traffic"), world)


def _check_traffic(results, world: int) -> None:
    """TCP bytes sent per step (benchmarks/bench_ddp.py's counter): with the rings a measurement step sends
    what a plain step sends; with gloo's reduce_scatter (an all-reduce) (3H - 2) / (2H - 1) times that."""
    h = world // 2
    for r in results:
        for mode in ("ring", "collective"):
            run = r[mode]
            assert run["ring"] == (mode == "ring" and h > 1)
            steps = [(s["measure"], s["bytes"] - run["barrier"]) for s in run["per_step"]]
            # DDP rebuilds its buckets after the first step, which changes gloo's message count a little
            plain = [b for m, b in steps[1:] if not m]
            meas = [b for m, b in steps if m]
            assert len(meas) == 2 and len(plain) == 3
            # a plain step: DDP's ring all-reduce, 2 (W - 1) / W of the gradient bytes plus gloo's headers
            ideal = 2 * (world - 1) / world * 4 * run["numel"]
            assert all(0.995 * ideal <= b <= 1.05 * ideal for b in plain), (plain, ideal)
            # tcpi_bytes_sent also counts retransmitted bytes (seen under load: one measurement step 1.2 % above
            # the others): noise that only adds, so the steps' minima compare the algorithm's traffic
            ratio = min(meas) / min(plain)
            if mode == "ring" or h == 1:
                # plus (H-1) * M * 3 float64 of statistics and < H padding elements per bucket; gloo's
                # headers make a measurement step (fewer, larger messages) slightly cheaper here
                assert 0.95 <= ratio <= 1.005, (mode, ratio)
            else:
                expected = (3 * h - 2) / (2 * h - 1)
                assert ratio == pytest.approx(expected, rel=0.05), (mode, ratio)
