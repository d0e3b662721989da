"""A mixed queue of 20 jobs (text-to-image, image-to-image, inpainting) on CPU, built-in model:
all queued at once (one worker, dynamic batching on: compatible jobs share a loop) against the
same 20 jobs run one by one (submit, wait, download, next), on the same service, alternating
over `--rounds` rounds. Prints seconds per image of each and their ratio (one by one ÷ queued:
≥ 1 means the mixed queue is at least as fast per image).

    python bench/edits_mixed_queue.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import base64
import io

import httpx
from _service import generate, median, now, service
from PIL import Image

STEPS = 10  # both arms alike; half the served default, so a loaded 2-core box finishes


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def jobs() -> list[dict[str, object]]:
    scene = Image.new("RGB", (64, 64), (245, 220, 40))
    scene.paste((30, 70, 220), (8, 8, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (36, 36, 60, 60))
    image, mask_b64 = _b64(scene), _b64(mask)
    out: list[dict[str, object]] = []
    for k in range(20):
        body: dict[str, object] = {
            "prompt": "a small red circle at the bottom right",
            "seed": k,
            "steps": STEPS,
        }
        if k % 3 == 1:
            body.update(image=image, strength=0.6)
        elif k % 3 == 2:
            body.update(image=image, mask=mask_b64)
        out.append(body)
    return out


def one_by_one(client: httpx.Client, bodies: list[dict[str, object]]) -> float:
    started = now()
    for body in bodies:
        generate(client, body)
    return (now() - started) / len(bodies)


def queued(client: httpx.Client, bodies: list[dict[str, object]]) -> float:
    """All submitted at once, then each followed on its event stream, in submit order (no
    polling: on two cores a poller would take CPU from the worker it measures)."""
    started = now()
    ids = [client.post("/v1/generations", json=body).json()["id"] for body in bodies]
    for job in ids:
        with client.stream("GET", f"/v1/generations/{job}/events") as stream:
            for _ in stream.iter_lines():
                pass
        doc = client.get(f"/v1/generations/{job}").json()
        if doc["status"] != "succeeded":
            raise RuntimeError(f"job {job} {doc['status']}: {doc.get('error')}")
        client.get(f"/v1/generations/{job}/images/0")
    return (now() - started) / len(bodies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    bodies = jobs()
    env = {"IMAGEGEN_BATCH_MAX_IMAGES": "16"}
    results: dict[str, list[float]] = {"one by one": [], "queued": []}
    with (
        service(worker_env=env) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=300) as client,
    ):
        generate(client, bodies[2])  # warm-up: the first inpainting job
        for round_ in range(args.rounds):
            order = ["one by one", "queued"] if round_ % 2 == 0 else ["queued", "one by one"]
            for name in order:
                per_image = (one_by_one if name == "one by one" else queued)(client, bodies)
                results[name].append(per_image)
                print(f"round {round_ + 1} {name:10s} {per_image * 1000:7.0f} ms/image", flush=True)
    a, b = median(results["one by one"]), median(results["queued"])
    print(
        f"\n20 mixed jobs (7 text, 7 img2img, 6 inpaint): one by one {a * 1000:.0f} ms/image, "
        f"queued {b * 1000:.0f} ms/image; ratio {a / b:.2f} (≥ 1: the queue is at least as fast)"
    )


if __name__ == "__main__":
    main()
