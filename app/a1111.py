"""AUTOMATIC1111's `/sdapi/v1` request and answer shapes, translated onto this service's own:
an A1111 request becomes an ordinary GenerationRequest (the same validation, lifecycle, fair use
and limits); its answer is built from the finished job. Pure functions, no I/O.

What A1111 clients send that would change the image and is not served here (`enable_hr`,
`restore_faces`, `tiling`, scripts) is a 422 naming the field, never silently dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidRequest
from imagegen.core.contract import MAX_CONTROLS


class A1111Error(BaseModel):
    """An error of `/sdapi/v1`, in AUTOMATIC1111's shape (app.middleware.A1111Errors)."""

    error: str = Field(description="This service's error code, e.g. `invalid_request`.")
    detail: str = Field(description="What is wrong, naming the field and the limit.")
    body: str = ""
    errors: list[dict[str, Any]] = Field(
        default_factory=list, description="One entry per problem: `field`, `message`, `type`."
    )


# A1111's sampler names (and the `scheduler` "karras") onto the scheduler table.
SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "UniPC": "unipc",
    "PLMS": "pndm",
    "LCM": "lcm",
}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}
LORA_TAG = re.compile(r"<lora:([^:>]{1,100}):?([-+0-9.eE]{0,20})>")


class A1111Request(BaseModel):
    """The fields of A1111's txt2img/img2img that map; the rest of what clients such as
    `webuiapi` send every time (~50 fields) is accepted and, where it would change the image,
    checked to be at its no-op value."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field("", description="Besides `<lora:name:weight>` tags: as the native prompt.")
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0, le=30)
    width: int | None = Field(None, ge=64, multiple_of=8)
    height: int | None = Field(None, ge=64, multiple_of=8)
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1: random.")
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=8)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # img2img
    init_images: list[str] | None = None
    denoising_strength: float | None = Field(None, ge=0, le=1)
    mask: str | None = None


# Fields whose non-default values would change the image in a way this service does not do.
UNSERVED: dict[str, Any] = {
    "enable_hr": False,
    "restore_faces": False,
    "tiling": False,
    "subseed_strength": 0,
    "inpainting_mask_invert": 0,
}


def to_generation(body: A1111Request, model: str | None, img2img: bool) -> dict[str, Any]:
    """The native request body for `body` (its checkpoint `model`); InvalidRequest naming the
    A1111 field for what does not map."""
    extra = body.model_extra or {}
    for name, neutral in UNSERVED.items():
        value = extra.get(name)
        if value is not None and value != neutral:
            raise InvalidRequest.for_field(name, f"{name}={value!r} is not supported here")
    controls = controlnet_units(extra.get("alwayson_scripts"))
    prompt, loras = lora_tags(body.prompt)
    fields: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": body.negative_prompt or None,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": None if body.seed < 0 else body.seed,
        "n": body.batch_size * body.n_iter,
        "scheduler": scheduler(body),
        "model": body.override_settings.get("sd_model_checkpoint") or model,
        "loras": loras or None,
        "controls": controls or None,
    }
    if img2img:
        if not body.init_images:
            raise InvalidRequest.for_field("init_images", "img2img needs one image")
        fields["image"] = body.init_images[0]
        fields["strength"] = body.denoising_strength
        if body.mask:
            fields.update(mask=body.mask, **inpainting(body))
    return {k: v for k, v in fields.items() if v is not None}


# Native field names as A1111 clients sent them, for the locations of validation errors.
RENAMED = {
    "guidance_scale": "cfg_scale",
    "image": "init_images",
    "n": "batch_size",
    "padding_mask_crop": "inpaint_full_res_padding",
}
UNIT = ("alwayson_scripts", "ControlNet", "args")
UNIT_FIELDS = {"id": "model", "scale": "weight", "start": "guidance_start", "end": "guidance_end"}


def a1111_location(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Where a native request's error lies, as the A1111 request named it."""
    if loc and loc[0] == "controls":
        return (*UNIT, *(UNIT_FIELDS.get(str(part), part) for part in loc[1:]))
    return (*(RENAMED.get(str(part), part) for part in loc[:1]), *loc[1:])


CONTROLNET_SCRIPT = "controlnet"
MODEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]{1,64}\]$")
BALANCED = (0, "Balanced")


# sd-webui-controlnet's preprocessor (`module`) names onto this service's preprocessors.
MODULES = {"none": "none", "canny": "canny", "scribble_xdog": "scribble"}
DEPTH_MODULES = ("depth", "depth_midas", "depth_anything", "depth_anything_v2", "depth_zoe")


