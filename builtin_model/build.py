"""The components of ``shapes-64``: the same classes as Stable Diffusion, sized for 64×64 scenes.

Text: a word-level tokenizer over the caption vocabulary (built here, so it works offline) and a
``CLIPTextModel``. Image: an ``AutoencoderKL`` that downsamples by 4 to 16×16×4 latents, and a
``UNet2DConditionModel`` with cross-attention at 16×16 and 8×8 and a 4×4 bottleneck, which sees
the whole image and so where things are. Noise:
Stable Diffusion's scaled-linear schedule with trailing timesteps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from builtin_model import MODEL_ID, data

MAX_TOKENS = 32
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"

# Served defaults; written to imagegen.json and the model card.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
DEFAULT_SCHEDULER = "dpmpp_2m"
TRAINING_DEFAULTS = {
    "steps": 1500,
    "rank": 16,
    "learning_rate": 1e-3,
    "targets": "all",
    "batch_size": 8,
}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: NFKC and lower-case, split on whitespace and on every punctuation
    mark, unknown → <unk>. The original 44 words keep their ids as the vocabulary grows."""
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *data.vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation("isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_TOKENS,
        padding_side="right",
    )


def build_text_encoder(vocab_size: int, width: int = 128, layers: int = 3) -> CLIPTextModel:
    """A small CLIP text transformer with learned absolute position embeddings."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        projection_dim=width,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    """A 4× downsampling VAE: flat-colored shapes need few channels and no attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=data.IMAGE_SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set from the latents' spread after training
    )


def build_unet(
    cross_attention_dim: int, channels: tuple[int, int, int] = (64, 128, 128)
) -> UNet2DConditionModel:
    """16×16 → 8×8 → 4×4 UNet; cross-attention at 16×16 and 8×8 (and in the 4×4 middle)."""
    return UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # the number of heads, in diffusers' legacy naming
        norm_num_groups=16,
        transformer_layers_per_block=1,
    )


def scheduler_config() -> dict[str, Any]:
    """Stable Diffusion's noise schedule, sampled with trailing timesteps so the first step is
    t = 999. (A DDPM linear schedule reaches a lower terminal SNR, but an ε-predicting model then
    has to be accurate to 0.6 % at the first step: its first x0 guesses blow up.)"""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "steps_offset": 1,  # unused by trailing spacing; 1 keeps the SD pipeline from warning
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def train_alphas_cumprod() -> Any:
    """ᾱ_t of the training schedule, from the scheduler itself so the two cannot drift apart."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_known(DDPMScheduler, scheduler_config())).alphas_cumprod


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**_known(DPMSolverMultistepScheduler, scheduler_config()))


def make_scheduler(name: str, config: Any) -> Any:
    """The scheduler the worker builds for ``name``: both read the one table in the contract."""
    import diffusers

    from imagegen.core.contract import SCHEDULERS

    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(config, **extra)


def _known(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    import inspect

    params = inspect.signature(cls).parameters
    return {k: v for k, v in config.items() if k in params}


def assemble(
    tokenizer: PreTrainedTokenizerFast,
    text_encoder: CLIPTextModel,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save(pipe: StableDiffusionPipeline, out: Path) -> None:
    """Write the pipeline in diffusers format (fp32 safetensors) plus ``imagegen.json``."""
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 names the class TokenizersBackend; the older alias loads under 4.x and 5.x.
    for name, key in (
        ("model_index.json", "tokenizer"),
        ("tokenizer/tokenizer_config.json", "tokenizer_class"),
    ):
        path = out / name
        config = json.loads(path.read_text())
        config[key] = ["transformers", TOKENIZER_CLASS] if key == "tokenizer" else TOKENIZER_CLASS
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # A component loaded from disk (a refine run) remembers where from; that path means
    # nothing in the saved model.
    for path in out.glob("*/config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2) + "\n")
    # The saved scheduler config keeps only its class's keys; the schedule's other settings go
    # in too, so a scheduler of another class built from it (a user's `ddim`) samples the same
    # schedule and never clips x0 to [-1, 1] (DDIM's default, meant for pixel-space models).
    path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**scheduler_config(), **config}, indent=2, sort_keys=True) + "\n")
    (out / "imagegen.json").write_text(json.dumps(served_defaults(), indent=2) + "\n")


def served_defaults() -> dict[str, Any]:
    return {
        "id": MODEL_ID,
        "width": data.IMAGE_SIZE,
        "height": data.IMAGE_SIZE,
        "steps": DEFAULT_STEPS,
        "guidance_scale": DEFAULT_GUIDANCE,
        "scheduler": DEFAULT_SCHEDULER,
        # Past 2x its native side the model draws repeats and noise: refused at the gateway.
        "max_pixels": (2 * data.IMAGE_SIZE) ** 2,
        "max_steps": 100,
        # `POST /v1/trainings` defaults: what bench/evaluate_training.py measured (a new shape
        # from 16 pictures in about 5 minutes on 2 CPU cores; the model card has the figures).
        "training": TRAINING_DEFAULTS,
    }
