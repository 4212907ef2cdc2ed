"""Helpers for the multi-process DDP tests of agvm.distributed (CPU, gloo, torch.multiprocessing spawn).

Worker functions live here (not in the test module) so that spawned children can unpickle them.
Each worker gets the rank, world size and a config dict, and returns a picklable result that the
parent reads back from ``<tmp>/rank<r>.pt``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import agvm

IN, CLASSES, BATCH = 6, 3, 4


class SyncCenter(torch.autograd.Function):
    """Subtracts the mean over every rank's batch: SyncBatchNorm's pattern of collectives (all-reduce on
    the default group in forward and in backward) in a form that runs on CPU, where SyncBatchNorm
    does not (it has no CPU kernels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(0, keepdim=True)
        dist.all_reduce(total)
        ctx.count = x.shape[0] * dist.get_world_size()
        return x - total / ctx.count

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        total = g.sum(0, keepdim=True)
        dist.all_reduce(total)
        return g - total / ctx.count


class TinyNet(nn.Module):
    """Three AGVM modules; ``unused`` (if built) gets no gradient; ``sync`` adds a cross-rank layer."""

    def __init__(self, unused: bool = False, sync: bool = False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.neck = nn.Linear(12, 8)
        self.head = nn.Linear(8, CLASSES)
        self.unused = nn.Linear(8, CLASSES) if unused else None
        self.sync = sync

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x)
        if self.sync:
            h = SyncCenter.apply(h)
        return self.head(torch.tanh(self.neck(h)))


def make_model(cfg: Dict[str, Any]) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(unused=cfg.get("unused", False), sync=cfg.get("sync", False))


def make_opt(model: nn.Module, cfg: Dict[str, Any]):
    groups = agvm.param_groups(model, modules=["backbone", "neck", "head", "unused"])
    kw = dict(interval=cfg.get("interval", 2), alpha=cfg.get("alpha", 0.5))
    if cfg.get("optim", "sgd") == "adamw":
        return agvm.AGVMAdamW(groups, lr=1e-2, weight_decay=0.01, **kw)
    return agvm.AGVMSGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw)


def batch(step: int, micro: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The deterministic local batch of ``rank`` at optimizer step ``step``, micro-batch ``micro``.

    Ranks get differently shifted inputs, so the halves differ and Phi is far from 0."""
    g = torch.Generator().manual_seed(100_003 * step + 1_009 * micro + rank)
    x = torch.randn(BATCH, IN, generator=g) + 0.3 * rank
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


# -- launching -------------------------------------------------------------------------------------
def _entry(rank: int, world: int, fn: Callable, cfg: Dict[str, Any], tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))  # a broken run fails instead of hanging
    try:
        out = fn(rank, world, cfg)
        dist.barrier()  # every rank done before any tears gloo down (a rank can abort otherwise)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(out, f"{tmp}/rank{rank}.tmp")
    os.replace(f"{tmp}/rank{rank}.tmp", f"{tmp}/rank{rank}.pt")


def spawn(fn: Callable, world: int, cfg: Optional[Dict[str, Any]] = None) -> List[Any]:
    """Run ``fn(rank, world, cfg)`` on ``world`` gloo ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, fn, cfg or {}, tmp), nprocs=world, join=True)
        return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(world)]


# -- workers ---------------------------------------------------------------------------------------
def _ddp(model: nn.Module, cfg: Dict[str, Any]) -> nn.parallel.DistributedDataParallel:
    return nn.parallel.DistributedDataParallel(
        model, bucket_cap_mb=cfg.get("bucket_cap_mb", 0.0003),  # ~80 floats: many buckets, some span modules
        find_unused_parameters=cfg.get("unused", False), gradient_as_bucket_view=cfg.get("grad_view", False))


