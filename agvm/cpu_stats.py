"""The statistics of a measurement step as one C++ kernel on a CPU (``agvm/csrc/module_stats.cpp``).

torch's eager kernels need three reductions (and for AdamW a square root, a reciprocal and two products) per
chunk, each a separate pass; this kernel reads every gradient element once and writes nothing but the sums.
It is built on first use with torch's C++ extension builder (a C++ compiler and ninja; about a minute, then
cached in ``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions) and compiled for the CPU capability torch
reports (AVX2 / AVX-512 builds get AVX2 and FMA instructions, others none), so one cache serves mixed nodes.
``AGVM_CPU_STATS=0`` turns it off; when the build fails, ``agvm.variance`` warns once and uses torch's kernels.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

ENABLED = os.environ.get("AGVM_CPU_STATS", "1") != "0"
_SOURCE = Path(__file__).with_name("csrc") / "module_stats.cpp"
_module = None


def kernel():
    """The built extension module (``module_stats_cpu``); raises when it cannot be built."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load

        bindir = os.path.dirname(sys.executable)  # pip's ninja lives beside the interpreter of a virtual env
        if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        capability = torch.backends.cpu.get_cpu_capability()
        logging.getLogger("agvm").info("AGVM: loading the C++ statistics kernel (the first build takes about a minute)")
        flags = ["-O3", "-fopenmp-simd", "-fno-math-errno"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
        _module = load(name=f"agvm_module_stats_{capability.lower()}", sources=[str(_SOURCE)], extra_cflags=flags,
                       verbose=False)
    return _module
