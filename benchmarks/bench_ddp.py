"""Benchmark of the distributed AGVM hook: step time and wire bytes of plain DDP vs DDP + AGVM.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ddp.py [--world 4] [--steps 30] [--width 512] [--collective]

Spawns ``--world`` gloo ranks on the CPU (and, when at least two CUDA devices are visible, the same
with NCCL, one GPU per rank) and times whole training steps (forward, backward with the DDP
communication, optimizer step) of a ~1.8M-parameter MLP with three AGVM modules:

- plain DDP: torch's own SGD / AdamW, DDP's built-in all-reduce;
- AGVM plain step: agvm.AGVMSGD / AGVMAdamW with ``agvm.distributed.register_hook``, no measurement
  (interval larger than the run);
- AGVM measurement step: the same with interval=1, so every step measures.

Each step starts after a barrier; its time is the slowest rank's. The script prints the median of
``--steps`` steps (after ``--warmup``) and the ratios to plain DDP. It is a benchmark, not a test.

Wire bytes (gloo): every rank sums ``tcpi_bytes_sent`` (the kernel's count of TCP payload bytes this
socket has transmitted, retransmissions included, from ``getsockopt(TCP_INFO)``) over all TCP sockets
of its process, before the step and after a barrier that follows it (all of the step's data has
then arrived, so it has been sent), and subtracts what a barrier alone sends. These are the bytes
gloo hands to TCP, its own message headers included (TCP/IP headers are not). The table gives the
mean over ranks and the ratio of a measurement step to an AGVM plain step. ``--collective`` makes
the hook use torch's reduce_scatter / all_gather on gloo instead of its point-to-point rings (gloo
runs reduce_scatter as an all-reduce). NCCL traffic does not pass through the process's sockets
(NVLink / InfiniBand), so it is not counted.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agvm  # noqa: E402


class Net(nn.Module):
    """An MLP with the three AGVM modules backbone (4 layers), neck (2) and head (2)."""

    def __init__(self, width: int):
        super().__init__()

        def block(n: int) -> nn.Sequential:
            return nn.Sequential(*[m for _ in range(n) for m in (nn.Linear(width, width), nn.GELU())])

        self.backbone, self.neck = block(4), block(2)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(self.backbone(x)))


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return Net(width)


CASES = ("plain_ddp", "agvm_plain", "agvm_measure")
_TCPI_BYTES_SENT = 200  # offset of tcpi_bytes_sent (u64) in Linux's struct tcp_info (Linux >= 4.19)


def tcp_bytes_sent() -> int:
    """TCP payload bytes transmitted so far on the TCP sockets this process has open (Linux only)."""
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # closed meanwhile
            continue
        with sock:  # closing the duplicate leaves the connection alone
            if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
            if len(info) < _TCPI_BYTES_SENT + 8:
                raise RuntimeError("this kernel's TCP_INFO has no tcpi_bytes_sent (needs Linux >= 4.19)")
            total += struct.unpack_from("=Q", info, _TCPI_BYTES_SENT)[0]
    return total


def build(case: str, optim: str, args, device: torch.device):
    model = make_model(args.width).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    kw = {"lr": 0.01, "momentum": 0.9} if optim == "sgd" else {"lr": 1e-4}
    if case == "plain_ddp":
        cls = torch.optim.SGD if optim == "sgd" else torch.optim.AdamW
        return ddp, cls(model.parameters(), foreach=True, **kw)
    groups = agvm.param_groups(model, modules=["backbone", "neck", "head"])
    cls = agvm.AGVMSGD if optim == "sgd" else agvm.AGVMAdamW
    opt = cls(groups, interval=1 if case == "agvm_measure" else 10 ** 9, foreach=True, **kw)
    agvm.distributed.register_hook(ddp, opt).ring &= not args.collective
    return ddp, opt


def step_time(ddp, opt, x, y, device: torch.device) -> Tuple[float, int]:
    """(seconds of the slowest rank, TCP bytes this rank sent in the step plus one barrier)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sent = tcp_bytes_sent()
    t0 = time.perf_counter()
    nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.barrier()  # every rank's step is done: all its bytes have arrived, so they were sent
    sent = tcp_bytes_sent() - sent
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank is done
    return dt.item(), sent


