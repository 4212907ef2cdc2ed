"""SLURM orchestration with submitit: experiment folders (``slurm.experiment``), the job callable
(``slurm.trainer.Trainer``: train -> checkpoint -> requeue -> resume), ``python -m slurm.submit`` and
``python -m slurm.status``. Shares ``agvm.fileio`` (atomic JSON, the work-dir lock) and ``agvm.cli`` (one-line
errors) with the library, so importing it imports torch (``agvm``'s package import); mmengine only inside a job."""
