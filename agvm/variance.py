"""Gradient-variance estimation and learning-rate modulation: the AGVM math, in one place.

Every way of measuring (two half-batch gradients in one process, the DDP communication hook,
AdamW's preconditioned halves) reduces to three numbers per module i:

    dot_i = <G_a^(i), G_b^(i)>,   aa_i = ||G_a^(i)||^2,   bb_i = ||G_b^(i)||^2

over the concatenation of all of module i's tensors (appendix A.1, Eq. 1-2). From them

    Phi_i      = 1 - cos(G_a^(i), G_b^(i))                                   (Eq. 2, without eta^2)
    mu~_i      = clip(sqrt((Phi_anchor + eps) / (Phi_i + eps)), low, high)   (Eq. 41 + A.6)
    mu_i      <- alpha * mu_i + (1 - alpha) * mu~_i                          (Eq. 42)

The learning rate eta_t is common to all modules, so it cancels in the ratio and is left out of Phi.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("agvm")

__all__ = ["module_stats", "pair_stats", "adam_denominator_", "phi_from_stats", "Modulator"]


# Elements per chunk of the statistics on a CPU: a chunk's operands stay in cache between the three dot
# products (and AdamW's preconditioning), so each gradient is read from memory once. Accelerators take
# whole tensors (a launch per chunk would cost more than the traffic saved). Tensors below SMALL elements
# are concatenated per module first, so hundreds of biases and norms cost a few operations, not hundreds.
CPU_CHUNK = 1 << 18
SMALL = 1 << 14

Precond = Tuple[Optional[torch.Tensor], float, float]  # (exp_avg_sq or None, beta2, eps) of one parameter

# Opt-in (AGVM_COMPILE_STATS=1): each segment's statistics as one torch.compile'd kernel, one pass over the
# data with no temporaries (Triton on CUDA; inductor's C++ for CPU tensors the C++ kernel does not take). The first
# measurement step compiles (about 40 s on a 2-core CPU; cached on disk afterwards); without a compiler it falls
# back to the chunks.
COMPILE_STATS = os.environ.get("AGVM_COMPILE_STATS", "0") == "1"
_compiled: Dict[Tuple[bool, bool], object] = {}


def _segment_stats(a, b, g, v, consts, derived: bool, precond: bool):
    """(a.b, a.a, b.b) of one segment in one expression (the compiled kernel; the chunks compute the same).
    ``consts`` = (beta2, (1 - beta2) * inv_scale^2, eps) as a tensor, so that no value triggers a recompile."""
    a = a.float()
    b = a - 2.0 * b.float() if derived else b.float()
    if precond:
        r = ((v.float() * consts[0] + g.float() * g.float() * consts[1]).sqrt() + consts[2]).reciprocal()
        a, b = a * r, b * r
    return torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()])


# one function per variant: torch.compile keeps one cache (and recompile budget) per function
def _stats_plain(a, b, g, v, consts):
    return _segment_stats(a, b, g, v, consts, derived=False, precond=False)


def _stats_derived(a, b, g, v, consts):
    return _segment_stats(a, b, g, v, consts, derived=True, precond=False)


def _stats_precond(a, b, g, v, consts):
    return _segment_stats(a, b, g, v, consts, derived=False, precond=True)


def _stats_derived_precond(a, b, g, v, consts):
    return _segment_stats(a, b, g, v, consts, derived=True, precond=True)


_VARIANTS = {(False, False): _stats_plain, (True, False): _stats_derived, (False, True): _stats_precond,
             (True, True): _stats_derived_precond}


def _compiled_segment_stats(derived: bool, precond: bool):
    if (derived, precond) not in _compiled:
        _compiled[derived, precond] = torch.compile(_VARIANTS[derived, precond], dynamic=True)
    return _compiled[derived, precond]


def module_stats(
    ga: Sequence[Optional[torch.Tensor]],
    gb: Optional[Sequence[Optional[torch.Tensor]]],
    module_ids: Sequence[int],
    num_modules: int,
    precond: Optional[Sequence[Precond]] = None,
    grads: Optional[Sequence[Optional[torch.Tensor]]] = None,
    inv_scale: float = 1.0,
) -> torch.Tensor:
    """Per-module (dot, |a|^2, |b|^2) as a float64 CPU tensor of shape [num_modules, 3].

    ``ga[k]``, ``gb[k]`` belong to module ``module_ids[k]``; ``None`` entries are zero gradients
    (a parameter no sample of that half reached). ``gb=None`` derives ``gb[k] = 2 * grads[k] - ga[k]``
    chunk by chunk (``grads`` the whole batch's mean gradients, p.grad; never a whole-model copy): the same
    numbers as passing that gb. ``precond[k] = (exp_avg_sq, beta2, eps)`` divides both halves of tensor k
    element-wise by AdamW's sqrt(v_t) + eps (``adam_denominator_`` of ``grads[k] * inv_scale``), computed in
    the same pass. float32 CPU tensors go through one C++ kernel (``agvm.cpu_stats``: every element read once,
    float64 sums, the same result for any thread count); the rest, or all when the kernel cannot be built, are
    float32 reductions on the tensors' device over chunks of ``CPU_CHUNK`` elements on a CPU (whole tensors
    elsewhere), added up in float64.
    """
    global COMPILE_STATS
    derived = gb is None
    if (derived or precond is not None) and grads is None:
        raise ValueError("halves=(ga, None) and AdamW's preconditioner need grads (one p.grad or None per parameter)")
    others = grads if derived else gb
    if not (len(ga) == len(others) == len(module_ids)) or (precond is not None and len(precond) != len(ga)):
        raise ValueError(
            f"halves must hold one tensor per optimizer parameter: got {len(ga)} and {len(others)} "
            f"tensors for {len(module_ids)} parameters"
        )
    segments, small = [], {}  # segment: (key, [a, b(, g, v)]) flat; small tensors gathered per key
    cpu = _cpu_kernel() if any(x is not None and x.device.type == "cpu" for x in ga) else None
    entries: List[list] = []  # the C++ kernel's inputs: (a, b, g, v, beta2, w, eps) per tensor
    entry_owners: List[int] = []
    for k, (a, b) in enumerate(zip(ga, others)):
        if a is None and b is None:
            continue
        if a is not None and b is not None and a.shape != b.shape:
            what = "p.grad" if derived else "halves"
            raise ValueError(f"{what} differ in shape at parameter {k}: {tuple(a.shape)} vs {tuple(b.shape)}")
        if cpu is not None and a is not None and b is not None:  # the common case, without reshapes
            g_k, (v_k, beta2, eps) = (grads[k], precond[k]) if precond is not None else (None, (None, 0.0, 0.0))
            if all(x is None or (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous())
                   for x in (a, b, g_k, v_k)):
                entries.append(_kernel_entry(a, b, g_k, v_k, beta2, eps, inv_scale, precond is not None))
                entry_owners.append(module_ids[k])
                continue
        ref = (a if a is not None else b).detach().reshape(-1)
        cols = [ref if x is None else x.detach().reshape(-1) for x in (a, b)]
        cols = [torch.zeros_like(ref) if x is None else c for x, c in zip((a, b), cols)]  # None: a zero gradient
        key = (module_ids[k], ref.device)
        if precond is not None:
            v, beta2, eps = precond[k]
            cols += [None if x is None else x.detach().reshape(-1) for x in (grads[k], v)]
            key += (float(beta2), eps)
        if cpu is not None and all(c is None or (c.device.type == "cpu" and c.dtype == torch.float32) for c in cols):
            g_k, v_k = cols[2:] if precond is not None else (None, None)
            entries.append(_kernel_entry(cols[0], cols[1], g_k, v_k, *(key[2:] or (0.0, 0.0)), inv_scale,
                                         precond is not None))
            entry_owners.append(module_ids[k])
            continue
        if ref.numel() < SMALL and (precond is None or cols[2] is not None):
            small.setdefault(key, []).append(cols)
        else:
            segments.append((key, cols))
    for key, items in small.items():  # v None (the first step) is v_{t-1} = 0
        zero = [torch.zeros(c[0].numel(), device=c[0].device) for c in items]
        segments.append((key, [torch.cat([z if c[i] is None else c[i].float() for c, z in zip(items, zero)])
                               for i in range(len(items[0]))]))
    rows: List[torch.Tensor] = []
    owners: List[int] = []
    scratch: Dict[torch.device, torch.Tensor] = {}  # [3, chunk] float32 per device, reused for every chunk
    for key, (a, b, *pre) in segments:
        n = a.numel()
        if COMPILE_STATS and (precond is None or pre[0] is not None):
            g, v = pre if pre else (a, a)
            v = torch.zeros_like(a, dtype=torch.float32) if v is None else v
            beta2, eps = key[2:] if pre else (0.0, 0.0)
            consts = torch.tensor([beta2, (1.0 - beta2) * inv_scale ** 2, eps], device=a.device)
            try:
                rows += list(_compiled_segment_stats(derived, precond is not None)(a, b, g, v, consts))
                owners.append(key[0])
                continue
            except Exception as e:  # no compiler, an unsupported device: the chunks below, from now on
                logger.warning("AGVM: compiled statistics unavailable (%s); using the chunked kernels", e)
                COMPILE_STATS = False
        chunk = CPU_CHUNK if a.device.type == "cpu" else max(n, 1)
        if derived or precond is not None:
            buf = scratch.get(a.device)
            if buf is None or buf.shape[1] < min(n, chunk):
                buf = scratch[a.device] = torch.empty(3, min(n, chunk), dtype=torch.float32, device=a.device)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            x = a[lo:hi].float()
            y = b[lo:hi].float()
            if derived:  # x - 2 g = -(2 g - x) exactly: the dot's sign is flipped back below
                y = torch.sub(x, y, alpha=2.0, out=buf[0, : hi - lo])
            if precond is not None:
                g, v = pre
                d = adam_denominator_(None if g is None else g[lo:hi], None if v is None else v[lo:hi], key[2], key[3],
                                      out=buf[1, : hi - lo], inv_scale=inv_scale)
                r = d.reciprocal_()  # one division, two multiplications
                x = torch.mul(x, r, out=buf[2, : hi - lo])
                y = torch.mul(y, r, out=buf[0, : hi - lo])
            rows += [x.dot(y), x.dot(x), y.dot(y)]
            owners.append(key[0])
    stats = torch.zeros(num_modules, 3, dtype=torch.float64)
    if entries:
        a, b, g, v, beta2, w, eps = (list(c) for c in zip(*entries))
        if precond is not None:
            v = [x if x is not None else x_a.new_empty(0) for x, x_a in zip(v, a)]  # empty: v_{t-1} = 0
        out = cpu.module_stats_cpu(a, b, g if precond is not None else [], v if precond is not None else [],
                                   beta2, w, eps, derived, precond is not None)
        stats.index_add_(0, torch.tensor(entry_owners, dtype=torch.long), out)
    if rows:
        stats.index_add_(0, torch.tensor(owners, dtype=torch.long),
                         torch.stack(rows).view(-1, 3).to("cpu", torch.float64))
    if derived:
        stats[:, 0].neg_()
    return stats


def _kernel_entry(a, b, g, v, beta2, eps, inv_scale, precond: bool) -> list:
    """One tensor's inputs to the C++ kernel: (a, b, g, v, beta2, w, eps); v None is v_{t-1} = 0."""
    if not precond:
        return [a, b, None, None, 0.0, 0.0, 0.0]
    if g is None:  # torch's update skips the parameter: v_t = v_{t-1} (beta2 = 1, w = 0; g only needs a pointer)
        return [a, b, a, v, 1.0, 0.0, float(eps)]
    return [a, b, g, v, float(beta2), (1.0 - beta2) * inv_scale ** 2, float(eps)]


