"""A Redis password made by `openssl rand -base64` (with `/`, `+`, `=`) or by hand (`#`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from pydantic import ValidationError
from typer.testing import CliRunner

from imagegen.cli.main import app
from imagegen.cli.redis_server import RedisServer
from imagegen.core.settings import Settings
from tests.stack import start_gateway, start_worker, wait_for_job, wait_for_worker

# `/` and `#` end a URL's authority, `+` and `=` are harmless: redis-py cannot read the first
# two in `redis://:<password>@host`.
PASSWORD = "Zq8/x+Lr#W3kP=="


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path_factory.mktemp("redis-auth"), appendonly=False, password=PASSWORD
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize("command", ["api", "worker"])
def test_a_raw_password_in_the_url_is_one_clear_error_naming_the_setting(command: str) -> None:
    env = {"IMAGEGEN_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:6379/0"}
    result = CliRunner().invoke(app, [command], env=env)
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("invalid setting: IMAGEGEN_REDIS_URL: ")
    assert "IMAGEGEN_REDIS_PASSWORD" in line
    assert PASSWORD not in result.output  # never echoed: it is a secret


def test_the_password_in_both_places_is_refused() -> None:
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:6379/0"
    with pytest.raises(ValidationError, match="IMAGEGEN_REDIS_PASSWORD"):
        Settings(redis_url=url, redis_password=PASSWORD)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["setting", "percent-encoded URL"])
def test_settings_reach_a_redis_with_such_a_password(locked_redis: RedisServer, where: str) -> None:
    if where == "setting":
        settings = Settings(redis_url=locked_redis.url, redis_password=PASSWORD)  # type: ignore[arg-type]
    else:
        url = locked_redis.url.replace("redis://", f"redis://:{quote(PASSWORD, safe='')}@")
        settings = Settings(redis_url=url)
    connection = redis.Redis.from_url(settings.redis_url, **settings.redis_options())
    assert connection.ping()
    connection.close()


@pytest.mark.slow
def test_gateway_and_worker_run_a_job_with_the_password_in_its_setting(
    locked_redis: RedisServer, tmp_path: Path
) -> None:
    extra = {"IMAGEGEN_REDIS_PASSWORD": PASSWORD}
    worker = start_worker(locked_redis.url, tmp_path, "auth-1", extra, forked=True)
    gateway = start_gateway(locked_redis.url, tmp_path, extra)
    admin = redis.Redis.from_url(locked_redis.url, password=PASSWORD)
    try:
        wait_for_worker(admin, worker, "auth-1")
        with gateway.client() as client:
            response = client.post("/v1/generations", json={"prompt": "a red circle", "steps": 2})
            assert response.status_code == 202, response.text
            doc = wait_for_job(client, response.json()["id"])
            assert doc["status"] == "succeeded", doc
            assert client.get("/readyz").status_code == 200
            png = client.get(str(doc["images"][0]["url"]))  # type: ignore[index]
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert PASSWORD not in gateway.proc.log() and PASSWORD not in worker.log()
    finally:
        gateway.proc.stop()
        worker.stop()
        admin.close()