def _train(ddp, opt, rank: int, cfg: Dict[str, Any], steps: Sequence[int], scaler=None, log=None) -> None:
    accum = cfg.get("accum", 1)
    for step in steps:
        for micro in range(accum):
            # forward and backward of all micro-batches but the last inside no_sync (as DDP requires)
            with ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                x, y = batch(step, micro, rank)
                loss = loss_fn(ddp, x, y) / accum
                if step in cfg.get("inf_steps", ()) and rank == 0:
                    loss = loss * float("inf")
                (scaler.scale(loss) if scaler else loss).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None:
            log.append({"step": step, "t": opt.t, "mu": opt.modulation})


def _result(model: nn.Module, opt) -> Dict[str, Any]:
    return {"mu": opt.modulation, "phi": opt.variance, "t": opt.t,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def train_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    model = make_model(cfg)
    ddp = _ddp(model, cfg)
    opt = make_opt(model, cfg)
    est = agvm.distributed.register_hook(ddp, opt)
    est.threaded = cfg.get("threaded", True)
    est.ring &= cfg.get("ring", True)  # False: torch's reduce_scatter / all_gather on gloo too
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if cfg.get("amp") else None
    log: List[dict] = []
    _train(ddp, opt, rank, cfg, range(cfg["steps"]), scaler, log)
    return {**_result(model, opt), "log": log}


def brute_force_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The reference inside DDP, for models whose ranks are coupled (``sync``): local gradients under
    no_sync, all-gathered, G_A / G_B formed on every rank and handed to step(halves=...)."""
    model = make_model(cfg)
    ddp = _ddp(model, cfg)
    opt = make_opt(model, cfg)
    params = opt.params_in_order()
    h = world // 2
    for step in range(cfg["steps"]):
        with ddp.no_sync():
            x, y = batch(step, 0, rank)
            loss_fn(ddp, x, y).backward()
        ga, gb = [], []
        for p in params:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.grad)
            ga.append(sum(parts[:h]) / h)
            gb.append(sum(parts[h:]) / h)
            p.grad = (ga[-1] + gb[-1]) / 2
        opt.step(halves=(ga, gb) if opt.should_measure() else None)
        opt.zero_grad(set_to_none=True)
    return _result(model, opt)


def resume_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A continuous run and a run stopped after ``cfg['stop']`` steps, checkpointed and resumed in a new DDP."""
    steps, stop, ckpt = cfg["steps"], cfg["stop"], cfg["ckpt"]
    model = make_model(cfg)
    ddp = _ddp(model, cfg)
    opt = make_opt(model, cfg)
    agvm.distributed.register_hook(ddp, opt)
    _train(ddp, opt, rank, cfg, range(steps))
    continuous = _result(model, opt)

    model = make_model(cfg)
    ddp = _ddp(model, cfg)
    opt = make_opt(model, cfg)
    agvm.distributed.register_hook(ddp, opt)
    _train(ddp, opt, rank, cfg, range(stop))
    if rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    dist.barrier()
    del ddp, opt, model

    model = make_model(cfg)
    torch.manual_seed(1234)  # a different init: everything must come from the checkpoint
    for p in model.parameters():
        p.data.normal_()
    state = torch.load(ckpt, weights_only=False)
    model.load_state_dict(state["model"])
    ddp = _ddp(model, cfg)
    opt = make_opt(model, cfg)
    opt.load_state_dict(state["optimizer"])
    agvm.distributed.register_hook(ddp, opt)
    _train(ddp, opt, rank, cfg, range(stop, steps))
    return {"continuous": continuous, "resumed": _result(model, opt)}


def traffic_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """TCP bytes this rank sends per training step (``bench_ddp``'s counter and model), for the hook on
    point-to-point rings (``ring``) and on torch's collectives (``collective``)."""
    from benchmarks.bench_ddp import barrier_bytes, make_model as bench_model, tcp_bytes_sent

    out = {}
    for mode in ("ring", "collective"):
        model = bench_model(cfg["width"])
        ddp = _ddp(model, cfg)
        opt = make_opt(model, cfg)
        est = agvm.distributed.register_hook(ddp, opt)
        est.ring &= mode == "ring"
        per_step = []
        for step in range(cfg["steps"]):
            measure = opt.should_measure()
            x = torch.randn(BATCH, cfg["width"], generator=torch.Generator().manual_seed(step * world + rank))
            dist.barrier()
            sent = tcp_bytes_sent()
            nn.functional.cross_entropy(ddp(x), torch.arange(BATCH) % 10).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()  # every rank's step is done: all its bytes have arrived
            per_step.append({"measure": measure, "bytes": tcp_bytes_sent() - sent})
        out[mode] = {"per_step": per_step, "barrier": barrier_bytes(), "ring": est.ring,
                     "numel": sum(p.numel() for p in model.parameters())}
    return out


def ring_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The hook's point-to-point rings against torch's reduce_scatter / all_gather on the half group."""
    from agvm.distributed import _all_gather, _groups, _reduce_scatter, _ring_all_gather, _ring_reduce_scatter

    half, _ = _groups(dist.group.WORLD)
    h = world // 2
    ranks, index = dist.get_process_group_ranks(half), rank % h
    out = {}
    for s in (1, 5, 1000):
        g = torch.Generator().manual_seed(rank * 7 + s)
        for kind, x in (("int", torch.randint(-1000, 1000, (h * s,), generator=g).float()),
                        ("float", torch.randn(h * s, generator=g))):
            a, b = torch.empty(s), torch.empty(s)
            _ring_reduce_scatter(a, x.clone(), ranks, index, half)
            _reduce_scatter(b, x.clone(), half)
            c, d = torch.empty(h * s), torch.empty(h * s)
            _ring_all_gather(c, x[:s], ranks, index, half)
            _all_gather(d, x[:s], half)
            out[(kind, s)] = {"rs": (a, b), "ag": (c, d), "input": x}
    return out


# -- the single-process reference -------------------------------------------------------------------
def reference(world: int, cfg: Dict[str, Any], split: Optional[Sequence[Sequence[int]]] = None,
              skip_steps: Sequence[int] = ()) -> Dict[str, Any]:
    """One process: per-rank gradients of the same data, halves G_A / G_B, opt.step(halves=...).

    ``split`` overrides the two rank groups (a wrong split makes a negative control)."""
    h = world // 2
    group_a, group_b = split or (range(h), range(h, world))
    model = make_model(cfg)
    opt = make_opt(model, cfg)
    params = opt.params_in_order()
    accum = cfg.get("accum", 1)
    for step in range(cfg["steps"]):
        if step in skip_steps:
            continue
        local = []
        for rank in range(world):
            model.zero_grad(set_to_none=True)
            for micro in range(accum):
                x, y = batch(step, micro, rank)
                (loss_fn(model, x, y) / accum).backward()
            local.append([None if p.grad is None else p.grad.clone() for p in params])

        def mean(ranks, k):  # a rank whose batch did not reach a parameter contributes zeros (as DDP)
            grads = [local[r][k] for r in ranks]
            if all(g is None for g in grads):
                return None
            return sum(torch.zeros_like(params[k]) if g is None else g for g in grads) / len(grads)

        ga = [mean(list(group_a), k) for k in range(len(params))]
        gb = [mean(list(group_b), k) for k in range(len(params))]
        for p, a, b in zip(params, ga, gb):
            # a parameter no rank's batch reached keeps grad None, as DDP leaves it
            p.grad = None if a is None and b is None else (a + b) / 2
        opt.step(halves=(ga, gb) if opt.should_measure() else None)
    return _result(model, opt)


WORKERS = {"train": train_worker, "brute_force": brute_force_worker, "resume": resume_worker,
           "traffic": traffic_worker, "ring": ring_worker}


def multi_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Several runs in one set of processes (spawning is the slow part): ``cfg['runs'] = {name: (worker, cfg)}``.

    A run that raises is reported as ``{"error", "traceback"}`` and the others still run."""
    out = {}
    for name, (worker, run_cfg) in cfg["runs"].items():
        try:
            out[name] = WORKERS[worker](rank, world, run_cfg)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        dist.barrier()
    return out
