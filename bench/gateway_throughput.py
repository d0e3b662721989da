"""Gateway submits per second at 64 concurrent connections vs a minimal FastAPI app that does
one Redis write per request, same machine, same client, same run. Target (issue 7): >= 0.5.

The gateway's jobs go to a model no worker serves, so they only queue (rate limit, validation,
job record and queue entry in one script): the figure is the gateway's own cost.

    python bench/gateway_throughput.py [--seconds 10] [--connections 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import redis
from _service import now

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagegen.cli.redis_server import RedisServer, free_port
from imagegen.core.contract import Keys
from tests.stack import start_gateway

MINIMAL_APP = textwrap.dedent(
    """
    import os, uuid
    import redis.asyncio as aioredis
    from fastapi import FastAPI, Request

    app = FastAPI()
    r = aioredis.Redis.from_url(os.environ["REDIS_URL"])

    @app.post("/submit", status_code=202)
    async def submit(request: Request) -> dict:
        body = await request.body()
        job = uuid.uuid4().hex
        await r.set(f"minimal:{job}", body)
        return {"id": job}
    """
)


async def load(url: str, body: Mapping[str, object], connections: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for _ in range(20):  # warm-up
            await client.post(url, json=body)
        count = 0
        stop_at = now() + seconds

        async def worker() -> None:
            nonlocal count
            while now() < stop_at:
                response = await client.post(url, json=body)
                assert response.status_code in (200, 202), response.text
                count += 1

        started = now()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return count / (now() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternate the two servers this many times each"
    )
    args = parser.parse_args()
    body = {
        "prompt": "a small red circle at the top left on a white background",
        "model": "bench-idle",
    }
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", appendonly=False).start()
        connection = redis.Redis.from_url(server.url)
        info = {
            "id": "bench-idle",
            "width": 64,
            "height": 64,
            "steps": 20,
            "guidance_scale": 4.0,
            "scheduler": "euler",
            "schedulers": ["euler"],
        }
        connection.set(Keys.model("bench-idle"), json.dumps(info))
        connection.sadd(Keys.MODELS, "bench-idle")
        gateway = start_gateway(
            server.url,
            Path(tmp),
            {"IMAGEGEN_MAX_QUEUE_DEPTH": "10000000", "IMAGEGEN_LOG_LEVEL": "WARNING"},
        )
        app_file = Path(tmp) / "minimal_app.py"
        app_file.write_text(MINIMAL_APP)
        port = free_port()
        minimal = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "minimal_app:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=tmp,
            env={**os.environ, "REDIS_URL": server.url},
        )
        try:
            for _ in range(100):
                try:
                    httpx.get(f"http://127.0.0.1:{port}/docs", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # Alternating rounds: a neighbour's load on this shared box hits both sides alike.
            ours_rates, base_rates = [], []
            for _ in range(args.rounds):
                ours_rates.append(
                    asyncio.run(
                        load(
                            f"{gateway.base_url}/v1/generations",
                            body,
                            args.connections,
                            args.seconds,
                        )
                    )
                )
                base_rates.append(
                    asyncio.run(
                        load(
                            f"http://127.0.0.1:{port}/submit", body, args.connections, args.seconds
                        )
                    )
                )
        finally:
            minimal.terminate()
            gateway.proc.stop()
            server.stop()
    ours, base = statistics.median(ours_rates), statistics.median(base_rates)
    print(
        f"{args.connections} connections, {args.rounds} alternating rounds of "
        f"{args.seconds:.0f}s each, one uvicorn process each"
    )
    print(f"minimal FastAPI + one Redis SET: {base:8.1f} requests/s (median; {_rates(base_rates)})")
    print(f"imagegen POST /v1/generations:   {ours:8.1f} submits/s (median; {_rates(ours_rates)})")
    print(f"ratio imagegen/minimal:          {ours / base:.3f}  (target >= 0.5)")


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


if __name__ == "__main__":
    main()
