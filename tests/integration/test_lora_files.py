"""LoRA files as users download them, served by the batch loop and compared with diffusers' own
pipeline given the same file (`load_lora_weights(file)` + `set_adapters([id], [scale])`): a
kohya/civitai file dropped into `loras/`, a diffusers LoRA whose alpha is not its rank, the LoRA
library (IMAGEGEN_LORA_DIR) with files of this model's family and another's; bad files listed
unavailable with their reason while the model serves the rest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from builtin_model.tiny import (
    save_diffusers_lora,
    save_kohya_lora,
    save_misfit_lora,
    save_other_family_lora,
)
from imagegen.core.contract import JobSpec, LoraRef
from imagegen.core.settings import Settings
from tests.stack import batch_job
from tests.stock import stock_image
from worker.batch_loop import BatchItem, run_batch
from worker.pipeline import LoadedModel, load_model
from worker.schedulers import build_scheduler


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-files")
    model = root / "tiny"
    shutil.copytree(tiny_model_dir, model)
    library = root / "library"
    library.mkdir()
    save_kohya_lora(model / "loras" / "myStyle_v10.safetensors", model, rank=4, alpha=8, seed=5)
    save_diffusers_lora(model / "loras" / "scaled", model, rank=4, alpha=8, seed=6)
    save_misfit_lora(model)  # loras/misfit/: to_q 48 -> 48 where the model has 64 -> 64
    (model / "loras" / "broken.safetensors").write_bytes(b"\x00" * 64)
    save_kohya_lora(library / "libstyle.safetensors", model, rank=2, alpha=1, seed=7)
    (library / "libstyle.json").write_text('{"description": "from the library"}')
    save_other_family_lora(library / "sdxlstyle.safetensors")
    return {"model": model, "library": library}


@pytest.fixture(scope="module")
def served(files: dict[str, Path]) -> LoadedModel:
    settings = Settings(
        model=str(files["model"]), model_id="tiny", device="cpu", lora_dir=files["library"]
    )
    return load_model(settings)


def _ours(model: LoadedModel, spec: JobSpec) -> np.ndarray:
    result = run_batch(model, [BatchItem(spec)], invariant=True)[0]
    assert isinstance(result, list), result
    return np.asarray(result[0])


def _stock(model_dir: Path, spec: JobSpec, file: Path | dict[str, torch.Tensor]) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    (lora,) = spec.loras
    if isinstance(file, Path):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=lora.id)
    else:
        pipe.load_lora_weights(file, adapter_name=lora.id)
    pipe.set_adapters([lora.id], [lora.scale])
    pipe.scheduler = build_scheduler(spec.scheduler, dict(pipe.scheduler.config))
    return stock_image(pipe, spec)


def test_each_file_is_served_or_listed_unavailable_with_its_reason(served: LoadedModel) -> None:
    info = served.info
    assert [(a.id, a.format) for a in info.adapters] == [
        ("libstyle", "kohya"),
        ("myStyle_v10", "kohya"),
        ("scaled", "diffusers"),
    ]
    assert info.adapters[0].description == "from the library"
    reasons = {u.id: u.reason for u in info.unavailable_adapters}
    assert set(reasons) == {"broken", "misfit"}, reasons  # sdxlstyle is not this family's
    assert "unreadable" in reasons["broken"]
    assert reasons["misfit"].startswith("does not fit down_blocks.1.attentions.0"), reasons
    assert "[4, 48]" in reasons["misfit"] and "[4, 64]" in reasons["misfit"]


@pytest.mark.parametrize(
    ("adapter", "file"),
    [
        ("myStyle_v10", "loras/myStyle_v10.safetensors"),
        ("scaled", "loras/scaled/pytorch_lora_weights.safetensors"),
        ("libstyle", "../library/libstyle.safetensors"),
    ],
)
def test_a_served_lora_equals_diffusers_own_pipeline_with_the_file(
    served: LoadedModel, files: dict[str, Path], adapter: str, file: str
) -> None:
    spec = batch_job(loras=(LoraRef(id=adapter, scale=0.7),), steps=3)
    ours = _ours(served, spec)
    assert np.array_equal(ours, _stock(files["model"], spec, files["model"] / file))
    assert not np.array_equal(ours, _ours(served, batch_job(steps=3)))


def test_alpha_counts_as_in_diffusers_not_as_a_bare_state_dict(
    served: LoadedModel, files: dict[str, Path]
) -> None:
    """The file's metadata says alpha 8 for rank 4 (a scale of 2): loaded from its bare
    tensors, as this worker did before, the image differs."""
    spec = batch_job(loras=(LoraRef(id="scaled", scale=1.0),), steps=3)
    weights = files["model"] / "loras" / "scaled" / "pytorch_lora_weights.safetensors"
    bare = _stock(files["model"], spec, load_file(str(weights)))
    assert not np.array_equal(_ours(served, spec), bare)


def test_library_files_added_or_removed_show_up_without_a_restart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from worker.models import ModelManager

    library = tmp_path / "library"
    library.mkdir()
    save_kohya_lora(library / "first.safetensors", tiny_model_dir, seed=8)
    settings = Settings(
        models=f"warm={tiny_model_dir},cold={tiny_model_dir}",
        device="cpu",
        lora_dir=library,
        lora_rescan_s=3600,
    )
    manager = ModelManager(settings)
    warm = manager.acquire("warm").model
    assert [a.id for a in warm.info.adapters] == ["first"]
    added = save_kohya_lora(library / "second.safetensors", tiny_model_dir, seed=9)
    (library / "first.safetensors").unlink()
    (library / "broken.safetensors").write_bytes(b"\x00" * 64)
    manager.rescan_loras()  # not due yet: nothing changes
    assert [a.id for a in warm.info.adapters] == ["first"]
    manager.rescan_loras(force=True)  # as on SIGHUP
    assert [a.id for a in warm.info.adapters] == ["second"]
    assert [u.id for u in warm.info.unavailable_adapters] == ["broken"]
    cold = manager.entries["cold"].info
    assert [a.id for a in cold.adapters] == ["second"]
    spec = batch_job(loras=(LoraRef(id="second", scale=0.9),), steps=3)
    assert np.array_equal(_ours(warm, spec), _stock(tiny_model_dir, spec, added))
    assert "first" not in str(warm.pipe.get_list_adapters())
