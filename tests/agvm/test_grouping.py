import pytest
import torch
from torch import nn

import agvm


class TwoStage(nn.Module):
    """mmdet-like names: roi_head.bbox_head and roi_head.mask_head nest inside roi_head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.neck = nn.Conv2d(4, 4, 1)
        self.rpn_head = nn.Conv2d(4, 3, 1)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.Linear(4, 5)
        self.roi_head.mask_head = nn.Conv2d(4, 2, 1, bias=False)
        self.roi_head.extra = nn.Linear(2, 2)


def names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_longest_prefix_wins_and_order_follows_the_spec():
    model = TwoStage()
    groups = agvm.param_groups(model)
    assert [g["module"] for g in groups] == ["backbone", "neck", "rpn_head", "roi_head", "bbox_head", "mask_head"]
    by = {g["module"]: names(model, g) for g in groups}
    assert by["bbox_head"] == ["roi_head.bbox_head.bias", "roi_head.bbox_head.weight"]
    assert by["roi_head"] == ["roi_head.extra.bias", "roi_head.extra.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_decay_for_norms_and_biases_merged_per_module():
    model = TwoStage()
    groups = agvm.param_groups(model, weight_decay=1e-4, no_decay_norm_bias=True)
    backbone = [g for g in groups if g["module"] == "backbone"]
    assert len(backbone) == 2
    decay, no_decay = backbone
    assert decay["weight_decay"] == 1e-4 and names(model, decay) == ["backbone.0.weight"]
    assert no_decay["weight_decay"] == 0.0
    assert names(model, no_decay) == ["backbone.0.bias", "backbone.1.bias", "backbone.1.weight"]
    assert [g["module"] for g in groups if g["module"] == "mask_head"] == ["mask_head"]  # no bias: one group


def test_uncovered_parameters_are_named_in_the_error():
    model = TwoStage()
    model.stray = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"2 trainable parameter\(s\).*stray.weight, stray.bias"):
        agvm.param_groups(model)
    model.stray.requires_grad_(False)  # frozen parameters are fine
    assert agvm.param_groups(model)


def test_custom_modules_and_ddp_prefix():
    model = TwoStage()
    wrapped = nn.Module()
    wrapped.module = model  # the names DDP gives: module.backbone...
    groups = agvm.param_groups(wrapped, modules={"backbone": "backbone", "fpn": ["neck"],
                                                 "heads": ["rpn_head", "roi_head"]})
    assert [g["module"] for g in groups] == ["backbone", "fpn", "heads"]
    groups = agvm.param_groups(model, modules=["backbone", "neck", "rpn_head", "roi_head.bbox_head",
                                               "roi_head"])
    assert [g["module"] for g in groups] == ["backbone", "neck", "rpn_head", "bbox_head", "roi_head"]


def test_shared_parameters_are_listed_once():
    model = TwoStage()
    model.neck = model.rpn_head  # one conv reached by two names
    groups = agvm.param_groups(model)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    opt = agvm.AGVMSGD(groups, lr=0.1)  # torch refuses duplicates: this must build
    assert opt.modules[0] == "backbone"


def test_freeze_leaves_a_module_out_and_stops_its_gradient():
    model = TwoStage()
    groups = agvm.param_groups(model, freeze=("bbox_head",))
    assert "bbox_head" not in [g["module"] for g in groups]
    assert not any(p.requires_grad for p in model.roi_head.bbox_head.parameters())
    assert all(p.requires_grad for p in model.roi_head.mask_head.parameters())
    with pytest.raises(ValueError, match=r"freeze names unknown module\(s\) \['fpn'\]"):
        agvm.param_groups(TwoStage(), freeze=("fpn",))
