"""An inpainting checkpoint (a 9-channel UNet, as `stable-diffusion-inpainting` ships) in the
batch loop: inpainting, image-to-image and text-to-image jobs are byte-identical on CPU to
`StableDiffusionInpaintPipeline` given the same image and mask (a white mask when the job has
none, a black image when it has no image: a full-canvas inpaint)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

from builtin_model.tiny import save_tiny_inpainting_pipeline
from imagegen.core.contract import JobSpec
from imagegen.core.settings import Settings
from tests.integration.test_edits_batch import REF, a_mask, assert_identical, picture, pixels
from tests.stack import batch_job
from worker.batch_loop import BatchItem, run_batch
from worker.models import ModelManager
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def nine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_inpainting_pipeline(tmp_path_factory.mktemp("inpainting") / "tiny-inpaint")


@pytest.fixture(scope="module")
def nine(nine_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(nine_dir), model_id="nine", device="cpu"))


def stock(model: LoadedModel, spec: JobSpec, image: Image.Image, mask: Image.Image) -> list[Any]:
    pipe = StableDiffusionInpaintPipeline(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(spec.n):
        pipe.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        with torch.inference_mode():
            result = pipe(
                prompt=[spec.prompt],
                negative_prompt=[spec.negative_prompt],
                image=[image],
                mask_image=[mask],
                strength=spec.strength or 1.0,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i))],
            )
        out += [np.asarray(im) for im in result.images]
    return out


def test_the_worker_serves_it_as_an_inpainting_model(nine_dir: Path) -> None:
    manager = ModelManager(Settings(models=f"nine={nine_dir}", device="cpu"))
    assert manager.servable_ids() == ["nine"]
    assert manager.entries["nine"].info.inpainting is True
    assert manager.acquire("nine").model.info.inpainting is True


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m"])
def test_inpainting_matches_the_stock_inpaint_pipeline(nine: LoadedModel, scheduler: str) -> None:
    spec = batch_job(task="inpaint", image=REF, mask=REF, strength=1.0, n=2, scheduler=scheduler)
    image, mask = picture(1), a_mask()
    (result,) = run_batch(nine, [BatchItem(spec, image=image, mask=mask)], invariant=True)
    assert_identical(pixels(result), stock(nine, spec, image, mask))


def test_image_to_image_is_a_whole_canvas_inpaint_at_its_strength(nine: LoadedModel) -> None:
    spec = batch_job(task="img2img", image=REF, strength=0.6)
    image = picture(2)
    (result,) = run_batch(nine, [BatchItem(spec, image=image)], invariant=True)
    white = Image.new("L", (64, 64), 255)
    assert_identical(pixels(result), stock(nine, spec, image, white))


def test_text_to_image_is_a_full_canvas_inpaint_and_batches_with_itself(nine: LoadedModel) -> None:
    specs = [batch_job(n=2), batch_job(prompt="a green sphere", seed=3)]
    results = run_batch(nine, [BatchItem(spec) for spec in specs], invariant=True)
    black, white = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    for spec, result in zip(specs, results, strict=True):
        assert_identical(pixels(result), stock(nine, spec, black, white))


@pytest.fixture(scope="module")
def nine_xl(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from builtin_model.tiny import save_tiny_sdxl_inpainting_pipeline

    directory = save_tiny_sdxl_inpainting_pipeline(tmp_path_factory.mktemp("xl") / "xl-inpaint")
    return load_model(Settings(model=str(directory), model_id="nine-xl", device="cpu"))


@pytest.mark.parametrize("task", ["inpaint", "text"])
def test_an_sdxl_inpainting_checkpoint_matches_the_stock_sdxl_inpaint_pipeline(
    nine_xl: LoadedModel, task: str
) -> None:
    from diffusers import StableDiffusionXLInpaintPipeline

    assert nine_xl.info.inpainting and nine_xl.info.family == "sdxl"
    inpaint = task == "inpaint"
    spec = batch_job(negative_prompt="", model="nine-xl", n=2, guidance_scale=5.0)
    if inpaint:
        spec = spec.model_copy(
            update={"task": "inpaint", "image": REF, "mask": REF, "strength": 1.0}
        )
    image = picture(4) if inpaint else Image.new("RGB", (64, 64))
    mask = a_mask() if inpaint else Image.new("L", (64, 64), 255)
    item = BatchItem(spec, image=image, mask=mask) if inpaint else BatchItem(spec)
    (result,) = run_batch(nine_xl, [item], invariant=True)
    pipe = StableDiffusionXLInpaintPipeline(**nine_xl.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    expected = []
    for i in range(spec.n):
        pipe.scheduler = build_scheduler(spec.scheduler, nine_xl.scheduler_config)
        with torch.inference_mode():
            out = pipe(
                prompt=[spec.prompt],
                negative_prompt=None,
                image=[image],
                mask_image=[mask],
                strength=1.0,
                width=64,
                height=64,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i))],
            )
        expected += [np.asarray(im) for im in out.images]
    assert_identical(pixels(result), expected)
