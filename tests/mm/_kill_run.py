"""``python tests/mm/_kill_run.py CONFIG --work-dir D ...``: agvm.mm.train's CLI with two test-only changes:

- the training loader uses 2 persistent workers (the synthetic data defaults to 0): a real multi-process pipeline;
- ``AGVM_KILL=<moment>:<n>:<signal>`` makes the process send itself ``signal`` at the n-th occurrence of
  ``moment``: ``backward`` (mid-iteration, after the forward pass), ``write`` (mid-checkpoint-write: half the
  bytes of the n-th checkpoint are on disk), ``val`` (during the n-th evaluation batch).
The same command without AGVM_KILL is the resume (the resolved config is identical).
"""
import os
import signal
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import agvm._compat  # noqa: E402

agvm._compat.apply()
import agvm.mm.synthetic as synthetic  # noqa: E402

_apply = synthetic.apply_synthetic


def _with_workers(cfg, *args, **kwargs):
    _apply(cfg, *args, **kwargs)
    cfg.train_dataloader.update(num_workers=2, persistent_workers=True)


synthetic.apply_synthetic = _with_workers


def _arm(moment: str, n: int, sig: int) -> None:
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), sig)

    if moment == "backward":
        orig = torch.Tensor.backward

        def backward(self, *a, **k):
            if hit():
                die()
            return orig(self, *a, **k)

        torch.Tensor.backward = backward
    elif moment == "write":
        from mmengine.fileio.backends import LocalBackend

        put = LocalBackend.put

        def half_put(self, obj, filepath):
            if str(filepath).endswith(".pth.tmp") and hit():
                with open(filepath, "wb") as f:
                    f.write(obj[: len(obj) // 2])
                    f.flush()
                die()
            return put(self, obj, filepath)

        LocalBackend.put = half_put
    elif moment == "val":
        from mmengine.runner import ValLoop

        run_iter = ValLoop.run_iter

        def val_iter(self, idx, data_batch):
            if hit():
                die()
            return run_iter(self, idx, data_batch)

        ValLoop.run_iter = val_iter
    else:
        raise ValueError(f"unknown moment {moment!r}")


if os.environ.get("AGVM_KILL"):
    what, count, name = os.environ["AGVM_KILL"].split(":")
    _arm(what, int(count), getattr(signal, name))

from agvm.mm.train import main  # noqa: E402

main(sys.argv[1:])
