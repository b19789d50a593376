"""Helpers every layer may use, and that import nothing of this project: the one-line errors of the
command-line scripts (``errors``), the geometry of image volumes and label maps (``geometry``) and the
checkpoint files (``checkpoint``: atomic writes, safe loading, RNG state).

Layer: the lowest (``.importlinter``, docs/architecture.md).
"""
