"""UniNet: a hybrid convolution-transformer backbone, with UniNet-G (about 1B parameters) of AGVM.

References
- AGVM appendix A.5.2, Table 4 (Xue et al., NeurIPS 2022): UniNet-G, six stages after the stem,
  stages 0-3 Fused-MBConv (expansion 1, 4, 6, 3; channels 104, 216, 384, 576; layers 6, 9, 18, 18),
  stages 4-5 transformer (expansion 2, 5; channels 576, 1152; layers 18, 36), cumulative strides
  2, 4, 8, 16, 16, 32. For detection the 54 transformer blocks are split into 18 even subsets,
  each with two window-attention blocks and one global-attention block (windows 28 / 14).
- UniNet (Liu et al., arXiv 2110.04035 / 2207.05420): stem 3x3/2 conv + BN + GELU (32 channels);
  a *local down-sampling module* (LDM) between conv stages: depth-wise 3x3 (strided) + BN + 1x1 conv,
  plus a max-pool + 1x1 shortcut; a *local-global down-sampling module* (LGDM) before each
  transformer stage: queries from the LDM path (+ LayerNorm), keys/values from the full-resolution
  tokens (LayerNorm + linear), global attention with 32-channel heads, plus the shortcut;
  transformer blocks: depth-wise 3x3 positional convolution, pre-norm multi-head self-attention
  (heads = channels / 32), pre-norm GELU MLP with ratio = the stage's expansion, LayerScale (1e-6)
  on both branches, stochastic depth.

Which variant (parameter counts on the meta device, backbone without head / classifier)
- Built: Table 4 as written. The conv blocks are timm's ``EdgeResidual`` (Fused-MBConv: full 3x3
  expansion conv + BN + GELU, 1x1 projection + BN, no squeeze-excite) in all of stages 0-3:
  1,080,248,752 parameters (stage 5 alone 673,936,128); with the 1x1 head conv (1280) and a 21,841-class
  classifier for ImageNet-22K pre-training 1,109,704,193. This is the reading of Table 4 that lands near
  the paper's "1 billion"; the authors' classification code (MBConv + SE) scaled to Table 4 would be
  ~0.87B, and the detector adds the neck and heads on top.
- ``conv_block='mbconv'`` swaps in timm's ``InvertedResidual`` (1x1 expand + depth-wise 3x3, no SE):
  796,531,720 parameters for UniNet-G.

Implementation notes
- Transformer tokens are kept as ``(B, H, W, C)``; windows pad H and W up to a multiple of the window
  and mask the padded keys, so any input size works (no square-grid assumption). Attention is
  ``torch.nn.functional.scaled_dot_product_attention``.
- ``grad_checkpointing`` (torch.utils.checkpoint, per block) and ``drop_path_rate`` (linear rule)
  are options. The ``uninet_*`` functions are registered with timm; see ``models/mmdet_uninet.py``
  for the mmdet backbone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import agvm._compat

agvm._compat.apply()  # timm imports torchvision: needs the CPU-torch operator shim first

from timm.layers import ConvNormAct, DropPath, LayerScale, Mlp, trunc_normal_  # noqa: E402
from timm.models._efficientnet_blocks import EdgeResidual, InvertedResidual  # noqa: E402

__all__ = ["UniNet", "UniNetArch", "ARCHS", "count_params", "build_uninet"]


@dataclass(frozen=True)
class UniNetArch:
    """Widths / depths / expansions of the six stages; ``strides`` are per stage (cumulative 2..32)."""

    widths: Tuple[int, ...]
    depths: Tuple[int, ...]
    expansions: Tuple[float, ...] = (1, 4, 6, 3, 2, 5)
    strides: Tuple[int, ...] = (1, 2, 2, 2, 1, 2)
    kinds: Tuple[str, ...] = ("conv", "conv", "conv", "conv", "attn", "attn")
    stem_width: int = 32
    head_dim: int = 32
    head_hidden: int = 1280

    def __post_init__(self) -> None:
        n = len(self.widths)
        for name in ("depths", "expansions", "strides", "kinds"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UniNetArch: {name} has {len(getattr(self, name))} entries, widths has {n}")
        for w, k in zip(self.widths, self.kinds):
            if k not in ("conv", "attn"):
                raise ValueError(f"UniNetArch: stage kind {k!r} is not 'conv' or 'attn'")
            if k == "attn" and w % self.head_dim:
                raise ValueError(f"UniNetArch: transformer width {w} is not a multiple of head_dim {self.head_dim}")


ARCHS: Dict[str, UniNetArch] = {
    # AGVM Table 4
    "g": UniNetArch(widths=(104, 216, 384, 576, 576, 1152), depths=(6, 9, 18, 18, 18, 36)),
    # UniNet-B0 widths / depths (the authors' B0 uses MBConv + SE; here the blocks of this file)
    "b0": UniNetArch(widths=(24, 48, 80, 128, 128, 256), depths=(1, 2, 4, 4, 4, 8)),
    # a tiny member for tests and CPU runs: 6 transformer blocks (2 subsets of window, window, global)
    "tiny": UniNetArch(widths=(16, 24, 32, 48, 64, 96), depths=(1, 1, 1, 1, 3, 3),
                       expansions=(1, 2, 2, 2, 2, 2), stem_width=16, head_hidden=128),
}


def count_params(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# down-sampling modules
# ----------------------------------------------------------------------------------------------
def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """max-pool 3x3 (when strided) + 1x1 conv: the shortcut of both down-sampling modules."""
    layers: List[nn.Module] = []
    if stride > 1:
        layers.append(nn.MaxPool2d(3, stride=stride, padding=1))
    layers.append(nn.Conv2d(cin, cout, 1))
    return nn.Sequential(*layers)


def _local_path(cin: int, cout: int, stride: int) -> nn.Module:
    """depth-wise 3x3 (strided) + BN + 1x1 conv."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin),
        nn.BatchNorm2d(cin),
        nn.Conv2d(cin, cout, 1),
    )


