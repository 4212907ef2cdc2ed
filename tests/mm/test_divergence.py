"""Divergence: DivergenceHook stops a run on a non-finite loss / gradient norm (patience), writes
metrics.json {"status": "diverged"}, the CLI exits 3 with one line; AGVMHook logs rejected measurements as null."""
import json
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from _mm_helpers import tiny_options

pytestmark = pytest.mark.mm
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RETINA = osp.join(ROOT, "configs", "retinanet", "retinanet_r50_bs32_agvm_sgd.py")


def _runner(tmp_path, optim_wrapper=None, name="div"):
    from mmengine.logging import MessageHub

    return SimpleNamespace(work_dir=str(tmp_path), iter=0, epoch=0, optim_wrapper=optim_wrapper,
                           message_hub=MessageHub.get_instance(f"{name}-{tmp_path.name}"))


def _feed(hook, runner, losses):
    for loss in losses:
        hook.after_train_iter(runner, 0, outputs={"loss": torch.tensor(loss)})
        runner.iter += 1


def test_patience_counts_consecutive_non_finite_losses(tmp_path):
    from agvm.mm.hooks import DivergenceHook, TrainingDiverged

    hook, runner = DivergenceHook(patience=3), _runner(tmp_path)
    nan, inf = float("nan"), float("inf")
    _feed(hook, runner, [1.0, nan, nan, 0.5, inf, nan])  # never 3 in a row: a transient NaN is tolerated
    assert hook.bad == 2 and not osp.exists(osp.join(tmp_path, "metrics.json"))
    with pytest.raises(TrainingDiverged) as err:
        _feed(hook, runner, [nan])
    assert err.value.iteration == 7 and err.value.exit_code == 3
    assert "training diverged at iteration 7: the loss non-finite in 3 consecutive" in str(err.value)
    metrics = json.loads(open(osp.join(tmp_path, "metrics.json")).read())
    assert metrics["status"] == "diverged" and metrics["iter"] == 7 and "patience=3" in metrics["reason"]
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        DivergenceHook(patience=0)


def test_non_finite_gradient_norm_counts_unless_amp(tmp_path):
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    from agvm.mm.hooks import DivergenceHook, TrainingDiverged

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    runner = _runner(tmp_path, OptimWrapper(opt), "grad")
    runner.message_hub.update_scalar("train/grad_norm", float("inf"))  # logged by the wrapper when it clips
    with pytest.raises(TrainingDiverged, match="the gradient norm non-finite in 1"):
        _feed(DivergenceHook(patience=1), runner, [1.0])
    amp = object.__new__(AmpOptimWrapper)  # AMP: an overflowing gradient is the loss scaler's business
    runner = _runner(tmp_path, amp, "amp")
    runner.message_hub.update_scalar("train/grad_norm", float("inf"))
    _feed(DivergenceHook(patience=1), runner, [1.0])


def test_rejected_measurement_is_logged_as_null(tmp_path):
    """The optimizer keeps mu on NaN halves; the log must not repeat the last good Phi / mu as if measured."""
    import agvm
    from agvm.mm.hooks import VARIANCE_LOG, AGVMHook

    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 3), "neck": torch.nn.Linear(3, 1)})
    opt = agvm.AGVMSGD(agvm.param_groups(model, modules=("backbone", "neck")), lr=0.1, interval=1)
    runner = SimpleNamespace(work_dir=str(tmp_path), iter=0, epoch=0, cfg={}, model=model,
                             optim_wrapper=SimpleNamespace(optimizer=opt, _accumulative_counts=1))
    hook = AGVMHook(tensorboard=False)
    hook.before_train(runner)

    def step(value):
        ga = [torch.full_like(p, value) for p in opt.params_in_order()]
        gb = [torch.randn_like(p) for p in opt.params_in_order()]
        for p in opt.params_in_order():
            p.grad = torch.ones_like(p)
        opt.step(halves=(ga, gb))
        hook.after_train_iter(runner, 0)
        runner.iter += 1

    step(1.0)
    step(float("nan"))
    step(1.0)
    rows = [json.loads(x) for x in open(osp.join(tmp_path, VARIANCE_LOG))]
    assert [r["iter"] for r in rows] == [1, 2, 3]
    assert all(v is not None for v in rows[0]["phi"].values()) and "rejected" not in rows[0]
    assert rows[1]["rejected"] is True
    assert rows[1]["phi"] == {"backbone": None, "neck": None} and rows[1]["mu"] == {"backbone": None, "neck": None}
    assert all(v is not None for v in rows[2]["mu"].values()) and "rejected" not in rows[2]


@pytest.mark.slow
def test_a_run_whose_loss_explodes_stops_with_status_diverged(synthetic_root, tmp_path, capsys):
    from agvm.cli import run
    from agvm.mm.train import train

    work = tmp_path / "work"
    opts = tiny_options("retinanet", synthetic_root, **{"optim_wrapper.optimizer.lr": 1e30,
                                                        "train_cfg.max_epochs": 4})
    assert run(lambda argv: train(RETINA, str(work), opts), []) == 3  # what python -m agvm.mm.train does
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: training diverged at iteration ") and "Traceback" not in "\n".join(err)
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["iter"] <= 8  # stopped, not 4 epochs of NaN
    assert not list(work.glob("epoch_4.pth"))
