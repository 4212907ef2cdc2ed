"""Distributed AGVM: the two gradient estimates come from two halves of the ranks, at no extra traffic.

Paper: Xue et al., "Large-batch Optimization for Dense Visual Predictions", NeurIPS 2022, appendix A.1
Eq. 1-2: Phi_i = 1 - cos(G_A^(i), G_B^(i)) with G_A, G_B the mean gradients of two disjoint halves of
the global batch. Under DistributedDataParallel with W ranks (W even) group A is ranks [0, W/2) and
group B is ranks [W/2, W); G_A and G_B are the means of those ranks' local gradients and the full
gradient, (G_A + G_B) / 2, is exactly what plain DDP averages.

Usage (the training loop is unchanged)::

    ddp = torch.nn.parallel.DistributedDataParallel(model, ...)
    opt = agvm.AGVMSGD(agvm.param_groups(ddp.module), ...)      # or agvm.AGVMAdamW
    agvm.distributed.register_hook(ddp, opt)                      # before the first backward
    for batch in loader:
        loss = ddp(batch).mean(); loss.backward(); opt.step(); opt.zero_grad()

The scheme (a DDP communication hook, one call per gradient bucket of n elements; H = W / 2)
-----------------------------------------------------------------------------------------------
Plain steps (``not opt.should_measure()``): torch's ordinary all-reduce hook (divide by W, all-reduce).

Measurement steps, rank r = h * H + i in half h (0 = A, 1 = B), partner p = (1 - h) * H + i:

1. reduce-scatter the bucket inside the own half: rank r gets shard i (n / H elements) of its half's
   mean gradient, G_h[i];
2. exchange shards with the partner (an all-gather inside the pair {i, i + H}): both partners now
   hold G_A[i] and G_B[i], in that order;
3. per-module partial sums (dot, |G_A|^2, |G_B|^2) over the shard, split at the module boundaries of
   the bucket (``bucket.gradients()`` gives each parameter's offset; a bucket may span modules);
4. the full mean of the shard, (G_A[i] + G_B[i]) / 2;
5. all-gather the full mean inside the own half: every rank ends with the whole averaged bucket,
   which DDP writes into ``p.grad`` as usual.

The collectives of steps 1-5 are issued in bucket order by one thread per process, so each process
group sees them in the same order on every rank: for CPU (gloo) buckets a worker thread of the hook,
which lets autograd go on with the next buckets meanwhile; for CUDA (NCCL) buckets the autograd thread
itself (NCCL collectives are ordered on streams, so issuing them does not block the host; step 5 is
asynchronous). The half and pair groups are used by the hook only (the pair group is a group of its
own even when W = 2), so DDP's and SyncBatchNorm's collectives on DDP's group cannot interleave with
them. When ``opt.step()`` asks for the statistics (``opt.estimator.stats``), the [M, 3] float64 partial
sums are all-gathered inside the half and summed in rank order, so every rank gets bit-identical
statistics (partners computed identical partials from identical shards) and hence identical mu.

Traffic per rank (b bytes per bucket): reduce-scatter (H-1)/H * b, exchange b / H, all-gather
(H-1)/H * b; in total 2(W-1)/W * b, the same as the ring all-reduce of a plain step. Only the
statistics are added: (H-1) * M * 3 float64 per measurement step (M modules), plus the zero padding
of a bucket whose length is not a multiple of H (< H elements per bucket). On gloo, whose
``reduce_scatter`` is an all-reduce underneath ((3H-2)/(2H-1) times a plain step's bytes in all),
steps 1 and 5 are rings of point-to-point sends inside the half (``_ring_reduce_scatter``,
``_ring_all_gather``), which send exactly the bytes above; NCCL buckets use NCCL's own
reduce_scatter / all_gather. ``benchmarks/bench_ddp.py`` counts the bytes each rank's sockets send.
The authors' code instead all-reduces inside the group, all-gathers and all-reduces again: about
three times a plain step.

AdamW (Alg. 2): each element of both halves is divided by sqrt(v_t) + eps with v_t = beta2 * v_{t-1} +
(1 - beta2) * g_t^2 and g_t the full mean gradient as the optimizer sees it at ``step()`` (after
GradScaler's unscale and any gradient clipping, exactly as ``AGVMAdamW``, through the same ``agvm.variance.module_stats``). The hook
therefore keeps this rank's G_A / G_B shards (2 n / H elements per bucket, measurement steps only)
and computes the weighted partial sums in ``stats()`` from the shard's slice of ``p.grad`` and
``exp_avg_sq``, with the same float32 arithmetic as the single-process optimizer.

Behaviour
---------
- World size 1: ``register_hook`` raises ValueError; there are no two rank halves. In one process
  use ``agvm.backward_two_halves`` (two micro-batches) instead.
- Odd world size, a model/optimizer parameter mismatch, a model that is not DDP-wrapped, an
  optimizer that is not an AGVM optimizer: ValueError / TypeError at register time.
- Gradient accumulation: use ``ddp.no_sync()`` for all micro-batches but the last; the hook runs only
  on the synchronising backward, and ``opt.should_measure()`` then refers to the coming ``step()``.
  Each half's mean is then the mean of its ranks' accumulated gradients, as in one process.
- torch.amp GradScaler: the halves are scaled by the loss scale, which cancels in the cosine. A step
  that GradScaler skips (inf/NaN gradients) does not call ``opt.step()``: t and mu are untouched and
  the next backward measures again for the same step.
- SyncBatchNorm: its collectives run in forward and backward on DDP's group; the hook's run on the
  half and pair groups in a fixed order, so they cannot interleave wrongly (tested on CPU with a layer
  that all-reduces as SyncBatchNorm does; SyncBatchNorm itself has no CPU kernels).
- Unused parameters (``find_unused_parameters=True``): DDP hands the hook zeros for them, which is
  what the single-process computation does for a half whose samples did not reach a parameter.
- DDP's process group may be the world or any group: the half and pair groups are built from its ranks
  (``new_group(..., use_local_synchronization=True)``, same backend) and cached per rank list, so a
  second ``register_hook`` (e.g. after a resume) reuses them.
- Checkpoints: nothing to save beyond ``opt.state_dict()``; after loading it, wrap the model in DDP
  again and call ``register_hook`` again. A resumed run continues bit-identically when its first step
  is not a measurement step (DDP rebuilds its buckets after the first iteration of a new DDP object,
  which moves the shard boundaries and so the rounding of the per-module sums; with W > 2 the
  order of DDP's own all-reduce sums changes with the buckets as well).
"""
from __future__ import annotations

