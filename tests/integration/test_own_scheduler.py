"""A model whose scheduler the table lacks (here DEIS and Heun) runs with its own by default
(`scheduler: "default"`, listed in its `schedulers`), as diffusers' pipeline would, and not as
Euler; the batch loop gives the stock pipeline's bytes with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import DEISMultistepScheduler, HeunDiscreteScheduler, StableDiffusionPipeline

from imagegen.core.settings import Settings
from tests.stack import batch_job
from tests.stock import stock_image
from worker.batch_loop import BatchItem, run_batch
from worker.pipeline import load_model


@pytest.mark.parametrize("kind", [DEISMultistepScheduler, HeunDiscreteScheduler])
def test_the_model_s_own_scheduler_is_its_default(
    tiny_model_dir: Path, tmp_path: Path, kind: type
) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.scheduler = kind.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "own")
    model = load_model(Settings(model=str(tmp_path / "own"), device="cpu"))
    assert model.info.scheduler == "default" and "default" in model.info.schedulers
    spec = batch_job(scheduler="default", steps=3)
    (ours,) = run_batch(model, [BatchItem(spec)], invariant=True)
    assert isinstance(ours, list)
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "own")
    assert type(stock.scheduler) is kind
    assert np.array_equal(np.asarray(ours[0]), stock_image(stock, spec))
