"""`imagegen serve`: the whole service on one machine — Redis, the gateway, the webhook
delivery process and one worker.

Each part runs as its own process, exactly as in a deployment; Ctrl-C (or SIGTERM) stops the
worker and the gateway gracefully, then Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imagegen.cli.redis_server import RedisServer
from imagegen.core.settings import Settings


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A new session keeps the terminal's Ctrl-C away from the children: we stop them in order.
    return subprocess.Popen(args, env=env, start_new_session=True)


def _stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def serve(settings: Settings, data_dir: Path, workers: int = 1) -> int:
    """Run Redis, the gateway, the webhook delivery process and `workers` workers until
    interrupted."""
    # With IMAGEGEN_REDIS_PASSWORD set (say, by a .env made for compose), the local Redis asks
    # for it too, so the gateway and workers that send it are let in.
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    redis_server = RedisServer(data_dir / "redis", appendonly=True, password=password).start()
    env = {**os.environ, "IMAGEGEN_REDIS_URL": redis_server.url}
    print(f"imagegen: redis on {redis_server.url} (data in {data_dir / 'redis'})", flush=True)
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def _request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    try:
        worker_env = {**env}
        if workers > 1:
            # Several CPU workers on one machine must not fight over the same cores.
            worker_env.setdefault("OMP_NUM_THREADS", "1")
        for _ in range(workers):
            processes.append(_spawn([sys.executable, "-m", "imagegen", "worker"], worker_env))
        processes.append(_spawn([sys.executable, "-m", "imagegen", "webhooks"], env))
        processes.append(_spawn([sys.executable, "-m", "imagegen", "api"], env))
        base = f"http://{settings.host}:{settings.port}"
        announced = False
        while not stopping:
            if any(p.poll() is not None for p in processes):
                print("imagegen: a child process exited; stopping", file=sys.stderr, flush=True)
                return 1
            if not announced and _ready(base):
                print(f"imagegen: ready at {base} (Ctrl-C stops everything)", flush=True)
                announced = True
            time.sleep(0.5)
        print("imagegen: stopping", flush=True)
        return 0
    finally:
        for process in reversed(processes):  # gateway first, then workers finish their job
            _stop(process, timeout_s=60)
        redis_server.stop()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
