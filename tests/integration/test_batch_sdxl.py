"""SDXL in the batch loop: byte-identical on CPU to the stock StableDiffusionXLPipeline (two text
encoders, pooled embedding and size/crop micro-conditioning per row, the empty negative prompt
as zeros, the fp16 VAE upcast to fp32 for the decode), alone and batched. A tiny random SDXL
pipeline, saved and loaded like a hub model, stands in for the real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from builtin_model.tiny import save_tiny_sdxl_pipeline
from imagegen.core.contract import JobSpec
from imagegen.core.settings import Settings
from tests.integration.test_batch import assert_identical, pixels
from tests.stock import stock_image
from worker.batch_loop import BatchItem, run_batch
from worker.families import supports_batching
from worker.inference import Inference
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(sdxl_dir), model_id="sdxl", device="cpu"))


@pytest.fixture(scope="module")
def sdxl16(sdxl_dir: Path) -> LoadedModel:
    settings = Settings(model=str(sdxl_dir), model_id="sdxl", device="cpu", dtype="float16")
    return load_model(settings)


def job(**changes: Any) -> JobSpec:
    spec = JobSpec(
        prompt="a red cube",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=3,
        guidance_scale=5.0,
        seed=11,
        n=1,
        scheduler="euler",
        model="sdxl",
    )
    return spec.model_copy(update=changes)


def stock_images(model: LoadedModel, spec: JobSpec, **inputs: Any) -> list[np.ndarray]:
    """The stock pipeline, one call per image, as the worker calls it (Inference._call)."""
    images = []
    for i in range(spec.n):
        model.pipe.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        images.append(stock_image(model.pipe, spec, i, **inputs))
    return images


def test_sdxl_is_batched(sdxl: LoadedModel) -> None:
    assert supports_batching(sdxl.pipe)
    assert Inference(sdxl).batching


@pytest.mark.parametrize(
    ("scheduler", "guidance", "negative"),
    [
        ("euler", 5.0, "blurry"),
        ("euler", 5.0, ""),
        ("dpmpp_2m", 5.0, "blurry"),
        ("ddim", 1.0, ""),
        ("euler_a", 3.0, ""),
    ],
)
def test_an_sdxl_job_alone_matches_the_stock_pipeline(
    sdxl: LoadedModel, scheduler: str, guidance: float, negative: str
) -> None:
    spec = job(scheduler=scheduler, guidance_scale=guidance, negative_prompt=negative, n=2)
    (result,) = run_batch(sdxl, [BatchItem(spec)], invariant=True)
    assert_identical(pixels(result), stock_images(sdxl, spec))


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_batched_sdxl_jobs_match_their_solo_runs_byte_for_byte(
    sdxl: LoadedModel, scheduler: str
) -> None:
    specs = [
        job(scheduler=scheduler, n=2),
        job(scheduler=scheduler, prompt="a green sphere", negative_prompt="", guidance_scale=1.0),
        job(scheduler=scheduler, prompt="blurry", negative_prompt="", seed=5),
    ]
    batched = run_batch(sdxl, [BatchItem(spec) for spec in specs], invariant=True)
    for spec, result in zip(specs, batched, strict=True):
        assert_identical(pixels(result), stock_images(sdxl, spec))


def test_the_fp16_vae_is_upcast_for_the_decode_as_the_stock_pipeline_does(
    sdxl16: LoadedModel,
) -> None:
    spec = job(negative_prompt="", n=2)
    (result,) = run_batch(sdxl16, [BatchItem(spec)], invariant=True)
    assert sdxl16.pipe.vae.dtype == torch.float16  # put back after the decode
    assert_identical(pixels(result), stock_images(sdxl16, spec))


@pytest.mark.parametrize("negative", ["blurry", ""])
def test_a_long_weighted_sdxl_prompt_matches_the_stock_pipeline_given_the_same_embeddings(
    sdxl: LoadedModel, negative: str
) -> None:
    """Both encoders window by window, the pooled embedding from the first window; with an
    empty negative prompt the unconditional rows are zeros at the prompt's length, as the
    stock pipeline makes them from `prompt_embeds`."""
    from tests.integration.test_batch import LONG_PROMPT

    assert sdxl.prompts is not None and sdxl.prompts.sdxl
    prepared = sdxl.prompts.prepare(LONG_PROMPT)
    assert prepared.fragments is not None
    encoded = sdxl.prompts.encode(prepared, sdxl.device)
    assert encoded.embeds.shape[1] == 2 * sdxl.prompts.window and encoded.pooled is not None
    spec = job(prompt=LONG_PROMPT, negative_prompt=negative, n=2)
    (result,) = run_batch(sdxl, [BatchItem(spec)], invariant=True)
    assert_identical(pixels(result), pixels(Inference(sdxl).generate(spec)))


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_sdxl_inputs_are_encoded_as_the_stock_pipelines_encode_them(
    sdxl: LoadedModel, sdxl16: LoadedModel, task: str, precision: str
) -> None:
    """Image-to-image and inpainting on SDXL, in fp32 and with the fp16 VAE that asks to be
    upcast (`force_upcast`): the input is encoded in fp32 then, as the stock pipelines do."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    from tests.integration.test_edits_batch import REF, a_mask, picture

    model = sdxl if precision == "float32" else sdxl16
    inpaint = task == "inpaint"
    spec = job(
        negative_prompt="",
        task=task,
        image=REF,
        mask=REF if inpaint else None,
        strength=1.0 if inpaint else 0.6,
        n=2,
    )
    image, mask = picture(3), a_mask() if inpaint else None
    (result,) = run_batch(model, [BatchItem(spec, image=image, mask=mask)], invariant=True)
    assert model.pipe.vae.dtype == getattr(torch, precision)  # put back after the encode
    kind: Any = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
    stock = kind(**model.pipe.components)
    stock.set_progress_bar_config(disable=True)
    expected = []
    for i in range(spec.n):
        stock.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        extra = {"mask_image": [mask], "width": 64, "height": 64} if inpaint else {}
        with torch.inference_mode():
            out = stock(
                prompt=[spec.prompt],
                negative_prompt=None,
                image=[image],
                strength=spec.strength,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i))],
                **extra,
            )
        expected += [np.asarray(im) for im in out.images]
    assert_identical(pixels(result), expected)


