"""Single-file checkpoints (`model.safetensors`, as fine-tunes ship on civitai): a tiny SD 1.x
pipeline written in the original layout (checked first: diffusers' own reader gives every
tensor back), served through the catalog with its family's configs, equal to diffusers'
`from_single_file` pipeline; `imagegen convert` writes a diffusers directory from it; a file
that cannot be read is an unavailable model, never a worker down."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from builtin_model.single_file import save_single_file
from imagegen.cli.main import app as cli
from imagegen.core.settings import Settings
from tests.stack import batch_job
from tests.stock import stock_image
from worker.batch_loop import BatchItem, run_batch
from worker.models import ModelManager


@pytest.fixture(autouse=True)
def offline_with_an_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """As a worker after compose's prefetch runs: offline, and here no configs cached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    return save_single_file(pipe, tmp_path_factory.mktemp("single") / "myModel_v10.safetensors")


def _catalog(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def _stock(pipe: StableDiffusionPipeline) -> np.ndarray:
    return stock_image(pipe, batch_job(steps=3))


def test_the_written_file_reads_back_through_diffusers_unchanged(
    checkpoint: Path, tiny_model_dir: Path
) -> None:
    original = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    back = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(tiny_model_dir))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(original, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_a_single_file_is_served_as_diffusers_reads_it(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    catalog = _catalog(
        tmp_path,
        f"models: [{{id: mine, source: {checkpoint}, config: {tiny_model_dir}, "
        "defaults: {steps: 3}}]",
    )
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    info = manager.entries["mine"].info
    assert (info.source_format, info.family, info.steps) == ("single_file", "sd15", 3)
    assert manager.entries["mine"].estimate == checkpoint.stat().st_size
    served = manager.acquire("mine").model
    (ours,) = run_batch(served, [BatchItem(batch_job(model="mine", steps=3))], invariant=True)
    assert isinstance(ours, list)
    stock = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(tiny_model_dir))
    assert np.array_equal(np.asarray(ours[0]), _stock(stock))


def test_convert_writes_a_diffusers_directory(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "converted"
    result = CliRunner().invoke(
        cli, ["convert", str(checkpoint), str(out), "--config", str(tiny_model_dir)]
    )
    assert result.exit_code == 0, result.output
    converted = StableDiffusionPipeline.from_pretrained(out)
    original = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    assert np.array_equal(_stock(converted), _stock(original))


def test_files_that_cannot_serve_are_unavailable_with_their_reason(
    checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[:4096])
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    catalog = _catalog(
        tmp_path,
        f"""
models:
  - {{id: unknown, source: {checkpoint}}}
  - {{id: truncated, source: {truncated}, config: {tiny_model_dir}}}
  - {{id: noise, source: {noise}}}
  - {{id: gone, source: {tmp_path / "gone.safetensors"}}}
  - {{id: fine, source: {tiny_model_dir}}}
""",
    )
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    assert manager.servable_ids() == ["truncated", "fine"]  # truncated: only its load fails
    reasons = {m: manager.unavailable(m) or "" for m in ("unknown", "noise", "gone")}
    # Recognised as SD 1.x, whose configs are not in this (offline) cache.
    assert "configs of stable-diffusion-v1-5/stable-diffusion-v1-5" in reasons["unknown"]
    assert "imagegen prefetch" in reasons["unknown"], reasons
    assert "cannot read the model at" in reasons["noise"], reasons
    assert "no checkpoint file at" in reasons["gone"], reasons
    from worker.models import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="loading failed"):
        manager.acquire("truncated")
    assert manager.acquire("fine").model.info.id == "fine"


def test_an_sdxl_single_file_is_served_as_diffusers_reads_it(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from builtin_model.tiny import save_tiny_sdxl_pipeline

    configs = save_tiny_sdxl_pipeline(tmp_path / "xl")
    original = StableDiffusionXLPipeline.from_pretrained(configs)
    checkpoint = save_single_file(original, tmp_path / "myXL_v2.safetensors")
    back = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(configs))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(original, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    catalog = _catalog(tmp_path, f"models: [{{id: xl, source: {checkpoint}, config: {configs}}}]")
    manager = ModelManager(Settings(models_file=catalog, device="cpu"))
    served = manager.acquire("xl").model
    assert (served.info.family, served.info.source_format) == ("sdxl", "single_file")
    spec = batch_job(model="xl", steps=3, negative_prompt="")
    (ours,) = run_batch(served, [BatchItem(spec)], invariant=True)
    assert isinstance(ours, list)
    assert np.array_equal(np.asarray(ours[0]), stock_image(back, spec))
