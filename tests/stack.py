"""Real processes for the tests: a worker (`python -m imagegen worker`) and a gateway (uvicorn)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from imagegen.contract import JobSpec, Keys, ModelInfo, WorkerHeartbeat
from imagegen.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def service_env(redis_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env.update(
        {
            "IMAGEGEN_REDIS_URL": redis_url,
            "IMAGEGEN_LOG_LEVEL": "INFO",
            "IMAGEGEN_HEARTBEAT_INTERVAL_S": "0.5",
            # Two cores, several processes: one torch thread each avoids thrashing.
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_process(args: list[str], env: Mapping[str, str], log_path: Path) -> Proc:
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        args, env=dict(env), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
    )
    return Proc(process, log_path)


def start_worker(
    redis_url: str, log_dir: Path, name: str, extra: Mapping[str, str] | None = None
) -> Proc:
    env = service_env(redis_url, {"IMAGEGEN_WORKER_NAME": name, **(extra or {})})
    return start_process(
        [sys.executable, "-m", "imagegen", "worker"], env, log_dir / f"worker-{name}.log"
    )


def wait_for_worker(
    connection: redis.Redis, proc: Proc, name: str, timeout_s: float = 120
) -> WorkerHeartbeat:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        raw = connection.get(Keys.worker(name))
        if raw:
            return WorkerHeartbeat.model_validate_json(raw)  # type: ignore[arg-type]
        if proc.process.poll() is not None:
            raise RuntimeError(f"worker {name} exited:\n{proc.log()[-4000:]}")
        time.sleep(0.2)
    raise TimeoutError(f"worker {name} never announced itself:\n{proc.log()[-4000:]}")


@dataclass
class Gateway:
    proc: Proc
    base_url: str
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, **kwargs)  # type: ignore[arg-type]


def start_gateway(
    redis_url: str, log_dir: Path, extra: Mapping[str, str] | None = None, name: str = "gateway"
) -> Gateway:
    port = free_port()
    # Every test gateway shares the per-address request budget in its Redis (that is the
    # point of counting it there), and the suite polls fast from 127.0.0.1: lift it unless a
    # test sets its own.
    defaults = {"IMAGEGEN_RATE_LIMIT_PER_MINUTE": "1000000"}
    env = service_env(
        redis_url,
        {**defaults, "IMAGEGEN_HOST": "127.0.0.1", "IMAGEGEN_PORT": str(port), **(extra or {})},
    )
    proc = start_process([sys.executable, "-m", "imagegen", "api"], env, log_dir / f"{name}.log")
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return Gateway(proc, base_url, env)
        except httpx.HTTPError:
            pass
        if proc.process.poll() is not None:
            raise RuntimeError(f"gateway exited:\n{proc.log()[-4000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"gateway did not come up:\n{proc.log()[-4000:]}")


def wait_for_job(
    client: httpx.Client, job_id: str, timeout_s: float = 120, until: tuple[str, ...] = ()
) -> dict[str, object]:
    """Poll a job until it is terminal (or in one of `until`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc: dict[str, object] = client.get(f"/v1/generations/{job_id}").json()
        status = doc["status"]
        if status in ("succeeded", "failed", "canceled") or status in until:
            return doc
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status}")
        time.sleep(0.05)


def parse_sse(lines: list[str]) -> list[tuple[str, dict[str, object]]]:
    """(event, data) pairs from text/event-stream lines; comments (pings) are skipped."""
    import json

    events: list[tuple[str, dict[str, object]]] = []
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return events


def read_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict[str, object]]]:
    """Read a job's event stream until the server closes it."""
    with client.stream("GET", f"/v1/generations/{job_id}/events") as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(list(response.iter_lines()))


class Supervisor:
    """Restarts a worker whenever it exits, like compose's `restart: unless-stopped`."""

    def __init__(self, start: Callable[[int], Proc]) -> None:
        import threading

        self._start = start
        self.generation = 0
        self.exit_codes: list[int] = []
        self.proc = start(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            code = self.proc.process.poll()
            if code is not None and not self._stop.is_set():
                self.exit_codes.append(code)
                self.proc = self._start(self.generation + 1)
                self.generation += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.proc.stop()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def announce_idle_model(connection: redis.Redis, model_id: str) -> None:
    """A model record as a worker would publish it, with no worker behind it: its jobs queue."""
    info = ModelInfo(
        id=model_id,
        width=64,
        height=64,
        steps=2,
        guidance_scale=1.0,
        scheduler="euler",
        schedulers=["euler"],
    )
    connection.set(Keys.model(model_id), info.model_dump_json(), ex=600)
    connection.sadd(Keys.MODELS, model_id)


# Recovery bounds shortened for tests that kill workers (defaults: 30 s TTL, 5 s sweeps).
FAST_RECOVERY = {
    "IMAGEGEN_WORKER_STALE_S": "4",
    "IMAGEGEN_HEARTBEAT_INTERVAL_S": "0.5",
    "IMAGEGEN_RECOVERY_INTERVAL_S": "0.5",
    "IMAGEGEN_HARD_TIMEOUT_GRACE_S": "2",
    "IMAGEGEN_FAULT_INJECTION": "true",
    "IMAGEGEN_DEFAULT_MODEL": "tiny",
    "IMAGEGEN_MAX_STEPS": "10000",
    "IMAGEGEN_RATE_LIMIT_PER_MINUTE": "1000000",
}


def batch_job(**changes: object) -> JobSpec:
    """The batch-loop tests' job: the tiny model, 64x64, 4 euler steps, guidance 7.5, a
    negative prompt (so both halves of guidance run), with `changes`."""
    fields: dict[str, object] = {
        "prompt": "a red cube",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 11,
        "n": 1,
        "scheduler": "euler",
        "model": "tiny",
    }
    return JobSpec(**fields).model_copy(update=changes)  # type: ignore[arg-type]


def job_spec(**changes: object) -> JobSpec:
    """A 64x64, 4-step euler job of the tiny model, with `changes`."""
    fields: dict[str, object] = {
        "prompt": "p",
        "negative_prompt": "",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 4.0,
        "seed": 1,
        "n": 1,
        "scheduler": "euler",
        "model": "tiny",
    }
    return JobSpec.model_validate({**fields, **changes})
