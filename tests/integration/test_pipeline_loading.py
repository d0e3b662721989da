"""Loading a diffusers pipeline from disk, the scheduler table and the PNG chunk (in-process)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from imagegen.core.contract import SCHEDULER_NAMES, JobSpec
from imagegen.core.settings import Settings
from worker.encoding import encode_png, image_parameters
from worker.pipeline import load_model
from worker.schedulers import build_scheduler, name_of, scheduler_class


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_model(Settings(model=str(tiny_model_dir), model_id="tiny"))


def test_model_without_a_card_gets_hub_style_defaults(tiny) -> None:  # type: ignore[no-untyped-def]
    assert tiny.info.id == "tiny"
    assert (tiny.info.width, tiny.info.height) == (64, 64)  # unet sample 32 x vae scale 2
    assert tiny.info.steps == 30 and tiny.info.guidance_scale == 7.5
    assert tiny.info.scheduler == "euler"
    assert tiny.info.schedulers == list(SCHEDULER_NAMES)
    assert str(tiny.dtype) == "torch.float32" and tiny.device.type == "cpu"
    assert not tiny.attention_slicing and not tiny.vae_tiling  # no GPU: nothing is short


def test_every_scheduler_name_builds_a_fresh_scheduler(tiny) -> None:  # type: ignore[no-untyped-def]
    for name in SCHEDULER_NAMES:
        first = build_scheduler(name, tiny.scheduler_config)
        second = build_scheduler(name, tiny.scheduler_config)
        assert first is not second
        assert type(first) is scheduler_class(name)[0]
        assert name_of(first) == name


def test_attention_slicing_and_tiling_can_be_forced(tiny_model_dir: Path) -> None:
    model = load_model(Settings(model=str(tiny_model_dir), attention_slicing="on", vae_tiling="on"))
    assert model.attention_slicing and model.vae_tiling
    assert model.pipe.vae.use_tiling


def test_png_carries_the_parameters_chunk() -> None:
    spec = JobSpec(
        prompt="ünïcode ✓ prompt",
        negative_prompt="",
        width=64,
        height=64,
        steps=2,
        guidance_scale=1.0,
        seed=2**32 - 1,
        n=2,
        scheduler="euler",
        model="m",
    )
    png = encode_png(Image.new("RGB", (64, 64)), image_parameters(spec, 1))
    params = json.loads(Image.open(io.BytesIO(png)).text["parameters"])  # type: ignore[attr-defined]
    assert params["seed"] == 0  # (2^32 - 1) + 1 wraps around
    assert params["prompt"] == "ünïcode ✓ prompt"
    assert png == encode_png(Image.new("RGB", (64, 64)), image_parameters(spec, 1))
