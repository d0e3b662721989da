"""The built-in ``shapes-64`` model: a tiny Stable-Diffusion-architecture pipeline trained on
procedural scenes, so the service works offline with no GPU and no download.

This module stays free of torch: the gateway imports it for :data:`MODEL_DIR` only. Training,
data and scoring live in the submodules (``data``, ``build``, ``train``, ``score``).
"""

from pathlib import Path

MODEL_ID = "shapes-64"
MODEL_DIR = Path(__file__).parent / MODEL_ID

__all__ = ["MODEL_DIR", "MODEL_ID"]
