"""Control preprocessors: a user's picture into the control map a ControlNet reads, in the
worker (never in the gateway). `canny` and `scribble` are OpenCV operators (no weights);
`depth` is a transformers `depth-estimation` model the operator names
(`IMAGEGEN_DEPTH_MODEL`). A map is cached in Redis by (input digest, size, preprocessor,
options), so a batch of jobs on one photo computes it once."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from typing import Any

import numpy as np
from PIL import Image

from imagegen.core.blobs import BlobStore, control_map_blob
from imagegen.core.contract import ControlRef, JobSpec, control_blob

log = logging.getLogger("imagegen.worker")

# The operators that need no model: always available where the worker runs.
BUILT_IN = ("canny", "scribble")
# sd-webui-controlnet's `scribble_xdog` threshold: a difference of Gaussians past it is a line.
XDOG_THRESHOLD = 32


def canny(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """OpenCV's Canny edges of the RGB picture (white lines on black), as sd-webui-controlnet
    and controlnet_aux call it: on the colour image, its gradient the channels' largest."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low_threshold, high_threshold)
    return Image.fromarray(edges).convert("RGB")


def scribble(image: Image.Image) -> Image.Image:
    """Hand-drawn-looking lines with no model: sd-webui-controlnet's `scribble_xdog`, the
    difference of two Gaussian blurs (sigma 0.5 and 5) thresholded, white on black."""
    import cv2

    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    lines = np.zeros(pixels.shape, dtype=np.uint8)
    lines[2 * (255 - dog.astype(np.int32)) > XDOG_THRESHOLD] = 255
    return Image.fromarray(lines)


def preprocessor_names(depth_model: str | None) -> list[str]:
    """The preprocessors a worker runs, as `GET /v1/models` lists them (besides "none")."""
    return [*BUILT_IN, *(["depth"] if depth_model else [])]


class Preprocessors:
    """The preprocessors this worker runs, and the map of a job's control."""

    def __init__(self, depth_model: str | None = None) -> None:
        self.depth_model = depth_model
        self._depth: Any = None
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return preprocessor_names(self.depth_model)

    def run(self, name: str, image: Image.Image, options: dict[str, int]) -> Image.Image:
        """The control map of `image`, at its size."""
        if name == "canny":
            return canny(image, **options)
        if name == "scribble":
            return scribble(image)
        if name == "depth" and self.depth_model:
            return self.depth(image)
        raise ValueError(f"preprocessor {name!r} is not available on this worker")

    def depth(self, image: Image.Image) -> Image.Image:
        """transformers' depth-estimation pipeline's `depth` image (near = bright), as RGB."""
        with self._lock:  # loaded once, on first use
            if self._depth is None:
                from transformers import pipeline

                self._depth = pipeline("depth-estimation", model=self.depth_model, device="cpu")
        depth: Image.Image = self._depth(image.convert("RGB"))["depth"]
        return depth.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)

    def maps(
        self, blobs: BlobStore, spec: JobSpec, images: dict[str, Image.Image], ttl_s: int
    ) -> tuple[Image.Image, ...]:
        """The job's control maps in order: its stored control images, each preprocessed (a
        cached map when one exists)."""
        return tuple(
            self._map(blobs, control, images[control_blob(k)], ttl_s)
            for k, control in enumerate(spec.controls)
        )

    def _map(
        self, blobs: BlobStore, control: ControlRef, image: Image.Image, ttl_s: int
    ) -> Image.Image:
        if control.preprocess == "none":
            return image
        stored = control_map_blob(cache_key(control, image.size))
        cached = blobs.get(stored)
        if cached is not None:
            with Image.open(io.BytesIO(cached), formats=["PNG"]) as opened:
                return opened.convert("RGB")
        made = self.run(control.preprocess, image, control.options)
        buffer = io.BytesIO()
        made.save(buffer, format="PNG")
        blobs.put(stored, buffer.getvalue(), ttl_s)
        return made


def cache_key(control: ControlRef, size: tuple[int, int]) -> str:
    """What a control map depends on: the picture sent, the size it was resized to, the
    preprocessor and its options."""
    what = json.dumps(
        [control.image.sha256, size, control.preprocess, sorted(control.options.items())]
    )
    return hashlib.sha256(what.encode()).hexdigest()