import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from .optim._base import AGVMMixin
from .optim.agvm_adamw import AGVMAdamW
from .variance import module_stats, pair_stats

__all__ = ["register_hook", "TwoHalfEstimator"]

# (backend, ranks of DDP's group) -> (half group or None, pair group); process groups are costly to build
_GROUP_CACHE: Dict[Tuple[str, Tuple[int, ...]], Tuple[Optional[dist.ProcessGroup], dist.ProcessGroup]] = {}


@dataclass
class _BucketRecord:
    """What one measurement bucket leaves for ``stats()`` when the stats need step-time data (AdamW)."""

    lo: int  # this rank's shard covers bucket elements [lo, hi)
    hi: int
    a: torch.Tensor  # G_A and G_B on the shard, length hi - lo
    b: torch.Tensor
    params: List[Tuple[torch.Tensor, int]]  # (parameter, start offset in the bucket) for those overlapping


@dataclass
class _Pending:
    """The measurement taken in the last synchronising backward pass, for step ``t``."""

    t: int
    numel: int = 0  # bucket elements seen, to check that every bucket went through the hook
    partial: Optional[torch.Tensor] = None  # [M, 3] float64 on the buckets' device (SGD)
    records: List[_BucketRecord] = field(default_factory=list)  # AdamW


class TwoHalfEstimator:
    """The DDP communication hook's state and the optimizer's ``estimator``; built by ``register_hook``."""

    def __init__(self, ddp: DistributedDataParallel, optimizer: AGVMMixin,
                 half_group: Optional[dist.ProcessGroup], pair_group: dist.ProcessGroup):
        self.process_group = ddp.process_group
        self.world_size = self.process_group.size()
        self.rank = self.process_group.rank()
        self.half_size = self.world_size // 2
        self.half = self.rank // self.half_size  # 0: group A, 1: group B
        self.index = self.rank % self.half_size  # position inside the half = shard index
        self.half_group = half_group
        self.pair_group = pair_group
        # global ranks of the half, in ring order; CPU buckets on gloo ("gloo" or e.g. "cpu:gloo,cuda:nccl"):
        # steps 1 and 5 as point-to-point rings (True)
        self.half_ranks = dist.get_process_group_ranks(half_group) if half_group is not None else []
        self.ring = half_group is not None and "gloo" in str(dist.get_backend(half_group))
        self.optimizer = optimizer
        self.weighted = isinstance(optimizer, AGVMAdamW)
        self.num_modules = len(optimizer.modules)
        ids = optimizer.module_ids()
        params = optimizer.params_in_order()
        self._module_of = {id(p): m for p, m in zip(params, ids)}
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self._expected_numel = sum(p.numel() for p in params)
        self._pending: Optional[_Pending] = None
        self._queue: Optional[queue.Queue] = None
        # CPU buckets: measure on a worker thread (True) or on the autograd thread (False, as for CUDA)
        self.threaded = True

    # -- the communication hook ---------------------------------------------------------------------
    def hook(self, bucket: dist.GradBucket) -> torch.futures.Future:
        if not self.optimizer.should_measure():
            return default_hooks.allreduce_hook(self.process_group, bucket)
        t = self.optimizer.t + 1
        if bucket.index() == 0 or self._pending is None or self._pending.t != t:
            self._pending = _Pending(t)  # a new backward pass: what an earlier one left is stale
        pending = self._pending
        buf = bucket.buffer()
        base = buf.storage_offset()
        placed = [(p, g.storage_offset() - base) for p, g in zip(bucket.parameters(), bucket.gradients())]
        pending.numel += buf.numel()
        if buf.is_cuda or not self.threaded:  # CUDA: the collectives are stream-ordered, issuing them is cheap
            return self._measure(buf, placed, pending)
        fut: torch.futures.Future = torch.futures.Future()
        self._worker().put((buf, placed, pending, fut))  # CPU: overlap with the rest of the backward
        return fut

    def _worker(self) -> "queue.Queue":
        """One thread per hook that runs the CPU measurement buckets in order (so every group sees its
        collectives in the same order on every rank) while autograd computes the next buckets."""
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=_work, args=(self._queue, weakref.ref(self)), daemon=True,
                             name="agvm-ddp-measure").start()
        return self._queue

    def __del__(self) -> None:
        if getattr(self, "_queue", None) is not None:
            self._queue.put(None)

    def _measure(self, buf: torch.Tensor, placed: List[Tuple[torch.Tensor, int]], pending: _Pending,
                 wait: bool = False):
        """Steps 1-5 for one bucket: a future of the averaged bucket (or, with ``wait``, the tensor)."""
        n, h = buf.numel(), self.half_size
        s = -(-n // h)  # shard length (the bucket is zero-padded to h * s)
        if h > 1:  # divided before the sum, as DDP does, so that half precision does not overflow
            if h * s != n:
                src = buf.new_zeros(h * s)
                torch.div(buf, h, out=src[:n])
            else:
                src = buf.div_(h)
            shard = buf.new_empty(s)
            if self.ring and not buf.is_cuda:  # 1. the half's mean, shard i
                _ring_reduce_scatter(shard, src, self.half_ranks, self.index, self.half_group)
            else:
                _reduce_scatter(shard, src, self.half_group)
        else:
            shard = buf
        both = buf.new_empty(2 * s)
        _all_gather(both, shard, self.pair_group)  # 2. [G_A shard, G_B shard]
        a, b = both[:s], both[s:]
        lo = self.index * s
        hi = min(lo + s, n)
        self._shard_stats(placed, buf.device, pending, lo, hi, a[: max(hi - lo, 0)], b[: max(hi - lo, 0)])  # 3.
        mean = a.div(2).add_(b, alpha=0.5)  # 4. (a + b) / 2 rounded once, without overflow
        if h == 1:
            result = mean
        else:
            result = buf.new_empty(h * s)
            if self.ring and not buf.is_cuda:  # 5.
                work = _ring_all_gather(result, mean, self.half_ranks, self.index, self.half_group)
            else:
                work = _all_gather(result, mean, self.half_group, async_op=not wait)
            if h * s != n:
                result = result[:n]
            if work is not None and not wait:
                return work.get_future().then(lambda _: result)
        if wait:
            return result
        fut: torch.futures.Future = torch.futures.Future(devices=[buf.device] if buf.is_cuda else None)
        fut.set_result(result)
        return fut

    def _shard_stats(self, placed: List[Tuple[torch.Tensor, int]], device: torch.device, pending: _Pending,
                     lo: int, hi: int, a: torch.Tensor, b: torch.Tensor) -> None:
        inside = [(p, off) for p, off in placed if off < hi and off + p.numel() > lo]
        if self.weighted:  # AdamW: the weights need g_t as the optimizer sees it; finish in stats()
            pending.records.append(_BucketRecord(lo, hi, a, b, inside))
            return
        rows: List[torch.Tensor] = []
        owners: List[int] = []
        start = end = -1
        owner = -1
        for p, off in inside + [(None, -1)]:  # merge runs of one module into one segment
            m = self._module_of[id(p)] if p is not None else -2
            if m == owner and off == end:
                end = off + p.numel()
                continue
            if owner >= 0:
                x0, x1 = max(start, lo) - lo, min(end, hi) - lo
                av, bv = a[x0:x1].float(), b[x0:x1].float()
                rows.append(pair_stats(av, bv))
                owners.append(owner)
            if p is not None:
                owner, start, end = m, off, off + p.numel()
        self._accumulate(pending, rows, owners, device)

    def _accumulate(self, pending: _Pending, rows: List[torch.Tensor], owners: List[int],
                    device: torch.device) -> None:
        if pending.partial is None:
            pending.partial = torch.zeros(self.num_modules, 3, dtype=torch.float64, device=device)
        if rows:
            idx = torch.tensor(owners, dtype=torch.long, device=device)
            pending.partial.index_add_(0, idx, torch.stack(rows).to(torch.float64))

    # -- the optimizer's estimator --------------------------------------------------------------------
    def stats(self, optimizer: AGVMMixin, t: int) -> torch.Tensor:
        """[M, 3] float64 (dot, |G_A|^2, |G_B|^2) for measurement step ``t``, identical on all ranks."""
        if optimizer is not self.optimizer:
            raise RuntimeError("this DDP hook was registered for another optimizer")
        pending = self._pending
        if pending is None or pending.t != t:
            raise RuntimeError(
                f"AGVM: step {t} is a measurement step but the last synchronising backward pass took no "
                f"measurement for it{'' if pending is None else f' (it measured for step {pending.t})'}. "
                "Call loss.backward() outside ddp.no_sync() before each opt.step(), and do not change "
                "opt.t or opt.interval between backward() and step()."
            )
        if pending.numel != self._expected_numel:
            raise RuntimeError(
                f"AGVM: the hook saw {pending.numel} gradient elements in the last backward pass but the "
                f"optimizer has {self._expected_numel}; did the backward pass finish?"
            )
        self._pending = None
        if self.weighted:
            self._weighted_stats(pending)
        partial = pending.partial
        if self.half_group is not None:
            gathered = partial.new_empty(self.half_size * self.num_modules, 3)
            _all_gather(gathered, partial, self.half_group)
            partial = gathered.view(self.half_size, self.num_modules, 3).sum(0)
        return partial.cpu()

    def _weighted_stats(self, pending: _Pending) -> None:
        """AdamW's weighted sums on the kept shards, with the single-process optimizer's arithmetic
        (``agvm.variance.module_stats`` on the shards' slices: one pass, no preconditioned halves written)."""
        device = pending.records[0].a.device if pending.records else torch.device("cpu")
        ga, gb, grads, precond, owners = [], [], [], [], []
        state = self.optimizer.state
        for rec in pending.records:
            for p, off in rec.params:
                if p.grad is None:  # unused by every rank: its halves are zero and add nothing
                    continue
                x0, x1 = max(off, rec.lo), min(off + p.numel(), rec.hi)
                group = self._group_of[id(p)]
                v = state.get(p, {}).get("exp_avg_sq")
                ga.append(rec.a[x0 - rec.lo: x1 - rec.lo])
                gb.append(rec.b[x0 - rec.lo: x1 - rec.lo])
                grads.append(_flat(p.grad)[x0 - off: x1 - off])
                precond.append((None if v is None else _flat(v)[x0 - off: x1 - off], group["betas"][1], group["eps"]))
                owners.append(self._module_of[id(p)])
        if pending.partial is None:
            pending.partial = torch.zeros(self.num_modules, 3, dtype=torch.float64, device=device)
        if owners:
            pending.partial += module_stats(ga, gb, owners, self.num_modules, precond, grads=grads).to(device)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """All-gather into one tensor (``all_gather_single`` where torch has it, else its older name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup):
    """Sum-reduce-scatter from one tensor (``reduce_scatter_single`` where torch has it)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group)


