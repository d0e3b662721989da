"""What a generation waits on a worker that also trains (IMAGEGEN_WORKER_TASKS=generate,train).

One worker of the built-in model, trainings enabled. The same generation (the model's default
image) is timed from the HTTP submit to the downloaded PNG, alternately with the worker idle and
with a long training running on it. The ratio (busy / idle medians) is what a training costs a
queued generation. It is at most one training slice (worker.training.runner.SLICE_S, a few
steps) plus the longer steps of a CPU shared by both.

    python bench/training_yield.py [--runs 10]
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile

import httpx
import numpy as np
from _service import generate, median, now, service
from PIL import Image

PROMPT = "a small red circle at the top left on a white background"
BODY = {"prompt": PROMPT, "seed": 1}


def pictures() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(8):
            pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
            pixels[8 + 4 * i : 40, 8 + 3 * i : 40] = (200, 30, 30)
            image = io.BytesIO()
            Image.fromarray(pixels).save(image, format="PNG")
            archive.writestr(f"{i}.png", image.getvalue())
            archive.writestr(f"{i}.txt", "a large red zxq in the center on a white background")
    return buffer.getvalue()


def start_training(client: httpx.Client) -> str:
    files = {"images": ("p.zip", pictures(), "application/zip")}
    data = {"trigger_word": "zxq", "steps": "5000"}
    response = client.post("/v1/trainings", data=data, files=files)
    response.raise_for_status()
    training: str = response.json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/trainings/{training}").json()["progress"]["step"] < 5:
        if time.monotonic() > deadline:
            raise TimeoutError("the training never started")
        time.sleep(0.1)
    return training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    env = {"IMAGEGEN_WORKER_TASKS": "generate,train"}
    idle: list[float] = []
    busy: list[float] = []
    with service(worker_env=env) as gateway, gateway.client() as client:
        generate(client, BODY)  # warm
        for _ in range(args.runs):
            started = now()
            generate(client, BODY)
            idle.append(now() - started)
            training = start_training(client)
            started = now()
            generate(client, BODY)
            busy.append(now() - started)
            steps = client.get(f"/v1/trainings/{training}").json()["progress"]["step"]
            client.delete(f"/v1/trainings/{training}")
            deadline = time.monotonic() + 30
            while client.get(f"/v1/trainings/{training}").json()["status"] != "canceled":
                if time.monotonic() > deadline:
                    raise TimeoutError("the training was never canceled")
                time.sleep(0.05)
        print(f"training steps when the generation ended (last run): {steps}")
    idle_s, busy_s = median(idle), median(busy)
    print(f"generation alone:            median {idle_s * 1000:.0f} ms over {len(idle)} runs")
    print(f"generation during training:  median {busy_s * 1000:.0f} ms over {len(busy)} runs")
    print(f"ratio (during / alone):      {busy_s / idle_s:.2f}")


if __name__ == "__main__":
    main()
