"""A tiny random Stable Diffusion pipeline, diffusers-test style, for tests and quick local runs.

It is saved with `save_pretrained` and served through the same `from_pretrained` path as a hub
model. It makes noise, not pictures; the built-in shapes-64 model is the one that draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from builtin_model.build import build_tokenizer


def _text_config(tokenizer: object, **extra: object) -> CLIPTextConfig:
    fields: dict[str, object] = {"hidden_size": 32, **extra}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        **fields,
    )


def _tiny_vae(**extra: object) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        **extra,
    )


def _tiny_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """Components of well under a million parameters each; 64x64 native size (32x32 latents)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    vae = _tiny_vae()
    scheduler = _tiny_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build and save the tiny pipeline in diffusers format; returns `directory`."""
    build_tiny_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_pipeline_with_safety_checker(
    directory: Path, seed: int = 0, flags_everything: bool = True
) -> Path:
    """The tiny pipeline shipping a safety checker, as Stable Diffusion 1.x does: a tiny CLIP
    vision model whose concept thresholds flag every image (`flags_everything`) or none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 2)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = -10.0 if flags_everything else 10.0  # cosine distance minus threshold > 0: flagged
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    extractor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    StableDiffusionPipeline(
        **{
            k: v
            for k, v in pipe.components.items()
            if k not in ("safety_checker", "feature_extractor")
        },
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=True,
    ).save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_inpainting_pipeline(directory: Path, seed: int = 0) -> Path:
    """An inpainting checkpoint's shape (`stable-diffusion-inpainting`): the tiny pipeline with
    a 9-channel UNet (latents, mask, masked image's latents), saved as a
    `StableDiffusionInpaintPipeline`."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 3)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    StableDiffusionInpaintPipeline(
        **{k: v for k, v in pipe.components.items() if k != "unet"},
        unet=UNet2DConditionModel.from_config(config),
    ).save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_sdxl_inpainting_pipeline(directory: Path, seed: int = 0) -> Path:
    """SDXL's inpainting checkpoint shape (`stable-diffusion-xl-1.0-inpainting-0.1`): the tiny
    SDXL pipeline with a 9-channel UNet, saved as a `StableDiffusionXLInpaintPipeline`."""
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = build_tiny_sdxl_pipeline(seed)
    torch.manual_seed(seed + 3)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    StableDiffusionXLInpaintPipeline(
        **{k: v for k, v in pipe.components.items() if k != "unet"},
        unet=UNet2DConditionModel.from_config(config),
        requires_aesthetics_score=False,
    ).save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL's shape in miniature: two text encoders (the second with a projection, whose pooled
    output and the size/crop micro-conditioning feed the UNet's added embedding), and a VAE
    that asks to be upcast to fp32 for decoding (`force_upcast`), as SDXL's does."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    # Wider than the first, as OpenCLIP bigG is than CLIP-L: what tells the two apart in a
    # single-file checkpoint (diffusers reads the widths).
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, projection_dim=32, hidden_size=48)
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 micro-conditioning numbers x 8 + the pooled text embedding (32).
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=32 + 48,  # both encoders' hidden states side by side
        norm_num_groups=16,
    )
    scheduler = _tiny_scheduler()
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def save_tiny_sdxl_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build and save the tiny SDXL pipeline in diffusers format; returns `directory`."""
    build_tiny_sdxl_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_fewstep_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A distilled few-step model's shape (LCM / Turbo style): the SD pipeline whose UNet takes
    the guidance scale as an embedding (`time_cond_proj_dim`) instead of a second,
    unconditional half of the batch."""
    pipe = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 1)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = 32
    return StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=UNet2DConditionModel.from_config(config),
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_fewstep_pipeline(directory: Path, seed: int = 0) -> Path:
    """Build and save the tiny few-step pipeline in diffusers format; returns `directory`."""
    pipe = build_tiny_fewstep_pipeline(seed)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def save_tiny_adapters(
    directory: Path, seed: int = 0, controlnets: tuple[str, ...] = ("edges",)
) -> Path:
    """Give the tiny pipeline at `directory` two LoRAs (`lines`, rank 4, and `dots`, rank 2)
    and ControlNets (`edges`, and any other names given, each its own weights), all random but
    with effect (no zero-initialised halves)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(directory)
    torch.manual_seed(seed + 1)
    for name, rank in (("lines", 4), ("dots", 2)):
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_v", "conv1"])
        unet.add_adapter(config)
        with torch.no_grad():
            for param_name, param in unet.named_parameters():
                if "lora_" in param_name:
                    param.normal_(0.0, 0.2)
        out = directory / "loras" / name
        pipe.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
        (out / "imagegen_adapter.json").write_text(
            json.dumps({"description": f"test LoRA {name}", "default_scale": 1.0})
        )
    for name in controlnets:
        save_tiny_controlnet(directory, name, pipe.unet)
    return directory


