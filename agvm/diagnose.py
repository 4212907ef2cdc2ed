"""Variance diagnosis: every module's Phi at any batch size, predicted from per-image gradients.

At fixed weights let r_1..r_N be one module's per-image gradients, mu = E[r] their mean and
s2 = E|r - mu|^2 the trace of their covariance. Two disjoint half-batches of b / 2 images give
G_a, G_b with E[G_a . G_b] = |mu|^2 and E|G_a|^2 = E|G_b|^2 = |mu|^2 + 2 s2 / b, so AGVM's
Phi = 1 - cos(G_a, G_b) is, to first order,

    Phi_i(b) = x / (1 + x),    x = 2 NSR_i / b,    NSR_i = s2 / |mu|^2  (the per-image noise-to-signal ratio).

Phi rises from 0 (signal-dominated, large b) to 1 (noise-dominated, small b); the ratio Phi_anchor / Phi_i
goes from 1 at small b to NSR_anchor / NSR_i at large b. No Gram matrix is stored: with S = sum_j r_j
and Q = sum_j |r_j|^2 (one running sum of the gradients and one of their squared norms per module),

    |mu|^2 ~ (|S|^2 - Q) / (N (N - 1))   (the unbiased mean of the off-diagonal Gram entries r_j . r_k)
    s2     ~ Q / N - |mu|^2              (the unbiased trace of the sample covariance)

    sums = agvm.diagnose.GradientSums(model)          # modules as agvm.param_groups(model) forms them
    for image in images:                              # under DDP: each rank its share of the images
        model.zero_grad(set_to_none=True); loss_of(image).backward(); sums.add()
    d = sums.result(anchor="backbone")                # all-reduces the sums when torch.distributed is up
    d.phi(512), d.ratio(512), d.mu(512), d.batch_at_ratio(4.0), d.to_dict(), d.plot("diagnosis.png")

``diagnose(model, loss_of, images)`` runs that loop with progress lines. ``measure_phi`` measures Phi directly
from two half-batch losses (what AGVM measures while training); ``HalfPairs`` / ``measure_phi_pairs`` measure it
from K halves at once, averaged over all K (K - 1) / 2 pairs of them, to check the prediction at held-out batch
sizes. Phi and mu come from ``agvm.variance`` (``phi_from_stats`` of the expected (dot, |a|^2, |b|^2) of two
halves; ``Modulator.target``), so the prediction uses exactly AGVM's formulas.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .grouping import param_groups
from .variance import Modulator, module_stats, phi_from_stats

__all__ = ["GradientSums", "Diagnosis", "diagnose", "measure_phi", "HalfPairs", "measure_phi_pairs", "module_params",
           "PAPER_BATCHES"]

logger = logging.getLogger("agvm")

PAPER_BATCHES = (32, 256, 512, 1024)  # the batch sizes of the appendix's Table 1 / Fig. 1-3


def module_params(model: torch.nn.Module, modules=None) -> Tuple[List[str], List[torch.Tensor], List[int]]:
    """(module names, trainable parameters, owner index per parameter) as ``agvm.param_groups`` forms them."""
    names: List[str] = []
    params: List[torch.Tensor] = []
    owners: List[int] = []
    for g in param_groups(model, modules=modules):
        if g["module"] not in names:
            names.append(g["module"])
        params += g["params"]
        owners += [names.index(g["module"])] * len(g["params"])
    if not params:
        raise ValueError("the model has no trainable parameter: nothing to diagnose")
    return names, params, owners


class GradientSums:
    """Per module: the running sum of per-image gradients (one extra gradient of memory) and of their squared norms.

    Modules and their parameters are those of ``agvm.param_groups(model, modules)`` (frozen parameters are left
    out). Call ``add()`` after each image's backward (``p.grad`` = that image's gradient; None counts as zero).
    """

    def __init__(self, model: torch.nn.Module, modules=None):
        self.modules, self.params, owners = module_params(model, modules)
        device = self.params[0].device
        self.owners = torch.tensor(owners, dtype=torch.long, device=device)
        self.grad_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.sq_sum = torch.zeros(len(self.modules), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self) -> None:
        """Add the gradient now in ``p.grad`` as one image's gradient."""
        idx = [k for k, p in enumerate(self.params) if p.grad is not None]
        if idx:
            grads = [self.params[k].grad.detach().float() for k in idx]
            sq = torch.zeros(len(self.params), dtype=torch.float64, device=self.sq_sum.device)
            sq[idx] = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square()
            if not bool(torch.isfinite(sq).all()):  # one check (one device sync) per image
                bad = sorted({self.modules[int(self.owners[k])] for k in idx if not torch.isfinite(sq[k])})
                raise FloatingPointError(f"a per-image gradient of module(s) {bad} is not finite; check the loss "
                                         "and the weights")
            torch._foreach_add_([self.grad_sum[k] for k in idx], grads)
            self.sq_sum.index_add_(0, self.owners, sq)
        self.count += 1

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Sum the sums over the ranks of ``group`` (each rank having added its share of the images)."""
        import torch.distributed as dist

        flat = torch.cat([s.reshape(-1) for s in self.grad_sum])
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(self.grad_sum, [v.view_as(s) for v, s in
                                             zip(flat.split([s.numel() for s in self.grad_sum]), self.grad_sum)])
        scalars = torch.cat([self.sq_sum, self.count.reshape(1)])
        dist.all_reduce(scalars, group=group)
        self.sq_sum.copy_(scalars[:-1])
        self.count.copy_(scalars[-1])

    @torch.no_grad()
    def result(self, anchor: str = "backbone", reduce: Optional[bool] = None) -> "Diagnosis":
        """The diagnosis from the sums; ``reduce`` (default: when torch.distributed is initialised with more
        than one rank) all-reduces them first (call it once per set of sums)."""
        import torch.distributed as dist

        if reduce is None:
            reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if reduce:
            self.all_reduce()
        n = float(self.count)
        if n < 2:
            raise ValueError(f"the diagnosis needs the gradients of at least 2 images, got {n:g}")
        norms = torch.stack(torch._foreach_norm(self.grad_sum)).to(torch.float64).square()
        total_sq = torch.zeros_like(self.sq_sum).index_add_(0, self.owners, norms).cpu()  # |S|^2 per module
        q = self.sq_sum.cpu()
        signal = ((total_sq - q) / (n * (n - 1))).tolist()  # |mu|^2
        noise = (q / n).tolist()  # E|r|^2; minus |mu|^2 below: the trace of the covariance
        silent = [m for m, v in zip(self.modules, q.tolist()) if v == 0]
        if anchor in silent:
            raise ValueError(f"the anchor module {anchor!r} got no gradient from any of the {n:g} images")
        if silent:
            logger.warning("diagnose: module(s) %s got no gradient from any of the %d images: left out", silent, n)
        keep = [k for k, m in enumerate(self.modules) if m not in silent]
        return Diagnosis([self.modules[k] for k in keep], [signal[k] for k in keep],
                         [noise[k] - signal[k] for k in keep], int(n), anchor, no_gradient=silent)


class Diagnosis:
    """Per-module signal |mu|^2, noise s2 and NSR = s2 / |mu|^2 from N per-image gradients, and the predictions.

    ``signal <= 0`` (the mean gradient not resolved from N images: noise-dominated at this N) gives NSR = inf
    and Phi = 1 at every batch size.
    """

    def __init__(self, modules: Sequence[str], signal: Sequence[float], noise: Sequence[float], num_images: int,
                 anchor: str = "backbone", no_gradient: Sequence[str] = ()):
        if anchor not in modules:
            raise ValueError(f"anchor {anchor!r} names no module; the modules are {list(modules)}")
        self.modules = list(modules)
        self.signal = dict(zip(self.modules, (float(v) for v in signal)))
        self.noise = dict(zip(self.modules, (max(float(v), 0.0) for v in noise)))
        self.num_images = int(num_images)
        self.anchor = anchor
        self.no_gradient = list(no_gradient)  # modules whose per-image gradients were all zero (not diagnosed)

    @classmethod
    def from_dict(cls, d: dict) -> "Diagnosis":
        """The diagnosis back from ``to_dict()`` (a diagnosis.json)."""
        mods = list(d["modules"])
        return cls(mods, [d["modules"][m]["signal"] for m in mods], [d["modules"][m]["noise"] for m in mods],
                   d["num_images"], d["anchor"], d.get("no_gradient", ()))

    @property
    def nsr(self) -> Dict[str, float]:
        """s2 / |mu|^2 per module (inf where |mu|^2 <= 0)."""
        return {m: self.noise[m] / self.signal[m] if self.signal[m] > 0 else math.inf for m in self.modules}

    def phi(self, batch: float) -> Dict[str, float]:
        """Predicted Phi_i = 1 - cos(G_a, G_b) of two halves of ``batch`` images: x / (1 + x), x = 2 NSR_i / batch."""
        if not batch > 0:
            raise ValueError(f"batch must be > 0, got {batch}")
        rows = []
        for m in self.modules:  # the expected (dot, |a|^2, |b|^2) of two halves of batch / 2 images each
            mu2 = max(self.signal[m], 0.0)
            half = mu2 + 2.0 * self.noise[m] / batch
            rows.append([mu2, half, half])
        phi = phi_from_stats(torch.tensor(rows, dtype=torch.float64)).tolist()
        return dict(zip(self.modules, phi))

    def ratio(self, batch: float) -> Dict[str, float]:
        """Phi_anchor / Phi_i per module at ``batch`` (> 1: the module is less noisy than the anchor)."""
        phi = self.phi(batch)
        return {m: phi[self.anchor] / p if p > 0 else math.inf for m, p in phi.items()}

    def mu(self, batch: float, mu_clip: Tuple[float, float] = (0.1, 10.0), var_eps: float = 1e-8,
           ratio_clip: Optional[Tuple[float, float]] = None) -> Dict[str, float]:
        """The mu AGVM's update settles at for the predicted Phi at ``batch`` (Eq. 41: the fixed point of the
        EMA of Eq. 42 is mu~), with the optimizer's ``mu_clip`` / ``var_eps`` / ``ratio_clip``."""
        mod = Modulator(self.modules, self.anchor, mu_clip=mu_clip, var_eps=var_eps, ratio_clip=ratio_clip)
        return {self.anchor: 1.0, **mod.target(self.phi(batch))}

    def batch_at_ratio(self, factor: float, module: Optional[str] = None) -> float:
        """The smallest batch at which Phi_anchor / Phi_i or its inverse reaches ``factor`` (> 1) for ``module``
        (default: for any module), inf if it never does. The ratio moves monotonically from 1 (b -> 0) to
        NSR_anchor / NSR_i (b -> inf), so b solves NSR_a (b + 2 NSR_i) = r NSR_i (b + 2 NSR_a), r = factor or 1 / factor."""
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        nsr = self.nsr
        na = nsr[self.anchor]
        best = math.inf
        for m in [module] if module else self.modules:
            ni = nsr[m]
            if m == self.anchor or ni == na:
                continue
            r = factor if na > ni else 1.0 / factor  # the side the ratio moves towards
            limit = na / ni if ni > 0 else math.inf
            if (r > 1 and limit <= r) or (r < 1 and limit >= r):
                continue  # never gets that far apart
            if math.isinf(ni):
                b = 2.0 * na * (factor - 1.0)  # ratio = Phi_a = x / (1 + x): 1 / ratio = 1 + b / (2 NSR_a)
            elif math.isinf(na):
                b = 2.0 * ni * (factor - 1.0)
            else:
                b = 2.0 * na * ni * (r - 1.0) / (na - r * ni)
            best = min(best, b)
        return best

    def nsr_for_ratio(self, factor: float, batch: float) -> float:
        """The NSR a module would need for Phi_anchor / Phi_module to be ``factor`` at ``batch``, given the anchor's
        NSR (solves NSR_a (b + 2 NSR_i) = factor NSR_i (b + 2 NSR_a) for NSR_i); less noisy modules reach more."""
        if not factor > 0 or not batch > 0:
            raise ValueError(f"factor and batch must be > 0, got {factor}, {batch}")
        na = self.nsr[self.anchor]
        if math.isinf(na):
            return batch / (2.0 * (factor - 1.0)) if factor > 1 else math.inf  # Phi_a = 1: ratio = 1 + b / (2 NSR_i)
        denom = factor * (batch + 2.0 * na) - 2.0 * na
        return na * batch / denom if denom > 0 else math.inf  # factor <= Phi_anchor: any NSR is close enough

    def to_dict(self, batches: Sequence[float] = PAPER_BATCHES, factors: Sequence[float] = (2.0, 4.0)) -> dict:
        """JSON-ready summary (inf -> None): per module signal, noise, NSR, and Phi / ratio / mu at ``batches``."""
        def num(v):
            return None if v is None or not math.isfinite(v) else v

        phis = {b: self.phi(b) for b in batches}
        ratios = {b: self.ratio(b) for b in batches}
        mus = {b: self.mu(b) for b in batches}
        return {
            "num_images": self.num_images,
            "anchor": self.anchor,
            "law": "Phi_i(b) = x / (1 + x), x = 2 NSR_i / b",
            "batches": list(batches),
            "modules": {m: {"signal": self.signal[m], "noise": self.noise[m], "nsr": num(self.nsr[m]),
                            "phi": [phis[b][m] for b in batches], "ratio": [num(ratios[b][m]) for b in batches],
                            "mu": [mus[b][m] for b in batches],
                            "limit_ratio": num(self.nsr[self.anchor] / self.nsr[m]) if self.nsr[m] > 0 else None}
                        for m in self.modules},
            "misaligned_at": {f"{f:g}x": num(self.batch_at_ratio(f)) for f in factors},
            "no_gradient": self.no_gradient,
        }

    def plot(self, path: str, batches: Sequence[float] = PAPER_BATCHES, title: Optional[str] = None,
             measured: Optional[Dict[str, Dict[float, float]]] = None) -> str:
        """Phi_i(b) per module on a log batch axis, ``batches`` marked; ``measured`` ({module: {batch: Phi}})
        drawn as points. Needs matplotlib. Written atomically; returns ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lo = min([2.0, *batches]) / 2
        hi = max([4096.0, *batches]) * 2
        grid = [lo * (hi / lo) ** (k / 200) for k in range(201)]
        curves = [self.phi(b) for b in grid]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, m in enumerate(self.modules):
            color = f"C{k}"
            nsr = self.nsr[m]
            ax.plot(grid, [c[m] for c in curves], color=color,
                    label=f"{m} (NSR {nsr:.3g})" if math.isfinite(nsr) else f"{m} (NSR unresolved)")
            pts = (measured or {}).get(m, {})
            if pts:
                ax.plot(list(pts), list(pts.values()), "o", color=color, markersize=5)
        for b in batches:
            ax.axvline(b, color="0.6", lw=0.8, ls="--")
            ax.text(b, 1.02, f"{b:g}", ha="center", va="bottom", fontsize=8, color="0.4",
                    transform=ax.get_xaxis_transform())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.set_ylabel("predicted Φ = 1 - cos(G_a, G_b)")
        ax.set_title(title or f"Φ_i(b) = x/(1+x), x = 2 NSR_i / b  (from {self.num_images} per-image gradients)",
                     fontsize=9, pad=14)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        tmp = f"{path}.tmp.png"
        fig.savefig(tmp, dpi=120)
        plt.close(fig)
        os.replace(tmp, path)
        return path


def diagnose(model: torch.nn.Module, loss_of: Callable[[object], torch.Tensor], images: Iterable,
             modules=None, anchor: str = "backbone", total: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = print) -> Diagnosis:
    """Per-image gradients of ``images`` (``loss_of(image)`` is one image's loss) at the model's current weights,
    summed per module, then ``GradientSums.result`` (all-reduced under torch.distributed: pass each rank its own
    share). ``progress`` (None: silent) gets about ten lines; ``total``: the number of images, for the ETA."""
    sums = GradientSums(model, modules)
    t0 = time.time()
    every = max(1, (total or 0) // 10)
    for k, image in enumerate(images, 1):
        model.zero_grad(set_to_none=True)
        loss_of(image).backward()
        sums.add()
        if progress is not None and (k % every == 0 or k == total):
            rate = k / max(time.time() - t0, 1e-9)
            eta = f", ETA {(total - k) / rate:.0f} s" if total else ""
            progress(f"diagnose: {k}{f'/{total}' if total else ''} images, {rate:.2f} img/s{eta}")
    model.zero_grad(set_to_none=True)
    return sums.result(anchor)


def measure_phi(model: torch.nn.Module, loss_a: Callable[[], torch.Tensor], loss_b: Callable[[], torch.Tensor],
                modules=None) -> Dict[str, float]:
    """Phi_i = 1 - cos(G_a, G_b) measured directly: ``loss_a`` / ``loss_b`` are the mean losses of two disjoint
    halves of a batch (what AGVM measures in training; ``agvm.variance.module_stats``)."""
    names, params, ids = module_params(model, modules)
    halves = []
    for loss in (loss_a, loss_b):
        model.zero_grad(set_to_none=True)
        loss().backward()
        halves.append([None if p.grad is None else p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    phi = phi_from_stats(module_stats(halves[0], halves[1], ids, len(names))).tolist()
    return dict(zip(names, phi))


class HalfPairs:
    """Phi measured directly at one batch size from K half-batch gradients, averaged over all K (K - 1) / 2 pairs.

    With u_k the module-normalised gradient of half k (|u_k| = 1 per module) and U = sum_k u_k, the sum of
    cos(g_j, g_k) over the pairs j < k is (|U|^2 - K) / 2, so the all-pairs mean

        Phi = 1 - (|U|^2 - K) / (K (K - 1))

    needs one running sum (one extra gradient of memory) instead of K stored gradients: 2 x repeats halves give
    repeats x (2 repeats - 1) pairs where separate pairs gave repeats values. Its standard error is bounded by
    that of the K // 2 disjoint pairs (halves 0-1, 2-3, ...; independent values, their sd / sqrt(K // 2)), for which
    the first half of each pair is kept until the second arrives (one more gradient). Call ``add()`` after each
    half's backward, the two halves of a pair one after the other; under DDP each rank adds whole pairs and
    ``result()`` all-reduces, giving the same numbers on any number of ranks.
    """

    def __init__(self, model: torch.nn.Module, modules=None):
        self.modules, self.params, self.owner_list = module_params(model, modules)
        self.unit_sum = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.halves = 0
        self.first: Optional[List[Optional[torch.Tensor]]] = None
        self.pair_phi: List[List[float]] = []  # Phi per module of each disjoint pair
        self.silent = [False] * len(self.modules)  # a module with a zero gradient in some half: no cosine

    @torch.no_grad()
    def add(self) -> None:
        """Add the gradient now in ``p.grad`` (the mean loss of one half-batch) as the next half."""
        grads = [None if p.grad is None else p.grad.detach().float() for p in self.params]
        norms = module_stats(grads, grads, self.owner_list, len(self.modules))[:, 1].sqrt().tolist()
        bad = [m for m, n in zip(self.modules, norms) if not math.isfinite(n)]
        if bad:
            raise FloatingPointError(f"a half-batch gradient of module(s) {bad} is not finite; check the loss and "
                                     "the weights")
        for k, g in enumerate(grads):
            n = norms[self.owner_list[k]]
            if g is not None and n > 0:
                self.unit_sum[k].add_(g, alpha=1.0 / n)
        for i, n in enumerate(norms):
            if n == 0:
                self.silent[i] = True
        if self.first is None:
            self.first = [None if g is None else g.clone() for g in grads]
        else:
            stats = module_stats(self.first, grads, self.owner_list, len(self.modules))
            self.pair_phi.append(phi_from_stats(stats).tolist())
            self.first = None
        self.halves += 1

    @torch.no_grad()
    def result(self, reduce: Optional[bool] = None) -> Dict[str, dict]:
        """{module: {"phi": all-pairs mean, "se": standard-error bound or None, "halves": K, "pairs": K (K-1)/2}};
        ``reduce`` (default: when torch.distributed runs more than one rank) sums the ranks' halves first."""
        import torch.distributed as dist

        if self.first is not None:
            raise ValueError("HalfPairs got an odd number of halves: add the two halves of every pair")
        if reduce is None:
            reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        unit_sum, halves, pair_phi, silent = self.unit_sum, self.halves, self.pair_phi, self.silent
        if reduce:
            flat = torch.cat([s.reshape(-1) for s in unit_sum])
            dist.all_reduce(flat)
            unit_sum = list(flat.split([s.numel() for s in unit_sum]))
            unit_sum = [v.view_as(s) for v, s in zip(unit_sum, self.unit_sum)]
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (halves, pair_phi, silent))
            halves = sum(g[0] for g in gathered)
            pair_phi = [row for g in gathered for row in g[1]]
            silent = [any(g[2][i] for g in gathered) for i in range(len(self.modules))]
        if halves < 2:
            raise ValueError(f"Phi needs at least 2 halves (one pair), got {halves}")
        total = module_stats(unit_sum, unit_sum, self.owner_list, len(self.modules))[:, 0].tolist()  # |U|^2
        if any(silent):
            logger.warning("HalfPairs: module(s) %s got no gradient in some half: left out",
                           [m for m, q in zip(self.modules, silent) if q])
        out = {}
        for i, m in enumerate(self.modules):
            if silent[i]:
                continue
            vals = [row[i] for row in pair_phi]
            se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
            out[m] = {"phi": 1.0 - (total[i] - halves) / (halves * (halves - 1)), "se": se, "halves": halves,
                      "pairs": halves * (halves - 1) // 2}
        return out


def measure_phi_pairs(model: torch.nn.Module, half_losses: Iterable[Callable[[], torch.Tensor]],
                      modules=None) -> Dict[str, dict]:
    """Phi at one batch size from the mean losses of K (even) disjoint half-batches, averaged over all pairs of
    halves (``HalfPairs``; consecutive callables form the disjoint pairs of the error bound)."""
    pairs = HalfPairs(model, modules)
    for loss in half_losses:
        model.zero_grad(set_to_none=True)
        loss().backward()
        pairs.add()
    model.zero_grad(set_to_none=True)
    return pairs.result()
