"""AGVMSGD / AGVMAdamW on torch's own optimizer test inputs: every CPU sample config of the SGD and AdamW
OptimizerInfo (torch.testing._internal.common_optimizers, with its for-loop, differentiable and fused
variants, plus foreach) gives exactly torch's update: with mu = 1 (equal halves) the whole model moves as
torch's optimizer, and with mu moved by real halves each module moves as torch's optimizer with lr * mu.

torch's test package is imported once, in a fixture (about 8 s), so collecting the suite stays fast.
"""
import copy

import pytest
import torch

import agvm

STEPS = 5
SHAPES = {"backbone": [(4, 3), (4,)], "head": [(2, 4), (2,)]}


def _torch_configs(optim_cls):
    pytest.importorskip("expecttest", reason="torch's test inputs need expecttest (requirements.txt)")
    from torch.testing._internal.common_optimizers import _get_optim_inputs_including_global_cliquey_kwargs, optim_db

    # importing torch's test utilities calls torch.backends.disable_global_flags(), which makes every later
    # `torch.backends.cudnn.benchmark = ...` (mmseg's Runner set-up) raise in this process: undo it
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

    (info,) = [i for i in optim_db if i.optim_cls is optim_cls]
    inputs = _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    configs = [(c.desc, c.kwargs) for c in inputs]
    # torch lists foreach only where its kernels run natively; it is accepted on a CPU too
    configs += [(f"{desc} & foreach", {**kw, "foreach": True}) for desc, kw in configs
                if not any(kw.get(k) for k in ("fused", "differentiable", "foreach"))]
    assert any(kw.get("fused") for _, kw in configs) and any(kw.get("foreach") for _, kw in configs)
    return configs


@pytest.fixture(scope="module")
def torch_configs():
    return {"sgd": _torch_configs(torch.optim.SGD), "adamw": _torch_configs(torch.optim.AdamW)}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: [torch.randn(s, generator=g) for s in shapes] for m, shapes in SHAPES.items()}


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return {m: [torch.randn(s, generator=g) for s in shapes] for m, shapes in SHAPES.items()}


def _run(agvm_cls, torch_cls, kwargs, equal_halves):
    """Steps AGVM and the reference side by side; returns (AGVM params, reference params, AGVM optimizer)."""
    params = _params()
    mine = {m: [p.clone() for p in ps] for m, ps in params.items()}
    opt = agvm_cls([{"params": ps, "module": m} for m, ps in mine.items()], **copy.deepcopy(kwargs),
                   interval=2, alpha=0.5, anchor="backbone")
    if equal_halves:  # mu stays 1: one torch optimizer over the same groups
        theirs = {m: [p.clone() for p in ps] for m, ps in params.items()}
        refs = {"all": torch_cls([{"params": ps} for ps in theirs.values()], **copy.deepcopy(kwargs))}
    else:  # one torch optimizer per module, its lr set to lr * mu before each step
        theirs = {m: [p.clone() for p in ps] for m, ps in params.items()}
        refs = {m: torch_cls(ps, **copy.deepcopy(kwargs)) for m, ps in theirs.items()}
    base_lr = {name: ref.param_groups[0]["lr"] for name, ref in refs.items()}
    for step in range(STEPS):
        grads = _grads(step)
        for m in SHAPES:
            for p, q, g in zip(mine[m], theirs[m], grads[m]):
                p.grad, q.grad = g.clone(), g.clone()
        halves = None
        if opt.should_measure():
            ga = [g * (1.0 + 0.5 * i) for i, g in enumerate(grads["backbone"] + grads["head"])]
            full = grads["backbone"] + grads["head"]
            gb = [g.clone() for g in ga] if equal_halves else [2 * g - a for g, a in zip(full, ga)]
            halves = (ga, gb)
        opt.step(halves=halves)
        for name, ref in refs.items():
            if name != "all":
                ref.param_groups[0]["lr"] = base_lr[name] * opt.modulation[name]
            ref.step()
    return mine, theirs, opt


@pytest.mark.parametrize("equal_halves", [True, False], ids=["mu=1", "mu_moved"])
@pytest.mark.parametrize("name, agvm_cls, torch_cls", [("sgd", agvm.AGVMSGD, torch.optim.SGD),
                                                      ("adamw", agvm.AGVMAdamW, torch.optim.AdamW)])
def test_torch_sample_configs_give_torchs_update(torch_configs, name, agvm_cls, torch_cls, equal_halves):
    failures = []
    for desc, kwargs in torch_configs[name]:
        mine, theirs, opt = _run(agvm_cls, torch_cls, kwargs, equal_halves)
        if equal_halves:
            assert opt.modulation == {"backbone": 1.0, "head": 1.0}, desc
        else:
            assert opt.modulation["head"] != 1.0, desc  # the measurements moved mu: the lr scaling is exercised
        for g in opt.param_groups:
            for key in ("fused", "foreach", "differentiable"):
                assert g[key] == kwargs.get(key, g[key]), (desc, key)
        for m in SHAPES:
            for p, q in zip(mine[m], theirs[m]):
                if not torch.equal(p, q):
                    failures.append(f"{desc}: {m} differs by {(p - q).abs().max().item():.3g}")
    assert not failures, failures