def _ring_reduce_scatter(out: torch.Tensor, inp: torch.Tensor, ranks: List[int], index: int,
                         group: dist.ProcessGroup) -> None:
    """Sum-reduce-scatter in a ring of point-to-point sends: ``inp`` holds k = len(ranks) chunks of
    ``out.numel()`` elements, and ranks[i] ends with the sum of every rank's chunk i in ``out``.

    In round j rank i sends its partial sum of chunk i - j - 1 to rank i + 1 and adds what rank i - 1
    sends (chunk i - j - 2) to its own; k - 1 rounds, so each rank sends (k - 1) / k of ``inp``.
    ``inp`` is overwritten with partial sums."""
    k, s = len(ranks), out.numel()
    chunks = inp.view(k, s)
    nxt, prv = ranks[(index + 1) % k], ranks[(index - 1) % k]
    incoming = out
    for j in range(k - 1):
        works = [dist.isend(chunks[(index - j - 1) % k], nxt, group=group), dist.irecv(incoming, prv, group=group)]
        for w in works:
            w.wait()
        chunks[(index - j - 2) % k].add_(incoming)
    out.copy_(chunks[index])


def _ring_all_gather(out: torch.Tensor, inp: torch.Tensor, ranks: List[int], index: int,
                     group: dist.ProcessGroup) -> None:
    """All-gather in a ring of point-to-point sends: ``out`` gets rank ranks[i]'s ``inp`` as chunk i.
    In round j rank i passes chunk i - j on to rank i + 1 and receives chunk i - j - 1 from rank i - 1."""
    k, s = len(ranks), inp.numel()
    chunks = out.view(k, s)
    chunks[index].copy_(inp)
    nxt, prv = ranks[(index + 1) % k], ranks[(index - 1) % k]
    for j in range(k - 1):
        works = [dist.isend(chunks[(index - j) % k], nxt, group=group),
                 dist.irecv(chunks[(index - j - 1) % k], prv, group=group)]
        for w in works:
            w.wait()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in memory order (the order DDP lays a parameter out in its bucket)."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -d))
    return t.permute(order).reshape(-1)


