"""Exact resume: per-sample seeded data (workers, skip), and a training run killed at many moments (SIGKILL and
SIGUSR2, mid-iteration, mid-checkpoint-write, before the rename, during evaluation, a damaged newest checkpoint)
and resumed with the same command each time ends bit-identical to the uninterrupted run."""
import os
import os.path as osp
import random
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from _mm_helpers import tiny_options

pytestmark = pytest.mark.mm
HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
FASTER = osp.join(ROOT, "configs", "faster_rcnn", "faster_rcnn_r50_bs32_agvm_sgd.py")


class _Augmenting(torch.utils.data.Dataset):
    """Each item draws from the three global generators, like mmdet's random flip / crop."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return (i, random.random(), float(np.random.rand()), float(torch.rand(())))


def _loader(workers):
    from mmengine.dataset import DefaultSampler

    from agvm.mm.resume import seeded_loader

    loader = torch.utils.data.DataLoader(_Augmenting(), batch_size=3, sampler=DefaultSampler(_Augmenting(), seed=0),
                                         num_workers=workers, persistent_workers=workers > 0,
                                         collate_fn=lambda b: b)
    return seeded_loader(loader, seed=0)


def _epoch(loader, epoch, skip=0):
    loader.batch_sampler.sampler.set_epoch(epoch)
    loader.batch_sampler.skip = skip
    return [item for batch in loader for item in batch]


def test_seeded_loader_same_for_any_workers_skip_and_main_rng():
    main, persistent = _loader(0), _loader(2)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    e0, e1 = _epoch(main, 0), _epoch(main, 1)
    assert torch.equal(torch.get_rng_state(), before)  # the model's generator is untouched by the data
    assert sorted(i for i, *_ in e0) == list(range(10)) and e0 != e1  # reshuffled and re-drawn per epoch
    assert [x[1:] for x in sorted(e0)] != [x[1:] for x in sorted(e1)]
    assert _epoch(persistent, 0) == e0 and _epoch(persistent, 1) == e1  # workers and prefetch change nothing
    assert _epoch(persistent, 1, skip=2) == e1[6:] and _epoch(main, 0, skip=1) == e0[3:]  # skipped, not replayed
    assert _epoch(persistent, 1) == e1  # skip lasts one pass


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    elif isinstance(obj, (int, float)):
        out[prefix] = torch.tensor(obj)
    return out


def _state(path):
    """Everything a checkpoint holds that determines the rest of the run (weights, optimizer and AGVM state,
    schedulers, every generator, position)."""
    from agvm.mm.checkpoint import read

    c = read(path)
    return _tensors({"model": c["state_dict"], "optimizer": c["optimizer"], "sched": c["param_schedulers"],
                     "rng": c["meta"]["rng_state"], "epoch": c["meta"]["epoch"], "iter": c["meta"]["iter"]})


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _kill_runner(config):
    """run(work_dir, kill=None): tests/mm/_kill_run.py on ``config`` (AGVM_KILL=kill arms one kill)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def run(work, kill=None):
        e = dict(env, AGVM_KILL=kill) if kill else env
        cmd = [sys.executable, osp.join(HERE, "_kill_run.py"), config, "--work-dir", str(work),
               "--cfg-options", "synthetic_image_size=64"]
        return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)

    return run


# A narrow Faster R-CNN (ResNet-18 at 16 base channels, 32-channel FPN and heads): small checkpoints, quick steps.
NARROW = {"model.backbone.base_channels": 16, "model.neck.in_channels": [16, 32, 64, 128],
          "model.neck.out_channels": 32, "model.rpn_head.in_channels": 32, "model.rpn_head.feat_channels": 32,
          "model.roi_head.bbox_roi_extractor.out_channels": 32, "model.roi_head.bbox_head.in_channels": 32,
          "model.roi_head.bbox_head.fc_out_channels": 64}


