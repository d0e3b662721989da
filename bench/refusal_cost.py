"""What a refused request costs the gateway, by the size it asked for: a 64x64 image with
`width`/`height` 64 (refused for its steps) against the same image asking for 40000x40000,
8000-pixel outpaint margins and OpenAI's `size=12000x12000` (refused by the pixel cap).
Variants alternate, in one gateway process; the figures are its peak RSS growth (VmHWM) and
the median time of each kind, and their ratio to the small request's.

Before the fix (issue: "gateway memory before the pixel cap"), a 12000x12000 request took
3.8 s and +500 MB: the inputs were resized to the asked size before the cap was checked.

    python bench/refusal_cost.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.cli.redis_server import RedisServer
from imagegen.core.contract import Keys, ModelInfo
from tests.stack import start_gateway

MODEL = "bench-refusal"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    image = base64.b64encode(png).decode()
    base = {"prompt": "x", "model": MODEL, "image": image}
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "64x64 (steps refused)": ("json", {**base, "width": 64, "height": 64, "steps": 10**6}),
        "40000x40000": ("json", {**base, "width": 40000, "height": 40000}),
        "outpaint 8000": ("json", {**base, "outpaint": {"right": 8000, "bottom": 8000}}),
        "edits size 12000x12000": ("form", {"prompt": "x", "model": MODEL, "size": "12000x12000"}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = RedisServer(root / "redis", appendonly=False).start()
        connection = redis.Redis.from_url(server.url)
        info = ModelInfo(
            id=MODEL, width=64, height=64, steps=2, guidance_scale=1.0, scheduler="euler",
            schedulers=["euler"],
        )  # fmt: skip
        connection.set(Keys.model(MODEL), info.model_dump_json())
        connection.sadd(Keys.MODELS, MODEL)
        gateway = start_gateway(server.url, root)
        pid = gateway.proc.process.pid
        times: dict[str, list[float]] = {name: [] for name in variants}
        growth: dict[str, float] = dict.fromkeys(variants, 0.0)
        try:
            with httpx.Client(base_url=gateway.base_url, timeout=120) as client:
                for _ in range(args.rounds):
                    for name, (kind, body) in variants.items():  # alternating
                        before = _peak_rss_mb(pid)
                        start = time.perf_counter()
                        if kind == "json":
                            answer = client.post("/v1/generations", json=body)
                        else:
                            files = {"image": ("in.png", png, "image/png")}
                            answer = client.post("/v1/images/edits", data=body, files=files)
                        times[name].append(time.perf_counter() - start)
                        growth[name] += _peak_rss_mb(pid) - before
                        assert answer.status_code == 422, answer.text
        finally:
            gateway.proc.stop()
            server.stop()
    small = statistics.median(times["64x64 (steps refused)"])
    print(f"refused requests, {args.rounds} rounds alternating, one gateway process")
    print(f"{'request':<24} {'median ms':>10} {'x 64x64':>8} {'peak RSS growth MB':>19}")
    for name in variants:
        median = statistics.median(times[name])
        print(f"{name:<24} {median * 1000:>10.2f} {median / small:>8.2f} {growth[name]:>19.1f}")


if __name__ == "__main__":
    main()
