"""One home for checkpoint files: write (atomic, with a checksum), verify, read (no code from the file), remap,
strict load, the random-number-generator state and the resolved config a checkpoint carries.

Used by training resume and ``load_from`` (``agvm.mm.runner``), evaluation (``agvm.mm.evaluate``) and the stage
hand-over (``models.handover``).

- ``save(obj, path)`` / ``finalize(tmp, path)``: the file is written to ``<path>.tmp``, its SHA-256 goes to the
  sidecar ``<path>.sha256`` (``sha256sum -c`` format), then the file is renamed into place: a checkpoint that exists
  is complete and has its checksum.
- ``verify(path)``: the sidecar's SHA-256 when there is one, else the CRC-32 that torch's zip format stores for every
  record (torch itself does not check it when loading). A file that fails is ``DamagedCheckpoint``.
- ``read(path, unsafe=False)``: verify, then ``torch.load(weights_only=True)``. Allowed besides tensors and
  containers: the numpy types mmengine keeps in its meta data and mmengine's ``HistoryBuffer`` with its own
  statistics methods (``agvm._compat``). A file that needs anything else is ``RefusedCheckpoint``: the message
  names the object and ``--unsafe-load`` (``torch.load(weights_only=False)``, only for files you trust).
- ``latest_intact(work_dir)``: the newest ``iter_N.pth`` / ``epoch_N.pth`` that verifies; damaged newer ones are
  skipped with a warning.
- ``load_into_model``: strict; missing, unexpected and mis-shaped keys are one error that lists them.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import pickle
import random
import re
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["CheckpointError", "DamagedCheckpoint", "RefusedCheckpoint", "save", "finalize", "verify", "read",
           "latest_intact", "extract_state_dict", "detect_source", "remap_state_dict", "rpn_softmax_to_sigmoid",
           "load_into_model", "rng_state", "set_rng_state", "config_snapshot", "config_diff", "MMDET2_RULES"]

UNSAFE_FLAG = "--unsafe-load"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class DamagedCheckpoint(CheckpointError):
    """The file is truncated, empty, or its bytes differ from those written (checksum / CRC mismatch)."""


class RefusedCheckpoint(CheckpointError):
    """The file is intact but stores Python objects that safe loading does not rebuild."""


# ---------------------------------------------------------------------------------------------------------------
# Writing and verifying
# ---------------------------------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path) -> str:
    return str(path) + ".sha256"


def finalize(tmp: str, path: str) -> None:
    """Record ``tmp``'s SHA-256 in ``path``'s sidecar, then rename ``tmp`` to ``path`` (both atomic)."""
    side = _sidecar(path)
    with open(side + ".tmp", "w") as f:
        f.write(f"{_sha256(tmp)}  {osp.basename(path)}\n")
    os.replace(side + ".tmp", side)
    os.replace(tmp, path)


def save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically, with a checksum sidecar; nothing is left behind on failure."""
    path = str(path)
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        finalize(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


_verified: Dict[str, Tuple[int, int]] = {}  # path -> (size, mtime_ns) of a file that verified


def verify(path) -> str:
    """Check ``path`` against its sidecar SHA-256, else its zip records' CRC-32; returns how it was checked
    ('sha256', 'crc32' or 'none' for a legacy non-zip file). Raises DamagedCheckpoint."""
    path = str(path)
    if not osp.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    st = os.stat(path)
    if st.st_size == 0:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: the file is empty (0 bytes; the save was interrupted); "
                                "use another checkpoint")
    side = _sidecar(path)
    if osp.isfile(side):
        with open(side) as f:
            expected = (f.read().split() or [""])[0]
        if _verified.get(path) == (st.st_size, st.st_mtime_ns):
            return "sha256"
        actual = _sha256(path)
        if actual != expected:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: its SHA-256 differs from the one recorded when it "
                                    f"was written ({side}); the file is truncated or corrupted: use another checkpoint")
        _verified[path] = (st.st_size, st.st_mtime_ns)
        return "sha256"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"PK":  # a zip whose end (central directory) is missing: truncated
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: truncated or corrupted ({st.st_size} bytes, the "
                                    "zip directory at its end is missing); use another checkpoint")
        return "none"  # safetensors, or torch's legacy (pre-1.6) format: nothing to check
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: truncated or corrupted ({type(err).__name__}: "
                                f"{str(err)[:120]}); use another checkpoint") from None
    if bad is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: record {bad} fails its CRC-32 (truncated or "
                                "corrupted); use another checkpoint")
    return "crc32"


_REFUSAL = re.compile(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+|call reduce for unrecognized "
                      r"function [^\n]*|Can only (build|create new object)[^\n]*|refused [^\n]*)")


def _first_line(err: BaseException) -> str:
    msg = str(err).strip()
    if "WeightsUnpickler error:" in msg:  # torch wraps the real reason in a long weights_only explanation
        msg = msg.split("WeightsUnpickler error:", 1)[1].strip()
    first = msg.splitlines()[0].split(". ")[0].rstrip(".") if msg else type(err).__name__
    return first[:200]


