"""Import every HTC-X part so it is registered with mmdet (configs: ``custom_imports=dict(imports=[...])``)."""
from . import datasets, decoupled_head, htc_lite, rcnet, sepc  # noqa: F401

__all__ = ["datasets", "rcnet", "sepc", "decoupled_head", "htc_lite"]
