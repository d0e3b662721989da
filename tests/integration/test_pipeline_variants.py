"""fp16 weights variants: the loader reads `*.fp16.*` files when it loads fp16 weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from builtin_model.tiny import build_tiny_pipeline, save_tiny_pipeline
from imagegen.core.settings import Settings
from worker.pipeline import has_fp16_variant, load_model, weights_variant


def _save_fp16_variant(directory: Path, seed: int) -> Path:
    # What hub repositories such as SD 1.5 ship: half-precision weights named `*.fp16.*`.
    build_tiny_pipeline(seed).to(torch.float16).save_pretrained(
        directory, variant="fp16", safe_serialization=True
    )
    return directory


def _first_unet_weight(pipe: object) -> torch.Tensor:
    return next(pipe.unet.parameters()).detach()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 weights from seed 0 and an fp16 variant from seed 1, so the two tell apart."""
    directory = save_tiny_pipeline(tmp_path_factory.mktemp("variants") / "both", seed=0)
    return _save_fp16_variant(directory, seed=1)


def test_fp16_loads_the_fp16_variant_and_fp32_the_full_weights(both: Path) -> None:
    fp16_weights = _first_unet_weight(build_tiny_pipeline(1).to(torch.float16))
    fp32_weights = _first_unet_weight(build_tiny_pipeline(0))
    half = load_model(Settings(model=str(both), device="cpu", dtype="float16"))
    assert half.pipe.unet.dtype == torch.float16
    assert torch.equal(_first_unet_weight(half.pipe), fp16_weights)
    full = load_model(Settings(model=str(both), device="cpu", dtype="float32"))
    assert torch.equal(_first_unet_weight(full.pipe), fp32_weights)


def test_a_model_with_only_fp16_weights_loads_in_any_dtype(
    tmp_path: Path,
) -> None:
    # What the prefetch leaves in the cache for GPU workers: a CPU worker (auto = fp32) can
    # still load it.
    directory = _save_fp16_variant(tmp_path / "fp16-only", seed=1)
    model = load_model(Settings(model=str(directory), device="cpu", dtype="auto"))
    assert model.pipe.unet.dtype == torch.float32
    expected = _first_unet_weight(build_tiny_pipeline(1).to(torch.float16)).float()
    assert torch.equal(_first_unet_weight(model.pipe), expected)


def test_variant_choice_from_a_hub_style_file_list() -> None:
    sd15 = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
    ]
    plain = [f for f in sd15 if ".fp16." not in f]
    assert has_fp16_variant(sd15) and not has_fp16_variant(plain)
    assert weights_variant(sd15, torch.float16) == "fp16"
    assert weights_variant(sd15, torch.float32) is None
    assert weights_variant(plain, torch.float16) is None
    fp16_only = [f for f in sd15 if f not in plain or not f.endswith(".safetensors")]
    assert weights_variant(fp16_only, torch.float32) == "fp16"
