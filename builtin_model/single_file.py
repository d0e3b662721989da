"""Write a Stable Diffusion 1.x pipeline as one original-layout checkpoint
(`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.` keys), the
format fine-tunes ship in on civitai and what `StableDiffusionPipeline.from_single_file` reads.

diffusers ships only the other direction (`diffusers.loaders.single_file_utils`), so the key
names are derived here from the block layout of the pipeline's own configs, whatever its size:
the tests build tiny checkpoints with it and check the round trip through diffusers' reader
(every tensor back unchanged) before serving them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
)
VAE_ATTENTION = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)


def _unet_prefixes(config: Any) -> list[tuple[str, str]]:
    """(original, diffusers) key prefixes of the UNet's blocks, from its block layout."""
    levels = len(config.block_out_channels)
    per = config.layers_per_block
    down_attn = ["CrossAttn" in kind for kind in config.down_block_types]
    up_attn = ["CrossAttn" in kind for kind in config.up_block_types]
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
        # SDXL's embedding of the pooled text and the size/crop micro-conditioning.
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ]
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    for i in range(levels):
        for j in range(per):
            block = (per + 1) * i + j + 1
            pairs.append((f"input_blocks.{block}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            block = (per + 1) * i + j
            pairs.append((f"output_blocks.{block}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append((f"output_blocks.{block}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < levels - 1:
            pairs.append(
                (
                    f"input_blocks.{(per + 1) * (i + 1)}.0.op.",
                    f"down_blocks.{i}.downsamplers.0.conv.",
                )
            )
            slot = 2 if up_attn[i] else 1
            pairs.append(
                (f"output_blocks.{(per + 1) * i + per}.{slot}.", f"up_blocks.{i}.upsamplers.0.")
            )
    return pairs


def unet_to_original(unet: Any) -> dict[str, torch.Tensor]:
    prefixes = sorted(_unet_prefixes(unet.config), key=lambda p: -len(p[1]))
    out = {}
    for key, tensor in unet.state_dict().items():
        original = key
        for theirs, ours in prefixes:
            if key.startswith(ours):
                rest = key[len(ours) :]
                if ".resnets." in ours or ours.startswith("mid_block.resnets."):
                    for a, b in RESNET:
                        rest = rest.replace(b, a) if rest.startswith(b) else rest
                original = theirs + rest
                break
        out["model.diffusion_model." + original] = tensor
    return out


def _vae_prefixes(config: Any) -> list[tuple[str, str]]:
    levels = len(config.block_out_channels)
    per = config.layers_per_block
    pairs = [("mid.attn_1.", "mid_block.attentions.0.")]
    for j in range(2):
        pairs.append((f"mid.block_{j + 1}.", f"mid_block.resnets.{j}."))
    for i in range(levels):
        for j in range(per):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(per + 1):
            pairs.append(
                (f"decoder.up.{levels - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            )
        if i < levels - 1:
            pairs.append(
                (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")
            )
            pairs.append(
                (f"decoder.up.{levels - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")
            )
    return pairs


def vae_to_original(vae: Any) -> dict[str, torch.Tensor]:
    prefixes = sorted(_vae_prefixes(vae.config), key=lambda p: -len(p[1]))
    out = {}
    for key, tensor in vae.state_dict().items():
        original = key
        for part in ("encoder.", "decoder."):
            if key.startswith(part + "mid_block."):
                key = key[len(part) :]
                original = part + key
                break
        for theirs, ours in prefixes:
            if key.startswith(ours):
                original = (
                    (original[: -len(key)] if original != key else "") + theirs + key[len(ours) :]
                )
                break
        original = original.replace("conv_shortcut", "nin_shortcut").replace(
            "conv_norm_out", "norm_out"
        )
        if ".attn_1." in original:
            head, _, tail = original.partition(".attn_1.")
            for a, b in VAE_ATTENTION:
                if tail.startswith(b):
                    tail = a + tail[len(b) :]
                    break
            original = head + ".attn_1." + tail
            if tail.split(".")[0] in ("q", "k", "v", "proj_out") and tensor.dim() == 2:
                tensor = tensor[:, :, None, None]  # linear → the original's 1x1 convolution
        out["first_stage_model." + original] = tensor
    return out


def open_clip_to_original(text_encoder: Any) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder in OpenCLIP's layout (`conditioner.embedders.1.model.`): one
    `in_proj` of q, k, v per layer, `resblocks`, `ln_*`, `c_fc`/`c_proj`, the projection
    transposed."""
    out: dict[str, torch.Tensor] = {}
    state = text_encoder.state_dict()
    layers: dict[str, dict[str, torch.Tensor]] = {}
    top = {
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    names = (
        ("self_attn.out_proj.", "attn.out_proj."),
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
    )
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            index, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
            block = f"transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                layers.setdefault(block, {})[rest.removeprefix("self_attn.")] = tensor
                continue
            for theirs, ours in names:
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs) :]
                    break
            out[block + rest] = tensor
    for block, parts in layers.items():
        for kind in ("weight", "bias"):
            stacked = [parts[f"{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(stacked)
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def save_vae_single_file(vae: Any, path: Path) -> Path:
    """A VAE alone in the original layout (as `vae-ft-mse-840000-ema-pruned.safetensors`)."""
    from safetensors.torch import save_file

    tensors = {
        k.removeprefix("first_stage_model."): v.contiguous()
        for k, v in vae_to_original(vae).items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def save_single_file(pipe: Any, path: Path) -> Path:
    """Write `pipe` (a Stable Diffusion 1.x/2.x or SDXL pipeline) as one original-layout
    `.safetensors` file."""
    from safetensors.torch import save_file

    tensors = {**unet_to_original(pipe.unet), **vae_to_original(pipe.vae)}
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    first = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, tensor in pipe.text_encoder.state_dict().items():
        # The original names CLIP's modules under `text_model.` (transformers 5 drops it).
        key = key if key.startswith("text_model.") else "text_model." + key
        tensors[first + key] = tensor
    if sdxl:
        tensors.update(open_clip_to_original(pipe.text_encoder_2))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
