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


def _lamb_step(**kw):
    """One LAMB step on a 2-element tensor whose gradient (global norm 1000) is far above timm's clip of 1.0;
    eps=1 makes Adam's normalisation depend on the gradient's scale, so a clip changes the update's direction."""
    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = agvm.create_optimizer("lamb", [w], lr=0.1, eps=1.0, weight_decay=0.0, **kw)
    w.grad = torch.tensor([1000.0, 1.0])
    opt.step()
    return (torch.tensor([1.0, 1.0]) - w.detach()) / 0.1


def test_lamb_from_the_factory_does_not_clip_unless_asked():
    """timm's Lamb clips the global gradient norm at 1.0 by default; the factory leaves clipping to the caller
    (the same clip for every optimizer of a comparison), so its LAMB does not clip unless max_grad_norm is given."""
    assert agvm.create_optimizer("lamb", _model().parameters(), lr=0.1).defaults["max_grad_norm"] is None
    unclipped, clipped = _lamb_step(), _lamb_step(max_grad_norm=1.0)
    # Adam's first step: m_hat = g, v_hat = g^2, update g / (|g| + eps) per element
    torch.testing.assert_close(unclipped, torch.tensor([1000.0 / 1001.0, 1.0 / 2.0]))
    g = torch.tensor([1000.0, 1.0]) / torch.tensor([1000.0, 1.0]).norm()
    torch.testing.assert_close(clipped, g / (g.abs() + 1.0))


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
