"""Decoding a batch's latents into images, as the stock pipelines do: the VAE (SDXL's upcast
to float32 where its fp16 VAE overflows), the watermark and safety checker a model ships, and
the post-processing, a few images per VAE call."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from imagegen.core.contract import FILTERED_MARK
from worker.compiled_sizes import bucket, pad_rows

# Pixels one VAE call decodes at most, across images (about a 512x512 batch of 8).
DECODE_PIXELS = 8 * 512 * 512


class Decoder:
    """The VAE end of a batch run for one pipeline."""

    def __init__(
        self,
        pipe: Any,
        sdxl: bool,
        device: torch.device,
        dtype: torch.dtype,
        invariant: bool,
        compiled: tuple[int, ...],
    ) -> None:
        self.pipe = pipe
        self.sdxl = sdxl
        self.device = device
        self.dtype = dtype
        self.invariant = invariant
        self.compiled = compiled

    def decode(
        self, latents: torch.Tensor, generators: list[torch.Generator], width: int, height: int
    ) -> list[Image.Image]:
        """VAE-decode the rows of `latents` (their generators, in order) into PIL images: one
        image per call when invariant, else a few images per call, across jobs."""
        chunk = 1
        if not self.invariant and not self.needs_upcast():
            # About what a 512x512 batch of 8 takes; larger images, fewer per call. (A VAE
            # upcast to fp32 for decoding, as SDXL's, decodes one image per call.)
            chunk = max(1, DECODE_PIXELS // (width * height))
            if self.compiled:
                # A compiled size, so that no chunk is padded past the pixel budget.
                chunk = max([b for b in self.compiled if b <= chunk], default=self.compiled[0])
        images: list[Image.Image] = []
        upcast = self.needs_upcast()
        if upcast:
            # As the stock SDXL pipeline: an fp16 VAE that overflows decodes in fp32, and is
            # put back afterwards (and by Inference.restore should anything fail here).
            self.pipe.vae.to(dtype=torch.float32)
        try:
            rows_in_all = latents.shape[0]
            for lo in range(0, rows_in_all, chunk):
                hi = min(lo + chunk, rows_in_all)
                rows = latents[lo:hi]
                if upcast:
                    rows = rows.to(next(iter(self.pipe.vae.post_quant_conv.parameters())).dtype)
                images += self._decode_rows(rows, generators[lo:hi])
        finally:
            if upcast:
                self.pipe.vae.to(dtype=torch.float16)
        return images

    def needs_upcast(self) -> bool:
        """SDXL's fp16 VAE with `force_upcast` decodes in float32, as the stock pipeline does."""
        vae = self.pipe.vae
        return bool(
            self.sdxl and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        )

    def _decode_rows(
        self, latents: torch.Tensor, generators: list[torch.Generator]
    ) -> list[Image.Image]:
        pipe = self.pipe
        vae_config = pipe.vae.config
        mean = getattr(vae_config, "latents_mean", None)
        std = getattr(vae_config, "latents_std", None)
        if self.sdxl and mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std_t / vae_config.scaling_factor + mean_t
        else:
            latents = latents / vae_config.scaling_factor
        shift = getattr(vae_config, "shift_factor", None)
        if shift is not None and not self.sdxl:
            latents = latents + shift
        count = latents.shape[0]
        if self.compiled:
            latents = pad_rows(latents, bucket(count, self.compiled))
        if self.sdxl:
            image = pipe.vae.decode(latents, return_dict=False)[0][:count]
            if pipe.watermark is not None:
                image = pipe.watermark.apply_watermark(image)
            image = pipe.image_processor.postprocess(image, output_type="pt")
            return to_pil(image)
        image = pipe.vae.decode(latents, return_dict=False, generator=generators)[0][:count]
        # The model's own safety checker, if it ships one, as the stock pipeline runs it.
        image, nsfw = pipe.run_safety_checker(image, self.device, self.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not flag for flag in nsfw]
        image = pipe.image_processor.postprocess(
            image, output_type="pt", do_denormalize=denormalize
        )
        return mark_filtered(to_pil(image), nsfw)


def mark_filtered(images: list[Image.Image], flags: list[bool] | None) -> list[Image.Image]:
    """Mark the images a safety checker flagged (`FILTERED_MARK` in their `info`): the job
    records them as filtered and stores no PNG of them."""
    for image, flagged in zip(images, flags or [False] * len(images), strict=True):
        if flagged:
            image.info[FILTERED_MARK] = True
    return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[0, 1] images as PIL, with the arithmetic of diffusers' `numpy_to_pil` ((x * 255)
    rounded half to even, in float32) done where the tensor is: on a GPU only uint8 pixels
    cross to the CPU, and the CPU is free sooner to encode and store them."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels.squeeze(-1)  # one channel: grayscale ("L") images, as diffusers makes
    return [Image.fromarray(p) for p in pixels]