def barrier_bytes() -> int:
    """TCP bytes this rank sends in one barrier (subtracted from each step's count)."""
    dist.barrier()
    sent = tcp_bytes_sent()
    dist.barrier()
    return tcp_bytes_sent() - sent


def worker(rank: int, world: int, backend: str, args, init: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    g = torch.Generator(device="cpu").manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    results: Dict[str, float] = {}
    for optim in ("sgd", "adamw"):
        runs = {case: build(case, optim, args, device) for case in CASES}
        times: Dict[str, List[float]] = {case: [] for case in CASES}
        sent: Dict[str, List[int]] = {case: [] for case in CASES}
        for i in range(args.warmup + args.steps):  # the cases take turns, so load drift hits all alike
            for case in CASES:
                dt, nbytes = step_time(*runs[case], x, y, device)
                if i >= args.warmup:
                    times[case].append(dt)
                    sent[case].append(nbytes)
        idle = statistics.median(barrier_bytes() for _ in range(3))
        for case in CASES:
            results[f"{optim}/{case}"] = statistics.median(times[case])
            mine = torch.tensor([statistics.median(sent[case]) - idle], dtype=torch.float64, device=device)
            dist.all_reduce(mine)
            results[f"{optim}/{case}/bytes"] = mine.item() / world
        del runs
    # every rank done before any tears gloo down (without the barrier a rank aborted with SIGABRT in 5 of 20 runs)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def bench(backend: str, world: int, args) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(worker, args=(world, backend, args, f"file://{tmp}/pg", out), nprocs=world, join=True)
        return torch.load(out)


def report(backend: str, world: int, res: Dict[str, float], nparams: int, hook: str) -> None:
    print(f"\n{backend}, {world} ranks, {nparams / 1e6:.2f}M parameters, hook on {hook}: median step time "
          "(slowest rank)")
    print(f"{'optimizer':10s} {'plain DDP':>12s} {'AGVM plain':>12s} {'AGVM measure':>13s} "
          f"{'plain ratio':>12s} {'measure ratio':>14s}")
    for optim in ("sgd", "adamw"):
        base = res[f"{optim}/plain_ddp"]
        p, m = res[f"{optim}/agvm_plain"], res[f"{optim}/agvm_measure"]
        print(f"{optim:10s} {base * 1e3:10.2f}ms {p * 1e3:10.2f}ms {m * 1e3:11.2f}ms "
              f"{p / base:11.3f}x {m / base:13.3f}x")
    if backend != "gloo":
        print("wire bytes: not counted (NCCL does not send through the process's sockets)")
        return
    print("TCP bytes sent per step (mean over ranks)")
    print(f"{'optimizer':10s} {'plain DDP':>12s} {'AGVM plain':>12s} {'AGVM measure':>13s} {'measure / plain':>16s}")
    for optim in ("sgd", "adamw"):
        b, p, m = (res[f"{optim}/{case}/bytes"] for case in CASES)
        print(f"{optim:10s} {b:12.0f} {p:12.0f} {m:13.0f} {m / p:15.4f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    ap.add_argument("--collective", action="store_true",
                    help="gloo: the hook uses torch's reduce_scatter / all_gather instead of point-to-point rings")
    args = ap.parse_args()
    nparams = sum(p.numel() for p in make_model(args.width).parameters())
    report("gloo", args.world, bench("gloo", args.world, args), nparams,
           "collectives" if args.collective else "point-to-point rings")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu >= 2 and dist.is_nccl_available():
        world = min(args.world, n_gpu - n_gpu % 2)
        report("nccl", world, bench("nccl", world, args), nparams, "NCCL's reduce_scatter / all_gather")
    else:
        print(f"\nnccl: skipped ({n_gpu} CUDA device(s); it needs at least 2, one per rank)")


if __name__ == "__main__":
    main()
