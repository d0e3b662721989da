"""LoRAs and ControlNets in the batch loop, proved against diffusers' own pipelines on the tiny
model: the same bytes as `StableDiffusionPipeline` with the same LoRAs loaded and as
`StableDiffusionControlNetPipeline`; switching adapters leaves nothing behind; a LoRA that does
not fit is listed unavailable while the model serves the others."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

from builtin_model.tiny import save_misfit_lora, save_tiny_adapters
from imagegen.core.contract import ControlRef, InputRef, JobSpec, LoraRef
from imagegen.core.settings import Settings
from tests.stack import ROOT, batch_job
from worker.batch_loop import BatchItem, run_batch
from worker.inference import Inference
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def adapter_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("adapters") / "tiny"
    shutil.copytree(tiny_model_dir, directory)
    return save_tiny_adapters(directory, controlnets=("edges", "blobs"))


@pytest.fixture(scope="module")
def model(adapter_model_dir: Path) -> LoadedModel:
    return load_model(Settings(model=str(adapter_model_dir), model_id="tiny", device="cpu"))


def job(**changes: Any) -> JobSpec:
    return batch_job(**changes)


def control(
    scale: float = 1.0, start: float = 0.0, end: float = 1.0, net: str = "edges"
) -> ControlRef:
    image = InputRef(sha256="0" * 64, width=64, height=64)
    return ControlRef(id=net, scale=scale, start=start, end=end, image=image)


def shape_image(box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), box)
    return image


def pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def batch(model: LoadedModel, items: list[BatchItem]) -> list[list[np.ndarray]]:
    results = Inference(model).run(items)
    out = []
    for result in results:
        assert isinstance(result, list), result
        out.append(pixels(result))
    return out


def stock_lora(model_dir: Path, spec: JobSpec) -> list[np.ndarray]:
    """A fresh stock pipeline with the spec's LoRAs loaded and set, one call per image."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    for lora in spec.loras:
        pipe.load_lora_weights(model_dir / "loras" / lora.id, adapter_name=lora.id)
    pipe.set_adapters([lora.id for lora in spec.loras], [lora.scale for lora in spec.loras])
    return _stock_calls(pipe, spec, {})


def stock_control(
    model_dir: Path, spec: JobSpec, images: Image.Image | list[Image.Image]
) -> list[np.ndarray]:
    """A fresh `StableDiffusionControlNetPipeline` (plus the spec's LoRAs), one call per image;
    several controls go in diffusers' own MultiControlNetModel, as lists."""
    base = StableDiffusionPipeline.from_pretrained(model_dir)
    nets = [
        ControlNetModel.from_pretrained(model_dir / "controlnets" / c.id) for c in spec.controls
    ]
    multi = isinstance(images, list)
    net: Any = MultiControlNetModel(nets) if multi else nets[0]
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=net,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if spec.loras:
        for lora in spec.loras:
            pipe.load_lora_weights(model_dir / "loras" / lora.id, adapter_name=lora.id)
        pipe.set_adapters([lora.id for lora in spec.loras], [lora.scale for lora in spec.loras])
    controls = spec.controls
    extra = {
        "image": images,
        "controlnet_conditioning_scale": [c.scale for c in controls]
        if multi
        else controls[0].scale,
        "control_guidance_start": [c.start for c in controls] if multi else controls[0].start,
        "control_guidance_end": [c.end for c in controls] if multi else controls[0].end,
    }
    return _stock_calls(pipe, spec, extra)


def _stock_calls(pipe: Any, spec: JobSpec, extra: dict[str, Any]) -> list[np.ndarray]:
    images = []
    config = dict(pipe.scheduler.config)
    for i in range(spec.n):
        pipe.scheduler = build_scheduler(spec.scheduler, config)
        with torch.inference_mode():
            result = pipe(
                prompt=[spec.prompt],
                negative_prompt=[spec.negative_prompt],
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(spec.image_seed(i))],
                output_type="pil",
                **extra,
            )
        images += result.images
    return pixels(images)


