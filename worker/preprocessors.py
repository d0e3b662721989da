"""Control preprocessors: a user's picture into the control map a ControlNet reads, in the
worker (never in the gateway). `canny` and `scribble` are OpenCV operators (no weights);
`depth` is a transformers `depth-estimation` model the operator names
(`IMAGEGEN_DEPTH_MODEL`), `pose` a ViTPose keypoint model (`IMAGEGEN_POSE_MODEL`, drawn in
the OpenPose convention: worker/pose.py). A map is kept in the blob store by (input digest,
size, preprocessor, options), so a batch of jobs on one photo computes it once."""

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
from worker.pose import PoseModel, draw_bodies

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


def preprocessor_names(depth_model: str | None, pose_model: str | None = None) -> list[str]:
    """The preprocessors a worker runs, as `GET /v1/models` lists them (besides "none")."""
    return [*BUILT_IN, *(["depth"] if depth_model else []), *(["pose"] if pose_model else [])]


class Preprocessors:
    """The preprocessors this worker runs, and the map of a job's control."""

    def __init__(self, depth_model: str | None = None, pose_model: str | None = None) -> None:
        # The model each preprocessor that needs one reads (None: not served).
        self.sources: dict[str, str | None] = {"depth": depth_model, "pose": pose_model}
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return preprocessor_names(self.sources["depth"], self.sources["pose"])

    def load(self) -> dict[str, str]:
        """Load every configured model now (a worker does at start). One that fails is no
        longer served; returns why, by preprocessor."""
        broken: dict[str, str] = {}
        for name, source in self.sources.items():
            if source is None:
                continue
            try:
                self._model(name)
            except Exception as exc:  # a missing, partial or wrong checkpoint: one line
                broken[name] = f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                self.sources[name] = None
        return broken

    def run(self, name: str, image: Image.Image, options: dict[str, int]) -> Image.Image:
        """The control map of `image`, at its size."""
        if name == "canny":
            return canny(image, **options)
        if name == "scribble":
            return scribble(image)
        if name == "depth" and self.sources["depth"]:
            return self.depth(image)
        if name == "pose" and self.sources["pose"]:
            return draw_bodies(image.size, self._model("pose").bodies(image))
        raise ValueError(f"preprocessor {name!r} is not available on this worker")

    def depth(self, image: Image.Image) -> Image.Image:
        """transformers' depth-estimation pipeline's `depth` image (near = bright), as RGB."""
        depth: Image.Image = self._model("depth")(image.convert("RGB"))["depth"]
        return depth.convert("RGB").resize(image.size, Image.Resampling.BICUBIC)

    def _model(self, name: str) -> Any:
        with self._lock:  # loaded once: at start, or on first use
            if name not in self._loaded:
                source = self.sources[name]
                if name == "depth":
                    from transformers import pipeline

                    self._loaded[name] = pipeline("depth-estimation", model=source, device="cpu")
                else:
                    self._loaded[name] = PoseModel(str(source))
            return self._loaded[name]

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
