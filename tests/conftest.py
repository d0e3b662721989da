"""Shared fixtures: a real redis-server, real worker processes and a real uvicorn gateway."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from imagegen.cli.redis_server import RedisServer
from tests.stack import (
    ROOT,
    Gateway,
    Proc,
    keep_only_announcements,
    start_gateway,
    start_worker,
    wait_for_worker,
)

TINY_MODEL_ID = "tiny"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url)
    yield connection
    connection.close()


KINDS = ("unit", "integration", "e2e", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its kind, the folder it lives in: `pytest -m unit` runs the
    in-process ones in seconds, `-m "not e2e and not browser"` everything but the service."""
    for item in items:
        parts = item.path.relative_to(ROOT / "tests").parts
        if len(parts) > 1 and parts[0] in KINDS:
            item.add_marker(parts[0])


def pytest_collection_finish(session: pytest.Session) -> None:
    """A test that waits on the network starts as soon as it is known to run: pip's resolver
    for the images' pins (tests/integration/test_image_requirements.py) runs beside the rest."""
    if any(
        item.name == "test_every_image_resolves_with_its_torch_and_pins" for item in session.items
    ):
        from tests.integration import test_image_requirements

        test_image_requirements.start_resolving(Path(tempfile.mkdtemp(prefix="pip-resolve-")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    module = sys.modules.get("tests.integration.test_image_requirements")
    if module is not None:
        module.stop_resolving()


@pytest.fixture(autouse=True)
def no_imagegen_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads an IMAGEGEN_* setting from the environment it was started in: a test's
    in-process Settings() are the defaults plus what the test says, and every process a test
    starts gets its settings from `tests.stack.service_env`."""
    for name in list(os.environ):
        if name.startswith("IMAGEGEN_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def clean_redis(request: pytest.FixtureRequest) -> None:
    """Each test on the shared redis-server starts from a clean database: nothing another test
    wrote is there but the session's warm workers' announcements, kept as they are
    (tests.stack.keep_only_announcements), so no test waits for them to announce again.

    A module whose tests share seeded state on purpose opts out with the
    `shares_redis_state` marker (the fuzzer: its generated cases name two seeded jobs)."""
    if "redis_server" not in request.fixturenames:
        return
    if request.node.get_closest_marker("shares_redis_state") is not None:
        return
    keep_only_announcements(request.getfixturevalue("redis_conn"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builtin_model.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def builtin_worker(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path
) -> Iterator[Proc]:
    """One worker serving the built-in model (IMAGEGEN_MODEL unset), as in the local run.

    Started by the real command (`python -m imagegen worker`), unlike the forked workers of
    most tests: every session covers the real start path."""
    proc = start_worker(redis_server.url, log_dir, "builtin-1")
    wait_for_worker(redis_conn, proc, "builtin-1")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tiny_worker(
    redis_server: RedisServer, redis_conn: redis.Redis, log_dir: Path, tiny_model_dir: Path
) -> Iterator[Proc]:
    """One worker serving the tiny random pipeline under the id `tiny`."""
    proc = start_worker(
        redis_server.url,
        log_dir,
        "tiny-1",
        {"IMAGEGEN_MODEL": str(tiny_model_dir), "IMAGEGEN_MODEL_ID": TINY_MODEL_ID},
        forked=True,
    )
    wait_for_worker(redis_conn, proc, "tiny-1")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(redis_server: RedisServer, log_dir: Path) -> Iterator[Gateway]:
    """The gateway with default settings (default model: the built-in shapes-64)."""
    gw = start_gateway(redis_server.url, log_dir)
    yield gw
    gw.proc.stop()


@pytest.fixture(scope="session")
def stack(gateway: Gateway, builtin_worker: Proc, tiny_worker: Proc) -> Gateway:
    """Gateway plus one built-in-model worker and one tiny-model worker, all warm."""
    return gateway