def controlnet_units(scripts: Any) -> list[dict[str, Any]]:
    """The ControlNet extension's enabled units (`alwayson_scripts.ControlNet.args`) as the
    native `controls`, up to 3: `model` one of the checkpoint's controls (A1111's "name [hash]"
    read as the name), `module` a preprocessor ("none", "canny" with `threshold_a`/`_b` as its
    thresholds, "scribble_xdog", the depth modules), `weight`, `guidance_start`/`_end`. Any
    other script with arguments, and what a unit asks that is not done here, is a 422."""
    if not scripts:
        return []
    if not isinstance(scripts, dict):
        raise InvalidRequest.for_field("alwayson_scripts", "must be an object of scripts")
    units: list[Any] = []
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else script
        if str(name).lower() == CONTROLNET_SCRIPT:
            units = [u for u in args or [] if not isinstance(u, dict) or u.get("enabled", True)]
        elif args:
            raise InvalidRequest.for_field(
                f"alwayson_scripts.{name}", "this script is not supported here"
            )
    field = "alwayson_scripts.ControlNet.args"
    if len(units) > MAX_CONTROLS:
        raise InvalidRequest.for_field(field, f"at most {MAX_CONTROLS} enabled ControlNet units")
    return [_unit(unit, f"{field}[{i}]") for i, unit in enumerate(units)]


def _unit(unit: Any, field: str) -> dict[str, Any]:
    if not isinstance(unit, dict):
        raise InvalidRequest.for_field(field, "must be an object (a ControlNet unit)")
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
        if image.get("mask"):
            raise InvalidRequest.for_field(f"{field}.image.mask", "unit masks are not supported")
        image = image.get("image")
    if not isinstance(image, str) or not image:
        raise InvalidRequest.for_field(f"{field}.image", "the control image, base64")
    if unit.get("mask"):
        raise InvalidRequest.for_field(f"{field}.mask", "unit masks are not supported")
    module = str(unit.get("module") or "none")
    preprocess = MODULES.get(module.lower()) or ("depth" if module in DEPTH_MODULES else None)
    if preprocess is None:
        raise InvalidRequest.for_field(
            f"{field}.module",
            f"preprocessor {module!r} is not run here; one of: "
            f"{', '.join([*MODULES, *DEPTH_MODULES])}",
        )
    if unit.get("control_mode", 0) not in BALANCED:
        raise InvalidRequest.for_field(f"{field}.control_mode", "only 'Balanced' is served")
    model = MODEL_HASH.sub("", str(unit.get("model") or ""))
    if not model or model.lower() == "none":
        raise InvalidRequest.for_field(f"{field}.model", "name one of the model's controls")
    control: dict[str, Any] = {
        "id": model,
        "image": image,
        "preprocess": preprocess,
        "scale": unit.get("weight", 1.0),
        "start": unit.get("guidance_start", 0.0),
        "end": unit.get("guidance_end", 1.0),
    }
    if preprocess == "canny":
        # The extension's canny thresholds (low, high); never silently replaced: webuiapi's
        # default 64/64 is not a low below a high, and says so.
        low, high = unit.get("threshold_a", 100), unit.get("threshold_b", 200)
        # JSON numbers only, finite and 0..255 (bool is an int to Python, Infinity parses).
        numbers = [v for v in (low, high) if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) < 2 or not all(0 <= v <= 255 for v in numbers) or not low < high:
            raise InvalidRequest.for_field(
                f"{field}.threshold_a",
                f"canny takes threshold_a (low) < threshold_b (high), 0..255; got {low}, {high}",
            )
        control["options"] = {"low_threshold": int(low), "high_threshold": int(high)}
    return control


