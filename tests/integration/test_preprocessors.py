"""Control preprocessors (worker/preprocessors.py) on fixed inputs, each against a reference
computed with the library directly: OpenCV's Canny, sd-webui-controlnet's XDoG scribble written
out with OpenCV, transformers' own depth-estimation pipeline and ViTPose model over tiny random
models built here, and OpenPose's drawing convention on a body whose points are known. Maps are
cached by what they were made from."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from PIL import Image

from builtin_model.tiny import save_tiny_depth_model, save_tiny_pose_model
from imagegen.core.blobs import RedisBlobStore
from imagegen.core.contract import ControlRef, InputRef, Keys
from tests.stack import batch_job
from worker.pose import COLORS, Body, draw_bodies
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


def test_pose_is_vitpose_s_bodies_drawn_as_openpose_at_the_picture_s_size(
    tmp_path: Path,
) -> None:
    import torch
    from transformers import AutoProcessor, VitPoseForPoseEstimation

    directory = save_tiny_pose_model(tmp_path / "pose")
    preprocessors = Preprocessors(pose_model=str(directory))
    assert preprocessors.load() == {} and preprocessors.names == ["canny", "scribble", "pose"]
    got = preprocessors.run("pose", photo(), {})
    # The reference: the checkpoint read with transformers directly, the whole picture one box.
    processor = AutoProcessor.from_pretrained(directory)
    model = VitPoseForPoseEstimation.from_pretrained(directory)
    boxes = [[[0.0, 0.0, 64.0, 48.0]]]
    with torch.no_grad():
        outputs = model(**processor(photo(), boxes=boxes, return_tensors="pt"))
    person = processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
    want = draw_bodies((64, 48), [Body(person["keypoints"].numpy(), person["scores"].numpy())])
    assert got.size == (64, 48) and np.array_equal(np.asarray(got), np.asarray(want))
    assert np.asarray(got).any()


def test_openpose_drawing_limbs_at_60_percent_joints_in_full_colour_unseen_points_left_out() -> (
    None
):
    # COCO order: nose, eyes, ears, shoulders (left, right), elbows, wrists, hips, knees, ankles.
    points = np.zeros((17, 2))
    scores = np.zeros(17)
    points[5], points[6] = (300, 150), (200, 150)  # left and right shoulders
    points[8], points[10] = (200, 250), (200, 350)  # right elbow, right wrist
    scores[[5, 6, 8, 10]] = 0.9
    points[7], scores[7] = (350, 250), 0.1  # the left elbow, not seen: no limb to it
    canvas = np.asarray(draw_bodies((512, 512), [Body(points, scores)]))

    def dim(k: int) -> tuple[int, ...]:
        return tuple(int(c * 0.6) for c in COLORS[k])

    # The neck (OpenPose point 1) sits between the shoulders: a joint in point 1's colour.
    assert tuple(canvas[150, 250]) == COLORS[1]
    # Limb 0 (neck to right shoulder) and limb 3 (right elbow to wrist), dimmed to 60 %.
    assert tuple(canvas[150, 225]) == dim(0)
    assert tuple(canvas[300, 200]) == dim(3)
    # Joints: the right shoulder (OpenPose 2), the right wrist (4), in full colour.
    assert tuple(canvas[150, 200]) == COLORS[2] and tuple(canvas[350, 200]) == COLORS[4]
    # Nothing toward the unseen left elbow, and black where no body is.
    assert not canvas[200:240, 330:345].any() and not canvas[450:, :].any()


def test_a_preprocessor_model_that_does_not_load_is_left_out_with_the_reason(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    preprocessors = Preprocessors(depth_model=str(broken), pose_model=str(tmp_path / "absent"))
    reasons = preprocessors.load()
    assert set(reasons) == {"depth", "pose"}
    assert str(broken) in reasons["depth"] and "absent" in reasons["pose"]
    assert preprocessors.names == ["canny", "scribble"]
    with pytest.raises(ValueError, match="pose"):
        preprocessors.run("pose", photo(), {})


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