def save_tiny_controlnet(directory: Path, name: str, unet: Any = None) -> Path:
    """A ControlNet for the tiny pipeline at `directory` (SD or SDXL: made from its UNet, as
    diffusers' `ControlNetModel.from_unet` makes one), random where training would have left
    zeros, saved as `controlnets/<name>/` beside it."""
    from diffusers import ControlNetModel

    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for param_name, param in net.named_parameters():
            zero_conv = "controlnet_" in param_name and "cond_embedding" not in param_name
            if zero_conv or "cond_embedding.conv_out" in param_name:
                param.normal_(0.0, 0.05)
    out = directory / "controlnets" / name
    net.save_pretrained(out, safe_serialization=True)
    (out / "imagegen_adapter.json").write_text(json.dumps({"description": "test control"}))
    return out


def _random_unet_lora(
    model_dir: Path, rank: int, alpha: int, seed: int, targets: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """A random LoRA (PEFT state dict, no zero halves) on the UNet of the pipeline at
    `model_dir`, made with peft as trainers make them."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(unet)
    return state


def save_kohya_lora(
    path: Path,
    model_dir: Path,
    rank: int = 4,
    alpha: int = 8,
    seed: int = 5,
    targets: tuple[str, ...] = ("to_q", "to_v", "to_k"),
) -> Path:
    """A LoRA for the pipeline at `model_dir` as civitai and kohya's scripts ship them: one
    `.safetensors` file of `lora_unet_..._to_q.lora_down.weight` keys with an `alpha` each
    (alpha ≠ rank: a scale of alpha/rank), converted with diffusers' own utility."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    peft = _random_unet_lora(model_dir, rank, alpha, seed, targets)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft.items()})
    tensors = {
        key: torch.tensor(float(alpha)) if key.endswith(".alpha") else value.contiguous()
        for key, value in kohya.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def save_diffusers_lora(
    folder: Path, model_dir: Path, rank: int = 4, alpha: int = 8, seed: int = 6
) -> Path:
    """A LoRA saved by diffusers' `save_lora_weights` with its PEFT metadata (alpha ≠ rank),
    as diffusers' training scripts write it: `folder/pytorch_lora_weights.safetensors`."""
    targets = ("to_q", "to_v")
    peft = _random_unet_lora(model_dir, rank, alpha, seed, targets)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=peft, unet_lora_adapter_metadata=metadata
    )
    return folder


def save_other_family_lora(path: Path, cross_attention_dim: int = 2048) -> Path:
    """A kohya LoRA of another family (an SDXL one's shapes: cross-attention from 2048
    features, a second text encoder's part)."""
    from safetensors.torch import save_file

    unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {
            f"{unet}.lora_down.weight": torch.zeros(4, cross_attention_dim),
            f"{unet}.lora_up.weight": torch.zeros(640, 4),
            f"{unet}.alpha": torch.tensor(4.0),
            f"{te2}.lora_down.weight": torch.zeros(4, 1280),
            f"{te2}.lora_up.weight": torch.zeros(1280, 4),
            f"{te2}.alpha": torch.tensor(4.0),
        },
        str(path),
    )
    return path


def save_misfit_lora(directory: Path, name: str = "misfit") -> Path:
    """A LoRA for another model: its to_q pair maps 48 features where the tiny UNet has 32."""
    from safetensors.torch import save_file

    out = directory / "loras" / name
    out.mkdir(parents=True, exist_ok=True)
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(4, 48),
            f"{prefix}.lora_B.weight": torch.zeros(48, 4),
        },
        str(out / "pytorch_lora_weights.safetensors"),
    )
    return directory


def save_tiny_depth_model(directory: Path, seed: int = 0) -> Path:
    """A random Depth Anything (`depth-estimation`) model of a few thousand weights with its
    image processor, saved as the hub's checkpoints are: what `IMAGEGEN_DEPTH_MODEL` names."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        patch_size=14,
        neck_hidden_sizes=[16, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_factors=[4, 2],
        depth_estimation_type="relative",
    )
    torch.manual_seed(seed)
    DepthAnythingForDepthEstimation(config).save_pretrained(directory)
    processor = DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14
    )
    processor.save_pretrained(directory)
    return directory


def save_tiny_pose_model(directory: Path, seed: int = 0) -> Path:
    """A random ViTPose (COCO's 17 body keypoints) of a few thousand weights with its image
    processor, saved as the hub's checkpoints are: what `IMAGEGEN_POSE_MODEL` names. The head's
    bias is raised so that random heatmaps peak above the drawing threshold (a real model's
    confident keypoints), and every point is drawn."""
    import torch
    from transformers import (
        VitPoseBackboneConfig,
        VitPoseConfig,
        VitPoseForPoseEstimation,
        VitPoseImageProcessorPil,
    )

    backbone = VitPoseBackboneConfig(
        image_size=[64, 48],
        patch_size=[16, 16],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        out_indices=[2],
    )
    config = VitPoseConfig(backbone_config=backbone, scale_factor=4, num_labels=17)
    torch.manual_seed(seed)
    model = VitPoseForPoseEstimation(config)
    with torch.no_grad():
        model.head.conv.bias.add_(1.0)
    model.save_pretrained(directory)
    VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(directory)
    return directory
