"""What a blob is called in each store: its Redis key and its object-store path.

One function per kind of blob, so every process names a job's images and inputs alike, and the
sweeper can tell from a path alone whose blob it is (`jobs/<job id>/...`)."""

from __future__ import annotations

from dataclasses import dataclass

from imagegen.core.contract import Keys

JOBS = "jobs/"
CONTROL_MAPS = "control-maps/"
# Trained adapters: kept until their owner deletes them (never swept).
ADAPTERS = "adapters/"


@dataclass(frozen=True)
class Blob:
    """One stored blob: its key in Redis, its path under an object store's prefix, and the
    media type it is served with."""

    redis_key: str
    path: str
    media_type: str = "image/png"

    @property
    def filename(self) -> str:
        """A download's file name: the path's last part with the media type's extension."""
        return self.path.rsplit("/", 1)[-1] + "." + self.media_type.split("/")[-1]


def input_blob(job_id: str, name: str) -> Blob:
    """A job's input image as the gateway normalized it (`image`, `mask`, `control`...)."""
    return Blob(Keys.input(job_id, name), f"{JOBS}{job_id}/inputs/{name}")


def image_blob(job_id: str, index: int, output_format: str = "png") -> Blob:
    """A succeeded job's image `index`, in the job's output format (png, jpeg, webp)."""
    path = f"{JOBS}{job_id}/images/{index}"
    return Blob(Keys.image(job_id, index), path, f"image/{output_format}")


def checkpoint_blob(training_id: str) -> Blob:
    """A running training's last checkpoint (swept with the training, like a job's blobs)."""
    return Blob(Keys.checkpoint(training_id), f"{JOBS}{training_id}/checkpoint", _OCTETS)


def adapter_blob(adapter_id: str) -> Blob:
    """A trained adapter's `.safetensors` (kohya naming, trigger embedding bundled)."""
    return Blob(f"{Keys.adapter(adapter_id)}:weights", f"{ADAPTERS}{adapter_id}", _OCTETS)


_OCTETS = "application/octet-stream"


def control_map_blob(digest: str) -> Blob:
    """A preprocessed control map, by what it was made from (`worker.preprocessors`)."""
    return Blob(Keys.control_map(digest), f"{CONTROL_MAPS}{digest}")


def job_of(path: str) -> str | None:
    """The job a path belongs to (None: not a job's blob)."""
    if not path.startswith(JOBS):
        return None
    return path[len(JOBS) :].split("/", 1)[0] or None
