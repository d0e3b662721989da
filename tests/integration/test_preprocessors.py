"""Control preprocessors (worker/preprocessors.py) on fixed inputs, each against a reference
computed with the library directly: OpenCV's Canny, sd-webui-controlnet's XDoG scribble written
out with OpenCV, and transformers' own depth-estimation pipeline over a tiny random model built
here. Maps are cached in Redis by what they were made from."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from PIL import Image

from builtin_model.tiny import save_tiny_depth_model
from imagegen.core.blobs import RedisBlobStore
from imagegen.core.contract import ControlRef, InputRef, Keys
from tests.stack import batch_job
from worker.preprocessors import Preprocessors, cache_key, canny, scribble


def photo() -> Image.Image:
    """A fixed picture: a red disc, a blue bar and a dark pencil stroke on a noisy grey
    ground (XDoG finds lines darker than what surrounds them, as drawn lines are)."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(100, 140, (48, 64, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:48, :64]
    pixels[(yy - 20) ** 2 + (xx - 20) ** 2 < 150] = (220, 30, 30)
    pixels[30:40, 35:60] = (30, 40, 210)
    pixels[8:44, 50:52] = (20, 20, 20)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("low", "high"), [(100, 200), (20, 60)])
def test_canny_is_opencv_s_canny_on_the_colour_picture(low: int, high: int) -> None:
    got = np.asarray(canny(photo(), low, high))
    edges = cv2.Canny(np.asarray(photo()), low, high)
    assert np.array_equal(got, np.stack([edges] * 3, axis=-1))
    assert got.any() and set(np.unique(got)) <= {0, 255}


def test_scribble_is_the_xdog_of_sd_webui_controlnet() -> None:
    pixels = np.asarray(photo()).astype(np.float32)
    g1 = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    want = np.zeros_like(pixels, dtype=np.uint8)
    want[2 * (255 - dog.astype(np.int32)) > 32] = 255
    got = np.asarray(scribble(photo()))
    assert np.array_equal(got, want) and got.any()


def test_depth_is_transformers_depth_estimation_at_the_picture_s_size(tmp_path: Path) -> None:
    from transformers import pipeline

    directory = save_tiny_depth_model(tmp_path / "depth")
    got = Preprocessors(str(directory)).run("depth", photo(), {})
    reference = pipeline("depth-estimation", model=str(directory), device="cpu")(photo())
    want = reference["depth"].convert("RGB").resize(photo().size, Image.Resampling.BICUBIC)
    assert got.size == photo().size and np.array_equal(np.asarray(got), np.asarray(want))
    assert Preprocessors(str(directory)).names == ["canny", "scribble", "depth"]
    assert Preprocessors(None).names == ["canny", "scribble"]
    with pytest.raises(ValueError, match="depth"):
        Preprocessors(None).run("depth", photo(), {})


def test_a_map_is_computed_once_per_picture_preprocessor_and_options(
    redis_conn: redis.Redis,
) -> None:
    image = InputRef(sha256="ab" * 32, width=64, height=48)
    control = ControlRef(
        id="edges", scale=1.0, start=0.0, end=1.0, image=image, preprocess="canny",
        options={"low_threshold": 100, "high_threshold": 200},
    )  # fmt: skip
    spec = batch_job(width=64, height=48, controls=(control, control))
    calls: list[str] = []

    class Counting(Preprocessors):
        def run(self, name: str, picture: Image.Image, options: dict[str, int]) -> Image.Image:
            calls.append(name)
            return super().run(name, picture, options)

    stored = {"control": photo(), "control1": photo()}
    first = Counting().maps(RedisBlobStore(redis_conn), spec, stored, ttl_s=60)
    again = Counting().maps(RedisBlobStore(redis_conn), spec, stored, ttl_s=60)
    assert calls == ["canny"]  # the second control and the second job read the cached map
    assert all(np.array_equal(np.asarray(m), np.asarray(canny(photo()))) for m in first + again)
    ttl = redis_conn.ttl(Keys.control_map(cache_key(control, (64, 48))))
    assert 0 < int(ttl) <= 60  # type: ignore[arg-type]
    other = control.model_copy(update={"options": {"low_threshold": 20, "high_threshold": 60}})
    blobs = RedisBlobStore(redis_conn)
    Counting().maps(blobs, batch_job(width=64, height=48, controls=(other,)), stored, 60)
    assert calls == ["canny", "canny"]  # other options: another map
