"""The `pose` preprocessor: a transformers keypoint model (ViTPose, COCO's 17 body keypoints)
finds the body, and the skeleton is drawn in the OpenPose convention the pose ControlNets were
trained on (`lllyasviel/control_v11p_sd15_openpose`, the SDXL OpenPose ControlNets): OpenPose's
18 body points, a neck between the shoulders, each limb a filled ellipse in its colour at 60 %
on black, each joint a disc in full colour, as controlnet_aux's `draw_bodypose` draws them.

ViTPose is top-down: it reads the body inside a box. With no person detector configured, the
whole picture is the one box (one person per photo)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# OpenPose body point k is COCO keypoint OPENPOSE_FROM_COCO[k]; the neck (1) has no COCO point:
# it is the middle of the shoulders when both are seen.
NECK = 1
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# Limbs as pairs of OpenPose points (0-based), in OpenPose's order; limb i takes COLORS[i].
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# A keypoint the model is less sure of than this is not drawn (OpenPose leaves it out too).
MIN_SCORE = 0.3
# controlnet_aux draws a 4-pixel limb half-width and 4-pixel joints on a 512-pixel picture;
# a map of another size gets them scaled by its shorter side.
STICK_PER_512 = 4


@dataclass(frozen=True)
class Body:
    """One person's COCO keypoints in pixels, (17, 2), with the model's score for each."""

    keypoints: np.ndarray
    scores: np.ndarray


def openpose_points(body: Body, min_score: float = MIN_SCORE) -> list[tuple[float, float] | None]:
    """The 18 OpenPose body points of a COCO body, None where the point was not seen."""
    points: list[tuple[float, float] | None] = []
    for coco in OPENPOSE_FROM_COCO:
        if coco is None:
            points.append(None)  # the neck, below
        elif body.scores[coco] >= min_score:
            x, y = body.keypoints[coco]
            points.append((float(x), float(y)))
        else:
            points.append(None)
    right, left = points[2], points[5]
    if right is not None and left is not None:
        points[NECK] = ((right[0] + left[0]) / 2, (right[1] + left[1]) / 2)
    return points


def draw_bodies(size: tuple[int, int], bodies: list[Body]) -> Image.Image:
    """The OpenPose picture of `bodies` on a black map of `size` (width, height)."""
    import cv2

    width, height = size
    stick = max(1, round(STICK_PER_512 * min(width, height) / 512))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    skeletons = [openpose_points(body) for body in bodies]
    for i, (a, b) in enumerate(LIMBS):
        for points in skeletons:
            start, end = points[a], points[b]
            if start is None or end is None:
                continue
            length = math.hypot(start[0] - end[0], start[1] - end[1])
            angle = math.degrees(math.atan2(start[1] - end[1], start[0] - end[0]))
            middle = (int((start[0] + end[0]) / 2), int((start[1] + end[1]) / 2))
            outline = cv2.ellipse2Poly(middle, (int(length / 2), stick), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, np.asarray(outline, dtype=np.int32), COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for k in range(len(OPENPOSE_FROM_COCO)):
        for points in skeletons:
            point = points[k]
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), stick, COLORS[k], thickness=-1)
    return Image.fromarray(canvas)


class PoseModel:
    """A transformers ViTPose checkpoint (a local directory or a hub id in the cache) and its
    image processor: the COCO bodies in a picture."""

    def __init__(self, name: str) -> None:
        from transformers import AutoProcessor, VitPoseForPoseEstimation

        self.processor: Any = AutoProcessor.from_pretrained(name)
        self.model = VitPoseForPoseEstimation.from_pretrained(name).eval()
        # ViTPose+ checkpoints mix experts per dataset: index 0 is COCO's body.
        self.experts = int(getattr(self.model.config.backbone_config, "num_experts", 1))

    def bodies(self, image: Image.Image) -> list[Body]:
        import torch

        boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]  # COCO x, y, w, h
        inputs = self.processor(image.convert("RGB"), boxes=boxes, return_tensors="pt")
        if self.experts > 1:
            inputs["dataset_index"] = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        people = self.processor.post_process_pose_estimation(outputs, boxes=boxes)[0]
        return [Body(p["keypoints"].numpy(), p["scores"].numpy()) for p in people]
