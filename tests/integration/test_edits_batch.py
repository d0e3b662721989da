"""Images in through the batch loop (worker/batch_loop.py): image-to-image and inpainting are
byte-identical on CPU to diffusers' own StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (4-channel UNet: latent blending) for the same inputs, before the
kept pixels are composited back; after the composite, every kept pixel is the input's exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from imagegen.core.contract import SCHEDULER_NAMES, InputRef, JobSpec, Outpaint
from imagegen.core.settings import Settings
from tests.stack import batch_job
from worker import edits
from worker.batch_loop import BatchItem, BatchResult, run_batch
from worker.errors import JobStopped
from worker.inference import Inference
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler

STEPS = 4
REF = InputRef(sha256="0" * 64, width=64, height=64)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny_model_dir), model_id="tiny", device="cpu"))


def picture(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[16:48, 16:48] = (200, 30, 30)  # a shape, so that content is not all noise
    return Image.fromarray(pixels)


def a_mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (32, 0, 64, 32))  # repaint the top-right quarter
    return mask


def job(task: str, **changes: Any) -> JobSpec:
    spec = batch_job(
        task=task,
        image=REF,
        mask=REF if task == "inpaint" else None,
        strength=0.75 if task == "img2img" else 1.0,
    )
    return spec.model_copy(update=changes)


def stock(
    model: LoadedModel,
    spec: JobSpec,
    image: Image.Image,
    mask: Image.Image | None,
    **extra: Any,
) -> list[np.ndarray]:
    """diffusers' own pipeline over the same components, one call per image (as the worker's
    batch-invariant mode runs it)."""
    components = model.pipe.components
    out = []
    for i in range(spec.n):
        generator = [torch.Generator("cpu").manual_seed(spec.image_seed(i))]
        scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        common: dict[str, Any] = {
            "prompt": [spec.prompt],
            "negative_prompt": [spec.negative_prompt],
            "image": [image],
            "strength": spec.strength,
            "num_inference_steps": spec.steps,
            "guidance_scale": spec.guidance_scale,
            "generator": generator,
            "output_type": "pil",
        }
        kind: Any = (
            StableDiffusionImg2ImgPipeline if mask is None else StableDiffusionInpaintPipeline
        )
        pipe = kind(**components)
        # Set after construction, as the worker sets it: a pipeline's __init__ rewrites some
        # scheduler configs (clip_sample, steps_offset) that the worker's schedulers keep.
        pipe.scheduler = scheduler
        with torch.inference_mode():
            if mask is None:
                result = pipe(**common)
            else:
                # With `padding_mask_crop` diffusers takes one PIL image and mask, not lists.
                one = "padding_mask_crop" in extra
                result = pipe(
                    **{**common, "image": image if one else [image]},
                    mask_image=mask if one else [mask],
                    width=spec.width,
                    height=spec.height,
                    **extra,
                )
        out += [np.asarray(im) for im in result.images]
    return out


def pixels(result: BatchResult) -> list[np.ndarray]:
    assert not isinstance(result, BaseException), result
    return [np.asarray(image) for image in result]


def assert_identical(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        diff = int(np.abs(a.astype(int) - b).max())
        assert a.shape == b.shape and np.array_equal(a, b), f"max diff {diff}"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_image_to_image_matches_the_stock_pipeline(
    model: LoadedModel, scheduler: str, strength: float
) -> None:
    steps = 8 if scheduler == "pndm" else STEPS  # PNDM needs 4 steps after the cut
    spec = job("img2img", scheduler=scheduler, strength=strength, steps=steps, n=2)
    image = picture()
    (result,) = run_batch(model, [BatchItem(spec, image=image)], invariant=True)
    assert_identical(pixels(result), stock(model, spec, image, None))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpainting_matches_the_stock_pipeline_before_the_composite(
    model: LoadedModel, scheduler: str, strength: float
) -> None:
    steps = 8 if scheduler == "pndm" else STEPS
    spec = job("inpaint", scheduler=scheduler, strength=strength, steps=steps, n=2)
    image, mask = picture(), a_mask()
    (result,) = run_batch(model, [BatchItem(spec, image=image, mask=mask)], invariant=True)
    assert_identical(pixels(result), stock(model, spec, image, mask))


def test_batched_edit_jobs_match_their_solo_runs(model: LoadedModel) -> None:
    # Per-image seeds, per-job guidance and prompts, one loop.
    specs = [
        job("inpaint", n=2),
        job("inpaint", prompt="a green sphere", guidance_scale=1.0, seed=5),
        job("inpaint", prompt="blurry", guidance_scale=3.0, seed=2**32 - 1),
    ]
    inputs = [(picture(j), a_mask()) for j in range(len(specs))]
    items = [BatchItem(s, image=i, mask=m) for s, (i, m) in zip(specs, inputs, strict=True)]
    batched = run_batch(model, items, invariant=True)
    for spec, (image, mask), result in zip(specs, inputs, batched, strict=True):
        assert_identical(pixels(result), stock(model, spec, image, mask))


def test_an_edit_job_stopped_mid_batch_leaves_the_others_untouched(model: LoadedModel) -> None:
    specs = [job("img2img", scheduler="dpmpp_2m", seed=s, n=2) for s in (1, 2, 3)]
    image = picture()
    full = run_batch(model, [BatchItem(s, image=image) for s in specs], invariant=True)

    def stop(k: int, _total: int) -> None:
        if k == 2:
            raise JobStopped("canceled")

    items = [BatchItem(s, stop if j == 1 else None, image) for j, s in enumerate(specs)]
    results = run_batch(model, items, invariant=True)
    assert isinstance(results[1], JobStopped)
    assert_identical(pixels(results[0]), pixels(full[0]))
    assert_identical(pixels(results[2]), pixels(full[2]))


def test_a_batch_does_not_mix_tasks_or_strengths(model: LoadedModel) -> None:
    image = picture()
    for other in (
        job("img2img", strength=0.5),
        job("inpaint"),
        job("img2img").model_copy(update={"task": "text", "image": None, "strength": None}),
    ):
        with pytest.raises(ValueError, match="task, strength and mask"):
            run_batch(
                model,
                [
                    BatchItem(job("img2img"), image=image),
                    BatchItem(other, image=image, mask=a_mask()),
                ],
                invariant=True,
            )


@pytest.mark.parametrize("batching", [True, False])
def test_the_composite_keeps_every_black_mask_pixel_exactly(
    model: LoadedModel, batching: bool
) -> None:
    inference = Inference(model)
    inference.batching = batching  # False: the stock AutoPipelineForInpainting.from_pipe
    image, mask = picture(3), a_mask()
    spec = job("inpaint", n=2)
    (result,) = inference.run([BatchItem(spec, image=image, mask=mask)])
    assert not isinstance(result, BaseException)
    keep = np.asarray(mask) < 128
    for out in result:
        got = np.asarray(out)
        assert np.array_equal(got[keep], np.asarray(image)[keep])
        assert not np.array_equal(got[~keep], np.asarray(image)[~keep])  # something was drawn


@pytest.mark.parametrize("batching", [True, False])
@pytest.mark.parametrize("padding", [0, 6])
def test_only_masked_inpainting_matches_the_stock_padding_mask_crop(
    model: LoadedModel, batching: bool, padding: int
) -> None:
    # A1111's "only masked" (`inpaint_full_res`): diffusers' `padding_mask_crop` does it.
    inference = Inference(model)
    inference.batching = batching
    image = picture(5)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 8, 52, 20))  # a small box: the crop is a fraction of the canvas
    spec = job("inpaint", n=2, padding_mask_crop=padding)
    (result,) = inference.run([BatchItem(spec, image=image, mask=mask)])
    assert_identical(pixels(result), stock(model, spec, image, mask, padding_mask_crop=padding))
    plain = inference.run([BatchItem(job("inpaint", n=2), image=image, mask=mask)])[0]
    assert not np.array_equal(pixels(result)[0], pixels(plain)[0])


def test_mask_blur_feathers_the_composite_and_keeps_far_pixels_exactly(model: LoadedModel) -> None:
    from diffusers.image_processor import VaeImageProcessor

    image, mask = picture(6), a_mask()
    spec = job("inpaint", mask_blur=4)
    (raw,) = run_batch(model, [BatchItem(spec, image=image, mask=mask)], invariant=True)
    (result,) = Inference(model).run([BatchItem(spec, image=image, mask=mask)])
    alpha = VaeImageProcessor.blur(mask, 4)
    assert not isinstance(raw, BaseException) and not isinstance(result, BaseException)
    assert_identical(pixels(result), [np.asarray(Image.composite(raw[0], image, alpha))])
    got, original = np.asarray(result[0]), np.asarray(image)
    assert np.array_equal(got[48:, :], original[48:, :])  # 16 px below the repainted quarter
    seam = got[28:32, 40:60].astype(int)  # just inside the mask's lower edge: a blend
    assert not np.array_equal(seam, np.asarray(raw[0])[28:32, 40:60])
    assert not np.array_equal(seam, original[28:32, 40:60])


def test_outpainting_keeps_the_original_canvas_exactly(model: LoadedModel) -> None:
    # What the gateway stores for a 64x64 input grown by 32 px on the right.
    from app.images_in import Decoded, prepare

    original = picture(4)
    prepared = prepare(
        image=Decoded(original, REF),
        mask=None,
        outpaint=(0, 32, 0, 0),
        width=None,
        height=None,
        max_pixels=1024 * 1024,
    )
    assert (prepared.width, prepared.height) == (96, 64)
    canvas = Image.open(__import__("io").BytesIO(prepared.blobs["image"]))
    mask = Image.open(__import__("io").BytesIO(prepared.blobs["mask"]))
    spec = job("outpaint", width=96, height=64, mask=None, outpaint=Outpaint(right=32))
    (result,) = Inference(model).run([BatchItem(spec, image=canvas.convert("RGB"), mask=mask)])
    assert not isinstance(result, BaseException)
    for out in result:
        assert out.size == (96, 64)
        assert np.array_equal(np.asarray(out)[:, :64], np.asarray(original))


def test_stock_pipelines_share_the_warm_weights(model: LoadedModel) -> None:
    cache: dict[str, Any] = {}
    for task in ("img2img", "inpaint"):
        pipe = edits.stock_pipeline(model.pipe, task, cache)
        assert pipe.unet is model.pipe.unet and pipe.vae is model.pipe.vae
        assert edits.stock_pipeline(model.pipe, task, cache) is pipe