def read(path, unsafe: bool = False, check: bool = True) -> Any:
    """The object stored in ``path`` (``.pth``/``.pt``/``.ckpt`` via torch.load, or ``.safetensors``), verified first
    (``check``) and loaded with ``weights_only=True`` unless ``unsafe``."""
    path = str(path)
    checked = verify(path) if check else "none"
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types for bad headers / lengths
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: truncated or corrupted "
                                    f"({type(err).__name__}: {_first_line(err)})") from None
    import agvm._compat

    agvm._compat.apply()  # the minimal allow-list: numpy meta data, mmengine's HistoryBuffer
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as err:
        reason = _REFUSAL.search(str(err))
        if reason or checked != "none":
            why = reason.group(0) if reason else _first_line(err)
            raise RefusedCheckpoint(
                f"checkpoint {path} refused: it stores Python objects that safe loading (weights_only=True) does not "
                f"rebuild ({why}); no code from it was run. If you trust the file, pass {UNSAFE_FLAG}") from None
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: truncated or corrupted "
                                f"({type(err).__name__}: {_first_line(err)}); use another checkpoint") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError,
            ImportError, IndexError, TypeError) as err:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: truncated or corrupted ({os.path.getsize(path)} bytes; "
                                f"{type(err).__name__}: {_first_line(err)}); use another checkpoint") from None


_CKPT = re.compile(r"^(epoch|iter)_(\d+)\.pth$")


def candidates(work_dir: str) -> List[str]:
    """``iter_N.pth`` / ``epoch_N.pth`` in ``work_dir``, newest first (by N, then modification time)."""
    if not osp.isdir(work_dir):
        return []
    found = []
    for name in os.listdir(work_dir):
        m = _CKPT.match(name)
        if m:
            found.append((int(m.group(2)), osp.getmtime(osp.join(work_dir, name)), name))
    return [osp.join(work_dir, name) for _, _, name in sorted(found, reverse=True)]


def latest_intact(work_dir: str, warn=None) -> Optional[str]:
    """The newest checkpoint in ``work_dir`` that passes ``verify``; each damaged newer one is reported through
    ``warn`` (default: warnings.warn) and skipped. None if there is none."""
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    found = candidates(work_dir)
    for path in found:
        try:
            verify(path)
            return path
        except DamagedCheckpoint as err:
            warn(f"{err}; falling back to the previous checkpoint")
    if found:
        warn(f"none of the {len(found)} checkpoints in {work_dir} is intact: training starts from the beginning")
    return None


# ---------------------------------------------------------------------------------------------------------------
# State dicts: extract, remap, strict load
# ---------------------------------------------------------------------------------------------------------------

# (pattern, replacement, why). Applied in order to every key of an mmdet 2.x / mmcv 1.x checkpoint.
MMDET2_RULES: Tuple[Tuple[str, str, str], ...] = (
    (r"^module\.", "", "model wrapper prefix (DDP / the authors' AgvmDistModule saved without unwrapping)"),
)
# A two-stage mmdet 1.x checkpoint keeps its box / mask heads at the top level; 2.x moved them into roi_head.
_MMDET1_TWO_STAGE = re.compile(r"^(bbox_head|mask_head)\.(fc_cls|fc_reg|shared_fcs|convs|conv_logits)")


def extract_state_dict(obj: Any, path: str = "checkpoint") -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, meta) from an mmengine / mmcv checkpoint, a timm-style ``{'model': ...}`` or a plain dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a state_dict or a checkpoint holding one), got "
                              f"{type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            sd = obj[key]
            break
    else:
        sd = obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {sorted(obj)[:10]}); is this a model checkpoint?")
    return tensors, meta


