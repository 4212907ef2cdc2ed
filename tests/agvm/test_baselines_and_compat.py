import subprocess
import sys

import pytest
import torch
from torch import nn

import agvm
import agvm._compat as compat


def _model():
    torch.manual_seed(0)
    m = nn.Module()
    m.backbone = nn.Linear(4, 4)
    m.neck = nn.Linear(4, 2)
    return m


@pytest.mark.parametrize("name", ["sgd", "adamw", "agvm_sgd", "agvm_adamw", "lars", "lamb", "pmd_lamb"])
def test_every_optimizer_of_the_comparison_builds_from_agvm_groups_and_steps(name):
    model = _model()
    opt = agvm.create_optimizer(name, agvm.param_groups(model), lr=0.01)
    before = [p.clone() for p in model.parameters()]
    model.neck(model.backbone(torch.randn(8, 4))).square().mean().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lars_and_lamb_are_timms():
    import timm.optim

    assert isinstance(agvm.create_optimizer("lars", _model().parameters(), lr=0.1), timm.optim.Lars)
    assert isinstance(agvm.create_optimizer("LAMB", _model().parameters(), lr=0.1), timm.optim.Lamb)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        agvm.create_optimizer("adam", _model().parameters())


@pytest.mark.mm
def test_nms_reference_matches_mmcv():
    from mmcv.ops import nms as mmcv_nms

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(500, 4, generator=g) * 100
    boxes[:, 2:] += boxes[:, :2]
    scores = torch.rand(500, generator=g)
    for thr in (0.3, 0.5, 0.7):
        assert torch.equal(compat.nms_reference(boxes, scores, thr), mmcv_nms(boxes, scores, thr)[1])
    assert compat.nms_reference(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


@pytest.mark.mm
@pytest.mark.skipif(torch.version.cuda is not None, reason="the shim is for CPU torch builds")
def test_torchvision_imports_and_its_ops_work_after_apply_on_cpu_torch():
    from torchvision.ops import nms, roi_align
    from mmcv.ops import roi_align as mmcv_roi_align

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    x = torch.randn(2, 3, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 7.0], [1, 2.0, 3.0, 15.0, 14.5]])
    torch.testing.assert_close(roi_align(x, rois, (4, 4), 1.0, 2, True),
                               mmcv_roi_align(x, rois, (4, 4), 1.0, 2, "avg", True), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_shim_is_needed_here_iff_cpu_torch_and_plain_import_fails():
    """Without apply() torchvision must fail on CPU torch (else the shim is dead code), and work with it."""
    code = "import torchvision"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    shimmed = subprocess.run([sys.executable, "-c", "import agvm._compat as c; c.apply(); " + code],
                             capture_output=True, text=True)
    assert shimmed.returncode == 0, shimmed.stderr
    if torch.version.cuda is None:
        assert plain.returncode != 0 and "torchvision::nms" in plain.stderr
    else:
        assert plain.returncode == 0


def test_numpy_meta_data_loads_with_weights_only():
    """mmengine checkpoints keep numpy scalars / arrays / dtypes in their meta data."""
    import io

    import numpy as np

    buf = io.BytesIO()
    meta = {"seed": np.int64(3), "hist": np.array([1.5, 2.0]), "dtype": np.dtype("float32")}
    torch.save({"meta": meta, "w": torch.ones(2)}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert torch.equal(ckpt["w"], torch.ones(2)) and ckpt["meta"]["seed"] == 3
    assert ckpt["meta"]["hist"].tolist() == [1.5, 2.0] and ckpt["meta"]["dtype"] == np.float32