def _cpu_kernel():
    """agvm.cpu_stats' built kernel, or None (turned off, or the build failed: warned once)."""
    global _CPU_KERNEL_WHY
    from . import cpu_stats

    if not cpu_stats.ENABLED or _CPU_KERNEL_WHY:
        return None
    try:
        return cpu_stats.kernel()
    except Exception as e:  # no compiler, no ninja, a failed build: torch's kernels from now on
        _CPU_KERNEL_WHY = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        logger.warning("AGVM: the C++ statistics kernel could not be built (%s); measurement steps use torch's "
                       "kernels (slower on a CPU). AGVM_CPU_STATS=0 skips the build.", _CPU_KERNEL_WHY)
        return None


_CPU_KERNEL_WHY = ""


def pair_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.b, a.a, b.b) of two flat tensors, as a 3-vector on their device."""
    return torch.stack([a.dot(b), a.dot(a), b.dot(b)])


def adam_denominator_(
    grad: Optional[torch.Tensor], exp_avg_sq: Optional[torch.Tensor], beta2: float, eps: float,
    out: Optional[torch.Tensor] = None, inv_scale: float = 1.0,
) -> torch.Tensor:
    """sqrt(v_t) + eps, flat float32 (into ``out`` if given), with v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    (v_{t-1} = 0 when None): Alg. 2's preconditioner for the second moment *after* this step's update.
    ``g_t = grad * inv_scale`` (a GradScaler's scaled gradient); ``grad=None`` (needs ``out``): torch's update
    skips the parameter, so v_t = v_{t-1}."""
    if grad is None:
        if out is None:
            raise ValueError("adam_denominator_: grad=None needs out")
        out = out.copy_(exp_avg_sq.detach().reshape(-1)) if exp_avg_sq is not None else out.zero_()
        return out.sqrt_().add_(eps)
    g = grad.detach().reshape(-1)
    weight = (1.0 - beta2) * inv_scale * inv_scale
    if exp_avg_sq is None:
        out = torch.mul(g, g, out=out) if out is not None else g.float() * g
        out.mul_(weight)
    else:
        v = exp_avg_sq.detach().reshape(-1)
        out = torch.mul(v, beta2, out=out) if out is not None else v.float() * beta2
        out.addcmul_(g, g, value=weight)
    return out.sqrt_().add_(eps)


def phi_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Phi = 1 - cos from [M, 3] (dot, aa, bb) rows; NaN where a module had no gradient (aa * bb == 0).

    ``sqrt(aa * bb)`` rather than ``sqrt(aa) * sqrt(bb)``: for identical halves it is exactly ``aa``,
    so Phi is exactly 0 and equal halves leave mu at 1.
    """
    stats = stats.to(torch.float64)
    dot, aa, bb = stats.unbind(-1)
    denom = (aa * bb).sqrt()
    cos = (dot / denom).clamp(-1.0, 1.0)
    return torch.where(denom > 0, 1.0 - cos, torch.full_like(cos, math.nan))


class Modulator:
    """Holds mu and Phi per module and applies Eq. 41-42.

    Args:
        modules: module names, in a fixed order (the row order of the stats tensors).
        anchor: the module whose variance the others are moved toward (the backbone in the paper).
        alpha: momentum of mu, in [0, 1).
        mu_clip: (low, high) bounds of the instantaneous mu~ (appendix: [0.1, 10]).
        var_eps: added to both variances of the ratio (appendix A.6).
        ratio_clip: the authors' code variant: clip the variance ratio itself before the square root
            (their runs use (0.5, 10)); None (default) follows the appendix.
        start_iter: before this step, measurements record Phi but mu stays 1 (the authors start AGVM
            after warm-up). 0 modulates from the first measurement.
    """

    def __init__(
        self,
        modules: Sequence[str],
        anchor: str = "backbone",
        alpha: float = 0.97,
        mu_clip: Tuple[float, float] = (0.1, 10.0),
        var_eps: float = 1e-8,
        ratio_clip: Optional[Tuple[float, float]] = None,
        start_iter: int = 0,
    ):
        self.modules = list(modules)
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"module names must be unique, got {self.modules}")
        if anchor not in self.modules:
            raise ValueError(
                f"anchor {anchor!r} names no module; the modules are {self.modules}. "
                f"Pass anchor=<one of them> or give the anchor's param groups \"module\": {anchor!r}."
            )
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        low, high = _check_range("mu_clip", mu_clip)
        if ratio_clip is not None:
            _check_range("ratio_clip", ratio_clip)
        if var_eps < 0:
            raise ValueError(f"var_eps must be >= 0, got {var_eps}")
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.anchor = anchor
        self.alpha = float(alpha)
        self.mu_clip = (float(low), float(high))
        self.var_eps = float(var_eps)
        self.ratio_clip = None if ratio_clip is None else tuple(float(x) for x in ratio_clip)
        self.start_iter = int(start_iter)
        self.mu: Dict[str, float] = {m: 1.0 for m in self.modules}
        self.phi: Dict[str, float] = {}
        self.num_rejected = 0

    def target(self, phi: Dict[str, float]) -> Dict[str, float]:
        """mu~ per module for the variances ``phi`` (modules missing from ``phi`` are left out)."""
        pa = phi[self.anchor] + self.var_eps
        low, high = self.mu_clip
        out = {}
        for m, p in phi.items():
            if m == self.anchor:
                continue
            ratio = pa / (p + self.var_eps) if p + self.var_eps > 0 else math.inf
            if self.ratio_clip is not None:
                ratio = min(max(ratio, self.ratio_clip[0]), self.ratio_clip[1])
            out[m] = min(max(math.sqrt(ratio), low), high)
        return out

    def update(self, stats: torch.Tensor, t: int) -> bool:
        """Apply one measurement ([M, 3] stats, rows in ``self.modules`` order) taken at step ``t``.

        Returns False (and changes nothing) when the measurement is not finite or the anchor got no
        gradient; modules that got no gradient keep their mu and Phi.
        """
        if stats.shape != (len(self.modules), 3):
            raise ValueError(f"expected stats of shape {(len(self.modules), 3)}, got {tuple(stats.shape)}")
        if not bool(torch.isfinite(stats).all()):
            self._reject("the half-batch gradients contain NaN or Inf")
            return False
        values = phi_from_stats(stats).tolist()
        phi = {m: v for m, v in zip(self.modules, values) if not math.isnan(v)}
        if self.anchor not in phi:
            self._reject(f"the anchor module {self.anchor!r} got no gradient")
            return False
        self.phi.update(phi)
        if t < self.start_iter:
            return True
        a = self.alpha
        for m, target in self.target(phi).items():
            self.mu[m] = a * self.mu[m] + (1.0 - a) * target
        return True

    def _reject(self, why: str) -> None:
        self.num_rejected += 1
        if self.num_rejected == 1:
            logger.warning("AGVM: measurement skipped, mu kept: %s (further skips are logged at debug level)", why)
        else:
            logger.debug("AGVM: measurement skipped (%d so far): %s", self.num_rejected, why)

    def state_dict(self) -> dict:
        return {"mu": dict(self.mu), "phi": dict(self.phi), "num_rejected": self.num_rejected}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state["mu"]) - set(self.modules)
        if unknown:
            raise ValueError(
                f"the checkpoint has AGVM state for modules {sorted(unknown)} that this optimizer does not "
                f"have (its modules: {self.modules}); build the param groups the same way as the saved run"
            )
        self.mu.update({m: float(v) for m, v in state["mu"].items()})
        self.phi = {m: float(v) for m, v in state["phi"].items()}
        self.num_rejected = int(state.get("num_rejected", 0))


def _check_range(name: str, value: Iterable[float]) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0.0 < low <= high:
        raise ValueError(f"{name} must satisfy 0 < low <= high, got low={low}, high={high}")
    return low, high
