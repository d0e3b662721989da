"""Several jobs that share a shape key, run through one denoising loop (dynamic batching).

The loop is StableDiffusionPipeline.__call__ taken apart so that each row of the batch can carry
its own job: its own prompt, negative prompt and guidance scale, and its own CPU generator, so
image i of a job starts from the same noise (seed + i) in any batch. A job whose step callback
raises leaves the loop at that step boundary and the others go on untouched.

In batch-invariant mode (CPU) every text-encoder, UNet and VAE call covers a single image, laid
out exactly as a stock pipeline call for that image alone (a [uncond, cond] pair under
classifier-free guidance, the cond row alone otherwise); everything else is elementwise, so a
job's images are byte-identical whatever else shares its batch. Otherwise (GPU) each step is one
UNet call over every row; different batch sizes then pick different kernels, and a job's images
differ from its solo run by a few rounding steps (bench/batch_equivalence.py measures how much).

By concern: the texts are `worker.text_conditioning`, the VAE end `worker.decoding`, padding to
compiled sizes `worker.compiled_sizes`; this module is the loop itself — its rows (a `Span` per
job), the starting latents and images in, guidance and control per row, and jobs leaving
mid-run. Why it is still 650 lines: those four share one state (the live spans, their groups,
the scheduler's history), which a further split would only pass around.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from imagegen.core.contract import JobSpec
from worker.compiled_sizes import bucket, pad_rows
from worker.decoding import Decoder
from worker.pipeline import LoadedModel
from worker.previews import estimate_x0
from worker.schedulers import build_scheduler
from worker.text_conditioning import TextConditioning, guided

# on_step(done, total): `done` of the `total` denoising steps the loop runs are finished.
StepCallback = Callable[[int, int], None]


class Span(NamedTuple):
    """A live job's rows in the batch: rows `first` to `end` (exclusive) are job `job`'s images."""

    job: int
    first: int
    end: int

    @property
    def rows(self) -> range:
        return range(self.first, self.end)


class PreviewHook(Protocol):
    """A job's live previews (worker.progress.JobProgress): asked before each step whether
    one is due, then shown the estimate of the job's first image's clean latents."""

    def due(self) -> bool: ...

    def show(self, done: int, total: int, latents: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class BatchItem:
    """One job of a batch: its spec and its progress callback.

    `on_step(k, total)` is called after denoising step k (1-based) of `total`, like the stock
    pipeline's step callback; whatever it raises (`worker.errors.JobStopped`, `JobTimedOut`)
    ends that job alone.
    """

    spec: JobSpec
    on_step: StepCallback | None = None
    # Images in: the normalized input (RGB) and mask (L, 255 = repaint) at the job's size.
    image: Image.Image | None = None
    mask: Image.Image | None = None
    # The job's control maps, one per entry of its spec's `controls`, at the output size
    # (already preprocessed: worker.preprocessors).
    control_images: tuple[Image.Image, ...] = ()
    preview: PreviewHook | None = None


BatchResult = list[Image.Image] | Exception


def run_batch(
    model: LoadedModel,
    items: list[BatchItem],
    *,
    invariant: bool,
    on_loop_step: Callable[[int, int], None] | None = None,
) -> list[BatchResult]:
    """Run jobs that share a shape key as one denoising loop; one result per item, in order.

    A result is the job's PIL images (image i seeded `spec.image_seed(i)`), or the exception
    its `on_step` raised. Anything raised outside a callback (out of memory, a timeout, ...)
    concerns the whole batch and propagates. `on_loop_step(step, rows)`, if given, is called
    after each denoising step (0-based) with the number of images that step ran (for metrics).
    """
    if not items:
        return []
    key = items[0].spec.batch_key
    if any(item.spec.batch_key != key for item in items):
        keys = sorted({item.spec.batch_key for item in items})
        raise ValueError(
            f"a batch needs one (width, height, steps, scheduler), task, strength and mask use; "
            f"got {keys}"
        )
    if items[0].spec.task != "text" and any(item.image is None for item in items):
        raise ValueError("a job with images in needs its input image")
    if any(len(item.spec.controls) != len(item.control_images) for item in items):
        raise ValueError("a job needs one control image per control, and only such a job")
    model.adapters.apply(items[0].spec.loras)
    with torch.inference_mode():
        return _Loop(model, items, invariant, on_loop_step).run()


class _Loop:
    """The state of one batched run; rows are images, grouped by job in item order."""

    def __init__(
        self,
        model: LoadedModel,
        items: list[BatchItem],
        invariant: bool,
        on_loop_step: Callable[[int, int], None] | None,
    ) -> None:
        self.pipe = model.pipe
        self.compiled = () if invariant else model.compiled_batches
        self.on_loop_step = on_loop_step
        self.items = items
        self.invariant = invariant
        # The pipeline's device (no offloading hooks here, so the device it executes on).
        self.device: torch.device = self.pipe.device
        spec = items[0].spec
        # A fresh scheduler per run: schedulers keep per-run state and must not be shared.
        self.scheduler = build_scheduler(spec.scheduler, model.scheduler_config)
        self.results: list[BatchResult | None] = [None] * len(items)
        self.live = list(range(len(items)))
        # Per-row tensors of jobs with images in: image latents, their noise, latent masks.
        self.inputs: dict[str, torch.Tensor] = {}
        # SDXL: the second encoder's pooled output per text, and the micro-conditioning
        # (original size, crop, target size) every row shares (one shape key per batch).
        self.sdxl = isinstance(self.pipe, StableDiffusionXLPipeline)
        # An inpainting checkpoint: its UNet takes the latents, the mask and the masked
        # image's latents (4 + 1 + 4 channels).
        self.nine = self.pipe.unet.config.in_channels == 9
        self.texts = TextConditioning(self.pipe, model.prompts, self.device, self.sdxl, invariant)
        # The batch's ControlNets, in the order its jobs name them (one adapter key per batch);
        # their residuals are summed in that order, as diffusers' MultiControlNetModel does.
        self.controlnets: list[Any] = [
            model.adapters.controlnets[control.id] for control in spec.controls
        ]
        # The stock ControlNet pipeline's control image processor: [0, 1], no normalising.
        processor = VaeImageProcessor(
            vae_scale_factor=self.pipe.vae_scale_factor,
            do_convert_rgb=True,
            do_normalize=False,
        )
        # Per ControlNet, per job. Contiguous, as the stock pipeline's `repeat_interleave`
        # leaves it: preprocess returns a channels-last view of the pixels, and a convolution
        # over that layout rounds differently on CPU (1/255 off with some schedulers).
        self._control_images = [
            [
                processor.preprocess(item.control_images[k], height=spec.height, width=spec.width)
                .to(dtype=torch.float32)
                .to(device=self.device, dtype=net.dtype)
                .contiguous()
                for item in items
            ]
            for k, net in enumerate(self.controlnets)
        ]
        # CPU generators make the starting noise identical on every device and batch layout.
        self.generators = [
            torch.Generator("cpu").manual_seed(item.spec.image_seed(i))
            for item in items
            for i in range(item.spec.n)
        ]
        self._layout()

    # -- rows -----------------------------------------------------------------------------------
    def _cfg(self, job: int) -> bool:
        return guided(self.items[job].spec)

    def _layout(self) -> None:
        """Per-row tensors for the jobs still live; rebuilt when a job leaves."""
        self.spans: list[Span] = []
        row = 0
        for job in self.live:
            n = self.items[job].spec.n
            self.spans.append(Span(job, row, row + n))
            row += n
        self.rows = row
        specs = [self.items[job].spec for job in self.live]
        self.texts.prepare(specs)
        self.text = {job: self.texts.for_job(self.items[job].spec) for job in self.live}
        first = self.text[self.live[0]]
        self.dtype = first.cond.dtype
        if self.sdxl:
            spec = specs[0]
            size = (spec.height, spec.width)
            # SDXL's micro-conditioning, as the stock pipeline makes it: original size, crop
            # top-left (none) and target size, one row every image shares.
            self.time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=self.dtype).to(self.device)
        # Per ControlNet: every live row's control image.
        self.control = [
            torch.cat([images[job] for job in self.live for _ in range(self.items[job].spec.n)])
            for images in self._control_images
        ]
        # One UNet call per step for rows whose context has one length (all of them, unless
        # a long prompt shares the batch with short ones).
        by_length: dict[int, list[Span]] = {}
        for span in self.spans:
            by_length.setdefault(self.text[span.job].cond.shape[1], []).append(span)
        self.groups = [self._group(spans) for spans in by_length.values()]

    def _group(self, spans: list[Span]) -> _Group:
        texts = [(self.text[span.job], len(span.rows)) for span in spans]
        cond = torch.cat([t.cond.expand(n, -1, -1) for t, n in texts])
        guided = [(t, n) for span, (t, n) in zip(spans, texts, strict=True) if self._cfg(span.job)]
        uncond = torch.cat([t.uncond.expand(n, -1, -1) for t, n in guided]) if guided else None  # type: ignore[union-attr]
        pooled_cond = pooled_uncond = None
        if self.sdxl:
            pooled_cond = torch.cat([t.pooled.expand(n, -1) for t, n in texts])  # type: ignore[union-attr]
            if guided:
                pooled_uncond = torch.cat([t.pooled_uncond.expand(n, -1) for t, n in guided])  # type: ignore[union-attr]
        rows = [r for span in spans for r in span.rows]
        # The guided jobs' rows, numbered within the group (the batch's numbers when the
        # group is the whole batch).
        cfg_rows = [i for i, r in enumerate(rows) if self._cfg(self._job_of(r, spans))]
        return _Group(
            spans=spans,
            rows=None if len(rows) == self.rows else _index(rows, self.device),
            cfg_rows=_index(cfg_rows, self.device),
            cond=cond,
            uncond=uncond,
            pooled_cond=pooled_cond,
            pooled_uncond=pooled_uncond,
        )

    @staticmethod
    def _job_of(row: int, spans: list[Span]) -> int:
        return next(span.job for span in spans if row in span.rows)

    def _drop(self, jobs: set[int], latents: torch.Tensor) -> torch.Tensor:
        """Remove `jobs`' rows from the latents, the generators and the scheduler's history."""
        keep = [r for span in self.spans if span.job not in jobs for r in span.rows]
        self.generators = [self.generators[r] for r in keep]
        index = torch.tensor(keep, dtype=torch.long, device=latents.device)
        self.inputs = {k: v.index_select(0, index) for k, v in self.inputs.items()}
        _slice_scheduler_state(self.scheduler, latents.shape, index)
        self.live = [job for job in self.live if job not in jobs]
        if self.live:
            self._layout()
        kept = latents.index_select(0, index)
        if not latents.is_contiguous() and latents.is_contiguous(memory_format=torch.channels_last):
            # Image-to-image latents come channels-last from the VAE encoder, as in the stock
            # pipeline; the UNet's CPU kernels round by layout, so the layout stays.
            kept = kept.contiguous(memory_format=torch.channels_last)
        return kept

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> list[BatchResult]:
        pipe, scheduler = self.pipe, self.scheduler
        spec = self.items[0].spec
        scheduler.set_timesteps(spec.steps, device=self.device)
        timesteps = scheduler.timesteps
        if spec.task == "text" and not self.nine:
            shape = (
                self.rows,
                pipe.unet.config.in_channels,
                spec.height // pipe.vae_scale_factor,
                spec.width // pipe.vae_scale_factor,
            )
            latents = randn_tensor(
                shape, generator=self.generators, device=self.device, dtype=self.dtype
            )
            latents = latents * scheduler.init_noise_sigma
        else:
            timesteps = _strength_timesteps(scheduler, spec.steps, spec.strength or 1.0)
            latents = self._input_latents(timesteps)
        # A 4-channel UNet inpaints by blending the kept area back each step; a 9-channel one
        # (an inpainting checkpoint) takes the mask and the masked image as input instead.
        blend = spec.task in ("inpaint", "outpaint") and not self.nine
        step_params = set(inspect.signature(scheduler.step).parameters)
        for i, t in enumerate(timesteps):
            model_input = latents
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(latents, t)
            unet_input = model_input
            if self.nine:
                conditions = (self.inputs["mask"], self.inputs["masked_latents"])
                unet_input = torch.cat([model_input, *conditions], dim=1)
            noise_pred = self._predict(unet_input, t, i, len(timesteps))
            self._previews(i + 1, len(timesteps), model_input, noise_pred, t)
            extra: dict[str, Any] = {}
            if "eta" in step_params:
                extra["eta"] = 0.0
            if "generator" in step_params:
                extra["generator"] = self.generators
            latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if blend:
                # StableDiffusionInpaintPipeline with a 4-channel UNet: the kept area is the
                # input's latents, noised to the next step's level (clean after the last).
                proper = self.inputs["image_latents"]
                if i < len(timesteps) - 1:
                    proper = scheduler.add_noise(
                        proper, self.inputs["noise"], torch.tensor([timesteps[i + 1]])
                    )
                mask = self.inputs["mask"]
                latents = (1 - mask) * proper + mask * latents
            if self.on_loop_step is not None:
                self.on_loop_step(i, self.rows)
            stopped = self._report(i + 1, len(timesteps))
            if stopped:
                latents = self._drop(stopped, latents)
                if not self.live:
                    break
        if self.live:
            spec = self.items[0].spec
            decoder = Decoder(
                self.pipe, self.sdxl, self.device, self.dtype, self.invariant, self.compiled
            )
            images = decoder.decode(latents, self.generators, spec.width, spec.height)
            for job, a, b in self.spans:
                self.results[job] = images[a:b]
        assert all(result is not None for result in self.results)
        return [result for result in self.results if result is not None]

    def _input_latents(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The starting latents of image-to-image and inpainting rows, drawing from each
        row's generator in the stock pipelines' order: the VAE encoding's sample (not drawn by
        an inpainting UNet's pipeline at full strength), the noise, then (inpainting) the
        masked image's encoding sample, which a 9-channel UNet takes as input and a 4-channel
        one does not use but the stock pipeline draws.

        On an inpainting checkpoint (9-channel UNet) every job is an inpainting one, as in
        `StableDiffusionInpaintPipeline`: no mask is a white one (repaint all), no image a
        black one (text-to-image is a full-canvas inpaint)."""
        pipe, scheduler = self.pipe, self.scheduler
        spec = self.items[0].spec
        dtype = self.dtype
        strength = spec.strength or 1.0
        inpaint = spec.task in ("inpaint", "outpaint") or self.nine
        draws_image = not (self.nine and strength == 1.0)
        # SDXL's fp16 VAE overflows: the stock pipelines encode in fp32 where it asks for it
        # (`force_upcast`), then bring the sample back to the weights' dtype before scaling.
        upcast = self.sdxl and _vae_needs_upcast(pipe.vae)
        scaling = pipe.vae.config.scaling_factor
        size = (spec.width, spec.height)
        image_latents: list[torch.Tensor] = []
        noises: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        masked_latents: list[torch.Tensor] = []
        row = 0
        for job in self.live:
            item = self.items[job]
            image = item.image if item.image is not None else Image.new("RGB", size)
            pixels = pipe.image_processor.preprocess(
                image, height=spec.height, width=spec.width
            ).to(dtype=torch.float32)
            # One encoding per job: it is deterministic; each row samples it with its generator.
            encoded = self._encode(pixels, upcast)
            latent_mask = masked = None
            if inpaint:
                mask = item.mask if item.mask is not None else Image.new("L", size, 255)
                condition = _mask_processor(pipe).preprocess(
                    mask, height=spec.height, width=spec.width
                )
                latent_mask = torch.nn.functional.interpolate(
                    condition,
                    size=(
                        spec.height // pipe.vae_scale_factor,
                        spec.width // pipe.vae_scale_factor,
                    ),
                ).to(device=self.device, dtype=dtype)
                if self.nine:
                    masked = self._encode(pixels * (condition < 0.5), upcast)
            for _ in range(item.spec.n):
                generator = self.generators[row]
                if draws_image:
                    latent = encoded.sample(generator).to(dtype) * scaling
                else:  # unused: at full strength the start is pure noise
                    latent = torch.zeros_like(encoded.mean, dtype=dtype)
                noise = randn_tensor(
                    latent.shape, generator=[generator], device=self.device, dtype=dtype
                )
                if inpaint:
                    assert latent_mask is not None
                    # The stock inpainting pipeline repeats its image latents (a contiguous
                    # copy); the encoder leaves them channels-last, and on one CPU thread the
                    # UNet's kernels then round differently.
                    latent = latent.contiguous()
                    if masked is not None:
                        masked_latents.append(masked.sample(generator).to(dtype) * scaling)
                    else:  # the masked image's encoding: a 4-channel UNet only draws it
                        randn_tensor(
                            latent.shape, generator=generator, device=self.device, dtype=dtype
                        )
                    masks.append(latent_mask)
                image_latents.append(latent)
                noises.append(noise)
                row += 1
        self.inputs["image_latents"] = torch.cat(image_latents)
        self.inputs["noise"] = torch.cat(noises)
        if masks:
            self.inputs["mask"] = torch.cat(masks)
        if masked_latents:
            self.inputs["masked_latents"] = torch.cat(masked_latents)
        latent_timestep = timesteps[:1].repeat(self.rows)
        if inpaint and strength == 1.0:
            start: torch.Tensor = self.inputs["noise"] * scheduler.init_noise_sigma
            return start
        start = scheduler.add_noise(
            self.inputs["image_latents"], self.inputs["noise"], latent_timestep
        )
        return start

    def _encode(self, pixels: torch.Tensor, upcast: bool) -> Any:
        """The VAE's latent distribution of `pixels` ([-1, 1], float32): rounded to the
        weights' dtype, then in float32 where the VAE must be upcast, as the stock pipelines
        encode."""
        vae = self.pipe.vae
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if upcast:
            pixels = pixels.float()
            vae.to(dtype=torch.float32)
        try:
            return vae.encode(pixels).latent_dist
        finally:
            if upcast:
                vae.to(dtype=torch.float16)

    def _previews(
        self,
        step: int,
        total: int,
        model_input: torch.Tensor,
        noise_pred: torch.Tensor,
        t: torch.Tensor,
    ) -> None:
        """Show the jobs whose preview is due the clean latents their first image's noise
        prediction implies. Reads the tensors, writes none: the images stay as they were."""
        for job, first, _end in self.spans:
            hook = self.items[job].preview
            if hook is None or not hook.due():
                continue
            try:
                x0 = estimate_x0(
                    self.scheduler,
                    model_input[first : first + 1],
                    noise_pred[first : first + 1],
                    t,
                )
                hook.show(step, total, x0[0])
            except Exception:  # a preview is a courtesy: it never fails its job
                logging.getLogger("imagegen.worker").warning("preview failed", exc_info=True)

    def _report(self, step: int, total: int) -> set[int]:
        """Call each live job's on_step; the jobs whose callback raised, now finished."""
        stopped: set[int] = set()
        for job in self.live:
            on_step = self.items[job].on_step
            if on_step is None:
                continue
            try:
                on_step(step, total)
            except Exception as exc:
                self.results[job] = exc
                stopped.add(job)
        return stopped

    def _unet(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None = None,
        residuals: tuple[list[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        rows = sample.shape[0]
        if self.compiled:
            # Pad to a compiled size (a guided batch of b images is 2b rows), and give the
            # timestep one dtype (DDIM's are integers, Euler's floats; the UNet makes them
            # float either way): a new shape or dtype would mean compiling mid-job.
            size = bucket(rows, [2 * b for b in self.compiled])
            sample, context = pad_rows(sample, size), pad_rows(context, size)
            if pooled is not None:
                pooled = pad_rows(pooled, size)
            if residuals is not None:
                down, mid = residuals
                residuals = ([pad_rows(d, size) for d in down], pad_rows(mid, size))
            t = t.to(torch.float32)
        added = None
        if pooled is not None:
            # SDXL: the pooled text embedding and the size/crop micro-conditioning per row.
            added = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(pooled.shape[0], 1)}
        extra: dict[str, Any] = {}
        if residuals is not None:
            extra = {
                "down_block_additional_residuals": residuals[0],
                "mid_block_additional_residual": residuals[1],
            }
        out: torch.Tensor = self.pipe.unet(
            sample,
            t,
            encoder_hidden_states=context,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            **extra,
            return_dict=False,
        )[0]
        return out[:rows]

    def _control_scale(self, job: int, k: int, step: int, total: int) -> float:
        """The stock ControlNet pipeline's conditioning scale of ControlNet `k` at `step`: the
        job's scale inside its [start, end] window of the steps, 0 outside it."""
        control = self.items[job].spec.controls[k]
        keep = 1.0 - float(step / total < control.start or (step + 1) / total > control.end)
        return control.scale * keep

    def _residuals(
        self,
        sample: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        images: list[torch.Tensor],
        scales: list[float] | list[torch.Tensor],
        pooled: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The ControlNets' residuals for these rows, summed in order as MultiControlNetModel
        sums them (None for jobs without control). A float scale is the stock call's; a per-row
        tensor scales the rows after one call. SDXL's ControlNets take the UNet's pooled text
        embedding and micro-conditioning too, as StableDiffusionXLControlNetPipeline passes."""
        added = None
        if pooled is not None:
            added = {"text_embeds": pooled, "time_ids": self.time_ids.repeat(pooled.shape[0], 1)}
        summed: tuple[list[torch.Tensor], torch.Tensor] | None = None
        for net, image, scale in zip(self.controlnets, images, scales, strict=True):
            down, mid = net(
                sample,
                t,
                encoder_hidden_states=context,
                controlnet_cond=image,
                conditioning_scale=scale if isinstance(scale, float) else 1.0,
                guess_mode=False,
                added_cond_kwargs=added,
                return_dict=False,
            )
            if isinstance(scale, torch.Tensor):
                per_row = scale.view(-1, 1, 1, 1).to(mid.dtype)
                down, mid = [d * per_row for d in down], mid * per_row
            if summed is None:
                summed = (list(down), mid)
            else:
                summed = ([a + b for a, b in zip(summed[0], down, strict=True)], summed[1] + mid)
        return summed

    def _predict(
        self, model_input: torch.Tensor, t: torch.Tensor, step: int, total: int
    ) -> torch.Tensor:
        """The guided noise prediction for every row, each with its own job's guidance."""
        parts: list[torch.Tensor] = []
        if self.invariant:
            # One image per call, laid out as the stock pipeline lays out a solo run.
            for job, a, b in self.spans:
                scale = self.items[job].spec.guidance_scale
                text = self.text[job]
                cscales = [
                    self._control_scale(job, k, step, total) for k in range(len(self.controlnets))
                ]
                for r in range(a, b):
                    x, cond, pooled = model_input[r : r + 1], text.cond, text.pooled
                    images = [control[r : r + 1] for control in self.control]
                    if self._cfg(job):
                        assert text.uncond is not None
                        context = torch.cat([text.uncond, cond])
                        if pooled is not None and text.pooled_uncond is not None:
                            pooled = torch.cat([text.pooled_uncond, pooled])
                        pair = torch.cat([x] * 2)
                        pairs = [torch.cat([image] * 2) for image in images]
                        res = self._residuals(pair, t, context, pairs, cscales, pooled)
                        uncond_pred, cond_pred = self._unet(pair, t, context, pooled, res).chunk(2)
                        parts.append(_guided(uncond_pred, cond_pred, scale))
                    else:
                        res = self._residuals(x, t, cond, images, cscales, pooled)
                        parts.append(self._unet(x, t, cond, pooled, res))
            return torch.cat(parts)
        if len(self.groups) == 1:
            return self._predict_group(self.groups[0], model_input, t, step, total)
        # Contexts of several lengths: one call per length, the rows put back in order.
        out: list[torch.Tensor | None] = [None] * self.rows
        for group in self.groups:
            assert group.rows is not None
            pred = self._predict_group(
                group, model_input.index_select(0, group.rows), t, step, total
            )
            for i, r in enumerate(group.rows.tolist()):
                out[r] = pred[i : i + 1]
        return torch.cat([p for p in out if p is not None])

    def _predict_group(
        self, group: _Group, model_input: torch.Tensor, t: torch.Tensor, step: int, total: int
    ) -> torch.Tensor:
        """One UNet call for a group's rows (`model_input` holds just them, in order): the
        unconditional rows of the guided jobs, then all."""
        parts: list[torch.Tensor] = []
        rows = model_input.shape[0]
        sample, context, pooled = model_input, group.cond, group.pooled_cond
        if group.uncond is not None:
            sample = torch.cat([model_input.index_select(0, group.cfg_rows), model_input])
            context = torch.cat([group.uncond, group.cond])
            if group.pooled_cond is not None and group.pooled_uncond is not None:
                pooled = torch.cat([group.pooled_uncond, group.pooled_cond])
        # Each row its own control images and its job's scales at this step, one call a net.
        images: list[torch.Tensor] = []
        scales: list[torch.Tensor] = []
        for k, all_rows in enumerate(self.control):
            control = all_rows if group.rows is None else all_rows.index_select(0, group.rows)
            row_scales = torch.tensor(
                [
                    self._control_scale(job, k, step, total)
                    for job, a, b in group.spans
                    for _ in range(a, b)
                ],
                device=self.device,
            )
            if group.uncond is not None:
                control = torch.cat([control.index_select(0, group.cfg_rows), control])
                row_scales = torch.cat([row_scales.index_select(0, group.cfg_rows), row_scales])
            images.append(control)
            scales.append(row_scales)
        residuals = self._residuals(sample, t, context, images, scales, pooled)
        out = self._unet(sample, t, context, pooled, residuals)
        uncond_all, cond_all = out[: out.shape[0] - rows], out[out.shape[0] - rows :]
        uncond_row = 0
        row = 0
        for job, a, b in group.spans:
            n = b - a
            cond_pred = cond_all[row : row + n]
            row += n
            if self._cfg(job):
                uncond_pred = uncond_all[uncond_row : uncond_row + n]
                uncond_row += n
                parts.append(_guided(uncond_pred, cond_pred, self.items[job].spec.guidance_scale))
            else:
                parts.append(cond_pred)
        return torch.cat(parts)


@dataclass(frozen=True)
class _Group:
    """Jobs whose contexts have one length: their rows run through one UNet call a step."""

    spans: list[Span]
    rows: torch.Tensor | None  # the batch rows they hold (None: all of them, in order)
    cfg_rows: torch.Tensor  # the rows of their guided jobs, numbered within the group
    cond: torch.Tensor
    uncond: torch.Tensor | None
    pooled_cond: torch.Tensor | None
    pooled_uncond: torch.Tensor | None


def _guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, as the stock pipeline combines the two predictions. `scale` is
    a python float, as there: on fp16 that keeps the product in float32 before rounding, where
    a half tensor of scales would round it first."""
    return uncond + scale * (cond - uncond)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _mask_processor(pipe: Any) -> VaeImageProcessor:
    """The inpainting pipelines' mask processor: grayscale, in [0, 1], binarized at 0.5."""
    return VaeImageProcessor(
        vae_scale_factor=pipe.vae_scale_factor,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )


def _vae_needs_upcast(vae: Any) -> bool:
    """An fp16 VAE that asks to run in fp32 (`force_upcast`, as SDXL's does)."""
    return bool(vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False))


def _strength_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The stock image-to-image pipelines' `get_timesteps`: the last `steps * strength` steps."""
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps: torch.Tensor = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def _slice_scheduler_state(scheduler: Any, shape: torch.Size, index: torch.Tensor) -> None:
    """Keep rows `index` of every per-sample tensor the scheduler holds between steps.

    Multistep schedulers remember past model outputs and samples (DPM-Solver and UniPC
    `model_outputs`, UniPC `last_sample`, PNDM `ets`/`cur_sample`/`cur_model_output`); those
    are the attributes, or list entries, shaped like the batch's latents. Everything else
    (sigmas, step index, order counters) is shared by all rows. diffusers has no public way
    to drop rows from a scheduler mid-run, hence the walk over its attributes; the batch tests
    check it for the schedulers that keep such state (a job leaving mid-batch, the rest
    unchanged byte for byte).
    """

    def keep(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == shape:
            return value.index_select(0, index.to(value.device))
        return value

    for name, value in vars(scheduler).items():
        if isinstance(value, list):
            setattr(scheduler, name, [keep(v) for v in value])
        elif isinstance(value, tuple):
            setattr(scheduler, name, tuple(keep(v) for v in value))
        else:
            setattr(scheduler, name, keep(value))
