"""The fine-tuning recipe (worker/training) on a tiny random Stable Diffusion pipeline: it trains
beside a pipeline that keeps serving unchanged, its file loads in diffusers as it was trained
(the LoRA through `load_lora_weights`, the trigger through `load_textual_inversion`), and a
training resumed from a checkpoint goes on exactly as one never stopped."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from builtin_model.tiny import build_tiny_pipeline
from worker.training.export import BUNDLE, kohya_weights, split
from worker.training.recipe import Example, LoraTrainer, TrainingConfig

PROMPT = "a large red zxq in the center on a white background"


def examples() -> list[Example]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(4):
        pixels = np.full((80, 96, 3), 240, dtype=np.uint8)  # not square: centre-cropped
        x = 20 + 10 * i
        pixels[20:60, x : x + 30] = rng.integers(0, 255, 3)
        out.append(Example(Image.fromarray(pixels), f"a large red zxq picture {i}"))
    return out


def config(**extra: object) -> TrainingConfig:
    fields: dict[str, object] = {
        "trigger_word": "zxq",
        "steps": 6,
        "rank": 4,
        "learning_rate": 1e-2,
        "batch_size": 2,
        "seed": 5,
        **extra,
    }
    return TrainingConfig(**fields)  # type: ignore[arg-type]


def unet_out(unet: torch.nn.Module, text: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 4, 32, 32, generator=g)
    with torch.no_grad():
        out: torch.Tensor = unet(noisy, torch.tensor([400]), text(ids)[0]).sample
    return out


def ids_of(tokenizer: object, prompt: str = PROMPT) -> torch.Tensor:
    encoded = tokenizer(  # type: ignore[operator]
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    )
    ids: torch.Tensor = encoded.input_ids
    return ids


def test_the_pipeline_it_trains_beside_serves_byte_for_byte_the_same() -> None:
    pipe = build_tiny_pipeline()
    before = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(1)).images[0]
    vocabulary = len(pipe.tokenizer)
    trainer = LoraTrainer(pipe, examples(), config())
    while not trainer.done:
        trainer.step()
    after = pipe(PROMPT, num_inference_steps=2, generator=torch.manual_seed(1)).images[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert len(pipe.tokenizer) == vocabulary and "lora" not in str(pipe.unet)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_file_loads_in_diffusers_as_it_was_trained(train_text_encoder: bool) -> None:
    trainer = LoraTrainer(
        build_tiny_pipeline(), examples(), config(train_text_encoder=train_text_encoder)
    )
    losses = [trainer.step().loss for _ in range(6)]
    assert all(np.isfinite(losses))
    weights = kohya_weights(trainer.lora_state(), "zxq", trainer.embedding())
    assert f"{BUNDLE}.zxq.string_to_param.*" in weights
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in weights)
    assert any(k.startswith("lora_te_") for k in weights) is train_text_encoder
    # The round trip through bytes a user downloads.
    from safetensors.torch import load, save

    lora, embeddings = split(load(save(weights)))
    fresh = build_tiny_pipeline()
    fresh.load_lora_weights(lora)
    fresh.load_textual_inversion(embeddings["zxq"], token="zxq")
    trainer.unet.eval()
    trainer.text_encoder.eval()
    want = unet_out(trainer.unet, trainer.text_encoder, ids_of(trainer.tokenizer))
    got = unet_out(fresh.unet, fresh.text_encoder, ids_of(fresh.tokenizer))
    untrained = build_tiny_pipeline()
    base = unet_out(untrained.unet, untrained.text_encoder, ids_of(untrained.tokenizer))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the training changed something


def test_a_resumed_training_goes_on_exactly_as_one_never_stopped() -> None:
    whole = LoraTrainer(build_tiny_pipeline(), examples(), config())
    while not whole.done:
        whole.step()
    first = LoraTrainer(build_tiny_pipeline(), examples(), config())
    for _ in range(3):
        first.step()
    saved = first.checkpoint()
    resumed = LoraTrainer(build_tiny_pipeline(), examples(), config())
    resumed.resume(saved)
    assert resumed.step_count == 3
    while not resumed.done:
        resumed.step()
    for model, state in whole.lora_state().items():
        other = resumed.lora_state()[model]
        assert all(torch.equal(state[name], other[name]) for name in state)
    assert torch.equal(whole.embedding(), resumed.embedding())


def test_bad_trainings_are_refused_before_a_step() -> None:
    pipe = build_tiny_pipeline()
    with pytest.raises(ValueError, match="trigger word zxq"):
        LoraTrainer(pipe, [Example(examples()[0].image, "no trigger here")], config())
    with pytest.raises(ValueError, match="already a token"):
        LoraTrainer(pipe, examples(), config(trigger_word="red"))
    with pytest.raises(ValueError, match="at least one"):
        LoraTrainer(pipe, [], config())


def test_a_checkpoint_is_plain_tensors_loaded_without_pickle_code() -> None:
    trainer = LoraTrainer(build_tiny_pipeline(), examples(), config())
    trainer.step()
    state = torch.load(io.BytesIO(trainer.checkpoint()), weights_only=True)
    assert state["step"] == 1 and set(state["lora"]) == {"unet"}


def test_the_trigger_starts_from_its_initializer_word_or_the_mean_row() -> None:
    pipe = build_tiny_pipeline()
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()
    red = pipe.tokenizer("red", add_special_tokens=False).input_ids
    started = LoraTrainer(pipe, examples(), config(initializer_word="red"))
    assert torch.equal(started.embedding()[0], rows[red].mean(dim=0))
    plain = LoraTrainer(pipe, examples(), config())
    assert torch.allclose(plain.embedding()[0], rows.mean(dim=0))


def test_a_pipeline_serving_loras_trains_as_a_bare_one_and_a_seed_is_one_training() -> None:
    """A worker's warm pipeline holds its LoRAs (switched off between jobs) and the private
    tokens of trained adapters: the trainer's copies drop the LoRAs and start the new word
    from the model's own vocabulary, so it trains exactly what it would on the bare model;
    and the LoRA's random start comes from the training's seed, not from what the process
    drew before."""
    donor = LoraTrainer(build_tiny_pipeline(), examples(), config(seed=9))
    donor.step()
    donor.step()
    lora, embeddings = split(kohya_weights(donor.lora_state(), "zxq", donor.embedding()))
    serving = build_tiny_pipeline()
    serving.load_lora_weights(lora, adapter_name="served")
    serving.disable_lora()
    # And another key's trained word, under its private token, as the worker loads it.
    serving.load_textual_inversion(embeddings["zxq"], token="zqprivate")
    torch.manual_seed(123)  # whatever the process drew before
    on_serving = LoraTrainer(serving, examples(), config())
    torch.manual_seed(456)
    on_bare = LoraTrainer(build_tiny_pipeline(), examples(), config())
    for _ in range(3):
        assert on_serving.step().loss == on_bare.step().loss
    ours, theirs = on_serving.lora_state()["unet"], on_bare.lora_state()["unet"]
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert torch.equal(on_serving.embedding(), on_bare.embedding())
    assert "served" in serving.get_list_adapters()["unet"]  # the serving pipeline keeps its own
