"""Real processes for the tests: a worker (`python -m imagegen worker`, or the same entry point
forked from a server that has imported it once) and a gateway (uvicorn)."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import redis

from imagegen.cli.redis_server import free_port
from imagegen.core.blobs import Blob
from imagegen.core.contract import JobSpec, Keys, ModelInfo, WorkerHeartbeat

if TYPE_CHECKING:
    from imagegen.core.blobs.s3_store import S3BlobStore

ROOT = Path(__file__).resolve().parent.parent


# Dummy AWS credentials in every process the tests start (and in the fork server's environment,
# which must match the workers'), so that no test can reach a real account.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(_name, None)

# `TESTS_STORAGE=s3` runs the suites with every process's blobs in S3-compatible storage: a
# moto server on 127.0.0.1 that the test run starts (`make test-s3`); unset, blobs in Redis.
STORAGE = os.environ.get("TESTS_STORAGE", "redis")
S3_BUCKET = "imagegen-tests"


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
    if STORAGE == "s3":
        env.update(s3_env())
    env.update(extra or {})
    return env


@dataclass
class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket, for the whole test session."""

    endpoint_url: str
    bucket: str
    stop: Callable[[], None]

    def env(self, prefix: str = "run") -> dict[str, str]:
        """Settings of a process storing its blobs under `prefix` of the bucket."""
        return {
            "IMAGEGEN_STORAGE_URL": f"s3://{self.bucket}/{prefix}",
            "IMAGEGEN_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url)


_s3: list[S3Server] = []


def s3_server() -> S3Server:
    """The session's S3 server, started on first use (stopped when the run exits)."""
    if not _s3:
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        _s3.append(S3Server(endpoint, S3_BUCKET, server.stop))
        atexit.register(server.stop)
    return _s3[0]


def s3_env() -> dict[str, str]:
    return s3_server().env()


def stored(connection: redis.Redis, blob: Blob) -> bytes | None:
    """A blob as this run's store holds it: Redis, or (TESTS_STORAGE=s3) the S3 server under
    the prefix `service_env` gives every process."""
    if STORAGE == "s3":
        return run_store().get(blob)
    value: bytes | None = connection.get(blob.redis_key)  # type: ignore[assignment]
    return value


def run_store() -> S3BlobStore:
    """The S3 store every process of a TESTS_STORAGE=s3 run uses."""
    from imagegen.core.blobs.s3_store import S3BlobStore

    env = s3_env()
    return S3BlobStore(env["IMAGEGEN_STORAGE_URL"], endpoint_url=env["IMAGEGEN_S3_ENDPOINT_URL"])


class ProcessHandle(Protocol):
    """What tests use of a started process: `subprocess.Popen` has it, and `ForkedProcess`."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


@dataclass
class Proc:
    process: ProcessHandle
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
        return self.process.wait()


def start_process(args: list[str], env: Mapping[str, str], log_path: Path) -> Proc:
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        args, env=dict(env), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
    )
    return Proc(process, log_path)


# Forked workers. A worker start is mostly imports (torch, diffusers and with it torch._dynamo,
# transformers, peft: ~5 s of CPU each, and the suite starts dozens of workers). A forked worker
# is a child of a fork server (multiprocessing's `forkserver` start method) that imported these
# modules once. It is faithful to `python -m imagegen worker`: the same entry point (imagegen.cli's
# main, argv `worker`) runs the same code in its own process with its own pid, under exactly
# service_env's environment (set before any setting is read), from the repository root, into
# the same log file; it installs its own signal handlers, exits with its own status, and a signal
# that kills it reads as minus its number, as with Popen. Only the interpreter's start and the
# imports are shared (and multiprocessing imports the test runner's main script in the child,
# unused). What the imports read from the environment (OMP_NUM_THREADS: the size of torch's
# thread pool; PYTHONUNBUFFERED) they read once, in the server, which therefore starts under a
# worker's environment, and a forked worker may not change that environment, only add settings.
# The server imports and runs nothing else: no thread, Python's or torch's intra-op pool, is in
# it to be lost by a fork (tests/e2e/test_forked_workers.py checks). Tests about the process start
# itself (signals while starting, the session's built-in-model worker) keep the real command.
WORKER_MODULES = ["imagegen.cli.main", "worker.main", "tests.stack"]
# TESTS_FORK_WORKERS=0: every worker by the real command (to compare, or to rule forking out).
FORK_WORKERS = os.environ.get("TESTS_FORK_WORKERS", "1") != "0"
# One reader at a time of a forked child's exit status: the fork server sends it once, down a
# pipe that `poll()` reads, and multiprocessing polls its other children whenever it starts one.
_FORK_LOCK = threading.Lock()
_forked: list[ForkedProcess] = []
_server_env: dict[str, str] | None = None


def _shared_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of a worker's environment that imports may read: all but its settings
    (IMAGEGEN_*, read when it starts) and pytest's marker of the current test."""
    return {
        k: v for k, v in env.items() if not k.startswith("IMAGEGEN_") and k != "PYTEST_CURRENT_TEST"
    }


class ForkedProcess:
    """A process forked from the fork server, with the part of Popen's interface tests use."""

    def __init__(self, process: BaseProcess, args: list[str]) -> None:
        self._process = process
        self.args = args

    @property
    def pid(self) -> int:
        assert self._process.pid is not None, "not started"
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        with _FORK_LOCK:
            return self._process.exitcode  # -N when signal N ended it

    def wait(self, timeout: float | None = None) -> int:
        multiprocessing.connection.wait([self._process.sentinel], timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never a pid the system may have reused
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _run_forked(target: Callable[[], None], env: dict[str, str], log_path: str) -> None:
    """In the forked child: run `target` under `env` (set before anything reads it), with
    stdout and stderr going to `log_path`, from the repository root, as start_process does."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        target()  # SystemExit(status) ends the child with that status, as the interpreter does
    finally:
        # The interpreter's exit runs these (logging.shutdown, ...); multiprocessing ends a
        # child with os._exit, which does not.
        atexit._run_exitfuncs()


def _worker_main() -> None:
    """What `python -m imagegen worker` runs (imagegen/__main__.py)."""
    from imagegen.cli.main import main

    sys.argv = [str(ROOT / "imagegen" / "__main__.py"), "worker"]
    main()


def _stop_forked_leftovers() -> None:
    # multiprocessing joins its live children at exit: a worker a failed test left running
    # would hold the session open (a Popen worker would be left behind instead).
    for process in _forked:
        process.kill()


def fork_process(target: Callable[[], None], env: dict[str, str], log_path: Path) -> Proc:
    """Run `target` (a module-level function) in a child of the fork server; see WORKER_MODULES."""
    global _server_env
    context = multiprocessing.get_context("forkserver")
    with _FORK_LOCK:
        if _server_env is None:
            context.set_forkserver_preload(WORKER_MODULES)
            _server_env = _shared_env(service_env(""))
            previous = {k: os.environ.get(k) for k in _server_env}
            os.environ.update(_server_env)  # the server inherits this process's environment
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                for key, value in previous.items():
                    if value is None:
                        del os.environ[key]
                    else:
                        os.environ[key] = value
            atexit.register(_stop_forked_leftovers)  # after multiprocessing's: runs before it
        # Only changes are refused: an import in this process may add a variable after the
        # server started (torch sets TORCHINDUCTOR_CACHE_DIR to its default).
        changed = sorted(k for k, v in _server_env.items() if env.get(k) != v)
        if changed:
            raise ValueError(
                f"{changed} differ from the fork server's environment, which its imports read"
                " once: start this process with forked=False"
            )
        log_path.write_bytes(b"")
        child = context.Process(
            target=_run_forked, args=(target, env, str(log_path)), name=log_path.stem
        )
        child.start()
        forked = ForkedProcess(child, [f"{target.__module__}.{target.__qualname__}"])
        _forked.append(forked)
    return Proc(forked, log_path)


def start_worker(
    redis_url: str,
    log_dir: Path,
    name: str,
    extra: Mapping[str, str] | None = None,
    *,
    forked: bool = False,
) -> Proc:
    """`python -m imagegen worker` as `name`; `forked`: the same entry point in a process forked
    from the fork server (saves the ~5 s of imports; see WORKER_MODULES)."""
    env = service_env(redis_url, {"IMAGEGEN_WORKER_NAME": name, **(extra or {})})
    log_path = log_dir / f"worker-{name}.log"
    if forked and FORK_WORKERS:
        if any(not key.startswith("IMAGEGEN_") for key in extra or {}):
            raise ValueError("a forked worker takes IMAGEGEN_* settings only: use forked=False")
        return fork_process(_worker_main, env, log_path)
    return start_process([sys.executable, "-m", "imagegen", "worker"], env, log_path)


def ready_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """How long a worker started with `env` may take to announce itself: its heartbeat starts
    after the warm-up, which with IMAGEGEN_COMPILE compiles every size of
    IMAGEGEN_COMPILE_BATCHES (about a minute each on an H100, two to three on smaller cards)."""
    env = env or {}
    if env.get("IMAGEGEN_COMPILE", "").lower() not in ("1", "true", "yes", "on"):
        return 120.0
    sizes = [s for s in env.get("IMAGEGEN_COMPILE_BATCHES", "1,2,4,8").split(",") if s.strip()]
    return 120.0 + 180.0 * len(sizes)


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
    # free_port() frees the port before the gateway binds it, and pytest sessions run side by
    # side (the S3 rerun beside the suite): another process can take it in between. Such a
    # gateway never serves; start another on a fresh port.
    for _ in range(2):
        try:
            return _start_gateway(redis_url, log_dir, extra, name)
        except PortTaken:
            pass
    return _start_gateway(redis_url, log_dir, extra, name)


class PortTaken(Exception):
    """The gateway's port was taken before it could bind it."""


def _start_gateway(
    redis_url: str, log_dir: Path, extra: Mapping[str, str] | None, name: str
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
        if "address already in use" in proc.log():  # it exits, status 3
            proc.stop(timeout_s=5)
            raise PortTaken(port)
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


def keep_only_announcements(connection: redis.Redis) -> None:
    """Empty the database but for what the live workers announced (their worker records, their
    models' records and tokenizers, the model lists, with only live workers in them), as if
    the workers had just started on an empty Redis.

    This is how each test starts from a clean database without waiting for the session's warm
    workers to announce themselves again after a FLUSHDB (a heartbeat, up to half a second,
    per test). A key prefix per test cannot do it: a warm worker serves one prefix."""
    beats = [
        (key, WorkerHeartbeat.model_validate_json(raw))
        for key in connection.scan_iter(match=Keys.worker("*"))
        if (raw := connection.get(key)) is not None
    ]
    single = [key for key, _ in beats]
    members: dict[str, dict[str, float]] = {}
    for _, beat in beats:
        for served in beat.served():
            members.setdefault(served.info.id, {})[beat.name] = beat.sent_at
            single.append(Keys.model(served.info.id))
            if served.info.tokenizer:
                single.append(Keys.tokenizer(served.info.tokenizer))
    kept = [(key, connection.dump(key), connection.pttl(key)) for key in dict.fromkeys(single)]
    with connection.pipeline(transaction=True) as pipe:
        pipe.flushdb()
        for key, value, ttl_ms in kept:
            if value is not None:
                pipe.restore(key, max(int(ttl_ms), 0), value, replace=True)
        for model_id, workers in members.items():
            pipe.zadd(Keys.model_workers(model_id), workers)
            pipe.sadd(Keys.MODELS, model_id)
        pipe.execute()


def announce_idle_model(connection: redis.Redis, model_id: str, **fields: object) -> None:
    """A model record as a worker would publish it (`fields` change it), with no worker behind
    it: its jobs queue."""
    info = ModelInfo.model_validate(
        {
            "id": model_id,
            "width": 64,
            "height": 64,
            "steps": 2,
            "guidance_scale": 1.0,
            "scheduler": "euler",
            "schedulers": ["euler"],
            **fields,
        }
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


def job_spec(**changes: object) -> JobSpec:
    """A 64x64, 4-step euler job of the tiny model, with `changes`: the one job factory."""
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


def batch_job(**changes: object) -> JobSpec:
    """The batch-loop tests' job: guidance 7.5 and a negative prompt (so both halves of
    guidance run), with `changes`."""
    batch = {"prompt": "a red cube", "negative_prompt": "blurry", "guidance_scale": 7.5, "seed": 11}
    return job_spec(**{**batch, **changes})


def submit(client: httpx.Client, **body: object) -> str:
    """POST /v1/generations with `body`; the new job's id (the answer must be a 202)."""
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


class TinyService:
    """A private service for the tests that kill, restart and time its parts: its own
    redis-server (AOF on, so a restart keeps the data), a gateway, and tiny-model workers
    forked with the shortened recovery bounds of FAST_RECOVERY."""

    def __init__(
        self,
        root: Path,
        tiny_model_dir: Path,
        gateway_env: Mapping[str, str] | None = None,
        model_id: str = "tiny",
    ) -> None:
        from imagegen.cli.redis_server import RedisServer

        self.root = root
        self.model_id = model_id
        self.model_env = {
            **FAST_RECOVERY,
            "IMAGEGEN_MODEL": str(tiny_model_dir),
            "IMAGEGEN_MODEL_ID": model_id,
        }
        self.redis = RedisServer(root / "redis", appendonly=True).start()
        self.conn = redis.Redis.from_url(self.redis.url)
        self.gateway = start_gateway(self.redis.url, root, {**FAST_RECOVERY, **(gateway_env or {})})
        self.workers: dict[str, Proc] = {}
        self.supervisors: list[Supervisor] = []
        self.info: ModelInfo | None = None  # the model's record, once a worker announced it
        self._numbers = iter(range(10**6))

    def start_worker(self, name: str | None = None, **extra: str) -> tuple[str, Proc]:
        """A worker (`extra`: its settings), started and not waited for; its name and process."""
        name = name or f"w{next(self._numbers)}"
        proc = start_worker(
            self.redis.url, self.root, name, {**self.model_env, **extra}, forked=True
        )
        self.workers[name] = proc
        return name, proc

    def worker(self, name: str | None = None, **extra: str) -> Proc:
        """A worker, once it is ready (its model's record is kept for `clean`)."""
        name, proc = self.start_worker(name, **extra)
        self.info = wait_for_worker(self.conn, proc, name).model
        return proc

    def supervised(self, name: str) -> Supervisor:
        """A worker restarted whenever it exits (generations named `<name>-g<n>`)."""

        def start(generation: int) -> Proc:
            env = self.model_env
            return start_worker(
                self.redis.url, self.root, f"{name}-g{generation}", env, forked=True
            )

        supervisor = Supervisor(start)
        wait_for_worker(self.conn, supervisor.proc, f"{name}-g0")
        self.supervisors.append(supervisor)
        return supervisor

    def client(self) -> httpx.Client:
        return self.gateway.client()

    def submit(
        self, client: httpx.Client, body: Mapping[str, object] | str, **fields: object
    ) -> str:
        """Submit a job (`body`, or a prompt and `fields`); its id."""
        payload = {"prompt": body, **fields} if isinstance(body, str) else {**body, **fields}
        return submit(client, **payload)

    def clean(self) -> None:
        """A clean database, with the model announced (as a worker that is gone had done)."""
        self.conn.flushdb()
        if self.info is not None:
            self.conn.set(Keys.model(self.model_id), self.info.model_dump_json())
            self.conn.sadd(Keys.MODELS, self.model_id)

    def close(self) -> None:
        for supervisor in self.supervisors:
            supervisor.stop()
        for proc in self.workers.values():
            proc.stop()
        self.gateway.proc.stop()
        self.redis.stop()
