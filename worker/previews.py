"""Live previews: a small picture of a running job's current estimate of its final image.

No VAE decode per preview: each model gets a linear map from its latent channels to RGB
(plus a bias), fitted once when the model is loaded, by least squares on a few deterministic
pictures encoded with the model's own VAE (no randomness: the fit is the same on every load).
The denoising loop hands over the current estimate of the clean latents (x0, from the
noise prediction it already made) and this module projects it, resizes it and encodes it as
a JPEG data URI. It reads tensors and never writes them: the job's images do not change.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("imagegen.worker")

# The longest side of a preview, in pixels (never more than the image's own).
PREVIEW_MAX_SIDE = 256
JPEG_QUALITY = 75
# The fit: this many pictures of this size, made from a fixed seed.
FIT_IMAGES = 8
FIT_SIZE = 64


@dataclass(frozen=True)
class LatentProjection:
    """latents (C, h, w) -> RGB in [0, 1]: `weight` (C, 3) and `bias` (3,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, pipe: Any) -> LatentProjection:
        """Fit the map on pictures of flat colors, gradients and blocks encoded by the VAE
        (the mean of its latent distribution, scaled as the pipeline scales latents)."""
        vae = pipe.vae
        rng = np.random.default_rng(0)
        pictures = []
        for i in range(FIT_IMAGES):
            base = rng.uniform(0, 1, size=3)
            other = rng.uniform(0, 1, size=3)
            ramp = np.linspace(0, 1, FIT_SIZE)[None, :, None]
            picture = base + (other - base) * (ramp if i % 2 else ramp.transpose(1, 0, 2))
            picture = np.broadcast_to(picture, (FIT_SIZE, FIT_SIZE, 3)).copy()
            block = rng.integers(0, FIT_SIZE // 2, size=2)
            picture[block[0] : block[0] + 24, block[1] : block[1] + 24] = rng.uniform(0, 1, 3)
            pictures.append(picture)
        pixels = torch.tensor(np.stack(pictures), dtype=torch.float32).permute(0, 3, 1, 2)
        device = next(vae.parameters()).device
        dtype = next(vae.parameters()).dtype
        with torch.inference_mode():
            encoded = vae.encode((pixels * 2 - 1).to(device=device, dtype=dtype)).latent_dist
            latents = scale_latents(encoded.mean.float().cpu(), vae.config)
        factor = FIT_SIZE // latents.shape[-1]
        target = torch.nn.functional.avg_pool2d(pixels, factor)  # RGB at latent resolution
        x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        design = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        solution = torch.linalg.lstsq(design, y.double()).solution.float()
        return cls(weight=solution[:-1], bias=solution[-1])

    def picture(self, latents: torch.Tensor, width: int, height: int) -> Image.Image:
        """The RGB picture of one image's latents (C, h, w), at most PREVIEW_MAX_SIDE."""
        rgb = torch.einsum("chw,cd->hwd", latents.detach().float().cpu(), self.weight) + self.bias
        pixels = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR)

    def data_uri(self, latents: torch.Tensor, width: int, height: int) -> str:
        buffer = io.BytesIO()
        self.picture(latents, width, height).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def scale_latents(latents: torch.Tensor, config: Any) -> torch.Tensor:
    """VAE latents as the denoising loop holds them (the inverse of the decode's unscaling)."""
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        scaled: torch.Tensor = (latents - m) * float(config.scaling_factor) / s
        return scaled
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    return (latents - shift) * float(config.scaling_factor)


def fit_projection(pipe: Any) -> LatentProjection | None:
    """The model's projection, or None when it has no VAE this can use (no previews then)."""
    try:
        return LatentProjection.fit(pipe)
    except Exception as exc:  # a model without an image VAE, or one shaped otherwise
        log.warning("no live previews for this model: %s", exc)
        return None


def estimate_x0(
    scheduler: Any, model_input: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The clean latents the noise prediction implies at timestep `t`: the scaled model input
    is x_t = sqrt(a) x0 + sqrt(1 - a) eps for every scheduler the service offers."""
    alphas = scheduler.alphas_cumprod
    index = int(min(max(round(float(t)), 0), len(alphas) - 1))
    a = alphas[index].to(device=model_input.device, dtype=torch.float32)
    x_t, pred = model_input.float(), noise_pred.float()
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "sample":
        return pred
    if kind == "v_prediction":
        x0: torch.Tensor = a.sqrt() * x_t - (1 - a).sqrt() * pred
    else:
        x0 = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    return x0