class LocalDownsample(nn.Module):
    """UniNet local down-sampling module (between conv stages). NCHW -> NCHW."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        self.local = _local_path(cin, cout, stride)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(x) + self.shortcut(x)


class LocalGlobalDownsample(nn.Module):
    """UniNet local-global down-sampling module (before a transformer stage). NCHW -> (B, H', W', C').

    Queries: the local path (strided depth-wise conv + BN + 1x1) + LayerNorm; keys/values: LayerNorm of
    the full-resolution tokens + a linear layer; global attention (heads of ``head_dim`` channels), a
    linear projection, plus the max-pool + 1x1 shortcut.
    """

    def __init__(self, cin: int, cout: int, stride: int = 2, head_dim: int = 32) -> None:
        super().__init__()
        self.num_heads = cout // head_dim
        self.head_dim = head_dim
        self.q = _local_path(cin, cout, stride)
        self.q_norm = nn.LayerNorm(cout)
        self.kv_norm = nn.LayerNorm(cin)
        self.kv = nn.Linear(cin, 2 * cout)
        self.proj = nn.Linear(cout, cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        q = self.q_norm(self.q(x).permute(0, 2, 3, 1))  # B, h, w, C'
        h, w, c = q.shape[1:]
        q = q.reshape(B, h * w, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(self.kv_norm(x.flatten(2).transpose(1, 2)))  # B, HW, 2C'
        k, v = kv.reshape(B, H * W, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # B, heads, hw, d
        out = self.proj(out.transpose(1, 2).reshape(B, h, w, c))
        return out + self.shortcut(x).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# transformer block with window or global attention
# ----------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, ws: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], Tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws * ws, C), a key mask (B * nW, 1, 1, ws * ws) or None, padded (Hp, Wp).

    H and W are padded at the bottom / right up to multiples of ``ws``; the mask (True = attend) keeps
    padded tokens out of every window's keys, so results do not depend on the padding.
    """
    B, H, W, C = x.shape
    ph, pw = (-H) % ws, (-W) % ws
    mask = None
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        valid = torch.zeros(H + ph, W + pw, dtype=torch.bool, device=x.device)
        valid[:H, :W] = True
        nh, nw = (H + ph) // ws, (W + pw) // ws
        valid = valid.view(nh, ws, nw, ws).transpose(1, 2).reshape(1, nh * nw, 1, 1, ws * ws)
        mask = valid.expand(B, -1, -1, -1, -1).reshape(B * nh * nw, 1, 1, ws * ws)
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3).reshape(-1, ws * ws, C)
    return x, mask, (Hp, Wp)