@pytest.mark.slow
def test_killed_runs_resume_bit_identically(synthetic_root, tmp_path):
    """Faster R-CNN (random flip, random RoI sampler), 3 epochs x 2 iterations, 2 persistent workers, an
    iteration checkpoint every iteration (mid-epoch ones too), evaluation after epochs 2 and 3. One work dir is
    killed three times (each run the same command), then its newest checkpoint is damaged; every checkpoint and the
    final metrics equal the uninterrupted run's bit for bit."""
    from agvm.mm.train import load_config, train

    cfg = load_config(FASTER, tiny_options(
        "faster_rcnn", synthetic_root, **NARROW, **{"train_cfg.max_epochs": 3, "train_cfg.val_interval": 2,
                                                   "randomness": {"seed": 0},
                                                   "default_hooks.checkpoint": dict(
                                                       type="CheckpointHook", by_epoch=False, interval=1,
                                                       max_keep_ckpts=-1)}))
    assert any(t["type"] == "RandomFlip" for t in cfg.train_dataloader.dataset.pipeline)
    config = str(tmp_path / "tiny_faster.py")
    cfg.dump(config)
    run = _kill_runner(config)

    ref, work = tmp_path / "ref", tmp_path / "killed"
    assert run(ref).returncode == 0
    assert re.search(r"num_workers\s*=\s*2", (ref / "tiny_faster.py").read_text())  # the run's dumped config
    kills = [("backward:3:SIGKILL", "mid-iteration 2 (second half's backward: iteration 1 is one full-batch pass, interval 2)", None),
             ("write:2:SIGUSR2", "half of iter_3.pth written", "resuming epoch 1 at iteration 2 of 2"),
             ("val:1:SIGKILL", "evaluation after epoch 2", "resuming after the last iteration of epoch 1")]
    for kill, what, said in kills:
        p = run(work, kill)
        assert p.returncode == -getattr(signal, kill.split(":")[2]), (what, p.returncode, p.stderr[-2000:])
        assert said is None or said in p.stdout + p.stderr, what
    assert not (work / "iter_5.pth").exists()
    data = bytearray((work / "iter_4.pth").read_bytes())  # damage the newest: the resume falls back to iter_3
    data[len(data) // 2: len(data) // 2 + 4096] = os.urandom(4096)
    (work / "iter_4.pth").write_bytes(bytes(data))
    p = run(work)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "iter_4.pth is damaged" in out and "falling back" in out
    assert "resuming epoch 2 at iteration 2 of 2" in out  # from iter_3: mid-epoch, no replay
    for n in range(1, 7):
        assert _identical(_state(ref / f"iter_{n}.pth"), _state(work / f"iter_{n}.pth")), n
    assert (ref / "metrics.json").read_text() == (work / "metrics.json").read_text()

    # a finished run's own checkpoint (message hub and all) serves as load_from of a new run: strict, weights_only
    from agvm.mm.runner import AGVMRunner

    c = load_config(config, {"synthetic_image_size": 64})
    c.work_dir, c.load_from, c.resume = str(tmp_path / "load_from"), str(ref / "iter_6.pth"), False
    c.visualizer.name = "load_from_check"
    runner = AGVMRunner.from_cfg(c)
    runner.load_checkpoint(c.load_from)
    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    assert _identical(_tensors(model.state_dict()), _tensors(torch.load(ref / "iter_6.pth")["state_dict"]))

    # the same command with another lr: refused with the difference, unless asked for
    from agvm.mm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"optim_wrapper\.optimizer\.lr: 0\.04 -> 0\.02.*--allow-config-change"):
        train(config, str(work), {"synthetic_image_size": 64, "optim_wrapper.optimizer.lr": 0.02})


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo SHOULD-NOT-RUN > boom.txt",))


@pytest.mark.slow
def test_iteration_based_run_resumes_without_loading_the_trained_batches(synthetic_root, tmp_path):
    """Semantic FPN (mmseg's iteration-based loop, InfiniteSampler, random crop/flip), 4 iterations, a checkpoint
    every iteration, 2 persistent workers: killed mid-iteration 3 and resumed, it skips 2 batches by index (mmengine's
    loop would load them) and every checkpoint and the metrics equal the uninterrupted run's."""
    from agvm.mm.train import load_config

    seg = osp.join(ROOT, "configs", "semantic_fpn", "semantic_fpn_r50_bs1024_agvm_sgd.py")
    cfg = load_config(seg, tiny_options("semantic_fpn", synthetic_root, **{
        "randomness": {"seed": 0}, "default_hooks.checkpoint.interval": 1, "default_hooks.checkpoint.max_keep_ckpts": -1}))
    assert cfg.train_dataloader.sampler.type == "InfiniteSampler"
    config = str(tmp_path / "tiny_seg.py")
    cfg.dump(config)
    run = _kill_runner(config)

    ref, work = tmp_path / "ref", tmp_path / "killed"
    assert run(ref).returncode == 0
    p = run(work, "backward:4:SIGKILL")  # iterations 1 and 3 one pass each, 2 two halves (interval 2): mid-iteration 3
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (work / "iter_2.pth").exists() and not (work / "iter_3.pth").exists()
    p = run(work)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "the first 2 batches are skipped by index without loading them" in out
    for n in range(1, 5):
        assert _identical(_state(ref / f"iter_{n}.pth"), _state(work / f"iter_{n}.pth")), n
    assert (ref / "metrics.json").read_text() == (work / "metrics.json").read_text()


def test_planted_checkpoint_is_refused_not_run(synthetic_root, tmp_path, monkeypatch):
    """A planted epoch_9.pth (the highest number wins) whose unpickling would run code: resume refuses it."""
    from agvm.mm.checkpoint import RefusedCheckpoint
    from agvm.mm.train import train

    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"meta": {"epoch": 9, "iter": 18}, "state_dict": {}, "x": _Boom()}, work / "epoch_9.pth")
    with pytest.raises(RefusedCheckpoint, match="epoch_9.pth refused.*--unsafe-load"):
        train(FASTER, str(work), tiny_options("faster_rcnn", synthetic_root))
    assert not (tmp_path / "boom.txt").exists()
