"""The training engine: flags and configs (``config``, ``cli``), a run's start-up and its parts
(``run``, ``run_start``, ``run_folder``), the loop with validation and checkpoints (``engine``), the SSCD
phases and stages (``sscd_train``), devices, precision and speed settings (``device``, ``speed``) and
multi-process training (``distributed``).

Layer: above evaluation, the method, networks and data; only reporting sits above it.
"""
