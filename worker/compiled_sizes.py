"""Batches for a compiled UNet or VAE: rows padded to one of the sizes warmed up at start, so
that no job ever waits for a compilation (IMAGEGEN_COMPILE_BATCHES)."""

from __future__ import annotations

import torch


def bucket(rows: int, sizes: list[int] | tuple[int, ...]) -> int:
    """The smallest of the ascending `sizes` that holds `rows` (`rows` itself past them all)."""
    return next((size for size in sizes if size >= rows), rows)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with copies of its first row appended up to `rows` rows (their results are
    dropped; each row is computed independently of the others)."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[:1].expand(missing, *tensor.shape[1:])])