def test_the_worker_announces_its_adapters_and_controls(model: LoadedModel) -> None:
    assert [a.id for a in model.info.adapters] == ["dots", "lines"]
    assert {a.kind for a in model.info.adapters} == {"lora"}
    assert [c.id for c in model.info.controls] == ["blobs", "edges"]
    assert model.info.adapters[1].description == "test LoRA lines"


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_lora_jobs_match_the_stock_pipeline_with_the_lora_loaded(
    model: LoadedModel, adapter_model_dir: Path, scheduler: str
) -> None:
    loras = (LoraRef(id="lines", scale=0.8), LoraRef(id="dots", scale=-1.5))
    specs = [
        job(scheduler=scheduler, loras=loras, n=2),
        job(scheduler=scheduler, loras=loras, prompt="a green sphere", guidance_scale=1.0),
    ]
    got = batch(model, [BatchItem(s) for s in specs])
    for spec, images in zip(specs, got, strict=True):
        want = stock_lora(adapter_model_dir, spec)
        assert all(np.array_equal(a, b) for a, b in zip(images, want, strict=True))
    # And the LoRAs do something: the same job without them differs.
    plain = batch(model, [BatchItem(specs[0].model_copy(update={"loras": ()}))])[0]
    assert not np.array_equal(plain[0], got[0][0])


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "ddim"])
def test_control_jobs_match_the_stock_controlnet_pipeline(
    model: LoadedModel, adapter_model_dir: Path, scheduler: str
) -> None:
    """Two control jobs in one batch, each with its own image, scale and step window."""
    a, b = shape_image((8, 8, 30, 30)), shape_image((30, 20, 60, 50))
    specs = [
        job(scheduler=scheduler, controls=(control(1.0),), n=2),
        job(scheduler=scheduler, controls=(control(0.6, 0.25, 0.75),), prompt="a green sphere"),
    ]
    got = batch(
        model,
        [
            BatchItem(specs[0], None, control_images=(a,)),
            BatchItem(specs[1], None, control_images=(b,)),
        ],
    )
    for spec, image, images in zip(specs, (a, b), got, strict=True):
        want = stock_control(adapter_model_dir, spec, image)
        assert all(np.array_equal(x, y) for x, y in zip(images, want, strict=True))
    plain = batch(model, [BatchItem(specs[0].model_copy(update={"controls": ()}))])[0]
    assert not np.array_equal(plain[0], got[0][0])


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_stacked_controls_match_the_stock_multi_controlnet(
    model: LoadedModel, adapter_model_dir: Path, scheduler: str
) -> None:
    """Two ControlNets a job (diffusers' MultiControlNetModel), two such jobs in one batch,
    each with its own images, scales and windows; the order of the nets is the job's."""
    a, b = shape_image((8, 8, 30, 30)), shape_image((30, 20, 60, 50))
    pair = (control(1.0), control(0.7, 0.2, 0.9, net="blobs"))
    other = (control(0.5, 0.0, 0.5), control(1.3, net="blobs"))
    specs = [
        job(scheduler=scheduler, controls=pair, n=2),
        job(scheduler=scheduler, controls=other, prompt="a green sphere", seed=9),
    ]
    items = [
        BatchItem(specs[0], None, control_images=(a, b)),
        BatchItem(specs[1], None, control_images=(b, a)),
    ]
    got = batch(model, items)
    for spec, images, result in zip(specs, ([a, b], [b, a]), got, strict=True):
        want = stock_control(adapter_model_dir, spec, images)
        assert all(np.array_equal(x, y) for x, y in zip(result, want, strict=True))
    single = batch(
        model,
        [BatchItem(specs[0].model_copy(update={"controls": pair[:1]}), None, control_images=(a,))],
    )[0]
    assert not np.array_equal(single[0], got[0][0])
    # The GPU layout: one call a net for every row, scales per row; float rounding only.
    for x_images, y_images in zip(got, run_batch(model, items, invariant=False), strict=True):
        assert isinstance(y_images, list)
        for x, y in zip(x_images, y_images, strict=True):
            assert np.abs(x.astype(int) - np.asarray(y, dtype=int)).max() <= 2


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_control_with_images_in_matches_the_stock_controlnet_img2img_and_inpaint(
    model: LoadedModel, adapter_model_dir: Path, task: str, scheduler: str
) -> None:
    """`controls` with `image` (and `mask`): the loop equals StableDiffusionControlNetImg2Img-
    and ...InpaintPipeline, the control window counted over the steps the strength leaves."""
    from diffusers import (
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
    )

    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 0, 64, 40))
    ref = InputRef(sha256="0" * 64, width=64, height=64)
    spec = job(
        scheduler=scheduler,
        task=task,
        image=ref,
        mask=ref if task == "inpaint" else None,
        strength=0.75,
        steps=8,
        controls=(control(0.8, 0.1, 0.7),),
        n=2,
    )
    a = shape_image((8, 8, 40, 40))
    item = BatchItem(spec, None, image=init, mask=mask if task == "inpaint" else None,
                     control_images=(a,))  # fmt: skip
    (got,) = run_batch(model, [item], invariant=True)
    assert isinstance(got, list)
    base = StableDiffusionPipeline.from_pretrained(adapter_model_dir)
    net = ControlNetModel.from_pretrained(adapter_model_dir / "controlnets" / "edges")
    kind: Any = (
        StableDiffusionControlNetImg2ImgPipeline
        if task == "img2img"
        else StableDiffusionControlNetInpaintPipeline
    )
    pipe = kind(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=net,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    extra: dict[str, Any] = {
        "image": [init],
        "control_image": a,
        "strength": 0.75,
        "controlnet_conditioning_scale": 0.8,
        "control_guidance_start": 0.1,
        "control_guidance_end": 0.7,
    }
    if task == "inpaint":
        extra["mask_image"] = [mask]
    want = _stock_calls(pipe, spec, extra)
    assert all(np.array_equal(np.asarray(x), y) for x, y in zip(got, want, strict=True))


def test_lora_and_control_together_match_the_stock_pipeline(
    model: LoadedModel, adapter_model_dir: Path
) -> None:
    image = shape_image((16, 16, 48, 48))
    spec = job(loras=(LoraRef(id="lines", scale=0.5),), controls=(control(1.2, 0.0, 0.5),))
    got = batch(model, [BatchItem(spec, None, control_images=(image,))])[0]
    assert all(
        np.array_equal(x, y)
        for x, y in zip(got, stock_control(adapter_model_dir, spec, image), strict=True)
    )


def test_unbatched_control_rows_are_close_to_the_invariant_ones(model: LoadedModel) -> None:
    """The GPU layout (one UNet and one ControlNet call for every row, scales per row) gives
    what the per-image layout gives, to float rounding."""
    a, b = shape_image((8, 8, 30, 30)), shape_image((30, 20, 60, 50))
    specs = [job(controls=(control(1.0),), n=2), job(controls=(control(0.6, 0.25, 0.75),), seed=3)]
    items = [
        BatchItem(specs[0], None, control_images=(a,)),
        BatchItem(specs[1], None, control_images=(b,)),
    ]
    invariant = run_batch(model, items, invariant=True)
    fast = run_batch(model, items, invariant=False)
    for x_images, y_images in zip(invariant, fast, strict=True):
        assert isinstance(x_images, list) and isinstance(y_images, list)
        for x, y in zip(x_images, y_images, strict=True):
            diff = np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max()
            assert diff <= 2, diff


def test_switching_adapters_never_leaks(model: LoadedModel) -> None:
    """plain → LoRA → LoRA at 0.5 + control → plain: the last plain job is byte-identical to
    the first; so is a plain job after a batch that failed mid-loop with a LoRA active."""
    inference = Inference(model)
    image = shape_image((16, 16, 48, 48))
    plain = job(seed=5)

    def run(spec: JobSpec, control_image: Image.Image | None = None) -> list[np.ndarray]:
        maps = (control_image,) if control_image is not None else ()
        result = inference.run([BatchItem(spec, None, control_images=maps)])[0]
        assert isinstance(result, list)
        return pixels(result)

    first = run(plain)
    with_lora = run(plain.model_copy(update={"loras": (LoraRef(id="lines", scale=1.0),)}))
    both = run(
        plain.model_copy(
            update={"loras": (LoraRef(id="lines", scale=0.5),), "controls": (control(),)}
        ),
        image,
    )
    assert not np.array_equal(first[0], with_lora[0])
    assert not np.array_equal(with_lora[0], both[0])
    assert np.array_equal(run(plain)[0], first[0])

    def explode(step: int, _rows: int) -> None:
        if step == 1:
            raise RuntimeError("injected failure mid-loop")

    failing = plain.model_copy(update={"loras": (LoraRef(id="dots", scale=2.0),)})
    with pytest.raises(RuntimeError, match="injected"):
        inference.run([BatchItem(failing)], on_loop_step=explode)
    assert model.adapters.active == ()  # restored: no LoRA active
    assert np.array_equal(run(plain)[0], first[0])


def test_a_lora_switch_is_a_change_of_scales_not_a_load(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file is read when a batch switches adapters: loading is refused after start."""

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a LoRA was loaded from disk while serving")

    monkeypatch.setattr(type(model.pipe), "load_lora_weights", refuse)
    before = model.adapters.switches
    for loras in ((LoraRef(id="lines", scale=1.0),), (), (LoraRef(id="dots", scale=0.3),)):
        assert isinstance(Inference(model).run([BatchItem(job(loras=loras, steps=1))])[0], list)
    assert model.adapters.switches >= before + 3


def test_a_lora_that_does_not_fit_is_unavailable_and_the_model_serves_the_rest(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, directory)
    save_tiny_adapters(directory)
    save_misfit_lora(directory)
    model = load_model(Settings(model=str(directory), model_id="tiny", device="cpu"))
    assert [a.id for a in model.info.adapters] == ["dots", "lines"]
    (misfit,) = model.info.unavailable_adapters
    assert misfit.id == "misfit" and "does not fit" in misfit.reason and "to_q" in misfit.reason
    spec = job(loras=(LoraRef(id="lines", scale=1.0),), steps=1)
    assert isinstance(Inference(model).run([BatchItem(spec)])[0], list)


def test_the_gpu_bench_adapters_load_and_act_in_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/gpu_sd15.py's random SD 1.5 LoRA and ControlNet (here on its tiny variant) are in
    the layout the worker reads, pass its checks, and change the image."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from gpu_sd15 import add_sd15_adapters, build_sd15

    directory = tmp_path / "sd15"
    build_sd15(directory, small=True)
    lora_id, control_id = add_sd15_adapters(directory)
    model = load_model(Settings(model=str(directory), device="cpu"))
    assert [a.id for a in model.info.adapters] == [lora_id]
    assert [c.id for c in model.info.controls] == [control_id]
    assert "rank 16" in model.info.adapters[0].description
    spec = job(model=model.info.id, steps=1)
    ref = control().model_copy(update={"id": control_id})
    items = [
        BatchItem(spec),
        BatchItem(spec.model_copy(update={"loras": (LoraRef(id=lora_id, scale=1.0),)})),
        BatchItem(
            spec.model_copy(update={"controls": (ref,)}),
            control_images=(shape_image((16, 16, 48, 48)),),
        ),
    ]
    results = [run_batch(model, [item], invariant=True)[0] for item in items]
    assert all(isinstance(result, list) for result in results), results
    plain, lora, controlled = (np.asarray(result[0]) for result in results)
    assert not np.array_equal(plain, lora)
    assert not np.array_equal(plain, controlled)
