"""Request resolution: a validated request and the model it names become the job's spec, the
model's defaults filled in and every configured limit applied, as a pure function of its
inputs (the request, the settings, the model's record): no Redis, no I/O. The gateway looks
the model up first; the property tests call it directly."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from app import images_in
from app.errors import InvalidRequest, Unavailable
from app.prompt_tokens import Encode
from app.schemas import GenerationRequest, PreprocessRequest
from imagegen.core import prompts
from imagegen.core.contract import (
    DEFAULT_OUTPUT_COMPRESSION,
    SCHEDULER_MIN_STEPS,
    AdapterInfo,
    ControlRef,
    JobSpec,
    LoraRef,
    ModelInfo,
    control_blob,
)
from imagegen.core.settings import GatewaySettings


@dataclass(frozen=True)
class Target:
    """The model a request names (its id, the default's when it names none), its record as
    workers published it (None: no worker announced it) and every known model id."""

    model_id: str
    info: ModelInfo | None
    known: tuple[str, ...] = ()


def pixel_cap(settings: GatewaySettings, info: ModelInfo | None) -> int:
    """The most pixels an output may have: the service's cap, or the model's if lower."""
    cap = settings.max_pixels
    return min(cap, info.max_pixels) if info is not None and info.max_pixels else cap


def served_model(target: Target, by_default: bool) -> ModelInfo:
    """The model's record; a 503 while the default model has no worker yet, a 422 naming
    `model` for a model no worker ever announced."""
    if target.info is not None:
        return target.info
    if by_default:
        raise Unavailable(
            f"the default model {target.model_id!r} has no worker registered yet; retry shortly"
        )
    known = ", ".join(target.known) or "none"
    raise InvalidRequest.for_field(
        "model", f"unknown model {target.model_id!r}; known models: {known}"
    )


def resolve_preprocess(
    request: PreprocessRequest, settings: GatewaySettings, target: Target
) -> tuple[JobSpec, dict[str, bytes]]:
    """The control-preview job of `request` (task "preprocess": its one image is the map at
    the output size, made by a worker of the model) and its input blob. Blocking: decodes the
    picture, so the gateway runs it in a thread."""
    info = served_model(target, request.model is None)
    _check_preprocessor("preprocess", request.preprocess, info)
    width = request.width if request.width is not None else info.width
    height = request.height if request.height is not None else info.height
    cap = pixel_cap(settings, info)
    if width * height > cap:
        raise InvalidRequest.for_field(
            "width" if request.width is not None else "height",
            f"width*height = {width * height} exceeds the pixel cap of {cap}",
        )
    png, image = images_in.control_input(
        request.image, width, height, "image", settings.max_input_image_bytes, cap
    )
    control = ControlRef(
        id="preview",
        scale=1.0,
        start=0.0,
        end=1.0,
        image=image,
        preprocess=request.preprocess,
        options=request.options_used(),
    )
    spec = JobSpec(
        prompt="",
        negative_prompt="",
        width=width,
        height=height,
        steps=1,
        guidance_scale=0.0,
        seed=0,
        n=1,
        scheduler=info.scheduler,
        model=info.id,
        task="preprocess",
        controls=(control,),
    )
    return spec, {control_blob(0): png}


def resolve_request(
    request: GenerationRequest,
    settings: GatewaySettings,
    target: Target,
    inputs: images_in.PreparedInputs | None = None,
    encode: Encode | None = None,
) -> tuple[JobSpec, dict[str, bytes]]:
    """The job `request` asks for, the model's defaults filled in and every configured limit
    applied (an `ApiError` naming the field otherwise), and its input blobs by name (the
    normalized images of `inputs` and the control image). `encode` counts prompt tokens with
    the model's tokenizer (None: not counted). No I/O: the gateway looks the model up first."""
    s = settings
    model_id = target.model_id
    info = served_model(target, request.model is None)
    if len(request.prompt.strip()) > s.max_prompt_chars:
        raise InvalidRequest.for_field(
            "prompt", f"must be at most {s.max_prompt_chars} characters after trimming"
        )
    if len(request.negative_prompt) > s.max_prompt_chars:
        raise InvalidRequest.for_field(
            "negative_prompt", f"must be at most {s.max_prompt_chars} characters"
        )
    if info.prompt_weighting:
        for field in ("prompt", "negative_prompt"):
            problem = prompts.weight_problem(getattr(request, field))
            if problem is not None:
                raise InvalidRequest.for_field(field, problem)
    if encode is not None and info.max_prompt_tokens is not None:
        for field in ("prompt", "negative_prompt"):
            text = getattr(request, field)
            tokens = prompts.count_tokens(encode, text, info.prompt_weighting)
            if tokens > info.max_prompt_tokens:
                raise InvalidRequest.for_field(
                    field, prompts.too_long(tokens, info.max_prompt_tokens, model_id)
                )
    width = request.width if request.width is not None else info.width
    height = request.height if request.height is not None else info.height
    if inputs is not None:  # the input's size (grown by any outpaint) unless given
        width, height = inputs.width, inputs.height
    if width * height > s.max_pixels:
        named = "width" if request.width is not None else "height"
        if inputs is not None and request.width is None and request.height is None:
            named = "outpaint" if request.outpaint is not None else "image"
        raise InvalidRequest.for_field(
            named,
            f"width*height = {width * height} exceeds the pixel cap of {s.max_pixels}",
        )
    if info.max_pixels is not None and width * height > info.max_pixels:
        raise InvalidRequest.for_field(
            "width" if request.width is not None else "height",
            f"width*height = {width * height} exceeds model {model_id!r}'s pixel cap of "
            f"{info.max_pixels} (its native size is {info.width}x{info.height})",
        )
    steps = request.steps if request.steps is not None else info.steps
    if steps > s.max_steps:
        raise InvalidRequest.for_field("steps", f"must be at most {s.max_steps}")
    if info.max_steps is not None and steps > info.max_steps:
        raise InvalidRequest.for_field(
            "steps", f"must be at most {info.max_steps} for model {model_id!r}"
        )
    if request.n > s.max_n:
        raise InvalidRequest.for_field("n", f"must be at most {s.max_n}")
    scheduler = request.scheduler if request.scheduler is not None else info.scheduler
    if scheduler not in info.schedulers:
        raise InvalidRequest.for_field(
            "scheduler",
            f"unknown scheduler {scheduler!r}; one of: {', '.join(info.schedulers)}",
        )
    min_steps = SCHEDULER_MIN_STEPS.get(scheduler, 1)
    if steps < min_steps:
        raise InvalidRequest.for_field(
            "steps", f"scheduler {scheduler!r} needs at least {min_steps} steps"
        )
    if inputs is not None:
        strength = _input_fields(request, inputs)["strength"]
        assert isinstance(strength, float | int)
        if int(steps * strength) < min_steps:
            raise InvalidRequest.for_field(
                "strength",
                f"strength {strength} x {steps} steps leaves {int(steps * strength)} steps "
                f"to run; at least {min_steps} needed (raise strength or steps)",
            )
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    loras = _loras(request, info)
    controls = _controls(request, settings, info, width, height)
    spec = JobSpec(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=(
            request.guidance_scale if request.guidance_scale is not None else info.guidance_scale
        ),
        seed=seed,
        n=request.n,
        scheduler=scheduler,
        model=model_id,
        **_input_fields(request, inputs),
        loras=loras,
        controls=tuple(ref for ref, _ in controls),
        output_format=request.output_format or "png",
        output_compression=(
            DEFAULT_OUTPUT_COMPRESSION
            if request.output_compression is None
            else request.output_compression
        ),
    )
    blobs = dict(inputs.blobs) if inputs is not None else {}
    for k, (_, png) in enumerate(controls):
        blobs[control_blob(k)] = png
    return spec, blobs


def _loras(request: GenerationRequest, info: ModelInfo) -> tuple[LoraRef, ...]:
    """The request's LoRAs, each among the model's adapters and named once; scale 0 is
    the request without that LoRA, so it is left out."""
    seen: set[str] = set()
    out = []
    for i, lora in enumerate(request.loras or []):
        _check_served(f"loras[{i}].id", lora.id, "adapter", info.adapters, info)
        if lora.id in seen:
            raise InvalidRequest.for_field(f"loras[{i}].id", f"{lora.id!r} is listed twice")
        seen.add(lora.id)
        if lora.scale != 0:
            out.append(LoraRef(id=lora.id, scale=lora.scale))
    return tuple(out)


def _check_served(
    field: str, adapter_id: str, kind: str, served: list[AdapterInfo], info: ModelInfo
) -> None:
    """A 422 naming `field` unless the model serves the adapter (LoRA or ControlNet) `adapter_id`:
    why, when it has it but cannot load it; what it has, when it does not have it."""
    unavailable = {a.id: a.reason for a in info.unavailable_adapters}
    if adapter_id in unavailable:
        raise InvalidRequest.for_field(
            field,
            f"{kind} {adapter_id!r} of model {info.id!r} is unavailable: {unavailable[adapter_id]}",
        )
    known = [a.id for a in served]
    if adapter_id not in known:
        raise InvalidRequest.for_field(
            field,
            f"unknown {kind} {adapter_id!r} for model {info.id!r}; "
            f"its {kind}s: {', '.join(known) or 'none'}",
        )


def _check_preprocessor(field: str, name: str, info: ModelInfo) -> None:
    if name != "none" and name not in info.preprocessors:
        raise InvalidRequest.for_field(
            field,
            f"preprocessor {name!r} is not available for model {info.id!r}; "
            f"its preprocessors: {', '.join(['none', *info.preprocessors])}",
        )


def _controls(
    request: GenerationRequest, settings: GatewaySettings, info: ModelInfo, width: int, height: int
) -> list[tuple[ControlRef, bytes]]:
    """The controls and their decoded images (resized to the output size), in order; one at
    scale 0 is left out (the request without it: its residuals would add zeros)."""
    out = []
    for field, control in request.control_list():
        _check_served(f"{field}.id", control.id, "control", info.controls, info)
        _check_preprocessor(f"{field}.preprocess", control.preprocess, info)
        png, image = images_in.control_input(
            control.image,
            width,
            height,
            f"{field}.image",
            settings.max_input_image_bytes,
            settings.max_pixels,
        )
        if control.scale == 0:
            continue
        ref = ControlRef(
            id=control.id,
            scale=control.scale,
            start=control.start,
            end=control.end,
            image=image,
            preprocess=control.preprocess,
            options=control.options_used(),
        )
        out.append((ref, png))
    return out


def _input_fields(
    request: GenerationRequest, inputs: images_in.PreparedInputs | None
) -> dict[str, object]:
    if inputs is None:
        return {}
    default_strength = 0.8 if inputs.task == "img2img" else 1.0
    return {
        "task": inputs.task,
        "image": inputs.refs["image"],
        "mask": inputs.refs.get("mask"),
        "strength": request.strength if request.strength is not None else default_strength,
        "outpaint": request.outpaint.to_contract() if request.outpaint else None,
        "mask_blur": request.mask_blur or 0,
        "padding_mask_crop": request.padding_mask_crop,
    }