def _work(jobs: "queue.Queue", ref: "weakref.ref[TwoHalfEstimator]") -> None:
    """The measurement thread: buckets in arrival order; each future is completed with the averaged bucket.
    It ends when its estimator is garbage-collected (``None`` is queued then)."""
    while True:
        job = jobs.get()
        if job is None or ref() is None:
            return
        _run_job(ref(), *job)
        del job  # hold nothing (the estimator, its tensors) while waiting for the next bucket


def _run_job(estimator: TwoHalfEstimator, buf: torch.Tensor, placed: List[Tuple[torch.Tensor, int]],
             pending: _Pending, fut: torch.futures.Future) -> None:
    try:
        result = estimator._measure(buf, placed, pending, wait=True)
    except BaseException as e:  # noqa: BLE001 - handed to DDP, which raises it in backward()
        fut.set_exception(e)
    else:
        fut.set_result(result)


def _hook(state: TwoHalfEstimator, bucket: dist.GradBucket) -> torch.futures.Future:
    return state.hook(bucket)


# DDP checks the hook's annotations as objects; ``from __future__ import annotations`` made them strings
_hook.__annotations__ = {"state": TwoHalfEstimator, "bucket": dist.GradBucket,
                         "return": torch.futures.Future[torch.Tensor]}


def _groups(pg: dist.ProcessGroup) -> Tuple[Optional[dist.ProcessGroup], dist.ProcessGroup]:
    """This rank's half group (None when a half is one rank) and pair group {i, i + W/2}."""
    ranks = tuple(dist.get_process_group_ranks(pg))
    backend = dist.get_backend(pg)
    key = (str(backend), ranks)
    if key in _GROUP_CACHE and not all(_alive(g) for g in _GROUP_CACHE[key] if g is not None):
        del _GROUP_CACHE[key]  # destroy_process_group() ran since (e.g. a re-initialised world)
    if key not in _GROUP_CACHE:
        w, h, r = len(ranks), len(ranks) // 2, pg.rank()
        half = None
        if h > 1:
            mine = ranks[:h] if r < h else ranks[h:]
            half = dist.new_group(list(mine), backend=backend, use_local_synchronization=True)
        # a group of its own even when W = 2: nothing else (DDP, SyncBatchNorm) issues collectives on it
        i = r % h
        pair = dist.new_group([ranks[i], ranks[i + h]], backend=backend, use_local_synchronization=True)
        _GROUP_CACHE[key] = (half, pair)
    return _GROUP_CACHE[key]


