"""A trained adapter as one `.safetensors` file other apps load: the LoRA in kohya naming
(`lora_unet_…`/`lora_te_…`, `.lora_down`/`.lora_up`/`.alpha`, as kohya's sd-scripts write it
and diffusers' `convert_state_dict_to_kohya` makes it) and the trigger word's embedding bundled
as AUTOMATIC1111 reads it (`bundle_emb.<trigger>.string_to_param.*`, A1111 ≥ 1.7's Lora
extension: the word works in a prompt while the LoRA is on). ComfyUI's LoRA loader skips the
bundled key; its embedding loader finds it when the file is also put in `models/embeddings`.

diffusers' `load_lora_weights` refuses a file with a key it does not know, so `split` takes the
embedding back out before loading (what the worker does, and what a diffusers user does)."""

from __future__ import annotations

import torch

BUNDLE = "bundle_emb"


def kohya_weights(
    lora: dict[str, dict[str, torch.Tensor]], trigger_word: str, embedding: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One state dict: the LoRA of each model ("unet", "text_encoder") in kohya naming, alphas
    equal to the rank (the recipe's lora_alpha), and the trigger's embedding (n, width)."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{name}": tensor for name, tensor in lora.get("unet", {}).items()}
    for name, tensor in lora.get("text_encoder", {}).items():
        # kohya names a Stable Diffusion 1.x text encoder `lora_te_text_model_…`; transformers 5
        # dropped the `text_model.` level from CLIPTextModel's own names.
        inner = name if name.startswith("text_model.") else f"text_model.{name}"
        prefixed[f"text_encoder.{inner}"] = tensor
    weights: dict[str, torch.Tensor] = {
        k.replace("lora_te1_", "lora_te_", 1): v.contiguous()
        for k, v in convert_state_dict_to_kohya(prefixed).items()
    }
    weights[f"{BUNDLE}.{trigger_word}.string_to_param.*"] = embedding.contiguous()
    return weights


def split(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the LoRA keys, {trigger word: its embedding}) of a file `kohya_weights` wrote, or of
    any kohya LoRA that bundles embeddings."""
    lora = {k: v for k, v in weights.items() if not k.startswith(f"{BUNDLE}.")}
    embeddings = {k.split(".")[1]: v for k, v in weights.items() if k.startswith(f"{BUNDLE}.")}
    return lora, embeddings
