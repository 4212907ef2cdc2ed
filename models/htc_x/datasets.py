"""COCO / Objects365 v1 datasets whose root comes from an environment variable, with a clear error when missing.

The configs set ``data_root='{{$AGVM_COCO_ROOT:data/coco/}}'`` (mmengine substitutes the variable when the config
is read, so configs load without any data); these thin subclasses of mmdet's datasets check, when the dataset is
built, that the root and the annotation file exist and otherwise name the missing path and the variable to set.
"""
from __future__ import annotations

import os.path as osp

from mmdet.datasets import CocoDataset, Objects365V1Dataset
from mmdet.registry import DATASETS


def check_root(data_root: str | None, ann_file: str, env_var: str, what: str) -> None:
    """Raise FileNotFoundError naming the missing directory / annotation file and the env var to set."""
    if not data_root or not osp.isdir(data_root):
        raise FileNotFoundError(f"{what} root {data_root!r} does not exist: set {env_var} to the dataset folder "
                                f"(or use --cfg-options dataset=synthetic for the generated data)")
    path = ann_file if osp.isabs(ann_file) else osp.join(data_root, ann_file)
    if not osp.isfile(path):
        raise FileNotFoundError(f"{what} annotation file {path!r} is missing (root from {env_var}={data_root!r})")


@DATASETS.register_module()
class EnvRootCocoDataset(CocoDataset):
    """mmdet ``CocoDataset`` with a root check (env var ``root_env``, default AGVM_COCO_ROOT)."""

    def __init__(self, *args, root_env: str = "AGVM_COCO_ROOT", **kwargs) -> None:
        if not kwargs.get("lazy_init", False):
            check_root(kwargs.get("data_root"), kwargs.get("ann_file", ""), root_env, "COCO")
        super().__init__(*args, **kwargs)


@DATASETS.register_module()
class EnvRootObjects365V1Dataset(Objects365V1Dataset):
    """mmdet ``Objects365V1Dataset`` with a root check (env var ``root_env``, default AGVM_O365_ROOT)."""

    def __init__(self, *args, root_env: str = "AGVM_O365_ROOT", **kwargs) -> None:
        if not kwargs.get("lazy_init", False):
            check_root(kwargs.get("data_root"), kwargs.get("ann_file", ""), root_env, "Objects365 v1")
        super().__init__(*args, **kwargs)
