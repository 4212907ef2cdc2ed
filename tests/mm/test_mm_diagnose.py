"""agvm.mm.diagnose (the CLI on a config) and the fresh synthetic image stream it and the demo train on."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from _mm_helpers import SIZE, tiny_options

REPO = Path(__file__).resolve().parents[2]
FASTER = str(REPO / "configs/faster_rcnn/faster_rcnn_r50_bs32_agvm_sgd.py")
MASK = str(REPO / "configs/mask_rcnn/mask_rcnn_r50_bs32_agvm_sgd.py")

pytestmark = pytest.mark.mm


def _options(root, **extra):
    return tiny_options("faster_rcnn", root, synthetic_stream=dict(length=64, seed=5), **extra)


def test_stream_gives_fresh_deterministic_images(synthetic_root):
    from mmengine.registry import DATASETS, init_default_scope

    from agvm.mm.train import load_config

    cfg = load_config(FASTER, _options(synthetic_root))
    assert cfg.train_dataloader.dataset.type == "SyntheticStream"
    assert cfg.val_dataloader.dataset.type == "CocoDataset"  # evaluation stays on the fixed held-out images
    init_default_scope("mmdet")
    ds = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(ds) == 64
    a, a2, b = ds[3], ds[3], ds[4]
    same = lambda x, y: torch.equal(x, y) or torch.equal(x, y.flip(-1))  # noqa: E731 (the pipeline's random flip)
    assert same(a["inputs"], a2["inputs"]) and not same(a["inputs"], b["inputs"])
    assert tuple(a["inputs"].shape[1:]) == (SIZE, SIZE)
    boxes = a["data_samples"].gt_instances.bboxes.tensor
    labels = a["data_samples"].gt_instances.labels
    assert len(boxes) >= 1 and (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert labels.max() < 3
    other = load_config(FASTER, tiny_options("faster_rcnn", synthetic_root, synthetic_stream=dict(length=64, seed=6)))
    assert not same(DATASETS.build(other.train_dataloader.dataset)[3]["inputs"], a["inputs"])
    with pytest.raises(IndexError):
        ds[64]


def test_stream_refuses_masks(synthetic_root):
    from agvm.mm.train import load_config

    with pytest.raises(ValueError, match="boxes only"):
        load_config(MASK, tiny_options("mask_rcnn", synthetic_root, synthetic_stream=dict(length=8)))


@pytest.mark.slow
def test_diagnosis_of_two_images_is_their_gradients(synthetic_root, tmp_path):
    """With 2 images |mu|^2 = r1.r2 and s2 = |r1 - r2|^2 / 2: the CLI's images, per-image losses and sums checked
    against the two gradients taken by hand; JSON and PNG written; frozen modules not diagnosed."""
    from mmengine.runner import set_random_seed

    from agvm.mm.diagnose import _loss, build, run

    opts = _options(synthetic_root, **{"optim_wrapper.paramwise_cfg.frozen_modules": ["rpn_head"]})
    torch.manual_seed(0)
    res = run(FASTER, 2, out=str(tmp_path / "d"), cfg_options=opts, seed=3)
    assert list(res["modules"]) == ["backbone", "neck", "bbox_head"] and res["num_images"] == 2
    torch.manual_seed(0)
    _, model, dataset, collate, _ = build(FASTER, opts)
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(3))[:2].tolist()
    grads = []
    for i in picked:
        model.zero_grad(set_to_none=True)
        set_random_seed(3 * 1_000_003 + i)  # as run() seeds each image (flips, RoI samples)
        _loss(model, collate([dataset[i]])).backward()
        grads.append({m: torch.cat([p.grad.reshape(-1).double() for n, p in model.named_parameters()
                                    if p.grad is not None and n.startswith(prefix)])
                      for m, prefix in (("backbone", "backbone."), ("neck", "neck."), ("bbox_head", "roi_head."))})
    assert not any(p.requires_grad for p in model.rpn_head.parameters())
    for m, info in res["modules"].items():
        r1, r2 = grads[0][m], grads[1][m]
        assert info["signal"] == pytest.approx(float(r1 @ r2), rel=1e-3, abs=1e-9)
        assert info["noise"] == pytest.approx(float((r1 - r2).pow(2).sum() / 2), rel=1e-3)
    saved = json.loads((tmp_path / "d" / "diagnosis.json").read_text())
    assert saved["modules"]["neck"]["nsr"] == pytest.approx(res["modules"]["neck"]["nsr"])
    assert (tmp_path / "d" / "diagnosis.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cli_with_validation(synthetic_root, tmp_path, capsys):
    from agvm.mm.diagnose import main

    opts = [f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in _options(synthetic_root).items()
            if k not in ("param_scheduler", "synthetic_stream")]
    opts.append("synthetic_stream.length=64")
    assert main([FASTER, "--images", "4", "--validate", "2,4", "--repeats", "2", "--out", str(tmp_path),
                 "--cfg-options", *opts]) == 0
    res = json.loads((tmp_path / "diagnosis.json").read_text())
    rows = res["validation"]["rows"]
    assert {r["batch"] for r in rows} == {2, 4} and all(0 <= r["measured"] <= 2 for r in rows)
    assert all(r["pairs"] == 6 and r["measured_se"] >= 0 for r in rows)  # 4 halves per batch, all 6 pairs
    assert res["validation"]["median_rel_error"] is not None
    out = capsys.readouterr().out
    assert "diagnose: 4/4 images" in out and "median relative error" in out and "reaches 2x" in out


def test_errors(synthetic_root, tmp_path):
    from agvm.mm.diagnose import run

    with pytest.raises(ValueError, match="--images must be >= 2"):
        run(FASTER, 1, out=str(tmp_path), cfg_options=_options(synthetic_root))
    with pytest.raises(ValueError, match="needs 70 distinct training images"):
        run(FASTER, 70, out=str(tmp_path), cfg_options=_options(synthetic_root))
    with pytest.raises(ValueError, match=r"--validate takes even batch sizes >= 2 .* got \[4, 3\]"):
        run(FASTER, 4, out=str(tmp_path), cfg_options=_options(synthetic_root), validate_batches=(4, 3))


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(synthetic_root, tmp_path):
    """2 gloo ranks, 2 images each, sums all-reduced: the one-process diagnosis of the same 4 images; the validation's
    2 pairs of halves (one per rank, each half seeded) give the one-process all-pairs Phi."""
    import torch.multiprocessing as mp

    import _mm_diagnose_worker
    from agvm.mm.diagnose import build, run

    ckpt = str(tmp_path / "weights.pth")  # every process at the same weights
    torch.save({"state_dict": build(FASTER, _options(synthetic_root))[1].state_dict()}, ckpt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_mm_diagnose_worker.run, args=(2, port, FASTER, _options(synthetic_root), ckpt, str(tmp_path)),
                       nprocs=2, start_method="spawn")
    ref = run(FASTER, 4, ckpt, out=str(tmp_path / "one"), cfg_options=_options(synthetic_root),
              validate_batches=(2,), repeats=2, seed=1)
    one = {r["module"]: r for r in ref["validation"]["rows"]}
    assert len(one) == 4 and all(r["pairs"] == 6 for r in one.values())
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for r in got["validation"]:
            assert r["measured"] == pytest.approx(one[r["module"]]["measured"], rel=1e-4)
            assert r["measured_se"] == pytest.approx(one[r["module"]]["measured_se"], rel=1e-3)
        for m, (signal, noise) in got["sums"].items():
            assert signal == pytest.approx(ref["modules"][m]["signal"], rel=1e-4, abs=1e-9)
            assert noise == pytest.approx(ref["modules"][m]["noise"], rel=1e-4)
    assert np.isfinite([ref["modules"][m]["noise"] for m in ref["modules"]]).all()


@pytest.mark.slow
def test_fig1_4_entry_point_diagnoses_before_and_after(synthetic_root, tmp_path):
    """slurm.entry_points:train_with_diagnosis (experiments/fig1_4_variance): the initial weights and the final
    checkpoint are diagnosed next to the run's variance log; a second call (a requeue) keeps both."""
    from agvm.mm.runner import latest_checkpoint
    from results.figures import load_variance_log
    from slurm.entry_points import train_with_diagnosis

    work = tmp_path / "run"
    opts = _options(synthetic_root, **{"train_dataloader.batch_size": 2})
    opts["synthetic_stream"] = dict(length=4, seed=5)  # 2 epochs of 2 steps
    metrics = train_with_diagnosis(FASTER, str(work), opts, images=2)
    assert json.loads((work / "metrics.json").read_text()) == metrics  # trained through agvm.mm.train.train
    init = json.loads((work / "diagnosis_init" / "diagnosis.json").read_text())
    final = json.loads((work / "diagnosis_final" / "diagnosis.json").read_text())
    assert init["checkpoint"] is None and final["checkpoint"] == latest_checkpoint(str(work))
    assert 2 in final["batches"] and set(final["modules"]) == {"backbone", "neck", "rpn_head", "bbox_head"}
    stamp = (work / "diagnosis_final" / "diagnosis.json").stat().st_mtime
    train_with_diagnosis(FASTER, str(work), opts, images=2)
    assert (work / "diagnosis_final" / "diagnosis.json").stat().st_mtime == stamp
    assert set(load_variance_log(work).predicted) == {"diagnosis_init", "diagnosis_final"}
