"""The Fig. 4 ablations of experiments/fig1_4_variance are plain cfg overrides of the Table 1 Faster R-CNN
config: check that they build a working detector (no FPN: C5 only; 10 proposals; frozen head) and that the
frozen head really receives no gradient while the RPN and backbone train."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from slurm.experiment import load_experiment

REPO = Path(__file__).resolve().parents[2]


def _grads(run_name: str) -> dict:
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.structures import InstanceData

    from agvm.mm.train import load_config

    register_all_modules()
    exp = load_experiment(REPO / "experiments" / "fig1_4_variance")
    run = exp.runs[run_name]
    cfg = load_config(str(exp.config_path(run)), {**run.cfg_options, "dataset": "synthetic",
                                                   "synthetic_image_size": 64})
    assert cfg.model.neck.type == "ChannelMapper" and cfg.model.backbone.out_indices == [3]
    assert cfg.optim_wrapper.optimizer.start_iter >= 10 ** 9  # measured, mu held at 1: plain SGD
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    import agvm.mm
    from agvm.mm.optim import AGVMOptimWrapperConstructor

    agvm.mm.register_all()
    ow = copy.deepcopy(cfg.optim_wrapper)
    ow.pop("constructor")
    wrapper = AGVMOptimWrapperConstructor(ow, ow.pop("paramwise_cfg", None))(model)
    in_opt = {id(p) for g in wrapper.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    samples = []
    for _ in range(2):
        s = DetDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
                                        scale_factor=(1.0, 1.0), batch_input_shape=(64, 64)))
        s.gt_instances = InstanceData(bboxes=torch.tensor([[5.0, 6.0, 40.0, 50.0]]), labels=torch.tensor([0]))
        samples.append(s)
    imgs = [(torch.rand(3, 64, 64) * 255).to(torch.uint8) for _ in range(2)]
    data = model.data_preprocessor({"inputs": imgs, "data_samples": samples}, True)
    losses = model.loss(data["inputs"], data["data_samples"])
    sum(sum(v) if isinstance(v, list) else v for k, v in losses.items() if k.startswith("loss")).backward()
    return {m: sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                   if n.startswith(m) and p.grad is not None)
            for m in ("backbone", "neck", "rpn_head", "roi_head.bbox_head")}, cfg


@pytest.mark.slow
@pytest.mark.mm
def test_fig4_overrides_build_and_freeze_the_head():
    pytest.importorskip("agvm.mm.train")
    g, cfg = _grads("faster_rcnn_r50_bs512_sgd_measured_no_fpn")
    assert cfg.model.train_cfg.rcnn.sampler.num == 512 and cfg.model.rpn_head.anchor_generator.strides == [32]
    assert all(v > 0 for v in g.values()), g
    g, cfg = _grads("faster_rcnn_r50_bs512_sgd_measured_no_fpn_10_proposals_frozen_head")
    assert cfg.model.train_cfg.rcnn.sampler.num == 10
    assert g["roi_head.bbox_head"] == 0.0 and g["rpn_head"] > 0 and g["backbone"] > 0, g
