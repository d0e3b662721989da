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

import copy
import io
import math
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class StepReport:
    step: int
    loss: float


class LoraTrainer:
    """One training: `step()` until `done`, then `weights()` (a kohya-named state dict with the
    trigger embedding bundled, see worker/training/export.py)."""

    def __init__(self, pipe: Any, examples: list[Example], config: TrainingConfig) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if not examples:
            raise ValueError("a training needs at least one example")
        self.config = config
        self.device = pipe.unet.device
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        self.text_encoder = _without_adapters(copy.deepcopy(pipe.text_encoder))
        self.unet = _without_adapters(copy.deepcopy(pipe.unet))
        self.unet.train()
        self.text_encoder.train()
        self.token_id = self._add_token(config.trigger_word)
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
            if config.train_text_encoder:
                # peft directly: transformers 5's own `add_adapter` asks for a newer peft.
                inject_adapter_in_model(
                    LoraConfig(
                        r=config.rank,
                        lora_alpha=config.rank,
                        init_lora_weights="gaussian",
                        target_modules=TEXT_TARGETS,
                    ),
                    self.text_encoder,
                )
        embeddings = self.text_encoder.get_input_embeddings().weight
        embeddings.requires_grad_(True)
        self._frozen_rows = embeddings.detach().clone()
        lora = [p for p in [*self.unet.parameters(), *self.text_encoder.parameters()]
                if p.requires_grad and p is not embeddings]  # fmt: skip
        self.optimizer = torch.optim.AdamW(
            [
                {"params": lora, "lr": config.learning_rate, "base": config.learning_rate},
                {
                    "params": [embeddings],
                    "lr": config.embedding_learning_rate,
                    "base": config.embedding_learning_rate,
                    "weight_decay": 0.0,
                },
            ],
            weight_decay=1e-2,
        )
        self.trainable = [*lora, embeddings]
        self.latents, self.latent_std = _encode(pipe, examples)
        self.ids = self._tokenize([e.caption for e in examples])
        scheduler_config = dict(pipe.scheduler.config)
        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        self.alphas_cumprod = _alphas_cumprod(scheduler_config).to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_count = 0

    @property
    def done(self) -> bool:
        return self.step_count >= self.config.steps

    def _add_token(self, word: str) -> int:
        from tokenizers import AddedToken

        known = self.tokenizer(word, add_special_tokens=False).input_ids
        if len(known) == 1 and known[0] != self.tokenizer.unk_token_id:
            # A word the model already reads (CLIP's "dog</w>", the built-in's "red"): training
            # it would change what it means in every prompt that uses the adapter.
            raise ValueError(f"the trigger word {word!r} is already a token of the model")
        if self.tokenizer.add_tokens([AddedToken(word, single_word=True)]) != 1:
            raise ValueError(f"the trigger word {word!r} is already a token of the model")
        encoder = self.text_encoder
        embeddings = encoder.get_input_embeddings().weight.detach()
        # The model's own vocabulary only: a serving worker's tokenizer also holds the private
        # tokens of trained adapters it loaded (worker.private_adapters), which must not move
        # where another key's training starts.
        start = embeddings[: self.tokenizer.vocab_size].mean(dim=0)
        if self.config.initializer_word:
            ids = self.tokenizer(self.config.initializer_word, add_special_tokens=False).input_ids
            start = embeddings[ids].mean(dim=0)
        encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        token_id = int(self.tokenizer.convert_tokens_to_ids(word))
        with torch.no_grad():
            encoder.get_input_embeddings().weight[token_id] = start
        return token_id

    def _tokenize(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        if not bool((ids == self.token_id).any(dim=1).all()):
            raise ValueError(f"every caption must name the trigger word {self.config.trigger_word}")
        tokens: torch.Tensor = ids.to(self.device)
        return tokens

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
        cond = self.text_encoder(self.ids[pick])[0]
        pred = self.unet(noisy, t, cond).sample.float()
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean((1, 2, 3))
        if config.min_snr_gamma is not None:
            snr = ab.view(-1) / (1 - ab.view(-1))
            clamped = snr.clamp(max=config.min_snr_gamma)
            per_sample = per_sample * clamped / (snr if self.prediction == "epsilon" else snr + 1)
        loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self._keep_other_rows()
        self.step_count += 1
        return StepReport(self.step_count, float(loss.detach()))

    def _keep_other_rows(self) -> None:
        # Only the trigger's row learns: every other word's embedding is put back after a step
        # (AdamW's decay and momentum would move them), so prompts without it are unchanged.
        with torch.no_grad():
            embeddings = self.text_encoder.get_input_embeddings().weight
            trained = embeddings[self.token_id].clone()
            embeddings.copy_(self._frozen_rows)
            embeddings[self.token_id] = trained

    def embedding(self) -> torch.Tensor:
        """The trigger word's trained embedding row, (1, width)."""
        weight = self.text_encoder.get_input_embeddings().weight
        row: torch.Tensor = weight[self.token_id : self.token_id + 1].detach().cpu().clone()
        return row

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA weights in peft naming, per model ("unet", and "text_encoder" if trained)."""
        from peft import get_peft_model_state_dict

        state = {"unet": get_peft_model_state_dict(self.unet)}
        if self.config.train_text_encoder:
            state["text_encoder"] = get_peft_model_state_dict(self.text_encoder)
        return {k: {n: v.detach().cpu().clone() for n, v in s.items()} for k, s in state.items()}

    def checkpoint(self) -> bytes:
        """Everything a resumed training needs to go on as if never stopped."""
        buffer = io.BytesIO()
        torch.save(
            {
                "step": self.step_count,
                "lora": self.lora_state(),
                "embedding": self.embedding(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
            },
            buffer,
        )
        return buffer.getvalue()

    def resume(self, data: bytes) -> None:
        from peft import set_peft_model_state_dict

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        set_peft_model_state_dict(self.unet, state["lora"]["unet"])
        if "text_encoder" in state["lora"]:
            set_peft_model_state_dict(self.text_encoder, state["lora"]["text_encoder"])
        with torch.no_grad():
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.token_id] = state["embedding"][0].to(weight)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])


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
    size = int(pipe.unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1))
    pixels = torch.stack([_pixels(e.image, size) for e in examples]).to(vae.device, vae.dtype)
    means, stds = [], []
    for start in range(0, len(pixels), 8):
        chunk = pixels[start : start + 8]
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    scale = float(vae.config.scaling_factor)
    return torch.cat(means).cpu() * scale, torch.cat(stds).cpu() * scale


def _pixels(image: Image.Image, size: int) -> torch.Tensor:
    rgb = image.convert("RGB")
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
