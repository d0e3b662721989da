"""The fine-tuning recipe (worker/training) on a tiny random Stable Diffusion pipeline: it trains
beside a pipeline that keeps serving unchanged, its file loads in diffusers as it was trained
(the LoRA through `load_lora_weights`, the trigger through `load_textual_inversion`), and a
training resumed from a checkpoint goes on exactly as one never stopped."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from builtin_model.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline
from worker.training.export import BUNDLE, kohya_weights, load_trained, split
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


def row(trainer: LoraTrainer) -> torch.Tensor:
    """The trigger's trained row of a Stable Diffusion 1.x trainer (its one text encoder)."""
    return trainer.embeddings()["string_to_param.*"]


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
    weights = kohya_weights(trainer.lora_state(), "zxq", trainer.embeddings())
    assert f"{BUNDLE}.zxq.string_to_param.*" in weights
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in weights)
    assert any(k.startswith("lora_te_") for k in weights) is train_text_encoder
    # The round trip through bytes a user downloads.
    from safetensors.torch import load, save

    fresh = build_tiny_pipeline()
    load_trained(fresh, load(save(weights)), "zxq", token="zxq", adapter_name="trained")
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
    assert torch.equal(row(whole), row(resumed))


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
    assert torch.equal(row(started)[0], rows[red].mean(dim=0))
    plain = LoraTrainer(pipe, examples(), config())
    assert torch.allclose(row(plain)[0], rows.mean(dim=0))


def test_a_pipeline_serving_loras_trains_as_a_bare_one_and_a_seed_is_one_training() -> None:
    """A worker's warm pipeline holds its LoRAs (switched off between jobs) and the private
    tokens of trained adapters: the trainer's copies drop the LoRAs and start the new word
    from the model's own vocabulary, so it trains exactly what it would on the bare model;
    and the LoRA's random start comes from the training's seed, not from what the process
    drew before."""
    donor = LoraTrainer(build_tiny_pipeline(), examples(), config(seed=9))
    donor.step()
    donor.step()
    lora, embeddings = split(kohya_weights(donor.lora_state(), "zxq", donor.embeddings()))
    serving = build_tiny_pipeline()
    serving.load_lora_weights(lora, adapter_name="served")
    serving.disable_lora()
    # And another key's trained word, under its private token, as the worker loads it.
    serving.load_textual_inversion(embeddings["zxq"]["string_to_param.*"], token="zqprivate")
    torch.manual_seed(123)  # whatever the process drew before
    on_serving = LoraTrainer(serving, examples(), config())
    torch.manual_seed(456)
    on_bare = LoraTrainer(build_tiny_pipeline(), examples(), config())
    for _ in range(3):
        assert on_serving.step().loss == on_bare.step().loss
    ours, theirs = on_serving.lora_state()["unet"], on_bare.lora_state()["unet"]
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert torch.equal(row(on_serving), row(on_bare))
    assert "served" in serving.get_list_adapters()["unet"]  # the serving pipeline keeps its own


# -- SDXL, mixed precision, gradient checkpointing -----------------------------------------------


def sdxl_images(pipe: Any, prompt: str = PROMPT) -> np.ndarray:
    """Two steps of the stock SDXL pipeline, as floats."""
    out = pipe(
        prompt, num_inference_steps=2, generator=torch.manual_seed(1), output_type="np"
    ).images
    images: np.ndarray = out
    return images


