"""Tiny random-weight stand-ins of the real architectures, built offline in seconds.

They are saved in the same on-disk layout as the real hub checkpoints and loaded back through the
product's own `from_pretrained` code. The test suite uses them as fixtures; `qwen-identity demo`
uses them when no real models are configured. Random weights: the images they make are noise.
"""

from .build import build_tiny_models, TinyModels  # noqa: F401