def _alive(group: dist.ProcessGroup) -> bool:
    """Whether ``group`` is still registered (destroy_process_group() unregisters every group)."""
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _check_params(ddp: DistributedDataParallel, optimizer: AGVMMixin) -> None:
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    synced = {id(p): n for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored}
    in_opt = optimizer.params_in_order()
    opt_ids = [id(p) for p in in_opt]
    if len(set(opt_ids)) != len(opt_ids):
        raise ValueError("the optimizer holds a parameter twice; each parameter must be in exactly one group")
    foreign = [tuple(p.shape) for p in in_opt if id(p) not in synced]
    missing = [n for i, n in synced.items() if i not in set(opt_ids)]
    if foreign or missing:
        parts = []
        if foreign:
            parts.append(f"{len(foreign)} optimizer parameter(s) that DDP does not synchronise (not in the model, "
                         f"frozen, or in parameters_to_ignore), shapes {foreign[:5]}")
        if missing:
            parts.append(f"{len(missing)} trainable model parameter(s) that the optimizer does not hold: "
                         f"{missing[:10]}")
        raise ValueError(
            "agvm.distributed.register_hook: the model and the optimizer disagree: " + "; ".join(parts)
            + ". Build the optimizer from the DDP-wrapped model's trainable parameters "
            "(e.g. agvm.param_groups(ddp.module))."
        )


