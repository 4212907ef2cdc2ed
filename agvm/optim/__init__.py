from .agvm_adamw import AGVMAdamW
from .agvm_sgd import AGVMSGD
from .factory import OPTIMIZERS, create_optimizer
from .pmd_lamb import PMDLAMB

__all__ = ["AGVMSGD", "AGVMAdamW", "PMDLAMB", "OPTIMIZERS", "create_optimizer"]