def window_unpartition(x: torch.Tensor, ws: int, padded: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C), padding removed."""
    Hp, Wp = padded
    H, W = size
    C = x.shape[-1]
    x = x.view(-1, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(-1, Hp, Wp, C)
    return x[:, :H, :W].contiguous() if (Hp, Wp) != (H, W) else x


class Attention(nn.Module):
    """Multi-head self-attention on (B, H, W, C) tokens, global or in non-overlapping windows."""

    def __init__(self, dim: int, num_heads: int, window_size: Optional[int] = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        if window_size is not None and window_size < 1:
            raise ValueError(f"Attention: window_size must be a positive int or None, got {window_size}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        if ws is not None:
            t, mask, padded = window_partition(x, ws)
        else:
            t, mask = x.reshape(B, H * W, C), None
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        t = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        t = self.proj(t.transpose(1, 2).reshape(b, n, C))
        if ws is not None:
            return window_unpartition(t, ws, padded, (H, W))
        return t.view(B, H, W, C)


class TransformerBlock(nn.Module):
    """Depth-wise positional conv, then pre-norm attention and MLP, each with LayerScale + drop path."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int = 32, window_size: Optional[int] = None,
                 drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim // head_dim, window_size=window_size)
        self.ls1 = LayerScale(dim, init_values=layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def window_size(self) -> Optional[int]:
        return self.attn.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


# ----------------------------------------------------------------------------------------------
# stages and network
# ----------------------------------------------------------------------------------------------
def _conv_block(kind: str, cin: int, cout: int, expansion: float, stride: int, drop_path: float) -> nn.Module:
    common = dict(stride=stride, exp_ratio=expansion, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d,
                  drop_path_rate=drop_path)
    if kind == "fused":
        blk = EdgeResidual(cin, cout, exp_kernel_size=3, **common)
        last_bn = blk.bn2
    elif kind == "mbconv":
        blk = InvertedResidual(cin, cout, dw_kernel_size=3, **common)
        last_bn = blk.bn3
    else:
        raise ValueError(f"conv_block must be 'fused' (Table 4) or 'mbconv', got {kind!r}")
    if blk.has_skip:  # residual branch starts at zero (as in the UniNet code): the block is the identity
        nn.init.zeros_(last_bn.weight)
    return blk


class UniNetStage(nn.Module):
    """A down-sampling module (or none) followed by the stage's blocks. NCHW in, NCHW out.

    Transformer stages work on (B, H, W, C) tokens internally; the local-global down-sampling module
    already returns that layout.
    """

    def __init__(self, kind: str, downsample: Optional[nn.Module], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.kind = kind
        self.downsample = downsample if downsample is not None else nn.Identity()
        self._down_is_nhwc = isinstance(downsample, LocalGlobalDownsample)
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def _run(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not isinstance(m, nn.Identity):
            return torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
        return m(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run(self.downsample, x)
        if self.kind == "attn" and not self._down_is_nhwc:
            x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = self._run(blk, x)
        return x.permute(0, 3, 1, 2) if self.kind == "attn" else x


class UniNet(nn.Module):
    """UniNet backbone / classifier (see the module docstring).

    Args:
        arch: a name in :data:`ARCHS` ('g', 'b0', 'tiny') or a :class:`UniNetArch`; ``widths`` /
            ``depths`` / ``expansions`` override its fields.
        num_classes: classifier size; 0 keeps the 1x1 head conv + pooling (returns pooled features).
        with_head: False drops the head conv and classifier (a pure feature extractor, e.g. detection).
        window_sizes: per transformer stage, a window size or None (global). None everywhere = all global.
        num_subsets: the transformer blocks of all attention stages are split into this many even subsets;
            in each, every block uses window attention except the last (global). Ignored where a stage's
            window size is None. Table 4 / A.5.2: 18 subsets (54 blocks -> 3 per subset).
        conv_block: 'fused' (Fused-MBConv, Table 4) or 'mbconv'.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        grad_checkpointing: activation checkpointing per block.
        out_indices: stages whose outputs :meth:`forward_features_list` returns.
    """

    def __init__(
        self,
        arch: Union[str, UniNetArch] = "g",
        *,
        widths: Optional[Sequence[int]] = None,
        depths: Optional[Sequence[int]] = None,
        expansions: Optional[Sequence[float]] = None,
        num_classes: int = 1000,
        with_head: bool = True,
        in_chans: int = 3,
        window_sizes: Optional[Sequence[Optional[int]]] = None,
        num_subsets: Optional[int] = None,
        conv_block: str = "fused",
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        layer_scale_init: float = 1e-6,
        grad_checkpointing: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3, 4, 5),
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if isinstance(arch, str):
            if arch not in ARCHS:
                raise ValueError(f"unknown UniNet arch {arch!r}; known: {sorted(ARCHS)} (or pass a UniNetArch)")
            arch = ARCHS[arch]
        over = {k: tuple(v) for k, v in dict(widths=widths, depths=depths, expansions=expansions).items()
                if v is not None}
        if over:
            arch = UniNetArch(**{**arch.__dict__, **over})
        self.arch = arch
        n_stages = len(arch.widths)
        attn_stages = [i for i, k in enumerate(arch.kinds) if k == "attn"]
        if window_sizes is None:
            window_sizes = [None] * len(attn_stages)
        window_sizes = list(window_sizes)
        if len(window_sizes) != len(attn_stages):
            raise ValueError(f"window_sizes needs one entry per transformer stage ({len(attn_stages)}), "
                             f"got {window_sizes}")
        self.window_sizes = window_sizes
        self.num_subsets = num_subsets
        per_subset = None
        if num_subsets is not None:
            total = sum(arch.depths[i] for i in attn_stages)
            if num_subsets < 1 or total % num_subsets:
                raise ValueError(f"num_subsets={num_subsets} does not split the {total} transformer blocks evenly")
            per_subset = total // num_subsets
            for i in attn_stages:
                if arch.depths[i] % per_subset:
                    raise ValueError(f"stage {i} has {arch.depths[i]} blocks, not a multiple of the subset size "
                                     f"{per_subset} (num_subsets={num_subsets})")
        self.out_indices = tuple(out_indices)
        for i in self.out_indices:
            if not 0 <= i < n_stages:
                raise ValueError(f"out_indices {self.out_indices}: stage index {i} not in [0, {n_stages})")

        self.stem = ConvNormAct(in_chans, arch.stem_width, 3, stride=2, padding=1, norm_layer=nn.BatchNorm2d,
                                act_layer=nn.GELU)
        n_blocks = sum(arch.depths)
        dpr = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]  # linear rule
        stages: List[nn.Module] = []
        cin, reduction, k = arch.stem_width, 2, 0
        self.feature_info: List[Dict[str, Any]] = []
        for i in range(n_stages):
            cout, stride, exp, kind = arch.widths[i], arch.strides[i], arch.expansions[i], arch.kinds[i]
            blocks: List[nn.Module] = []
            down: Optional[nn.Module] = None
            if kind == "attn":
                if i > 0 or stride > 1 or cin != cout:
                    down = LocalGlobalDownsample(cin, cout, stride, arch.head_dim)
                ws = window_sizes[attn_stages.index(i)]
                for j in range(arch.depths[i]):
                    use_window = ws is not None and not (per_subset is not None and (j + 1) % per_subset == 0)
                    blocks.append(TransformerBlock(cout, exp, arch.head_dim, ws if use_window else None,
                                                   dpr[k], layer_scale_init))
                    k += 1
            else:
                first_stride = stride
                if i > 0:
                    down = LocalDownsample(cin, cout, stride)
                    cin, first_stride = cout, 1
                for j in range(arch.depths[i]):
                    blocks.append(_conv_block(conv_block, cin if j == 0 else cout, cout, exp,
                                              first_stride if j == 0 else 1, dpr[k]))
                    k += 1
            reduction *= stride
            stages.append(UniNetStage(kind, down, blocks))
            self.feature_info.append(dict(num_chs=cout, reduction=reduction, module=f"stages.{i}"))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.num_features = cin
        self.num_classes = num_classes
        self.with_head = with_head
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        if with_head:
            self.head_hidden_size = arch.head_hidden
            self.head = ConvNormAct(cin, arch.head_hidden, 1, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU)
            self.classifier = nn.Linear(arch.head_hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm model interface ------------------------------------------------------------------
    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else
                    [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def attention_kinds(self) -> List[List[str]]:
        """Per transformer stage, 'window' / 'global' for each block (for tests and logging)."""
        return [["window" if b.window_size is not None else "global" for b in s.blocks]
                for s in self.stages if s.kind == "attn"]

    def set_window_sizes(self, window_sizes: Sequence[Optional[int]]) -> None:
        """Change the window size of the window-attention blocks (e.g. 28 / 14 for COCO), keeping the split."""
        attn = [s for s in self.stages if s.kind == "attn"]
        if len(window_sizes) != len(attn):
            raise ValueError(f"need {len(attn)} window sizes, got {list(window_sizes)}")
        for s, ws in zip(attn, window_sizes):
            for b in s.blocks:
                if b.attn.window_size is not None:
                    b.attn.window_size = ws
        self.window_sizes = list(window_sizes)

    # -- forward -------------------------------------------------------------------------------
    def forward_features_list(self, x: torch.Tensor, out_indices: Optional[Sequence[int]] = None
                              ) -> List[torch.Tensor]:
        """NCHW feature maps of the stages in ``out_indices`` (default: the constructor's)."""
        idx = self.out_indices if out_indices is None else tuple(out_indices)
        x = self.stem(x)
        outs = []
        last = max(idx)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in idx:
                outs.append(x)
            if i == last:
                break
        return outs

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature-extraction interface (used by ``features_only=True``): stage outputs, NCHW."""
        if output_fmt != "NCHW":
            raise ValueError(f"UniNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        n = len(self.stages)
        if indices is None:
            idx = list(range(n))
        elif isinstance(indices, int):
            idx = list(range(n - indices, n))
        else:
            idx = [i % n for i in indices]
        feats: List[torch.Tensor] = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in idx:
                feats.append(x)
            if (intermediates_only or stop_early) and i == max(idx):
                break
        if intermediates_only:
            return feats
        return self.forward_head_features(x), feats

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        n = len(self.stages)
        idx = list(range(n - indices, n)) if isinstance(indices, int) else [i % n for i in indices]
        self.stages = self.stages[: max(idx) + 1]
        if prune_head and self.with_head:
            del self.head, self.classifier
            self.with_head = False
        return idx

    def forward_head_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) if self.with_head else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.forward_head_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits or not self.with_head else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_uninet(arch: Union[str, UniNetArch] = "g", **kwargs: Any) -> UniNet:
    """Plain constructor (no timm registry): ``build_uninet('g', num_classes=0, window_sizes=(28, 14))``."""
    return UniNet(arch, **kwargs)


# ----------------------------------------------------------------------------------------------
# timm registration: timm.create_model('uninet_g', features_only=True, out_indices=(2, 4, 5))
# Pretrained weights come from a local file only:
#   timm.create_model('uninet_g', pretrained=True, pretrained_cfg_overlay=dict(file='uninet_g_in22k.pth'))
# ----------------------------------------------------------------------------------------------
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model  # noqa: E402


def _cfg(num_classes: int = 21841, **kw: Any) -> Dict[str, Any]:
    cfg = dict(num_classes=num_classes, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
               first_conv="stem.conv", classifier="classifier", license="apache-2.0")
    cfg.update(kw)
    return cfg


default_cfgs = generate_default_cfgs({
    "uninet_g.in22k": _cfg(),
    "uninet_b0.untrained": _cfg(num_classes=1000),
    "uninet_tiny.untrained": _cfg(num_classes=1000, input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _filter_state_dict(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Accept timm-format (plain), mmdet-format ('backbone.' prefix) and pre-training checkpoints; drop
    head / classifier tensors the model does not have (features_only or detection)."""
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    own = model.state_dict()
    return {k: v for k, v in state_dict.items()
            if k in own or not (k.startswith("head.") or k.startswith("classifier."))}


def _create(variant: str, arch: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained:
        f = overlay.get("file")
        if not f:
            raise ValueError(f"{variant}: no public weights exist; pretrained=True needs a local file: "
                             f"timm.create_model('{variant}', pretrained=True, "
                             f"pretrained_cfg_overlay=dict(file='path/to/{variant}.pth'))")
        import os
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{variant}: pretrained weight file {f!r} does not exist")
    if kwargs.get("features_only"):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("with_head", False)
    return build_model_with_cfg(
        UniNet, variant, pretrained, arch=arch,
        pretrained_filter_fn=_filter_state_dict,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3, 4, 5)),
        **kwargs,
    )


@register_model
def uninet_g(pretrained: bool = False, **kwargs: Any) -> UniNet:
    """UniNet-G (AGVM Table 4): Fused-MBConv stages 0-3, transformer stages 4-5; about 1.08B parameters."""
    return _create("uninet_g", "g", pretrained, **kwargs)


@register_model
def uninet_b0(pretrained: bool = False, **kwargs: Any) -> UniNet:
    """UniNet-B0 widths / depths with this file's blocks (Fused-MBConv, no SE)."""
    return _create("uninet_b0", "b0", pretrained, **kwargs)


@register_model
def uninet_tiny(pretrained: bool = False, **kwargs: Any) -> UniNet:
    """A tiny member for tests and CPU runs (same code, small widths / depths)."""
    return _create("uninet_tiny", "tiny", pretrained, **kwargs)


def _main() -> None:
    """``python -m models.uninet``: parameter counts of the family, built on the meta device (no memory)."""
    for name in ARCHS:
        with torch.device("meta"):
            backbone = UniNet(name, with_head=False)
            full = UniNet(name, num_classes=21841 if name == "g" else 1000)
        print(f"uninet_{name}: backbone {count_params(backbone):,} parameters; "
              f"with head + {full.num_classes}-class classifier {count_params(full):,}")


if __name__ == "__main__":
    _main()
