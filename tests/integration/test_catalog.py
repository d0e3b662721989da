"""The model catalog (IMAGEGEN_MODELS_FILE): checked whole at start with one line per problem
naming the entry and the field; an entry's defaults, caps, dtype and swapped VAE are what the
worker serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from builtin_model.tiny import save_tiny_pipeline
from imagegen.core.settings import Settings
from tests.stack import ROOT, batch_job
from tests.stock import stock_image
from worker.batch_loop import BatchItem, run_batch
from worker.catalog import CatalogError, load_catalog
from worker.models import ModelManager


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_every_problem_is_one_line_naming_the_entry_and_the_field(tmp_path: Path) -> None:
    catalog = write(
        tmp_path,
        """
models:
  - id: sd15
    source: /models/sd15
    defaults: {steps: 0, scheduler: fancy}
  - id: xl
    source: stabilityai/stable-diffusion-xl-base-1.0
    dtype: float8
    colour: blue
  - source: /models/nameless
""",
    )
    with pytest.raises(CatalogError) as caught:
        load_catalog(catalog)
    where = f"IMAGEGEN_MODELS_FILE {catalog}"
    assert caught.value.problems == [
        f"{where}: models[0] (sd15): defaults.steps: Input should be greater than or equal to 1",
        f"{where}: models[0] (sd15): defaults.scheduler: must be one of "
        "euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, unipc, pndm, lcm, default",
        f"{where}: models[1] (xl): dtype: Input should be 'float16', 'bfloat16' or 'float32'",
        f"{where}: models[1] (xl): colour: Extra inputs are not permitted",
        f"{where}: models[2]: id: Field required",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("models: [{id: a, source: /x}, {id: a, source: /y}]", "model id 'a' is listed twice"),
        ("models: [", "not YAML"),
        ("models: []", "models: List should have at least 1 item"),
    ],
)
def test_a_bad_catalog_file_is_named(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(CatalogError, match=problem):
        load_catalog(write(tmp_path, text))


def test_the_worker_refuses_to_start_with_each_problem_on_its_line(tmp_path: Path) -> None:
    catalog = write(tmp_path, "models: [{id: a, source: /x, max_steps: 0}, {id: b}]")
    proc = subprocess.run(
        [sys.executable, "-m", "imagegen", "worker"],
        env={
            "PATH": "/usr/bin:/bin",
            "IMAGEGEN_MODELS_FILE": str(catalog),
            "IMAGEGEN_REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    refusals = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert len(refusals) == 2, proc.stderr[-2000:]
    assert "models[0] (a): max_steps" in refusals[0] and "models[1] (b): source" in refusals[1]
    assert "Traceback" not in proc.stderr


def test_an_entry_s_defaults_caps_and_vae_are_served(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = save_tiny_pipeline(tmp_path / "other", seed=3)  # its VAE is the swap
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    catalog = write(
        tmp_path,
        f"""
models:
  - id: tuned
    source: {model}
    vae: {other / "vae"}
    dtype: float32
    defaults: {{steps: 7, guidance_scale: 3.5, scheduler: ddim}}
    max_steps: 40
""",
    )
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    info = manager.entries["tuned"].info
    assert (info.steps, info.guidance_scale, info.scheduler, info.max_steps) == (7, 3.5, "ddim", 40)
    served = manager.acquire("tuned").model
    swapped = AutoencoderKL.from_pretrained(other / "vae")
    for name, tensor in swapped.state_dict().items():
        assert torch.equal(served.pipe.vae.state_dict()[name], tensor), name
    spec = batch_job(model="tuned", steps=2)
    (ours,) = run_batch(served, [BatchItem(spec)], invariant=True)
    assert isinstance(ours, list)
    stock = StableDiffusionPipeline.from_pretrained(model, vae=swapped)
    assert np.array_equal(np.asarray(ours[0]), stock_image(stock, spec))


def test_a_vae_file_is_swapped_in(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A VAE shipped as one file in the original layout (`vae-ft-mse-...safetensors`)."""
    from builtin_model.single_file import save_vae_single_file

    other = AutoencoderKL.from_pretrained(save_tiny_pipeline(tmp_path / "other", seed=4) / "vae")
    file = save_vae_single_file(other, tmp_path / "vae-ft-tiny.safetensors")
    catalog = write(tmp_path, f"models: [{{id: m, source: {tiny_model_dir}, vae: {file}}}]")
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    served = manager.acquire("m").model
    for name, tensor in other.state_dict().items():
        assert torch.equal(served.pipe.vae.state_dict()[name], tensor), name


def test_the_catalog_gives_a_model_its_controlnets(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A hub model has no `controlnets/` beside it: the catalog names them."""
    from PIL import Image

    from builtin_model.tiny import save_tiny_adapters
    from imagegen.core.contract import ControlRef, InputRef

    beside = tmp_path / "beside"
    shutil.copytree(tiny_model_dir, beside)
    save_tiny_adapters(beside)
    edges = beside / "controlnets" / "edges"
    catalog = write(
        tmp_path,
        f"""
models:
  - {{id: own, source: {beside}}}
  - id: named
    source: {tiny_model_dir}
    controlnets: {{edges: {edges}, missing: {tmp_path / "nowhere"}}}
""",
    )
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    assert [c.id for c in manager.entries["named"].info.controls] == ["edges", "missing"]
    named = manager.acquire("named").model
    assert [c.id for c in named.info.controls] == ["edges"]
    assert [u.id for u in named.info.unavailable_adapters] == ["missing"]
    ref = InputRef(sha256="0" * 64, width=64, height=64)
    control = ControlRef(id="edges", scale=1.0, start=0.0, end=1.0, image=ref)
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (16, 16, 48, 48))
    results = []
    for model_id in ("named", "own"):
        spec = batch_job(model=model_id, controls=(control,), steps=2)
        model = manager.acquire(model_id).model
        (result,) = run_batch(model, [BatchItem(spec, control_images=(image,))], invariant=True)
        assert isinstance(result, list)
        results.append(np.asarray(result[0]))
    assert np.array_equal(*results)
