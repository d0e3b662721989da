"""The warm model at work: the batch loop where it can run the model, the stock diffusers
pipeline call where it cannot, warm-up, and the model's known state restored after a failure."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from imagegen.core.contract import JobSpec
from worker import edits
from worker.batch_loop import (
    BatchItem,
    BatchResult,
    PreviewHook,
    StepCallback,
    run_batch,
)
from worker.decoding import mark_filtered
from worker.errors import is_out_of_memory
from worker.families import supports_batching
from worker.pipeline import LoadedModel
from worker.previews import fit_projection
from worker.schedulers import build_scheduler

log = logging.getLogger("imagegen.worker")

# on_loop_step(step, rows): denoising step `step` (0-based) of the loop ran `rows` images.
LoopStepCallback = Callable[[int, int], None]


class Inference:
    """Runs batches of jobs on one warm pipeline."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.batching = supports_batching(model.pipe)
        # Image-to-image and inpainting pipelines made from the warm one (`from_pipe`).
        self._stock: dict[str, Any] = {}
        if not self.batching and hasattr(model.pipe, "vae"):
            # The stock call decodes all of a job's images at once: SDXL at 1024² needs about
            # 4 GiB of fp32 activations per image there. One image per decode call caps it.
            model.pipe.vae.enable_slicing()
        # The dtypes the pipeline was loaded in. Some stock pipelines change them mid-call and
        # change them back only on success (SDXL upcasts its fp16 VAE to fp32 for the decode):
        # after any failure they are put back, or every later job would fail.
        # Live previews: the model's latent -> RGB map, fitted once, deterministically.
        self.previews = fit_projection(model.pipe)
        self._dtypes: dict[str, torch.dtype] = {
            name: _dtype_of(component)
            for name, component in model.pipe.components.items()
            if isinstance(component, torch.nn.Module)
        }

    def run(
        self, items: list[BatchItem], on_loop_step: LoopStepCallback | None = None
    ) -> list[BatchResult]:
        """One result per item: its images, or what its step callback raised. Anything
        raised outside a callback (out of memory, ...) concerns the whole batch and
        propagates, after the pipeline's state is restored. Inpainting and outpainting
        results have the kept pixels composited back exactly."""
        crops = {
            i: edits.MaskCrop(item.image, item.mask, item.spec.padding_mask_crop)
            for i, item in enumerate(items)
            if item.spec.padding_mask_crop is not None and item.image and item.mask
        }
        cut = [
            dataclasses.replace(item, image=crop.cut(crop.image), mask=crop.cut(crop.mask))
            if (crop := crops.get(i)) is not None
            else item
            for i, item in enumerate(items)
        ]
        results = self._run(cut, on_loop_step)
        finished: list[BatchResult] = []
        for i, (item, result) in enumerate(zip(items, results, strict=True)):
            if isinstance(result, list):
                if i in crops:
                    result = crops[i].paste(result)
                result = edits.composite(result, item.image, item.mask, item.spec.mask_blur)
            finished.append(result)
        return finished

    def _run(
        self, items: list[BatchItem], on_loop_step: LoopStepCallback | None = None
    ) -> list[BatchResult]:
        try:
            if self.batching:
                return run_batch(
                    self.model,
                    items,
                    invariant=self.model.batch_invariant,
                    on_loop_step=on_loop_step,
                )
            results: list[BatchResult] = []
            for item in items:
                self.model.adapters.apply(item.spec.loras)
                try:
                    results.append(
                        self.generate(
                            item.spec,
                            item.on_step,
                            on_loop_step,
                            image=item.image,
                            mask=item.mask,
                            preview=item.preview,
                        )
                    )
                except Exception as exc:
                    if not _raised_by_callback(exc):
                        raise
                    results.append(exc)
            return results
        except BaseException:
            self.restore()
            raise

    # -- the stock pipeline ---------------------------------------------------------------------
    def generate(
        self,
        spec: JobSpec,
        on_step: StepCallback | None = None,
        on_loop_step: LoopStepCallback | None = None,
        image: Any = None,
        mask: Any = None,
        preview: PreviewHook | None = None,
    ) -> list[Any]:
        """Run the stock pipeline for one spec and return PIL images, image i seeded seed + i.

        In batch-invariant mode (the default on CPU) each image gets its own pipeline call:
        float kernels give slightly different results for different batch sizes, and this
        mode keeps image i byte-identical to the same seed generated alone (n=1).
        """
        if not self.model.batch_invariant or spec.n == 1:
            return self._call(
                spec, list(range(spec.n)), on_step, on_loop_step, image, mask, preview
            )
        images: list[Any] = []
        for i in range(spec.n):

            def scaled(done: int, total: int, before: int = i) -> None:
                # Progress over all n runs, never going back.
                if on_step is not None:
                    on_step(before * total + done, spec.n * total)

            images += self._call(spec, [i], scaled, on_loop_step, image, mask, preview)
        return images

    def _call(
        self,
        spec: JobSpec,
        indices: list[int],
        on_step: StepCallback | None,
        on_loop_step: LoopStepCallback | None,
        image: Any = None,
        mask: Any = None,
        preview: PreviewHook | None = None,
    ) -> list[Any]:
        pipe = edits.stock_pipeline(self.model.pipe, spec.task, self._stock)
        inputs: dict[str, Any] = {"width": spec.width, "height": spec.height}
        if spec.task != "text":
            inputs = {"image": [image] * len(indices), "strength": spec.strength}
            if spec.task in ("inpaint", "outpaint"):
                inputs.update(
                    mask_image=[mask] * len(indices), width=spec.width, height=spec.height
                )
        # A fresh scheduler per call: schedulers keep per-run state and must not be shared.
        pipe.scheduler = build_scheduler(spec.scheduler, self.model.scheduler_config)
        # CPU generators make the starting noise identical on every device and batch layout.
        generators = [torch.Generator("cpu").manual_seed(spec.image_seed(i)) for i in indices]

        def callback(pipe_: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_loop_step is not None:
                on_loop_step(step, len(indices))
            total = getattr(pipe_, "num_timesteps", spec.steps)
            latents = kwargs.get("latents")
            if preview is not None and latents is not None and preview.due():
                # The stock call shares no noise prediction: the preview shows the current
                # (noisy) latents rather than the clean estimate. It never fails the job.
                try:
                    preview.show(step + 1, total, latents[0])
                except Exception:
                    log.warning("preview failed", exc_info=True)
            if on_step is not None:
                try:
                    on_step(step + 1, total)
                except Exception as exc:
                    exc.raised_by_callback = True  # type: ignore[attr-defined]
                    raise
            return kwargs

        with torch.inference_mode():
            if self.model.prompts is not None:
                # Weighted and long prompts as embeddings; plain ones as the strings.
                text = self.model.prompts.stock_inputs(spec, len(indices), self.model.pipe.device)
            else:
                text = {
                    "prompt": [spec.prompt] * len(indices),
                    "negative_prompt": [spec.negative_prompt] * len(indices)
                    if spec.negative_prompt
                    else None,
                }
            result = pipe(
                **text,
                **inputs,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback,
            )
        images: list[Any] = mark_filtered(
            result.images, getattr(result, "nsfw_content_detected", None)
        )
        return images

    # -- state ----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Put the pipeline back in its loaded state and free what a failed run left: its
        dtypes, and no LoRA active (the next batch sets its own)."""
        try:
            self.model.adapters.reset()
        except Exception:  # never hide the failure that brought us here
            log.exception("could not reset the LoRA adapters after a failed job")
        for name, dtype in self._dtypes.items():
            component = getattr(self.model.pipe, name, None)
            if isinstance(component, torch.nn.Module) and _dtype_of(component) != dtype:
                log.warning("restoring %s to %s after a failed job", name, dtype)
                component.to(dtype=dtype)
        self.free_memory()

    def free_memory(self) -> None:
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self) -> int | None:
        """One small generation, so the first job pays no lazy-initialisation cost; with
        torch.compile, one per batch size to be served, so no job pays for compiling.

        A size that runs out of memory ends the warm-up there, and the largest size that
        warmed up is returned: the worker then serves batches of at most that many images
        (never a crash and a restart loop). None when every size warmed up (no new limit);
        `WarmUpOutOfMemory` when even the first did not."""
        warmed = 0
        limit: int | None = None
        for size in self.model.compiled_batches or (1,):
            try:
                self._warm_up_batch(size)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.free_memory()
                if not warmed:
                    raise WarmUpOutOfMemory(
                        f"out of memory warming up a batch of {size} image(s) at "
                        f"{self.model.info.width}x{self.model.info.height}"
                    ) from exc
                log.warning(
                    "warm-up of a batch of %d ran out of memory: batches are limited to %d images",
                    size,
                    warmed,
                )
                limit = warmed
                break
            warmed = size
        if self.model.compiled_batches:
            # From now on a shape that was not warmed up (another resolution, a pipeline the
            # batch loop does not pad) runs eagerly: compiling it would stall its batch for a
            # minute, and past dynamo's recompile limit a fullgraph compile is an error.
            torch.compiler.set_stance("eager_on_recompile")
        return limit

    def _warm_up_batch(self, size: int) -> None:
        info = self.model.info
        spec = JobSpec(
            prompt="warm-up",
            negative_prompt="",
            width=info.width,
            height=info.height,
            steps=2,
            # Guided, so that the batch loop's UNet calls are the 2 * size rows it pads to.
            guidance_scale=max(info.guidance_scale, 2.0) if self.batching else info.guidance_scale,
            seed=0,
            n=size,
            scheduler=info.scheduler,
            model=info.id,
        )
        started = time.perf_counter()
        (result,) = self.run([BatchItem(spec)])
        if isinstance(result, BaseException):
            raise result
        log.info("warm-up of batch %d took %.2fs", size, time.perf_counter() - started)


class WarmUpOutOfMemory(RuntimeError):
    """Even the smallest warm-up batch did not fit in memory: the model cannot serve here."""


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a component's first floating-point parameter (what diffusers reports)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _raised_by_callback(exc: BaseException) -> bool:
    return bool(getattr(exc, "raised_by_callback", False))