# A1111's `inpainting_fill`: what the masked area starts from.
FILL_NAMES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def inpainting(body: A1111Request) -> dict[str, Any]:
    """A1111's inpainting options onto the native ones: `mask_blur` feathers the composite,
    `inpaint_full_res` ("only masked") is `padding_mask_crop`. `inpainting_fill` "original" is
    what this service does; the other three change only what the masked area starts from, which
    at `denoising_strength` 1 is pure noise whatever it was — there they map, elsewhere 422."""
    extra = body.model_extra or {}
    blur = extra.get("mask_blur", 0)
    for axis in ("mask_blur_x", "mask_blur_y"):
        if extra.get(axis) not in (None, blur):
            raise InvalidRequest.for_field(axis, "a blur other than `mask_blur` is not supported")
    fill = extra.get("inpainting_fill", 1)
    if fill not in FILL_NAMES:
        raise InvalidRequest.for_field("inpainting_fill", "one of 0, 1, 2, 3")
    if fill != 1 and body.denoising_strength not in (None, 1, 1.0):
        raise InvalidRequest.for_field(
            "inpainting_fill",
            f"{fill} ({FILL_NAMES[fill]}) is served only with denoising_strength 1, where the "
            "masked area starts from noise whatever it held; send inpainting_fill 1 "
            "(original) to inpaint at denoising_strength "
            f"{body.denoising_strength}",
        )
    only_masked = bool(extra.get("inpaint_full_res", False))
    return {
        "mask_blur": blur or None,
        "padding_mask_crop": extra.get("inpaint_full_res_padding", 0) if only_masked else None,
    }


def scheduler(body: A1111Request) -> str | None:
    name = body.sampler_name or body.sampler_index
    if not name:
        return None
    if name not in SAMPLERS:
        raise InvalidRequest.for_field(
            "sampler_name", f"unknown sampler {name!r}; one of: {', '.join(SAMPLERS)}"
        )
    ours = SAMPLERS[name]
    if (body.scheduler or "").lower() == "karras":
        if ours not in KARRAS:
            raise InvalidRequest.for_field("scheduler", f"'karras' does not apply to {name!r}")
        ours = KARRAS[ours]
    return ours


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """A1111's `<lora:name:weight>` tags out of the prompt, as `loras` (weight 1 when left out)."""
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        try:
            scale = float(weight) if weight else 1.0
        except ValueError:
            raise InvalidRequest.for_field(
                "prompt", f"<lora:{name}:{weight}>: not a weight"
            ) from None
        loras.append({"id": name, "scale": scale})
    return LORA_TAG.sub("", prompt).strip(), loras


def sampler_name(ours: str) -> str:
    """Our scheduler by its A1111 sampler name."""
    for name, value in SAMPLERS.items():
        if value == ours:
            return name
    return ours


def infotext(job: dict[str, Any], index: int) -> str:
    """A1111's text of one image's parameters (what "PNG Info" shows)."""
    request = job["request"]
    image = job["images"][index]
    return parameters_text(
        {**request, "seed": image["seed"], "width": image["width"], "height": image["height"]}
    )


def parameters_text(parameters: dict[str, Any]) -> str:
    """A1111's infotext of an image's parameters (the PNG's `parameters` chunk, as JSON)."""
    lines = [str(parameters.get("prompt", ""))]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    lines.append(
        f"Steps: {parameters.get('steps')}, "
        f"Sampler: {sampler_name(str(parameters.get('scheduler')))}, "
        f"CFG scale: {parameters.get('guidance_scale')}, Seed: {parameters.get('seed')}, "
        f"Size: {parameters.get('width')}x{parameters.get('height')}, "
        f"Model: {parameters.get('model')}"
    )
    return "\n".join(lines)


INFOTEXT_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
INFOTEXT_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, str]:
    """An infotext's fields as A1111's `png-info` answers them: `Prompt`, `Negative prompt`,
    then the last line's `Key: value` pairs (`Size` also as `Size-1`/`Size-2`), values as text."""
    *lines, last = text.strip().split("\n") or [""]
    if not INFOTEXT_PAIR.match(last) or len(INFOTEXT_PAIR.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in INFOTEXT_PAIR.findall(last):
        fields[key] = value.strip()
        size = INFOTEXT_SIZE.match(value.strip())
        if size is not None:
            fields[f"{key}-1"], fields[f"{key}-2"] = size[1], size[2]
    return fields


def info(job: dict[str, Any], body: dict[str, Any]) -> str:
    """A1111's `info`: a JSON string of the run, as its clients read it."""
    request = job["request"]
    seeds = [image["seed"] for image in job["images"]]
    return json.dumps(
        {
            "prompt": request["prompt"],
            "all_prompts": [request["prompt"]] * len(seeds),
            "negative_prompt": request.get("negative_prompt") or "",
            "seed": seeds[0] if seeds else request["seed"],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "width": request["width"],
            "height": request["height"],
            "sampler_name": sampler_name(request["scheduler"]),
            "cfg_scale": request["guidance_scale"],
            "steps": request["steps"],
            "batch_size": body.get("batch_size", 1),
            "sd_model_name": request["model"],
            "sd_model_hash": None,
            "infotexts": [infotext(job, i) for i in range(len(seeds))],
            "job_id": job["id"],
        }
    )