def trained_sdxl_pipeline(trainer: LoraTrainer, serving: Any) -> Any:
    """The stock SDXL pipeline around the trainer's own parts: what its training made."""
    from diffusers import StableDiffusionXLPipeline

    for model in (trainer.unet, *(tower.encoder for tower in trainer.towers)):
        model.eval()
    return StableDiffusionXLPipeline(
        vae=serving.vae,
        text_encoder=trainer.towers[0].encoder,
        text_encoder_2=trainer.towers[1].encoder,
        tokenizer=trainer.towers[0].tokenizer,
        tokenizer_2=trainer.towers[1].tokenizer,
        unet=trainer.unet,
        scheduler=serving.scheduler,
    )


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_sdxl_learns_the_word_in_both_encoders_and_its_file_loads_in_diffusers(
    train_text_encoder: bool,
) -> None:
    """SDXL trains with its pooled embedding and size conditioning as its pipeline gives them,
    both encoders learn the word (A1111's `clip_l`/`clip_g`), and the file, loaded into a fresh
    pipeline by diffusers, draws what the training's own parts draw."""
    from safetensors.torch import load, save

    serving = build_tiny_sdxl_pipeline()
    before = sdxl_images(serving)
    trainer = LoraTrainer(serving, examples(), config(train_text_encoder=train_text_encoder))
    losses = [trainer.step().loss for _ in range(4)]
    assert all(np.isfinite(losses))
    assert np.array_equal(sdxl_images(serving), before)  # the serving pipeline is untouched
    weights = kohya_weights(trainer.lora_state(), "zxq", trainer.embeddings())
    assert {f"{BUNDLE}.zxq.clip_l", f"{BUNDLE}.zxq.clip_g"} <= set(weights)
    assert weights[f"{BUNDLE}.zxq.clip_l"].shape == (1, 32)
    assert weights[f"{BUNDLE}.zxq.clip_g"].shape == (1, 48)
    for prefix in ("lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in weights) is train_text_encoder
    assert not any(k.startswith("lora_te_") for k in weights)

    fresh = build_tiny_sdxl_pipeline()
    load_trained(fresh, load(save(weights)), "zxq", token="zxq", adapter_name="trained")
    want = sdxl_images(trained_sdxl_pipeline(trainer, serving))
    got = sdxl_images(fresh)
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    assert not np.allclose(got, before, atol=1e-3)  # the training changed something


def test_sdxl_training_resumes_exactly_from_its_checkpoint() -> None:
    whole = LoraTrainer(build_tiny_sdxl_pipeline(), examples(), config(steps=4))
    while not whole.done:
        whole.step()
    first = LoraTrainer(build_tiny_sdxl_pipeline(), examples(), config(steps=4))
    first.step()
    first.step()
    resumed = LoraTrainer(build_tiny_sdxl_pipeline(), examples(), config(steps=4))
    resumed.resume(first.checkpoint())
    while not resumed.done:
        resumed.step()
    ours, theirs = whole.lora_state()["unet"], resumed.lora_state()["unet"]
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    for name, row in whole.embeddings().items():
        assert torch.equal(row, resumed.embeddings()[name])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_the_frozen_weights_half_and_learns_in_fp32(
    precision: str,
) -> None:
    """As diffusers' scripts' `--mixed_precision`: the frozen weights run half under autocast,
    the LoRA and the trigger's rows learn in fp32 (fp16 with its loss scaler, which a
    checkpoint carries), and the file holds fp32 weights that load as any other."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    serving = build_tiny_pipeline()
    trainer = LoraTrainer(serving, examples(), config(precision=precision, train_text_encoder=True))
    losses = [trainer.step().loss for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    lora = [p for p in trainer.unet.parameters() if p.requires_grad]
    frozen = [p for p in trainer.unet.parameters() if not p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert frozen and all(p.dtype == half for p in frozen)
    assert serving.unet.dtype == torch.float32  # the serving pipeline keeps its own
    assert trainer.scaler.is_enabled() is (precision == "fp16")
    state = torch.load(io.BytesIO(trainer.checkpoint()), weights_only=True)
    assert bool(state["scaler"]) is (precision == "fp16")
    weights = kohya_weights(trainer.lora_state(), "zxq", trainer.embeddings())
    assert all(v.dtype == torch.float32 for k, v in weights.items() if not k.endswith(".alpha"))
    # Trained in half, the LoRA moved away from where fp32 would have taken it, not elsewhere.
    exact = LoraTrainer(build_tiny_pipeline(), examples(), config(train_text_encoder=True))
    exact_losses = [exact.step().loss for _ in range(3)]
    assert np.allclose(losses, exact_losses, rtol=0.05), (losses, exact_losses)


def test_gradient_checkpointing_trains_the_same_weights() -> None:
    """Recomputing the activations in the backward pass changes the memory, not the result."""
    plain = LoraTrainer(build_tiny_sdxl_pipeline(), examples(), config(train_text_encoder=True))
    saved = LoraTrainer(
        build_tiny_sdxl_pipeline(),
        examples(),
        config(train_text_encoder=True, gradient_checkpointing=True),
    )
    assert saved.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    for _ in range(3):
        assert np.isclose(plain.step().loss, saved.step().loss, rtol=1e-5)
    for model, state in plain.lora_state().items():
        other = saved.lora_state()[model]
        assert all(torch.allclose(state[n], other[n], atol=1e-6) for n in state), model


def test_sd_and_sdxl_text_to_image_models_are_trainable_and_others_say_why_not() -> None:
    from worker.pipeline import training_fields

    tokenizer = build_tiny_pipeline().tokenizer
    for family in ("sd15", "sd2", "sdxl"):
        fields = training_fields({}, {"family": family}, tokenizer)
        assert fields["training"].max_caption_tokens == tokenizer.model_max_length - 2, family
    assert "SDXL refiner" in training_fields({}, {"family": "sdxl"}, None)["not_trainable"]
    inpainting = training_fields({}, {"family": "sd15", "inpainting": True}, tokenizer)
    assert "inpainting" in inpainting["not_trainable"]
    assert "an unknown family" in training_fields({}, {}, tokenizer)["not_trainable"]
    assert (
        "turns trainings off"
        in training_fields({"training": False}, {}, tokenizer)["not_trainable"]
    )