def detect_source(state_dict: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> str:
    """'mmdet1', 'mmdet2' (mmcv 1.x layout), 'mmengine' or 'plain' (timm / torch state dict)."""
    version = str(meta.get("mmdet_version", ""))
    if version.startswith("1."):
        return "mmdet1"
    if version.startswith("2.") or str(meta.get("mmcv_version", "")).startswith("1.") or "CLASSES" in meta:
        return "mmdet2"
    if "mmengine_version" in meta or "dataset_meta" in meta or meta:
        return "mmengine"
    return "plain"


def rpn_softmax_to_sigmoid(weight: torch.Tensor, bias: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Convert a softmax RPN classifier (2 channels per anchor: foreground, background, as mmdet >= 2.5 orders
    them) into the sigmoid one (1 channel per anchor) with identical objectness:
    sigmoid(z_fg - z_bg) = softmax(z_fg, z_bg)[fg], and the difference of two convolutions is one convolution."""
    w = weight.reshape(weight.shape[0] // 2, 2, *weight.shape[1:])
    b = None if bias is None else bias.reshape(-1, 2)
    return w[:, 0] - w[:, 1], None if b is None else b[:, 0] - b[:, 1]


def remap_state_dict(state_dict: Dict[str, torch.Tensor], source: str, model_keys: Iterable[str] = (),
                     model_state: Optional[Dict[str, torch.Tensor]] = None
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Keys renamed for this repository's (mmdet 3.x) models; returns (new state dict, notes on what changed).

    Besides the prefix rules, the authors' configs train the RPN with a softmax classifier (``use_sigmoid=False``:
    2 logits per anchor); when the config's model has the sigmoid RPN (1 logit per anchor) the classifier is
    converted exactly (``rpn_softmax_to_sigmoid``)."""
    model_keys = set(model_keys) | set(model_state or {})
    notes: List[str] = []
    two_stage = any(k.startswith("roi_head.") for k in model_keys)
    if source == "mmdet1" or (two_stage and any(_MMDET1_TWO_STAGE.match(k) for k in state_dict)
                              and not any(k.startswith("roi_head.") for k in state_dict)):
        raise CheckpointError(
            "this is an mmdetection 1.x checkpoint (box/mask heads outside roi_head, background class first): "
            "convert it with mmdetection 2.x's tools/model_converters/upgrade_model_version.py, then evaluate")
    out: Dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    for k, v in state_dict.items():
        new = k
        for pattern, repl, _ in (MMDET2_RULES if source in ("mmdet2", "plain", "mmengine") else ()):
            changed = re.sub(pattern, repl, new)
            if changed != new:
                counts[pattern] += 1
                new = changed
        if new in out:
            raise CheckpointError(f"two checkpoint keys map to {new!r} after removing wrapper prefixes")
        out[new] = v
    notes += [f"{n} keys: removed '{p.strip('^').replace(chr(92), '')}'" for p, n in counts.items()]
    w_key, b_key = "rpn_head.rpn_cls.weight", "rpn_head.rpn_cls.bias"
    if model_state and w_key in out and w_key in model_state \
            and out[w_key].shape[0] == 2 * model_state[w_key].shape[0] \
            and out[w_key].shape[1:] == model_state[w_key].shape[1:]:
        out[w_key], b = rpn_softmax_to_sigmoid(out[w_key], out.get(b_key))
        if b is not None:
            out[b_key] = b
        notes.append("rpn_head.rpn_cls: softmax RPN classifier (2 logits per anchor) converted to the config's "
                     "sigmoid RPN (fg - bg logit; identical objectness scores)")
    return out, notes


def _summarise(keys: Sequence[str], limit: int = 6) -> str:
    listed = "; ".join(list(keys)[:limit]) + (f"; ... {len(keys) - limit} more" if len(keys) > limit else "")
    return f"{len(keys)} ({listed})"


def load_into_model(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str = "checkpoint",
                    fresh: Sequence[str] = ()) -> None:
    """Strict load: any missing, unexpected or mis-shaped key is one error line that lists them.

    Not errors: BatchNorm ``num_batches_tracked`` counters missing from older checkpoints, and model keys matching
    one of the ``fresh`` regexes (parts a stage hand-over says start from their initialisation)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")
               and not any(re.search(p, k) for p in fresh)]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys (in the model, not in the checkpoint) {_summarise(missing)}" if missing else "",
                 f"unexpected keys (in the checkpoint, not in the model) {_summarise(unexpected)}"
                 if unexpected else "", f"shape mismatches {_summarise(shapes)}" if shapes else ""]
        raise CheckpointError(f"{what} does not match the config's model: " + ", ".join(p for p in parts if p)
                              + ". Use the config the checkpoint was trained with (backbone, num_classes, pipeline)")
    full = dict(state_dict)
    for k in own:
        if k not in full:  # num_batches_tracked and fresh parts keep the model's own values
            full[k] = own[k]
    model.load_state_dict(full, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# Random-number-generator state and the resolved config
# ---------------------------------------------------------------------------------------------------------------

def rng_state() -> Dict[str, Any]:
    """This process's Python, numpy, torch CPU and CUDA generator states, as plain data and uint8 tensors."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": ("MT19937", key.tolist(), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys a resumed run sets for itself: not part of the comparison.
_RUN_KEYS = ("work_dir", "load_from", "resume", "launcher", "visualizer.name")


def config_snapshot(cfg) -> str:
    """The resolved config as JSON text (stored in a checkpoint's meta; compared on resume, never executed)."""
    return json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), sort_keys=True, default=repr)


def _flatten(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict):
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_diff(saved: str, current: str) -> List[str]:
    """``key: saved -> current`` for every setting that differs between two ``config_snapshot`` texts."""
    a, b = _flatten(json.loads(saved)), _flatten(json.loads(current))
    out = []
    for k in sorted(set(a) | set(b)):
        if k in _RUN_KEYS or a.get(k, "<unset>") == b.get(k, "<unset>"):
            continue
        out.append(f"{k}: {json.dumps(a.get(k, '<unset>'))} -> {json.dumps(b.get(k, '<unset>'))}")
    return out
