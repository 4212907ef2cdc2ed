"""SLURM orchestration with submitit: experiment folders (``slurm.experiment``), the job callable
(``slurm.trainer.Trainer``: train -> checkpoint -> requeue -> resume), ``python -m slurm.submit`` and
``python -m slurm.status``. Imports torch only inside a job, never at import time."""
