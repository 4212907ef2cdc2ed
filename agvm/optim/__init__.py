from .agvm_adamw import AGVMAdamW
from .agvm_sgd import AGVMSGD
from .pmd_lamb import PMDLAMB

__all__ = ["AGVMSGD", "AGVMAdamW", "PMDLAMB"]
