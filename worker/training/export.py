"""A trained adapter as one `.safetensors` file other apps load: the LoRA in kohya naming
(`lora_unet_…`, `lora_te_…` or SDXL's `lora_te1_…`/`lora_te2_…`, `.lora_down`/`.lora_up`/
`.alpha`, as diffusers' `convert_state_dict_to_kohya` makes it for its advanced DreamBooth
script's "webui" file) and the trigger word's embedding bundled as AUTOMATIC1111 reads it
(`bundle_emb.<trigger>.string_to_param.*`, or `.clip_l` and `.clip_g` for SDXL; A1111 ≥ 1.7's
Lora extension: the word works in a prompt while the LoRA is on). ComfyUI's LoRA loader skips
the bundled keys; its embedding loader finds them when the file is also put in
`models/embeddings`.

diffusers' `load_lora_weights` refuses a file with a key it does not know, so `split` takes the
embedding back out before loading, and `load_trained` loads both parts into a pipeline (what
the worker does, and what a diffusers user does)."""

from __future__ import annotations

from typing import Any

import torch

BUNDLE = "bundle_emb"


def kohya_weights(
    lora: dict[str, dict[str, torch.Tensor]], trigger_word: str, embeddings: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One state dict: the LoRA of each model ("unet", "text_encoder", "text_encoder_2") in
    kohya naming, alphas equal to the rank (the recipe's lora_alpha), and the trigger's rows
    (`LoraTrainer.embeddings()`: (n, width) each, by their A1111 names)."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{name}": tensor for name, tensor in lora.get("unet", {}).items()}
    for encoder in ("text_encoder", "text_encoder_2"):
        for name, tensor in lora.get(encoder, {}).items():
            # kohya names a text encoder's layers `…_text_model_encoder_…`; transformers 5
            # dropped the `text_model.` level from CLIPTextModel's own names.
            inner = name if name.startswith("text_model.") else f"text_model.{name}"
            prefixed[f"{encoder}.{inner}"] = tensor
    weights: dict[str, torch.Tensor] = convert_state_dict_to_kohya(prefixed)
    if "clip_g" not in embeddings:
        # Stable Diffusion 1.x/2.x has one text encoder: kohya's `lora_te_`, not `lora_te1_`.
        weights = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in weights.items()}
    weights = {k: v.contiguous() for k, v in weights.items()}
    for name, row in embeddings.items():
        weights[f"{BUNDLE}.{trigger_word}.{name}"] = row.contiguous()
    return weights


def split(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(the LoRA keys, {trigger word: its rows by name}) of a file `kohya_weights` wrote, or of
    any kohya LoRA that bundles embeddings."""
    lora = {k: v for k, v in weights.items() if not k.startswith(f"{BUNDLE}.")}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if key.startswith(f"{BUNDLE}."):
            _, word, name = key.split(".", 2)
            embeddings.setdefault(word, {})[name] = tensor
    return lora, embeddings


def load_trained(
    pipe: Any, weights: dict[str, torch.Tensor], trigger_word: str, token: str, adapter_name: str
) -> None:
    """Load a trained adapter's file into `pipe`: its LoRA under `adapter_name`, and the trigger
    word's rows under `token` in each text encoder (one, or SDXL's two). A token the pipeline
    already reads (the adapter was loaded before, then unloaded) gets its rows written again."""
    lora, embeddings = split(weights)
    pipe.load_lora_weights(lora, adapter_name=adapter_name)
    rows = embeddings.get(trigger_word, {})
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    names = ["string_to_param.*"] if len(pairs) == 1 else ["clip_l", "clip_g"]
    for (tokenizer, encoder), name in zip(pairs, names, strict=True):
        if name not in rows:
            continue
        known = tokenizer.get_vocab().get(token)
        if known is None:
            pipe.load_textual_inversion(
                rows[name], token=token, tokenizer=tokenizer, text_encoder=encoder
            )
            continue
        with torch.no_grad():
            table = encoder.get_input_embeddings().weight
            table[known] = rows[name][0].to(table)