@pytest.fixture(scope="module")
def sdxl_control_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builtin_model.tiny import save_tiny_controlnet

    directory = save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl-control")
    save_tiny_controlnet(directory, "edges")
    save_tiny_controlnet(directory, "depth")
    return directory


@pytest.fixture(scope="module")
def sdxl_control(sdxl_control_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(sdxl_control_dir), model_id="sdxl", device="cpu"))


def _control_map(box: tuple[int, int, int, int]) -> Any:
    from PIL import Image

    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), box)
    return image


@pytest.mark.parametrize("stacked", [False, True])
def test_sdxl_controlnets_match_the_stock_sdxl_controlnet_pipeline(
    sdxl_control: LoadedModel, sdxl_control_dir: Path, stacked: bool
) -> None:
    """The loop passes SDXL's ControlNets the pooled embedding and micro-conditioning, as
    StableDiffusionXLControlNetPipeline does: byte-identical, one net or two (MultiControlNet)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from imagegen.core.contract import ControlRef, InputRef

    assert [c.id for c in sdxl_control.info.controls] == ["depth", "edges"]
    ref = InputRef(sha256="0" * 64, width=64, height=64)
    controls = (ControlRef(id="edges", scale=0.9, start=0.0, end=0.8, image=ref),)
    maps = [_control_map((8, 8, 40, 40))]
    if stacked:
        controls += (ControlRef(id="depth", scale=0.6, start=0.2, end=1.0, image=ref),)
        maps.append(_control_map((24, 16, 60, 56)))
    spec = job(controls=controls, n=2)
    (result,) = run_batch(
        sdxl_control, [BatchItem(spec, control_images=tuple(maps))], invariant=True
    )
    nets = [
        ControlNetModel.from_pretrained(sdxl_control_dir / "controlnets" / c.id) for c in controls
    ]
    pipe = StableDiffusionXLControlNetPipeline(
        **sdxl_control.pipe.components,
        controlnet=MultiControlNetModel(nets) if stacked else nets[0],
    )
    want = []
    for i in range(spec.n):
        pipe.scheduler = build_scheduler(spec.scheduler, sdxl_control.scheduler_config)
        want.append(
            stock_image(
                pipe,
                spec,
                i,
                image=maps if stacked else maps[0],
                controlnet_conditioning_scale=[c.scale for c in controls]
                if stacked
                else controls[0].scale,
                control_guidance_start=[c.start for c in controls]
                if stacked
                else controls[0].start,
                control_guidance_end=[c.end for c in controls] if stacked else controls[0].end,
            )
        )
    assert_identical(pixels(result), want)
    plain = run_batch(sdxl_control, [BatchItem(job(n=1))], invariant=True)[0]
    assert not np.array_equal(pixels(plain)[0], want[0])


def test_a_controlnet_of_another_family_is_unavailable_and_the_model_serves(
    sdxl_control_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from builtin_model.tiny import save_tiny_controlnet

    directory = tmp_path / "sdxl"
    shutil.copytree(sdxl_control_dir, directory)
    sd15 = save_tiny_controlnet(tmp_path / "sd15", "sd15-edges", unet=_sd_unet(tiny_model_dir))
    shutil.copytree(sd15, directory / "controlnets" / "sd15-edges")
    model = load_model(Settings(model=str(directory), model_id="sdxl", device="cpu"))
    assert [c.id for c in model.info.controls] == ["depth", "edges"]
    (misfit,) = model.info.unavailable_adapters
    assert misfit.id == "sd15-edges" and "another model family" in misfit.reason
    assert isinstance(run_batch(model, [BatchItem(job())], invariant=True)[0], list)


def _sd_unet(model_dir: Path) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model_dir / "unet")
