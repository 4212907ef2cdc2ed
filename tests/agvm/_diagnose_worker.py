"""A small three-module network, its data, and the DDP worker of tests/agvm/test_diagnose.py (a module of its own so
that spawned children can unpickle the worker)."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import nn

import agvm.diagnose

IN, HID, CLASSES = 32, 64, 10
MODULES = ["backbone", "neck", "head"]


class Net(nn.Module):
    """Wide enough that the gradient noise is spread over many directions, as in real networks."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh())
        self.neck = nn.Linear(HID, HID)
        self.head = nn.Linear(HID, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.neck(self.backbone(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


_TEACHER = torch.randn(IN, CLASSES, generator=torch.Generator().manual_seed(1))


def data(n: int, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n fresh samples: Gaussian inputs, labels from a noisy linear teacher."""
    x = torch.randn(n, IN, generator=g)
    y = (x @ _TEACHER + 0.2 * torch.randn(n, CLASSES, generator=g)).argmax(1)
    return x, y


def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def diagnose_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Each rank diagnoses its share (every world-th image) of the same images; the sums are all-reduced."""
    model = make_net()
    x, y = data(cfg["images"], torch.Generator().manual_seed(cfg["seed"]))
    mine = range(rank, len(x), world)
    d = agvm.diagnose.diagnose(model, lambda i: loss(model, x[i:i + 1], y[i:i + 1]), mine, modules=MODULES,
                               progress=None)
    return {"signal": d.signal, "noise": d.noise, "num_images": d.num_images}


def pairs_worker(rank: int, world: int, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Each rank adds its share of the pairs of halves (pair k on rank k % world); the results are all-reduced."""
    model = make_net()
    x, y = data(cfg["halves"] * cfg["half"], torch.Generator().manual_seed(cfg["seed"]))
    pairs = agvm.diagnose.HalfPairs(model, MODULES)
    for k in range(cfg["halves"]):
        if (k // 2) % world != rank:
            continue
        model.zero_grad(set_to_none=True)
        h = slice(k * cfg["half"], (k + 1) * cfg["half"])
        loss(model, x[h], y[h]).backward()
        pairs.add()
    return pairs.result()
