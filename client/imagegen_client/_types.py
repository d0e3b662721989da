"""Typed, read-only views of the API's documents: jobs, their images and events, models.

Parsing is tolerant on purpose: fields a newer server adds are ignored (and kept in `raw`), so an
old client keeps working against a new server.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from os import PathLike

    from PIL.Image import Image as PILImage

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
EventName = Literal["queued", "running", "progress", "preview", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Progress:
    """Denoising progress of a job; `eta_s` once the server knows a step rate."""

    step: int
    total_steps: int
    eta_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Progress:
        return cls(
            step=int(data.get("step", 0)),
            total_steps=int(data.get("total_steps", 0)),
            eta_s=_optional_float(data.get("eta_s")),
        )


@dataclass(frozen=True)
class ImageRef:
    """One image of a succeeded job, not yet downloaded."""

    index: int
    seed: int
    width: int
    height: int
    url: str
    filtered: bool = False
    """The model's safety checker withheld it: there is nothing to download."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageRef:
        return cls(
            index=int(data["index"]),
            seed=int(data["seed"]),
            width=int(data["width"]),
            height=int(data["height"]),
            url=str(data["url"]),
            filtered=bool(data.get("filtered", False)),
        )


@dataclass(frozen=True)
class ErrorInfo:
    """Why a job failed: `code` such as `out_of_memory`, `worker_lost`, `timeout`."""

    code: str
    message: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorInfo:
        return cls(code=str(data.get("code", "internal")), message=str(data.get("message", "")))


@dataclass(frozen=True)
class Timings:
    """Seconds spent queued and running."""

    queued_s: float | None = None
    run_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timings:
        return cls(
            queued_s=_optional_float(data.get("queued_s")),
            run_s=_optional_float(data.get("run_s")),
        )


@dataclass(frozen=True)
class GenerationParams:
    """Every parameter as the job uses it, the server's defaults filled in."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int
    scheduler: str
    model: str
    # Images in: "text" | "img2img" | "inpaint" | "outpaint"; inputs as {sha256, width, height}.
    task: str = "text"
    image: Mapping[str, Any] | None = None
    mask: Mapping[str, Any] | None = None
    strength: float | None = None
    outpaint: Mapping[str, int] | None = None
    # The images' file format ("png" | "jpeg" | "webp") and JPEG/WebP quality.
    output_format: str = "png"
    output_compression: int = 100

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationParams:
        return cls(
            prompt=str(data["prompt"]),
            negative_prompt=str(data.get("negative_prompt", "")),
            width=int(data["width"]),
            height=int(data["height"]),
            steps=int(data["steps"]),
            guidance_scale=float(data["guidance_scale"]),
            seed=int(data["seed"]),
            n=int(data.get("n", 1)),
            scheduler=str(data.get("scheduler", "")),
            model=str(data.get("model", "")),
            task=str(data.get("task") or "text"),
            image=data.get("image"),
            mask=data.get("mask"),
            strength=_optional_float(data.get("strength")),
            outpaint=data.get("outpaint"),
            output_format=str(data.get("output_format") or "png"),
            output_compression=int(data.get("output_compression", 100)),
        )


@dataclass(frozen=True)
class Job:
    """The job document of `GET /v1/generations/{id}`."""

    id: str
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    queue_position: int | None
    progress: Progress
    request: GenerationParams
    images: list[ImageRef]
    error: ErrorInfo | None
    timings: Timings
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    """The document exactly as the server sent it, fields unknown to this client included."""

    @property
    def is_terminal(self) -> bool:
        """True once the job succeeded, failed or was canceled."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        error = data.get("error")
        queue_position = data.get("queue_position")
        return cls(
            id=str(data["id"]),
            status=data["status"],
            created_at=str(data.get("created_at", "")),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            queue_position=None if queue_position is None else int(queue_position),
            progress=Progress.from_dict(data.get("progress") or {}),
            request=GenerationParams.from_dict(data["request"]),
            images=[ImageRef.from_dict(image) for image in data.get("images") or []],
            error=ErrorInfo.from_dict(error) if error else None,
            timings=Timings.from_dict(data.get("timings") or {}),
            raw=data,
        )


@dataclass(frozen=True)
class Preview:
    """A live preview (`stream(job, previews=True)`): a small JPEG of the job's current
    estimate of its final image, at denoising `step`."""

    step: int
    image: str
    """A `data:image/jpeg;base64,...` URI."""

    @property
    def jpeg(self) -> bytes:
        """The JPEG bytes."""
        import base64

        return base64.b64decode(self.image.split(",", 1)[1])

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the JPEG to `path`; returns the path."""
        target = Path(path)
        target.write_bytes(self.jpeg)
        return target


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of a job: its name and the job document at that moment (for a
    `preview` event, the last document the stream carried, and the picture in `preview`)."""

    name: EventName
    job: Job
    preview: Preview | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """A downloaded image: its file (PNG with a `parameters` text chunk by default; JPEG or
    WebP with the parameters in EXIF when the job asked) and how it was made."""

    index: int
    seed: int
    width: int
    height: int
    data: bytes = field(repr=False)

    @functools.cached_property
    def pil(self) -> PILImage:
        """The image decoded by Pillow (`pip install 'imagegen-client[pil]'`)."""
        try:
            from PIL import Image
        except ImportError as exc:
            raise ImportError(
                "GeneratedImage.pil needs Pillow: pip install 'imagegen-client[pil]'"
            ) from exc
        import io

        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | PathLike[str]) -> Path:
        """Write the PNG bytes, unchanged, to `path`; returns the path."""
        target = Path(path)
        target.write_bytes(self.data)
        return target


@dataclass(frozen=True)
class Generation:
    """What `generate()` returns: the finished job and its images, downloaded (an image the
    model's safety checker withheld is in `job.images` with `filtered`, not here)."""

    job: Job
    images: list[GeneratedImage]


@dataclass(frozen=True)
class Model:
    """One entry of `GET /v1/models`: a model id, its defaults and its live workers."""

    id: str
    default: bool
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    schedulers: list[str]
    workers: int
    # The longest prompt in the model's own tokens (None from an older server), and whether
    # `(word:1.3)` weighting is read.
    max_prompt_tokens: int | None = None
    prompt_weighting: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Model:
        return cls(
            id=str(data["id"]),
            default=bool(data.get("default", False)),
            width=int(data["width"]),
            height=int(data["height"]),
            steps=int(data["steps"]),
            guidance_scale=float(data["guidance_scale"]),
            scheduler=str(data.get("scheduler", "")),
            schedulers=[str(name) for name in data.get("schedulers") or []],
            workers=int(data.get("workers", 0)),
            max_prompt_tokens=(
                int(data["max_prompt_tokens"])
                if data.get("max_prompt_tokens") is not None
                else None
            ),
            prompt_weighting=bool(data.get("prompt_weighting", False)),
        )


@dataclass(frozen=True)
class Usage:
    """`GET /v1/usage`: the API key's use of its limits on one UTC day; None = unlimited."""

    day: str
    megapixel_steps: float
    quota: float | None
    active_jobs: int
    max_active_jobs: int | None
    jobs: Mapping[str, int]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        limit = data.get("max_active_jobs")
        return cls(
            day=str(data["day"]),
            megapixel_steps=float(data.get("megapixel_steps") or 0),
            quota=_optional_float(data.get("quota")),
            active_jobs=int(data.get("active_jobs") or 0),
            max_active_jobs=None if limit is None else int(limit),
            jobs={str(k): int(v) for k, v in (data.get("jobs") or {}).items()},
        )
