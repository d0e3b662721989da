"""The fine-tuning recipe: a user's images in, a LoRA and a trigger-word embedding out.

A LoRA (peft) on the UNet's attention projections, optionally on the text encoder's too, and the
trigger word added to the tokenizer as a new token whose embedding row is trained with it
(pivotal tuning, as diffusers' advanced DreamBooth script and current trainers do: a word-level
tokenizer like the built-in model's knows no new word, and for CLIP a new token beats an
unlucky split into pieces). The same code trains the built-in model on a CPU and Stable
Diffusion 1.x on a GPU.

The trainer works on its own copies of the text encoder, tokenizer and UNet: the pipeline it is
given keeps serving, byte for byte, while a training runs beside it. It advances one step at a
time (`step()`), so a worker can report progress, cancel and yield between steps, and its whole
state round-trips through `checkpoint()` / `resume()` so a training survives its worker.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Which UNet layers get a LoRA. "attention": the attention projections (self and cross), as
# diffusers' LoRA scripts pick for Stable Diffusion. "all": also the transformer blocks' feed-
# forward and projections and the resnets' convolutions (kohya's "LoCon"): a small UNet has to
# learn to draw a new form, not only to route a new word to forms it knows.
UNET_TARGETS = {
    "attention": ["to_k", "to_q", "to_v", "to_out.0"],
    "all": [
        "to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2",
    ],
}  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# The frozen weights' type under mixed precision.
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Example:
    """One training picture and its caption (which names the trigger word)."""

    image: Image.Image
    caption: str


@dataclass(frozen=True)
class TrainingConfig:
    trigger_word: str
    steps: int
    rank: int = 8
    learning_rate: float = 1e-4
    # The trigger's embedding row learns faster than the LoRA. It starts from the embedding of
    # `initializer_word` (A1111's "initialization text"), else from the vocabulary's mean row.
    embedding_learning_rate: float = 5e-3
    initializer_word: str | None = None
    # min-SNR loss weighting, or None: plain MSE, every noise level alike (diffusers' scripts'
    # default, and on shapes-64 the better one: the new shape's fine points are drawn at the low
    # noise levels min-SNR weights down; bench/evaluate_training.py, 25 → 50 % on the star).
    min_snr_gamma: float | None = None
    train_text_encoder: bool = False
    batch_size: int = 4
    targets: str = "attention"  # a key of UNET_TARGETS
    warmup_steps: int = 0
    seed: int = 0
    # "fp32" (a CPU), or the frozen weights in "fp16"/"bf16" under autocast with the trained
    # ones in fp32 (fp16 with a loss scaler), as diffusers' scripts' `--mixed_precision`.
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    # Recompute activations in the backward pass: less memory, more time (blocks run twice).
    gradient_checkpointing: bool = False


@dataclass
class TextTower:
    """A tokenizer and its text encoder, which learn the trigger word as a new token. Stable
    Diffusion 1.x/2.x has one; SDXL two, named as A1111 names an SDXL embedding's rows."""

    name: str  # the row's key in an exported file: "string_to_param.*", "clip_l", "clip_g"
    tokenizer: Any
    encoder: Any
    token_id: int = -1
    frozen_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float