def register_hook(ddp: DistributedDataParallel, optimizer: AGVMMixin) -> TwoHalfEstimator:
    """Register the two-half measurement as ``ddp``'s communication hook and as ``optimizer.estimator``.

    Call it once, after wrapping the model in DDP and building the optimizer, before the first
    backward pass. Returns the estimator (also set as ``optimizer.estimator``).

    Raises:
        TypeError: ``ddp`` is not a DistributedDataParallel, or ``optimizer`` is not an AGVM optimizer.
        ValueError: the world size is 1 or odd, or the optimizer's parameters are not exactly the
            parameters DDP synchronises.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(
            f"agvm.distributed.register_hook needs the DistributedDataParallel-wrapped model, got "
            f"{type(ddp).__name__}; wrap it first: ddp = torch.nn.parallel.DistributedDataParallel(model, ...)"
        )
    if not isinstance(optimizer, AGVMMixin):
        raise TypeError(f"register_hook needs agvm.AGVMSGD or agvm.AGVMAdamW, got {type(optimizer).__name__}")
    _check_params(ddp, optimizer)
    world = ddp.process_group.size()
    if world == 1:
        raise ValueError(
            "agvm.distributed.register_hook: the world size is 1, so there are no two halves of ranks. In a "
            "single process compute the halves from two micro-batches with agvm.backward_two_halves(opt, ...) "
            "and pass them to opt.step(halves=...)."
        )
    if world % 2:
        raise ValueError(
            f"agvm.distributed.register_hook: the world size {world} is odd; AGVM splits the ranks into two "
            "equal halves. Launch an even number of processes."
        )
    half, pair = _groups(ddp.process_group)
    estimator = TwoHalfEstimator(ddp, optimizer, half, pair)
    ddp.register_comm_hook(estimator, _hook)
    optimizer.estimator = estimator
    return estimator
