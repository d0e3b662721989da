"""Start-up on a card that is short of memory or slow to compile: a warm-up batch that runs out
of memory limits the worker's batches to what fitted (or makes the model unavailable), never a
crash that a container restarts forever; the readiness wait grows with the sizes to compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagegen.core.settings import Settings
from tests.stack import ready_timeout_s
from worker.inference import Inference, WarmUpOutOfMemory
from worker.models import ModelManager, ModelUnavailable


def _oom_past(limit: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    tried: list[int] = []

    def warm(self: Inference, size: int) -> None:
        tried.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (batch {size})")

    monkeypatch.setattr(Inference, "_warm_up_batch", warm)
    monkeypatch.setattr(torch.compiler, "set_stance", lambda *_a, **_k: None)
    return tried


def test_a_warm_up_that_runs_out_of_memory_limits_the_batches(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ModelManager(Settings(models=f"m={tiny_model_dir}", device="cpu"))
    inference = manager.acquire("m")
    inference.model.compiled_batches = (1, 2, 4, 8)  # as if compiled for these sizes
    manager.warm["m"].max_images = 8
    tried = _oom_past(2, monkeypatch)
    fitted = inference.warm_up()
    assert fitted == 2 and tried == [1, 2, 4]
    manager.limit_images("m", fitted)
    assert manager.max_images("m") == 2


def test_a_warm_up_that_fits_sets_no_limit(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batching stays as configured: a worker whose warm-up (one batch of 1, uncompiled)
    fitted is not held to batches of 1."""
    manager = ModelManager(Settings(models=f"m={tiny_model_dir}", device="cpu"))
    inference = manager.acquire("m")
    _oom_past(8, monkeypatch)
    assert inference.warm_up() is None


def test_a_model_whose_smallest_warm_up_does_not_fit_is_unavailable(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = ModelManager(Settings(models=f"m={tiny_model_dir}", device="cpu"))
    inference = manager.acquire("m")
    _oom_past(0, monkeypatch)
    with pytest.raises(WarmUpOutOfMemory, match="batch of 1 image") as caught:
        inference.warm_up()
    manager.mark_unavailable("m", str(caught.value))
    with pytest.raises(ModelUnavailable, match="out of memory warming up"):
        manager.acquire("m")


def test_the_readiness_wait_grows_with_the_sizes_to_compile() -> None:
    eager = ready_timeout_s({})
    two = ready_timeout_s({"IMAGEGEN_COMPILE": "true", "IMAGEGEN_COMPILE_BATCHES": "8,16"})
    four = ready_timeout_s({"IMAGEGEN_COMPILE": "true", "IMAGEGEN_COMPILE_BATCHES": "1,2,4,8"})
    assert eager == 120 and two >= eager + 2 * 120 and four > two