class LoraTrainer:
    """One training: `step()` until `done`, then `lora_state()` and `embeddings()` (which
    worker/training/export.py writes as one kohya-named file)."""

    def __init__(self, pipe: Any, examples: list[Example], config: TrainingConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if not examples:
            raise ValueError("a training needs at least one example")
        self.config = config
        self.device = pipe.unet.device
        self.towers = _towers(pipe)
        # The first tower's parts, by their pipeline names (Stable Diffusion's only ones).
        self.tokenizer = self.towers[0].tokenizer
        self.text_encoder = self.towers[0].encoder
        self.unet = _without_adapters(copy.deepcopy(pipe.unet))
        # The UNet's frozen weights in the type they run in: fp32, or half under mixed
        # precision. The text encoders stay fp32 (a fraction of the UNet's size): the trigger's
        # row learns through them, and their layer norms then see fp32 on any device.
        frozen = HALF.get(config.precision, torch.float32)
        if self.unet.dtype != frozen:  # (diffusers warns at every cast, even to the same type)
            self.unet.to(dtype=frozen)
        self.unet.train()
        for tower in self.towers:
            tower.encoder.float().train()
            tower.token_id = self._add_token(tower)
        # The LoRAs' random start comes from the training's seed, not from whatever the
        # process drew before: one seed, one training, in any worker (a rerun that starts over
        # and the tests' uninterrupted reference included).
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            self.unet.add_adapter(
                LoraConfig(
                    r=config.rank,
                    lora_alpha=config.rank,
                    init_lora_weights="gaussian",
                    target_modules=UNET_TARGETS[config.targets],
                )
            )
            for tower in self.towers if config.train_text_encoder else []:
                # peft directly: transformers 5's own `add_adapter` asks for a newer peft.
                inject_adapter_in_model(
                    LoraConfig(
                        r=config.rank,
                        lora_alpha=config.rank,
                        init_lora_weights="gaussian",
                        target_modules=TEXT_TARGETS,
                    ),
                    tower.encoder,
                )
        rows = []
        for tower in self.towers:
            # Only the trigger's row of the table is kept (_keep_other_rows).
            table = tower.encoder.get_input_embeddings()
            table.weight.requires_grad_(True)
            tower.frozen_rows = table.weight.detach().clone()
            rows.append(table.weight)
        models = [self.unet, *(tower.encoder for tower in self.towers)]
        lora = [p for m in models for p in m.parameters()
                if p.requires_grad and not any(p is r for r in rows)]  # fmt: skip
        for parameter in lora:
            parameter.data = parameter.data.float()  # peft made them in the frozen type
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for tower in self.towers if config.train_text_encoder else []:
                tower.encoder.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora, "lr": config.learning_rate, "base": config.learning_rate},
                {
                    "params": rows,
                    "lr": config.embedding_learning_rate,
                    "base": config.embedding_learning_rate,
                    "weight_decay": 0.0,
                },
            ],
            weight_decay=1e-2,
        )
        # fp16's narrow range needs the loss scaled; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.trainable = [*lora, *rows]
        self.latents, self.latent_std = _encode(pipe, examples)
        captions = [e.caption for e in examples]
        self.ids = [self._tokenize(tower, captions) for tower in self.towers]
        self.time_ids = _size_conditioning(pipe) if len(self.towers) == 2 else None
        scheduler_config = dict(pipe.scheduler.config)
        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        self.alphas_cumprod = _alphas_cumprod(scheduler_config).to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0

    @property
    def done(self) -> bool:
        return self.step_count >= self.config.steps

    def _add_token(self, tower: TextTower) -> int:
        from tokenizers import AddedToken

        word, tokenizer, encoder = self.config.trigger_word, tower.tokenizer, tower.encoder
        known = tokenizer(word, add_special_tokens=False).input_ids
        if len(known) == 1 and known[0] != tokenizer.unk_token_id:
            # A word the model already reads (CLIP's "dog</w>", the built-in's "red"): training
            # it would change what it means in every prompt that uses the adapter.
            raise ValueError(f"the trigger word {word!r} is already a token of the model")
        if tokenizer.add_tokens([AddedToken(word, single_word=True)]) != 1:
            raise ValueError(f"the trigger word {word!r} is already a token of the model")
        embeddings = encoder.get_input_embeddings().weight.detach()
        # The model's own vocabulary only: a serving worker's tokenizer also holds the private
        # tokens of trained adapters it loaded (worker.private_adapters), which must not move
        # where another key's training starts.
        start = embeddings[: tokenizer.vocab_size].float().mean(dim=0)
        if self.config.initializer_word:
            ids = tokenizer(self.config.initializer_word, add_special_tokens=False).input_ids
            start = embeddings[ids].float().mean(dim=0)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        token_id = int(tokenizer.convert_tokens_to_ids(word))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id] = start
        return token_id

    def _tokenize(self, tower: TextTower, captions: list[str]) -> torch.Tensor:
        tokenizer = tower.tokenizer
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if not bool((ids == tower.token_id).any(dim=1).all()):
            raise ValueError(f"every caption must name the trigger word {self.config.trigger_word}")
        tokens: torch.Tensor = ids.to(self.device)
        return tokens

    def _condition(self, pick: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's text conditioning for the picked captions, as the stock pipelines encode
        a prompt: the encoder's last hidden states (Stable Diffusion), or both encoders'
        penultimate ones side by side, the second's pooled embedding and the size conditioning
        (SDXL's `encode_prompt` and `_get_add_time_ids`)."""
        pick = pick.to(self.device)
        if self.time_ids is None:
            return self.text_encoder(self.ids[0][pick])[0], {}
        hidden, pooled = [], torch.empty(0)
        for tower, ids in zip(self.towers, self.ids, strict=True):
            out = tower.encoder(ids[pick], output_hidden_states=True)
            pooled = out[0]  # the last encoder's: its projected, pooled embedding
            hidden.append(out.hidden_states[-2])
        time_ids = self.time_ids.to(self.device).repeat(len(pick), 1)
        return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids}

    def _autocast(self) -> Any:
        half = HALF.get(self.config.precision)
        if half is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=half)

    def step(self) -> StepReport:
        """One optimizer step on a batch drawn from the examples."""
        config = self.config
        g = self.generator
        n = self.latents.shape[0]
        pick = torch.randint(n, (min(config.batch_size, n),), generator=g)
        z = self.latents[pick] + self.latent_std[pick] * torch.randn(
            self.latents[pick].shape, generator=g
        )
        t = torch.randint(0, len(self.alphas_cumprod), (len(pick),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        z, t, noise = z.to(self.device), t.to(self.device), noise.to(self.device)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * z + (1 - ab).sqrt() * noise
        target = noise if self.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * z
        for group in self.optimizer.param_groups:
            group["lr"] = group["base"] * _lr_factor(self.step_count, config)
        with self._autocast():
            cond, added = self._condition(pick)
            unet_kwargs = {"added_cond_kwargs": added} if added else {}
            pred = self.unet(noisy, t, cond, **unet_kwargs).sample.float()
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean((1, 2, 3))
        if config.min_snr_gamma is not None:
            snr = ab.view(-1) / (1 - ab.view(-1))
            clamped = snr.clamp(max=config.min_snr_gamma)
            per_sample = per_sample * clamped / (snr if self.prediction == "epsilon" else snr + 1)
        loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._keep_other_rows()
        self.step_count += 1
        return StepReport(self.step_count, float(loss.detach()))

    def _keep_other_rows(self) -> None:
        # Only the trigger's row learns: every other word's embedding is put back after a step
        # (AdamW's decay and momentum would move them), so prompts without it are unchanged.
        with torch.no_grad():
            for tower in self.towers:
                embeddings = tower.encoder.get_input_embeddings().weight
                trained = embeddings[tower.token_id].clone()
                embeddings.copy_(tower.frozen_rows)
                embeddings[tower.token_id] = trained

    def embeddings(self) -> dict[str, torch.Tensor]:
        """The trigger word's trained rows, (1, width) each, by their names in an exported
        file: {"string_to_param.*": row} for Stable Diffusion, {"clip_l", "clip_g"} for SDXL."""
        rows = {}
        for tower in self.towers:
            weight = tower.encoder.get_input_embeddings().weight
            rows[tower.name] = weight[tower.token_id : tower.token_id + 1].detach().cpu().clone()
        return rows

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA weights in peft naming, per model: "unet", and each trained text encoder
        by its pipeline name ("text_encoder", "text_encoder_2")."""
        from peft import get_peft_model_state_dict

        state = {"unet": get_peft_model_state_dict(self.unet)}
        for name, tower in zip(TEXT_ENCODERS, self.towers, strict=False):
            if self.config.train_text_encoder:
                state[name] = get_peft_model_state_dict(tower.encoder)
        return {k: {n: v.detach().cpu().clone() for n, v in s.items()} for k, s in state.items()}

    def checkpoint(self) -> bytes:
        """Everything a resumed training needs to go on as if never stopped."""
        buffer = io.BytesIO()
        torch.save(
            {
                "step": self.step_count,
                "lora": self.lora_state(),
                "embeddings": self.embeddings(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "generator": self.generator.get_state(),
            },
            buffer,
        )
        return buffer.getvalue()

    def resume(self, data: bytes) -> None:
        from peft import set_peft_model_state_dict

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        set_peft_model_state_dict(self.unet, state["lora"]["unet"])
        for name, tower in zip(TEXT_ENCODERS, self.towers, strict=False):
            if name in state["lora"]:
                set_peft_model_state_dict(tower.encoder, state["lora"][name])
            with torch.no_grad():
                weight = tower.encoder.get_input_embeddings().weight
                weight[tower.token_id] = state["embeddings"][tower.name][0].to(weight)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])


# The pipeline names of the text encoders, in the towers' order.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _towers(pipe: Any) -> list[TextTower]:
    """Copies of the pipeline's tokenizers and text encoders (the serving ones never change)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    if any(tokenizer is None or encoder is None for tokenizer, encoder in pairs):
        raise ValueError("the model has no text encoder to learn the trigger word")
    names = ["string_to_param.*"] if len(pairs) == 1 else ["clip_l", "clip_g"]
    return [
        TextTower(name, copy.deepcopy(tokenizer), _without_adapters(copy.deepcopy(encoder)))
        for name, (tokenizer, encoder) in zip(names, pairs, strict=True)
    ]


def _size_conditioning(pipe: Any) -> torch.Tensor:
    """SDXL's micro-conditioning for a training picture: original size, crop origin and target
    size, (1, 6), as `StableDiffusionXLPipeline._get_add_time_ids` makes it for a generation at
    the model's native size (the pictures were centre-cropped and resized to it)."""
    size = _native_size(pipe)
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)


def _without_adapters(model: Any) -> Any:
    """A copy of a serving pipeline's model carries the LoRAs the worker loaded into it (and
    their layers switched off while no job uses them): they are taken out, so the new LoRA is
    the only one, switched on, and trains on the bare model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(True)
            for name in list(getattr(module, "lora_A", {}).keys()):
                module.delete_adapter(name)
    # As if no LoRA had ever been added (diffusers and peft look for this attribute).
    model.__dict__.pop("peft_config", None)
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    return model.requires_grad_(False)


def default_warmup(steps: int) -> int:
    """The warm-up a training of `steps` gets: a tenth of it, at most 20 steps."""
    return min(20, steps // 10)


def _lr_factor(step: int, config: TrainingConfig) -> float:
    """Linear warm-up, then cosine to 10 % of the rate by the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """The training noise schedule the model's scheduler describes (DDPM's, from its config)."""
    from diffusers import DDPMScheduler

    known = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    alphas: torch.Tensor = DDPMScheduler.from_config(known).alphas_cumprod.float()
    return alphas


@torch.no_grad()
def _encode(pipe: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each picture centre-cropped square, resized to the model's native size and encoded once:
    the latent distribution's mean and std, scaled (a step samples from them)."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        vae = copy.deepcopy(vae).float()  # SDXL's VAE overflows in fp16, as its pipeline knows
    size = _native_size(pipe)
    pixels = torch.stack([_pixels(e.image, size) for e in examples]).to(vae.device, vae.dtype)
    means, stds = [], []
    for start in range(0, len(pixels), 8):
        chunk = pixels[start : start + 8]
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = float(vae.config.scaling_factor)
    return torch.cat(means).cpu() * scale, torch.cat(stds).cpu() * scale


def _native_size(pipe: Any) -> int:
    """The side in pixels the model was trained at: its UNet's latent size times the VAE's."""
    scale = int(2 ** (len(pipe.vae.config.block_out_channels) - 1))
    return int(pipe.unet.config.sample_size) * scale


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
